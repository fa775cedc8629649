"""Microbenchmarks of the verification ops against their eager-PyTorch equivalents.

On CUDA: the issue's shapes (V = 152064, g in {4, 8, 16}, B = 1, bf16 and fp32). On the CPU: small
shapes, so that the file runs in seconds. The eager functions below are also the vectorised
references of tests/test_verification.py.
"""
from __future__ import annotations

import pytest
import torch

import hippo_ext

# Same rule as hippo_ext's C++ header: a residual below this fraction of p's mass counts as empty.
ZERO_RESIDUAL_RELATIVE_MASS = 1e-6


# ---- eager PyTorch equivalents -----------------------------------------------------------------


def eager_verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor):
    """verify_greedy in eager PyTorch: one argmax over all g+1 rows, then prefix logic."""
    g = draft_tokens.size(1)
    predicted = target_logits.argmax(dim=-1)  # [B, g+1]
    accepted = (predicted[:, :g] == draft_tokens).long().cumprod(dim=1)
    num_accepted = accepted.sum(dim=1)
    next_token = predicted.gather(1, num_accepted[:, None]).squeeze(1)
    return num_accepted, next_token


def eager_verify_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    accumulate: torch.dtype = torch.float32,
):
    """verify_sampling in eager PyTorch. Weights are float32 like the op's; `accumulate` is the
    dtype of the running sums (float64 reproduces the op up to summation order)."""
    batch, g = draft_tokens.shape
    p, q = target_probs.float(), draft_probs.float()
    rows = torch.arange(batch, device=p.device)
    index = draft_tokens[..., None]
    p_x = p[:, :g].gather(2, index).squeeze(2)
    q_x = q.gather(2, index).squeeze(2)
    accepted = (p_x > 0) & (uniforms[:, :g] * q_x <= p_x)
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)

    p_n = p[rows, num_accepted]  # [B, V]: the row sampled from
    rejected = num_accepted < g
    if g > 0:
        q_n = q[rows, num_accepted.clamp(max=g - 1)] * rejected[:, None]
    else:
        q_n = torch.zeros_like(p_n)
    residual = (p_n - q_n).clamp_min(0)
    residual_total = residual.to(accumulate).sum(-1).float()
    target_total = p_n.to(accumulate).sum(-1).float()
    use_residual = residual_total > ZERO_RESIDUAL_RELATIVE_MASS * target_total
    weights = torch.where(use_residual[:, None], residual, p_n).to(accumulate)
    cdf = weights.cumsum(dim=-1)
    threshold = uniforms[:, g:].to(accumulate) * cdf[:, -1:]
    next_token = (cdf <= threshold).sum(dim=-1).clamp(max=p.size(-1) - 1)
    return num_accepted, next_token


def eager_verify_tree_greedy(tree_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor):
    """verify_tree_greedy in eager PyTorch: one argmax, then a vectorised walk over the N nodes."""
    batch, nodes = tree_tokens.shape
    predicted = target_logits.argmax(dim=-1)  # [B, N+1]
    matches = tree_tokens == predicted.gather(1, parents + 1)  # node i vs its parent's row
    depth = torch.zeros(batch, nodes + 1, dtype=torch.long, device=tree_tokens.device)  # col 0: root
    for i in range(nodes):  # topological order
        parent_depth = depth.gather(1, parents[:, i : i + 1] + 1).squeeze(1)
        parent_ok = (parents[:, i] < 0) | (parent_depth > 0)
        depth[:, i + 1] = torch.where(matches[:, i] & parent_ok, parent_depth + 1, 0)
    num_accepted, best = depth[:, 1:].max(dim=1)  # max returns the first (lowest) index on ties
    best = torch.where(num_accepted > 0, best, -1)
    next_token = predicted.gather(1, (best + 1)[:, None]).squeeze(1)
    accepted_nodes = torch.full_like(tree_tokens, -1)
    node = best.clone()
    positions = torch.arange(nodes, device=tree_tokens.device)
    for step in range(nodes):  # walk up from the deepest node, writing positions depth-1 .. 0
        position = num_accepted - 1 - step
        active = position >= 0
        accepted_nodes = torch.where(active[:, None] & (positions == position[:, None]), node[:, None], accepted_nodes)
        node = torch.where(active, parents.gather(1, node.clamp(min=0)[:, None]).squeeze(1), node)
    return num_accepted, accepted_nodes, next_token


# ---- inputs ------------------------------------------------------------------------------------

CUDA_CASES = [(1, g, 152064, dtype) for dtype in (torch.bfloat16, torch.float32) for g in (4, 8, 16)]
CPU_CASES = [(1, 4, 32000, torch.float32), (2, 8, 4001, torch.bfloat16)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = CUDA_CASES if DEVICE == "cuda" else CPU_CASES


def _case_id(case) -> str:
    batch, g, vocab, dtype = case
    return f"B{batch}-g{g}-V{vocab}-{str(dtype).removeprefix('torch.')}"


def _greedy_inputs(batch: int, g: int, vocab: int, dtype: torch.dtype, accept: int):
    """Random logits whose argmax matches the first `accept` draft tokens (so the op does real work)."""
    logits = torch.randn(batch, g + 1, vocab, device=DEVICE).to(dtype)
    draft = logits[:, :g].argmax(-1)
    draft[:, accept:] = (draft[:, accept:] + 1) % vocab
    return draft, logits


def _sampling_inputs(batch: int, g: int, vocab: int, dtype: torch.dtype):
    target = torch.softmax(torch.randn(batch, g + 1, vocab, device=DEVICE), -1).to(dtype)
    draft_probs = torch.softmax(torch.randn(batch, g, vocab, device=DEVICE), -1).to(dtype)
    draft = torch.multinomial(draft_probs.float().reshape(-1, vocab), 1).reshape(batch, g)
    uniforms = torch.rand(batch, g + 1, device=DEVICE)
    return draft, draft_probs, target, uniforms


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


IMPLS = ["hippo", "eager"]


def _pick(impl: str, hippo_fn, eager_fn):
    return hippo_fn if impl == "hippo" else eager_fn


# ---- benchmarks --------------------------------------------------------------------------------
# Both sides are timed inside a CUDA graph (graph=True) as well as per eager call: a runtime that
# captures its steps would capture the eager equivalents too, so "x faster" compares graph with
# graph (and eager call with eager call), never hippo's graph with an eager call.


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_verify_greedy(measure, case, impl):
    batch, g, vocab, dtype = case
    draft, logits = _greedy_inputs(batch, g, vocab, dtype, accept=g // 2)
    fn = _pick(impl, lambda: hippo_ext.verify_greedy(draft, logits, check=False),
               lambda: eager_verify_greedy(draft, logits))
    # Floor: every logit read once (the op must see all g+1 rows).
    measure(fn, DEVICE, bytes_moved=_bytes(logits), op="verify_greedy", impl=impl, graph=True, shape=_case_id(case))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_verify_tree_greedy(measure, case, impl):
    batch, g, vocab, dtype = case
    nodes = g  # a binary-ish tree of g nodes
    logits = torch.randn(batch, nodes + 1, vocab, device=DEVICE).to(dtype)
    parents = ((torch.arange(nodes, device=DEVICE) - 1) // 2).expand(batch, nodes).contiguous()
    predicted = logits.argmax(-1)
    tokens = predicted.gather(1, parents + 1)
    fn = _pick(impl, lambda: hippo_ext.verify_tree_greedy(tokens, parents, logits, check=False),
               lambda: eager_verify_tree_greedy(tokens, parents, logits))
    measure(fn, DEVICE, bytes_moved=_bytes(logits), op="verify_tree_greedy", impl=impl, graph=True, shape=_case_id(case))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_verify_sampling(measure, case, impl):
    batch, g, vocab, dtype = case
    draft, draft_probs, target, uniforms = _sampling_inputs(batch, g, vocab, dtype)
    fn = _pick(impl, lambda: hippo_ext.verify_sampling(draft, draft_probs, target, uniforms, check=False),
               lambda: eager_verify_sampling(draft, draft_probs, target, uniforms))
    # Floor: the op must read the row it samples from in p and q (2 rows); the scattered reads of
    # p(x_i), q(x_i) are negligible.
    row_bytes = vocab * target.element_size()
    measure(fn, DEVICE, bytes_moved=2 * batch * row_bytes, op="verify_sampling", impl=impl, graph=True,
            shape=_case_id(case))
