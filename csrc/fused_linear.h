// add_rms_norm_linear and silu_and_mul_linear: a decoder layer's RMSNorm (with its residual add)
// or SwiGLU gating fused into the GEMM that consumes it, so a decode step runs one kernel where
// it ran two:
//   add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
//       = (linear(add_rms_norm(x, residual, norm_weight, eps)[0], weight, bias), x + residual)
//   silu_and_mul_linear(x, weight, bias) = linear(silu_and_mul(x), weight, bias)
// with the arithmetic of those ops (HF's rounding, normalization.h and activation.h). This header
// holds their checks and that composition, which is the CPU implementation and the CUDA one for
// the shapes its fused kernel does not take.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

#include "activation.h"
#include "common.h"
#include "linear.h"
#include "normalization.h"

namespace hippo {

inline constexpr const char* kAddRmsNormLinearOp = "add_rms_norm_linear";
inline constexpr const char* kSiluAndMulLinearOp = "silu_and_mul_linear";

inline SkinnyShape check_add_rms_norm_linear_inputs(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& norm_weight, double eps,
                                                    const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias) {
  check_add_rms_norm_inputs(x, residual, norm_weight, eps, kAddRmsNormLinearOp);
  return check_linear_operands(x, x.size(-1), weight, bias, kAddRmsNormLinearOp);
}

inline SkinnyShape check_silu_and_mul_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias) {
  const GatedShape gated = check_silu_and_mul_inputs(x, kSiluAndMulLinearOp);
  return check_linear_operands(x, gated.width, weight, bias, kSiluAndMulLinearOp);
}

// The compositions, through the dispatcher: each part runs the kernel of the inputs' device.
inline std::tuple<at::Tensor, at::Tensor> add_rms_norm_then_linear(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto add_rms_norm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hippo_ext::add_rms_norm", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, double)>();
  auto [normed, sum] = add_rms_norm.call(x, residual, norm_weight, eps);
  return {at::linear(normed, weight, bias), sum};
}

inline at::Tensor silu_and_mul_then_linear(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias) {
  static const auto silu_and_mul = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("hippo_ext::silu_and_mul", "")
                                       .typed<at::Tensor(const at::Tensor&)>();
  return at::linear(silu_and_mul.call(x), weight, bias);
}

}  // namespace hippo
