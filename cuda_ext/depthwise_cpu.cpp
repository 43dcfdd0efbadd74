// Weight gradient of a depthwise convolution (stride 1, "same" padding) on the CPU, channels-last.
//
// Why: the supernet's mixed ops run depthwise 3x3 / 5x5 convolutions with dilation 1, 2 and 3.
// oneDNN computes their forward quickly, but the weight gradient of a 5x5 or dilated one took
// 8-14x the forward at the demo's neck shape ([4, 32, 48, 64], channels-last, one thread), the
// largest single cost of a search iteration.
//
// grad_weight[c, 0, i, j] = sum_{n, oh, ow} grad_out[n, c, oh, ow] * input[n, c, oh - p + i*d, ow - p + j*d]
// (taps outside the input read the zero padding and add nothing). In channels-last the C values
// of a pixel are contiguous, so every (output pixel, tap) pair is one multiply-add over C
// contiguous values of grad_out and input, accumulated into a k*k*C table.
//
// The rows (n, oh) are cut into a number of blocks that depends on the shape only; each block
// sums into its own table (in float for float / half inputs, double for double) and the tables
// are added in block order, so the result does not depend on the number of threads. Float runs
// an AVX2 + FMA build of the loop when the CPU has it (checked at run time).
//
// On CUDA the Python wrapper (autofpn/ops/depthwise.py) uses PyTorch's convolution backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <algorithm>
#include <vector>

namespace autofpn {
namespace {

struct DepthwiseShape {
  int64_t batch, channels, height, width, kernel, padding, dilation;
};

constexpr int kChunk = 16;

// Adds the products of output rows [row_begin, row_end) (row = n * height + oh) into acc
// (kernel * kernel * channels values, tap-major).
template <typename T, typename Acc>
__attribute__((always_inline)) inline void accumulate_rows(const T* __restrict__ grad, const T* __restrict__ input,
                                                           Acc* __restrict__ acc, const DepthwiseShape& s,
                                                           int64_t row_begin, int64_t row_end) {
  const int64_t C = s.channels, H = s.height, W = s.width, k = s.kernel;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / H, oh = row % H;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t ih = oh - s.padding + i * s.dilation;
      if (ih < 0 || ih >= H) continue;
      const T* in_row = input + (n * H + ih) * W * C;
      const T* g_row = grad + (n * H + oh) * W * C;
      for (int64_t j = 0; j < k; ++j) {
        Acc* a = acc + (i * k + j) * C;
        const int64_t shift = j * s.dilation - s.padding;  // iw = ow + shift
        const int64_t ow_begin = std::max<int64_t>(0, -shift), ow_end = std::min<int64_t>(W, W - shift);
        // channels in chunks of kChunk: a chunk's sums stay in registers along the row
        int64_t c0 = 0;
        for (; c0 + kChunk <= C; c0 += kChunk) {
          Acc sum[kChunk] = {};
          for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
            const T* g = g_row + ow * C + c0;
            const T* x = in_row + (ow + shift) * C + c0;
            for (int c = 0; c < kChunk; ++c) sum[c] += static_cast<Acc>(g[c]) * static_cast<Acc>(x[c]);
          }
          for (int c = 0; c < kChunk; ++c) a[c0 + c] += sum[c];
        }
        for (int64_t ow = ow_begin; ow < ow_end && c0 < C; ++ow) {  // the last C % kChunk channels
          const T* g = g_row + ow * C;
          const T* x = in_row + (ow + shift) * C;
          for (int64_t c = c0; c < C; ++c) a[c] += static_cast<Acc>(g[c]) * static_cast<Acc>(x[c]);
        }
      }
    }
  }
}

using FloatRows = void (*)(const float*, const float*, float*, const DepthwiseShape&, int64_t, int64_t);

void accumulate_rows_float(const float* grad, const float* input, float* acc, const DepthwiseShape& s,
                           int64_t row_begin, int64_t row_end) {
  accumulate_rows<float, float>(grad, input, acc, s, row_begin, row_end);
}

#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx2,fma"))) void accumulate_rows_float_avx2(const float* grad, const float* input,
                                                                     float* acc, const DepthwiseShape& s,
                                                                     int64_t row_begin, int64_t row_end) {
  accumulate_rows<float, float>(grad, input, acc, s, row_begin, row_end);
}
#endif

FloatRows float_rows() {
#if defined(__GNUC__) && defined(__x86_64__)
  if (cpu_has_avx2_fma()) return accumulate_rows_float_avx2;
#endif
  return accumulate_rows_float;
}

template <typename T, typename Acc>
void run_rows(const T* grad, const T* input, Acc* acc, const DepthwiseShape& s, int64_t row_begin, int64_t row_end) {
  accumulate_rows<T, Acc>(grad, input, acc, s, row_begin, row_end);
}

template <>
void run_rows<float, float>(const float* grad, const float* input, float* acc, const DepthwiseShape& s,
                            int64_t row_begin, int64_t row_end) {
  float_rows()(grad, input, acc, s, row_begin, row_end);
}

at::Tensor depthwise_conv2d_weight_grad_cpu(const at::Tensor& grad_, const at::Tensor& input_, int64_t kernel,
                                            int64_t padding, int64_t dilation) {
  TORCH_CHECK(grad_.device().is_cpu() && input_.device().is_cpu(),
              "depthwise_conv2d_weight_grad: CPU tensors expected");
  TORCH_CHECK(input_.dim() == 4, "depthwise_conv2d_weight_grad: input must be [N, C, H, W], got ", input_.sizes());
  TORCH_CHECK(grad_.sizes() == input_.sizes(), "depthwise_conv2d_weight_grad: grad_out must have input's shape ",
              input_.sizes(), " (stride 1, same padding), got ", grad_.sizes());
  TORCH_CHECK(grad_.scalar_type() == input_.scalar_type(), "depthwise_conv2d_weight_grad: grad_out is ",
              grad_.scalar_type(), " but input is ", input_.scalar_type());
  TORCH_CHECK(kernel >= 1 && dilation >= 1 && padding >= 0 && 2 * padding == dilation * (kernel - 1),
              "depthwise_conv2d_weight_grad: padding must be dilation * (kernel - 1) / 2 (same size), got kernel ",
              kernel, ", padding ", padding, ", dilation ", dilation);
  const at::Tensor grad = grad_.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  const DepthwiseShape s{input.size(0), input.size(1), input.size(2), input.size(3), kernel, padding, dilation};
  const int64_t taps = kernel * kernel * s.channels;
  const int64_t rows = s.batch * s.height;
  // shape-only block count: the sum order, hence the result, is the same for any thread count
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(rows, 64));
  at::Tensor grad_weight;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "autofpn_depthwise_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* x = input.data_ptr<scalar_t>();
    std::vector<acc_t> partial(blocks * taps, acc_t(0));
    at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t r0 = b * rows / blocks, r1 = (b + 1) * rows / blocks;
        acc_t* acc = partial.data() + b * taps;
        run_rows(g, x, acc, s, r0, r1);
      }
    });
    // (kernel, kernel, C) table -> [C, 1, kernel, kernel]
    at::Tensor total = at::empty({taps}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* t = total.data_ptr<acc_t>();
    std::copy(partial.begin(), partial.begin() + taps, t);
    for (int64_t b = 1; b < blocks; ++b) {
      const acc_t* p = partial.data() + b * taps;
      for (int64_t q = 0; q < taps; ++q) t[q] += p[q];
    }
    grad_weight = total.view({kernel, kernel, s.channels}).permute({2, 0, 1}).unsqueeze(1).contiguous()
                      .to(input.scalar_type());
  });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autofpn, m) {
  m.def("depthwise_conv2d_weight_grad(Tensor grad_out, Tensor input, int kernel, int padding, int dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(autofpn, CPU, m) {
  m.impl("depthwise_conv2d_weight_grad", &depthwise_conv2d_weight_grad_cpu);
}

}  // namespace autofpn
