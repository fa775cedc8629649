"""add_rms_norm_linear and silu_and_mul_linear against the ops they fuse and a float64 GEMM.

On the CPU both are that composition, exactly. On CUDA, bf16/fp16 with at most 16 rows and
K % 8 == 0 run skinny_linear's FMA kernel with the norm or the gating applied as x is loaded:
its rows must not depend on M (bitwise), the residual sum must be the one add_rms_norm rounds,
and it must replay inside a CUDA graph; other shapes run the composition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hippo_ext
from hippo_ext.normalization import reference_rms_norm
from hippo_testing import capture_cuda_graph, requires_cuda, use_fma_slices

NORM_OP = torch.ops.hippo_ext.add_rms_norm_linear.default
GATED_OP = torch.ops.hippo_ext.silu_and_mul_linear.default
EPS = 1e-6
FUSED_MAX_ROWS = 16
# fp32 accumulation, output rounded once (relative, as in test_linear.py); on CUDA the norm's
# sum of squares runs in another order than add_rms_norm's, which may move a normed input by one
# rounding step: negligible against the GEMM's own rounding.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}

# (rows, K, N): one row, a verify step, rows in a batch, beyond the fused kernel (17 rows), K not
# a multiple of 8 (CUDA composes), a partial last warp step (K = 96), model widths, odd N.
CASES = [
    ((1,), 8, 1), ((1,), 64, 33), ((1, 9), 96, 130), ((2, 5), 256, 17), ((17,), 64, 10),
    ((3,), 7, 5), ((1,), 896, 1152), ((4,), 3584, 65),
]


@pytest.fixture(params=["planned", "1", "8"])
def fma_slices(request, monkeypatch) -> str:
    """CUDA-only tests: the kernel's own plan of K slices, one, and eight."""
    use_fma_slices(monkeypatch, request.param)
    return request.param


def _cuda_with_slices(slices: str):
    return pytest.param(("cuda", slices), marks=[pytest.mark.cuda, requires_cuda],
                        id=f"cuda-{slices}-slices")


@pytest.fixture(params=[pytest.param(("cpu", "planned"), id="cpu"), _cuda_with_slices("planned"),
                        _cuda_with_slices("1"), _cuda_with_slices("8")])
def sliced_device(request, monkeypatch) -> str:
    """conftest's devices, CUDA with each plan of K slices (the CPU composes the ops, so slices
    mean nothing there)."""
    device, slices = request.param
    use_fma_slices(monkeypatch, slices)
    return device


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]


def random_norm_problem(rows, k, n, dtype, device, gen, bias=True):
    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)
    x, residual = draw(*rows, k), draw(*rows, k, scale=3.0)
    norm_weight = draw(k, scale=0.5) + 1.0
    weight = draw(n, k, scale=k ** -0.5)
    return x, residual, norm_weight, weight, (draw(n) if bias else None)


def random_gated_problem(rows, k, n, dtype, device, gen, bias=True):
    x = (torch.randn(*rows, 2 * k, generator=gen) * 2).to(dtype).to(device)
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, weight, b


def float64_linear(x, weight, bias):
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


def assert_gemm_close(out, normed_input, weight, bias):
    """Within one output rounding step of the float64 GEMM of the rounded inputs, relative to
    the size of the products summed (|x| |W|^T + |b|): when they cancel, an output is small
    while the rounding of its inputs is not (one fp32 output of 8 products was 1.2e-5 off
    relative to itself, 1e-8 relative to its terms)."""
    reference = float64_linear(normed_input, weight, bias)
    magnitude = float64_linear(normed_input.abs(), weight.abs(),
                               bias.abs() if bias is not None else None)
    tolerance = TOLERANCE[out.dtype]
    error = (out.double().cpu() - reference.cpu()).norm() / magnitude.cpu().norm().clamp_min(1e-30)
    assert float(error) < tolerance
    torch.testing.assert_close(out.double(), reference, rtol=2 * tolerance, atol=2 * tolerance)


# ---------------------------------------------------------------------------------------------
# Against the composition and float64
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,k,n", CASES)
def test_add_rms_norm_linear(sliced_device, gen, rows, k, n):
    device = sliced_device
    for dtype in dtypes_for(device):
        x, residual, norm_weight, weight, bias = random_norm_problem(rows, k, n, dtype, device, gen)
        for b in (bias, None):
            out, total = hippo_ext.add_rms_norm_linear(x, residual, norm_weight, EPS, weight, b)
            normed, expected_total = hippo_ext.add_rms_norm(x, residual, norm_weight, EPS)
            assert out.shape == (*rows, n) and out.dtype == dtype
            assert torch.equal(total, expected_total)  # one rounding of residual + x
            if device == "cpu":
                assert torch.equal(out, F.linear(normed, weight, b))
            else:
                assert_gemm_close(out, normed, weight, b)
            # HF's arithmetic, independently of hippo_ext's norm
            hf_normed = reference_rms_norm(residual + x, norm_weight, EPS)
            assert_gemm_close(out, hf_normed, weight, b)


@pytest.mark.parametrize("rows,k,n", CASES)
def test_silu_and_mul_linear(sliced_device, gen, rows, k, n):
    device = sliced_device
    for dtype in dtypes_for(device):
        x, weight, bias = random_gated_problem(rows, k, n, dtype, device, gen)
        for b in (bias, None):
            out = hippo_ext.silu_and_mul_linear(x, weight, b)
            assert out.shape == (*rows, n) and out.dtype == dtype
            gated = hippo_ext.silu_and_mul(x)
            if device == "cpu":
                assert torch.equal(out, F.linear(gated, weight, b))
            else:
                assert_gemm_close(out, gated, weight, b)
            hf_gated = F.silu(x[..., :k]) * x[..., k:]  # HF's act_fn(gate) * up
            assert_gemm_close(out, hf_gated, weight, b)


# ---------------------------------------------------------------------------------------------
# CUDA: the fused kernel
# ---------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", [(896, 1152), (3584, 130), (96, 33)])
def test_cuda_rows_do_not_depend_on_row_count(gen, fma_slices, dtype, k, n):
    """Up to 16 rows, row i is bitwise the same computed alone or with the others (what
    step_invariant needs of every GEMM of a step)."""
    rows = FUSED_MAX_ROWS
    x, residual, norm_weight, weight, bias = random_norm_problem((rows,), k, n, dtype, "cuda", gen)
    gate_up, _, _ = random_gated_problem((rows,), k, n, dtype, "cuda", gen)
    together, total = hippo_ext.add_rms_norm_linear(x, residual, norm_weight, EPS, weight, bias)
    gated_together = hippo_ext.silu_and_mul_linear(gate_up, weight, bias)
    for count in (1, 3, 9):
        for first in (0, rows - count):
            part = slice(first, first + count)
            alone, alone_total = hippo_ext.add_rms_norm_linear(
                x[part].contiguous(), residual[part].contiguous(), norm_weight, EPS, weight, bias)
            assert torch.equal(alone, together[part]) and torch.equal(alone_total, total[part])
            gated_alone = hippo_ext.silu_and_mul_linear(gate_up[part].contiguous(), weight, bias)
            assert torch.equal(gated_alone, gated_together[part])


@requires_cuda
@pytest.mark.cuda
def test_cuda_gating_equals_skinny_fma_kernel(gen, fma_slices, monkeypatch):
    """silu_and_mul_linear's kernel is skinny_linear's FMA kernel fed the gated values: the same
    products in the same order, so the same bits as silu_and_mul then skinny_linear(fma)."""
    monkeypatch.setenv("HIPPO_SKINNY_KERNEL", "fma")
    for rows, k, n in [(1, 4864, 896), (9, 18944, 130), (16, 96, 7)]:
        x, weight, bias = random_gated_problem((rows,), k, n, torch.bfloat16, "cuda", gen)
        fused = hippo_ext.silu_and_mul_linear(x, weight, bias)
        composed = hippo_ext.skinny_linear(hippo_ext.silu_and_mul(x), weight, bias)
        assert torch.equal(fused, composed)


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_replay(gen):
    x, residual, norm_weight, weight, bias = random_norm_problem(
        (1, 5), 3584, 4608, torch.bfloat16, "cuda", gen)
    gate_up, down, _ = random_gated_problem((1, 5), 3584, 1000, torch.bfloat16, "cuda", gen)
    graph, ((out, total), gated) = capture_cuda_graph(
        lambda: (hippo_ext.add_rms_norm_linear(x, residual, norm_weight, EPS, weight, bias),
                 hippo_ext.silu_and_mul_linear(gate_up, down)))
    for _ in range(2):  # new inputs in the static buffers
        x.copy_(torch.randn(x.shape, generator=gen))
        gate_up.copy_(torch.randn(gate_up.shape, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        eager_out, eager_total = hippo_ext.add_rms_norm_linear(x, residual, norm_weight, EPS,
                                                               weight, bias)
        assert torch.equal(out, eager_out) and torch.equal(total, eager_total)
        assert torch.equal(gated, hippo_ext.silu_and_mul_linear(gate_up, down))


# ---------------------------------------------------------------------------------------------
# opcheck and bad inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(device, gen, with_bias):
    dtype = dtypes_for(device)[0]
    x, residual, norm_weight, weight, bias = random_norm_problem((1, 3), 64, 24, dtype, device, gen)
    gate_up, _, _ = random_gated_problem((1, 3), 64, 24, dtype, device, gen)
    b = bias if with_bias else None
    torch.library.opcheck(NORM_OP, (x, residual, norm_weight, EPS, weight, b))
    torch.library.opcheck(GATED_OP, (gate_up, weight, b))


def _norm_args(device):
    gen = torch.Generator().manual_seed(0)
    x, residual, norm_weight, weight, bias = random_norm_problem(
        (2,), 64, 24, dtypes_for(device)[0], device, gen)
    return dict(x=x, residual=residual, norm_weight=norm_weight, eps=EPS, weight=weight, bias=bias)


NORM_BAD_INPUTS = {
    "weight_columns": (lambda a: {**a, "weight": a["weight"][:, :32].contiguous()}, "weight is"),
    "residual_shape": (lambda a: {**a, "residual": a["residual"][:1]}, "residual shape"),
    "norm_weight_size": (lambda a: {**a, "norm_weight": a["norm_weight"][:63]},
                         "norm_weight has 63 entries"),
    "norm_weight_dtype": (lambda a: {**a, "norm_weight": a["norm_weight"].double()},
                          "norm_weight dtype"),
    "bias_size": (lambda a: {**a, "bias": a["bias"][:3]}, "bias has"),
    "weight_dtype": (lambda a: {**a, "weight": a["weight"].double()}, "dtype"),
    "negative_eps": (lambda a: {**a, "eps": -1.0}, "eps"),
    "non_contiguous_x": (lambda a: {**a, "x": a["x"].repeat(1, 2)[:, ::2]}, "contiguous"),
    "integer_x": (lambda a: {**a, "x": a["x"].long()}, "must be float32"),
}


@pytest.mark.parametrize("case", list(NORM_BAD_INPUTS))
def test_add_rms_norm_linear_bad_inputs(device, case):
    make_bad, match = NORM_BAD_INPUTS[case]
    args = make_bad(_norm_args(device))
    with pytest.raises(RuntimeError, match=f"add_rms_norm_linear.*({match})"):
        hippo_ext.add_rms_norm_linear(**args)


GATED_BAD_INPUTS = {
    "odd_width": (lambda x, w: (x[:, :127].contiguous(), w), "even"),
    "weight_columns": (lambda x, w: (x, w[:, :32].contiguous()), "weight is"),
    "weight_dtype": (lambda x, w: (x, w.double()), "dtype"),
    "non_contiguous_x": (lambda x, w: (x.repeat(1, 2)[:, ::2], w), "contiguous"),
}


@pytest.mark.parametrize("case", list(GATED_BAD_INPUTS))
def test_silu_and_mul_linear_bad_inputs(device, case):
    gen = torch.Generator().manual_seed(0)
    x, weight, _ = random_gated_problem((2,), 64, 24, dtypes_for(device)[0], device, gen)
    make_bad, match = GATED_BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=f"silu_and_mul_linear.*({match})"):
        hippo_ext.silu_and_mul_linear(*make_bad(x, weight))


# ---------------------------------------------------------------------------------------------
# qkv_projection: add_rms_norm_linear, then rotary_kv_append, in one op
# ---------------------------------------------------------------------------------------------

QKV_OP = torch.ops.hippo_ext.qkv_projection.default
POISON = 7.0  # cache contents the op must leave alone

# (batch, tokens, hidden, q heads, kv heads, head dim): a decode step, a verify step, a batch,
# beyond the fused kernel (17 tokens), hidden not a multiple of 8 (CUDA composes), 0.5B heads.
QKV_CASES = [
    (1, 1, 64, 4, 2, 16), (1, 9, 96, 4, 2, 16), (2, 5, 64, 3, 1, 8), (1, 17, 64, 4, 2, 16),
    (1, 3, 60, 2, 1, 10), (1, 2, 896, 14, 2, 64),
]


def random_qkv_problem(batch, tokens, hidden, q_heads, kv_heads, head_dim, dtype, device, gen,
                       max_seq=40):
    width = (q_heads + 2 * kv_heads) * head_dim
    x, residual, norm_weight, weight, bias = random_norm_problem(
        (batch, tokens), hidden, width, dtype, device, gen)
    angles = torch.rand(batch, tokens, head_dim // 2, generator=gen) * 6.0
    cos = angles.cos().repeat(1, 1, 2).to(dtype).to(device)
    sin = angles.sin().repeat(1, 1, 2).to(dtype).to(device)
    cache = torch.full((2, 2, batch, kv_heads, max_seq, head_dim), POISON, dtype=dtype,
                       device=device)
    lengths = torch.randint(tokens, max_seq + 1, (batch,), generator=gen).to(device)
    return dict(x=x, residual=residual, norm_weight=norm_weight, eps=EPS, weight=weight,
                bias=bias, cos=cos, sin=sin, cache=cache, layer=1, length=lengths)


def composed_qkv_projection(args):
    """The ops qkv_projection fuses, one after the other, on a copy of the cache."""
    cache = args["cache"].clone()
    qkv, total = hippo_ext.add_rms_norm_linear(args["x"], args["residual"], args["norm_weight"],
                                               EPS, args["weight"], args["bias"])
    q = hippo_ext.rotary_kv_append(qkv, args["cos"], args["sin"], cache, args["layer"],
                                   args["length"])
    return q, total, cache


@pytest.mark.parametrize("case", QKV_CASES, ids=str)
def test_qkv_projection(sliced_device, gen, case):
    device = sliced_device
    for dtype in dtypes_for(device):
        args = random_qkv_problem(*case, dtype, device, gen)
        expected_q, expected_total, expected_cache = composed_qkv_projection(args)
        q, total = hippo_ext.qkv_projection(**args)
        batch, tokens, _, q_heads, _, head_dim = case
        assert q.shape == (batch, tokens, q_heads, head_dim) and q.dtype == dtype
        assert torch.equal(total, expected_total)
        written = expected_cache != POISON  # the new tokens' slots of layer 1
        assert torch.equal(args["cache"] != POISON, written), "wrote outside the new slots"
        if device == "cpu":
            assert torch.equal(q, expected_q) and torch.equal(args["cache"], expected_cache)
        else:  # the projection's fp32 sums run in another order than cuBLAS's
            tolerance = 2 * TOLERANCE[dtype]
            torch.testing.assert_close(q, expected_q, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(args["cache"], expected_cache, rtol=tolerance,
                                       atol=tolerance)


@requires_cuda
@pytest.mark.cuda
def test_cuda_qkv_projection_rows_do_not_depend_on_token_count(gen, fma_slices):
    """A token's q row and cache slots are bitwise the same computed alone or in a block of up
    to 16 (the same slots: the shorter block ends where the token sits)."""
    args = random_qkv_problem(1, 16, 896, 14, 2, 64, torch.bfloat16, "cuda", gen, max_seq=64)
    args["length"].fill_(50)
    block_cache = args["cache"].clone()
    q_block, _ = hippo_ext.qkv_projection(**{**args, "cache": block_cache})
    for first, count in ((0, 1), (7, 1), (3, 9), (15, 1)):
        part = slice(first, first + count)
        alone_cache = args["cache"].clone()
        q_alone, _ = hippo_ext.qkv_projection(**{
            **args, "x": args["x"][:, part].contiguous(),
            "residual": args["residual"][:, part].contiguous(),
            "cos": args["cos"][:, part].contiguous(), "sin": args["sin"][:, part].contiguous(),
            "cache": alone_cache, "length": args["length"] - 16 + first + count})
        assert torch.equal(q_alone, q_block[:, part])
        slots = slice(50 - 16 + first, 50 - 16 + first + count)
        assert torch.equal(alone_cache[1, :, :, :, slots], block_cache[1, :, :, :, slots])


@requires_cuda
@pytest.mark.cuda
def test_cuda_qkv_projection_unchecked_lengths_stay_in_bounds(gen):
    """check=False with lengths whose slots fall outside the cache: nothing is written."""
    args = random_qkv_problem(2, 3, 64, 4, 2, 16, torch.bfloat16, "cuda", gen, max_seq=8)
    args["length"].copy_(torch.tensor([-5, 10**6]))
    q, _ = hippo_ext.qkv_projection(**args, check=False)
    torch.cuda.synchronize()
    assert torch.isfinite(q).all()
    assert (args["cache"] == POISON).all()


@requires_cuda
@pytest.mark.cuda
def test_cuda_qkv_projection_graph_replay_follows_length(gen):
    args = random_qkv_problem(1, 5, 896, 14, 2, 64, torch.bfloat16, "cuda", gen, max_seq=64)
    graph, (q, total) = capture_cuda_graph(lambda: hippo_ext.qkv_projection(**args, check=False))
    for length in (5, 64, 23):
        args["length"].fill_(length)
        args["cache"].fill_(POISON)  # the warm-up and the last round wrote other slots
        graph.replay()
        torch.cuda.synchronize()
        replayed_cache = args["cache"].clone()
        assert (replayed_cache != POISON).any()
        args["cache"].fill_(POISON)
        eager_q, eager_total = hippo_ext.qkv_projection(**args)
        assert torch.equal(q, eager_q) and torch.equal(total, eager_total)
        assert torch.equal(args["cache"], replayed_cache)


def test_qkv_projection_opcheck(device, gen):
    args = random_qkv_problem(1, 3, 64, 4, 2, 16, dtypes_for(device)[0], device, gen)
    torch.library.opcheck(QKV_OP, tuple(args.values()))


QKV_BAD_INPUTS = {
    "not_three_dims": (lambda a: {**a, "x": a["x"][0], "residual": a["residual"][0]}, "x"),
    "width_not_heads": (lambda a: {**a, "weight": a["weight"][:-3].contiguous(),
                                   "bias": a["bias"][:-3].contiguous()},
                        "weight.size\\(0\\) must be \\(Hq \\+ 2 Hkv\\)"),
    "cos_shape": (lambda a: {**a, "cos": a["cos"][:, :1].contiguous()}, "cos must be"),
    "cache_dtype": (lambda a: {**a, "cache": a["cache"].half()}, "cache dtype"),
    "layer": (lambda a: {**a, "layer": 2}, "layer"),
    # Named after the op called (its CPU path composes rotary_kv_append) and checked first.
    "length_beyond_cache": (lambda a: {**a, "length": a["length"].clone().fill_(41)},
                            r"^qkv_projection: length.* must lie in \[(S, S_max\] = \[)?3, 4"),
    "length_below_tokens": (lambda a: {**a, "length": a["length"].clone().fill_(2)},
                            r"^qkv_projection: length.* must lie in \[(S, S_max\] = \[)?3, 4"),
    "norm_weight_size": (lambda a: {**a, "norm_weight": a["norm_weight"][:63]},
                         "norm_weight has 63 entries"),
    "layer_not_an_integer": (lambda a: {**a, "layer": 1.7}, "layer must be an integer"),
    "layer_a_bool": (lambda a: {**a, "layer": True}, "layer must be an integer, got the bool"),
    "length_in_the_cache": (  # read while the cache is written
        lambda a: {**a, "length": a["cache"].view(-1).view(torch.uint8)[:8 * a["length"].numel()]
                   .view(torch.long).copy_(a["length"])},
        "length must not share memory with the cache"),
}


@pytest.mark.parametrize("case", list(QKV_BAD_INPUTS))
def test_qkv_projection_bad_inputs(device, case):
    args = random_qkv_problem(1, 3, 64, 4, 2, 16, dtypes_for(device)[0], device,
                              torch.Generator().manual_seed(0))
    make_bad, match = QKV_BAD_INPUTS[case]
    with pytest.raises((RuntimeError, TypeError), match=match):
        hippo_ext.qkv_projection(**make_bad(args))
