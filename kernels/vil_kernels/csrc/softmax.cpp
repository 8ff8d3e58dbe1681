// Fused softmax steps of the blocked longformer kernel (vil_kernels/longformer/blocked.py).
//
// The blocked kernel's score products are BLAS calls; between them, each run's (chunks, query slots, key slots)
// scores get the shared bias added and a softmax taken, and in the backward dS = P * (dP - delta) and the bias
// gradient (dS summed over chunks). In PyTorch ops these are 3-5 passes over the scores, each of which reads and
// writes the whole run (in bfloat16 also the float32 copy the sums are taken in). Here each query row (a few hundred
// key slots) is read once, worked on in a float32 row buffer that stays in L1, and written once.
//
// Built on first use by vil_kernels.native (torch.utils.cpp_extension); the Python ops stay the reference and the
// fallback. Rows are split over ATen's thread pool. On x86-64 with GCC, the row loops are compiled for AVX-512,
// AVX2 and baseline x86-64 and the CPU picks one at load time, so one build runs on any x86 machine.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vil_kernels.h"

namespace {

using vil_kernels::bfloat16_bits;

VIL_INLINE float widen(float x) { return x; }

VIL_INLINE float widen(bfloat16_bits x) { return vil_kernels::widen_bfloat16(x); }

template <typename T>
VIL_INLINE T narrow(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return vil_kernels::round_to_bfloat16(x);  // inputs here are finite
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

// One row: probs = softmax(scores + bias) in float32; written to `out` (the scores' dtype) and, if given, float_out.
template <typename T>
VIL_INLINE void bias_softmax_row(const T* scores, const float* bias, T* out, float* float_out, float* row,
                                 int64_t length) {
  float most = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : most)
  for (int64_t k = 0; k < length; ++k) {
    const float value = widen(scores[k]) + bias[k];
    row[k] = value;
    most = value > most ? value : most;
  }
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < length; ++k) {
    const float e = exp_nonpositive(row[k] - most);
    row[k] = e;
    total += e;
  }
  const float inverse = 1.0f / total;
  if (float_out != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < length; ++k) {
      const float p = row[k] * inverse;
      float_out[k] = p;
      out[k] = narrow<T>(p);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < length; ++k) out[k] = narrow<T>(row[k] * inverse);
  }
}

// One row: ds = probs * (dp - delta), written over dp (its dtype); added to bias_grad if given.
template <typename T>
VIL_INLINE void softmax_grad_row(T* grad, const float* probs, float delta, float* bias_grad, int64_t length) {
  if (bias_grad != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < length; ++k) {
      const float ds = probs[k] * (widen(grad[k]) - delta);
      bias_grad[k] += ds;
      grad[k] = narrow<T>(ds);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < length; ++k) grad[k] = narrow<T>(probs[k] * (widen(grad[k]) - delta));
  }
}

VIL_TARGET_CLONES void bias_softmax_rows_float(const float* scores, const float* bias, float* out, float* float_out,
                                               float* row, int64_t length) {
  bias_softmax_row<float>(scores, bias, out, float_out, row, length);
}

VIL_TARGET_CLONES void bias_softmax_rows_bfloat16(const bfloat16_bits* scores, const float* bias, bfloat16_bits* out,
                                                  float* float_out, float* row, int64_t length) {
  bias_softmax_row<bfloat16_bits>(scores, bias, out, float_out, row, length);
}

VIL_TARGET_CLONES void softmax_grad_rows_float(float* grad, const float* probs, float delta, float* bias_grad,
                                               int64_t length) {
  softmax_grad_row<float>(grad, probs, delta, bias_grad, length);
}

VIL_TARGET_CLONES void softmax_grad_rows_bfloat16(bfloat16_bits* grad, const float* probs, float delta,
                                                  float* bias_grad, int64_t length) {
  softmax_grad_row<bfloat16_bits>(grad, probs, delta, bias_grad, length);
}

// A float32 tensor laid out like the scores: (chunks, slots, key slots) = (n, slots, length), contiguous.
void check_rows(const at::Tensor& t, const char* name, int64_t n, int64_t slots, int64_t length) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == n && t.size(1) == slots && t.size(2) == length, name,
              " must be (chunks, slots, key slots) = (", n, ", ", slots, ", ", length, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The tensor an op works in place on (scores, or dP becoming dS): (chunks, slots, key slots), contiguous,
// float32 or bfloat16, on CPU.
void check_scores(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be (chunks, slots, key slots), got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "vil_kernels softmax ops run on CPU tensors");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "vil_kernels softmax ops take float32 or bfloat16 ", name, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// bias or bias gradient (maps, slots, S) for checked scores (n, slots, S): float32, unit stride in S and S between
// slots (maps may be strided); maps divides n, the run's chunks being map-major.
void check_bias(const at::Tensor& scores, const at::Tensor& bias, const char* name) {
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.device().is_cpu(), name, " must be a float32 CPU tensor");
  TORCH_CHECK(bias.dim() == 3 && bias.size(1) == scores.size(1) && bias.size(2) == scores.size(2), name,
              " must be (maps, slots, key slots) matching the scores ", scores.sizes(), ", got ", bias.sizes());
  TORCH_CHECK(bias.stride(2) == 1 && bias.stride(1) == bias.size(2), name, " rows must be contiguous");
  TORCH_CHECK(bias.size(0) > 0 && scores.size(0) % bias.size(0) == 0, "the scores' ", scores.size(0),
              " chunks do not split into ", name, "'s ", bias.size(0), " maps");
}

void bias_softmax_(at::Tensor scores, const at::Tensor& bias, const std::optional<at::Tensor>& float_probs) {
  check_scores(scores, "scores");
  check_bias(scores, bias, "bias");
  const int64_t n = scores.size(0), slots = scores.size(1), length = scores.size(2);
  if (float_probs.has_value()) {
    TORCH_CHECK(float_probs->scalar_type() == at::kFloat, "float_probs must be float32");
    check_rows(*float_probs, "float_probs", n, slots, length);
  }
  const int64_t chunks_per_map = n / bias.size(0), map_stride = bias.stride(0);
  const bool is_float = scores.scalar_type() == at::kFloat;
  void* data = scores.data_ptr();
  const float* bias_data = bias.const_data_ptr<float>();
  float* float_data = float_probs.has_value() ? float_probs->data_ptr<float>() : nullptr;
  at::parallel_for(0, n * slots, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(length);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t chunk = r / slots, slot = r % slots;
      const float* b = bias_data + (chunk / chunks_per_map) * map_stride + slot * length;
      float* f = float_data != nullptr ? float_data + r * length : nullptr;
      if (is_float) {
        float* s = static_cast<float*>(data) + r * length;
        bias_softmax_rows_float(s, b, s, f, row.data(), length);
      } else {
        auto* s = static_cast<bfloat16_bits*>(data) + r * length;
        bias_softmax_rows_bfloat16(s, b, s, f, row.data(), length);
      }
    }
  });
}

void softmax_grad_(at::Tensor grad, const at::Tensor& probs, const at::Tensor& delta,
                   const std::optional<at::Tensor>& bias_grad) {
  check_scores(grad, "grad");
  const int64_t n = grad.size(0), slots = grad.size(1), length = grad.size(2);
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "probs must be float32");
  check_rows(probs, "probs", n, slots, length);
  TORCH_CHECK(delta.scalar_type() == at::kFloat && delta.dim() == 3 && delta.size(0) == n && delta.size(1) == slots &&
                  delta.size(2) == 1,
              "delta must be float32 (chunks, slots, 1), got ", delta.scalar_type(), " ", delta.sizes());
  int64_t maps = 1, map_stride = 0;
  float* bias_grad_data = nullptr;
  if (bias_grad.has_value()) {
    check_bias(grad, *bias_grad, "bias_grad");
    maps = bias_grad->size(0);
    map_stride = bias_grad->stride(0);
    bias_grad_data = bias_grad->data_ptr<float>();
  }
  const int64_t chunks_per_map = n / maps, delta_chunk = delta.stride(0), delta_slot = delta.stride(1);
  const bool is_float = grad.scalar_type() == at::kFloat;
  void* data = grad.data_ptr();
  const float* probs_data = probs.const_data_ptr<float>();
  const float* delta_data = delta.const_data_ptr<float>();
  // One task per (map, slot): it owns that slot's bias-gradient row, so the sum over chunks needs no lock.
  at::parallel_for(0, maps * slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t map = task / slots, slot = task % slots;
      float* g = bias_grad_data != nullptr ? bias_grad_data + map * map_stride + slot * length : nullptr;
      for (int64_t chunk = map * chunks_per_map; chunk < (map + 1) * chunks_per_map; ++chunk) {
        const int64_t r = chunk * slots + slot;
        const float d = delta_data[chunk * delta_chunk + slot * delta_slot];
        if (is_float) {
          softmax_grad_rows_float(static_cast<float*>(data) + r * length, probs_data + r * length, d, g, length);
        } else {
          softmax_grad_rows_bfloat16(static_cast<bfloat16_bits*>(data) + r * length, probs_data + r * length, d, g,
                                     length);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(vil_kernels_native, m) {
  m.def("bias_softmax_(Tensor(a!) scores, Tensor bias, Tensor(b!)? float_probs) -> ()");
  m.def("softmax_grad_(Tensor(a!) grad, Tensor probs, Tensor delta, Tensor(b!)? bias_grad) -> ()");
}

TORCH_LIBRARY_IMPL(vil_kernels_native, CPU, m) {
  m.impl("bias_softmax_", &bias_softmax_);
  m.impl("softmax_grad_", &softmax_grad_);
}
