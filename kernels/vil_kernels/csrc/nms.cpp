// Greedy non-maximum suppression on boxes already sorted by score (vil_kernels/ops/nms.py).
//
// The PyTorch paths tile the IoUs into (kept, block) and (block, block) tensors and resolve each block's chain as a
// fixed point: a few dozen ops per block, which on the RPN's 1-3 thousand candidates per image cost more than the
// arithmetic. Here the greedy loop runs as written: each kept box suppresses the later boxes it overlaps, and the loop
// stops once max_kept boxes are kept. The IoU takes the steps of boxes.py's pairwise_iou in the same order (compiled
// without FMA contraction), so every comparison with the threshold comes out as it does there.

#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vil_kernels.h"

namespace {

// Marks the boxes j in [begin, n) that box i suppresses. Branch-free (ternaries, not std::min/max) so that it
// vectorises; compiled for AVX-512, AVX2 and baseline x86-64, the CPU picking one at load time.
template <typename T>
inline void suppress_row(const T* x1, const T* y1, const T* x2, const T* y2, const T* area, const int64_t* category,
                         int64_t i, int64_t begin, int64_t n, T threshold, uint8_t* suppressed) {
  const T ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], ia = area[i];
  const int64_t ic = category != nullptr ? category[i] : 0;
#pragma omp simd
  for (int64_t j = begin; j < n; ++j) {
    const T left = ix1 > x1[j] ? ix1 : x1[j], right = ix2 < x2[j] ? ix2 : x2[j];
    const T top = iy1 > y1[j] ? iy1 : y1[j], bottom = iy2 < y2[j] ? iy2 : y2[j];
    T w = right - left, h = bottom - top;
    w = w < T(0) ? T(0) : w;
    h = h < T(0) ? T(0) : h;
    const T inter = w * h;
    const T iou = inter / ((ia + area[j]) - inter);
    const bool same = category == nullptr || category[j] == ic;
    suppressed[j] |= static_cast<uint8_t>(same & (iou > threshold));
  }
}

VIL_TARGET_CLONES void suppress_row_float(const float* x1, const float* y1, const float* x2, const float* y2,
                                          const float* area, const int64_t* category, int64_t i, int64_t begin,
                                          int64_t n, float threshold, uint8_t* suppressed) {
  suppress_row<float>(x1, y1, x2, y2, area, category, i, begin, n, threshold, suppressed);
}

VIL_TARGET_CLONES void suppress_row_double(const double* x1, const double* y1, const double* x2, const double* y2,
                                           const double* area, const int64_t* category, int64_t i, int64_t begin,
                                           int64_t n, double threshold, uint8_t* suppressed) {
  suppress_row<double>(x1, y1, x2, y2, area, category, i, begin, n, threshold, suppressed);
}

inline void suppress(const float* x1, const float* y1, const float* x2, const float* y2, const float* area,
                     const int64_t* category, int64_t i, int64_t begin, int64_t n, float threshold,
                     uint8_t* suppressed) {
  suppress_row_float(x1, y1, x2, y2, area, category, i, begin, n, threshold, suppressed);
}

inline void suppress(const double* x1, const double* y1, const double* x2, const double* y2, const double* area,
                     const int64_t* category, int64_t i, int64_t begin, int64_t n, double threshold,
                     uint8_t* suppressed) {
  suppress_row_double(x1, y1, x2, y2, area, category, i, begin, n, threshold, suppressed);
}

template <typename T>
std::vector<int64_t> greedy_kept(const T* x1, const T* y1, const T* x2, const T* y2, const T* area,
                                 const int64_t* category, int64_t n, T threshold, int64_t limit) {
  std::vector<int64_t> kept;
  std::vector<uint8_t> suppressed(n, 0);
  for (int64_t i = 0; i < n && static_cast<int64_t>(kept.size()) < limit; ++i) {
    if (suppressed[i]) continue;
    kept.push_back(i);
    suppress(x1, y1, x2, y2, area, category, i, i + 1, n, threshold, suppressed.data());
  }
  return kept;
}

// coords: (4, N) x1, y1, x2, y2 of the boxes in visiting order; area: (N,); category: (N,) int64 or None (one class).
// -> the positions (in that order) of the kept boxes, at most max_kept of them.
at::Tensor nms_sorted(const at::Tensor& coords, const at::Tensor& area, const std::optional<at::Tensor>& category,
                      double threshold, int64_t max_kept) {
  TORCH_CHECK(coords.device().is_cpu(), "vil_kernels' C++ NMS runs on CPU tensors");
  TORCH_CHECK(coords.scalar_type() == at::kFloat || coords.scalar_type() == at::kDouble,
              "vil_kernels' C++ NMS takes float32 or float64 boxes, got ", coords.scalar_type());
  TORCH_CHECK(coords.dim() == 2 && coords.size(0) == 4 && coords.is_contiguous(),
              "coords must be a contiguous (4, N) tensor, got ", coords.sizes());
  const int64_t n = coords.size(1);
  TORCH_CHECK(area.scalar_type() == coords.scalar_type() && area.dim() == 1 && area.size(0) == n &&
                  area.is_contiguous(),
              "area must be a contiguous (", n, ",) tensor of the boxes' dtype, got ", area.sizes());
  const int64_t* category_data = nullptr;
  if (category.has_value()) {
    TORCH_CHECK(category->scalar_type() == at::kLong && category->dim() == 1 && category->size(0) == n &&
                    category->is_contiguous(),
                "category must be a contiguous (", n, ",) int64 tensor, got ", category->scalar_type(), " ",
                category->sizes());
    category_data = category->const_data_ptr<int64_t>();
  }
  TORCH_CHECK(max_kept >= 0, "max_kept must be non-negative, got ", max_kept);
  std::vector<int64_t> kept;
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "nms_sorted", [&] {
    const scalar_t* c = coords.const_data_ptr<scalar_t>();
    // the threshold was chosen representable in the boxes' dtype by the caller (_strict_threshold)
    kept = greedy_kept<scalar_t>(c, c + n, c + 2 * n, c + 3 * n, area.const_data_ptr<scalar_t>(), category_data, n,
                                 static_cast<scalar_t>(threshold), max_kept);
  });
  at::Tensor out = at::empty({static_cast<int64_t>(kept.size())}, coords.options().dtype(at::kLong));
  std::copy(kept.begin(), kept.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vil_kernels_native, m) {
  m.def("nms_sorted(Tensor coords, Tensor area, Tensor? category, float threshold, int max_kept) -> Tensor");
}

TORCH_LIBRARY_IMPL(vil_kernels_native, CPU, m) { m.impl("nms_sorted", &nms_sorted); }
