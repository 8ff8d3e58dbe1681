// Macros and float helpers shared by vil_kernels' C++ sources (built together by vil_kernels/native.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

// Row loops compiled for AVX-512, AVX2 and baseline x86-64, the CPU choosing one at load time, so that one build
// runs on any x86 machine (GCC only; elsewhere the plain build).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VIL_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VIL_TARGET_CLONES
#endif

#define VIL_INLINE inline __attribute__((always_inline))

// Float helpers of the softmax loops (softmax.cpp, attention_amx.cpp): bfloat16 bits, widening and rounding, exp.
namespace vil_kernels {

using bfloat16_bits = uint16_t;

VIL_INLINE float widen(float x) { return x; }

VIL_INLINE float widen(bfloat16_bits x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

template <typename T>
VIL_INLINE T narrow(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    // round to nearest even, as PyTorch's float -> bfloat16 conversion does (inputs here are finite)
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return static_cast<bfloat16_bits>(bits >> 16);
  }
}

// exp(x) for x <= 0 (scores minus their row's maximum): 2^n * p(r) with r = x - n ln 2 in [-ln2/2, ln2/2] and p the
// degree-6 Taylor polynomial (relative error below 2e-7 there). Written without calls or branches, so that the
// compiler vectorises the loops that use it. Below -87 (exp underflows float32; the -inf of masked slots) it is 0.
VIL_INLINE float exp_nonpositive(float x) {
  const float kept = x < -87.0f ? 0.0f : 1.0f;
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln 2), by adding and subtracting 1.5 * 2^23 (rounds in the default rounding mode)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts, for an exact product
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof two_to_n);
  return p * two_to_n * kept;
}

}  // namespace vil_kernels
