"""decode_attention against a float64 softmax-attention reference (CPU always, CUDA when present)."""
from __future__ import annotations

import math

import pytest
import torch

import hippo_ext
from hippo_ext import decode_attention, decode_attention_workspace

from hippo_testing import HAS_CUDA, capture_cuda_graph, rel_error, requires_cuda

OP = torch.ops.hippo_ext.decode_attention.default
SIMPLE_KERNEL_ENV = "HIPPO_DECODE_ATTENTION_SIMPLE"  # CUDA: force the plain SIMT kernel
BALANCED_SPLITS_ENV = "HIPPO_DECODE_ATTENTION_BALANCED"  # CUDA: "0" cuts S_max, not the length
WARPS_ENV = "HIPPO_DECODE_ATTENTION_WARPS"  # CUDA: "4" runs 4-warp blocks for 2+ row tiles too
FUSED_MERGE_ENV = "HIPPO_DECODE_ATTENTION_FUSED_MERGE"  # CUDA: "1": the last split block merges
WIDE_ENV = "HIPPO_DECODE_ATTENTION_WIDE_REGISTERS"  # CUDA: "0": the split kernel's narrower bounds
CHUNK_ENV = "HIPPO_DECODE_ATTENTION_CHUNK"  # CUDA: keys per split, forced (a fixed plan)
STAGES_ENV = "HIPPO_DECODE_ATTENTION_STAGES"  # CUDA: "2": head dim 128 with two cp.async stages

# Relative error (norm) allowed per dtype: fp32 is the CPU reference path; bf16/fp16 outputs are
# rounded once and the kernel rounds probabilities to the input dtype before P @ V.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 4e-3}


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# Inputs and reference
# ---------------------------------------------------------------------------------------------

def make_inputs(gen, *, batch, q_len, q_heads, kv_heads, head_dim, lengths, max_seq, layers=2,
                dtype=torch.float32, device="cpu", length_dtype=torch.int64, poison=0.0):
    """Random query and cache; cache positions >= length are filled with `poison` (if nonzero)."""
    query = torch.randn(batch, q_len, q_heads, head_dim, generator=gen)
    cache = torch.randn(layers, 2, batch, kv_heads, max_seq, head_dim, generator=gen)
    if poison != 0.0:
        for b, n in enumerate(lengths):
            cache[:, :, b, :, n:] = poison
    length = torch.tensor(lengths, dtype=length_dtype)
    return query.to(device, dtype), cache.to(device, dtype), length.to(device)


def random_tree_mask(gen, q_len: int) -> torch.Tensor:
    """Ancestor mask (incl. self) of a random tree whose node i has a parent in [-1, i)."""
    mask = torch.zeros(q_len, q_len, dtype=torch.bool)
    for i in range(q_len):
        parent = int(torch.randint(-1, i, (1,), generator=gen)) if i > 0 else -1
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def reference(query, cache, layer, length, scale=None, tree_mask=None) -> torch.Tensor:
    """Float64 softmax attention with the op's visibility rule; rows that see nothing are zero.
    Computed on the inputs' device (float64 on a GPU keeps the long CUDA cases quick)."""
    query, cache = query.double(), cache.double()
    device = query.device
    batch, q_len, q_heads, head_dim = query.shape
    group = q_heads // cache.size(3)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros_like(query)
    for b in range(batch):
        n = int(length[b])
        prefix = n - q_len
        keys = cache[layer, 0, b, :, :n].repeat_interleave(group, dim=0)  # [Hq, n, D]
        values = cache[layer, 1, b, :, :n].repeat_interleave(group, dim=0)
        scores = query[b].transpose(0, 1) @ keys.transpose(1, 2) * scale  # [Hq, Lq, n]
        visible = torch.zeros(q_len, n, dtype=torch.bool, device=device)
        visible[:, :prefix] = True
        if tree_mask is None:
            block = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        else:
            block = (tree_mask if tree_mask.dim() == 2 else tree_mask[b]).to(device)
        visible[:, prefix:] = block
        probs = scores.masked_fill(~visible, -math.inf).softmax(-1).nan_to_num(0.0)
        out[b] = (probs @ values).transpose(0, 1)
    return out


def assert_close_to_reference(out, query, cache, layer, length, scale=None, tree_mask=None):
    ref = reference(query, cache, layer, length, scale, tree_mask)
    assert out.shape == query.shape and out.dtype == query.dtype
    err = rel_error(out, ref)
    assert err < TOLERANCE[query.dtype], f"relative error {err:.3g}"


KERNEL_VARIANTS = {  # the environment each CUDA variant runs under
    "fast": {},  # the defaults: eight-warp blocks for 2+ row tiles, wide register bounds
    "fixed_splits": {BALANCED_SPLITS_ENV: "0"},
    "long_splits": {CHUNK_ENV: "512"},  # 8 tiles per split: the key loop's running maximum moves
    # Beyond the cache (and an int): one split of all of it (it wrapped to a negative chunk).
    "one_split": {CHUNK_ENV: str(2**31)},
    "four_warps": {WARPS_ENV: "4"},
    "narrow_registers": {WIDE_ENV: "0"},
    "two_stages": {STAGES_ENV: "2"},  # head dim 128 as on GPUs of 99 KB of shared memory a block
    "four_warps_narrow_registers": {WARPS_ENV: "4", WIDE_ENV: "0"},  # the defaults until 11-27
    "fused_merge": {FUSED_MERGE_ENV: "1"},  # steps of <= 16 rows per kv head
    "four_warps_fused_merge": {WARPS_ENV: "4", FUSED_MERGE_ENV: "1"},
    "every_other_setting": {WARPS_ENV: "4", WIDE_ENV: "0", FUSED_MERGE_ENV: "1"},
    "simple": {SIMPLE_KERNEL_ENV: "1"},
}


@pytest.fixture(params=list(KERNEL_VARIANTS))
def cuda_kernel(request, monkeypatch):
    """Both CUDA kernels (the tensor-core one and the plain SIMT one), and the tensor-core one
    under the fixed split plan (splits of S_max rather than of the length, as row_invariant
    uses) or with 512-key splits, with four-warp blocks, with narrower register bounds, merging its splits in the last
    split block (the wrapper passes its shared workspace), and with every non-default setting at
    once; no effect on the CPU."""
    if request.param != "fast":
        if "device" in request.fixturenames and request.getfixturevalue("device") == "cpu":
            pytest.skip("the CPU has one kernel and no split plan")
    for env in KERNEL_VARIANTS.values():
        for name in env:
            monkeypatch.delenv(name, raising=False)
    for name, value in KERNEL_VARIANTS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------

# (lengths, Lq, max_seq): every length of the issue, with the query lengths that fit it.
LENGTH_CASES = [
    ([1], 1, 16),
    ([2], 1, 2),
    ([63], 9, 70),
    ([64], 17, 64),
    ([65], 64, 65),
    ([65], 9, 200),
    ([4097], 9, 4100),
    ([4097], 1, 4097),
    ([300], 17, 300),  # length == S_max
    ([9, 200, 77], 9, 256),  # batch rows with different lengths
    ([1, 64, 65], 1, 128),
]


@pytest.mark.parametrize("lengths,q_len,max_seq", LENGTH_CASES)
def test_lengths_and_query_lengths(device, gen, cuda_kernel, lengths, q_len, max_seq):
    heads = (7, 1) if max(lengths) > 1000 else (4, 2)
    for dtype in dtypes_for(device):
        query, cache, length = make_inputs(
            gen, batch=len(lengths), q_len=q_len, q_heads=heads[0], kv_heads=heads[1],
            head_dim=64, lengths=lengths, max_seq=max_seq, dtype=dtype, device=device,
            poison=1e4)
        out = decode_attention(query, cache, 1, length)
        assert_close_to_reference(out, query, cache, 1, length)


@pytest.mark.parametrize("head_dim", [64, 80, 128, 33])
@pytest.mark.parametrize("q_heads,kv_heads", [(3, 3), (4, 2), (14, 2)])
@pytest.mark.parametrize("q_len", [1, 9])
def test_head_dims_and_gqa(device, gen, head_dim, q_heads, kv_heads, q_len):
    if device == "cuda" and head_dim not in (64, 80, 128):
        pytest.skip("CUDA supports head dims 64, 80 and 128")
    lengths = [q_len + 70, q_len + 3]
    for dtype in dtypes_for(device):
        query, cache, length = make_inputs(
            gen, batch=2, q_len=q_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
            lengths=lengths, max_seq=96, dtype=dtype, device=device, length_dtype=torch.int32)
        out = decode_attention(query, cache, 0, length, scale=0.3)
        assert_close_to_reference(out, query, cache, 0, length, scale=0.3)


@pytest.mark.parametrize("q_len", [9, 17, 64])
def test_many_query_rows_per_kv_head(device, gen, cuda_kernel, q_len):
    """G * Lq > 64 rows per kv head (several row groups on CUDA), GQA ratio 7."""
    for dtype in dtypes_for(device):
        query, cache, length = make_inputs(
            gen, batch=1, q_len=q_len, q_heads=7, kv_heads=1, head_dim=128,
            lengths=[q_len + 150], max_seq=256, dtype=dtype, device=device)
        out = decode_attention(query, cache, 1, length)
        assert_close_to_reference(out, query, cache, 1, length)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("q_len", [5, 9, 64])
def test_tree_mask(device, gen, cuda_kernel, per_batch, q_len):
    lengths = [q_len + 40, q_len, q_len + 129]
    if per_batch:
        mask = torch.stack([random_tree_mask(gen, q_len) for _ in lengths])
    else:
        mask = random_tree_mask(gen, q_len)
    for dtype in dtypes_for(device):
        query, cache, length = make_inputs(
            gen, batch=3, q_len=q_len, q_heads=4, kv_heads=2, head_dim=80 if device == "cuda" else 24,
            lengths=lengths, max_seq=200, dtype=dtype, device=device, poison=1e4)
        out = decode_attention(query, cache, 1, length, tree_mask=mask.to(device))
        assert_close_to_reference(out, query, cache, 1, length, tree_mask=mask)


def test_tree_mask_can_hide_everything(device, gen):
    """A mask row of zeros with no prefix (length == Lq) sees nothing: zeros, not NaN."""
    q_len = 5
    mask = random_tree_mask(gen, q_len)
    mask[2] = False
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=1, q_len=q_len, q_heads=2, kv_heads=1, head_dim=64, lengths=[q_len],
        max_seq=8, dtype=dtype, device=device)
    out = decode_attention(query, cache, 0, length, tree_mask=mask.to(device))
    assert torch.isfinite(out).all()
    assert (out[0, 2] == 0).all()
    assert_close_to_reference(out, query, cache, 0, length, tree_mask=mask)


def test_tree_mask_differs_from_causal(device, gen):
    """The mask replaces the causal rule (guards against a kernel that ignores it)."""
    q_len = 9
    mask = torch.ones(q_len, q_len, dtype=torch.bool)  # every block token sees every other
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=1, q_len=q_len, q_heads=2, kv_heads=1, head_dim=64, lengths=[q_len + 3],
        max_seq=16, dtype=dtype, device=device)
    causal = decode_attention(query, cache, 0, length)
    full = decode_attention(query, cache, 0, length, tree_mask=mask.to(device))
    assert rel_error(full, causal) > 1e-2
    assert_close_to_reference(full, query, cache, 0, length, tree_mask=mask)


def score_profile(profile: str, length: int) -> torch.Tensor:
    """Natural-log score (before softmax) of each position, centred on 0:
    * "rising" climbs 0.1 per key: 9.2 in log2 per 64-key tile, past the CUDA kernel's
      rescale slack of 8 at every tile;
    * "creeping" climbs half as fast, so the maximum moves every other tile and the weights in
      between exceed 1;
    * "falling" mirrors "rising": the maximum comes first;
    * "spike" is flat but for one key 30 above the rest, late in the sequence."""
    positions = torch.arange(length, dtype=torch.float64) - length / 2
    if profile == "rising":
        return 0.1 * positions
    if profile == "creeping":
        return 0.05 * positions
    if profile == "falling":
        return -0.1 * positions
    spike = torch.zeros(length, dtype=torch.float64)
    spike[int(0.7 * length)] = 30.0
    return spike


@pytest.mark.parametrize("profile", ["rising", "creeping", "falling", "spike"])
@pytest.mark.parametrize("q_len", [1, 9])
def test_scores_whose_maximum_moves_far(device, gen, cuda_kernel, profile, q_len):
    """Scores that climb far across the sequence, creep up, fall, or jump late: the online
    softmax must move its running maximum (the CUDA kernel does so lazily, only past a slack,
    within a split; the merge does so across splits) and still give the float64 softmax.
    Every query of a kv head looks along one direction u; key j lies score(j) along u, with
    small noise across it (the "long_splits" kernel variant holds 8 tiles per split)."""
    q_heads, kv_heads, head_dim, length = 4, 2, 64, 600
    scale = 1.0 / math.sqrt(head_dim)
    direction = torch.ones(head_dim, dtype=torch.float64) / math.sqrt(head_dim)
    query = (direction / scale).expand(1, q_len, q_heads, head_dim).clone()  # q . u = 1 / scale
    cache = 0.05 * torch.randn(1, 2, 1, kv_heads, length, head_dim, generator=gen,
                               dtype=torch.float64)
    cache[0, 0, 0] += score_profile(profile, length)[:, None] * direction  # q . k_j * scale
    cache[0, 1, 0] = torch.randn(kv_heads, length, head_dim, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([length], device=device)
    for dtype in dtypes_for(device):
        q, kv = query.to(device, dtype), cache.to(device, dtype)
        out = decode_attention(q, kv, 0, lengths)
        assert torch.isfinite(out).all()
        assert_close_to_reference(out, q, kv, 0, lengths)


@pytest.mark.parametrize("q_len", [1, 9])  # one token per row: the fused merge's steps too
def test_a_nan_query_gives_nan_as_sdpa_does(device, gen, cuda_kernel, q_len):
    """A NaN in one (token, head) query spoils that output row only, and visibly: no zeros."""
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=2, q_len=q_len, q_heads=4, kv_heads=2, head_dim=64, lengths=[20, 130],
        max_seq=256, dtype=dtype, device=device)
    token = q_len // 2
    query[1, token, 2, 5] = float("nan")
    out = decode_attention(query, cache, 0, length)
    assert out[1, token, 2].isnan().all()
    spoiled = torch.zeros(out.shape[:3], dtype=torch.bool, device=device)
    spoiled[1, token, 2] = True
    assert torch.isfinite(out[~spoiled]).all()
    expected = reference(query.nan_to_num(0.0), cache, 0, length)
    assert rel_error(out[~spoiled], expected[~spoiled]) < TOLERANCE[dtype]


def test_a_nan_key_spoils_the_rows_that_see_it(device, gen, cuda_kernel):
    """Every query row of the kv head whose visible key is NaN: NaN; the other head: finite."""
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=1, q_len=3, q_heads=4, kv_heads=2, head_dim=64, lengths=[100],
        max_seq=128, dtype=dtype, device=device)
    cache[0, 0, 0, 1, 40, 7] = float("nan")  # position 40: before the query block
    out = decode_attention(query, cache, 0, length)
    assert out[0, :, 2:].isnan().all()  # q heads 2, 3 read kv head 1
    assert torch.isfinite(out[0, :, :2]).all()


def test_a_key_scoring_minus_inf_weighs_nothing(device, gen, cuda_kernel):
    """A visible key whose score is -inf (an infinite key element against positive query
    elements) gets weight 0, as on the CPU and in the reference, also as the first key of a
    split: the plain SIMT kernel's online softmax took exp2(-inf - -inf) = NaN there."""
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=1, q_len=3, q_heads=4, kv_heads=2, head_dim=64, lengths=[100],
        max_seq=128, dtype=dtype, device=device)
    query[..., 0] = query[..., 0].abs() + 0.5
    cache[0, 0, 0, :, 0, 0] = -math.inf  # key 0 of both kv heads: the first key of split 0
    out = decode_attention(query, cache, 0, length)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, query, cache, 0, length)


@pytest.mark.parametrize("poison", [1e4, float("nan")])
def test_garbage_beyond_length_is_ignored(device, gen, cuda_kernel, poison):
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=3, q_len=9, q_heads=4, kv_heads=2, head_dim=64, lengths=[9, 70, 130],
        max_seq=256, dtype=dtype, device=device, poison=poison)
    out = decode_attention(query, cache, 0, length)
    assert torch.isfinite(out).all()
    clean = cache.nan_to_num(0.0)
    assert_close_to_reference(out, query, clean, 0, length)


def test_length_dtypes_agree(device, gen):
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=2, q_len=1, q_heads=2, kv_heads=2, head_dim=64, lengths=[33, 7],
        max_seq=40, dtype=dtype, device=device)
    out64 = decode_attention(query, cache, 1, length.long())
    out32 = decode_attention(query, cache, 1, length.int())
    torch.testing.assert_close(out32, out64, rtol=0, atol=0)


def test_empty_batch(device, gen):
    """B = 0: an empty result, not a launch of zero blocks (nor a division by zero planning one)."""
    dtype = dtypes_for(device)[0]
    for head_dim in (64, 128):
        query, cache, length = make_inputs(
            gen, batch=0, q_len=1, q_heads=4, kv_heads=2, head_dim=head_dim, lengths=[],
            max_seq=16, dtype=dtype, device=device)
        out = decode_attention(query, cache, 0, length)
        assert out.shape == query.shape and out.dtype == dtype
        assert OP(query, cache, 0, length, 1.0, None, False, None).shape == query.shape


def test_non_contiguous_query(device, gen):
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=2, q_len=3, q_heads=4, kv_heads=2, head_dim=64, lengths=[10, 3],
        max_seq=16, dtype=dtype, device=device)
    strided = query.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert_close_to_reference(decode_attention(strided, cache, 0, length), query, cache, 0, length)


# ---------------------------------------------------------------------------------------------
# CUDA only: realistic sizes (many splits), CPU agreement, graph capture, unchecked lengths
# ---------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "q_heads,kv_heads,head_dim,lengths,max_seq,q_len",
    [(28, 4, 128, [12600], 16384, 9), (28, 4, 128, [12600, 5000], 16384, 1),
     (14, 2, 64, [1300], 16384, 1), (28, 4, 128, [6400], 8192, 9), (16, 16, 80, [4097, 2], 4200, 2)])
def test_cuda_model_shapes(gen, cuda_kernel, dtype, q_heads, kv_heads, head_dim, lengths, max_seq,
                           q_len):
    query, cache, length = make_inputs(
        gen, batch=len(lengths), q_len=q_len, q_heads=q_heads, kv_heads=kv_heads,
        head_dim=head_dim, lengths=lengths, max_seq=max_seq, layers=1, dtype=dtype,
        device="cuda", poison=1e4)
    out = decode_attention(query, cache, 0, length)
    assert_close_to_reference(out, query, cache, 0, length)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["fast", "four_warps", "fused_merge", "four_warps_fused_merge",
                                     "narrow_registers", "every_other_setting"])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,length,max_seq,q_len", [
    (28, 4, 128, 12600, 16384, 9), (14, 2, 64, 1300, 2048, 17), (16, 16, 80, 700, 1024, 5),
    (28, 4, 128, 70, 128, 64)])
def test_cuda_row_invariant_rows_equal_single_steps(gen, monkeypatch, variant, q_heads,
                                                    kv_heads, head_dim, length, max_seq, q_len):
    """row_invariant=True: query row i of an Lq-token block equals, bit for bit, the same query
    run alone as the newest token at length - Lq + i + 1 (what a decode step computes), with
    four- and eight-warp blocks, and with the single steps merged in their last split block."""
    for name, value in KERNEL_VARIANTS[variant].items():
        monkeypatch.setenv(name, value)
    query, cache, lengths = make_inputs(
        gen, batch=1, q_len=q_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
        lengths=[length], max_seq=max_seq, layers=1, dtype=torch.bfloat16, device="cuda")
    block = decode_attention(query, cache, 0, lengths, row_invariant=True)
    assert_close_to_reference(block, query, cache, 0, lengths)
    for i in range(q_len):
        alone = decode_attention(query[:, i:i + 1].contiguous(), cache, 0,
                                 lengths - q_len + i + 1, row_invariant=True)
        assert torch.equal(alone[:, 0], block[:, i]), f"row {i} differs"


@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu(gen):
    mask = random_tree_mask(gen, 9)
    query, cache, length = make_inputs(
        gen, batch=2, q_len=9, q_heads=14, kv_heads=2, head_dim=128, lengths=[500, 9],
        max_seq=512, dtype=torch.bfloat16)
    for tree in (None, mask):
        on_cpu = decode_attention(query, cache, 1, length, tree_mask=tree)
        on_cuda = decode_attention(query.cuda(), cache.cuda(), 1, length.cuda(),
                                   tree_mask=None if tree is None else tree.cuda())
        assert rel_error(on_cuda, on_cpu) < TOLERANCE[torch.bfloat16]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("q_len", [1, 9])
def test_cuda_graph_replay_follows_length(gen, cuda_kernel, q_len):
    """One captured graph serves every length: change the length tensor between replays."""
    query, cache, length = make_inputs(
        gen, batch=2, q_len=q_len, q_heads=28, kv_heads=4, head_dim=128, lengths=[3000, 40],
        max_seq=4096, layers=1, dtype=torch.bfloat16, device="cuda")
    graph, out = capture_cuda_graph(lambda: decode_attention(query, cache, 0, length, check=False))
    for lengths in ([3000, 40], [q_len, 4096], [1234, 777]):
        length.copy_(torch.tensor(lengths))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(out.clone(), query, cache, 0, length)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("warps", ["4", "8"])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,q_len", [
    (28, 4, 128, 9), (28, 4, 128, 1), (14, 2, 64, 17), (16, 16, 80, 5)])
def test_cuda_wide_registers_change_no_bit(gen, monkeypatch, warps, q_heads, kv_heads, head_dim,
                                           q_len):
    """The wide-register kernel (the default) is the same code as the narrow one under other
    launch bounds: equal bits."""
    monkeypatch.setenv(WARPS_ENV, warps)
    query, cache, length = make_inputs(
        gen, batch=2, q_len=q_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
        lengths=[3000, 70], max_seq=4096, layers=1, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv(WIDE_ENV, "0")
    narrow = decode_attention(query, cache, 0, length)
    monkeypatch.setenv(WIDE_ENV, "1")
    assert torch.equal(decode_attention(query, cache, 0, length), narrow)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["fast", "four_warps", "fused_merge"])
@pytest.mark.parametrize("q_heads,kv_heads,q_len,lengths", [
    (28, 4, 9, [12600, 70]), (28, 4, 1, [12600, 70]), (16, 4, 5, [3000, 64]), (8, 8, 64, [65, 64])])
def test_cuda_two_stages_change_no_bit(gen, monkeypatch, variant, q_heads, kv_heads, q_len,
                                       lengths):
    """Head dim 128 with two cp.async stages (what GPUs with 99 KB of shared memory a block run)
    computes what three stages do, bit for bit: the pipeline's depth changes when tiles arrive,
    never the arithmetic. Row tiles 1, 2 and 4; splits shorter than the pipeline."""
    for name, value in KERNEL_VARIANTS[variant].items():
        monkeypatch.setenv(name, value)
    query, cache, length = make_inputs(
        gen, batch=2, q_len=q_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=128,
        lengths=lengths, max_seq=16384, layers=1, dtype=torch.bfloat16, device="cuda")
    three = decode_attention(query, cache, 0, length)
    monkeypatch.setenv(STAGES_ENV, "2")
    assert torch.equal(decode_attention(query, cache, 0, length), three)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("q_len", [1, 2])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(28, 4, 128), (14, 2, 64), (16, 1, 80)])
def test_cuda_fused_merge_leaves_workspace_zeroed(gen, monkeypatch, q_heads, kv_heads, head_dim,
                                                  q_len):
    """The fused merge's semaphores are zero again after every call, so back-to-back calls
    (layers of one step, graph replays) keep merging the right splits, with the merge
    kernel's bits. Its rows go in passes of 8: 7 rows per kv head take one, 14 and 16 two (32
    rows take the merge kernel). (Length
    0, where no split is active, is in test_cuda_unchecked_bad_lengths_stay_in_bounds.)"""
    monkeypatch.setenv(FUSED_MERGE_ENV, "1")
    query, cache, length = make_inputs(
        gen, batch=2, q_len=q_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
        lengths=[5000, q_len], max_seq=8192, layers=2, dtype=torch.bfloat16, device="cuda")
    workspace = decode_attention_workspace(2, kv_heads, "cuda")
    for lengths in ([5000, 1], [8192, 3000], [1, 64], [700, 8191]):
        length.copy_(torch.tensor(lengths).clamp_min(q_len))
        for layer in (0, 1):
            out = decode_attention(query, cache, layer, length, workspace=workspace, check=False)
            torch.cuda.synchronize()
            assert not workspace.any(), f"semaphores left at {workspace.tolist()}"
            assert_close_to_reference(out, query, cache, layer, length)
            # The merge kernel's order of arithmetic, in every pass: the same bits.
            monkeypatch.setenv(FUSED_MERGE_ENV, "0")
            merged_apart = decode_attention(query, cache, layer, length, workspace=workspace,
                                            check=False)
            monkeypatch.setenv(FUSED_MERGE_ENV, "1")
            assert torch.equal(out, merged_apart)


@requires_cuda
@pytest.mark.cuda
def test_cuda_unchecked_bad_lengths_stay_in_bounds(gen, cuda_kernel):
    """check=False with lengths outside [Lq, S_max]: clamped, finite, no fault."""
    query, cache, length = make_inputs(
        gen, batch=3, q_len=4, q_heads=4, kv_heads=2, head_dim=64, lengths=[2, 2, 2],
        max_seq=32, dtype=torch.bfloat16, device="cuda")
    length.copy_(torch.tensor([-5, 10**6, 2]))
    out = decode_attention(query, cache, 0, length, check=False)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()  # nothing visible
    # length 10**6 behaves like S_max (same shapes, so the same split of the work)
    valid = torch.tensor([4, 32, 4], device="cuda")
    same = decode_attention(query, cache, 0, valid)
    torch.testing.assert_close(out[1], same[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# opcheck and bad inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_workspace", [False, True])
def test_opcheck(device, gen, with_mask, with_workspace):
    dtype = dtypes_for(device)[0]
    query, cache, length = make_inputs(
        gen, batch=2, q_len=3, q_heads=4, kv_heads=2, head_dim=64, lengths=[5, 3], max_seq=8,
        dtype=dtype, device=device)
    mask = random_tree_mask(gen, 3).to(device) if with_mask else None
    workspace = decode_attention_workspace(2, 2, device) if with_workspace else None
    torch.library.opcheck(OP, (query, cache, 1, length, 0.125, mask, False, workspace))


def _good(device):
    dtype = dtypes_for(device)[0]
    gen = torch.Generator().manual_seed(0)
    query, cache, length = make_inputs(
        gen, batch=2, q_len=3, q_heads=4, kv_heads=2, head_dim=64, lengths=[5, 3], max_seq=8,
        dtype=dtype, device=device)
    return dict(query=query, cache=cache, layer=1, length=length)


def _call(args):
    args = dict(args)
    return decode_attention(args.pop("query"), args.pop("cache"), args.pop("layer"),
                            args.pop("length"), **args)


BAD_INPUTS = {
    "query_longer_than_length": (lambda a: {**a, "length": a["length"].clone().fill_(2)},
                                 "length"),
    "length_beyond_cache": (lambda a: {**a, "length": a["length"].clone().fill_(9)}, "length"),
    "int_cache": (lambda a: {**a, "cache": a["cache"].long()}, "cache"),
    "float_length": (lambda a: {**a, "length": a["length"].float()}, "length"),
    "length_non_contiguous": (lambda a: {**a, "length": a["length"].repeat_interleave(2)[::2]},
                              "length must be contiguous"),
    "dtype_mismatch": (lambda a: {**a, "query": a["query"].double()}, "dtype|float"),
    "non_contiguous_cache": (lambda a: {**a, "cache": a["cache"].transpose(4, 5)}, "contiguous"),
    "cache_wrong_dims": (lambda a: {**a, "cache": a["cache"][0]}, "cache"),
    "cache_3d": (lambda a: {**a, "cache": a["cache"][0, 0, 0]}, "cache must have 6 dimensions"),
    "query_wrong_dims": (lambda a: {**a, "query": a["query"][0]}, "query"),
    "heads_not_multiple": (lambda a: {**a, "query": a["query"][:, :, :3]}, "multiple"),
    "head_dim_mismatch": (lambda a: {**a, "query": a["query"][..., :32]}, "head dim"),
    "layer_out_of_range": (lambda a: {**a, "layer": 2}, "layer"),
    "negative_layer": (lambda a: {**a, "layer": -1}, "layer"),
    "batch_mismatch": (lambda a: {**a, "query": a["query"][:1]}, "batch"),
    "length_batch_mismatch": (lambda a: {**a, "length": a["length"][:1]}, "length"),
    "too_many_queries": (lambda a: {**a, "query": a["query"].new_zeros(2, 65, 4, 64)},
                         "query|length"),
    "mask_wrong_shape": (lambda a: {**a, "tree_mask": a["length"].new_ones(3, 4, dtype=torch.bool)},
                         "tree_mask"),
    "mask_wrong_batch": (lambda a: {**a, "tree_mask": a["length"].new_ones(3, 3, 3,
                                                                           dtype=torch.bool)},
                         "tree_mask"),
    "mask_wrong_dtype": (lambda a: {**a, "tree_mask": a["length"].new_ones(3, 3)}, "tree_mask"),
    "workspace_wrong_dtype": (lambda a: {**a, "workspace": a["length"].new_zeros(4)}, "workspace"),
    "workspace_too_small": (lambda a: {**a, "workspace": a["length"].new_zeros(
        3, dtype=torch.int32)}, "workspace needs at least"),
    "workspace_non_contiguous": (lambda a: {**a, "workspace": a["length"].new_zeros(
        8, dtype=torch.int32)[::2]}, "contiguous"),
    "workspace_2d": (lambda a: {**a, "workspace": a["length"].new_zeros(
        2, 4, dtype=torch.int32)}, "workspace must have 1 dimensions"),
    # The kernels scale in float32: NaN would be dropped by the running max, 1e39 is inf there.
    "nan_scale": (lambda a: {**a, "scale": float("nan")}, "scale must be finite"),
    "scale_beyond_float32": (lambda a: {**a, "scale": 1e39}, "scale must be finite"),
    # finite as a float32, but not once the kernels fold log2(e) in (they gave NaN rows)
    "scale_times_log2e_beyond_float32": (lambda a: {**a, "scale": -3e38},
                                         "scale times log2\\(e\\) must be finite"),
    "empty_head_dim": (lambda a: {**a, "query": a["query"][..., :0], "cache": a["cache"][..., :0]},
                       "empty head dim or cache"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(device, case):
    make_bad, match = BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=match):
        _call(make_bad(_good(device)))


@pytest.mark.parametrize("layer", [1.7, True, "1"])
def test_layer_must_be_an_integer(device, layer):
    # Not truncated to 1 or read as 1: the wrong layer would be a silent wrong answer.
    with pytest.raises(TypeError, match=f"decode_attention: layer must be an integer, got .*{layer!r}"):
        _call({**_good(device), "layer": layer})


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["query", "length", "tree_mask"])
def test_device_mix(moved):
    args = _good("cuda")
    args["tree_mask"] = torch.ones(3, 3, dtype=torch.bool, device="cuda")
    args[moved] = args[moved].cpu()
    with pytest.raises(RuntimeError, match="device|is on"):
        _call(args)


@requires_cuda
@pytest.mark.cuda
def test_cuda_unsupported_dtype_and_head_dim():
    args = _good("cuda")
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        _call({**args, "query": args["query"].float(), "cache": args["cache"].float()})
    with pytest.raises(RuntimeError, match="head dim"):
        _call({**args, "query": args["query"][..., :32].contiguous(),
               "cache": args["cache"][..., :32].contiguous()})


def test_cpu_checks_lengths_even_without_wrapper_check():
    args = _good("cpu")
    with pytest.raises(RuntimeError, match="length"):
        _call({**args, "length": args["length"].clone().fill_(9), "check": False})


def _with_wrapper_checks(monkeypatch):
    """The host-side checks the wrapper runs for CUDA tensors, run on the CPU too (where the C++
    op would otherwise check first, with its own message)."""
    import hippo_ext.attention as module

    monkeypatch.setattr(module, "wants_value_check", lambda tensor, check: check)


@pytest.mark.parametrize("lengths", [[5, 2], [9, 3]])  # below Lq = 3, beyond S_max = 8
def test_wrapper_length_check(monkeypatch, lengths):
    _with_wrapper_checks(monkeypatch)
    args = _good("cpu")
    with pytest.raises(RuntimeError, match=r"length values must lie in \[3, 9\), got min"):
        _call({**args, "length": torch.tensor(lengths)})
    with pytest.raises(RuntimeError, match=r"must lie in \[Lq, S_max\]"):  # check=False: the op's
        _call({**args, "length": torch.tensor(lengths), "check": False})
    _call({**args, "length": torch.tensor([8, 3])})  # the bounds Lq and S_max pass


def test_wrapper_length_check_of_one_row_and_of_none(monkeypatch, gen):
    """Batch 1, HIPPO's decoding, is checked like any other; B = 0 has nothing to check (no min()
    of an empty tensor)."""
    _with_wrapper_checks(monkeypatch)
    args = _good("cpu")
    one = {**args, "query": args["query"][:1], "cache": args["cache"][:, :, :1].contiguous()}
    with pytest.raises(RuntimeError, match=r"length values must lie in \[3, 9\), got min 9 and max 9"):
        _call({**one, "length": torch.tensor([9])})
    _call({**one, "length": torch.tensor([8])})
    query, cache, length = make_inputs(gen, batch=0, q_len=1, q_heads=4, kv_heads=2, head_dim=64,
                                       lengths=[], max_seq=16, dtype=torch.float32, device="cpu")
    assert decode_attention(query, cache, 0, length).shape == query.shape


# Bad shapes with out-of-range lengths too: the op's own message, not the length check's, which
# would read its bounds from the wrong dimensions.
@pytest.mark.parametrize("make_bad, message", [
    (lambda a: {**a, "query": a["query"][0]}, "query must have 4 dimensions"),
    (lambda a: {**a, "cache": a["cache"][0, 0]}, "cache must have 6 dimensions"),
    (lambda a: {**a, "length": a["length"].float()}, "length must be int32 or int64"),
])
def test_wrapper_length_check_leaves_bad_shapes_to_the_op(monkeypatch, make_bad, message):
    _with_wrapper_checks(monkeypatch)
    with pytest.raises(RuntimeError, match=message):
        _call(make_bad({**_good("cpu"), "length": torch.tensor([5, 2])}))


def test_workspace_size():
    """decode_attention_workspace: int32 zeros, one per (batch row, kv head), never empty."""
    for batch, kv_heads, numel in [(2, 3, 6), (0, 3, 1)]:
        workspace = decode_attention_workspace(batch, kv_heads, "cpu")
        assert workspace.shape == (numel,) and workspace.dtype == torch.int32
        assert not workspace.any()
    args = _good("cpu")  # B = 2, Hkv = 2: exactly enough
    torch.testing.assert_close(_call({**args, "workspace": decode_attention_workspace(2, 2, "cpu")}),
                               _call(args), rtol=0, atol=0)


@pytest.mark.parametrize("batch, kv_heads", [(65, 64), (64, 65)])
def test_shared_workspace_grows_past_its_first_size(monkeypatch, batch, kv_heads):
    """Without a workspace argument the wrapper's shared one is sized for B * Hkv semaphores,
    also beyond the 4096 it starts with (4160 here, more than B * B or Hkv * Hkv)."""
    import hippo_ext._workspace as workspaces

    monkeypatch.setattr(workspaces, "_SHARED", {})  # this test's own, not one an earlier test grew
    query, cache = torch.ones(batch, 1, kv_heads, 1), torch.ones(1, 2, batch, kv_heads, 1, 1)
    out = decode_attention(query, cache, 0, torch.ones(batch, dtype=torch.int32))
    assert torch.equal(out, query)  # one key: softmax weight 1 on its value


def test_has_no_cuda_without_gpu_is_fine():
    """Guards the test module itself: CUDA cases must skip, not fail, without a GPU."""
    assert HAS_CUDA == torch.cuda.is_available()


def _python_value_calls():
    cache = torch.zeros(1, 2, 1, 2, 8, 4)
    query, qkv, table = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 32), torch.ones(1, 1, 4)
    logits = torch.randn(1, 3, 11)
    draft = torch.zeros(1, 2, dtype=torch.long)
    return [
        ("length", lambda: hippo_ext.decode_attention(query, cache, 0, 5)),
        ("length", lambda: hippo_ext.decode_attention(query, cache, 0, [5])),
        ("length", lambda: hippo_ext.rotary_kv_append(qkv, table, table, cache, 0, 5)),
        ("index", lambda: hippo_ext.kv_gather(cache, [0, 1], torch.zeros_like(cache))),
        ("index", lambda: hippo_ext.kv_compact_(cache, [0, 2])),
        ("draft_tokens", lambda: hippo_ext.verify_greedy([[1, 2]], logits)),
        ("uniforms", lambda: hippo_ext.verify_sampling(draft, logits.softmax(-1)[:, :2],
                                                       logits.softmax(-1), [[0.5] * 3])),
        ("parents", lambda: hippo_ext.verify_tree_greedy(draft, [-1, 0], logits)),
    ]


@pytest.mark.parametrize("case", range(len(_python_value_calls())))
def test_a_python_value_for_a_tensor_argument_is_refused_by_name(case):
    """A Python int or list where a tensor goes (length=5 for one sequence) is the schema's
    error naming the argument, not an AttributeError from the wrapper's value check."""
    name, call = _python_value_calls()[case]
    with pytest.raises(RuntimeError, match=f"argument '{name}'"):
        call()
