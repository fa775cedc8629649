"""Token preservation (preserve.py) and the draft's cache of kept tokens (draft_cache.py).

The draft keeps each visual token at its *original* position id: its logits after a pruned
prefill (or a compacted full prefill, or a copy of the target's kept cache) must equal a
reference HF forward over the same kept tokens at the same positions."""
from __future__ import annotations

import pytest
import torch

import hippo_ext
from hippo.models import load_adapter
from hippo.errors import HippoError
from hippo.preserve import (PreservationOptions, kept_prompt_length, kept_prompt_positions,
                            preserve_tokens)
from hippo.runtime import LanguageModelRuntime, find_text_model
from hippo.speculative.draft_cache import (compact_to_kept, copy_kept_cache, prefill_full,
                                           prefill_pruned)
from hippo_ext.token_selection import reference_select_visual_tokens
from speculative_testing import FAMILY_PRESETS, sample_frames

NEXT_TOKEN = 65


def _prepared(family: str, device: str = "cpu", seed: int = 0, num_frames: int = 4):
    adapter = load_adapter(FAMILY_PRESETS[family][0], seed=seed, device=device)
    return adapter, adapter.prepare(sample_frames(family, num_frames), "which way does it move?")


def _target_selection_inputs(adapter, prompt, options: PreservationOptions):
    runtime = LanguageModelRuntime.from_hf(adapter.model, prompt.length + 8)
    layers = options.selection_layers(len(runtime.layers))
    query_len = options.text_query_len(prompt)
    result = runtime.prefill(prompt.inputs_embeds, prompt.position_ids, query_layers=layers,
                             query_len=query_len)
    keys = runtime.cache.tensor[list(layers), 0, 0, :, :prompt.length]
    return runtime, result.queries, keys


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
@pytest.mark.parametrize("method,per_frame", [("hippo", False), ("hippo", True),
                                              ("attention", False)])
def test_selection_equals_the_reference_op(family, method, per_frame):
    adapter, prompt = _prepared(family)
    options = PreservationOptions(keep_ratio=0.3, method=method, per_frame=per_frame)
    _, queries, keys = _target_selection_inputs(adapter, prompt, options)
    kept = preserve_tokens(prompt, options, queries, keys)
    frames, height, width = prompt.grid
    weights = options.weights if method == "hippo" else (1.0, 0.0, 0.0)
    expected = reference_select_visual_tokens(
        queries.double(), keys.double(), prompt.visual_features.double(), prompt.visual_start,
        prompt.num_visual, round(0.3 * frames * height * width), per_frame, weights,
        dtype=torch.float64).kept
    assert kept.visual.tolist() == expected.tolist()
    assert kept.positions.tolist() == kept_prompt_positions(prompt, expected).tolist()


@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("method", ["uniform", "random"])
@pytest.mark.parametrize("keep_ratio", [0.0, 0.05, 0.5, 1.0])
def test_uniform_and_random_selection(method, per_frame, keep_ratio):
    _, prompt = _prepared("llava_onevision", num_frames=3)
    frames, height, width = prompt.grid
    grid = frames * height * width
    kept = preserve_tokens(prompt, PreservationOptions(keep_ratio=keep_ratio, method=method,
                                                       per_frame=per_frame))
    visual = kept.visual.tolist()
    count = round(keep_ratio * grid)
    assert len(visual) == count + prompt.num_visual - grid  # LLaVA's newline is always kept
    assert visual[count:] == list(range(grid, prompt.num_visual))
    grid_part = visual[:count]
    assert grid_part == sorted(set(grid_part)) and all(0 <= i < grid for i in grid_part)
    if per_frame:
        per = [sum(1 for i in grid_part if i // (height * width) == t) for t in range(frames)]
        assert per == [count // frames + (t < count % frames) for t in range(frames)]
    # Text positions are all kept, in order, around the kept visual ones.
    positions = kept.positions.tolist()
    assert positions == sorted(positions) and kept.length == len(positions)
    assert len(positions) == prompt.length - prompt.num_visual + len(visual)
    assert kept.length == kept_prompt_length(prompt, keep_ratio)  # known before selection


def test_default_selection_layers_and_text_queries():
    """Pinned by value: the reference test above takes both from these same functions."""
    options = PreservationOptions()
    assert [options.selection_layers(n) for n in (1, 2, 8, 24, 28)] == [
        (0,), (0, 1), (2, 4, 6), (6, 12, 18), (7, 14, 21)]
    assert PreservationOptions(layers=(3, 1)).selection_layers(4) == (3, 1)
    for family in sorted(FAMILY_PRESETS):
        _, prompt = _prepared(family)
        after_video = prompt.length - prompt.visual_start - prompt.num_visual
        assert after_video > 1  # the question and the assistant turn follow the video
        assert options.text_query_len(prompt) == after_video
        assert PreservationOptions(query_len=5).text_query_len(prompt) == 5
        assert PreservationOptions(query_len=1).text_query_len(prompt) == 1
        assert PreservationOptions(query_len=10**6).text_query_len(prompt) == prompt.length


def test_a_prompt_ending_with_its_video_queries_with_its_last_token():
    """Nothing after the video (a prompt given as ids may end there): one query token, the
    last, by default."""
    from types import SimpleNamespace

    prompt = SimpleNamespace(length=12, visual_start=2, num_visual=10)
    assert PreservationOptions().text_query_len(prompt) == 1


def test_uniform_selection_takes_the_bin_centres():
    _, prompt = _prepared("llava_onevision", num_frames=3)
    frames, height, width = prompt.grid
    per = height * width
    count = 5

    def centres(total: int, k: int) -> list[int]:  # floor((i + 1/2) * total / k), by hand
        return [(2 * i + 1) * total // (2 * k) for i in range(k)]

    for per_frame, expected in [(False, centres(frames * per, count)),
                                (True, [t * per + i for t, quota in enumerate(
                                    [count // frames + (t < count % frames)
                                     for t in range(frames)]) for i in centres(per, quota)])]:
        ratio = count / (frames * per)
        kept = preserve_tokens(prompt, PreservationOptions(keep_ratio=ratio, method="uniform",
                                                           per_frame=per_frame))
        assert kept.visual.tolist()[:count] == expected, per_frame


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_kept_positions_are_the_text_and_the_kept_visual_tokens(family):
    _, prompt = _prepared(family)
    kept = preserve_tokens(prompt, PreservationOptions(keep_ratio=0.3, method="random"))
    start, end = prompt.visual_start, prompt.visual_start + prompt.num_visual
    visual = kept.visual.tolist()
    assert kept.positions.tolist() == (list(range(start)) + [start + v for v in visual] +
                                       list(range(end, prompt.length)))
    assert visual == sorted(set(visual))  # strictly increasing: no token twice


def test_random_selection_is_seeded():
    _, prompt = _prepared("qwen2_5_vl")
    pick = lambda seed: preserve_tokens(  # noqa: E731
        prompt, PreservationOptions(keep_ratio=0.5, method="random", seed=seed)).visual.tolist()
    assert pick(3) == pick(3) and pick(3) != pick(4)


def test_global_random_selection_has_no_quota_per_frame():
    """per_frame=False draws one subset of the whole grid: some seeds keep more tokens of one
    frame than of another (a quota per frame is what per_frame=True asks for)."""
    _, prompt = _prepared("llava_onevision", num_frames=3)
    frames, height, width = prompt.grid
    count = frames * height * width // 2
    spreads = set()
    for seed in range(4):
        kept = preserve_tokens(prompt, PreservationOptions(keep_ratio=0.5, method="random",
                                                           seed=seed)).visual.tolist()[:count]
        spreads.add(tuple(sum(1 for i in kept if i // (height * width) == t) for t in range(frames)))
    quotas = tuple(count // frames + (t < count % frames) for t in range(frames))
    assert spreads - {quotas}


def test_bad_options_are_clear_errors():
    with pytest.raises(HippoError, match="unknown selection method"):
        PreservationOptions(method="topk")
    for keep_ratio in (1.5, float("nan"), "0.5", True):  # a bool is no ratio
        with pytest.raises(HippoError, match="keep_ratio"):
            PreservationOptions(keep_ratio=keep_ratio)
    for weights in ((1, 0), (1, float("nan"), 0), (1, -1, 0), (1, float("inf"), 0), 0.5, (0, 0, 0),
                    (True, 0, 0), ("1", 0, 0), (1, -0.5, 0)):
        with pytest.raises(HippoError, match="weights"):
            PreservationOptions(weights=weights)
    assert PreservationOptions(layers=(0, 1)).selection_layers(2) == (0, 1)
    assert PreservationOptions(weights=(1, 0, 0)).weights == (1, 0, 0)  # a zero weight is fine
    for layers in ((0, 9), (0, 2), (-1,), ()):
        with pytest.raises(HippoError, match="selection layers"):
            PreservationOptions(layers=layers).selection_layers(2)
    for options, needle in ((dict(query_len="3"), "query_len"), (dict(query_len=2.5), "query_len"),
                            (dict(query_len=0), "query_len must be an integer of at least 1"),
                            (dict(layers=1), "layers"), (dict(layers=(0.5,)), "layers"),
                            (dict(seed="x"), "seed"), (dict(per_frame="yes"), "per_frame"),
                            # a generator takes neither (2**70 failed deep in torch, mid-generation)
                            (dict(seed=-1), r"seed must be in \[0, 2\*\*62\]"),
                            (dict(seed=2**70), r"seed must be in \[0, 2\*\*62\]")):
        with pytest.raises(HippoError, match=needle):
            PreservationOptions(**options)
    _, prompt = _prepared("qwen2_5_vl")
    for given in ({}, {"queries": torch.zeros(1, 1, 1, 1)}, {"keys": torch.zeros(1, 1, 1, 1)}):
        with pytest.raises(HippoError, match="needs the target's queries and keys"):
            preserve_tokens(prompt, PreservationOptions(), **given)


def _reference_logits(adapter, embeds, position_ids, cache=None):
    """The HF language model's logits of its last position (fp32), optionally after a cache.
    The explicit attention mask matters: without one, HF reads jumps in 1-D position ids as
    packed sequences and masks across them."""
    text_model, lm_head = find_text_model(adapter.model)
    past = cache.get_seq_length() if cache is not None else 0
    mask = torch.ones(1, past + embeds.shape[1], dtype=torch.long, device=embeds.device)
    out = text_model(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache,
                     attention_mask=mask, use_cache=cache is not None)
    return lm_head(out.last_hidden_state[:, -1])


def _next_token_inputs(adapter, prompt):
    ids = torch.tensor([[NEXT_TOKEN]], device=prompt.input_ids.device)
    return ids, prompt.generated_positions(0, 1)


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_pruned_draft_keeps_original_positions(device, family):
    adapter, prompt = _prepared(family, device)
    kept = preserve_tokens(prompt, PreservationOptions(keep_ratio=0.25, method="uniform"))
    draft = LanguageModelRuntime.from_hf(adapter.model, prompt.length + 8)
    ids, next_position = _next_token_inputs(adapter, prompt)
    with torch.no_grad():
        prefill_pruned(draft, prompt, kept.positions)
        assert draft.length == kept.length
        step_logits = draft.step(ids, next_position)[:, -1]
        # Reference: the HF decoder over the kept tokens at their own positions, then the next
        # token at the target's next position.
        index = kept.positions
        embeds = torch.cat([prompt.inputs_embeds[:, index], draft.embed(ids)], dim=1)
        positions = torch.cat([prompt.position_ids[..., index], next_position], dim=-1)
        expected = _reference_logits(adapter, embeds, positions)
        # Keeping every token instead gives other logits: the positions matter.
        compressed = torch.arange(kept.length + 1, device=embeds.device)
        if prompt.position_ids.dim() == 3:
            compressed = compressed[None, None].expand(3, 1, -1)
        else:
            compressed = compressed[None]
        renumbered = _reference_logits(adapter, embeds, compressed)
    error = float((step_logits - expected).abs().max())
    assert error < 1e-4
    assert float((renumbered - expected).abs().max()) > 10 * max(error, 1e-6)


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
@pytest.mark.parametrize("source", ["full+compact", "self-speculative"])
def test_compacted_cache_equals_kept_slice_of_full_cache(device, family, source):
    """full+compact and self-speculation keep the full-context keys and values of the kept
    tokens: a step over them equals HF's step over a cache sliced to the kept positions."""
    from transformers import DynamicCache

    adapter, prompt = _prepared(family, device)
    kept = preserve_tokens(prompt, PreservationOptions(keep_ratio=0.25, method="random"))
    draft = LanguageModelRuntime.from_hf(adapter.model, prompt.length + 8)
    ids, next_position = _next_token_inputs(adapter, prompt)
    with torch.no_grad():
        if source == "full+compact":
            prefill_full(draft, prompt)
            compact_to_kept(draft, kept.positions)
        else:
            target = LanguageModelRuntime.from_hf(adapter.model, prompt.length + 8)
            target.prefill(prompt.inputs_embeds, prompt.position_ids)
            copy_kept_cache(target, draft, kept.positions)
        assert draft.length == kept.length
        step_logits = draft.step(ids, next_position)[:, -1]

        text_model, _ = find_text_model(adapter.model)
        full = text_model(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids,
                          use_cache=True).past_key_values
        sliced = DynamicCache()
        for layer_index, layer in enumerate(full.layers):
            sliced.update(layer.keys[:, :, kept.positions], layer.values[:, :, kept.positions],
                          layer_index)
        expected = _reference_logits(adapter, draft.embed(ids), next_position, sliced)
    torch.testing.assert_close(step_logits, expected, rtol=1e-4, atol=1e-4)


def test_draft_prefills_start_from_an_empty_cache():
    """The pipeline reuses the draft's runtime across generations: each prefill forgets the last
    prompt's cache (else the draft continues after it, lossless but accepting little)."""
    adapter, prompt = _prepared("qwen2_5_vl")
    kept = preserve_tokens(prompt, PreservationOptions(keep_ratio=0.25, method="uniform"))
    draft = LanguageModelRuntime.from_hf(adapter.model, 2 * prompt.length + 8)
    with torch.no_grad():
        for _ in range(2):
            prefill_pruned(draft, prompt, kept.positions)
            assert draft.length == kept.length
            prefill_full(draft, prompt)
            assert draft.length == prompt.length


GLOBAL_SCORE_PROMPT = "which way does it move?"


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_global_score_equals_hf_eager_attention(family):
    """DESIGN.md's global score end to end: the runtime's prefill queries and cached keys through
    select_visual_tokens equal HF's own eager attention weights, averaged over the selection
    layers, every head and the last Lq prompt queries, on the grid's columns."""
    adapter = load_adapter(FAMILY_PRESETS[family][0], seed=0)
    frames = sample_frames(family, 4)
    prompt = adapter.prepare(frames, GLOBAL_SCORE_PROMPT)
    runtime = LanguageModelRuntime.from_hf(adapter.model, max_seq_len=prompt.length + 8)
    options = PreservationOptions()
    layers = options.selection_layers(len(runtime.layers))
    query_len = options.text_query_len(prompt)
    result = runtime.prefill(prompt.inputs_embeds, prompt.position_ids, query_layers=layers,
                             query_len=query_len)
    selected = hippo_ext.select_visual_tokens(
        result.queries, runtime.cache.layer_keys(layers, prompt.length), prompt.visual_features,
        prompt.visual_start, prompt.num_visual, keep_ratio=0.1)
    adapter.model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = adapter.model(**adapter.generate_kwargs(frames, GLOBAL_SCORE_PROMPT),
                                   output_attentions=True).attentions
    grid = prompt.grid[0] * prompt.grid[1] * prompt.grid[2]
    start, length = prompt.visual_start, prompt.length
    expected = torch.stack([attentions[layer][0, :, length - query_len:, start:start + grid]
                            for layer in layers]).mean((0, 1, 2))
    torch.testing.assert_close(selected.global_score.flatten(), expected.float(), atol=1e-7, rtol=1e-5)
