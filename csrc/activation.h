// silu_and_mul: the gated activation of a SwiGLU MLP, on the fused gate/up projection.
//
// x [..., 2 I] holds gate (first I columns) and up (last I); out [..., I] = dtype(silu(gate)) * up
// with HF's rounding: the activation is rounded to the dtype before the product, as
// `act_fn(gate_proj(x)) * up_proj(x)` does in eager PyTorch.
#pragma once

#include "common.h"

namespace hippo {

struct GatedShape {
  int64_t rows = 0;   // numel / (2 I)
  int64_t width = 0;  // I
};

inline GatedShape check_silu_and_mul_inputs(const at::Tensor& x, const char* op = "silu_and_mul") {
  HIPPO_CHECK(x.dim() >= 1, op, "x must have at least one dimension, got a scalar");
  check_floating(x, op, "x");
  check_contiguous(x, op, "x");
  const int64_t columns = x.size(-1);
  HIPPO_CHECK(columns >= 2 && columns % 2 == 0, op,
              "x's last dimension must be even and non-empty (gate then up), got shape ", x.sizes());
  GatedShape s;
  s.width = columns / 2;
  s.rows = x.numel() / columns;
  return s;
}

inline std::vector<int64_t> silu_and_mul_output_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() /= 2;
  return shape;
}

}  // namespace hippo
