// Fused mixed sum: out = sum_k w[k] * xs[k], with a single-pass backward.
//
// This file holds the operator schemas (TORCH_LIBRARY), the shared input validation, and the
// CPU kernels. The CUDA kernels live in mixed_sum_cuda.cu; the per-element math of both is in
// mixed_sum_math.h. Autograd and the fake (meta) implementations are registered from Python in
// autofpn/ops/mixed_sum.py via torch.library.register_autograd / register_fake.
//
// Memory traffic (N elements, K inputs):
//   forward:  reads K*N, writes N                      (naive Python sum: ~5K*N)
//   backward: reads (K+1)*N, writes K*N, K dot products accumulated in the same pass
//                                                      (naive autograd: ~6K*N)
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <sstream>
#include <vector>

#include "mixed_sum.h"
#include "mixed_sum_math.h"

namespace autofpn {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// Channels-last is kept only when xs[0] is genuinely channels-last; everything else is made
// row-major. The fake implementation in autofpn/ops/mixed_sum.py applies the same rule so the
// traced output strides match the real ones.
at::MemoryFormat common_memory_format(const at::Tensor& x0) {
  if (x0.dim() == 4 && !x0.is_contiguous() && x0.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

}  // namespace

MixedInputs prepare_mixed_inputs(const std::vector<at::Tensor>& xs, const at::Tensor& w,
                                 const char* op_name) {
  const int64_t K = static_cast<int64_t>(xs.size());
  TORCH_CHECK(K >= 1 && K <= kMaxMixedInputs, op_name, ": expected 1 to ", kMaxMixedInputs,
              " input tensors in xs, got ", K);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == K, op_name, ": w must have shape [K] = [", K,
              "] (one weight per tensor in xs), got shape ", shape_str(w));
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(at::isFloatingType(x0.scalar_type()), op_name,
              ": xs must be floating point (float64, float32, float16, bfloat16), got ",
              x0.scalar_type());
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& x = xs[k];
    TORCH_CHECK(x.device() == x0.device(), op_name, ": all tensors must be on one device, xs[",
                k, "] is on ", x.device(), " but xs[0] is on ", x0.device());
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), op_name, ": all tensors must have one dtype, xs[",
                k, "] is ", x.scalar_type(), " but xs[0] is ", x0.scalar_type());
    TORCH_CHECK(x.sizes() == x0.sizes(), op_name, ": all tensors in xs must have one shape, xs[", k,
                "] has shape ", shape_str(x), " but xs[0] has shape ", shape_str(x0));
  }
  TORCH_CHECK(w.device() == x0.device(), op_name, ": w is on ", w.device(), " but xs are on ",
              x0.device());
  // float32 weights with half-precision inputs: what a mixed op gets under autocast (the softmax
  // of alpha/beta stays float32 while the convolutions run in float16 / bfloat16)
  const bool half_inputs = x0.scalar_type() == at::kHalf || x0.scalar_type() == at::kBFloat16;
  TORCH_CHECK(w.scalar_type() == x0.scalar_type() || (half_inputs && w.scalar_type() == at::kFloat), op_name,
              ": w has dtype ", w.scalar_type(), " but xs have dtype ", x0.scalar_type(),
              " (w may be float32 when xs are float16 / bfloat16)");

  MixedInputs inputs;
  inputs.memory_format = common_memory_format(x0);
  inputs.xs.reserve(K);
  for (const at::Tensor& x : xs) {
    inputs.xs.push_back(x.contiguous(inputs.memory_format));  // no copy when already dense
  }
  // the kernels read the weights in the accumulation type (float, or double for double)
  inputs.w = w.to(x0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  return inputs;
}

at::Tensor prepare_grad_out(const at::Tensor& grad_out, const MixedInputs& inputs,
                            const char* op_name) {
  const at::Tensor& x0 = inputs.xs[0];
  TORCH_CHECK(grad_out.sizes() == x0.sizes(), op_name, ": grad_out has shape ", shape_str(grad_out),
              " but xs have shape ", shape_str(x0));
  TORCH_CHECK(grad_out.scalar_type() == x0.scalar_type(), op_name, ": grad_out has dtype ",
              grad_out.scalar_type(), " but xs have dtype ", x0.scalar_type());
  TORCH_CHECK(grad_out.device() == x0.device(), op_name, ": grad_out is on ", grad_out.device(),
              " but xs are on ", x0.device());
  return grad_out.contiguous(inputs.memory_format);
}

namespace {

// Elements handled per inner block: the block's running sums stay in L1 while the K inputs
// stream through once.
constexpr int64_t kBlock = 1024;
// Backward work unit. Fixed (not derived from the thread count) so the reduction order of
// grad_w, hence its rounding, does not depend on how many threads run.
constexpr int64_t kChunk = 32 * kBlock;
// Independent partial sums per dot product inside a block, so the compiler can vectorize the
// reduction without reassociating floating point (-ffast-math is not used).
constexpr int64_t kLanes = 16;

template <typename scalar_t>
void mixed_sum_forward_cpu_kernel(const MixedInputs& inputs, at::Tensor& out) {
  using acc_t = mixed_sum_acc_t<scalar_t>;
  const int64_t K = static_cast<int64_t>(inputs.xs.size());
  const int64_t numel = out.numel();
  std::array<const scalar_t*, kMaxMixedInputs> x_ptrs{};
  std::array<acc_t, kMaxMixedInputs> weights{};
  const acc_t* w_ptr = inputs.w.data_ptr<acc_t>();
  for (int64_t k = 0; k < K; ++k) {
    x_ptrs[k] = inputs.xs[k].data_ptr<scalar_t>();
    weights[k] = to_acc<acc_t>(w_ptr[k]);
  }
  scalar_t* out_ptr = out.data_ptr<scalar_t>();

  at::parallel_for(0, numel, kChunk, [&](int64_t begin, int64_t end) {
    acc_t running[kBlock];
    for (int64_t start = begin; start < end; start += kBlock) {
      const int64_t n = std::min(kBlock, end - start);
      const scalar_t* x = x_ptrs[0] + start;
      for (int64_t j = 0; j < n; ++j) {
        running[j] = weighted_add(acc_t(0), weights[0], to_acc<acc_t>(x[j]));
      }
      for (int64_t k = 1; k < K; ++k) {
        x = x_ptrs[k] + start;
        const acc_t weight = weights[k];
        for (int64_t j = 0; j < n; ++j) {
          running[j] = weighted_add(running[j], weight, to_acc<acc_t>(x[j]));
        }
      }
      scalar_t* o = out_ptr + start;
      for (int64_t j = 0; j < n; ++j) {
        o[j] = from_acc<scalar_t>(running[j]);
      }
    }
  });
}

// Sum of grad_out[j] * x[j] over one block of n elements, in kLanes independent accumulators.
template <typename scalar_t, typename acc_t>
acc_t block_dot(const acc_t* grad, const scalar_t* x, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] = weight_grad_add(lanes[l], grad[j + l], to_acc<acc_t>(x[j + l]));
    }
  }
  for (; j < n; ++j) {
    lanes[0] = weight_grad_add(lanes[0], grad[j], to_acc<acc_t>(x[j]));
  }
  // Pairwise tree over the lanes.
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) {
      lanes[l] += lanes[l + width];
    }
  }
  return lanes[0];
}

template <typename scalar_t>
void mixed_sum_backward_cpu_kernel(const at::Tensor& grad_out, const MixedInputs& inputs,
                                   std::vector<at::Tensor>& grad_xs, at::Tensor& grad_w) {
  using acc_t = mixed_sum_acc_t<scalar_t>;
  const int64_t K = static_cast<int64_t>(inputs.xs.size());
  const int64_t numel = grad_out.numel();
  const bool want_input_grads = !grad_xs.empty();
  const bool want_weight_grad = grad_w.defined() && grad_w.numel() > 0;

  std::array<const scalar_t*, kMaxMixedInputs> x_ptrs{};
  std::array<scalar_t*, kMaxMixedInputs> grad_x_ptrs{};
  std::array<acc_t, kMaxMixedInputs> weights{};
  const acc_t* w_ptr = inputs.w.data_ptr<acc_t>();
  for (int64_t k = 0; k < K; ++k) {
    x_ptrs[k] = inputs.xs[k].data_ptr<scalar_t>();
    grad_x_ptrs[k] = want_input_grads ? grad_xs[k].data_ptr<scalar_t>() : nullptr;
    weights[k] = to_acc<acc_t>(w_ptr[k]);
  }
  const scalar_t* grad_out_ptr = grad_out.data_ptr<scalar_t>();

  const int64_t num_chunks = (numel + kChunk - 1) / kChunk;
  // partial_dots[chunk * K + k]: chunk's contribution to grad_w[k]; summed in a fixed order below.
  std::vector<acc_t> partial_dots(want_weight_grad ? num_chunks * K : 0, acc_t(0));

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    acc_t grad[kBlock];
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * kChunk;
      const int64_t end = std::min(numel, begin + kChunk);
      std::array<acc_t, kMaxMixedInputs> chunk_dots{};
      for (int64_t start = begin; start < end; start += kBlock) {
        const int64_t n = std::min(kBlock, end - start);
        const scalar_t* g = grad_out_ptr + start;
        for (int64_t j = 0; j < n; ++j) {
          grad[j] = to_acc<acc_t>(g[j]);
        }
        for (int64_t k = 0; k < K; ++k) {
          if (want_input_grads) {
            scalar_t* gx = grad_x_ptrs[k] + start;
            const acc_t weight = weights[k];
            for (int64_t j = 0; j < n; ++j) {
              gx[j] = from_acc<scalar_t>(input_grad(weight, grad[j]));
            }
          }
          if (want_weight_grad) {
            chunk_dots[k] += block_dot<scalar_t, acc_t>(grad, x_ptrs[k] + start, n);
          }
        }
      }
      if (want_weight_grad) {
        for (int64_t k = 0; k < K; ++k) {
          partial_dots[chunk * K + k] = chunk_dots[k];
        }
      }
    }
  });

  if (want_weight_grad) {
    acc_t* grad_w_ptr = grad_w.data_ptr<acc_t>();  // the accumulation type; the caller casts to w's
    for (int64_t k = 0; k < K; ++k) {
      double total = 0.0;  // few chunks: summing them in double is free and keeps float32 exact-ish
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        total += static_cast<double>(partial_dots[chunk * K + k]);
      }
      grad_w_ptr[k] = static_cast<acc_t>(total);
    }
  }
}

at::Tensor mixed_sum_cpu(const std::vector<at::Tensor>& xs, const at::Tensor& w) {
  const MixedInputs inputs = prepare_mixed_inputs(xs, w, "autofpn::mixed_sum");
  TORCH_CHECK(inputs.xs[0].device().is_cpu(), "autofpn::mixed_sum: CPU kernel got ",
              inputs.xs[0].device());
  at::Tensor out = at::empty_like(inputs.xs[0], inputs.memory_format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_sum_cpu", [&] {
    mixed_sum_forward_cpu_kernel<scalar_t>(inputs, out);
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& xs, const at::Tensor& w,
    bool input_grads, bool weight_grad) {
  const MixedInputs inputs = prepare_mixed_inputs(xs, w, "autofpn::mixed_sum_backward");
  const at::Tensor grad = prepare_grad_out(grad_out, inputs, "autofpn::mixed_sum_backward");
  std::vector<at::Tensor> grad_xs;
  if (input_grads) {
    for (const at::Tensor& x : inputs.xs) {
      grad_xs.push_back(at::empty_like(x, inputs.memory_format));
    }
  }
  at::Tensor grad_w = at::empty({weight_grad ? w.size(0) : 0}, inputs.w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "mixed_sum_backward_cpu", [&] {
    mixed_sum_backward_cpu_kernel<scalar_t>(grad, inputs, grad_xs, grad_w);
  });
  return {grad_xs, grad_w.to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(autofpn, m) {
  // out = sum_k w[k] * xs[k]; every xs[k] has one shape; w: [K].
  m.def("mixed_sum(Tensor[] xs, Tensor w) -> Tensor");
  // One pass: grad_xs[k] = w[k] * grad_out (if input_grads, else []),
  // grad_w[k] = sum(grad_out * xs[k]) (if weight_grad, else an empty [0] tensor).
  m.def(
      "mixed_sum_backward(Tensor grad_out, Tensor[] xs, Tensor w, bool input_grads, "
      "bool weight_grad) -> (Tensor[], Tensor)");
}

TORCH_LIBRARY_IMPL(autofpn, CPU, m) {
  m.impl("mixed_sum", &mixed_sum_cpu);
  m.impl("mixed_sum_backward", &mixed_sum_backward_cpu);
}

}  // namespace autofpn

// `import autofpn._C` loads this library (which registers the operators above); it exposes no
// Python functions itself, the operators are reached through torch.ops.autofpn.
#define AUTOFPN_CONCAT_(a, b) a##b
#define AUTOFPN_CONCAT(a, b) AUTOFPN_CONCAT_(a, b)
PyMODINIT_FUNC AUTOFPN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME),
                                          "autofpn fused mixed-sum operators (torch.ops.autofpn)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
