"""rotary_kv_append against HF's apply_rotary_pos_emb in eager PyTorch (bitwise: the op rounds
each product and sum as eager PyTorch does) plus plain indexing for the cache writes."""
from __future__ import annotations

import pytest
import torch

import hippo_ext
from hippo.runtime.rope import apply_rope as eager_rope  # HF's apply_rotary_pos_emb, verbatim
from hippo_testing import capture_cuda_graph, requires_cuda

OP = torch.ops.hippo_ext.rotary_kv_append.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SENTINEL = -555.0  # exactly representable in every dtype; marks slots that must stay untouched


def rope_tables(batch: int, tokens: int, head_dim: int, positions: torch.Tensor, dtype):
    """HF-style cos/sin [B, S, D] for integer positions [B, S]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions[..., None].float() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_inputs(gen, *, batch, tokens, q_heads, kv_heads, head_dim, lengths, max_seq, layers=2,
                dtype=torch.float32, device="cpu"):
    qkv = torch.randn(batch, tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen)
    positions = torch.tensor(lengths)[:, None] - tokens + torch.arange(tokens)
    cos, sin = rope_tables(batch, tokens, head_dim, positions + 7, dtype)
    cache = torch.full((layers, 2, batch, kv_heads, max_seq, head_dim), SENTINEL)
    length = torch.tensor(lengths)
    return (qkv.to(dtype).to(device), cos.to(device), sin.to(device),
            cache.to(dtype).to(device), length.to(device))


def reference(qkv, cos, sin, cache, layer, length):
    """(q [B, S, Hq, D], the cache after the append)."""
    batch, tokens, _ = qkv.shape
    kv_heads, head_dim = cache.size(3), cache.size(5)
    heads = qkv.view(batch, tokens, -1, head_dim).transpose(1, 2)  # [B, H, S, D]
    q_heads = heads.size(1) - 2 * kv_heads
    q = eager_rope(heads[:, :q_heads], cos, sin)
    k = eager_rope(heads[:, q_heads:q_heads + kv_heads], cos, sin)
    v = heads[:, q_heads + kv_heads:]
    expected = cache.clone()
    for b, end in enumerate(length.tolist()):
        expected[layer, 0, b, :, end - tokens:end] = k[b]
        expected[layer, 1, b, :, end - tokens:end] = v[b]
    return q.transpose(1, 2).contiguous(), expected


CASES = [
    # batch, tokens, q_heads, kv_heads, head_dim, lengths, max_seq
    (1, 1, 1, 1, 2, [1], 1),            # smallest: D = 2, one slot
    (1, 1, 14, 2, 64, [40], 64),         # 0.5B-shaped decode
    (2, 9, 28, 4, 128, [9, 33], 40),     # 7B-shaped verify, one row at its very start
    (3, 5, 7, 1, 80, [5, 17, 64], 64),   # GQA 7, head dim 80, a row ending at S_max
    (1, 17, 2, 2, 6, [17], 20),          # MHA, odd half (3)
    (2, 64, 4, 2, 64, [64, 100], 100),   # a long block
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_eager_rope_and_indexing(device, gen, dtype, case):
    batch, tokens, q_heads, kv_heads, head_dim, lengths, max_seq = case
    qkv, cos, sin, cache, length = make_inputs(
        gen, batch=batch, tokens=tokens, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
        lengths=lengths, max_seq=max_seq, dtype=dtype, device=device)
    q_expected, cache_expected = reference(qkv, cos, sin, cache, 1, length)
    q = hippo_ext.rotary_kv_append(qkv, cos, sin, cache, 1, length)
    assert q.shape == (batch, tokens, q_heads, head_dim) and q.is_contiguous()
    assert torch.equal(q, q_expected)
    assert torch.equal(cache, cache_expected)  # includes: layer 0 and every other slot untouched


def test_int32_length(device, gen):
    args = make_inputs(gen, batch=2, tokens=3, q_heads=4, kv_heads=2, head_dim=8, lengths=[3, 6],
                       max_seq=8, device=device)
    qkv, cos, sin, cache, length = args
    q_expected, cache_expected = reference(qkv, cos, sin, cache, 0, length)
    q = hippo_ext.rotary_kv_append(qkv, cos, sin, cache, 0, length.int())
    assert torch.equal(q, q_expected) and torch.equal(cache, cache_expected)


def test_rotation_preserves_pair_norms(device, gen):
    """Property check: RoPE rotates each (d, d + D/2) pair, so its norm is unchanged."""
    qkv, cos, sin, cache, length = make_inputs(
        gen, batch=1, tokens=4, q_heads=2, kv_heads=1, head_dim=16, lengths=[4], max_seq=4,
        device=device)
    q = hippo_ext.rotary_kv_append(qkv, cos, sin, cache, 0, length)
    before = qkv.view(1, 4, 4, 16)[:, :, :2]
    pair_norm = lambda x: x.double()[..., :8] ** 2 + x.double()[..., 8:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(q), pair_norm(before), rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_replay_follows_length(gen):
    qkv, cos, sin, cache, length = make_inputs(
        gen, batch=1, tokens=5, q_heads=4, kv_heads=2, head_dim=64, lengths=[5], max_seq=32,
        dtype=torch.bfloat16, device="cuda")
    graph, q = capture_cuda_graph(lambda: hippo_ext.rotary_kv_append(qkv, cos, sin, cache, 0, length, check=False))
    for new_length in (5, 20, 32):
        length.fill_(new_length)
        before = cache.clone()
        graph.replay()
        q_expected, cache_expected = reference(qkv, cos, sin, before, 0, length)
        assert torch.equal(q, q_expected) and torch.equal(cache, cache_expected)


@requires_cuda
@pytest.mark.cuda
def test_cuda_unchecked_bad_lengths_write_nothing_outside(gen):
    qkv, cos, sin, cache, length = make_inputs(
        gen, batch=3, tokens=4, q_heads=2, kv_heads=1, head_dim=8, lengths=[4, 4, 4], max_seq=6,
        dtype=torch.bfloat16, device="cuda")
    length.copy_(torch.tensor([2, 9, 10**6], device="cuda"))  # partly below 0, partly past S_max
    q = hippo_ext.rotary_kv_append(qkv, cos, sin, cache, 0, length, check=False)
    torch.cuda.synchronize()
    assert torch.isfinite(q).all()
    assert (cache[:, :, 2] == SENTINEL).all()  # every slot of row 2 out of range
    assert (cache[0, :, 0, :, 2:] == SENTINEL).all()  # row 0 wrote only slots 0 and 1
    assert (cache[0, :, 0, :, :2] != SENTINEL).all()


@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu(gen):
    args = make_inputs(gen, batch=2, tokens=9, q_heads=28, kv_heads=4, head_dim=128,
                       lengths=[9, 30], max_seq=32, dtype=torch.bfloat16)
    cpu_cache = args[3].clone()
    q_cpu = hippo_ext.rotary_kv_append(args[0], args[1], args[2], cpu_cache, 0, args[4])
    cuda_args = [t.cuda() for t in args]
    q_cuda = hippo_ext.rotary_kv_append(*cuda_args[:4], 0, cuda_args[4])
    assert torch.equal(q_cuda.cpu(), q_cpu) and torch.equal(cuda_args[3].cpu(), cpu_cache)


# ---- opcheck and bad inputs --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, gen, dtype):
    qkv, cos, sin, cache, length = make_inputs(
        gen, batch=2, tokens=3, q_heads=4, kv_heads=2, head_dim=8, lengths=[3, 7], max_seq=8,
        dtype=dtype, device=device)
    torch.library.opcheck(OP, (qkv, cos, sin, cache, 1, length))


def _good(device):
    gen = torch.Generator().manual_seed(0)
    qkv, cos, sin, cache, length = make_inputs(
        gen, batch=2, tokens=3, q_heads=4, kv_heads=2, head_dim=8, lengths=[3, 7], max_seq=8,
        device=device)
    return dict(qkv=qkv, cos=cos, sin=sin, cache=cache, layer=1, length=length)


BAD_INPUTS = {
    "length_below_tokens": (lambda a: {**a, "length": a["length"].clone().fill_(2)}, "length"),
    "length_beyond_cache": (lambda a: {**a, "length": a["length"].clone().fill_(9)}, "length"),
    "float_length": (lambda a: {**a, "length": a["length"].float()}, "length"),
    "length_batch": (lambda a: {**a, "length": a["length"][:1]}, "length"),
    "length_non_contiguous": (lambda a: {**a, "length": a["length"].repeat_interleave(2)[::2]},
                              "length must be contiguous"),
    "qkv_width": (lambda a: {**a, "qkv": a["qkv"][..., :-3].contiguous()}, r"\(Hq \+ 2 Hkv\)"),
    "qkv_no_query_heads": (lambda a: {**a, "qkv": a["qkv"][..., :32].contiguous()}, "Hq >= 1"),
    "qkv_non_contiguous": (lambda a: {**a, "qkv": a["qkv"].transpose(0, 1)}, "contiguous"),
    "qkv_dims": (lambda a: {**a, "qkv": a["qkv"][0]}, "qkv"),
    "cos_shape": (lambda a: {**a, "cos": a["cos"][:, :2].contiguous()}, "cos must be"),
    "sin_dtype": (lambda a: {**a, "sin": a["sin"].double()}, "sin dtype"),
    "cache_dtype": (lambda a: {**a, "cache": a["cache"].half()}, "cache dtype"),
    "cache_double": (lambda a: {**a, "cache": a["cache"].double()}, "cache must be float32"),
    "cache_odd_head_dim": (lambda a: {**a, "cache": a["cache"][..., :7].contiguous()}, "even"),
    "cache_batch": (lambda a: {**a, "cache": a["cache"][:, :, :1].contiguous()}, "batch"),
    "cache_non_contiguous": (lambda a: {**a, "cache": a["cache"].transpose(4, 5)}, "contiguous"),
    "layer": (lambda a: {**a, "layer": 2}, "layer"),
    "length_in_the_cache": (  # read while the cache is written
        lambda a: {**a, "length": a["cache"].view(-1).view(torch.uint8)[:8 * a["length"].numel()]
                   .view(torch.long).copy_(a["length"])},
        "length must not share memory with the cache"),
    "int_qkv": (lambda a: {**a, "qkv": a["qkv"].long()}, "float32, bfloat16 or float16"),
    # Rows read while keys are written: a qkv viewing the cache would lose values to its keys.
    "qkv_in_the_cache": (lambda a: {**a, "qkv": a["cache"].view(-1)[:a["qkv"].numel()]
                                    .view(a["qkv"].shape)},
                         "qkv must not share memory with the cache"),
    "cos_in_the_cache": (lambda a: {**a, "cos": a["cache"].view(-1)[-a["cos"].numel():]
                                    .view(a["cos"].shape)},
                         "cos must not share memory with the cache"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(device, case):
    make_bad, match = BAD_INPUTS[case]
    args = make_bad(_good(device))
    with pytest.raises(RuntimeError, match=match):
        hippo_ext.rotary_kv_append(args.pop("qkv"), args.pop("cos"), args.pop("sin"),
                                   args.pop("cache"), args.pop("layer"), args.pop("length"))


def test_cpu_checks_lengths_even_without_wrapper_check():
    args = _good("cpu")
    with pytest.raises(RuntimeError, match="length"):
        hippo_ext.rotary_kv_append(args["qkv"], args["cos"], args["sin"], args["cache"], 1,
                                   args["length"].clone().fill_(9), check=False)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["cos", "length", "cache"])
def test_device_mix(moved):
    args = _good("cuda")
    args[moved] = args[moved].cpu()
    with pytest.raises(RuntimeError, match="is on"):
        hippo_ext.rotary_kv_append(args["qkv"], args["cos"], args["sin"], args["cache"], 1,
                                   args["length"], check=False)


# ---- rotary_tables: HF's rotary embeddings, bit for bit ------------------------------------------

def hf_rotary_embedding(head_dim: int, mrope_section: list[int] | None, rope_scaling=None):
    """HF's own rotary embedding module of a Qwen2 (1-D) or Qwen2.5-VL text (M-RoPE) config."""
    rope = {"rope_type": "default", "rope_theta": 1e6}
    if rope_scaling is not None:
        rope = {"rope_type": "linear", "rope_theta": 1e4, "factor": rope_scaling}
    common = dict(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=1, intermediate_size=32, vocab_size=32)
    if mrope_section is None:
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
        return Qwen2RotaryEmbedding(Qwen2Config(**common, rope_parameters=rope))
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
    rope["mrope_section"] = mrope_section
    return Qwen2_5_VLRotaryEmbedding(Qwen2_5_VLTextConfig(**common, rope_parameters=rope))


TABLE_CASES = [
    # head_dim, mrope_section (None: 1-D), batch, tokens, largest position, linear rope factor
    (2, None, 1, 1, 0, None),
    (64, None, 2, 9, 40_000, None),
    (128, None, 1, 17, 131_071, 4.0),
    (6, [1, 1, 1], 1, 5, 300, None),
    (16, [2, 3, 3], 3, 7, 5_000, None),
    (128, [16, 24, 24], 1, 33, 20_000, None),
    (80, [10, 15, 15], 2, 3, 70_000, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TABLE_CASES)
def test_rotary_tables_equal_hf(device, gen, dtype, case):
    head_dim, sections, batch, tokens, largest, factor = case
    module = hf_rotary_embedding(head_dim, sections, factor).to(device)
    shape = (batch, tokens) if sections is None else (3, batch, tokens)
    positions = torch.randint(0, largest + 1, shape, generator=gen).to(device)
    x = torch.empty(0, device=device, dtype=dtype)  # HF reads only its dtype and device
    expected_cos, expected_sin = module(x, positions)
    cos, sin = hippo_ext.rotary_tables(positions, module.inv_freq, sections or (),
                                       module.attention_scaling, dtype)
    assert cos.shape == (batch, tokens, head_dim) and cos.dtype == dtype
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


@requires_cuda
@pytest.mark.cuda
def test_rotary_tables_cuda_graph_follows_positions(gen):
    module = hf_rotary_embedding(128, [16, 24, 24]).cuda()
    positions = torch.zeros(3, 1, 9, dtype=torch.long, device="cuda")
    graph, (cos, sin) = capture_cuda_graph(
        lambda: hippo_ext.rotary_tables(positions, module.inv_freq, [16, 24, 24], 1.0, torch.bfloat16))
    for start in (0, 777, 12_345):
        positions.copy_(start + torch.randint(0, 64, (3, 1, 9), generator=gen))
        graph.replay()
        x = torch.empty(0, device="cuda", dtype=torch.bfloat16)
        expected_cos, expected_sin = module(x, positions)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


def test_rotary_tables_opcheck(device):
    positions = torch.arange(12, device=device).view(3, 1, 4)
    inv_freq = torch.rand(8, device=device)
    torch.library.opcheck(torch.ops.hippo_ext.rotary_tables.default,
                          (positions, inv_freq, [2, 3, 3], 1.0, torch.bfloat16))
    torch.library.opcheck(torch.ops.hippo_ext.rotary_tables.default,
                          (positions[0], inv_freq, [], 0.5, torch.float32))


@pytest.mark.parametrize("bad,match", [
    (dict(positions=torch.arange(4)[None].float()), "positions must be Long"),
    (dict(positions=torch.arange(4)), r"\[B, S\]"),
    (dict(positions=torch.arange(8).view(2, 1, 4), mrope_section=[2, 3, 3]), r"\[3, B, S\]"),
    (dict(mrope_section=[2, 3, 3]), r"\[3, B, S\]"),
    (dict(positions=torch.arange(12).view(3, 1, 4), mrope_section=[2, 3, 2]), "sum to D/2"),
    (dict(positions=torch.arange(12).view(3, 1, 4), mrope_section=[8, 0]), "must lie in"),
    # Sizes whose sum wraps around int64 to D/2.
    (dict(positions=torch.arange(12).view(3, 1, 4), mrope_section=[2**62] * 3 + [2**62 + 8]),
     "must lie in"),
    (dict(scaling=float("nan")), "scaling must be finite"),
    (dict(scaling=1e39), "scaling must be finite"),
    (dict(inv_freq=torch.rand(0)), "empty"),
    (dict(inv_freq=torch.rand(2, 4)), "inv_freq"),
    (dict(dtype=torch.int32), "dtype"),
])
def test_rotary_tables_bad_inputs(device, bad, match):
    args = dict(positions=torch.arange(4)[None], inv_freq=torch.rand(8), mrope_section=[],
                dtype=torch.float32, scaling=1.0)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.hippo_ext.rotary_tables.default(
            args["positions"].to(device), args["inv_freq"].to(device), args["mrope_section"],
            args["scaling"], args["dtype"])


def test_integer_arguments_are_not_truncated(device):
    with pytest.raises(TypeError, match="mrope_section must be an integer"):
        hippo_ext.rotary_tables(torch.arange(12, device=device).view(3, 1, 4),
                                torch.rand(8, device=device), [2.9, 2.9, 2.2])


def test_rotary_tables_defaults(device, gen):
    """Without mrope_section, scaling and dtype: 1-D RoPE, unscaled, float32 tables."""
    positions = torch.randint(0, 1000, (2, 5), generator=gen).to(device)
    inv_freq = torch.rand(4, generator=gen).to(device)
    cos, sin = hippo_ext.rotary_tables(positions, inv_freq)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (2, 5, 8)
    want_cos, want_sin = hippo_ext.rotary_tables(positions, inv_freq, (), 1.0, torch.float32)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert not torch.equal(cos, hippo_ext.rotary_tables(positions, inv_freq, (), 2.0)[0])
