"""skinny_linear against F.linear and a float64 GEMM. On CUDA the tensor-core kernel takes bf16 and
fp16 with M <= 32 and K % 32 == 0; its rows must not depend on M (bitwise), its semaphores must be
left zeroed, and it must replay inside a CUDA graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hippo_ext
from hippo_testing import capture_cuda_graph, rel_error, requires_cuda, use_fma_slices

OP = torch.ops.hippo_ext.skinny_linear.default
KERNEL_ENV = "HIPPO_SKINNY_KERNEL"  # CUDA: "fma" takes M <= 16 on the FMA kernel
FMA_MAX_ROWS = 16
# fp32 accumulation, output rounded once: one rounding step of the output dtype, relative.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def random_problem(rows, in_features, out_features, dtype, device, gen, bias=True):
    x = torch.randn(*rows, in_features, generator=gen).to(dtype).to(device)
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5)
    weight = weight.to(dtype).to(device)
    b = torch.randn(out_features, generator=gen).to(dtype).to(device) if bias else None
    return x, weight, b


@pytest.fixture(params=["mma", "fma", "fma_1_slice", "fma_8_slices"])
def cuda_kernel(request, monkeypatch):
    """The tensor-core kernel (default) and the opt-in FMA kernel (M <= 16) with its own plan of
    K slices, with one, and with eight (both ends of the plan on every shape)."""
    slices = {"fma_1_slice": "1", "fma_8_slices": "8"}.get(request.param, "planned")
    use_fma_slices(monkeypatch, slices)
    if request.param == "mma":
        monkeypatch.delenv(KERNEL_ENV, raising=False)
        return "mma"
    monkeypatch.setenv(KERNEL_ENV, "fma")
    return "fma"


def float64_linear(x, weight, bias):
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,in_features,out_features", [
    ((1,), 1, 1), ((3,), 7, 5), ((1, 9), 64, 33), ((2, 17), 96, 130), ((40,), 33, 64),
    ((2,), 0, 3), ((0,), 5, 4), ((1, 3), 4864, 17)])
def test_cpu_matches_float64(gen, dtype, rows, in_features, out_features):
    """K below, at and off the 16 partial sums, K = 0 (the bias alone), no rows."""
    x, weight, bias = random_problem(rows, in_features, out_features, dtype, "cpu", gen)
    for b in (bias, None):
        for impl in hippo_ext.linear.SKINNY_LINEAR_IMPLS:  # CUDA kernels: the same on the CPU
            out = hippo_ext.skinny_linear(x, weight, b, impl=impl)
            assert out.shape == (*rows, out_features) and out.dtype == dtype
            torch.testing.assert_close(out.double(), float64_linear(x, weight, b),
                                       rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features,out_features", [(64, 33), (897, 130), (4864, 96)])
def test_cpu_rows_do_not_depend_on_m(gen, dtype, in_features, out_features):
    """As on CUDA: a verify step's rows equal single-token steps' bit for bit, wherever the
    row sits in memory (F.linear's rows depend on M: BLAS picks its kernel by it)."""
    rows = 17
    x, weight, bias = random_problem((rows,), in_features, out_features, dtype, "cpu", gen)
    together = hippo_ext.skinny_linear(x, weight, bias)
    for m in range(rows):
        assert torch.equal(hippo_ext.skinny_linear(x[m:m + 1], weight, bias)[0], together[m])
        assert torch.equal(hippo_ext.skinny_linear(x[m:m + 1].clone(), weight, bias)[0], together[m])
    for first in (2, 9):
        assert torch.equal(hippo_ext.skinny_linear(x[:first], weight, bias), together[:first])


# (M, K, N): M across the four n8 tiles and beyond the kernel (33 -> ATen); K with one k32 block,
# a partial unroll (96), model widths; N not a multiple of 64, a single output, many tiles (no
# split), few tiles (many splits); K not a multiple of 32 -> ATen. The FMA kernel runs up to 4
# rows as two alternating batches of two warp steps (256 k each): one row over many batches
# (3584), four rows over 19 steps (4864), and 5.25 steps (1344: a partial last batch); its slices
# of K split 19 steps unevenly (4864 into 8: 2 or 3 each) and leave the last slice a partial step
# (1344, 896); 65 output pairs in 4 slices (896, 129) leave half of the last block without
# outputs, whose warps must still meet the others at the block's barrier.
CUDA_CASES = [
    (1, 32, 1), (2, 96, 10), (7, 3584, 65), (8, 4096, 64), (9, 3584, 4608), (16, 896, 1152),
    (17, 18944, 200), (24, 160, 130), (32, 4864, 896), (5, 64, 25_600), (33, 256, 128),
    (3, 100, 50), (1, 3584, 4608), (4, 4864, 896), (3, 1344, 100), (3, 896, 129),
]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,in_features,out_features", CUDA_CASES)
def test_cuda_matches_float64(gen, cuda_kernel, dtype, rows, in_features, out_features):
    x, weight, bias = random_problem((1, rows), in_features, out_features, dtype, "cuda", gen)
    workspace = hippo_ext.skinny_linear_workspace(out_features, "cuda")
    for b in (bias, None):
        out = hippo_ext.skinny_linear(x, weight, b, workspace=workspace)
        assert out.shape == (1, rows, out_features) and out.dtype == dtype
        reference = float64_linear(x, weight, b)
        assert rel_error(out, reference) < TOLERANCE[dtype]
        # Element by element against float64, not against F.linear: cuBLAS may reduce its split-K
        # partials in bf16 (torch's allow_bf16_reduced_precision_reduction), which on H200 put
        # it 3.5 bf16 steps from float64 at (7, 3584, 65). fp32 accumulation plus one final
        # rounding stays within one rounding step (TOLERANCE) of the exact value.
        torch.testing.assert_close(out.double(), reference, rtol=TOLERANCE[dtype],
                                   atol=TOLERANCE[dtype])
    torch.cuda.synchronize()
    assert (workspace == 0).all()  # every semaphore reset by its last block


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("in_features,out_features", [(3584, 4608), (18944, 3584), (896, 151_936),
                                                       (4864, 896)])
def test_cuda_rows_do_not_depend_on_m(gen, cuda_kernel, in_features, out_features):
    """A verify step's rows equal the single-token steps' bit for bit (the FMA kernel: for the
    M <= 16 it takes)."""
    rows = FMA_MAX_ROWS if cuda_kernel == "fma" else 17
    x, weight, bias = random_problem((rows,), in_features, out_features, torch.bfloat16, "cuda", gen)
    together = hippo_ext.skinny_linear(x, weight, bias)
    for m in (0, 4, 8, rows - 1):
        alone = hippo_ext.skinny_linear(x[m:m + 1].contiguous(), weight, bias)
        assert torch.equal(alone[0], together[m])
    for first in (3, 9):
        some = hippo_ext.skinny_linear(x[:first].contiguous(), weight, bias)
        assert torch.equal(some, together[:first])


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_replay(gen, cuda_kernel):
    x, weight, bias = random_problem((9,), 3584, 640, torch.bfloat16, "cuda", gen)
    workspace = hippo_ext.skinny_linear_workspace(640, "cuda")
    expected = hippo_ext.skinny_linear(x, weight, bias, workspace=workspace)
    graph, captured = capture_cuda_graph(lambda: hippo_ext.skinny_linear(x, weight, bias, workspace=workspace))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, hippo_ext.skinny_linear(x, weight, bias, workspace=workspace))


@requires_cuda
@pytest.mark.cuda
def test_cuda_fma_slices_change_the_order_of_the_sums(gen, monkeypatch):
    """HIPPO_SKINNY_FMA_SLICES reaches the FMA kernel: one slice and eight add K in other
    orders, so some of 16384 fp16 outputs round differently (about 30 expected at K = 4864),
    while both stay within one rounding step of float64."""
    monkeypatch.setenv(KERNEL_ENV, "fma")
    x, weight, bias = random_problem((1,), 4864, 16_384, torch.float16, "cuda", gen)
    outputs = []
    for slices in ("1", "8"):
        use_fma_slices(monkeypatch, slices)
        outputs.append(hippo_ext.skinny_linear(x, weight, bias))
        torch.testing.assert_close(outputs[-1].double(), float64_linear(x, weight, bias),
                                   rtol=TOLERANCE[torch.float16], atol=TOLERANCE[torch.float16])
    assert not torch.equal(*outputs)


@requires_cuda
@pytest.mark.cuda
def test_cuda_misaligned_input_falls_back(gen, cuda_kernel):
    storage = torch.randn(9 * 64 + 1, generator=gen).to(torch.bfloat16).cuda()
    x = storage[1:].view(9, 64)
    weight = torch.randn(48, 64, generator=gen).to(torch.bfloat16).cuda()
    assert torch.equal(hippo_ext.skinny_linear(x, weight), F.linear(x, weight))


@requires_cuda
@pytest.mark.cuda
def test_cuda_impl_picks_the_kernel_whatever_the_environment(gen, monkeypatch):
    """impl="fma" runs the FMA kernel without HIPPO_SKINNY_KERNEL (what the runtime's decode
    steps ask for), impl="mma" the tensor-core kernel even when it says "fma", and "auto"
    follows it. fp16 outputs of K = 4864 from the two kernels differ somewhere in 16384."""
    x, weight, bias = random_problem((1,), 4864, 16_384, torch.float16, "cuda", gen)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    tensor_cores = hippo_ext.skinny_linear(x, weight, bias)
    fma = hippo_ext.skinny_linear(x, weight, bias, impl="fma")
    assert not torch.equal(fma, tensor_cores)
    assert torch.equal(hippo_ext.skinny_linear(x, weight, bias, impl="mma"), tensor_cores)
    monkeypatch.setenv(KERNEL_ENV, "fma")
    assert torch.equal(hippo_ext.skinny_linear(x, weight, bias), fma)
    assert torch.equal(hippo_ext.skinny_linear(x, weight, bias, impl="mma"), tensor_cores)
    # more rows than the FMA kernel takes run tensor cores, as with the environment variable
    wide = x.expand(FMA_MAX_ROWS + 1, -1).contiguous()
    assert torch.equal(hippo_ext.skinny_linear(wide, weight, bias, impl="fma"),
                       hippo_ext.skinny_linear(wide, weight, bias, impl="mma"))


@pytest.mark.parametrize("impl", ["auto", "fma"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(device, gen, with_bias, impl):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x, weight, bias = random_problem((2, 3), 64, 70, dtype, device, gen, bias=with_bias)
    workspace = hippo_ext.skinny_linear_workspace(70, device)
    torch.library.opcheck(OP, (x, weight, bias, workspace), {"impl": impl})


def _good(device):
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = random_problem((3,), 64, 130, torch.float32, device, gen)
    return dict(x=x, weight=weight, bias=bias,
                workspace=hippo_ext.skinny_linear_workspace(130, device), impl="auto")


BAD_INPUTS = {
    "in_features": (lambda a: {**a, "weight": a["weight"][:, :32].contiguous()}, "features"),
    "weight_dtype": (lambda a: {**a, "weight": a["weight"].double()}, "weight dtype"),
    "weight_1d": (lambda a: {**a, "weight": a["weight"][0]}, "weight must have 2"),
    "weight_non_contiguous": (lambda a: {**a, "weight": a["weight"].t().contiguous().t()},
                              "contiguous"),
    "x_int": (lambda a: {**a, "x": a["x"].long()}, "float32, bfloat16 or float16"),
    "x_scalar": (lambda a: {**a, "x": a["x"][0, 0]}, "scalar"),
    "bias_length": (lambda a: {**a, "bias": a["bias"][:-1]}, "bias has"),
    "bias_dtype": (lambda a: {**a, "bias": a["bias"].half()}, "bias dtype"),
    "workspace_dtype": (lambda a: {**a, "workspace": a["workspace"].long()}, "workspace"),
    "workspace_small": (lambda a: {**a, "workspace": a["workspace"][:2]}, "needs ceil"),
    "impl_unknown": (lambda a: {**a, "impl": "tensor_cores"}, 'impl must be "auto", "mma"'),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(device, case):
    make_bad, match = BAD_INPUTS[case]
    args = make_bad(_good(device))
    with pytest.raises(RuntimeError, match=match):
        hippo_ext.skinny_linear(args["x"], args["weight"], args["bias"],
                                workspace=args["workspace"], impl=args["impl"])


@pytest.mark.parametrize("out_features", [1, 64, 65, 130])
def test_workspace_fits_its_out_features(out_features):
    """skinny_linear_workspace(N): zeroed int32, ceil(N / 64) semaphores (one per block of the
    kernel's outputs), which the op takes for N outputs."""
    workspace = hippo_ext.skinny_linear_workspace(out_features, "cpu")
    assert workspace.dtype == torch.int32 and not workspace.any()
    assert workspace.numel() == -(-out_features // 64)
    x, weight = torch.randn(2, 32), torch.randn(out_features, 32)
    torch.testing.assert_close(hippo_ext.skinny_linear(x, weight, workspace=workspace), x @ weight.T)


def test_scalar_weight_is_named_with_the_shared_workspace():
    """The shared workspace is sized from weight's shape: a 0-d weight must reach the op's
    check, not fail on weight.shape[0]."""
    with pytest.raises(RuntimeError, match="weight must have 2 dimensions"):
        hippo_ext.skinny_linear(torch.randn(2, 8), torch.tensor(1.0))


@requires_cuda
@pytest.mark.cuda
def test_device_mix():
    args = _good("cuda")
    with pytest.raises(RuntimeError, match="is on"):
        hippo_ext.skinny_linear(args["x"], args["weight"].cpu(), None, workspace=args["workspace"])
    with pytest.raises(RuntimeError, match="is on"):
        hippo_ext.skinny_linear(args["x"], args["weight"], None, workspace=args["workspace"].cpu())


def test_shared_workspace_grows_without_freeing_the_old_one():
    """A CUDA graph captured while a shared workspace was current keeps its address, so growing
    the workspace for a larger op must leave the old tensor alive (and zero), never free it."""
    import gc
    import weakref

    from hippo_ext import _workspace

    device = torch.device("cpu")
    small = _workspace.shared_workspace("test_growth", 10, device)
    assert small is not None and small.numel() >= 10 and not small.any()
    assert _workspace.shared_workspace("test_growth", 10, device) is small  # reused, not remade
    assert _workspace.shared_workspace("test_growth", small.numel(), device) is small  # it fits
    old = weakref.ref(small)
    grown = _workspace.shared_workspace("test_growth", small.numel() + 1, device)
    assert grown is not small and grown.numel() > small.numel() and not grown.any()
    del small
    gc.collect()
    assert old() is not None, "the replaced workspace was freed"
    wide = _workspace.shared_workspace("test_growth", 5000, device)  # beyond the 4096 minimum
    assert wide.numel() >= 5000 and not wide.any()


@pytest.mark.parametrize("op", ["skinny_linear", "decode_attention"])
def test_export_leaves_no_fake_workspace_behind(op, monkeypatch):
    """torch.export (non-strict, the default) runs the wrappers under a fake mode: a shared
    workspace first made there must not be kept, or every later eager call of the op in the
    process gets a fake workspace and returns a FakeTensor (no data) without an error."""
    from hippo_ext import _workspace

    monkeypatch.setattr(_workspace, "_SHARED", {})  # as in a fresh process: none made yet
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 8, generator=gen), torch.randn(5, 8, generator=gen)
    query, cache = torch.randn(1, 2, 2, 4, generator=gen), torch.randn(1, 2, 1, 1, 6, 4, generator=gen)
    length = torch.tensor([3])
    if op == "skinny_linear":
        call = lambda: hippo_ext.skinny_linear(x, weight)  # noqa: E731
    else:
        call = lambda: hippo_ext.decode_attention(query, cache, 0, length)  # noqa: E731

    class Calls(torch.nn.Module):
        def forward(self) -> torch.Tensor:
            return call()

    program = torch.export.export(Calls(), ())
    eager = call()
    assert type(eager) is torch.Tensor
    assert all(type(w) is torch.Tensor for w in _workspace._SHARED.values())
    torch.testing.assert_close(program.module()(), eager, rtol=0, atol=0)
