// add_rms_norm_linear, silu_and_mul_linear and qkv_projection: a decoder layer's RMSNorm (with
// its residual add) or SwiGLU gating fused into the GEMM that consumes it, and for the q/k/v
// projection RoPE and the cache append fused after it, so a decode step runs one kernel where it
// ran two or three:
//   add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
//       = (linear(add_rms_norm(x, residual, norm_weight, eps)[0], weight, bias), x + residual)
//   silu_and_mul_linear(x, weight, bias) = linear(silu_and_mul(x), weight, bias)
//   qkv_projection(x, residual, norm_weight, eps, weight, bias, cos, sin, cache, layer, length)
//       = (rotary_kv_append(qkv, cos, sin, cache, layer, length), x + residual)
//         with (qkv, _) = add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
// with the arithmetic of those ops (HF's rounding: normalization.h, activation.h,
// rotary_embedding.h). This header holds their checks and that composition, which is the CPU
// implementation and the CUDA one for the shapes the fused kernel does not take.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

#include "activation.h"
#include "common.h"
#include "linear.h"
#include "normalization.h"
#include "rotary_embedding.h"

namespace hippo {

inline constexpr const char* kAddRmsNormLinearOp = "add_rms_norm_linear";
inline constexpr const char* kSiluAndMulLinearOp = "silu_and_mul_linear";
inline constexpr const char* kQkvProjectionOp = "qkv_projection";

inline SkinnyShape check_add_rms_norm_linear_inputs(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& norm_weight, double eps,
                                                    const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias) {
  check_add_rms_norm_inputs(x, residual, norm_weight, eps, kAddRmsNormLinearOp, "norm_weight");
  return check_linear_operands(x, x.size(-1), weight, bias, kAddRmsNormLinearOp);
}

inline SkinnyShape check_silu_and_mul_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias) {
  const GatedShape gated = check_silu_and_mul_inputs(x, kSiluAndMulLinearOp);
  return check_linear_operands(x, gated.width, weight, bias, kSiluAndMulLinearOp);
}

// x [B, S, hidden]; the projection's N outputs per token are the q/k/v rows rotary_kv_append takes.
inline std::pair<SkinnyShape, RotaryShape> check_qkv_projection_inputs(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& cache, int64_t layer, const at::Tensor& length) {
  const char* op = kQkvProjectionOp;
  check_dim(x, 3, op, "x");
  check_add_rms_norm_inputs(x, residual, norm_weight, eps, op, "norm_weight");
  const SkinnyShape gemm = check_linear_operands(x, x.size(-1), weight, bias, op);
  const RotaryShape rotary = check_rotary_operands(
      {x.size(0), x.size(1), gemm.out_features, x.scalar_type(), x.device(), "weight.size(0)", "x"},
      cos, sin, cache, layer,
      length, op);
  // The GEMM reads x and the residual while its epilogue writes the cache.
  check_apart_from_cache(x, cache, op, "x");
  check_apart_from_cache(residual, cache, op, "residual");
  return {gemm, rotary};
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

inline std::tuple<at::Tensor, at::Tensor> qkv_projection_composed(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& cache, int64_t layer, const at::Tensor& length) {
  static const auto rotary_kv_append =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("hippo_ext::rotary_kv_append", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            int64_t, const at::Tensor&)>();
  auto [qkv, sum] = add_rms_norm_then_linear(x, residual, norm_weight, eps, weight, bias);
  return {rotary_kv_append.call(qkv, cos, sin, cache, layer, length), sum};
}

inline at::Tensor silu_and_mul_then_linear(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias) {
  static const auto silu_and_mul = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("hippo_ext::silu_and_mul", "")
                                       .typed<at::Tensor(const at::Tensor&)>();
  return at::linear(silu_and_mul.call(x), weight, bias);
}

}  // namespace hippo
