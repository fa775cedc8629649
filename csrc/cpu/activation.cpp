// CPU reference of silu_and_mul: HF's `act_fn(gate) * up` with ATen ops.
#include <torch/library.h>

#include "activation.h"

namespace hippo {
namespace {

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  const GatedShape s = check_silu_and_mul_inputs(x);
  return at::silu(x.narrow(-1, 0, s.width)) * x.narrow(-1, s.width, s.width);
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) { m.impl("silu_and_mul", &silu_and_mul_cpu); }

}  // namespace hippo
