// RMSNorm (rms_norm, add_rms_norm): the checks shared by the CPU and CUDA implementations.
//
// Both follow the arithmetic of HF's Qwen2RMSNorm exactly, so a model run through these ops
// rounds where HF rounds:
//   sum    = dtype(x + residual)                        (add_rms_norm only: the residual add)
//   normed = dtype(float(sum) * rsqrt(mean(float(sum)^2) + eps))
//   out    = dtype(weight * normed)
// x [..., H] contiguous; weight [H] of x's dtype; residual (add_rms_norm) shaped like x.
#pragma once

#include "common.h"

namespace hippo {

struct RmsNormShape {
  int64_t rows = 0;    // numel / H
  int64_t hidden = 0;  // H
};

// weight_name: what the caller calls the norm's weight (the fused ops have a second weight).
inline RmsNormShape check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight, double eps,
                                          const char* op, const char* weight_name = "weight") {
  HIPPO_CHECK(x.dim() >= 1, op, "x must have at least one dimension, got a scalar");
  check_floating(x, op, "x");
  check_contiguous(x, op, "x");
  check_dim(weight, 1, op, weight_name);
  HIPPO_CHECK(weight.scalar_type() == x.scalar_type(), op, weight_name, " dtype ",
              weight.scalar_type(), " must match the dtype of x, ", x.scalar_type());
  check_same_device(x, weight, op, "x", weight_name);
  check_contiguous(weight, op, weight_name);
  const int64_t hidden = x.size(-1);
  HIPPO_CHECK(hidden >= 1, op, "x's last dimension must not be empty, got shape ", x.sizes());
  HIPPO_CHECK(weight.size(0) == hidden, op, weight_name, " has ", weight.size(0),
              " entries but x's last dimension is ", hidden);
  HIPPO_CHECK(eps >= 0.0 && finite_as_float(eps), op,
              "eps must be finite and >= 0, got ", eps);
  RmsNormShape s;
  s.hidden = hidden;
  s.rows = hidden == 0 ? 0 : x.numel() / hidden;
  return s;
}

inline RmsNormShape check_add_rms_norm_inputs(const at::Tensor& x, const at::Tensor& residual,
                                              const at::Tensor& weight, double eps,
                                              const char* op = "add_rms_norm",
                                              const char* weight_name = "weight") {
  const RmsNormShape s = check_rms_norm_inputs(x, weight, eps, op, weight_name);
  HIPPO_CHECK(residual.sizes() == x.sizes(), op, "residual shape ", residual.sizes(),
              " must equal the shape of x, ", x.sizes());
  HIPPO_CHECK(residual.scalar_type() == x.scalar_type(), op, "residual dtype ",
              residual.scalar_type(), " must match the dtype of x, ", x.scalar_type());
  check_same_device(x, residual, op, "x", "residual");
  check_contiguous(residual, op, "residual");
  return s;
}

}  // namespace hippo
