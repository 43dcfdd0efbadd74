// Non-maximum suppression on the CPU: torchvision's decisions, its IoU test vectorised.
//
// Why: torchvision's CPU nms visits the boxes in score order and, for each box it keeps, tests
// every later box that is not yet suppressed, one scalar IoU at a time through the sort order.
// The RPN's NMS (about a thousand boxes per level and image at a 0.7 threshold, most of them kept)
// then costs a few million scalar IoUs per image, several % of a Faster R-CNN step on the CPU.
//
// Here the boxes are first gathered in score order into separate coordinate arrays, and the test
// of the later boxes is one branch-free loop over contiguous memory: every later box's IoU with
// the kept box is computed and OR-ed into its suppressed flag (a box already suppressed stays so:
// skipping it, as torchvision does, changes nothing), which vectorises (an AVX2 clone where the
// CPU has it). Per box the arithmetic is torchvision's, operation for operation, with no fused
// multiply-add (the clone's target has no FMA, and contraction is off in this file), so the kept
// indices are the same; the comparison with the threshold is the same too (see
// comparable_threshold). On CUDA the Python wrapper (autofpn/ops/boxes.py) uses torchvision's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace autofpn {
namespace {

// torchvision compares `ovr > iou_threshold` with ovr in the boxes' type and the threshold a
// double. For a float ovr that is `ovr > t` with t the largest float not above the threshold:
// the next float after t is above the threshold, and t itself is not.
template <typename T>
T comparable_threshold(double threshold) {  // double boxes: the threshold itself
  return static_cast<T>(threshold);
}

template <>
float comparable_threshold<float>(double threshold) {
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) > threshold) t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  return t;
}

// Suppresses, among the boxes after position i in score order (coordinates and areas in that
// order), those whose IoU with box i is above `threshold`: suppressed[j] |= IoU(i, j) > threshold.
template <typename T>
AUTOFPN_ALWAYS_INLINE void suppress_after(const T* __restrict x1, const T* __restrict y1, const T* __restrict x2,
                                          const T* __restrict y2, const T* __restrict area, int64_t i, int64_t n,
                                          T threshold, uint8_t* __restrict suppressed) {
  const T ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
  for (int64_t j = i + 1; j < n; ++j) {
    const T xx1 = std::max(ix1, x1[j]);
    const T yy1 = std::max(iy1, y1[j]);
    const T xx2 = std::min(ix2, x2[j]);
    const T yy2 = std::min(iy2, y2[j]);
    const T w = std::max(static_cast<T>(0), xx2 - xx1);
    const T h = std::max(static_cast<T>(0), yy2 - yy1);
    const T inter = w * h;
    const T ovr = inter / (iarea + area[j] - inter);
    suppressed[j] |= static_cast<uint8_t>(ovr > threshold);
  }
}

template <typename T>
void suppress(const T* x1, const T* y1, const T* x2, const T* y2, const T* area, int64_t i, int64_t n, T threshold,
              uint8_t* suppressed) {
  suppress_after<T>(x1, y1, x2, y2, area, i, n, threshold, suppressed);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2"))) void suppress_float_avx2(const float* x1, const float* y1, const float* x2,
                                                         const float* y2, const float* area, int64_t i, int64_t n,
                                                         float threshold, uint8_t* suppressed) {
  suppress_after<float>(x1, y1, x2, y2, area, i, n, threshold, suppressed);
}

template <>
void suppress<float>(const float* x1, const float* y1, const float* x2, const float* y2, const float* area,
                     int64_t i, int64_t n, float threshold, uint8_t* suppressed) {
  if (cpu_has_avx2_fma()) return suppress_float_avx2(x1, y1, x2, y2, area, i, n, threshold, suppressed);
  suppress_after<float>(x1, y1, x2, y2, area, i, n, threshold, suppressed);
}
#endif

at::Tensor nms_cpu(const at::Tensor& dets, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(dets.device().is_cpu() && scores.device().is_cpu(), "nms: CPU tensors expected");
  TORCH_CHECK(dets.dim() == 2 && dets.size(1) == 4, "nms: boxes must be [N, 4], got ", dets.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == dets.size(0), "nms: scores must be [N] for ", dets.size(0),
              " boxes, got ", scores.sizes());
  TORCH_CHECK(dets.scalar_type() == scores.scalar_type(), "nms: boxes are ", dets.scalar_type(), " but scores are ",
              scores.scalar_type());
  const int64_t n = dets.size(0);
  if (n == 0) return at::empty({0}, dets.options().dtype(at::kLong));
  // torchvision's order: a stable sort, by decreasing score
  const at::Tensor order_t = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  const at::Tensor sorted = dets.index_select(0, order_t).t().contiguous();  // [4, N] in score order
  at::Tensor keep_t = at::empty({n}, dets.options().dtype(at::kLong));
  int64_t num_to_keep = 0;

  AT_DISPATCH_FLOATING_TYPES(dets.scalar_type(), "autofpn_nms", [&] {
    const scalar_t* x1 = sorted.data_ptr<scalar_t>();
    const scalar_t* y1 = x1 + n;
    const scalar_t* x2 = y1 + n;
    const scalar_t* y2 = x2 + n;
    std::vector<scalar_t> area(n);
    for (int64_t j = 0; j < n; ++j) area[j] = (x2[j] - x1[j]) * (y2[j] - y1[j]);  // torchvision's areas_t
    std::vector<uint8_t> suppressed(n, 0);
    const scalar_t threshold = comparable_threshold<scalar_t>(iou_threshold);
    const int64_t* order = order_t.data_ptr<int64_t>();
    int64_t* keep = keep_t.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (suppressed[i]) continue;
      keep[num_to_keep++] = order[i];
      suppress<scalar_t>(x1, y1, x2, y2, area.data(), i, n, threshold, suppressed.data());
    }
  });
  return keep_t.narrow(0, 0, num_to_keep);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autofpn, m) {
  m.def("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(autofpn, CPU, m) { m.impl("nms", &nms_cpu); }

}  // namespace autofpn

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
