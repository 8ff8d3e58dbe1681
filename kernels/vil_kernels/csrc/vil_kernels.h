// Macros shared by vil_kernels' C++ sources (built together by vil_kernels/native.py).
#pragma once

// Row loops compiled for AVX-512, AVX2 and baseline x86-64, the CPU choosing one at load time, so that one build
// runs on any x86 machine (GCC only; elsewhere the plain build).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VIL_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VIL_TARGET_CLONES
#endif

#define VIL_INLINE inline __attribute__((always_inline))
