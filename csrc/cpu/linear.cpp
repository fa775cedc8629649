// CPU reference of skinny_linear. Up to kSkinnyMaxRows rows (a step's), each output is one dot
// product of a row of x with a row of the weight, summed in an order that depends on K only, so
// that, as on CUDA, row m of the result is bitwise the same whatever M is (a verify step's rows
// equal single-token steps'; ATen's linear picks its BLAS kernel, and with it the order of the
// sums, by the number of rows). More rows (a prefill) take ATen's linear, as on CUDA.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "linear.h"

namespace hippo {
namespace {

// Independent partial sums, one per lane, which the compiler can keep in vector registers
// without reordering any sum; added in lane order at the end.
constexpr int64_t kLanes = 16;

template <typename scalar_t>
void dot_rows(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, scalar_t* out,
              int64_t rows, int64_t in_features, int64_t out_features) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t whole = in_features - in_features % kLanes;
  // Each weight row is read once for all rows of x (the weight is what is large).
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* w = weight + n * in_features;
      for (int64_t m = 0; m < rows; ++m) {
        const scalar_t* a = x + m * in_features;
        acc_t lanes[kLanes] = {};
        for (int64_t k = 0; k < whole; k += kLanes) {
          for (int64_t j = 0; j < kLanes; ++j) {
            lanes[j] += static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(w[k + j]);
          }
        }
        for (int64_t k = whole; k < in_features; ++k) {
          lanes[k - whole] += static_cast<acc_t>(a[k]) * static_cast<acc_t>(w[k]);
        }
        acc_t sum = 0;
        for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
        if (bias != nullptr) sum += static_cast<acc_t>(bias[n]);
        out[m * out_features + n] = static_cast<scalar_t>(sum);  // rounded once, after the bias
      }
    }
  });
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& workspace, c10::string_view impl) {
  // The workspace is the CUDA kernel's and impl picks a CUDA kernel: both are only validated.
  const SkinnyShape s = check_skinny_linear_inputs(x, weight, bias, workspace, impl);
  if (s.rows > kSkinnyMaxRows) return at::linear(x, weight, bias);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = s.out_features;
  at::Tensor out = at::empty(out_sizes, x.options());
  const int64_t rows = out.numel() == 0 ? 0 : out.numel() / s.out_features;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "skinny_linear_cpu", [&] {
    dot_rows(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
             bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), rows,
             s.in_features, s.out_features);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) { m.impl("skinny_linear", &skinny_linear_cpu); }

}  // namespace hippo
