// skinny_linear: y = x W^T (+ bias) for the few rows of a decode or verify step (M <= 32), the
// GEMM shape at which a general tiled GEMM starves the GPU (a 128-row tile is mostly padding and
// N / 128 tiles are too few blocks to stream the weight at full bandwidth).
//
// x [..., K]; weight [N, K]; bias [N] or none; out [..., N] in x's dtype. Accumulation in fp32;
// the result is rounded once, after the bias add (what cuBLAS's bias epilogue does). The CUDA
// kernel splits K across blocks by a plan that depends on N, K and the GPU only, never on M, so
// each output row is bitwise the same whether it is computed alone or with the others: a verify
// step's rows equal the decode steps' for these GEMMs. HIPPO_SKINNY_KERNEL=fma runs M <= 16 on
// an FMA kernel instead, which slices K among the warps of a block, again by N, K and the GPU
// (rows independent of M up to 16; opt-in). The CPU reference's rows do not depend on M either,
// up to kSkinnyMaxRows (one dot product per output, summed in an order set by K).
// workspace: int32 [>= ceil(N / 64)] zeros, left zeroed (the split-K semaphores of the CUDA
// kernel; unused on the CPU). One workspace per stream: concurrent calls must not share it.
#pragma once

#include "common.h"

namespace hippo {

inline constexpr const char* kSkinnyLinearOp = "skinny_linear";
inline constexpr int64_t kSkinnyMaxRows = 32;     // rows of x the tensor-core kernel takes
inline constexpr int64_t kSkinnyRowsPerBlock = 64;  // weight rows (outputs) per thread block

struct SkinnyShape {
  int64_t rows = 0;  // M
  int64_t in_features = 0;   // K
  int64_t out_features = 0;  // N
};

// The GEMM operands of skinny_linear and of the fused ops that end in one: x [..., *] (only its
// dtype, device and row count are read: rows = numel / x.size(-1)) with `in_features` = K
// inputs per row, weight [N, K], bias [N] or none.
inline SkinnyShape check_linear_operands(const at::Tensor& x, int64_t in_features,
                                         const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias, const char* op) {
  HIPPO_CHECK(x.dim() >= 1, op, "x must have at least one dimension, got a scalar");
  check_floating(x, op, "x");
  check_contiguous(x, op, "x");
  check_dim(weight, 2, op, "weight");
  check_contiguous(weight, op, "weight");
  HIPPO_CHECK(weight.scalar_type() == x.scalar_type(), op, "weight dtype ", weight.scalar_type(),
              " must match the dtype of x, ", x.scalar_type());
  check_same_device(x, weight, op, "x", "weight");
  SkinnyShape s;
  s.in_features = in_features;
  s.out_features = weight.size(0);
  HIPPO_CHECK(weight.size(1) == s.in_features, op, "weight is ", weight.sizes(), " but x has ",
              s.in_features, " input features");
  s.rows = x.size(-1) == 0 ? 0 : x.numel() / x.size(-1);
  if (bias.has_value()) {
    check_dim(*bias, 1, op, "bias");
    HIPPO_CHECK(bias->size(0) == s.out_features, op, "bias has ", bias->size(0), " entries but weight has ",
                s.out_features, " rows");
    HIPPO_CHECK(bias->scalar_type() == x.scalar_type(), op, "bias dtype ", bias->scalar_type(),
                " must match the dtype of x, ", x.scalar_type());
    check_same_device(*bias, x, op, "bias", "x");
    check_contiguous(*bias, op, "bias");
  }
  return s;
}

// Which CUDA kernel skinny_linear runs: kAuto follows HIPPO_SKINNY_KERNEL (tensor cores unless
// it says "fma"), kMma the tensor-core kernel, kFma the FMA kernel for M <= 16 (more rows run
// tensor cores). The CPU validates the name and runs ATen's linear whatever it is.
enum class SkinnyKernel { kAuto, kMma, kFma };

inline SkinnyKernel skinny_kernel(c10::string_view name) {
  if (name == "auto") return SkinnyKernel::kAuto;
  if (name == "mma") return SkinnyKernel::kMma;
  HIPPO_CHECK(name == "fma", kSkinnyLinearOp, "impl must be \"auto\", \"mma\" or \"fma\", got \"",
              std::string(name), "\"");
  return SkinnyKernel::kFma;
}

inline SkinnyShape check_skinny_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              const at::Tensor& workspace, c10::string_view impl) {
  const char* op = kSkinnyLinearOp;
  skinny_kernel(impl);
  const SkinnyShape s =
      check_linear_operands(x, x.dim() >= 1 ? x.size(-1) : 0, weight, bias, op);
  check_dim(workspace, 1, op, "workspace");
  check_dtype(workspace, at::kInt, op, "workspace");
  check_contiguous(workspace, op, "workspace");
  check_same_device(workspace, x, op, "workspace", "x");
  const int64_t blocks = ceil_div(s.out_features, kSkinnyRowsPerBlock);
  HIPPO_CHECK(workspace.numel() >= blocks, op, "workspace holds ", workspace.numel(),
              " counters but N = ", s.out_features, " needs ceil(N / ", kSkinnyRowsPerBlock, ") = ", blocks);
  return s;
}

inline std::vector<int64_t> skinny_linear_output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

}  // namespace hippo
