// RoIAlign on the CPU, multi-threaded, with the same arithmetic as torchvision's kernel.
//
// Why: torchvision's CPU roi_align runs on one thread, and its backward recomputes the bilinear
// sampling weights for every (RoI, channel, bin) and scatters one element at a time. In a
// Faster R-CNN train step at 320 px that backward alone is a large share of the step.
//
// Here the sampling points of a RoI (4 taps and 4 weights per sample) are computed once and
// reused for every channel. The forward reads the features channels-last (a copy when they are
// NCHW), so each tap is a contiguous run of C values and the loop over channels vectorises (AVX2
// when the CPU has it); it is parallel over RoIs (each writes its own output rows). The backward
// scatters into a channels-last input gradient the same way, parallel over channels: a thread
// owns a channel range of grad_input for all RoIs, so no two threads write the same element and
// no atomics are needed. Within a channel the RoIs are visited in order, so the result does not
// depend on the number of threads.
//
// On CUDA the Python wrapper (autofpn/ops/roi_align.py) uses torchvision's kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace autofpn {
namespace {

template <typename T>
struct SamplePoint {
  int64_t pos[4];
  T w[4];
};

struct RoIGeometry {
  int64_t batch_index;
  int64_t grid_h, grid_w;  // samples per bin in each direction
  int64_t count;           // samples per bin (the average's divisor)
};

// Sampling points of one RoI, ordered (ph, pw, iy, ix); identical to torchvision's pre_calc.
template <typename T>
RoIGeometry roi_sample_points(const T* roi, double spatial_scale, int64_t pooled_h, int64_t pooled_w,
                              int64_t sampling_ratio, bool aligned, int64_t height, int64_t width,
                              std::vector<SamplePoint<T>>& points) {
  RoIGeometry geo;
  geo.batch_index = static_cast<int64_t>(roi[0]);
  const T offset = aligned ? static_cast<T>(0.5) : static_cast<T>(0.0);
  const T start_w = roi[1] * static_cast<T>(spatial_scale) - offset;
  const T start_h = roi[2] * static_cast<T>(spatial_scale) - offset;
  const T end_w = roi[3] * static_cast<T>(spatial_scale) - offset;
  const T end_h = roi[4] * static_cast<T>(spatial_scale) - offset;
  T roi_w = end_w - start_w;
  T roi_h = end_h - start_h;
  if (!aligned) {  // legacy behaviour: RoIs at least 1x1
    roi_w = std::max(roi_w, static_cast<T>(1.));
    roi_h = std::max(roi_h, static_cast<T>(1.));
  }
  const T bin_h = roi_h / static_cast<T>(pooled_h);
  const T bin_w = roi_w / static_cast<T>(pooled_w);
  geo.grid_h = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(std::ceil(roi_h / pooled_h));
  geo.grid_w = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(std::ceil(roi_w / pooled_w));
  geo.count = std::max<int64_t>(geo.grid_h * geo.grid_w, 1);

  points.resize(pooled_h * pooled_w * geo.grid_h * geo.grid_w);
  int64_t idx = 0;
  for (int64_t ph = 0; ph < pooled_h; ++ph) {
    for (int64_t pw = 0; pw < pooled_w; ++pw) {
      for (int64_t iy = 0; iy < geo.grid_h; ++iy) {
        const T yy = start_h + ph * bin_h + static_cast<T>(iy + .5f) * bin_h / static_cast<T>(geo.grid_h);
        for (int64_t ix = 0; ix < geo.grid_w; ++ix) {
          const T xx = start_w + pw * bin_w + static_cast<T>(ix + .5f) * bin_w / static_cast<T>(geo.grid_w);
          SamplePoint<T>& p = points[idx++];
          T x = xx, y = yy;
          if (y < -1.0 || y > height || x < -1.0 || x > width) {  // outside: contributes nothing
            for (int k = 0; k < 4; ++k) {
              p.pos[k] = 0;
              p.w[k] = 0;
            }
            continue;
          }
          if (y <= 0) y = 0;
          if (x <= 0) x = 0;
          int64_t y_low = static_cast<int64_t>(y), x_low = static_cast<int64_t>(x);
          int64_t y_high, x_high;
          if (y_low >= height - 1) {
            y_high = y_low = height - 1;
            y = static_cast<T>(y_low);
          } else {
            y_high = y_low + 1;
          }
          if (x_low >= width - 1) {
            x_high = x_low = width - 1;
            x = static_cast<T>(x_low);
          } else {
            x_high = x_low + 1;
          }
          const T ly = y - y_low, lx = x - x_low;
          const T hy = 1. - ly, hx = 1. - lx;
          p.pos[0] = y_low * width + x_low;
          p.pos[1] = y_low * width + x_high;
          p.pos[2] = y_high * width + x_low;
          p.pos[3] = y_high * width + x_high;
          p.w[0] = hy * hx;
          p.w[1] = hy * lx;
          p.w[2] = ly * hx;
          p.w[3] = ly * lx;
        }
      }
    }
  }
  return geo;
}

void check_inputs(const at::Tensor& input, const at::Tensor& rois, const char* name) {
  TORCH_CHECK(input.device().is_cpu() && rois.device().is_cpu(), name, ": CPU tensors expected");
  TORCH_CHECK(input.dim() == 4, name, ": input must be [N, C, H, W], got ", input.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, name, ": rois must be [R, 5], got ", rois.sizes());
  TORCH_CHECK(input.scalar_type() == rois.scalar_type(), name, ": input is ", input.scalar_type(),
              " but rois are ", rois.scalar_type());
}

// Pools one RoI's bins from channels-last features into its NCHW output rows. Per channel the
// arithmetic and its order are the NCHW loop's (torchvision's): value += w0 * a + w1 * b + w2 * c +
// w3 * d over the bin's samples, then / count; here each step runs over all C channels at once.
//   feat: [H * W, C] of the RoI's image; points: bins * per_bin; acc: [C] scratch; out: [C, bins]
template <typename T>
AUTOFPN_ALWAYS_INLINE void pool_roi_channels_last(const T* feat, const SamplePoint<T>* points, int64_t bins,
                                                  int64_t per_bin, T count, int64_t channels, T* __restrict acc,
                                                  T* __restrict out) {
  for (int64_t b = 0; b < bins; ++b) {
    std::fill(acc, acc + channels, T(0));
    for (int64_t s = 0; s < per_bin; ++s, ++points) {
      const T* __restrict f0 = feat + points->pos[0] * channels;
      const T* __restrict f1 = feat + points->pos[1] * channels;
      const T* __restrict f2 = feat + points->pos[2] * channels;
      const T* __restrict f3 = feat + points->pos[3] * channels;
      const T w0 = points->w[0], w1 = points->w[1], w2 = points->w[2], w3 = points->w[3];
      for (int64_t c = 0; c < channels; ++c) acc[c] += w0 * f0[c] + w1 * f1[c] + w2 * f2[c] + w3 * f3[c];
    }
    for (int64_t c = 0; c < channels; ++c) out[c * bins + b] = acc[c] / count;
  }
}

template <typename T>
void pool_roi(const T* feat, const SamplePoint<T>* points, int64_t bins, int64_t per_bin, T count,
              int64_t channels, T* acc, T* out) {
  pool_roi_channels_last<T>(feat, points, bins, per_bin, count, channels, acc, out);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void pool_roi_float_avx2(const float* feat, const SamplePoint<float>* points,
                                                              int64_t bins, int64_t per_bin, float count,
                                                              int64_t channels, float* acc, float* out) {
  pool_roi_channels_last<float>(feat, points, bins, per_bin, count, channels, acc, out);
}

template <>
void pool_roi<float>(const float* feat, const SamplePoint<float>* points, int64_t bins, int64_t per_bin,
                     float count, int64_t channels, float* acc, float* out) {
  if (cpu_has_avx2_fma()) return pool_roi_float_avx2(feat, points, bins, per_bin, count, channels, acc, out);
  pool_roi_channels_last<float>(feat, points, bins, per_bin, count, channels, acc, out);
}
#endif

// Scatters one RoI's output gradient into channels c_begin..c_end of the channels-last input
// gradient, as the NCHW loop (torchvision's) does per channel: += g * w / count for every bin,
// sample and tap, in that order; here over the channel range at once. The RoI's gradient rows of
// those channels are first transposed to [bins, c_end - c_begin] in `rows` (small, in cache).
//   grad: [C, bins] of the RoI (NCHW); rows: bins * (c_end - c_begin) scratch; gin: [H * W, C] of
//   the RoI's image
template <typename T>
AUTOFPN_ALWAYS_INLINE void scatter_roi_channels_last(const T* __restrict grad, const SamplePoint<T>* points,
                                                     int64_t bins, int64_t per_bin, T count, int64_t channels,
                                                     int64_t c_begin, int64_t c_end, T* __restrict rows,
                                                     T* __restrict gin) {
  const int64_t width = c_end - c_begin;
  for (int64_t c = 0; c < width; ++c) {
    for (int64_t b = 0; b < bins; ++b) rows[b * width + c] = grad[(c_begin + c) * bins + b];
  }
  gin += c_begin;
  for (int64_t b = 0; b < bins; ++b) {
    const T* g = rows + b * width;
    for (int64_t s = 0; s < per_bin; ++s, ++points) {
      for (int k = 0; k < 4; ++k) {
        T* dst = gin + points->pos[k] * channels;
        const T w = points->w[k];
        for (int64_t c = 0; c < width; ++c) dst[c] += g[c] * w / count;
      }
    }
  }
}

template <typename T>
void scatter_roi(const T* grad, const SamplePoint<T>* points, int64_t bins, int64_t per_bin, T count,
                 int64_t channels, int64_t c_begin, int64_t c_end, T* rows, T* gin) {
  scatter_roi_channels_last<T>(grad, points, bins, per_bin, count, channels, c_begin, c_end, rows, gin);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void scatter_roi_float_avx2(const float* grad, const SamplePoint<float>* points,
                                                                 int64_t bins, int64_t per_bin, float count,
                                                                 int64_t channels, int64_t c_begin, int64_t c_end,
                                                                 float* rows, float* gin) {
  scatter_roi_channels_last<float>(grad, points, bins, per_bin, count, channels, c_begin, c_end, rows, gin);
}

template <>
void scatter_roi<float>(const float* grad, const SamplePoint<float>* points, int64_t bins, int64_t per_bin,
                        float count, int64_t channels, int64_t c_begin, int64_t c_end, float* rows, float* gin) {
  if (cpu_has_avx2_fma()) return scatter_roi_float_avx2(grad, points, bins, per_bin, count, channels, c_begin, c_end, rows, gin);
  scatter_roi_channels_last<float>(grad, points, bins, per_bin, count, channels, c_begin, c_end, rows, gin);
}
#endif

// The kernels pool a pyramid in one call: RoI r from features[levels[r]] at scales[levels[r]] into
// row r of one [R, C, pooled_h, pooled_w] output, in the boxes' order, so the caller neither gathers
// each level's boxes nor writes each level's rows back (nor, in the backward, gathers each level's
// gradient rows). A level outside 0..L-1 (a NaN box's) leaves its row zero. roi_align itself is
// one level with every RoI on it. A RoI's arithmetic does not depend on the other RoIs, and each
// level's backward sums visit its RoIs in ascending order, so one pyramid call equals one call
// per level bit for bit.
std::vector<at::Tensor> channels_last_levels(const at::TensorList& features, const at::Tensor& rois,
                                             const std::vector<double>& scales, const char* name) {
  TORCH_CHECK(!features.empty() && features.size() == scales.size(), name, ": ", features.size(),
              " feature levels but ", scales.size(), " scales");
  std::vector<at::Tensor> levels;
  for (const at::Tensor& f : features) {
    check_inputs(f, rois, name);
    TORCH_CHECK(f.size(0) == features[0].size(0) && f.size(1) == features[0].size(1), name,
                ": every level must have the first level's batch and channels ", features[0].sizes().slice(0, 2),
                ", got ", f.sizes());
    levels.push_back(f.contiguous(at::MemoryFormat::ChannelsLast));
  }
  return levels;
}

at::Tensor pool_levels(at::TensorList features, const at::Tensor& rois_, const at::Tensor& levels_,
                       const std::vector<double>& scales, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                       bool aligned, const char* name) {
  const std::vector<at::Tensor> inputs = channels_last_levels(features, rois_, scales, name);
  TORCH_CHECK(levels_.dim() == 1 && levels_.size(0) == rois_.size(0) && levels_.scalar_type() == at::kLong, name,
              ": levels must be int64 [", rois_.size(0), "], got ", levels_.scalar_type(), " ", levels_.sizes());
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor levels = levels_.contiguous();
  const int64_t num_rois = rois.size(0), channels = inputs[0].size(1);
  const int64_t num_levels = static_cast<int64_t>(inputs.size());
  bool every_row_pooled = true;
  for (int64_t r = 0; r < num_rois; ++r) {
    const int64_t l = levels.data_ptr<int64_t>()[r];
    every_row_pooled = every_row_pooled && l >= 0 && l < num_levels;
  }
  at::Tensor output = every_row_pooled ? at::empty({num_rois, channels, pooled_h, pooled_w}, inputs[0].options())
                                       : at::zeros({num_rois, channels, pooled_h, pooled_w}, inputs[0].options());
  if (num_rois == 0 || output.numel() == 0) return output;

  AT_DISPATCH_FLOATING_TYPES(inputs[0].scalar_type(), "autofpn_multilevel_roi_align_forward", [&] {
    const scalar_t* roi_ptr = rois.data_ptr<scalar_t>();
    const int64_t* level_ptr = levels.data_ptr<int64_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    const int64_t bins = pooled_h * pooled_w;
    at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
      std::vector<SamplePoint<scalar_t>> points;
      std::vector<scalar_t> acc(channels);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t l = level_ptr[n];
        if (l < 0 || l >= num_levels) continue;
        const at::Tensor& input = inputs[l];
        const int64_t height = input.size(2), width = input.size(3);
        const RoIGeometry geo = roi_sample_points(roi_ptr + n * 5, scales[l], pooled_h, pooled_w, sampling_ratio,
                                                  aligned, height, width, points);
        pool_roi<scalar_t>(input.data_ptr<scalar_t>() + geo.batch_index * height * width * channels, points.data(),
                           bins, geo.grid_h * geo.grid_w, static_cast<scalar_t>(geo.count), channels, acc.data(),
                           out + n * channels * bins);
      }
    });
  });
  return output;
}

// shapes: [N, C, H_0, W_0, H_1, W_1, ...], the levels' sizes; returns each level's NCHW gradient
std::vector<at::Tensor> scatter_levels(const at::Tensor& grad_, const at::Tensor& rois_, const at::Tensor& levels_,
                                       const std::vector<double>& scales, int64_t pooled_h, int64_t pooled_w,
                                       int64_t sampling_ratio, bool aligned, c10::IntArrayRef shapes, const char* name) {
  const int64_t num_levels = static_cast<int64_t>(scales.size());
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == 2 + 2 * num_levels, name, ": shapes must be [N, C, H_0, W_0, ...]"
              " for ", num_levels, " levels, got ", shapes);
  TORCH_CHECK(rois_.dim() == 2 && rois_.size(1) == 5, name, ": rois must be [R, 5], got ", rois_.sizes());
  const int64_t batch_size = shapes[0], channels = shapes[1];
  const int64_t num_rois = rois_.size(0);
  TORCH_CHECK(grad_.dim() == 4 && grad_.size(0) == num_rois && grad_.size(1) == channels &&
                  grad_.size(2) == pooled_h && grad_.size(3) == pooled_w,
              name, ": grad must be [", num_rois, ", ", channels, ", ", pooled_h, ", ", pooled_w, "], got ",
              grad_.sizes());
  TORCH_CHECK(rois_.scalar_type() == grad_.scalar_type(), name, ": grad is ", grad_.scalar_type(), " but rois are ",
              rois_.scalar_type());
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor levels = levels_.contiguous();
  const at::Tensor grad = grad_.contiguous();
  std::vector<at::Tensor> grad_inputs;  // NHWC: the channel loop reads and writes contiguous values
  for (int64_t l = 0; l < num_levels; ++l) {
    grad_inputs.push_back(at::zeros({batch_size, shapes[2 + 2 * l], shapes[3 + 2 * l], channels}, grad_.options()));
  }
  const int64_t bins = pooled_h * pooled_w;
  if (num_rois > 0 && batch_size * channels > 0) {
    AT_DISPATCH_FLOATING_TYPES(grad_.scalar_type(), "autofpn_multilevel_roi_align_backward", [&] {
      const scalar_t* g = grad.data_ptr<scalar_t>();
      const scalar_t* roi_ptr = rois.data_ptr<scalar_t>();
      const int64_t* level_ptr = levels.data_ptr<int64_t>();
      // as roi_align_backward_cpu: each task owns a channel range of every level's gradient
      at::parallel_for(0, channels, 16, [&](int64_t c_begin, int64_t c_end) {
        std::vector<SamplePoint<scalar_t>> points;
        std::vector<scalar_t> rows(bins * (c_end - c_begin));
        for (int64_t n = 0; n < num_rois; ++n) {
          const int64_t l = level_ptr[n];
          if (l < 0 || l >= num_levels) continue;
          const int64_t height = shapes[2 + 2 * l], width = shapes[3 + 2 * l];
          if (height * width == 0) continue;
          const RoIGeometry geo = roi_sample_points(roi_ptr + n * 5, scales[l], pooled_h, pooled_w, sampling_ratio,
                                                    aligned, height, width, points);
          scatter_roi<scalar_t>(g + n * channels * bins, points.data(), bins, geo.grid_h * geo.grid_w,
                                static_cast<scalar_t>(geo.count), channels, c_begin, c_end, rows.data(),
                                grad_inputs[l].data_ptr<scalar_t>() + geo.batch_index * height * width * channels);
        }
      });
    });
  }
  for (at::Tensor& gin : grad_inputs) gin = gin.permute({0, 3, 1, 2}).contiguous();
  return grad_inputs;
}

at::Tensor multilevel_roi_align_forward_cpu(at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
                                            c10::ArrayRef<double> scales, int64_t pooled_h, int64_t pooled_w,
                                            int64_t sampling_ratio, bool aligned) {
  return pool_levels(features, rois, levels, std::vector<double>(scales.begin(), scales.end()), pooled_h, pooled_w,
                     sampling_ratio, aligned, "multilevel_roi_align");
}

std::vector<at::Tensor> multilevel_roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                                          const at::Tensor& levels, c10::ArrayRef<double> scales,
                                                          int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                                                          bool aligned, c10::IntArrayRef shapes) {
  return scatter_levels(grad, rois, levels, std::vector<double>(scales.begin(), scales.end()), pooled_h, pooled_w,
                        sampling_ratio, aligned, shapes, "multilevel_roi_align_backward");
}

// One level: the pyramid's kernels with every RoI on it.
at::Tensor every_roi_on_level_zero(const at::Tensor& rois) {
  return at::zeros({rois.dim() == 2 ? rois.size(0) : 0}, rois.options().dtype(at::kLong));
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                 int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned) {
  return pool_levels({input}, rois, every_roi_on_level_zero(rois), {spatial_scale}, pooled_h, pooled_w,
                     sampling_ratio, aligned, "roi_align");
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                  int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  return scatter_levels(grad, rois, every_roi_on_level_zero(rois), {spatial_scale}, pooled_h, pooled_w,
                        sampling_ratio, aligned, {batch_size, channels, height, width}, "roi_align_backward")[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autofpn, m) {
  m.def("roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_h, int pooled_w, "
        "int sampling_ratio, bool aligned) -> Tensor");
  m.def("roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_h, int pooled_w, "
        "int sampling_ratio, bool aligned, int batch_size, int channels, int height, int width) -> Tensor");
  m.def("multilevel_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] scales, int pooled_h, "
        "int pooled_w, int sampling_ratio, bool aligned) -> Tensor");
  m.def("multilevel_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, float[] scales, int pooled_h, "
        "int pooled_w, int sampling_ratio, bool aligned, int[] shapes) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(autofpn, CPU, m) {
  m.impl("roi_align", &roi_align_forward_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
  m.impl("multilevel_roi_align", &multilevel_roi_align_forward_cpu);
  m.impl("multilevel_roi_align_backward", &multilevel_roi_align_backward_cpu);
}

}  // namespace autofpn
