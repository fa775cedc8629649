"""rms_norm and add_rms_norm against HF's Qwen2RMSNorm arithmetic in eager PyTorch (bitwise on the
CPU, within one rounding step on CUDA, where the fp32 sum of squares is accumulated in another
order) and against a float64 RMSNorm."""
from __future__ import annotations

import pytest
import torch

import hippo_ext
from hippo_ext.normalization import reference_rms_norm as eager_rms_norm
from hippo_testing import capture_cuda_graph, rel_error, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows shape, hidden): one row, odd and prime widths (no 16-byte packs), model widths, no rows.
SHAPES = [((1,), 1), ((3,), 7), ((2, 5), 64), ((1, 9), 131), ((4,), 896), ((2, 3), 3584), ((0,), 64)]
# One rounding step of the dtype: the CUDA kernel may round the other way when its fp32
# inverse RMS differs from PyTorch's in the last bit.
ULP_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-2),
                 torch.float16: dict(rtol=1e-3, atol=1e-3)}
FLOAT64_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def float64_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    wide = x.double()
    return weight.double() * wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)


def random_inputs(rows, hidden, dtype, device, gen, scale=1.0):
    x = (torch.randn(*rows, hidden, generator=gen) * scale).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    return x, weight


def assert_matches_eager(out: torch.Tensor, expected: torch.Tensor, device: str) -> None:
    if device == "cpu":
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, **ULP_TOLERANCE[out.dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_rms_norm_matches_eager(device, gen, dtype, rows, hidden):
    x, weight = random_inputs(rows, hidden, dtype, device, gen, scale=3.0)
    out = hippo_ext.rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert_matches_eager(out, eager_rms_norm(x, weight, 1e-6), device)
    if x.numel():
        assert rel_error(out, float64_rms_norm(x, weight, 1e-6)) < FLOAT64_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_add_rms_norm_matches_eager(device, gen, dtype, rows, hidden):
    x, weight = random_inputs(rows, hidden, dtype, device, gen)
    residual, _ = random_inputs(rows, hidden, dtype, device, gen, scale=10.0)
    out, total = hippo_ext.add_rms_norm(x, residual, weight, 1e-5)
    expected_sum = residual + x
    assert torch.equal(total, expected_sum)  # one rounded add, on every device
    assert_matches_eager(out, eager_rms_norm(expected_sum, weight, 1e-5), device)


def test_eps_matters_for_tiny_rows(device):
    x = torch.full((2, 8), 1e-4, device=device)
    weight = torch.ones(8, device=device)
    for eps in (0.0, 1e-6, 1.0):
        torch.testing.assert_close(hippo_ext.rms_norm(x, weight, eps), eager_rms_norm(x, weight, eps))


def test_default_eps_is_qwen2s(device):
    """eps defaults to 1e-6 (HF's Qwen2RMSNorm, and the signature's): on rows this small the
    eps shows in every output."""
    x = torch.full((2, 8), 1e-4, device=device)
    weight = torch.ones(8, device=device)
    expected = hippo_ext.rms_norm(x, weight, 1e-6)
    assert not torch.equal(expected, hippo_ext.rms_norm(x, weight, 2e-6))
    assert torch.equal(hippo_ext.rms_norm(x, weight), expected)
    assert torch.equal(hippo_ext.add_rms_norm(x, torch.zeros_like(x), weight)[0], expected)
    assert torch.equal(eager_rms_norm(x, weight), eager_rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_rows_take_the_scalar_path(device, gen, dtype):
    """A contiguous x that starts one element into its storage cannot use 16-byte packs."""
    storage = torch.randn(4 * 64 + 1, generator=gen).to(dtype).to(device)
    x = storage[1:].view(4, 64)
    residual = torch.randn(4, 64, generator=gen).to(dtype).to(device)
    weight = torch.randn(64, generator=gen).to(dtype).to(device)
    assert_matches_eager(hippo_ext.rms_norm(x, weight, 1e-6), eager_rms_norm(x, weight, 1e-6), device)
    out, total = hippo_ext.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, residual + x)
    assert_matches_eager(out, eager_rms_norm(residual + x, weight, 1e-6), device)


@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_within_one_rounding(gen):
    x, weight = random_inputs((6,), 3584, torch.bfloat16, "cpu", gen)
    torch.testing.assert_close(hippo_ext.rms_norm(x.cuda(), weight.cuda(), 1e-6).cpu(),
                               hippo_ext.rms_norm(x, weight, 1e-6), **ULP_TOLERANCE[torch.bfloat16])


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_capture(gen):
    x, weight = random_inputs((3,), 896, torch.bfloat16, "cuda", gen)
    residual = torch.randn_like(x)
    expected = hippo_ext.add_rms_norm(x, residual, weight, 1e-6)
    graph, captured = capture_cuda_graph(lambda: hippo_ext.add_rms_norm(x, residual, weight, 1e-6))
    graph.replay()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


# ---- opcheck and bad inputs --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, gen, dtype):
    x, weight = random_inputs((2, 3), 40, dtype, device, gen)
    torch.library.opcheck(torch.ops.hippo_ext.rms_norm.default, (x, weight, 1e-6))
    torch.library.opcheck(torch.ops.hippo_ext.add_rms_norm.default, (x, x.clone(), weight, 1e-6))


BAD_INPUTS = {
    "weight_length": (lambda x, r, w: (x, r, w[:-1]), "weight has"),
    "weight_dtype": (lambda x, r, w: (x, r, w.double()), "weight dtype"),
    "weight_2d": (lambda x, r, w: (x, r, w[None]), "weight must have 1 dimensions"),
    "int_x": (lambda x, r, w: (x.long(), r.long(), w.long()), "float32, bfloat16 or float16"),
    # Strided, with the weight's length: only the contiguity check can refuse it.
    "non_contiguous_x": (lambda x, r, w: (x.repeat(1, 2)[:, ::2], r.repeat(1, 2)[:, ::2], w),
                         "x must be contiguous"),
    "scalar_x": (lambda x, r, w: (x[0, 0], r[0, 0], w), "scalar"),
    "empty_hidden": (lambda x, r, w: (x[:, :0], r[:, :0], w[:0]), "empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(device, case):
    make_bad, match = BAD_INPUTS[case]
    x = torch.randn(4, 8, device=device)
    x, residual, weight = make_bad(x, x.clone(), torch.ones(8, device=device))
    with pytest.raises(RuntimeError, match=match):
        hippo_ext.rms_norm(x, weight)
    with pytest.raises(RuntimeError, match=match):
        hippo_ext.add_rms_norm(x, residual, weight)


def test_bad_residual(device):
    x, weight = torch.randn(4, 8, device=device), torch.ones(8, device=device)
    with pytest.raises(RuntimeError, match="residual shape"):
        hippo_ext.add_rms_norm(x, x[:2].clone(), weight)
    with pytest.raises(RuntimeError, match="residual dtype"):
        hippo_ext.add_rms_norm(x, x.half(), weight)
    for eps in (-1.0, float("inf"), float("nan"), 1e39):
        with pytest.raises(RuntimeError, match="eps must be finite and >= 0"):
            hippo_ext.rms_norm(x, weight, eps)


@requires_cuda
@pytest.mark.cuda
def test_device_mix():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="is on"):
        hippo_ext.rms_norm(x, torch.ones(8))
    with pytest.raises(RuntimeError, match="is on"):
        hippo_ext.add_rms_norm(x, x.cpu(), torch.ones(8, device="cuda"))
