// CPU reference of skinny_linear: ATen's linear (the workspace is a CUDA concern).
#include <torch/library.h>

#include "linear.h"

namespace hippo {
namespace {

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& workspace, c10::string_view impl) {
  check_skinny_linear_inputs(x, weight, bias, workspace, impl);
  return at::linear(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) { m.impl("skinny_linear", &skinny_linear_cpu); }

}  // namespace hippo
