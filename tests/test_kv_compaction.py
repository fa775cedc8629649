"""kv_gather and kv_compact_ against plain-PyTorch advanced indexing.

Caches are [layers, 2, B, Hkv, S, D]. Copies are exact (raw bytes), so results are compared with
torch.equal. Slots >= K are poisoned with a sentinel first and must come back untouched.
"""
from __future__ import annotations

import pytest
import torch

import hippo_ext
from hippo_testing import capture_cuda_graph, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SENTINEL = -777.0  # exactly representable in all three dtypes

# (layers, B, Hkv, S, D): odd S; D*element size a multiple of 16 or not (1, 3 and 80 with fp16/bf16).
SHAPES = [
    (1, 1, 1, 7, 1),
    (2, 3, 2, 13, 3),
    (1, 1, 2, 9, 64),
    (3, 3, 1, 11, 80),
    (2, 1, 2, 17, 128),
]


def random_cache(shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def cache_shape(layers: int, batch: int, heads: int, positions: int, dim: int) -> tuple[int, ...]:
    return (layers, 2, batch, heads, positions, dim)


def sorted_subset(positions: int, count: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(positions, generator=gen)[:count].sort().values


def reference_gather(src: torch.Tensor, index: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    out = dst.clone()
    for b in range(index.size(0)):
        out[:, :, b, :, : index.size(1)] = src[:, :, b, :, index[b]]
    return out


def reference_compact(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return reference_gather(cache.clone(), index, cache)


# ---- kv_gather ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_matches_indexing(device, gen, dtype, shape):
    layers, batch, heads, positions, dim = shape
    src = random_cache(cache_shape(*shape), dtype, device, gen)
    count = int(torch.randint(1, positions + 1, (1,), generator=gen))
    dst = torch.full(cache_shape(layers, batch, heads, count + 2, dim), SENTINEL, dtype=dtype, device=device)
    # Any order, repeats allowed.
    index = torch.randint(0, positions, (batch, count), generator=gen).to(device)
    expected = reference_gather(src, index, dst)
    returned = hippo_ext.kv_gather(src, index, dst)
    assert returned is dst
    assert torch.equal(dst, expected)
    assert (dst[..., count:, :] == SENTINEL).all()


def test_gather_empty_index_is_a_no_op(device, gen):
    src = random_cache(cache_shape(2, 3, 2, 9, 64), torch.bfloat16, device, gen)
    dst = torch.full(cache_shape(2, 3, 2, 5, 64), SENTINEL, dtype=torch.bfloat16, device=device)
    hippo_ext.kv_gather(src, torch.empty(3, 0, dtype=torch.long, device=device), dst)
    assert (dst == SENTINEL).all()


def test_gather_identity_copies_everything(device, gen):
    src = random_cache(cache_shape(3, 1, 2, 31, 80), torch.float16, device, gen)
    dst = torch.zeros_like(src)
    hippo_ext.kv_gather(src, torch.arange(31, device=device), dst)  # 1-D index: B == 1 shorthand
    assert torch.equal(dst, src)


def test_gather_unaligned_storage(device, gen):
    """Contiguous views at an odd offset force the narrow (non-16-byte) copy path on CUDA."""
    shape = cache_shape(2, 2, 2, 15, 64)
    numel = torch.Size(shape).numel()
    src = random_cache((numel + 1,), torch.float32, device, gen)[1:].view(shape)
    dst_storage = torch.full((numel + 3,), SENTINEL, device=device)
    dst = dst_storage[3:].view(shape)
    index = torch.randint(0, 15, (2, 10), generator=gen).to(device)
    expected = reference_gather(src, index, dst)
    hippo_ext.kv_gather(src, index, dst)
    assert torch.equal(dst, expected)


# ---- kv_compact_ --------------------------------------------------------------------------------


def overlap_pattern(name: str, positions: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, K] strictly ascending index rows of one kind of heavy overlap."""
    if name == "tail_block":  # K = 2/3 S: sources and destinations overlap over 1/3 S
        row = torch.arange(positions // 3, positions)
        return row.expand(batch, -1).clone()
    if name == "every_other":
        return torch.arange(1, positions, 2).expand(batch, -1).clone()
    if name == "shift_by_one":
        return torch.arange(1, positions).expand(batch, -1).clone()
    if name == "identity":
        return torch.arange(positions).expand(batch, -1).clone()
    if name == "prefix_then_random":  # text prefix kept, then a sparse selection of the rest
        prefix = positions // 4
        rows = [torch.cat([torch.arange(prefix), prefix + sorted_subset(positions - prefix, positions // 3, gen)])
                for _ in range(batch)]
        return torch.stack(rows)
    if name == "random_sorted":  # a different subset per batch element
        return torch.stack([sorted_subset(positions, positions // 2, gen) for _ in range(batch)])
    raise ValueError(name)


PATTERNS = ["tail_block", "every_other", "shift_by_one", "identity", "prefix_then_random", "random_sorted"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_with_overlap(device, gen, pattern, dtype):
    shape = cache_shape(2, 3, 2, 37, 80)
    cache = random_cache(shape, dtype, device, gen)
    index = overlap_pattern(pattern, 37, 3, gen).to(device)
    expected = reference_compact(cache, index)
    returned = hippo_ext.kv_compact_(cache, index)
    assert returned is cache
    assert torch.equal(cache, expected)  # includes slots >= K, which must be untouched


@pytest.mark.parametrize("shape", SHAPES)
def test_compact_awkward_shapes(device, gen, shape):
    layers, batch, heads, positions, dim = shape
    cache = random_cache(cache_shape(*shape), torch.bfloat16, device, gen)
    count = int(torch.randint(0, positions + 1, (1,), generator=gen))
    index = torch.stack([sorted_subset(positions, count, gen) for _ in range(batch)]).to(device)
    expected = reference_compact(cache, index)
    hippo_ext.kv_compact_(cache, index)
    assert torch.equal(cache, expected)


def test_compact_long_rows(device, gen):
    """Several chunks per row and several column slices per row on CUDA (K > one chunk)."""
    shape = cache_shape(2, 1, 2, 3001, 128)
    cache = random_cache(shape, torch.bfloat16, device, gen)
    index = torch.cat([torch.arange(100), 100 + sorted_subset(2901, 1700, gen)]).to(device)
    expected = reference_compact(cache, index[None])
    hippo_ext.kv_compact_(cache, index)
    assert torch.equal(cache, expected)


def test_compact_unaligned_storage(device, gen):
    shape = cache_shape(1, 2, 2, 21, 40)
    numel = torch.Size(shape).numel()
    cache = random_cache((numel + 1,), torch.float16, device, gen)[1:].view(shape)
    index = torch.stack([sorted_subset(21, 9, gen) for _ in range(2)]).to(device)
    expected = reference_compact(cache, index)
    hippo_ext.kv_compact_(cache, index)
    assert torch.equal(cache, expected)


def test_compact_empty_index_is_a_no_op(device, gen):
    cache = random_cache(cache_shape(1, 2, 1, 5, 8), torch.float32, device, gen)
    before = cache.clone()
    hippo_ext.kv_compact_(cache, torch.empty(2, 0, dtype=torch.long, device=device))
    assert torch.equal(cache, before)


# ---- CUDA against the CPU implementation ------------------------------------------------------


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(gen, dtype):
    shape = cache_shape(4, 3, 2, 301, 64)
    src = random_cache(shape, dtype, "cpu", gen)
    index = torch.stack([sorted_subset(301, 120, gen) for _ in range(3)])
    dst = torch.full(cache_shape(4, 3, 2, 130, 64), SENTINEL, dtype=dtype)
    dst_cuda = dst.cuda()
    hippo_ext.kv_gather(src.cuda(), index.cuda(), dst_cuda)
    hippo_ext.kv_gather(src, index, dst)
    assert torch.equal(dst_cuda.cpu(), dst)
    cache_cuda = src.cuda()
    hippo_ext.kv_compact_(cache_cuda, index.cuda())
    hippo_ext.kv_compact_(src, index)
    assert torch.equal(cache_cuda.cpu(), src)


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_capture(gen):
    """With check=False both ops capture into a CUDA graph (no host synchronisation)."""
    shape = cache_shape(2, 1, 2, 65, 64)
    original = random_cache(shape, torch.bfloat16, "cuda", gen)
    index = sorted_subset(65, 20, gen).cuda()[None]
    cache, dst = original.clone(), torch.zeros_like(original)

    def gather_then_compact() -> None:
        hippo_ext.kv_gather(cache, index, dst, check=False)
        hippo_ext.kv_compact_(cache, index, check=False)

    graph, _ = capture_cuda_graph(gather_then_compact, warmup=False)  # one compaction: the replay's
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(dst, reference_gather(original, index, torch.zeros_like(original)))
    assert torch.equal(cache, reference_compact(original, index))


# ---- opcheck ------------------------------------------------------------------------------------


def test_opcheck_gather(device, gen):
    src = random_cache(cache_shape(2, 2, 2, 11, 16), torch.float32, device, gen)
    dst = torch.zeros(cache_shape(2, 2, 2, 6, 16), device=device)
    index = torch.randint(0, 11, (2, 5), generator=gen).to(device)
    torch.library.opcheck(torch.ops.hippo_ext.kv_gather.default, (src, index, dst))


def test_opcheck_compact(device, gen):
    cache = random_cache(cache_shape(2, 2, 2, 11, 16), torch.bfloat16, device, gen)
    index = torch.stack([sorted_subset(11, 6, gen) for _ in range(2)]).to(device)
    torch.library.opcheck(torch.ops.hippo_ext.kv_compact_.default, (cache, index))


# ---- bad inputs ---------------------------------------------------------------------------------


def gather_inputs(device: str, dtype: torch.dtype = torch.float32):
    src = torch.randn(cache_shape(2, 2, 2, 9, 8)).to(dtype).to(device)
    dst = torch.zeros(cache_shape(2, 2, 2, 4, 8), dtype=dtype, device=device)
    index = torch.tensor([[0, 2, 4], [1, 3, 8]], device=device)
    return src, index, dst


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s, i, d: (s, i.int(), d), "index must be Long"),
        (lambda s, i, d: (s, i[:1], d), r"index must be \[B, K\]"),
        (lambda s, i, d: (s, i[0], d), r"index must have 2 dimensions"),  # [K] shorthand needs B == 1
        (lambda s, i, d: (s, torch.zeros(2, 5, dtype=torch.long, device=i.device), d), "S2 = 4"),
        (lambda s, i, d: (s, i, d.half()), "src is Float but dst is Half"),
        (lambda s, i, d: (s[..., :4], i, d[..., :4]), "src must be contiguous"),
        (lambda s, i, d: (s, i, d.transpose(4, 5).contiguous().transpose(4, 5)), "dst must be contiguous"),
        (lambda s, i, d: (s[0], i, d[0]), "src must have 6 dimensions"),
        (lambda s, i, d: (s[0, 0, 0, 0], i[0], d[0, 0, 0, 0]), "src must have 6 dimensions"),  # [K] too
        (lambda s, i, d: (s.int(), i, d.int()), "float32, bfloat16 or float16"),
        (lambda s, i, d: (s, i, torch.zeros(2, 2, 3, 2, 4, 8, device=d.device)), "agree in every dimension"),
        (lambda s, i, d: (s, i, s), "must not share memory"),
        (lambda s, i, d: (s, i + 1, d), "outside|must lie in"),  # index 9 == S
        (lambda s, i, d: (s, i - 1, d), "outside|must lie in"),  # index -1
    ],
)
def test_gather_rejects_bad_input(device, mutate, message):
    src, index, dst = mutate(*gather_inputs(device))
    with pytest.raises(RuntimeError, match=message):
        hippo_ext.kv_gather(src, index, dst)


@pytest.mark.parametrize(
    "index, message",
    [
        ([[0, 2, 4], [3, 1, 5]], "strictly ascending"),
        ([[0, 2, 2], [1, 3, 5]], "strictly ascending"),
        ([[0, 2, 9], [1, 3, 5]], "outside|must lie in"),
        ([[-1, 2, 4], [1, 3, 5]], "outside|must lie in"),
        ([[0, 1, 2, 3, 4, 5, 6, 7, 7]] * 2, "strictly ascending"),  # duplicate at the end
        ([list(range(10))] * 2, "K = 10"),
    ],
)
def test_compact_rejects_bad_index(device, index, message):
    cache = torch.randn(cache_shape(2, 2, 2, 9, 8), device=device)
    before = cache.clone()
    with pytest.raises(RuntimeError, match=message):
        hippo_ext.kv_compact_(cache, torch.tensor(index, device=device))
    assert torch.equal(cache, before)  # rejected before any copy


def _int64_view_of(tensor: torch.Tensor, values: list[list[int]]) -> torch.Tensor:
    """values written into the first bytes of a float32 tensor, as an int64 tensor viewing them."""
    index = torch.tensor(values, device=tensor.device)
    view = tensor.view(-1)[:2 * index.numel()].view(torch.long).view(index.shape)
    view.copy_(index)
    return view


def test_an_index_in_the_memory_written_is_refused(device):
    """An index viewing the destination would be overwritten while it is read (the CPU copy then
    read out of bounds: a segfault)."""
    src, index, dst = gather_inputs(device)
    with pytest.raises(RuntimeError, match="index must not share memory with dst"):
        hippo_ext.kv_gather(src, _int64_view_of(dst, index.tolist()), dst)
    cache = torch.randn(cache_shape(2, 2, 2, 9, 8), device=device)
    with pytest.raises(RuntimeError, match="index must not share memory with cache"):
        hippo_ext.kv_compact_(cache, _int64_view_of(cache, [[0, 2, 4], [1, 3, 5]]))


def test_index_values_are_checked_with_nothing_to_copy():
    """On the CPU index values are checked always, also when an empty cache leaves nothing to
    copy."""
    empty = torch.randn(0, 2, 1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="outside|must lie in"):
        torch.ops.hippo_ext.kv_gather(empty, torch.tensor([[99, -5]]), torch.randn(0, 2, 1, 1, 8, 4))
    with pytest.raises(RuntimeError, match="outside|must lie in|ascending"):
        torch.ops.hippo_ext.kv_compact_(torch.randn(1, 2, 1, 1, 8, 0), torch.tensor([[99, -5, -5]]))


def test_compact_rejects_bad_cache(device):
    index = torch.tensor([[1, 2]], device=device)
    with pytest.raises(RuntimeError, match=r"must be \[layers, 2, B, Hkv, S, D\]"):
        hippo_ext.kv_compact_(torch.zeros(2, 3, 1, 2, 9, 8, device=device), index)
    with pytest.raises(RuntimeError, match="cache must be contiguous"):
        hippo_ext.kv_compact_(torch.zeros(2, 2, 1, 2, 9, 16, device=device)[..., ::2], index)


@requires_cuda
@pytest.mark.cuda
def test_device_mix_rejected():
    src, index, dst = gather_inputs("cuda")
    with pytest.raises(RuntimeError, match="index is on cpu"):
        hippo_ext.kv_gather(src, index.cpu(), dst)
    with pytest.raises(RuntimeError, match="is on cpu"):
        hippo_ext.kv_gather(src, index, dst.cpu())
    with pytest.raises(RuntimeError, match="index is on cpu"):
        hippo_ext.kv_compact_(src, index.cpu())


@requires_cuda
@pytest.mark.cuda
def test_unchecked_bad_index_stays_in_bounds(gen):
    """check=False with out-of-range / non-ascending values: entries the kernel cannot copy safely
    are skipped (the slot keeps its contents), the rest is copied, and nothing outside the tensors
    is touched. Run this test under compute-sanitizer (memcheck) to verify the last part."""
    shape = cache_shape(2, 2, 2, 9, 64)
    src = random_cache(shape, torch.bfloat16, "cuda", gen)
    bad = torch.tensor([[9, -1, 1 << 40, 3], [-(1 << 40), 8, 2, 100]], device="cuda")
    dst = torch.full(cache_shape(2, 2, 2, 4, 64), SENTINEL, dtype=torch.bfloat16, device="cuda")
    hippo_ext.kv_gather(src, bad, dst, check=False)
    torch.cuda.synchronize()
    assert torch.equal(dst[:, :, 0, :, 3], src[:, :, 0, :, 3])
    assert torch.equal(dst[:, :, 1, :, 1:3], src[:, :, 1, :, [8, 2]])
    assert (dst[:, :, 0, :, :3] == SENTINEL).all() and (dst[:, :, 1, :, [0, 3]] == SENTINEL).all()

    # Compact copies exactly the entries with k < index < S; others leave slot k as it was.
    cache = src.clone()
    hippo_ext.kv_compact_(cache, bad, check=False)
    torch.cuda.synchronize()
    expected = src.clone()
    expected[:, :, 1, :, 1] = src[:, :, 1, :, 8]
    assert torch.equal(cache, expected)


@pytest.mark.parametrize(
    "op, index, message",
    [
        ("gather", [[0, 2, 9], [1, 3, 5]], r"must lie in \[0, 9\)"),
        ("gather", [[0, 2, 4], [1, 3, 5], [-1, 3, 5]], r"must lie in \[0, 9\)"),  # B = 3
        ("compact", [[0, 2, 9], [1, 3, 5]], r"must lie in \[0, 9\)"),
        ("compact", [[0, 2, 2], [1, 3, 5]], "strictly ascending along its last dimension"),
        ("compact", [[0, 3, 2], [1, 3, 5]], "strictly ascending along its last dimension"),
        ("compact", [[1, 0, 2], [1, 3, 5]], "strictly ascending along its last dimension"),
        ("compact", [[3, 2], [1, 5]], "strictly ascending along its last dimension"),  # K = 2
    ],
)
def test_wrapper_value_checks(monkeypatch, op, index, message):
    """The checks the wrappers run for CUDA tensors, exercised on the CPU (where the C++ op would
    otherwise check first, with different messages)."""
    import hippo_ext.kv_compaction as module

    monkeypatch.setattr(module, "wants_value_check", lambda index, check: check)
    batch = len(index)
    cache = torch.randn(cache_shape(2, batch, 4, 9, 8))  # B, 2 and Hkv = 4 told apart
    before = cache.clone()
    index = torch.tensor(index)
    with pytest.raises(RuntimeError, match=message):
        if op == "gather":
            module.kv_gather(cache, index, torch.zeros(cache_shape(2, batch, 4, 3, 8)))
        else:
            module.kv_compact_(cache, index)
    assert torch.equal(cache, before)
    module.kv_compact_(cache, torch.tensor([[0, 2, 8]] * batch), check=True)  # valid passes


def test_wrapper_value_checks_of_an_empty_index(monkeypatch):
    """K = 0: nothing to check (no min() of an empty tensor) and nothing to move."""
    import hippo_ext.kv_compaction as module

    monkeypatch.setattr(module, "wants_value_check", lambda index, check: check)
    cache = torch.randn(cache_shape(2, 2, 4, 9, 8))
    before = cache.clone()
    empty = torch.zeros(2, 0, dtype=torch.long)
    module.kv_gather(cache, empty, torch.zeros(cache_shape(2, 2, 4, 3, 8)))
    module.kv_compact_(cache, empty)
    assert torch.equal(cache, before)


# Bad shapes with out-of-range values too: the op's own message (as on the CPU), not the value
# check's, which would read its bounds from the wrong dimensions.
@pytest.mark.parametrize(
    "op, mutate, message",
    [
        ("gather", lambda s, i, d: (s, i.int(), d), "index must be Long"),
        ("gather", lambda s, i, d: (s, i[0, :2], d), r"index must have 2 dimensions"),  # K == B
        ("gather", lambda s, i, d: (s[0], i, d), "src must have 6 dimensions"),
        ("gather", lambda s, i, d: (s, i, d[0]), "dst must have 6 dimensions"),
        ("gather", lambda s, i, d: (s, i[:1], d), r"index must be \[B, K\]"),
        ("gather", lambda s, i, d: (s, torch.cat([i, i], dim=1), d), "S2 = 4"),
        ("compact", lambda s, i, d: (s, i.int(), None), "index must be Long"),
        ("compact", lambda s, i, d: (s, i[:1], None), r"index must be \[B, K\]"),
    ],
)
def test_wrapper_value_checks_leave_bad_shapes_to_the_op(monkeypatch, op, mutate, message):
    import hippo_ext.kv_compaction as module

    monkeypatch.setattr(module, "wants_value_check", lambda index, check: check)
    src, index, dst = gather_inputs("cpu")
    src, index, dst = mutate(src, index + 20, dst)  # every value >= S = 9
    with pytest.raises(RuntimeError, match=message):
        if op == "gather":
            module.kv_gather(src, index, dst)
        else:
            module.kv_compact_(src, index)


def test_wide_slots(device, gen):
    """A slot wider than one pass of the CUDA block (8192 fp32 = 2048 vectors of 16 bytes)."""
    shape = cache_shape(1, 1, 1, 5, 8192)
    src = random_cache(shape, torch.float32, device, gen)
    index = torch.tensor([[1, 2, 4]], device=device)
    dst = torch.full(cache_shape(1, 1, 1, 4, 8192), SENTINEL, device=device)
    expected = reference_gather(src, index, dst)
    hippo_ext.kv_gather(src, index, dst)
    assert torch.equal(dst, expected)
    expected = reference_compact(src, index)
    hippo_ext.kv_compact_(src, index)
    assert torch.equal(src, expected)


def test_the_wrappers_index_range_check():
    """The value check the wrappers run on CUDA (one host sync), on host tensors: [lower, upper)
    inclusive of lower, exclusive of upper, any integer dtype, nothing to check when empty."""
    from hippo_ext._validation import check_index_range

    for dtype in (torch.int64, torch.int32, torch.uint8):
        check_index_range(torch.tensor([0, 7, 3], dtype=dtype), 8, "op", "index")
        check_index_range(torch.tensor([2, 8], dtype=dtype), 9, "op", "length", lower=2)
    check_index_range(torch.empty(0, dtype=torch.int64), 0, "op", "index")
    for values, lower, bounds in [([0, 8], 0, "min 0 and max 8"), ([-1, 3], 0, "min -1 and max 3"),
                                  ([1, 5], 2, "min 1 and max 5")]:
        with pytest.raises(RuntimeError, match=rf"^op: index values must lie in \[{lower}, 8\), "
                                               rf"got {bounds}$"):
            check_index_range(torch.tensor(values), 8, "op", "index", lower=lower)
    with pytest.raises(RuntimeError, match=r"^op: index values must lie in \[0, 8\), got min -1"):
        check_index_range(torch.tensor([-1, 3]), 8, "op", "index")  # lower: 0 by default


def test_the_wrappers_check_values_of_cuda_tensors_unless_opted_out():
    """CPU ops check their own values; a CUDA tensor is checked by the wrapper unless
    check=False (a fake one here: no GPU needed); a Python value is left to the schema."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hippo_ext._validation import wants_value_check

    with FakeTensorMode():
        on_cuda = torch.empty(3, dtype=torch.int64, device="cuda")
    assert wants_value_check(on_cuda, True) is True
    assert wants_value_check(on_cuda, False) is False
    assert wants_value_check(torch.empty(3, dtype=torch.int64), True) is False
    assert wants_value_check(5, True) is False
