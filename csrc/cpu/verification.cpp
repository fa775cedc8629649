// CPU reference of the verification ops: plain loops, one batch row per task. The CUDA kernels
// (csrc/cuda/verification.cu) must agree with these.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "verification.h"

namespace hippo {
namespace {

// Rows of a [B, rows, V] tensor with a contiguous last dimension and free outer strides.
template <typename scalar_t>
struct RowView {
  const scalar_t* data;
  int64_t batch_stride;
  int64_t row_stride;

  explicit RowView(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), batch_stride(t.stride(0)), row_stride(t.stride(1)) {}

  const scalar_t* row(int64_t b, int64_t r) const {
    return data + b * batch_stride + r * row_stride;
  }
};

template <typename scalar_t>
int64_t row_argmax(const scalar_t* row, int64_t vocab) {
  float best = static_cast<float>(row[0]);
  int64_t best_index = 0;
  for (int64_t j = 1; j < vocab; ++j) {
    const float value = static_cast<float>(row[j]);
    if (argmax_beats(value, j, best, best_index)) {
      best = value;
      best_index = j;
    }
  }
  return best_index;
}

// Index values are checked here, on the CPU path, before any kernel runs.
void check_tokens_in_vocab(const at::Tensor& tokens, int64_t vocab, const char* op,
                           const char* name) {
  const int64_t* data = tokens.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < tokens.numel(); ++k) {
    HIPPO_CHECK(data[k] >= 0 && data[k] < vocab, op, name, " values must lie in [0, ", vocab,
                "), got ", data[k], " at flat position ", k);
  }
}

// A NaN or out-of-range uniform would silently reject every draft and skew the emitted token.
void check_uniforms(const at::Tensor& uniforms) {
  const float* data = uniforms.const_data_ptr<float>();
  for (int64_t k = 0; k < uniforms.numel(); ++k) {
    HIPPO_CHECK(data[k] >= 0.f && data[k] <= 1.f, "verify_sampling",
                "uniforms values must lie in [0, 1], got ", data[k], " at flat position ", k);
  }
}

// Probabilities must be finite and non-negative: a NaN q(x) or p(x) reads as a rejection and
// fmax(p - NaN, 0) as no residual mass, and negative or infinite mass skews the drawn token, all
// without a sign. (Rows need not be normalised.)
void check_probabilities(const at::Tensor& probs, const char* name) {
  const at::Tensor bad = (probs >= 0).logical_and(probs.isfinite()).logical_not();
  if (!bad.any().item<bool>()) return;
  const int64_t first = bad.flatten().nonzero()[0][0].item<int64_t>();
  HIPPO_CHECK(false, "verify_sampling", name, " must be finite and non-negative (probabilities), got ",
              probs.flatten()[first].item<double>(), " at flat position ", first, " (",
              bad.sum().item<int64_t>(), " such values)");
}

void check_parents_topological(const at::Tensor& parents) {
  const int64_t nodes = parents.size(1);
  const int64_t* data = parents.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < parents.size(0); ++b) {
    for (int64_t i = 0; i < nodes; ++i) {
      const int64_t p = data[b * nodes + i];
      HIPPO_CHECK(p >= -1 && p < i, "verify_tree_greedy", "parents[", b, ", ", i,
                  "] must lie in [-1, ", i, ") (topological order), got ", p);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> make_outputs(int64_t batch, const at::Tensor& like) {
  auto options = like.options().dtype(at::kLong);
  return {at::empty({batch}, options), at::empty({batch}, options)};
}

// ---- verify_greedy ---------------------------------------------------------------------------

template <typename scalar_t>
void greedy_rows(const at::Tensor& draft_tokens, const at::Tensor& target_logits,
                 const VerifyShape& shape, int64_t* num_accepted, int64_t* next_token) {
  const RowView<scalar_t> logits(target_logits);
  const int64_t* draft = draft_tokens.const_data_ptr<int64_t>();
  at::parallel_for(0, shape.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t accepted = 0;
      while (accepted < shape.draft_len &&
             draft[b * shape.draft_len + accepted] ==
                 row_argmax(logits.row(b, accepted), shape.vocab)) {
        ++accepted;
      }
      num_accepted[b] = accepted;
      next_token[b] = row_argmax(logits.row(b, accepted), shape.vocab);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> verify_greedy_cpu(const at::Tensor& draft_tokens,
                                                     const at::Tensor& target_logits) {
  const VerifyShape shape = check_verify_greedy_inputs(draft_tokens, target_logits);
  check_tokens_in_vocab(draft_tokens, shape.vocab, "verify_greedy", "draft_tokens");
  auto [num_accepted, next_token] = make_outputs(shape.batch, draft_tokens);
  HIPPO_DISPATCH_PROB_TYPES(target_logits.scalar_type(), "verify_greedy", [&] {
    greedy_rows<scalar_t>(draft_tokens, target_logits, shape, num_accepted.data_ptr<int64_t>(),
                          next_token.data_ptr<int64_t>());
  });
  return {num_accepted, next_token};
}

// ---- verify_sampling -------------------------------------------------------------------------

// Inverse CDF over weights w_j >= 0 (w_j = value(j)): the smallest j whose running sum exceeds
// uniform * total. Rounding can leave the threshold at or above the final sum: then the last
// token with positive weight. A row without positive weight gives token 0. Element weights are
// fp32 (as on the GPU); sums are accumulated in double, making this the accurate reference.
template <typename Weight>
int64_t inverse_cdf(int64_t vocab, float uniform, double total, Weight value) {
  const double threshold = static_cast<double>(uniform) * total;
  double running = 0.0;
  int64_t last_positive = -1;
  for (int64_t j = 0; j < vocab; ++j) {
    const float w = value(j);
    if (w > 0.f) {
      running += w;
      last_positive = j;
      if (running > threshold) return j;
    }
  }
  return last_positive >= 0 ? last_positive : 0;
}

template <typename scalar_t>
int64_t sample_emitted_token(const scalar_t* target_row, const scalar_t* draft_row,
                             int64_t vocab, float uniform) {
  auto target = [&](int64_t j) { return static_cast<float>(target_row[j]); };
  double target_total = 0.0;
  for (int64_t j = 0; j < vocab; ++j) target_total += target(j);
  if (draft_row != nullptr) {  // after a rejection: the residual max(0, p - q)
    auto residual = [&](int64_t j) {
      return std::fmax(target(j) - static_cast<float>(draft_row[j]), 0.f);
    };
    double residual_total = 0.0;
    for (int64_t j = 0; j < vocab; ++j) residual_total += residual(j);
    if (residual_has_mass(residual_total, target_total)) {
      return inverse_cdf(vocab, uniform, residual_total, residual);
    }
  }
  return inverse_cdf(vocab, uniform, target_total, target);  // bonus token, or zero residual
}

template <typename scalar_t>
void sampling_rows(const at::Tensor& draft_tokens, const at::Tensor& draft_probs,
                   const at::Tensor& target_probs, const at::Tensor& uniforms,
                   const VerifyShape& shape, int64_t* num_accepted, int64_t* next_token) {
  const RowView<scalar_t> q(draft_probs), p(target_probs);
  const int64_t* draft = draft_tokens.const_data_ptr<int64_t>();
  const float* u = uniforms.const_data_ptr<float>();
  const int64_t g = shape.draft_len;
  at::parallel_for(0, shape.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t accepted = 0;
      for (; accepted < g; ++accepted) {
        const int64_t x = draft[b * g + accepted];
        const float q_x = static_cast<float>(q.row(b, accepted)[x]);
        const float p_x = static_cast<float>(p.row(b, accepted)[x]);
        if (!sampling_accepts(u[b * (g + 1) + accepted], q_x, p_x)) break;
      }
      num_accepted[b] = accepted;
      next_token[b] = sample_emitted_token(p.row(b, accepted),
                                           accepted < g ? q.row(b, accepted) : nullptr,
                                           shape.vocab, u[b * (g + 1) + g]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> verify_sampling_cpu(const at::Tensor& draft_tokens,
                                                       const at::Tensor& draft_probs,
                                                       const at::Tensor& target_probs,
                                                       const at::Tensor& uniforms) {
  const VerifyShape shape =
      check_verify_sampling_inputs(draft_tokens, draft_probs, target_probs, uniforms);
  check_tokens_in_vocab(draft_tokens, shape.vocab, "verify_sampling", "draft_tokens");
  check_uniforms(uniforms);
  check_probabilities(draft_probs, "draft_probs");
  check_probabilities(target_probs, "target_probs");
  auto [num_accepted, next_token] = make_outputs(shape.batch, draft_tokens);
  HIPPO_DISPATCH_PROB_TYPES(target_probs.scalar_type(), "verify_sampling", [&] {
    sampling_rows<scalar_t>(draft_tokens, draft_probs, target_probs, uniforms, shape,
                            num_accepted.data_ptr<int64_t>(), next_token.data_ptr<int64_t>());
  });
  return {num_accepted, next_token};
}

// ---- verify_tree_greedy ----------------------------------------------------------------------

template <typename scalar_t>
void tree_rows(const at::Tensor& tree_tokens, const at::Tensor& parents,
               const at::Tensor& target_logits, const VerifyShape& shape, int64_t* num_accepted,
               int64_t* accepted_nodes, int64_t* next_token) {
  const RowView<scalar_t> logits(target_logits);
  const int64_t n = shape.draft_len;
  at::parallel_for(0, shape.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> row_argmax_cache(n + 1);
    std::vector<int64_t> depth(n);  // 0: not accepted; else the node's depth below the root
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* tokens = tree_tokens.const_data_ptr<int64_t>() + b * n;
      const int64_t* parent = parents.const_data_ptr<int64_t>() + b * n;
      for (int64_t r = 0; r <= n; ++r) row_argmax_cache[r] = row_argmax(logits.row(b, r), shape.vocab);
      int64_t best = -1, best_depth = 0;  // deepest accepted node, lowest index on ties
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = parent[i];
        const bool parent_accepted = p < 0 || depth[p] > 0;
        depth[i] = parent_accepted && tokens[i] == row_argmax_cache[p + 1]
                       ? (p < 0 ? 1 : depth[p] + 1)
                       : 0;
        if (depth[i] > best_depth) {
          best = i;
          best_depth = depth[i];
        }
      }
      int64_t* path = accepted_nodes + b * n;
      std::fill(path, path + n, -1);
      for (int64_t node = best, d = best_depth - 1; d >= 0; node = parent[node], --d) path[d] = node;
      num_accepted[b] = best_depth;
      next_token[b] = row_argmax_cache[best + 1];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_greedy_cpu(
    const at::Tensor& tree_tokens, const at::Tensor& parents, const at::Tensor& target_logits) {
  const VerifyShape shape = check_verify_tree_greedy_inputs(tree_tokens, parents, target_logits);
  check_tokens_in_vocab(tree_tokens, shape.vocab, "verify_tree_greedy", "tree_tokens");
  check_parents_topological(parents);
  auto [num_accepted, next_token] = make_outputs(shape.batch, tree_tokens);
  at::Tensor accepted_nodes = at::empty({shape.batch, shape.draft_len}, tree_tokens.options());
  HIPPO_DISPATCH_PROB_TYPES(target_logits.scalar_type(), "verify_tree_greedy", [&] {
    tree_rows<scalar_t>(tree_tokens, parents, target_logits, shape,
                        num_accepted.data_ptr<int64_t>(), accepted_nodes.data_ptr<int64_t>(),
                        next_token.data_ptr<int64_t>());
  });
  return {num_accepted, accepted_nodes, next_token};
}

}  // namespace
}  // namespace hippo

TORCH_LIBRARY_IMPL(hippo_ext, CPU, m) {
  m.impl("verify_greedy", &hippo::verify_greedy_cpu);
  m.impl("verify_sampling", &hippo::verify_sampling_cpu);
  m.impl("verify_tree_greedy", &hippo::verify_tree_greedy_cpu);
}
