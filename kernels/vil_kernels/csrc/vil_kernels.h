// Macros and bfloat16 helpers shared by vil_kernels' C++ sources (built together by vil_kernels/native.py).
#pragma once

#include <cstdint>
#include <cstring>

// Row loops compiled for AVX-512, AVX2 and baseline x86-64, the CPU choosing one at load time, so that one build
// runs on any x86 machine (GCC only; elsewhere the plain build).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VIL_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VIL_TARGET_CLONES
#endif

#define VIL_INLINE inline __attribute__((always_inline))

namespace vil_kernels {

using bfloat16_bits = uint16_t;

// A bfloat16's bits are the high half of the float32 it stands for: widening is exact.
VIL_INLINE float widen_bfloat16(bfloat16_bits x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Round to nearest even, as PyTorch's float -> bfloat16 conversion does for finite values.
VIL_INLINE bfloat16_bits round_to_bfloat16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<bfloat16_bits>(bits >> 16);
}

}  // namespace vil_kernels
