// RoIAlign over a channels-last feature table (vil_kernels/ops/roi_align.py), forward and input gradient.
//
// The PyTorch path builds every RoI's bilinear taps as index and weight tensors and reduces them with embedding_bag;
// on the detection heads' shapes (a thousand small RoIs, 64 channels) building those tensors costs more than the sums.
// Here each RoI's taps are worked out on the fly, in the same arithmetic as _axis_taps there, and summed straight from
// the table. The Python side computes the per-RoI geometry (start, bin size, sampling grid) and the map layout, so the
// sampling rules stay written once; the PyTorch path stays the reference the tests hold this against, and the fallback.
//
// Per RoI: geometry (K, 4) = start_y, start_x, bin_h, bin_w (the table's dtype); layout (K, 6) int64 = grid_h, grid_w,
// first table row of its map, the map's row stride, and the height and width its samples clamp to.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vil_kernels.h"

namespace {

// One axis's bilinear taps for every (pooled cell, sample point): the low and high row (column) and their weights;
// points out of range carry zero weights (they still count in the average).
template <typename T>
struct AxisTaps {
  std::vector<int64_t> low, high;
  std::vector<T> low_weight, high_weight;
};

template <typename T>
void axis_taps(T start, T bin_size, int64_t grid, int64_t pooled, int64_t size, AxisTaps<T>& taps) {
  const int64_t n = pooled * grid;
  taps.low.resize(n);
  taps.high.resize(n);
  taps.low_weight.resize(n);
  taps.high_weight.resize(n);
  const T grid_f = static_cast<T>(std::max<int64_t>(grid, 1));
  const T last = static_cast<T>(size - 1);
  for (int64_t p = 0; p < pooled; ++p) {
    for (int64_t i = 0; i < grid; ++i) {
      const int64_t t = p * grid + i;
      // the order of operations of the PyTorch path (compiled without contracting into FMAs)
      T coord = (start + static_cast<T>(p) * bin_size) + ((static_cast<T>(i) + T(0.5)) * bin_size) / grid_f;
      const bool valid = coord >= T(-1) && coord <= last + T(1);
      coord = std::max(coord, T(0));
      const T low = std::min(std::floor(coord), last);
      const bool at_edge = low >= last;
      if (at_edge) coord = low;
      const T frac = coord - low;
      const int64_t low_i = static_cast<int64_t>(low);
      taps.low[t] = valid ? low_i : 0;
      taps.high[t] = valid ? (at_edge ? low_i : low_i + 1) : 0;
      taps.low_weight[t] = valid ? T(1) - frac : T(0);
      taps.high_weight[t] = valid ? frac : T(0);
    }
  }
}

template <typename T>
struct RoI {
  T start_y, start_x, bin_h, bin_w;
  int64_t grid_h, grid_w, base, row_stride, height, width;
};

template <typename T>
RoI<T> roi_at(const T* geometry, const int64_t* layout, int64_t k) {
  const T* g = geometry + 4 * k;
  const int64_t* l = layout + 6 * k;
  return {g[0], g[1], g[2], g[3], l[0], l[1], l[2], l[3], l[4], l[5]};
}

// The RoI's taps along each axis, into ys and xs; false where it has no sample points (its output is zero).
template <typename T>
bool roi_taps(const RoI<T>& roi, int64_t pooled_h, int64_t pooled_w, AxisTaps<T>& ys, AxisTaps<T>& xs) {
  if (roi.grid_h <= 0 || roi.grid_w <= 0) return false;
  axis_taps(roi.start_y, roi.bin_h, roi.grid_h, pooled_h, roi.height, ys);
  axis_taps(roi.start_x, roi.bin_w, roi.grid_w, pooled_w, roi.width, xs);
  return true;
}

// Calls visit(table row, weight) for every tap of bin (ph, pw) with a nonzero weight: the 4 bilinear taps of each of
// the bin's grid_h x grid_w sample points.
template <typename T, typename Visit>
VIL_INLINE void for_each_tap(const RoI<T>& roi, const AxisTaps<T>& ys, const AxisTaps<T>& xs, int64_t ph, int64_t pw,
                             Visit&& visit) {
  for (int64_t iy = 0; iy < roi.grid_h; ++iy) {
    const int64_t ty = ph * roi.grid_h + iy;
    const int64_t rows[2] = {roi.base + ys.low[ty] * roi.row_stride, roi.base + ys.high[ty] * roi.row_stride};
    const T wy[2] = {ys.low_weight[ty], ys.high_weight[ty]};
    for (int64_t ix = 0; ix < roi.grid_w; ++ix) {
      const int64_t tx = pw * roi.grid_w + ix;
      const int64_t cols[2] = {xs.low[tx], xs.high[tx]};
      const T wx[2] = {xs.low_weight[tx], xs.high_weight[tx]};
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 2; ++b) {
          const T w = wy[a] * wx[b];
          if (w != T(0)) visit(rows[a] + cols[b], w);
        }
      }
    }
  }
}

// out[k, :, ph, pw] = (sum over the bin's sample points and their 4 taps of weight * table[row, :]) / count.
template <typename T>
void forward_kernel(const T* table, const T* geometry, const int64_t* layout, T* out, int64_t rois, int64_t channels,
                    int64_t pooled_h, int64_t pooled_w) {
  at::parallel_for(0, rois, 8, [&](int64_t begin, int64_t end) {
    AxisTaps<T> ys, xs;
    std::vector<T> sum(channels);
    for (int64_t k = begin; k < end; ++k) {
      const RoI<T> roi = roi_at(geometry, layout, k);
      T* out_roi = out + k * pooled_h * pooled_w * channels;
      if (!roi_taps(roi, pooled_h, pooled_w, ys, xs)) {  // no sample points: zeros, the reference averages nothing
        std::fill(out_roi, out_roi + pooled_h * pooled_w * channels, T(0));
        continue;
      }
      const T count = static_cast<T>(roi.grid_h * roi.grid_w);
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          std::fill(sum.begin(), sum.end(), T(0));
          T* s = sum.data();
          for_each_tap(roi, ys, xs, ph, pw, [&](int64_t row, T w) {
            const T* values = table + row * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) s[c] += w * values[c];
          });
          // out is (K, C, out_h, out_w), as the heads take it: a strided write within the RoI's block (in cache)
          // rather than a transposing copy of the whole output afterwards
          T* o = out_roi + ph * pooled_w + pw;
          for (int64_t c = 0; c < channels; ++c) o[c * pooled_h * pooled_w] = sum[c] / count;
        }
      }
    }
  });
}

// grad_table[row, :] += weight / count * grad[k, :, ph, pw] over every tap that read the row. The threads split the
// channels, so each owns its columns of grad_table: no locks, and the sums run in the same order on every run.
template <typename T>
void backward_kernel(const T* grad, const T* geometry, const int64_t* layout, T* grad_table, int64_t rois,
                     int64_t channels, int64_t pooled_h, int64_t pooled_w) {
  const int64_t bins = pooled_h * pooled_w;
  at::parallel_for(0, channels, 16, [&](int64_t c_begin, int64_t c_end) {
    AxisTaps<T> ys, xs;
    std::vector<T> grad_roi(bins * channels);  // this RoI's gradient, channels-last
    for (int64_t k = 0; k < rois; ++k) {
      const RoI<T> roi = roi_at(geometry, layout, k);
      if (!roi_taps(roi, pooled_h, pooled_w, ys, xs)) continue;
      const T count = static_cast<T>(roi.grid_h * roi.grid_w);
      for (int64_t c = c_begin; c < c_end; ++c) {
        const T* from = grad + (k * channels + c) * bins;
        for (int64_t bin = 0; bin < bins; ++bin) grad_roi[bin * channels + c] = from[bin];
      }
      for (int64_t ph = 0; ph < pooled_h; ++ph) {
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
          const T* g = grad_roi.data() + (ph * pooled_w + pw) * channels;
          for_each_tap(roi, ys, xs, ph, pw, [&](int64_t row, T w) {
            const T scaled = w / count;
            T* grads = grad_table + row * channels;
#pragma omp simd
            for (int64_t c = c_begin; c < c_end; ++c) grads[c] += scaled * g[c];
          });
        }
      }
    }
  });
}

void check_rois(const at::Tensor& values, const at::Tensor& geometry, const at::Tensor& layout, int64_t rois,
                const char* name) {
  TORCH_CHECK(values.device().is_cpu(), "vil_kernels' C++ RoIAlign runs on CPU tensors");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "vil_kernels' C++ RoIAlign takes float32 or float64 ", name, ", got ", values.scalar_type());
  TORCH_CHECK(values.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(geometry.scalar_type() == values.scalar_type() && geometry.dim() == 2 && geometry.size(0) == rois &&
                  geometry.size(1) == 4 && geometry.is_contiguous(),
              "geometry must be a contiguous (K, 4) tensor of ", name, "'s dtype, got ", geometry.scalar_type(), " ",
              geometry.sizes());
  TORCH_CHECK(layout.scalar_type() == at::kLong && layout.dim() == 2 && layout.size(0) == rois &&
                  layout.size(1) == 6 && layout.is_contiguous(),
              "layout must be a contiguous (K, 6) int64 tensor, got ", layout.scalar_type(), " ", layout.sizes());
}

// Every tap the geometry can produce lies inside the table: rows base + y * stride + x for y < height, x < width.
void check_layout_fits(const at::Tensor& layout, int64_t table_rows) {
  const int64_t* l = layout.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < layout.size(0); ++k, l += 6) {
    if (l[0] <= 0 || l[1] <= 0) continue;  // no sample points: reads nothing
    const int64_t base = l[2], stride = l[3], height = l[4], width = l[5];
    TORCH_CHECK(base >= 0 && height > 0 && width > 0 && width <= stride &&
                    base + (height - 1) * stride + width <= table_rows,
                "RoI ", k, "'s map (first row ", base, ", stride ", stride, ", ", height, "x", width,
                ") does not fit the table's ", table_rows, " rows");
  }
}

at::Tensor roi_align_forward(const at::Tensor& table, const at::Tensor& geometry, const at::Tensor& layout,
                             int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(table.dim() == 2, "table must be (rows, channels), got ", table.sizes());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "the output size must be positive, got ", pooled_h, "x", pooled_w);
  const int64_t rois = geometry.size(0), channels = table.size(1);
  check_rois(table, geometry, layout, rois, "table");
  check_layout_fits(layout, table.size(0));
  at::Tensor out = at::empty({rois, channels, pooled_h, pooled_w}, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "roi_align_forward", [&] {
    forward_kernel<scalar_t>(table.const_data_ptr<scalar_t>(), geometry.const_data_ptr<scalar_t>(),
                             layout.const_data_ptr<int64_t>(), out.data_ptr<scalar_t>(), rois, channels, pooled_h,
                             pooled_w);
  });
  return out;
}

at::Tensor roi_align_backward(const at::Tensor& grad, const at::Tensor& geometry, const at::Tensor& layout,
                              int64_t table_rows) {
  TORCH_CHECK(grad.dim() == 4, "grad must be (K, channels, out_h, out_w), got ", grad.sizes());
  const int64_t rois = grad.size(0), channels = grad.size(1);
  check_rois(grad, geometry, layout, rois, "grad");
  check_layout_fits(layout, table_rows);
  at::Tensor grad_table = at::zeros({table_rows, channels}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "roi_align_backward", [&] {
    backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), geometry.const_data_ptr<scalar_t>(),
                              layout.const_data_ptr<int64_t>(), grad_table.data_ptr<scalar_t>(), rois, channels,
                              grad.size(2), grad.size(3));
  });
  return grad_table;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vil_kernels_native, m) {
  m.def("roi_align_forward(Tensor table, Tensor geometry, Tensor layout, int pooled_h, int pooled_w) -> Tensor");
  m.def("roi_align_backward(Tensor grad, Tensor geometry, Tensor layout, int table_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(vil_kernels_native, CPU, m) {
  m.impl("roi_align_forward", &roi_align_forward);
  m.impl("roi_align_backward", &roi_align_backward);
}
