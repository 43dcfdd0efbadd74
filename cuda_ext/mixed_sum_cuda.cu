// CUDA kernels of the fused mixed sum (see mixed_sum.cpp for the schemas and the CPU kernels).
// Same per-element math (mixed_sum_math.h) and the same input validation (mixed_sum.h).
//
// forward:  one grid-stride pass, each thread reads K inputs and writes one output element.
// backward: one grid-stride pass, each thread writes K input grads and keeps K partial dot
//           products in registers; a block-level tree reduction writes one partial per block and
//           per k, and a small sum over blocks gives grad_w (deterministic: no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10/cuda headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE / cuBLAS headers that a
// minimal toolkit (nvcc + cudart) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "mixed_sum.h"
#include "mixed_sum_math.h"

namespace autofpn {
namespace {

constexpr int kThreads = 256;

// K pointers passed by value as a kernel argument (no device-side pointer table to allocate).
template <typename scalar_t>
struct InputPointers {
  const scalar_t* x[kMaxMixedInputs];
};
template <typename scalar_t>
struct GradPointers {
  scalar_t* x[kMaxMixedInputs];
};

template <typename scalar_t, typename acc_t>
__global__ void mixed_sum_forward_kernel(InputPointers<scalar_t> xs, const acc_t* __restrict__ w,
                                         int K, scalar_t* __restrict__ out, int64_t numel) {
  acc_t weights[kMaxMixedInputs];
#pragma unroll
  for (int k = 0; k < kMaxMixedInputs; ++k) {
    weights[k] = k < K ? to_acc<acc_t>(w[k]) : acc_t(0);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    acc_t running = acc_t(0);
#pragma unroll
    for (int k = 0; k < kMaxMixedInputs; ++k) {
      if (k < K) {
        running = weighted_add(running, weights[k], to_acc<acc_t>(xs.x[k][i]));
      }
    }
    out[i] = from_acc<scalar_t>(running);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void mixed_sum_backward_kernel(const scalar_t* __restrict__ grad_out, InputPointers<scalar_t> xs,
                                          const acc_t* __restrict__ w, int K, GradPointers<scalar_t> grad_xs,
                                          bool input_grads, bool weight_grad, acc_t* __restrict__ block_dots,
                                          int64_t numel) {
  acc_t weights[kMaxMixedInputs];
  acc_t dots[kMaxMixedInputs];
#pragma unroll
  for (int k = 0; k < kMaxMixedInputs; ++k) {
    weights[k] = k < K ? to_acc<acc_t>(w[k]) : acc_t(0);
    dots[k] = acc_t(0);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const acc_t grad = to_acc<acc_t>(grad_out[i]);
#pragma unroll
    for (int k = 0; k < kMaxMixedInputs; ++k) {
      if (k < K) {
        if (input_grads) {
          grad_xs.x[k][i] = from_acc<scalar_t>(input_grad(weights[k], grad));
        }
        if (weight_grad) {
          dots[k] = weight_grad_add(dots[k], grad, to_acc<acc_t>(xs.x[k][i]));
        }
      }
    }
  }
  if (!weight_grad) {
    return;
  }
  __shared__ acc_t shared[kThreads];
#pragma unroll
  for (int k = 0; k < kMaxMixedInputs; ++k) {
    if (k < K) {
      shared[threadIdx.x] = dots[k];
      __syncthreads();
      for (int width = kThreads / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) {
          shared[threadIdx.x] += shared[threadIdx.x + width];
        }
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        block_dots[static_cast<int64_t>(blockIdx.x) * K + k] = shared[0];
      }
      __syncthreads();
    }
  }
}

int num_blocks_for(int64_t numel) {
  int device = 0;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (numel + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, 4LL * sm_count)));
}

at::Tensor mixed_sum_cuda(const std::vector<at::Tensor>& xs, const at::Tensor& w) {
  const MixedInputs inputs = prepare_mixed_inputs(xs, w, "autofpn::mixed_sum");
  const c10::cuda::CUDAGuard device_guard(inputs.xs[0].device());
  at::Tensor out = at::empty_like(inputs.xs[0], inputs.memory_format);
  const int64_t numel = out.numel();
  if (numel == 0) {
    return out;
  }
  const int K = static_cast<int>(inputs.xs.size());
  const int blocks = num_blocks_for(numel);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_sum_cuda", [&] {
    using acc_t = mixed_sum_acc_t<scalar_t>;
    InputPointers<scalar_t> x_ptrs{};
    for (int k = 0; k < K; ++k) {
      x_ptrs.x[k] = inputs.xs[k].data_ptr<scalar_t>();
    }
    mixed_sum_forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        x_ptrs, inputs.w.data_ptr<acc_t>(), K, out.data_ptr<scalar_t>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward_cuda(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& xs, const at::Tensor& w,
    bool input_grads, bool weight_grad) {
  const MixedInputs inputs = prepare_mixed_inputs(xs, w, "autofpn::mixed_sum_backward");
  const at::Tensor grad = prepare_grad_out(grad_out, inputs, "autofpn::mixed_sum_backward");
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const int K = static_cast<int>(inputs.xs.size());
  std::vector<at::Tensor> grad_xs;
  if (input_grads) {
    for (const at::Tensor& x : inputs.xs) {
      grad_xs.push_back(at::empty_like(x, inputs.memory_format));
    }
  }
  const int64_t numel = grad.numel();
  if (numel == 0 || (!input_grads && !weight_grad)) {
    return {grad_xs, weight_grad ? at::zeros({K}, w.options()) : at::empty({0}, w.options())};
  }
  const int blocks = num_blocks_for(numel);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_sum_backward_cuda", [&] {
    using acc_t = mixed_sum_acc_t<scalar_t>;
    InputPointers<scalar_t> x_ptrs{};
    GradPointers<scalar_t> grad_x_ptrs{};
    for (int k = 0; k < K; ++k) {
      x_ptrs.x[k] = inputs.xs[k].data_ptr<scalar_t>();
      grad_x_ptrs.x[k] = input_grads ? grad_xs[k].data_ptr<scalar_t>() : nullptr;
    }
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor block_dots = weight_grad ? at::empty({blocks, K}, grad.options().dtype(acc_dtype))
                                        : at::empty({0}, grad.options().dtype(acc_dtype));
    mixed_sum_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), x_ptrs, inputs.w.data_ptr<acc_t>(), K, grad_x_ptrs, input_grads,
        weight_grad, weight_grad ? block_dots.data_ptr<acc_t>() : nullptr, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_w = weight_grad ? block_dots.sum(0).to(w.scalar_type()) : at::empty({0}, w.options());
  });
  return {grad_xs, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(autofpn, CUDA, m) {
  m.impl("mixed_sum", &mixed_sum_cuda);
  m.impl("mixed_sum_backward", &mixed_sum_backward_cuda);
}

}  // namespace autofpn
