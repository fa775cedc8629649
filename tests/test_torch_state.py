"""hippo inside other people's stacks, which set torch's global state: autocast, a default
device or dtype, a seeded global RNG. Each gives the tokens of the same call without it (or a
clear HippoError), never other results or a failure deep inside."""
from __future__ import annotations

import pytest
import torch

import hippo_ext
from hippo.models import load_adapter
from hippo.pipeline import HippoPipeline
from hippo.preserve import PreservationOptions
from hippo.speculative.acceptance import SamplingOptions
from hippo_testing import requires_cuda
from speculative_testing import make_pair, sample_frames


def test_ops_compute_in_their_inputs_dtypes_under_a_callers_autocast():
    """The ATen calls inside the CPU references and GEMM fallbacks were cast by the caller's
    autocast: rotary_tables' fp32 angles computed in bf16 (cos off by up to 2 at position
    3000), float32 GEMM ops returning bfloat16 (their fakes say float32)."""
    positions = torch.arange(3000)[None].expand(3, 1, -1).contiguous()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8) / 8.0))
    x, weight = torch.randn(40, 64), torch.randn(32, 64)  # 40 rows: skinny_linear's at::linear
    delta, residual, norm = torch.randn(2, 64), torch.randn(2, 64), torch.rand(64) + 0.5

    def run():
        return (hippo_ext.rotary_tables(positions, inv_freq, [2, 3, 3], 1.0, torch.float32),
                hippo_ext.skinny_linear(x, weight),
                hippo_ext.add_rms_norm_linear(delta, residual, norm, 1e-6, weight, None),
                hippo_ext.silu_and_mul_linear(torch.randn(2, 128, generator=torch.Generator()
                                                          .manual_seed(0)), weight[:, :64], None))

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run()
    for a, b in zip(torch.utils._pytree.tree_leaves(plain), torch.utils._pytree.tree_leaves(cast)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["ar", "sequential", "parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_under_autocast_gives_the_tokens_of_a_plain_call(mode, dtype):
    """hippo computes in the models' dtype: a caller's autocast failed an fp32 model in every
    mode (rotary_kv_append: cache dtype Float must match the qkv dtype BFloat16) and moved a
    bf16 model's RoPE tables (other tokens, AR included)."""
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0)
    for model in (target.model, draft.model):
        model.to(dtype)
    pipeline = HippoPipeline(target, draft, mode=mode, gamma=3)
    frames = sample_frames("qwen2_5_vl", 4)
    plain = pipeline.generate(frames, "what moves?", 10, eos_token_id=None).tokens
    for cast in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=cast):
            tokens = pipeline.generate(frames, "what moves?", 10, eos_token_id=None).tokens
        assert tokens == plain


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_prompts_prepared_under_autocast_are_those_of_a_plain_call(family):
    """prepare() ran the vision towers under the caller's autocast: an fp32 model's video
    embeddings came from bf16 GEMMs, so prepare() then generate_prepared() gave other tokens
    than generate() under the same autocast (the adapters' prepare() alike)."""
    target, draft = make_pair(family, "small-draft", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3)
    frames = sample_frames(family, 4)
    plain = pipeline.prepare(frames, "what moves?")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = pipeline.prepare(frames, "what moves?")
        alone = target.prepare(frames, "what moves?")
    for a, b in zip((*plain, plain[0]), (*cast, alone)):
        assert b.inputs_embeds.dtype == a.inputs_embeds.dtype
        assert torch.equal(a.inputs_embeds, b.inputs_embeds)
        assert torch.equal(a.visual_features, b.visual_features)


def test_autocast_off_enters_no_context_where_autocast_is_off(monkeypatch):
    """runtime.step is decorated: a decode step paid ~15 us for two autocast contexts that had
    nothing to turn off (and under autocast it still turns it off)."""
    from hippo.runtime.decoder import autocast_off

    entered = []
    real = torch.autocast

    def counting(*args, **kwargs):
        entered.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", counting)
    check = autocast_off(lambda: torch.is_autocast_enabled("cpu"))
    assert check() is False and entered == []
    with real("cpu", dtype=torch.bfloat16):
        assert check() is False
    assert len(entered) == 2


@pytest.mark.parametrize("method", ["uniform", "random"])
def test_selection_ignores_the_default_device(method):
    """The uniform and random selectors made their indices on torch's default device (then
    copied them from meta, or drew with a CPU generator on a CUDA default device)."""
    target, draft = make_pair("llava_onevision", "small-draft", seed=0)
    pipeline = HippoPipeline(target, draft, mode="sequential", gamma=3,
                             preservation=PreservationOptions(method=method, keep_ratio=0.3))
    prompts = pipeline.prepare(sample_frames("llava_onevision", 4), "what moves?")
    plain = pipeline.generate_prepared(*prompts, 8, SamplingOptions(), None).tokens
    torch.set_default_device("meta")
    try:
        tokens = pipeline.generate_prepared(*prompts, 8, SamplingOptions(), None).tokens
    finally:
        torch.set_default_device(None)
    assert tokens == plain


def test_preset_weights_leave_the_callers_rng_dtype_and_device_alone():
    reference = load_adapter("tiny-qwen2.5-vl-draft", seed=3).model.state_dict()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    previous = torch.get_default_dtype()
    for default_dtype, default_device in ((torch.float64, None), (torch.bfloat16, "meta")):
        torch.manual_seed(1234)
        torch.set_default_dtype(default_dtype)
        torch.set_default_device(default_device)
        try:
            model = load_adapter("tiny-qwen2.5-vl-draft", seed=3).model
        finally:
            torch.set_default_dtype(previous)
            torch.set_default_device(None)
        assert torch.equal(torch.rand(3), expected)  # the caller's stream goes on untouched
        state = model.state_dict()
        assert all(torch.equal(state[name], value) for name, value in reference.items())


@pytest.mark.cuda
@requires_cuda
def test_parallel_decoding_with_cuda_as_the_default_device():
    """The host copy of the early verdict was made pinned on the default device: on CUDA,
    "Only dense CPU tensors can be pinned"."""
    target, draft = make_pair("qwen2_5_vl", "small-draft", seed=0, device="cuda")
    pipeline = HippoPipeline(target, draft, mode="parallel", gamma=3)
    frames = sample_frames("qwen2_5_vl", 4)
    plain = pipeline.generate(frames, "what moves?", 10, eos_token_id=None).tokens
    torch.set_default_device("cuda")
    try:
        tokens = pipeline.generate(frames, "what moves?", 10, eos_token_id=None).tokens
    finally:
        torch.set_default_device(None)
    assert tokens == plain
