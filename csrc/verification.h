// Verification ops (speculative decoding): input checks and the few scalar rules that the CPU
// reference and the CUDA kernels must apply identically.
//
// Layout conventions (all three ops):
//   * token tensors (draft_tokens, tree_tokens, parents) are int64 and contiguous;
//   * logits / probabilities are [B, rows, V] fp32, bf16 or fp16 whose last dimension is
//     contiguous; the batch and row strides are free (a slice of a model's output is fine);
//   * uniforms are contiguous float32.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common.h"

namespace hippo {

// The three floating dtypes of logits and probabilities (a subset of AT_DISPATCH_*).
#define HIPPO_DISPATCH_PROB_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// ---- rules shared by the CPU reference and the CUDA kernels ------------------------------------

// Argmax order: larger value wins; NaN counts as the largest value (like torch.argmax); ties go to
// the lower index. Returns true when (value, index) beats (best_value, best_index).
C10_HOST_DEVICE inline bool argmax_beats(float value, int64_t index, float best_value,
                                         int64_t best_index) {
  const bool value_nan = value != value;
  const bool best_nan = best_value != best_value;
  if (value_nan || best_nan) {
    return value_nan && (!best_nan || index < best_index);
  }
  return value > best_value || (value == best_value && index < best_index);
}

// Speculative-sampling acceptance of a draft token x: u <= p(x) / q(x), written without the
// division. A token the target gives no mass (p(x) = 0) is never accepted, even with u = 0, so
// the output never contains a token the target cannot produce; q(x) = 0 < p(x) accepts.
C10_HOST_DEVICE inline bool sampling_accepts(float uniform, float draft_prob, float target_prob) {
  return target_prob > 0.f && uniform * draft_prob <= target_prob;
}

// After a rejection the emitted token is drawn from norm(max(0, p - q)). When that residual has
// (numerically) no mass relative to p's total, which only happens for unnormalised or
// inconsistent inputs, the token is drawn from p instead.
constexpr float kZeroResidualRelativeMass = 1e-6f;

// In the sums' own precision (double, on the CPU and CUDA): narrowed to float, sums of huge
// unnormalised probabilities would become inf and compare false.
template <typename Sum>
C10_HOST_DEVICE inline bool residual_has_mass(Sum residual_total, Sum target_total) {
  return residual_total > static_cast<Sum>(kZeroResidualRelativeMass) * target_total;
}

// ---- shape / dtype / device checks ---------------------------------------------------------------

struct VerifyShape {
  int64_t batch;
  int64_t draft_len;  // g (or the number of tree nodes N)
  int64_t vocab;      // V
};

// Probability/logit rows: [B, rows, V] with a contiguous last dimension.
// rows_meaning names the expected row count for the message ("g+1", "N+1").
inline void check_prob_rows(const at::Tensor& t, int64_t batch, int64_t rows,
                            const char* rows_meaning, const char* op, const char* name) {
  check_dim(t, 3, op, name);
  check_floating(t, op, name);
  check_size(t, 0, batch, op, name);
  HIPPO_CHECK(t.size(1) == rows, op, name, " must have ", rows_meaning, " = ", rows,
              " rows in dimension 1, got shape ", t.sizes());
  HIPPO_CHECK(t.size(2) >= 1, op, name, " must have a vocabulary of at least one token, got shape ",
              t.sizes());
  // Kernels index within a row with 32-bit integers; 2^30 leaves room for their arithmetic.
  HIPPO_CHECK(t.size(2) <= (int64_t{1} << 30), op, name, " vocabulary must be at most 2^30, got ",
              t.size(2));
  HIPPO_CHECK(t.size(2) == 1 || t.stride(2) == 1, op, name,
              " must be contiguous in its last (vocabulary) dimension, got strides ", t.strides());
}

inline void check_token_matrix(const at::Tensor& t, const char* op, const char* name) {
  check_dim(t, 2, op, name);
  check_dtype(t, at::kLong, op, name);
  check_contiguous(t, op, name);
}

inline VerifyShape check_verify_greedy_inputs(const at::Tensor& draft_tokens,
                                              const at::Tensor& target_logits) {
  constexpr const char* op = "verify_greedy";
  check_token_matrix(draft_tokens, op, "draft_tokens");
  const int64_t batch = draft_tokens.size(0), g = draft_tokens.size(1);
  check_prob_rows(target_logits, batch, g + 1, "g+1", op, "target_logits");
  check_same_device(draft_tokens, target_logits, op, "draft_tokens", "target_logits");
  return {batch, g, target_logits.size(2)};
}

inline VerifyShape check_verify_sampling_inputs(const at::Tensor& draft_tokens,
                                                const at::Tensor& draft_probs,
                                                const at::Tensor& target_probs,
                                                const at::Tensor& uniforms) {
  constexpr const char* op = "verify_sampling";
  check_token_matrix(draft_tokens, op, "draft_tokens");
  const int64_t batch = draft_tokens.size(0), g = draft_tokens.size(1);
  check_prob_rows(draft_probs, batch, g, "g", op, "draft_probs");
  check_prob_rows(target_probs, batch, g + 1, "g+1", op, "target_probs");
  const int64_t vocab = target_probs.size(2);
  HIPPO_CHECK(draft_probs.size(2) == vocab, op, "draft_probs and target_probs must share the ",
              "vocabulary, got shapes ", draft_probs.sizes(), " and ", target_probs.sizes());
  HIPPO_CHECK(draft_probs.scalar_type() == target_probs.scalar_type(), op,
              "draft_probs and target_probs must have the same dtype, got ",
              draft_probs.scalar_type(), " and ", target_probs.scalar_type());
  check_dim(uniforms, 2, op, "uniforms");
  check_dtype(uniforms, at::kFloat, op, "uniforms");
  check_size(uniforms, 0, batch, op, "uniforms");
  HIPPO_CHECK(uniforms.size(1) == g + 1, op, "uniforms must have g+1 = ", g + 1,
              " columns, got shape ", uniforms.sizes());
  check_contiguous(uniforms, op, "uniforms");
  check_same_device(draft_tokens, draft_probs, op, "draft_tokens", "draft_probs");
  check_same_device(draft_tokens, target_probs, op, "draft_tokens", "target_probs");
  check_same_device(draft_tokens, uniforms, op, "draft_tokens", "uniforms");
  return {batch, g, vocab};
}

// The most nodes a draft tree may have: the CUDA kernel keeps three ints per node in shared memory,
// within the 48 KB any GPU gives a block without opting in. Draft trees have tens to hundreds.
constexpr int64_t kMaxTreeNodes = 4095;

inline VerifyShape check_verify_tree_greedy_inputs(const at::Tensor& tree_tokens,
                                                   const at::Tensor& parents,
                                                   const at::Tensor& target_logits) {
  constexpr const char* op = "verify_tree_greedy";
  check_token_matrix(tree_tokens, op, "tree_tokens");
  check_token_matrix(parents, op, "parents");
  const int64_t batch = tree_tokens.size(0), nodes = tree_tokens.size(1);
  HIPPO_CHECK(nodes <= kMaxTreeNodes, op, "tree_tokens.size(1), the tree's nodes, must be at most ",
              kMaxTreeNodes, ", got ", nodes);
  check_size(parents, 0, batch, op, "parents");
  check_size(parents, 1, nodes, op, "parents");
  check_prob_rows(target_logits, batch, nodes + 1, "N+1", op, "target_logits");
  check_same_device(tree_tokens, parents, op, "tree_tokens", "parents");
  check_same_device(tree_tokens, target_logits, op, "tree_tokens", "target_logits");
  return {batch, nodes, target_logits.size(2)};
}

}  // namespace hippo
