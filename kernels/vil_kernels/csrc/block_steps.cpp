// Two steps of a ViL block's bfloat16 inference on CPU (vil_hf/modeling_vil.py, ViLLayer._inference_forward), each
// one pass over the float32 residual stream where PyTorch ops take two and a fresh tensor:
//
//   layer_norm_bf16_: a LayerNorm of float32 rows written straight as bfloat16 (the dtype the next linear layer takes
//     under autocast), where F.layer_norm writes a float32 map that a cast then reads again;
//   add_widened_:     out = residual + branch with a float32 residual and a bfloat16 branch, the branch widened as it
//     is read (exactly), where a sum of mixed dtypes takes TensorIterator's unvectorised casting loop and the fast
//     form first widens the branch into a tensor of its own.
//
// Both take (B, R, C) views with unit stride in C and any strides in B and R (a block's chunks are split views of
// the stream). Rows are split over ATen's thread pool; the row loops are compiled for AVX-512, AVX2 and baseline
// x86-64 (VIL_TARGET_CLONES).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

#include "vil_kernels.h"

namespace {

using vil_kernels::bfloat16_bits;
using vil_kernels::round_to_bfloat16;
using vil_kernels::widen_bfloat16;

constexpr int64_t kLanes = 16;  // independent partial sums: the compiler keeps them in one vector register

// sum of x[i] (or of (x[i] - center)^2 where kSquares) over n values, in kLanes partial sums and then their total
template <bool kSquares>
VIL_INLINE float row_sum(const float* x, int64_t n, float center) {
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const float value = kSquares ? (x[i + lane] - center) * (x[i + lane] - center) : x[i + lane];
      partial[lane] += value;
    }
  }
  for (int64_t lane = 0; i < n; ++i, ++lane) {
    partial[lane] += kSquares ? (x[i] - center) * (x[i] - center) : x[i];
  }
  float total = 0.0f;
  for (int64_t lane = 0; lane < kLanes; ++lane) total += partial[lane];
  return total;
}

// One row: mean, then the variance about it (two passes over a row that stays in L1: no cancellation), then
// (x - mean) * rstd * weight + bias rounded once to bfloat16.
VIL_TARGET_CLONES void layer_norm_row(const float* x, const float* weight, const float* bias, float eps, int64_t n,
                                      bfloat16_bits* out) {
  const float mean = row_sum<false>(x, n, 0.0f) / static_cast<float>(n);
  const float variance = row_sum<true>(x, n, mean) / static_cast<float>(n);
  const float rstd = 1.0f / std::sqrt(variance + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = round_to_bfloat16((x[i] - mean) * rstd * weight[i] + bias[i]);
}

VIL_TARGET_CLONES void add_widened_row(const float* residual, const bfloat16_bits* branch, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = residual[i] + widen_bfloat16(branch[i]);
}

void check_rows(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, name, " must be a ", c10::toString(dtype),
              " CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 3 && t.sizes() == sizes, name, " must be (B, R, C) ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, " must have unit stride in its last dim");
}

// Calls row(b, r) for every row of a (B, R, C) map, rows split over the threads.
template <typename Row>
void for_rows(int64_t batch, int64_t rows, int64_t width, Row row) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));  // ~64 KB of float32 a task
  at::parallel_for(0, batch * rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) row(index / rows, index % rows);
  });
}

void layer_norm_bf16_(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps,
                      at::Tensor out) {
  check_rows(input, "input", at::kFloat, input.sizes());
  check_rows(out, "out", at::kBFloat16, input.sizes());
  const int64_t width = input.size(2);
  for (const auto* parameter : {&weight, &bias}) {
    TORCH_CHECK(parameter->device().is_cpu() && parameter->scalar_type() == at::kFloat && parameter->dim() == 1 &&
                    parameter->size(0) == width && parameter->is_contiguous(),
                "weight and bias must be contiguous float32 CPU tensors of ", width, " values");
  }
  const float* x = input.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  auto* y = reinterpret_cast<bfloat16_bits*>(out.data_ptr());
  const auto [xb, xr] = std::pair{input.stride(0), input.stride(1)};
  const auto [yb, yr] = std::pair{out.stride(0), out.stride(1)};
  for_rows(input.size(0), input.size(1), width, [&](int64_t i, int64_t r) {
    layer_norm_row(x + i * xb + r * xr, w, b, static_cast<float>(eps), width, y + i * yb + r * yr);
  });
}

void add_widened_(const at::Tensor& residual, const at::Tensor& branch, at::Tensor out) {
  check_rows(residual, "residual", at::kFloat, residual.sizes());
  check_rows(branch, "branch", at::kBFloat16, residual.sizes());
  check_rows(out, "out", at::kFloat, residual.sizes());
  const float* x = residual.const_data_ptr<float>();
  const auto* z = reinterpret_cast<const bfloat16_bits*>(branch.const_data_ptr());
  float* y = out.data_ptr<float>();
  const auto [xb, xr] = std::pair{residual.stride(0), residual.stride(1)};
  const auto [zb, zr] = std::pair{branch.stride(0), branch.stride(1)};
  const auto [yb, yr] = std::pair{out.stride(0), out.stride(1)};
  for_rows(residual.size(0), residual.size(1), residual.size(2), [&](int64_t i, int64_t r) {
    add_widened_row(x + i * xb + r * xr, z + i * zb + r * zr, residual.size(2), y + i * yb + r * yr);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vil_kernels_native, m) {
  m.def("layer_norm_bf16_(Tensor input, Tensor weight, Tensor bias, float eps, Tensor(a!) out) -> ()");
  m.def("add_widened_(Tensor residual, Tensor branch, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(vil_kernels_native, CPU, m) {
  m.impl("layer_norm_bf16_", &layer_norm_bf16_);
  m.impl("add_widened_", &add_widened_);
}
