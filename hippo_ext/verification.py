"""Verification of draft tokens against the target model (speculative decoding).

Three ops, each returning static-shape int64 tensors (CUDA-graph capturable, no host sync):

* :func:`verify_greedy` — greedy decoding: the accepted prefix of a draft chain and the target's
  next token (correction on a mismatch, bonus when the whole chain was accepted).
* :func:`verify_sampling` — lossless speculative sampling (accept ``x_i`` while
  ``u_i <= p_i(x_i) / q_i(x_i)``, then sample ``norm(max(0, p - q))``, or ``p`` as the bonus).
* :func:`verify_tree_greedy` — greedy decoding of a draft *tree* given by parent indices.

Logits and probabilities are ``[B, rows, V]`` float32, bfloat16 or float16 with a contiguous last
dimension (outer strides are free, so a slice of a model's output can be passed as is); tokens are
int64. On CUDA, ``check=True`` (the default) validates token and parent *values* first (a host
synchronisation); pass ``check=False`` inside CUDA graphs and in code compiled with
``torch.compile(fullgraph=True)``, which cannot trace the check. Unchecked out-of-range draft
tokens are treated as rejected and unchecked bad parents as non-accepted nodes; kernels never read
outside the tensors. The CPU path always validates.
"""
from __future__ import annotations

import torch

from hippo_ext import _library  # noqa: F401  (registers the schemas before the fakes below)
from hippo_ext._fake import register_fake
from hippo_ext._validation import (check_index_range, check_probabilities, check_unit_interval,
                                   wants_value_check)

__all__ = ["verify_greedy", "verify_sampling", "verify_tree_greedy"]


def _vocab(probs: torch.Tensor) -> int | None:
    """V of a [B, rows, V] tensor; None when the shape is wrong (the op then reports it)."""
    return probs.size(-1) if probs.dim() == 3 else None


def _check_tokens(tokens: torch.Tensor, probs: torch.Tensor, op: str, name: str, check: bool) -> None:
    vocab = _vocab(probs)
    if wants_value_check(tokens, check) and vocab is not None and not tokens.is_floating_point():
        check_index_range(tokens, vocab, op, name)


def verify_greedy(
    draft_tokens: torch.Tensor, target_logits: torch.Tensor, *, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification of ``g`` draft tokens per batch row.

    Args:
        draft_tokens: ``[B, g]`` int64 in ``[0, V)``.
        target_logits: ``[B, g+1, V]``; row ``i`` is the target's prediction before draft token ``i``,
            row ``g`` the one after the last draft token.
        check: on CUDA, validate the token values first (host sync); CPU always validates.

    Returns:
        ``(num_accepted [B], next_token [B])`` int64. Draft token ``i`` is accepted while it equals
        ``argmax(target_logits[b, i])`` and all earlier ones were accepted; ``next_token`` is
        ``argmax(target_logits[b, num_accepted])``. Argmax ties go to the lowest index and NaN counts
        as the largest value, like :func:`torch.argmax`.
    """
    _check_tokens(draft_tokens, target_logits, "verify_greedy", "draft_tokens", check)
    return torch.ops.hippo_ext.verify_greedy(draft_tokens, target_logits)


def verify_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling of ``g`` draft tokens per batch row.

    Args:
        draft_tokens: ``[B, g]`` int64 in ``[0, V)``, drawn from ``draft_probs``.
        draft_probs: ``q``, ``[B, g, V]``; the draft's distributions.
        target_probs: ``p``, ``[B, g+1, V]`` of the same dtype; the target's distributions (row ``g``
            serves the bonus token).
        uniforms: ``[B, g+1]`` float32 in ``[0, 1]``: column ``i < g`` decides acceptance ``i``,
            column ``g`` draws the emitted token.
        check: on CUDA, validate the token, uniform and probability values first (host sync);
            CPU always validates (uniforms outside [0, 1], and probabilities that are negative,
            infinite or NaN, are refused).

    Returns:
        ``(num_accepted [B], next_token [B])`` int64. Token ``x_i`` is accepted while
        ``p_i(x_i) > 0`` and ``u_i * q_i(x_i) <= p_i(x_i)``. At the first rejection ``n`` the emitted
        token is drawn from ``max(0, p_n - q_n)`` (from ``p_n`` if that residual has no mass); when all
        ``g`` are accepted, from ``p_g``. Drawing is by inverse CDF: the smallest token whose running
        sum exceeds ``uniforms[:, g] * total`` (so probabilities need not be normalised). Element values are
        float32 and running sums float64 on both devices, so CPU and CUDA agree except at boundaries
        about 1e-16 wide. A row without positive mass emits token 0.
    """
    _check_tokens(draft_tokens, target_probs, "verify_sampling", "draft_tokens", check)
    if wants_value_check(uniforms, check) and uniforms.is_floating_point():
        check_unit_interval(uniforms, "verify_sampling", "uniforms")
    for name, probs in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        if wants_value_check(probs, check) and probs.is_floating_point():
            check_probabilities(probs, "verify_sampling", name)
    return torch.ops.hippo_ext.verify_sampling(draft_tokens, draft_probs, target_probs, uniforms)


def _check_parents(parents: torch.Tensor) -> None:
    """parents[b, i] must lie in [-1, i) (topological order)."""
    if parents.dtype != torch.int64 or parents.dim() != 2 or parents.numel() == 0:
        return
    position = torch.arange(parents.size(1), device=parents.device)
    if not bool(((parents >= -1) & (parents < position)).all()):
        raise RuntimeError(
            "verify_tree_greedy: parents[b, i] must lie in [-1, i) (topological order)")


def verify_tree_greedy(
    tree_tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor, *, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of a draft tree of ``N`` nodes per batch row.

    Args:
        tree_tokens: ``[B, N]`` int64 in ``[0, V)``: the token of each node.
        parents: ``[B, N]`` or ``[N]`` (shared by the batch) int64; ``parents[b, i]`` in ``[-1, i)``,
            ``-1`` for a child of the root (the last accepted token).
        target_logits: ``[B, N+1, V]``; row 0 is the target's prediction at the root, row ``i+1``
            the prediction after node ``i``.
        check: on CUDA, validate token and parent values first (host sync); CPU always validates.

    Returns:
        ``(num_accepted [B], accepted_nodes [B, N], next_token [B])`` int64. Node ``i`` is accepted
        when its parent is (the root always is) and its token equals the argmax of its parent's row.
        ``accepted_nodes[b, :num_accepted]`` is the root-to-leaf path of the deepest accepted node
        (the lowest node index among equally deep ones), the rest is ``-1``; ``next_token`` is the
        argmax of the row after that node (row 0 when nothing was accepted).
    """
    if (isinstance(parents, torch.Tensor) and isinstance(tree_tokens, torch.Tensor)
            and parents.dim() == 1 and tree_tokens.dim() == 2):
        parents = parents.expand(tree_tokens.size(0), -1).contiguous()
    if wants_value_check(tree_tokens, check):
        _check_tokens(tree_tokens, target_logits, "verify_tree_greedy", "tree_tokens", check)
        _check_parents(parents)
    return torch.ops.hippo_ext.verify_tree_greedy(tree_tokens, parents, target_logits)


# ---- fakes for torch.compile: static int64 outputs -------------------------------------------


@register_fake("verify_greedy", dims={"draft_tokens": 2})
def _verify_greedy_fake(draft_tokens: torch.Tensor, target_logits: torch.Tensor):
    batch = draft_tokens.size(0)
    return draft_tokens.new_empty(batch, dtype=torch.int64), draft_tokens.new_empty(batch, dtype=torch.int64)


@register_fake("verify_sampling", dims={"draft_tokens": 2})
def _verify_sampling_fake(draft_tokens, draft_probs, target_probs, uniforms):
    batch = draft_tokens.size(0)
    return draft_tokens.new_empty(batch, dtype=torch.int64), draft_tokens.new_empty(batch, dtype=torch.int64)


@register_fake("verify_tree_greedy", dims={"tree_tokens": 2})
def _verify_tree_greedy_fake(tree_tokens, parents, target_logits):
    batch, nodes = tree_tokens.shape
    return (
        tree_tokens.new_empty(batch, dtype=torch.int64),
        tree_tokens.new_empty((batch, nodes), dtype=torch.int64),
        tree_tokens.new_empty(batch, dtype=torch.int64),
    )
