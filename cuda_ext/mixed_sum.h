// Device-independent front end of the fused mixed sum: input validation and layout handling,
// implemented once in mixed_sum.cpp and used by both the CPU and the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace autofpn {

// The K inputs after validation, all in one dense memory format (that of xs[0]: channels-last
// when xs[0] is a channels-last 4-D tensor, row-major otherwise), so kernels index them flat.
struct MixedInputs {
  std::vector<at::Tensor> xs;  // K tensors, same shape / dtype / device / strides, dense
  at::Tensor w;                // [K], contiguous, same device as xs, in the accumulation type
                               // (float; double for double xs), whatever w's dtype was
  at::MemoryFormat memory_format;
};

// Checks xs / w (K in 1..kMaxMixedInputs, one shape, one dtype, one device, w of shape [K] and
// of xs' dtype, or float32 with float16 / bfloat16 xs) and
// raises a c10::Error naming the offending argument; returns them in a common dense layout.
MixedInputs prepare_mixed_inputs(const std::vector<at::Tensor>& xs, const at::Tensor& w,
                                 const char* op_name);

// Validates grad_out against the forward input shape / dtype / device and returns it in the
// same dense memory format as the inputs.
at::Tensor prepare_grad_out(const at::Tensor& grad_out, const MixedInputs& inputs,
                            const char* op_name);

}  // namespace autofpn
