// Per-element arithmetic of the fused mixed sum, shared by the CPU kernel (mixed_sum.cpp) and
// the CUDA kernel (mixed_sum_cuda.cu), so the CPU tests exercise the exact same formulas.
//
//   forward:   out[i]        = sum_k w[k] * x_k[i]
//   backward:  grad_x_k[i]   = w[k] * grad_out[i]
//              grad_w[k]     = sum_i grad_out[i] * x_k[i]
//
// Every value is converted to the accumulation type first (float for half / bfloat16 / float,
// double for double) and converted back only when stored.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace autofpn {

// Largest number of mixed inputs K. The CUDA kernel passes the K input / grad pointers by value
// in a fixed-size struct; the CPU kernel enforces the same bound so both accept the same inputs.
constexpr int kMaxMixedInputs = 16;

template <typename scalar_t>
struct MixedSumAcc {
  using type = float;
};
template <>
struct MixedSumAcc<double> {
  using type = double;
};
template <typename scalar_t>
using mixed_sum_acc_t = typename MixedSumAcc<scalar_t>::type;

// Loads one stored element into the accumulation type.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t to_acc(scalar_t value) {
  return static_cast<acc_t>(value);
}

// Stores an accumulated value back in the tensor's dtype.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE scalar_t from_acc(acc_t value) {
  return static_cast<scalar_t>(value);
}

// Forward: adds one weighted input to the running sum of one output element.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t weighted_add(acc_t running, acc_t weight, acc_t x) {
  return running + weight * x;
}

// Backward: gradient of one input element, d out / d x_k = w[k].
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t input_grad(acc_t weight, acc_t grad_out) {
  return weight * grad_out;
}

// Backward: adds one element's contribution to the running dot product grad_w[k].
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t weight_grad_add(acc_t running, acc_t grad_out, acc_t x) {
  return running + grad_out * x;
}

}  // namespace autofpn
