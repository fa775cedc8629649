// CPU reference of add_rms_norm_linear, silu_and_mul_linear and qkv_projection: the ops they fuse, composed
// (fused_linear.h), so the CPU runtime stays bitwise equal to the unfused path and to HF.
#include <torch/library.h>

#include "fused_linear.h"

namespace hippo {
namespace {

std::tuple<at::Tensor, at::Tensor> add_rms_norm_linear_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_add_rms_norm_linear_inputs(x, residual, norm_weight, eps, weight, bias);
  return add_rms_norm_then_linear(x, residual, norm_weight, eps, weight, bias);
}

at::Tensor silu_and_mul_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  check_silu_and_mul_linear_inputs(x, weight, bias);
  return silu_and_mul_then_linear(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> qkv_projection_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& cache, int64_t layer, const at::Tensor& length) {
  const auto [gemm, rotary] =
      check_qkv_projection_inputs(x, residual, norm_weight, eps, weight, bias, cos, sin, cache, layer, length);
  check_rotary_kv_append_lengths(length, rotary, kQkvProjectionOp);  // before the norm and GEMM run
  return qkv_projection_composed(x, residual, norm_weight, eps, weight, bias, cos, sin, cache, layer,
                                 length);
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) {
  m.impl("add_rms_norm_linear", &add_rms_norm_linear_cpu);
  m.impl("silu_and_mul_linear", &silu_and_mul_linear_cpu);
  m.impl("qkv_projection", &qkv_projection_cpu);
}

}  // namespace hippo
