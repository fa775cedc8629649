"""silu_and_mul against HF's `act_fn(gate) * up` in eager PyTorch (bitwise on the CPU, within one
rounding of the dtype on CUDA, whose exp may differ in the last bit) and against float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hippo_ext
from hippo_ext.activation import reference_silu_and_mul as eager
from hippo_testing import capture_cuda_graph, rel_error, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading shape, I): I = 1, odd, a pack multiple, model widths (0.5B: 4864, 7B: 18944), no rows.
SHAPES = [((1,), 1), ((3,), 7), ((2, 5), 64), ((1,), 4864), ((9,), 18944), ((0, 2), 16)]
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-2),
             torch.float16: dict(rtol=1e-3, atol=1e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_matches_eager(device, gen, dtype, rows, width):
    x = (3 * torch.randn(*rows, 2 * width, generator=gen)).to(dtype).to(device)
    out = hippo_ext.silu_and_mul(x)
    assert out.shape == (*rows, width) and out.dtype == dtype
    if device == "cpu":
        assert torch.equal(out, eager(x))
    else:
        torch.testing.assert_close(out, eager(x), **TOLERANCE[dtype])
    if out.numel():
        gate, up = x.double().chunk(2, dim=-1)
        assert rel_error(out, F.silu(gate) * up) < {torch.float32: 1e-6}.get(dtype, 1e-2)


def test_unaligned_input_takes_the_scalar_path(device, gen):
    storage = torch.randn(3 * 32 + 1, generator=gen).to(torch.bfloat16).to(device)
    x = storage[1:].view(3, 32)
    torch.testing.assert_close(hippo_ext.silu_and_mul(x), eager(x), **TOLERANCE[torch.bfloat16])


def test_extreme_gates_stay_finite(device):
    x = torch.tensor([[-100.0, 100.0, 0.0, 2.0, 3.0, 4.0]], device=device)
    out = hippo_ext.silu_and_mul(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, eager(x))


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_capture(gen):
    x = torch.randn(5, 2 * 4864, generator=gen).to(torch.bfloat16).cuda()
    expected = hippo_ext.silu_and_mul(x)
    graph, captured = capture_cuda_graph(lambda: hippo_ext.silu_and_mul(x))
    graph.replay()
    assert torch.equal(captured, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, gen, dtype):
    x = torch.randn(2, 3, 26, generator=gen).to(dtype).to(device)
    torch.library.opcheck(torch.ops.hippo_ext.silu_and_mul.default, (x,))


@pytest.mark.parametrize("bad,match", [
    (lambda d: torch.randn(3, 7, device=d), "even"),
    (lambda d: torch.randn(3, 0, device=d), "even and non-empty"),
    (lambda d: torch.randn(8, 4, device=d).t(), "contiguous"),
    (lambda d: torch.ones(3, 4, dtype=torch.long, device=d), "float32, bfloat16 or float16"),
    (lambda d: torch.tensor(1.0, device=d), "scalar"),
])
def test_bad_inputs(device, bad, match):
    with pytest.raises(RuntimeError, match=match):
        hippo_ext.silu_and_mul(bad(device))


def test_the_fake_refuses_a_scalar_as_the_op_does():
    with pytest.raises(RuntimeError, match="x must have at least one dimension, got a scalar"):
        hippo_ext.silu_and_mul(torch.tensor(1.0, device="meta"))
