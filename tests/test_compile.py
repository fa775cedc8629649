"""Every op under torch.compile(fullgraph=True) with Inductor: traced through its fake, lowered,
and run, it gives what the eager op gives, and the tensors it mutates end up the same (opcheck
checks the fakes, but not Inductor's lowering of mutable and optional arguments)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import hippo_ext


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# op -> (a function calling it, its inputs from a generator, indices of the inputs it mutates).
# Awkward sizes: odd vocab, B = 2, a GQA group of 2, Lq = 2 of a 9-slot cache.
Case = tuple[Callable[..., object], Callable[[torch.Generator], tuple], tuple[int, ...]]
CACHE = (2, 2, 2, 2, 9, 4)  # [layers, 2, B, Hkv, S_max, D]
LENGTH = (5, 9)


def _attention_inputs(gen: torch.Generator) -> tuple:
    return _randn(gen, 2, 2, 4, 4), _randn(gen, *CACHE), torch.tensor(LENGTH)


def _rotary_inputs(gen: torch.Generator) -> tuple:
    return (_randn(gen, 2, 2, (4 + 2 * 2) * 4), _randn(gen, 2, 2, 4), _randn(gen, 2, 2, 4),
            _randn(gen, *CACHE), torch.tensor(LENGTH))


CASES: dict[str, Case] = {
    "select_visual_tokens": (
        lambda q, k, f: tuple(hippo_ext.select_visual_tokens(q, k, f, 10, 20, 7, per_frame=True)),
        lambda gen: (_randn(gen, 2, 4, 3, 5), _randn(gen, 2, 2, 40, 5), _randn(gen, 5, 2, 2, 4)), ()),
    "verify_greedy": (
        hippo_ext.verify_greedy,
        lambda gen: (torch.randint(0, 11, (2, 3), generator=gen), _randn(gen, 2, 4, 11)), ()),
    "verify_sampling": (
        hippo_ext.verify_sampling,
        lambda gen: (torch.randint(0, 11, (2, 3), generator=gen),
                     torch.rand(2, 3, 11, generator=gen).softmax(-1),
                     torch.rand(2, 4, 11, generator=gen).softmax(-1), torch.rand(2, 4, generator=gen)), ()),
    "verify_tree_greedy": (
        hippo_ext.verify_tree_greedy,
        lambda gen: (torch.randint(0, 11, (2, 3), generator=gen), torch.tensor([-1, 0, 0]),
                     _randn(gen, 2, 4, 11)), ()),
    "kv_gather": (
        hippo_ext.kv_gather,
        lambda gen: (_randn(gen, *CACHE), torch.tensor([[0, 2, 5], [1, 3, 8]]), torch.zeros(2, 2, 2, 2, 4, 4)),
        (2,)),
    "kv_compact_": (
        lambda cache, index: hippo_ext.kv_compact_(cache, index).clone(),
        lambda gen: (_randn(gen, *CACHE), torch.tensor([[0, 2, 5], [1, 3, 8]])), (0,)),
    "decode_attention": (
        lambda q, cache, length: hippo_ext.decode_attention(q, cache, 1, length), _attention_inputs, ()),
    "rms_norm": (
        lambda x, w: hippo_ext.rms_norm(x, w), lambda gen: (_randn(gen, 3, 7), _randn(gen, 7)), ()),
    "add_rms_norm": (
        lambda x, r, w: hippo_ext.add_rms_norm(x, r, w),
        lambda gen: (_randn(gen, 3, 7), _randn(gen, 3, 7), _randn(gen, 7)), ()),
    "silu_and_mul": (hippo_ext.silu_and_mul, lambda gen: (_randn(gen, 3, 10),), ()),
    "rotary_kv_append": (
        lambda qkv, cos, sin, cache, length: hippo_ext.rotary_kv_append(qkv, cos, sin, cache, 1, length),
        _rotary_inputs, (3,)),
    "rotary_tables": (
        lambda positions, inv_freq: hippo_ext.rotary_tables(positions, inv_freq, [1, 1], 1.0, torch.bfloat16),
        lambda gen: (torch.randint(0, 50, (3, 2, 2), generator=gen), torch.rand(2, generator=gen)), ()),
    "skinny_linear": (
        hippo_ext.skinny_linear, lambda gen: (_randn(gen, 3, 8), _randn(gen, 5, 8), _randn(gen, 5)), ()),
    "add_rms_norm_linear": (
        lambda x, r, w, weight: hippo_ext.add_rms_norm_linear(x, r, w, 1e-6, weight),
        lambda gen: (_randn(gen, 3, 8), _randn(gen, 3, 8), _randn(gen, 8), _randn(gen, 5, 8)), ()),
    "silu_and_mul_linear": (
        hippo_ext.silu_and_mul_linear, lambda gen: (_randn(gen, 3, 8), _randn(gen, 5, 4)), ()),
    "qkv_projection": (
        lambda x, r, w, weight, cos, sin, cache, length: hippo_ext.qkv_projection(
            x, r, w, 1e-6, weight, None, cos, sin, cache, 1, length),
        lambda gen: (_randn(gen, 2, 2, 7), _randn(gen, 2, 2, 7), _randn(gen, 7), _randn(gen, 32, 7),
                     _randn(gen, 2, 2, 4), _randn(gen, 2, 2, 4), _randn(gen, *CACHE), torch.tensor(LENGTH)),
        (6,)),
}


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def test_every_op_has_a_compile_case():
    assert set(CASES) == set(hippo_ext.OP_NAMES)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_shapes"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_inductor_matches_eager(op, gen, dynamic):
    """dynamic=True traces every size as a symbol: the fakes must not need concrete sizes."""
    fn, make_inputs, mutated = CASES[op]
    inputs = make_inputs(gen)
    eager_inputs = [x.clone() for x in inputs]
    compiled_inputs = [x.clone() for x in inputs]
    torch._dynamo.reset()
    expected = fn(*eager_inputs)
    got = torch.compile(fn, fullgraph=True, backend="inductor", dynamic=dynamic)(*compiled_inputs)
    for want, have in zip(_tensors(expected), _tensors(got), strict=True):
        assert have.shape == want.shape and have.dtype == want.dtype
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    for index in mutated:
        assert torch.equal(compiled_inputs[index], eager_inputs[index]), f"input {index} differs"
    for index in set(range(len(inputs))) - set(mutated):
        assert torch.equal(compiled_inputs[index], inputs[index]), f"input {index} was written"


class _Calls(torch.nn.Module):
    def __init__(self, fn: Callable[..., object]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *inputs: torch.Tensor) -> object:
        return self.fn(*inputs)


@pytest.mark.parametrize("op", sorted(CASES))
def test_torch_export_matches_eager(op, gen):
    """torch.export (the way into AOTInductor and other ahead-of-time stacks) keeps every op as a
    call, its mutations included."""
    fn, make_inputs, mutated = CASES[op]
    inputs = make_inputs(gen)
    eager_inputs = [x.clone() for x in inputs]
    exported_inputs = [x.clone() for x in inputs]
    expected = fn(*eager_inputs)
    program = torch.export.export(_Calls(fn), tuple(x.clone() for x in inputs))
    assert any(node.target.namespace == "hippo_ext" for node in program.graph.nodes
               if isinstance(node.target, torch._ops.OpOverload))
    got = program.module()(*exported_inputs)
    for want, have in zip(_tensors(expected), _tensors(got), strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    for index in mutated:
        assert torch.equal(exported_inputs[index], eager_inputs[index]), f"input {index} differs"


# The dispatcher runs an op's fake, not its C++ checks, whenever any argument is on the meta
# device (hippo_ext/_fake.py): the fakes must refuse what the checks refuse.

def _meta_moves() -> list[tuple[str, int]]:
    """(op, input index) for every input of an op that has more than one tensor input."""
    gen = torch.Generator().manual_seed(0)
    inputs = {op: len(make_inputs(gen)) for op, (_, make_inputs, _) in CASES.items()}
    return [(op, index) for op, count in sorted(inputs.items()) if count > 1
            for index in range(count)]


@pytest.mark.parametrize("op,moved", _meta_moves())
def test_one_meta_tensor_among_cpu_tensors_is_refused(op, moved, gen):
    """An HF weight left on meta reaching a CPU op: an error naming it, not uninitialised memory
    returned (or a tensor left unwritten) without one."""
    fn, make_inputs, _ = CASES[op]
    inputs = list(make_inputs(gen))
    inputs[moved] = inputs[moved].to("meta")
    with pytest.raises(RuntimeError, match="meta"):
        fn(*inputs)


@pytest.mark.parametrize("op", sorted(CASES))
def test_all_meta_inputs_give_the_eager_shapes(op, gen):
    fn, make_inputs, _ = CASES[op]
    inputs = make_inputs(gen)
    expected = _tensors(fn(*[x.clone() for x in inputs]))
    got = _tensors(fn(*[x.to("meta") for x in inputs]))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]
    assert all(t.is_meta for t in got)


def _cache(head_dim: int) -> torch.Tensor:
    return torch.zeros(1, 2, 1, 1, 8, head_dim)


# Raw ops with a shape their fake's arithmetic would trip over: under torch.compile the error
# must name the op and what is wrong, as the eager op's does.
BAD_SHAPES_UNDER_COMPILE = {
    "verify_tree_greedy, 1-D tokens": (
        lambda: torch.ops.hippo_ext.verify_tree_greedy(
            torch.tensor([1, 2]), torch.tensor([-1, 0]), torch.randn(1, 3, 5)),
        "tree_tokens must have 2 dimensions"),
    "rotary_tables, 1-D positions": (
        lambda: torch.ops.hippo_ext.rotary_tables(
            torch.arange(4), torch.rand(2), [], 1.0, torch.float32),
        "positions must have 2 or 3 dimensions"),
    "select_visual_tokens, 3-D features": (
        lambda: torch.ops.hippo_ext.select_visual_tokens(
            torch.randn(1, 2, 3, 4), torch.randn(1, 2, 20, 4), torch.randn(2, 2, 2), 0, 8, 4,
            False, 1.0, 1.0, 1.0, 0.5),
        "features must have 4 dimensions"),
    "select_visual_tokens, negative num_keep": (
        lambda: torch.ops.hippo_ext.select_visual_tokens(
            torch.randn(1, 2, 3, 4), torch.randn(1, 2, 20, 4), torch.randn(2, 2, 2, 3), 0, 8, -100,
            False, 1.0, 1.0, 1.0, 0.5),
        "num_keep must lie in"),
    "rotary_kv_append, head dim 0": (
        lambda: torch.ops.hippo_ext.rotary_kv_append(
            torch.randn(1, 1, 12), torch.randn(1, 1, 0), torch.randn(1, 1, 0), _cache(0), 0,
            torch.tensor([1])),
        "q/k/v width must be"),
    "qkv_projection, head dim 0": (
        lambda: torch.ops.hippo_ext.qkv_projection(
            torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.ones(4), 1e-6, torch.randn(12, 4),
            None, torch.randn(1, 1, 0), torch.randn(1, 1, 0), _cache(0), 0, torch.tensor([1])),
        "q/k/v width must be"),
    # Widths the fake's division would turn into a head count without a word: an odd D, a
    # width that is no multiple of D, no query heads left after the keys and values.
    "rotary_kv_append, odd head dim": (
        lambda: torch.ops.hippo_ext.rotary_kv_append(
            torch.randn(1, 1, 12), torch.randn(1, 1, 3), torch.randn(1, 1, 3), _cache(3), 0,
            torch.tensor([1])),
        "q/k/v width must be"),
    "rotary_kv_append, width not a multiple of the head dim": (
        lambda: torch.ops.hippo_ext.rotary_kv_append(
            torch.randn(1, 1, 13), torch.randn(1, 1, 4), torch.randn(1, 1, 4), _cache(4), 0,
            torch.tensor([1])),
        "q/k/v width must be"),
    "qkv_projection, no query heads": (  # 4 * D rows: two key and two value heads, no query
        lambda: torch.ops.hippo_ext.qkv_projection(
            torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.ones(4), 1e-6, torch.randn(16, 4),
            None, torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.zeros(1, 2, 1, 2, 8, 4), 0,
            torch.tensor([1])),
        "q/k/v width must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHAPES_UNDER_COMPILE))
def test_fakes_name_a_bad_shape(case):
    call, message = BAD_SHAPES_UNDER_COMPILE[case]
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(call, fullgraph=True, backend="eager")()


@pytest.mark.parametrize("op", ["rotary_kv_append", "qkv_projection"])
def test_fakes_read_kv_heads_and_head_dim_from_the_cache(op, gen):
    """B = 3, Hq = 1, Hkv = 2, D = 2 (CASES has B = Hkv = 2, Hq = 4, D = 4): the query heads the
    fake derives from the q/k/v width are the eager op's."""
    cache, length = torch.zeros(2, 2, 3, 2, 5, 2), torch.tensor([2, 3, 5])
    cos, sin = _randn(gen, 3, 2, 2), _randn(gen, 3, 2, 2)
    if op == "rotary_kv_append":
        fn = lambda qkv, c, s, kv, n: hippo_ext.rotary_kv_append(qkv, c, s, kv, 1, n)  # noqa: E731
        inputs = (_randn(gen, 3, 2, (1 + 2 * 2) * 2), cos, sin, cache, length)
    else:
        fn = lambda x, r, w, weight, c, s, kv, n: hippo_ext.qkv_projection(  # noqa: E731
            x, r, w, 1e-6, weight, None, c, s, kv, 1, n)
        inputs = (_randn(gen, 3, 2, 5), _randn(gen, 3, 2, 5), _randn(gen, 5), _randn(gen, (1 + 2 * 2) * 2, 5),
                  cos, sin, cache, length)
    expected = _tensors(fn(*[x.clone() for x in inputs]))
    assert expected[0].shape == (3, 2, 1, 2)
    got = _tensors(fn(*[x.to("meta") for x in inputs]))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]


# ---- autograd: the ops are inference only ------------------------------------------------------

# Ops whose outputs are integers (verdicts) or the tensor they write in place: nothing to
# differentiate through (README: the compaction ops give their destination no gradient).
# kv_compact_ is in neither test: its one floating input is the cache it writes.
WITHOUT_FLOATING_OUTPUTS = {"kv_gather", "verify_greedy", "verify_sampling", "verify_tree_greedy"}


def _with_grad_inputs(op: str, gen: torch.Generator) -> tuple[list, list]:
    """(inputs, the ones written in place) of CASES[op], every other floating input requiring grad."""
    _, make_inputs, mutated = CASES[op]
    inputs = [x.clone() for x in make_inputs(gen)]
    for index, x in enumerate(inputs):
        if x.is_floating_point() and index not in mutated:
            x.requires_grad_(True)
    return inputs, [inputs[index] for index in mutated]


@pytest.mark.parametrize("op", sorted(WITHOUT_FLOATING_OUTPUTS))
def test_ops_without_floating_outputs_run_on_inputs_that_require_grad(op, gen):
    inputs, _ = _with_grad_inputs(op, gen)
    assert any(x.requires_grad for x in inputs)
    assert not any(t.requires_grad for t in _tensors(CASES[op][0](*inputs)))


@pytest.mark.parametrize("op", sorted(set(CASES) - WITHOUT_FLOATING_OUTPUTS - {"kv_compact_"}))
def test_backward_through_an_op_is_an_error(op, gen):
    """Inputs that require grad (an nn.Parameter outside no_grad) must not give a gradient that
    is silently missing (the custom kernels: CUDA), or one that exists on the CPU only (where a
    reference is made of ATen ops): a backward through any output names the op."""
    fn = CASES[op][0]
    inputs, written = _with_grad_inputs(op, gen)
    outputs = [t for t in _tensors(fn(*inputs))
               if t.is_floating_point() and not any(t is w for w in written)]
    assert outputs and any(x.requires_grad for x in inputs)
    for output in outputs:
        assert output.requires_grad
        with pytest.raises(RuntimeError, match=f"derivative for hippo_ext::{op} is not implemented"):
            torch.autograd.grad(output.sum(), [x for x in inputs if x.requires_grad])
    with torch.no_grad():
        assert not any(t.requires_grad for t in _tensors(fn(*[x.clone() for x in inputs])))


# ---- select_visual_tokens' int arguments traced from sizes -------------------------------------

def _select_with_sizes_from_features(q: torch.Tensor, k: torch.Tensor, f: torch.Tensor) -> tuple:
    # LLaVA-OneVision's span: the grid plus one newline token; keep one token per frame
    return tuple(hippo_ext.select_visual_tokens(q, k, f, 2, f.shape[0] * 12 + 1, f.shape[0],
                                                per_frame=True))


def test_sizes_traced_from_shapes_stay_symbolic(gen):
    """num_visual and num_keep computed from a dynamic frame count: one graph for every video
    length (an int schema argument, or operator.index on the size, would specialise them)."""
    graphs = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> Callable[..., object]:
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(_select_with_sizes_from_features, fullgraph=True, backend=backend)
    for frames in (2, 5, 7):
        q, k = _randn(gen, 1, 2, 2, 4), _randn(gen, 1, 1, 100, 4)
        features = _randn(gen, frames, 3, 4, 5)
        torch._dynamo.mark_dynamic(features, 0)
        for have, want in zip(compiled(q, k, features), _select_with_sizes_from_features(q, k, features),
                              strict=True):
            assert torch.equal(have, want)
    assert len(graphs) == 1


def test_export_with_a_dynamic_frame_count(gen):
    frames = torch.export.Dim("frames", min=2, max=8)
    q, k = _randn(gen, 1, 2, 2, 4), _randn(gen, 1, 1, 100, 4)

    class Selects(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, f: torch.Tensor) -> tuple:
            return _select_with_sizes_from_features(q, k, f)

    program = torch.export.export(Selects(), (q, k, _randn(gen, 3, 3, 4, 5)),
                                  dynamic_shapes=(None, None, {0: frames}))
    features = _randn(gen, 6, 3, 4, 5)
    for have, want in zip(program.module()(q, k, features),
                          _select_with_sizes_from_features(q, k, features), strict=True):
        assert torch.equal(have, want)
