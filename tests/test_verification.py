"""Tests of verify_greedy, verify_sampling and verify_tree_greedy.

References: plain Python loops over float64 values (the specification, written independently of the
kernels) and the vectorised eager-PyTorch versions of benchmarks/bench_verification.py. Every test
runs on the CPU and, with a GPU, on CUDA (the `device` fixture); CUDA-only tests compare against
the CPU reference.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from hippo_ext import verify_greedy, verify_sampling, verify_tree_greedy
from hippo_testing import capture_cuda_graph, chi_square, chi_square_critical

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _load_eager_module():
    """The eager equivalents live beside the benchmarks that time them."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_verification.py"
    spec = importlib.util.spec_from_file_location("hippo_bench_verification", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eager = _load_eager_module()


def skip_unless_cuda(device: str) -> None:
    if device != "cuda":
        pytest.skip("compares CUDA against the CPU reference")


# ---- float64 / plain-Python references ---------------------------------------------------------


def predicted_tokens(logits: torch.Tensor) -> list[list[int]]:
    """argmax of every row in float64 (exact for all three dtypes); first index on ties."""
    return logits.double().cpu().argmax(-1).tolist()


def reference_greedy(draft: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    predicted = predicted_tokens(logits)
    num_accepted, next_token = [], []
    for b, row in enumerate(draft.cpu().tolist()):
        n = 0
        while n < len(row) and row[n] == predicted[b][n]:
            n += 1
        num_accepted.append(n)
        next_token.append(predicted[b][n])
    return num_accepted, next_token


def reference_tree(tokens: torch.Tensor, parents: torch.Tensor, logits: torch.Tensor):
    predicted = predicted_tokens(logits)
    nodes = tokens.size(1)
    num_accepted, accepted_nodes, next_token = [], [], []
    for b in range(tokens.size(0)):
        tok, par = tokens[b].tolist(), parents[b].tolist()
        depth = [0] * nodes
        best, best_depth = -1, 0
        for i in range(nodes):
            p = par[i]
            parent_ok = p < 0 or depth[p] > 0
            if parent_ok and tok[i] == predicted[b][p + 1]:
                depth[i] = 1 if p < 0 else depth[p] + 1
            if depth[i] > best_depth:
                best, best_depth = i, depth[i]
        path, node = [], best
        while node >= 0:
            path.append(node)
            node = par[node]
        path.reverse()
        num_accepted.append(best_depth)
        accepted_nodes.append(path + [-1] * (nodes - len(path)))
        next_token.append(predicted[b][best + 1])
    return num_accepted, accepted_nodes, next_token


def inverse_cdf(weights: list[float], uniform: float) -> int:
    """Smallest j whose running sum exceeds uniform * total (float64)."""
    total = math.fsum(weights)
    running = 0.0
    for j, w in enumerate(weights):
        running += w
        if w > 0 and running > uniform * total:
            return j
    return max((j for j, w in enumerate(weights) if w > 0), default=0)


# ---- input builders ------------------------------------------------------------------------------


def greedy_case(accept: list[int], g: int, vocab: int, dtype, gen: torch.Generator):
    """Random logits and draft tokens whose first accept[b] tokens match the target's argmax and
    whose token accept[b] (when < g) does not; later draft tokens are random."""
    batch = len(accept)
    logits = torch.randn(batch, g + 1, vocab, generator=gen).to(dtype)
    predicted = logits.double().argmax(-1)
    draft = torch.randint(0, vocab, (batch, g), generator=gen)
    for b, k in enumerate(accept):
        draft[b, :k] = predicted[b, :k]
        if k < g:
            assert vocab > 1, "a mismatch needs two tokens"
            shift = int(torch.randint(1, vocab, (1,), generator=gen))
            draft[b, k] = (predicted[b, k] + shift) % vocab
    return draft, logits


def acceptance_patterns(g: int, vocab: int, max_elements: int = 5_000_000) -> list[int]:
    """Every k in 0..g (one batch row each) when that fits, else 0, g//2 and g."""
    if vocab == 1:
        return [g, g]  # a single token is always the argmax: nothing can be rejected
    if (g + 1) * (g + 1) * vocab <= max_elements:
        return list(range(g + 1))
    return [0, g // 2, g]


def sampling_case(batch: int, g: int, vocab: int, dtype, gen: torch.Generator):
    """Random, not exactly normalised distributions; draft tokens drawn from q."""
    def dist(rows):
        probs = torch.softmax(2 * torch.randn(batch, rows, vocab, generator=gen, dtype=torch.float64), -1)
        scale = 0.9 + 0.2 * torch.rand(batch, rows, 1, generator=gen, dtype=torch.float64)
        return (probs * scale).to(dtype)

    target, draft_probs = dist(g + 1), dist(g)
    flat = draft_probs.double().reshape(-1, vocab)
    draft = torch.multinomial(flat, 1, generator=gen).reshape(batch, g) if g > 0 else torch.zeros(batch, 0, dtype=torch.long)
    uniforms = torch.rand(batch, g + 1, generator=gen)
    return draft, draft_probs, target, uniforms


def to(device, *tensors):
    return tuple(t.to(device) for t in tensors)


# ---- verify_greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32001])
@pytest.mark.parametrize("g", [1, 3, 64])
def test_verify_greedy_acceptance_patterns(device, gen, dtype, vocab, g):
    accept = acceptance_patterns(g, vocab)
    draft, logits = greedy_case(accept, g, vocab, dtype, gen)
    num_accepted, next_token = verify_greedy(*to(device, draft, logits))
    ref_accepted, ref_next = reference_greedy(draft, logits)
    assert num_accepted.dtype == torch.int64 and next_token.dtype == torch.int64
    assert num_accepted.cpu().tolist() == ref_accepted == accept
    assert next_token.cpu().tolist() == ref_next


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_verify_greedy_ties_go_to_lowest_index(device, gen, dtype):
    # Integer logits in {0, 1, 2}: most rows have several maxima.
    batch, g, vocab = 16, 5, 9
    logits = torch.randint(0, 3, (batch, g + 1, vocab), generator=gen).to(dtype)
    draft = logits[:, :g].double().argmax(-1)
    draft[::2, 2] = (draft[::2, 2] + 1) % vocab  # reject at 2 in even rows
    num_accepted, next_token = verify_greedy(*to(device, draft, logits))
    assert (num_accepted.cpu().tolist(), next_token.cpu().tolist()) == reference_greedy(draft, logits)
    # A row of equal values: token 0 is the argmax.
    flat = torch.zeros(1, 2, 33, dtype=dtype)
    assert verify_greedy(*to(device, torch.tensor([[0]]), flat))[1].item() == 0


def test_verify_greedy_nan_is_the_maximum(device):
    logits = torch.zeros(1, 2, 10)
    logits[0, 0, 7] = 5.0
    logits[0, 0, [3, 6]] = float("nan")
    logits[0, 1, 9] = float("inf")
    draft = torch.tensor([[3]])
    num_accepted, next_token = verify_greedy(*to(device, draft, logits))
    assert logits[0, 0].argmax().item() == 3  # torch's convention, which the op follows
    assert (num_accepted.item(), next_token.item()) == (1, 9)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_verify_greedy_strided_and_unaligned_rows(device, gen, dtype):
    # Rows that start at odd element offsets and batch/row strides that are not the packed ones.
    g, vocab = 4, 1001
    draft, logits = greedy_case([0, 2, 4], g, vocab, dtype, gen)
    padded = torch.zeros(3, g + 3, vocab + 5, dtype=dtype)
    padded[:, 2 : g + 3, 3 : vocab + 3] = logits
    view = padded[:, 2 : g + 3, 3 : vocab + 3]
    assert not view.is_contiguous() and view.stride(2) == 1
    draft_d, view_d = to(device, draft, padded)
    view_d = view_d[:, 2 : g + 3, 3 : vocab + 3]
    num_accepted, next_token = verify_greedy(draft_d, view_d)
    assert (num_accepted.cpu().tolist(), next_token.cpu().tolist()) == reference_greedy(draft, logits)


def test_verify_greedy_matches_eager(device, gen):
    draft, logits = greedy_case([0, 1, 5, 8, 3], 8, 4099, torch.bfloat16, gen)
    draft, logits = to(device, draft, logits)
    for out, ref in zip(verify_greedy(draft, logits), eager.eager_verify_greedy(draft, logits)):
        assert torch.equal(out, ref)


def test_verify_greedy_empty_draft_and_batch(device, gen):
    logits = torch.randn(2, 1, 50, generator=gen)
    num_accepted, next_token = verify_greedy(*to(device, torch.zeros(2, 0, dtype=torch.long), logits))
    assert num_accepted.tolist() == [0, 0] and next_token.cpu().tolist() == logits[:, 0].argmax(-1).tolist()
    num_accepted, next_token = verify_greedy(*to(device, torch.zeros(0, 3, dtype=torch.long), torch.randn(0, 4, 9)))
    assert num_accepted.shape == (0,) and next_token.shape == (0,)


# ---- verify_sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("g", [1, 3, 64])
def test_verify_sampling_matches_reference(device, gen, dtype, vocab, g):
    batch = 12
    draft, draft_probs, target, uniforms = sampling_case(batch, g, vocab, dtype, gen)
    # Force some patterns: row b accepts its first min(b, g) tokens (u = 0; p > 0 after softmax)
    # and, when b < g, rejects token b (p(x) = q(x) / 4 with u = 1/2).
    for b in range(0, batch, 2):
        k = min(b // 2, g)
        uniforms[b, :k] = 0.0
        if k < g:
            x = draft[b, k]
            target[b, k, x] = draft_probs[b, k, x].float() / 4
            uniforms[b, k] = 0.5
    num_accepted, next_token = verify_sampling(*to(device, draft, draft_probs, target, uniforms))
    ref_accepted, ref_next = eager.eager_verify_sampling(draft, draft_probs, target, uniforms, torch.float64)
    assert num_accepted.cpu().tolist() == ref_accepted.tolist()
    assert next_token.cpu().tolist() == ref_next.tolist()
    for b in range(0, batch, 2):
        assert num_accepted[b].item() == min(b // 2, g)


def test_verify_sampling_edge_rules(device):
    q = torch.tensor([[[0.25, 0.25, 0.25, 0.25]], [[0.0, 0.5, 0.5, 0.0]], [[0.25, 0.25, 0.25, 0.25]]])
    p = torch.tensor([
        # p(x) = 0 rejects even with u = 0; the residual is max(0, p - q) = [0.75, 0, 0, 0]
        [[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]],
        # q(x) = 0 < p(x) accepts; then the bonus comes from p_1
        [[0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.0]],
        # p = q / 2 everywhere: rejected (u = 0.9 > 1/2) and the residual has no mass: sample p_0
        [[0.125, 0.125, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]],
    ])
    draft = torch.tensor([[1], [0], [2]])
    uniforms = torch.tensor([[0.0, 0.99], [0.7, 0.3], [0.9, 0.6]])
    num_accepted, next_token = verify_sampling(*to(device, draft, q, p, uniforms))
    assert num_accepted.cpu().tolist() == [0, 1, 0]
    assert next_token.cpu().tolist() == [0, 2, inverse_cdf([0.125] * 4, 0.6)]


def test_verify_sampling_residual_of_huge_unnormalised_probabilities(device):
    """Probabilities need not be normalised: sums beyond float32's range (3e38 x 11) must still
    tell a residual with mass from none, so that a token without residual mass is never drawn."""
    vocab = 11
    p = torch.full((1, 2, vocab), 3e38)
    p[0, 0, 1] = 1e38
    q = torch.zeros(1, 1, vocab)
    q[0, 0, 1] = 3.4e38
    uniforms = torch.tensor([[1.0, 0.11]])
    for scale in (1.0, 1e-38):  # the same distributions, normalisable in float32
        num_accepted, next_token = verify_sampling(
            *to(device, torch.tensor([[1]]), q * scale, p * scale, uniforms))
        assert num_accepted.item() == 0 and next_token.item() == 2  # 1 has no residual mass


# Distributions with entries k/32, exact in every dtype, that differ a lot between p and q.
P_ROWS = [[13, 10, 3, 3, 2, 1], [2, 2, 4, 8, 8, 8], [1, 2, 4, 8, 16, 1]]
Q_ROWS = [[3, 3, 10, 10, 3, 3], [8, 8, 8, 4, 2, 2]]


def _distribution_draws(device, gen, dtype, batch=200_000):
    g, vocab = 2, 6
    p = (torch.tensor(P_ROWS, dtype=torch.float64) / 32).expand(batch, g + 1, vocab).to(dtype)
    q = (torch.tensor(Q_ROWS, dtype=torch.float64) / 32).expand(batch, g, vocab).to(dtype)
    draft = torch.stack([torch.multinomial(q[0, i].double(), batch, replacement=True, generator=gen)
                         for i in range(g)], dim=1)
    uniforms = torch.rand(batch, g + 1, generator=gen)
    num_accepted, next_token = verify_sampling(*to(device, draft, q.contiguous(), p.contiguous(), uniforms))
    return draft, uniforms, num_accepted.cpu(), next_token.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_verify_sampling_is_lossless(device, gen, dtype):
    """The token emitted at each position k (draft token if accepted, else the op's sample) is
    distributed as p_k, for every k the op reaches."""
    draft, _, num_accepted, next_token = _distribution_draws(device, gen, dtype)
    g = draft.size(1)
    critical = chi_square_critical(df=5)
    for k in range(g + 1):
        reached = num_accepted >= k
        token = next_token.clone()
        if k < g:
            token = torch.where(num_accepted > k, draft[:, k], next_token)
        statistic = chi_square(token[reached], torch.tensor(P_ROWS[k], dtype=torch.float64))
        assert statistic < critical, f"position {k}: chi2 {statistic:.1f} >= {critical:.1f}"


def test_verify_sampling_distribution_check_rejects_wrong_residuals(gen):
    """The bound of test_verify_sampling_is_lossless has power: resampling after a rejection from
    q, or from p without max(0, .), fails it at position 0."""
    draft, uniforms, num_accepted, next_token = _distribution_draws("cpu", gen, torch.float32)
    p0, q0 = [w / 32 for w in P_ROWS[0]], [w / 32 for w in Q_ROWS[0]]
    critical = chi_square_critical(df=5)
    expected = torch.tensor(P_ROWS[0], dtype=torch.float64)
    correct = torch.where(num_accepted > 0, draft[:, 0], next_token)
    assert chi_square(correct, expected) < critical
    rejected = num_accepted == 0
    for wrong in (q0, p0):
        cdf = torch.tensor(wrong, dtype=torch.float64).cumsum(0)
        resampled = torch.searchsorted(cdf, uniforms[:, -1].double() * cdf[-1], right=True)
        token = torch.where(rejected, resampled, draft[:, 0])
        assert chi_square(token, expected) > critical


def test_verify_sampling_bonus_and_g0(device, gen):
    # g = 0: nothing to verify, the token comes from p_0.
    p = torch.softmax(torch.randn(5, 1, 30, generator=gen), -1)
    uniforms = torch.rand(5, 1, generator=gen)
    num_accepted, next_token = verify_sampling(*to(device, torch.zeros(5, 0, dtype=torch.long),
                                                   torch.zeros(5, 0, 30), p, uniforms))
    assert num_accepted.tolist() == [0] * 5
    assert next_token.cpu().tolist() == [inverse_cdf(p[b, 0].tolist(), uniforms[b, 0].item()) for b in range(5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_verify_sampling_sparse_rows_of_unlike_alignment(device, gen, dtype):
    """Top-k rows (whole vocabulary chunks of zeros, so the CUDA pick scans chunk sums that are 0)
    at an odd vocabulary, q and p as slices at different element offsets and row strides (CUDA:
    the paired rows' 16-byte alignments differ, so the chunk sums read element by element), and
    uniforms at 0 and at the largest float below 1: the same tokens as contiguous copies on the
    CPU reference."""
    batch, g, vocab = 4, 3, 151937

    def top_k_rows(rows, k):
        logits = 3 * torch.randn(batch, rows, vocab, generator=gen, dtype=torch.float64)
        kth = logits.topk(k, -1).values[..., -1:]
        return torch.softmax(logits.masked_fill(logits < kth, -math.inf), -1).to(dtype)

    target, draft_probs = top_k_rows(g + 1, 40), top_k_rows(g, 40)
    draft_probs[1] = 2 * target[1, :g]  # row 1: rejected (u > 1/2), no residual mass: p is sampled
    draft = torch.multinomial(draft_probs.double().reshape(-1, vocab), 1, generator=gen).reshape(batch, g)
    uniforms = torch.rand(batch, g + 1, generator=gen)
    uniforms[1, 0] = 0.9
    uniforms[2, :] = 0.0
    uniforms[3, -1] = 1.0 - torch.finfo(torch.float32).eps / 2
    ref = verify_sampling(draft, draft_probs, target, uniforms)
    assert ref[0][1] == 0

    q_store = torch.zeros(batch, g + 1, vocab + 9, dtype=dtype)
    p_store = torch.zeros(batch, g + 2, vocab + 4, dtype=dtype)
    q_store[:, 1:, 1:vocab + 1] = draft_probs
    p_store[:, 1:, 3:vocab + 3] = target
    draft_d, uniforms_d, q_store, p_store = to(device, draft, uniforms, q_store, p_store)
    q_view, p_view = q_store[:, 1:, 1:vocab + 1], p_store[:, 1:, 3:vocab + 3]
    assert q_view.stride(2) == 1 and p_view.stride(2) == 1
    out = verify_sampling(draft_d, q_view, p_view, uniforms_d)
    for o, r in zip(out, ref):
        assert o.cpu().tolist() == r.tolist()


# ---- verify_tree_greedy ------------------------------------------------------------------------------


def random_tree(batch: int, nodes: int, vocab: int, dtype, gen: torch.Generator, match: float = 0.7):
    logits = torch.randn(batch, nodes + 1, vocab, generator=gen).to(dtype)
    predicted = logits.double().argmax(-1)
    parents = torch.stack([
        torch.tensor([int(torch.randint(-1, i, (1,), generator=gen)) if i > 0 else -1 for i in range(nodes)],
                     dtype=torch.long)
        for _ in range(batch)
    ]) if nodes > 0 else torch.zeros(batch, 0, dtype=torch.long)
    tokens = predicted.gather(1, parents + 1)
    noise = torch.rand(batch, nodes, generator=gen) > match
    tokens = torch.where(noise, torch.randint(0, vocab, (batch, nodes), generator=gen), tokens)
    return tokens, parents, logits


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("nodes", [1, 5, 40])
def test_verify_tree_greedy_random_trees(device, gen, dtype, vocab, nodes):
    tokens, parents, logits = random_tree(4, nodes, vocab, dtype, gen)
    num_accepted, accepted_nodes, next_token = verify_tree_greedy(*to(device, tokens, parents, logits))
    ref = reference_tree(tokens, parents, logits)
    assert num_accepted.cpu().tolist() == ref[0]
    assert accepted_nodes.cpu().tolist() == ref[1]
    assert next_token.cpu().tolist() == ref[2]
    eager_out = eager.eager_verify_tree_greedy(tokens, parents, logits)
    assert [t.tolist() for t in eager_out] == list(ref)


def test_verify_tree_greedy_chain_equals_greedy(device, gen):
    g = 6
    draft, logits = greedy_case(list(range(g + 1)), g, 500, torch.float16, gen)
    parents = (torch.arange(g) - 1).expand(g + 1, g).contiguous()
    draft, parents, logits = to(device, draft, parents, logits)
    num_accepted, accepted_nodes, next_token = verify_tree_greedy(draft, parents, logits)
    greedy_accepted, greedy_next = verify_greedy(draft, logits)
    assert torch.equal(num_accepted, greedy_accepted) and torch.equal(next_token, greedy_next)
    for b, n in enumerate(num_accepted.tolist()):
        assert accepted_nodes[b].tolist() == list(range(n)) + [-1] * (g - n)


def _one_hot_logits(argmax_per_row: list[int], vocab: int) -> torch.Tensor:
    logits = torch.zeros(1, len(argmax_per_row), vocab)
    for row, token in enumerate(argmax_per_row):
        logits[0, row, token] = 1.0
    return logits


def test_verify_tree_greedy_duplicate_siblings_and_ties(device):
    # Nodes 0 and 1 are both children of the root carrying the root's argmax (2); node 2 hangs off
    # node 0, nodes 3 and 4 off node 1, node 5 off node 3. Rows: 0 root, i+1 after node i.
    parents = torch.tensor([[-1, -1, 0, 1, 1, 3]])
    tokens = torch.tensor([[2, 2, 4, 1, 3, 2]])
    logits = _one_hot_logits([2, 4, 1, 0, 2, 0, 3], vocab=5)
    out = verify_tree_greedy(*to(device, tokens, parents, logits))
    # Deepest: 1 -> 3 -> 5 (node 4 is rejected: row 2 predicts 1, not 3).
    assert [t.cpu().tolist() for t in out] == [[3], [[1, 3, 5, -1, -1, -1]], [3]]
    # Without node 5 two paths reach depth 2: 0 -> 2 and 1 -> 3; the lower node index wins.
    out = verify_tree_greedy(*to(device, tokens[:, :5], parents[:, :5], logits[:, :6]))
    assert [t.cpu().tolist() for t in out] == [[2], [[0, 2, -1, -1, -1]], [0]]
    # Nothing accepted: next token is the root's argmax.
    out = verify_tree_greedy(*to(device, torch.tensor([[3, 4]]), torch.tensor([[-1, 0]]), logits[:, :3]))
    assert [t.cpu().tolist() for t in out] == [[0], [[-1, -1]], [2]]


def test_verify_tree_greedy_shared_parents_and_empty_tree(device, gen):
    tokens, parents, logits = random_tree(3, 8, 11, torch.float32, gen)
    shared = parents[0]
    tokens_d, shared_d, logits_d = to(device, tokens, shared, logits)
    out = verify_tree_greedy(tokens_d, shared_d, logits_d)
    ref = reference_tree(tokens, shared.expand(3, 8), logits)
    assert [t.cpu().tolist() for t in out] == list(ref)
    empty = verify_tree_greedy(*to(device, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                                   logits[:2, :1]))
    assert empty[0].tolist() == [0, 0] and empty[1].shape == (2, 0)
    assert empty[2].cpu().tolist() == logits[:2, 0].argmax(-1).tolist()


# ---- opcheck -----------------------------------------------------------------------------------------


def test_opcheck(device, gen):
    draft, logits = greedy_case([0, 3], 3, 37, torch.float32, gen)
    torch.library.opcheck(torch.ops.hippo_ext.verify_greedy.default, to(device, draft, logits))
    sampling = sampling_case(2, 3, 37, torch.bfloat16, gen)
    torch.library.opcheck(torch.ops.hippo_ext.verify_sampling.default, to(device, *sampling))
    tree = random_tree(2, 5, 37, torch.float16, gen)
    torch.library.opcheck(torch.ops.hippo_ext.verify_tree_greedy.default, to(device, *tree))


# ---- bad input ---------------------------------------------------------------------------------------


def _greedy_ok():
    return torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 4, 10)


@pytest.mark.parametrize("make, match", [
    (lambda d, l: (d.int(), l), "draft_tokens must be Long"),
    (lambda d, l: (d, l.double()), "float32, bfloat16 or float16"),
    (lambda d, l: (d, l[:, :3]), r"g\+1 = 4 rows"),
    (lambda d, l: (d, l[:1]), r"size\(0\) must be 2"),
    (lambda d, l: (d, l[:, 0]), "must have 3 dimensions"),
    (lambda d, l: (d.t().contiguous().t(), l), "draft_tokens must be contiguous"),
    (lambda d, l: (d, l.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous in its last"),
    (lambda d, l: (d + 10, l), r"values must lie in \[0, 10\)"),
    (lambda d, l: (d - 1, l), r"values must lie in \[0, 10\)"),
    (lambda d, l: (d, l[..., :0]), "at least one token"),
])
def test_verify_greedy_bad_input(make, match):
    with pytest.raises(RuntimeError, match=match):
        verify_greedy(*make(*_greedy_ok()))


# Bad values of verify_sampling's inputs: (edit, message, how the C++ op's message goes on; the
# wrapper's host-side check, run for CUDA tensors, stops before that).
_UNIFORMS = r"uniforms values must lie in \[0, 1\]"
_PROBABILITIES = r"_probs must be finite and non-negative \(probabilities\)"
BAD_SAMPLING_VALUES = [
    # A NaN or out-of-range uniform would silently reject every draft.
    (lambda a: a["uniforms"].__setitem__((0, 1), float("nan")), _UNIFORMS, ""),
    (lambda a: a["uniforms"].__setitem__((1, 3), 1.5), _UNIFORMS, ""),
    (lambda a: a["uniforms"].__setitem__((1, 0), -0.25), _UNIFORMS, ""),
    # A NaN q(x) or p(x) would read as a rejection, and negative or infinite mass skew the draw.
    (lambda a: a["draft_probs"].__setitem__((1, 2, 0), float("nan")), "draft" + _PROBABILITIES,
     ", got nan at flat position 50"),
    (lambda a: a["target_probs"].__setitem__((0, 3, 7), -0.5), "target" + _PROBABILITIES,
     r", got -0.5 at flat position 37 \(1 such values\)"),
    (lambda a: a["target_probs"].__setitem__((1, 0), float("inf")), "target" + _PROBABILITIES, ""),
]


def _sampling_ok() -> dict:
    return dict(draft_tokens=torch.zeros(2, 3, dtype=torch.long), draft_probs=torch.rand(2, 3, 10),
                target_probs=torch.rand(2, 4, 10), uniforms=torch.rand(2, 4))


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.update(uniforms=a["uniforms"].double()), "uniforms must be Float"),
    (lambda a: a.update(uniforms=a["uniforms"][:, :3]), r"g\+1 = 4 columns"),
    (lambda a: a.update(draft_probs=a["draft_probs"][..., :9]), "share the vocabulary"),
    (lambda a: a.update(draft_probs=a["draft_probs"].half()), "same dtype"),
    (lambda a: a.update(draft_probs=a["draft_probs"][:, :2]), "g = 3 rows"),
    (lambda a: a.update(target_probs=a["target_probs"][:, :3]), r"g\+1 = 4 rows"),
    (lambda a: a.update(draft_tokens=a["draft_tokens"] + 10), r"values must lie in \[0, 10\)"),
] + [(edit, message + op_goes_on) for edit, message, op_goes_on in BAD_SAMPLING_VALUES])
def test_verify_sampling_bad_input(edit, match):
    args = _sampling_ok()
    edit(args)
    with pytest.raises(RuntimeError, match=match):
        verify_sampling(**args)


def _with_wrapper_checks(monkeypatch):
    """The host-side value checks the wrapper runs for CUDA tensors, run on the CPU too, ahead of
    the C++ op's own (whose messages go on with ", got <value> at flat position ...")."""
    import hippo_ext.verification as module

    monkeypatch.setattr(module, "wants_value_check", lambda tensor, check: check)
    return module


@pytest.mark.parametrize("edit, match", [(edit, message + "$")
                                         for edit, message, _ in BAD_SAMPLING_VALUES])
def test_verify_sampling_wrapper_value_checks(monkeypatch, edit, match):
    """What the CUDA path refuses before its kernel runs (a NaN uniform would reject every draft
    in silence), checked on the CPU."""
    module = _with_wrapper_checks(monkeypatch)
    args = _sampling_ok()
    edit(args)
    with pytest.raises(RuntimeError, match=match):
        module.verify_sampling(**args)


def test_verify_sampling_wrapper_value_checks_pass_the_bounds(monkeypatch):
    """Uniforms of exactly 0 and 1, and probabilities of exactly 0, are valid."""
    module = _with_wrapper_checks(monkeypatch)
    args = _sampling_ok()
    args["uniforms"][0] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    args["draft_probs"][1, :, 4:] = 0.0
    args["target_probs"][0, 2:] = 0.0
    module.verify_sampling(**args)


@pytest.mark.parametrize("parents, tokens, match", [
    ([[-1, 0, 2]], [[0, 0, 0]], r"parents\[0, 2\] must lie in \[-1, 2\)"),
    ([[-1, -2, 0]], [[0, 0, 0]], r"parents\[0, 1\] must lie in \[-1, 1\)"),
    ([[0, -1, 0]], [[0, 0, 0]], r"parents\[0, 0\] must lie in \[-1, 0\)"),
    ([[-1, 0, 1]], [[0, 10, 0]], r"tree_tokens values must lie in \[0, 10\)"),
    ([[-1, 0]], [[0, 0, 0]], r"parents.size\(1\) must be 3"),
])
def test_verify_tree_greedy_bad_input(parents, tokens, match):
    with pytest.raises(RuntimeError, match=match):
        verify_tree_greedy(torch.tensor(tokens), torch.tensor(parents), torch.randn(1, 4, 10))
    with pytest.raises(RuntimeError, match=r"N\+1 = 4 rows"):
        verify_tree_greedy(torch.tensor([[0, 0, 0]]), torch.tensor([[-1, 0, 1]]), torch.randn(1, 3, 10))


def test_verify_tree_greedy_broadcasts_only_1d_parents():
    """[N] parents are shared by the batch; a [1, N] one for B = 2 is refused, not broadcast."""
    with pytest.raises(RuntimeError, match=r"parents.size\(0\) must be 2, got shape \[1, 3\]"):
        verify_tree_greedy(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[-1, 0, 1]]),
                           torch.randn(2, 4, 10))


def test_verify_tree_greedy_refuses_trees_beyond_the_node_limit(device):
    """4095 nodes (the CUDA kernel's shared memory without opting in) run; 4096 are refused
    alike on every device."""
    for nodes, fits in ((4095, True), (4096, False)):
        tokens = torch.zeros(1, nodes, dtype=torch.long, device=device)
        parents = torch.arange(-1, nodes - 1, device=device)[None]  # a chain
        logits = torch.zeros(1, nodes + 1, 3, device=device)
        logits[..., 0] = 1.0  # every node's token is the argmax: the whole chain is accepted
        if fits:
            accepted, _, _ = verify_tree_greedy(tokens, parents, logits)
            assert accepted.item() == nodes
        else:
            with pytest.raises(RuntimeError, match="the tree's nodes, must be at most 4095, got 4096"):
                verify_tree_greedy(tokens, parents, logits)


def test_cuda_tree_at_the_node_limit_matches_cpu(device, gen):
    """kMaxTreeNodes = 4095 nodes: the tree kernel's shared memory (3 ints a node) plus any static
    shared variable must fit 48 KB. ptxas gives a kernel's single static int 16 bytes: with it,
    4095 nodes asked 49144 + 16 > 49152 bytes and the launch failed (invalid argument)."""
    skip_unless_cuda(device)
    tokens, parents, logits = random_tree(2, 4095, 5, torch.bfloat16, gen, match=0.9)
    for out, ref in zip(verify_tree_greedy(*to(device, tokens, parents, logits)),
                        verify_tree_greedy(tokens, parents, logits)):
        assert torch.equal(out.cpu(), ref)


# ---- CUDA against the CPU reference ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [152064, 152063, 32001])
def test_cuda_greedy_and_tree_match_cpu_at_model_vocab(device, gen, dtype, vocab):
    skip_unless_cuda(device)
    g = 8
    draft, logits = greedy_case([0, 3, 8], g, vocab, dtype, gen)
    for out, ref in zip(verify_greedy(*to(device, draft, logits)), verify_greedy(draft, logits)):
        assert torch.equal(out.cpu(), ref)
    tokens, parents, tree_logits = random_tree(3, 16, vocab, dtype, gen)
    for out, ref in zip(verify_tree_greedy(*to(device, tokens, parents, tree_logits)),
                        verify_tree_greedy(tokens, parents, tree_logits)):
        assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("batch, g", [(64, 4), (1, 16), (300, 1)])
def test_cuda_greedy_matches_cpu_many_rows(device, gen, batch, g):
    skip_unless_cuda(device)
    accept = [b % (g + 1) for b in range(batch)]
    draft, logits = greedy_case(accept, g, 32003, torch.bfloat16, gen)
    for out, ref in zip(verify_greedy(*to(device, draft, logits)), verify_greedy(draft, logits)):
        assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch, g, vocab", [(2000, 4, 1000), (8, 8, 152064), (64, 3, 32001), (3, 64, 7)])
def test_cuda_sampling_matches_cpu(device, gen, dtype, batch, g, vocab):
    """Both sum fp32 weights in float64, so tokens agree except at boundaries ~1e-16 wide;
    a mismatch fraction of 1e-3 is allowed for them."""
    skip_unless_cuda(device)
    args = sampling_case(batch, g, vocab, dtype, gen)
    cuda_accepted, cuda_next = verify_sampling(*to(device, *args))
    cpu_accepted, cpu_next = verify_sampling(*args)
    assert torch.equal(cuda_accepted.cpu(), cpu_accepted)
    mismatches = int((cuda_next.cpu() != cpu_next).sum())
    assert mismatches <= 1e-3 * batch


def test_cuda_unchecked_bad_values_stay_in_bounds(device, gen):
    """With check=False, out-of-range tokens count as rejected and bad parents as rejected nodes."""
    skip_unless_cuda(device)
    draft, logits = greedy_case([4, 4], 4, 100, torch.float32, gen)
    draft[0, 2], draft[1, 0] = 10**9, -5
    with pytest.raises(RuntimeError, match="values must lie in"):
        verify_greedy(*to(device, draft, logits))
    num_accepted, next_token = verify_greedy(*to(device, draft, logits), check=False)
    assert num_accepted.cpu().tolist() == [2, 0]
    assert next_token.cpu().tolist() == logits[[0, 1], [2, 0]].argmax(-1).tolist()

    draft, q, p, uniforms = sampling_case(2, 3, 100, torch.float32, gen)
    uniforms[:, :3] = 0.0
    draft[0, 1], draft[1, 0] = 100, -1
    with pytest.raises(RuntimeError, match="values must lie in"):
        verify_sampling(*to(device, draft, q, p, uniforms))
    num_accepted, _ = verify_sampling(*to(device, draft, q, p, uniforms), check=False)
    assert num_accepted.cpu().tolist() == [1, 0]
    bad_uniforms = uniforms.clone()
    bad_uniforms[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="uniforms values must lie in"):
        verify_sampling(*to(device, draft.clamp(0, 99), q, p, bad_uniforms))
    bad_probs = p.clone()
    bad_probs[1, 2, 5] = float("nan")
    with pytest.raises(RuntimeError, match="target_probs must be finite and non-negative"):
        verify_sampling(*to(device, draft.clamp(0, 99), q, bad_probs, uniforms))

    tokens, parents, tree_logits = random_tree(1, 4, 50, torch.float32, gen, match=1.0)
    parents[0] = torch.tensor([-1, 0, 1, 2])
    tokens = tree_logits.argmax(-1).gather(1, parents + 1)  # the full chain would be accepted
    bad = parents.clone()
    bad[0, 2] = 7
    with pytest.raises(RuntimeError, match="parents"):
        verify_tree_greedy(*to(device, tokens, bad, tree_logits))
    num_accepted, accepted_nodes, _ = verify_tree_greedy(*to(device, tokens, bad, tree_logits), check=False)
    assert num_accepted.cpu().tolist() == [2] and accepted_nodes.cpu().tolist() == [[0, 1, -1, -1]]


def test_cuda_device_mismatch(device):
    skip_unless_cuda(device)
    draft, logits = _greedy_ok()
    with pytest.raises(RuntimeError, match="is on"):
        verify_greedy(draft.cuda(), logits)


def test_cuda_graph_capture(device, gen):
    """The ops need no host synchronisation: they capture in a CUDA graph and replay correctly."""
    skip_unless_cuda(device)
    draft, logits = to(device, *greedy_case([0, 2, 3], 3, 5003, torch.bfloat16, gen))
    sampling = to(device, *sampling_case(3, 3, 5003, torch.float32, gen))
    tree = to(device, *random_tree(3, 6, 5003, torch.float16, gen))

    def run():
        return (verify_greedy(draft, logits, check=False), verify_sampling(*sampling, check=False),
                verify_tree_greedy(*tree, check=False))

    expected = run()
    graph, captured = capture_cuda_graph(run)
    logits.copy_(logits.flip(-1))  # new inputs, same buffers
    graph.replay()
    torch.cuda.synchronize()
    for out, ref in zip(captured[0], verify_greedy(draft, logits)):
        assert torch.equal(out, ref)
    for outs, refs in zip(captured[1:], expected[1:]):
        for out, ref in zip(outs, refs):
            assert torch.equal(out, ref)
