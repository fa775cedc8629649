// Every schema of hippo_ext, in one place. Implementations register themselves per
// dispatch key from csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fakes (meta kernels for
// torch.compile) are registered from Python in hippo_ext/<family>.py.
//
// Conventions shared by all ops:
//   * outputs have static shapes (a function of input shapes and int arguments only),
//     so every op can be captured in a CUDA graph;
//   * no host synchronisation inside an op; index *values* are validated on the CPU
//     path always and by the Python wrappers on CUDA (opt out with check=False);
//   * randomness comes in as tensors of uniforms.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#ifdef HIPPO_PYTHON_MODULE  // setup.py's build; CMake's library for libtorch needs no Python
#include <Python.h>

// Importing hippo_ext._C loads this library and, with it, the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif

TORCH_LIBRARY(hippo_ext, m) {
  // ---- token selection (semantic-aware token preservation) -------------------------
  // queries [layers, Hq, Lq, D]: post-RoPE queries of the last Lq positions of the prompt.
  // keys    [layers, Hkv, S, D]: post-RoPE cached keys of the whole prompt (GQA: Hq % Hkv == 0);
  //         strided views of the static cache are accepted (last dim contiguous).
  // features [T, Hg, Wg, C]: visual features of the grid tokens, in (t, y, x) order.
  // The visual span is positions [visual_start, visual_start + num_visual) of the prompt;
  // its first T*Hg*Wg tokens are the grid, the rest (e.g. LLaVA-OV's newline) are always kept.
  // Returns kept [num_keep + num_visual - T*Hg*Wg] int64 (span-relative, ascending) and the
  // fused, global, temporal and spatial scores, each [T, Hg, Wg] float32.
  // The three ints are SymInt: traced from tensor sizes (num_visual = T*Hg*Wg + 1 with T
  // dynamic) they stay symbolic under torch.compile / torch.export instead of specialising
  // (one recompile per video length). The kernels take them as int64_t.
  m.def(
      "select_visual_tokens(Tensor queries, Tensor keys, Tensor features, SymInt visual_start, "
      "SymInt num_visual, SymInt num_keep, bool per_frame, float w_global, float w_temporal, "
      "float w_spatial, float scale) -> (Tensor kept, Tensor fused_score, Tensor global_score, "
      "Tensor temporal_score, Tensor spatial_score)");

  // ---- verification ----------------------------------------------------------------------
  // draft_tokens [B, g] int64; target_logits [B, g+1, V] (fp32/bf16/fp16).
  // Returns num_accepted [B] int64 and next_token [B] int64 (correction or bonus).
  m.def(
      "verify_greedy(Tensor draft_tokens, Tensor target_logits) -> (Tensor num_accepted, "
      "Tensor next_token)");
  // draft_probs [B, g, V], target_probs [B, g+1, V], uniforms [B, g+1] float32 in [0, 1]:
  // uniforms[:, i] decides the i-th acceptance, uniforms[:, g] draws the emitted token.
  m.def(
      "verify_sampling(Tensor draft_tokens, Tensor draft_probs, Tensor target_probs, "
      "Tensor uniforms) -> (Tensor num_accepted, Tensor next_token)");
  // tree_tokens [B, N] int64; parents [B, N] int64 with parents[b, i] in [-1, i) (-1: child of
  // the root, i.e. of the last accepted token); target_logits [B, N+1, V]: row 0 is the target's
  // prediction at the root, row i+1 the prediction after node i.
  // Returns num_accepted [B], accepted_nodes [B, N] (root-to-leaf node indices, padded with -1)
  // and next_token [B].
  m.def(
      "verify_tree_greedy(Tensor tree_tokens, Tensor parents, Tensor target_logits) -> "
      "(Tensor num_accepted, Tensor accepted_nodes, Tensor next_token)");

  // ---- KV compaction -----------------------------------------------------------------------
  // src [layers, 2, B, Hkv, S, D]; index [B, K] int64 in [0, S); dst [layers, 2, B, Hkv, S2, D]
  // with S2 >= K: dst[..., b, :, k, :] = src[..., b, :, index[b, k], :] for all layers at once.
  m.def("kv_gather(Tensor src, Tensor index, Tensor(a!) dst) -> ()");
  // In place: cache[..., b, :, k, :] = cache[..., b, :, index[b, k], :], index strictly ascending.
  m.def("kv_compact_(Tensor(a!) cache, Tensor index) -> ()");

  // ---- decode attention ----------------------------------------------------------------------
  // query [B, Lq, Hq, D]; cache [layers, 2, B, Hkv, S_max, D]; length [B] int32/int64 on the
  // cache's device: positions [0, length[b]) are valid and the Lq queries are the last Lq of
  // them. Query i sees [0, length - Lq] + i (causal), or, with tree_mask [Lq, Lq] / [B, Lq, Lq]
  // bool, the prefix [0, length - Lq) plus block position j where tree_mask[i, j].
  // Returns [B, Lq, Hq, D] in the query's dtype. row_invariant: each query row's result is
  // bitwise the same whatever Lq is (a verify step's rows equal single-token steps'); on CUDA
  // that fixes the work split to the verify layout, at some cost to Lq = 1 steps. workspace:
  // int32 [>= B * Hkv] zeros (left zeroed), with which the CUDA kernel may merge its KV splits
  // in the same launch (HIPPO_DECODE_ATTENTION_FUSED_MERGE=1, decode steps); one per stream.
  m.def(
      "decode_attention(Tensor query, Tensor cache, int layer, Tensor length, float scale, "
      "Tensor? tree_mask, bool row_invariant=False, Tensor(a!)? workspace=None) -> Tensor");

  // ---- the rest of a decoder layer: fewer, fatter kernels per step --------------------------
  // RMSNorm with HF's rounding (Qwen2RMSNorm). x [..., H] contiguous, weight [H] of x's dtype.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // The residual add fused in: sum = x + residual (rounded); returns (rms_norm(sum), sum).
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // SwiGLU gating on the fused gate/up projection: x [..., 2I] -> silu(x[..., :I]) * x[..., I:].
  m.def("silu_and_mul(Tensor x) -> Tensor");
  // RoPE on qkv [B, S, (Hq + 2 Hkv) D] with cos/sin [B, S, D]; rotated keys and the values are
  // written to cache[layer] at positions [length - S, length); returns q [B, S, Hq, D].
  m.def(
      "rotary_kv_append(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) cache, int layer, "
      "Tensor length) -> Tensor");
  // cos, sin [B, S, D] for rotary_kv_append from positions [B, S] (or [3, B, S] with
  // mrope_section), inv_freq [D/2] float32 and the attention scaling, in one pass.
  m.def(
      "rotary_tables(Tensor positions, Tensor inv_freq, int[] mrope_section, float scaling, "
      "ScalarType dtype) -> (Tensor, Tensor)");
  // y = x W^T (+ bias) for M <= 32 rows of x [..., K], weight [N, K]; workspace int32
  // [>= ceil(N / 64)] zeros (split-K semaphores, left zeroed). Row results do not depend on M.
  // impl, the CUDA kernel: "auto" (HIPPO_SKINNY_KERNEL), "mma" (tensor cores) or "fma" (M <= 16).
  m.def(
      "skinny_linear(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) workspace, "
      "str impl=\"auto\") -> Tensor");
  // A layer's RMSNorm or SwiGLU gating fused into the GEMM that consumes it (fused_linear.h):
  // (linear(add_rms_norm(x, residual)[0], weight, bias), x + residual), and
  // linear(silu_and_mul(x), weight, bias), with those ops' rounding. On CUDA, up to 16 rows run
  // one kernel (skinny_linear's FMA kernel, rows independent of M); other shapes compose.
  m.def(
      "add_rms_norm_linear(Tensor x, Tensor residual, Tensor norm_weight, float eps, "
      "Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("silu_and_mul_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // A layer's q/k/v stage in one op: (rotary_kv_append(add_rms_norm_linear(x, residual, ...)[0],
  // cos, sin, cache, layer, length), x + residual); x [B, S, hidden]. One kernel on CUDA for up to
  // 16 tokens (the FMA kernel with the norm before and RoPE plus the cache append after).
  m.def(
      "qkv_projection(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight, "
      "Tensor? bias, Tensor cos, Tensor sin, Tensor(a!) cache, int layer, Tensor length) "
      "-> (Tensor, Tensor)");
}

// No op is differentiable (inference only). Without an Autograd kernel, torch's default fallback
// lets outputs require grad and backward *warns* and drops the gradient, except where a CPU
// reference is made of ATen ops, whose own graph then gives a gradient that CUDA does not: one
// function, gradients on the CPU and none on a GPU. This fallback gives every op one behaviour:
// under no_grad or inference_mode nothing changes; with inputs that require grad, the forward
// runs and a backward through any output raises "derivative for hippo_ext::<op> is not
// implemented".
namespace {

constexpr const char* kOpNames[] = {
    "select_visual_tokens", "verify_greedy", "verify_sampling", "verify_tree_greedy",
    "kv_gather", "kv_compact_", "decode_attention", "rms_norm", "add_rms_norm",
    "silu_and_mul", "rotary_kv_append", "rotary_tables", "skinny_linear",
    "add_rms_norm_linear", "silu_and_mul_linear", "qkv_projection"};

// Autocast: every op computes in its inputs' dtypes (which it checks against each other), with
// its own rounding points. Without an Autocast kernel the dispatcher falls through to the
// backend kernel with autocast still on, and the ATen calls inside the CPU references and the
// cuBLAS fallbacks (rotary_tables' fp32 matmul, skinny_linear's and the fused GEMMs' at::linear)
// were cast by the caller's torch.autocast: fp32 RoPE angles computed in bf16 (cos/sin off by up
// to 2), outputs in the autocast dtype where the op (and its fake) promise the input dtype, a
// qkv_projection that refused its own cache. The ops run with autocast off instead.
void without_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                      torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.redispatchBoxed(
      keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::AutocastCPU),
      stack);
}

void register_without_autocast(torch::Library& m) {
  for (const char* name : kOpNames) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(hippo_ext, Autograd, m) {
  for (const char* name : kOpNames) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(hippo_ext, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(hippo_ext, AutocastCUDA, m) { register_without_autocast(m); }
