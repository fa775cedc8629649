// CPU reference of rms_norm and add_rms_norm: HF's Qwen2RMSNorm written with ATen ops, step for
// step, so that the CPU runtime stays bitwise equal to the HF model.
#include <torch/library.h>

#include <tuple>

#include "normalization.h"

namespace hippo {
namespace {

at::Tensor normalize(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor wide = x.to(at::kFloat);
  const at::Tensor variance = wide.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (wide * at::rsqrt(variance + eps)).to(x.scalar_type());
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_inputs(x, weight, eps, "rms_norm");
  return normalize(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  check_add_rms_norm_inputs(x, residual, weight, eps);
  at::Tensor sum = residual + x;
  return {normalize(sum, weight, eps), sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
}

}  // namespace hippo
