"""The language-model runtime against HF transformers on tiny random models (fp32, CPU), and
its CUDA-graph path on a GPU (skipped without one)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import hippo_ext
from hippo.errors import HippoError
from hippo.models.base import PreparedPrompt
from hippo_testing import chi_square, chi_square_critical, requires_cuda
from hippo.runtime import (LanguageModelRuntime, StaticKVCache, choose_next_token,
                           generate_autoregressive, warp_logits)
from hippo.runtime.kernel_choice import FMA_GEMM_MAX_ROWS, GEMM_PROLOGUE_OPS

VOCAB = 512
ATOL = 2e-5


def tiny_qwen2(num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0, tied: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config).eval()


def tiny_qwen2_5_vl(num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                           window_size=112, out_hidden_size=64, fullatt_block_indexes=[1],
                           tokens_per_second=2),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "mrope_section": [2, 3, 3]}),
        video_token_id=500, image_token_id=501, vision_start_token_id=502,
        vision_end_token_id=503)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def mrope_positions(length: int, offset: int = 0) -> torch.Tensor:
    """[3, 1, length] M-RoPE positions that differ per section (like a video's t/h/w)."""
    base = torch.arange(offset, offset + length)
    return torch.stack([base, base // 2 + 3, (base * 7) % 11 + base // 3])[:, None]


def linear_positions(length: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + length)[None]


# (family, builder kwargs): one config with GQA, one with Hq == Hkv per family.
CONFIGS = [
    pytest.param("qwen2", dict(num_heads=4, num_kv_heads=2), id="qwen2-gqa"),
    pytest.param("qwen2", dict(num_heads=4, num_kv_heads=4), id="qwen2-mha"),
    # The head shares the embedding's tensor (Qwen2-0.5B, LLaVA-OneVision-0.5B, Qwen2.5-VL-3B).
    pytest.param("qwen2", dict(num_heads=4, num_kv_heads=2, tied=True), id="qwen2-tied"),
    pytest.param("qwen2_5_vl", dict(num_heads=4, num_kv_heads=2), id="qwen2_5_vl-gqa"),
    pytest.param("qwen2_5_vl", dict(num_heads=4, num_kv_heads=4), id="qwen2_5_vl-mha"),
]


def build(family: str, **kwargs):
    if family == "qwen2":
        return tiny_qwen2(**kwargs), linear_positions
    return tiny_qwen2_5_vl(**kwargs), mrope_positions


def hf_logits(model, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs_embeds=embeds, position_ids=positions).logits


def text_model_of(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


@pytest.mark.parametrize("family,kwargs", CONFIGS)
def test_prefill_and_steps_match_hf_forward(family, kwargs):
    model, positions_for = build(family, **kwargs)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=64)
    prompt_len, steps = 11, [1, 5, 1]
    total = prompt_len + sum(steps)
    ids = torch.randint(0, VOCAB, (1, total))
    embeds = runtime.embed(ids)
    positions = positions_for(total)
    expected = hf_logits(model, embeds, positions)

    prefill = runtime.prefill(embeds[:, :prompt_len], positions[..., :prompt_len],
                              all_logits=True)
    torch.testing.assert_close(prefill.logits, expected[:, :prompt_len], atol=ATOL, rtol=0)
    start = prompt_len
    for count in steps:
        logits = runtime.step(ids[:, start:start + count], positions[..., start:start + count])
        torch.testing.assert_close(logits, expected[:, start:start + count], atol=ATOL, rtol=0)
        start += count
    assert runtime.length == total


@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_batch_of_two_matches_hf_per_sequence(family):
    """B = 2 through the fused ops: each sequence follows HF's forward of that sequence alone."""
    model, positions_for = build(family)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, batch=2)
    total, prompt_len = 16, 10
    ids = torch.randint(0, VOCAB, (2, total))
    embeds = runtime.embed(ids)
    positions = positions_for(total)
    batched_positions = torch.cat([positions, positions], dim=-2)  # [..., 2, S]
    expected = torch.cat([hf_logits(model, embeds[b:b + 1], positions) for b in range(2)])
    prefill = runtime.prefill(embeds[:, :prompt_len], batched_positions[..., :prompt_len],
                              all_logits=True)
    torch.testing.assert_close(prefill.logits, expected[:, :prompt_len], atol=ATOL, rtol=0)
    start = prompt_len
    for count in (1, 4, 1):
        logits = runtime.step(ids[:, start:start + count],
                              batched_positions[..., start:start + count])
        torch.testing.assert_close(logits, expected[:, start:start + count], atol=ATOL, rtol=0)
        start += count


@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_fused_projections_borrow_hf_weights(family):
    model, positions_for = build(family)
    ids = torch.randint(0, VOCAB, (1, 12))
    embeds = text_model_of(model).embed_tokens(ids).detach()
    before = hf_logits(model, embeds, positions_for(12))
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    again = LanguageModelRuntime.from_hf(model, max_seq_len=32)  # reuses the fused layout
    for layer, fused, fused_again in zip(runtime.layers, runtime.fused, again.fused):
        attention = layer.self_attn
        for name in ("qkv_weight", "qkv_bias", "gate_up_weight"):  # the same memory, not a copy
            assert getattr(fused_again, name).data_ptr() == getattr(fused, name).data_ptr()
        assert attention.q_proj.weight.data_ptr() == fused.qkv_weight.data_ptr()
        assert attention.v_proj.bias.untyped_storage().data_ptr() == \
            fused.qkv_bias.untyped_storage().data_ptr()
        assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == \
            fused.gate_up_weight.untyped_storage().data_ptr()
    torch.testing.assert_close(hf_logits(model, embeds, positions_for(12)), before,
                               atol=ATOL, rtol=0)  # the HF model still computes the same
    unfused = LanguageModelRuntime.from_hf(model, max_seq_len=32, fused=False)
    outputs = []
    for rt in (runtime, unfused):
        rt.prefill(embeds[:, :8], positions_for(8))
        outputs.append(rt.step(ids[:, 8:12], positions_for(4, 8)))
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs[1], before[:, 8:], atol=ATOL, rtol=0)


def tensors_reachable_from(root: object) -> list[torch.Tensor]:
    """Every tensor in the object graph under root (not through classes, modules or functions)."""
    import gc
    import types

    seen, found, todo = set(), [], [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        todo.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("move", ["cast", "assign", "deepcopy"])
def test_fusing_keeps_no_second_reference_to_the_weights(move):
    """Once the runtime is gone, the model holds its weights once: a model cast after hippo ran
    (`.to(dtype)`, `.to(device)`, load_state_dict(assign=True)) frees the old fused tensors, and
    a deepcopy copies them once (a reference kept on the layer held a whole copy of q/k/v and
    gate/up of the old dtype or device, and deepcopy duplicated it)."""
    import copy
    import gc
    import weakref

    model, positions_for = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    fused = [weakref.ref(getattr(f, name)) for f in runtime.fused
             for name in ("qkv_weight", "qkv_bias", "gate_up_weight")]
    del runtime
    if move == "deepcopy":
        model = copy.deepcopy(model)
    elif move == "cast":
        model.to(torch.bfloat16)
    else:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()},
                              assign=True)
    gc.collect()
    if move != "deepcopy":
        assert all(ref() is None for ref in fused)
    held = {t.untyped_storage().data_ptr() for t in tensors_reachable_from(model)}
    assert held == {t.untyped_storage().data_ptr()
                    for t in [*model.parameters(), *model.buffers()]}
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)  # fuses the new tensors
    ids = torch.randint(0, VOCAB, (1, 8))
    runtime.prefill(runtime.embed(ids), positions_for(8))


@pytest.mark.parametrize("replaced", ["self_attn.k_proj.weight", "self_attn.v_proj.bias",
                                      "mlp.up_proj.weight"])
def test_a_replaced_projection_is_fused_again(replaced):
    """A parameter that fusing made a slice, replaced afterwards (peft's merge sets `.data`,
    load_state_dict(assign=True) swaps the tensor): the old runtime says it no longer matches,
    and a new one fuses again rather than keep the old numbers of the fused tensor."""
    model, positions_for = build("qwen2")
    old = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    assert old.matches_model()
    layers = text_model_of(model).layers
    with torch.no_grad():  # in place: the runtime reads the new numbers as they are
        for layer in layers:
            layer.get_parameter(replaced).mul_(1.0)
    assert old.matches_model()
    for layer in layers:
        parameter = layer.get_parameter(replaced)
        parameter.data = torch.randn_like(parameter)
    assert not old.matches_model()
    ids = torch.randint(0, VOCAB, (1, 12))
    outputs = []
    for runtime in (LanguageModelRuntime.from_hf(model, max_seq_len=32),
                    LanguageModelRuntime.from_hf(model, max_seq_len=32, fused=False)):
        runtime.prefill(runtime.embed(ids[:, :8]), positions_for(8))
        outputs.append(runtime.step(ids[:, 8:12], positions_for(4, 8)))
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_prefill_returns_only_last_row_by_default(fused):
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, fused=fused)
    embeds = runtime.embed(torch.randint(0, VOCAB, (1, 7)))
    full = hf_logits(model, embeds, linear_positions(7))
    logits = runtime.prefill(embeds, linear_positions(7)).logits
    assert logits.shape == (1, 1, VOCAB)
    torch.testing.assert_close(logits, full[:, -1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_a_second_prefill_continues_the_cached_prefix(family, fused):
    """A prompt prefilled in three calls, the first of a single token (the cache length known
    on the host): each chunk attends to those before it and causally within itself, as HF's
    forward of the whole prompt."""
    model, positions_for = build(family)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, fused=fused)
    embeds = runtime.embed(torch.randint(0, VOCAB, (1, 13)))
    positions = positions_for(13)
    expected = hf_logits(model, embeds, positions)
    chunks = [runtime.prefill(embeds[:, start:end], positions[..., start:end],
                              all_logits=True).logits for start, end in ((0, 1), (1, 7), (7, 13))]
    assert runtime.length == 13
    torch.testing.assert_close(torch.cat(chunks, 1), expected, atol=ATOL, rtol=0)


def test_mrope_takes_one_row_of_positions_for_its_three_sections():
    """M-RoPE position ids [B, S] serve all three sections, as HF broadcasts them: a text-only
    prompt and its steps give the logits of [3, B, S] ids repeating that row."""
    model, _ = build("qwen2_5_vl")
    ids = torch.randint(0, VOCAB, (1, 12))
    logits = {}
    for name, positions in (("rows", linear_positions(12)),
                            ("sections", linear_positions(12)[None].expand(3, 1, 12))):
        runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16)
        prefill = runtime.prefill(runtime.embed(ids[:, :8]), positions[..., :8], all_logits=True)
        step = runtime.step(ids[:, 8:12], positions[..., 8:12])
        logits[name] = torch.cat([prefill.logits, step], dim=1)
    torch.testing.assert_close(logits["rows"], logits["sections"], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_rollback_then_step_equals_fresh_run(family):
    model, positions_for = build(family)
    ids = torch.randint(0, VOCAB, (1, 20))
    positions = positions_for(20)

    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    embeds = runtime.embed(ids[:, :10])
    runtime.prefill(embeds, positions[..., :10])
    runtime.step(ids[:, 10:15], positions[..., 10:15])  # drafted tokens, then rejected
    runtime.step(ids[:, 15:16], positions[..., 15:16])
    runtime.rollback(10)
    assert runtime.length == 10
    rolled = runtime.step(ids[:, 16:20], positions[..., 10:14]).clone()

    fresh = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    fresh.prefill(embeds, positions[..., :10])
    expected = fresh.step(ids[:, 16:20], positions[..., 10:14])
    torch.testing.assert_close(rolled, expected, atol=0, rtol=0)


def test_rollback_to_device_tensor():
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    ids = torch.randint(0, VOCAB, (1, 14))
    runtime.prefill(runtime.embed(ids[:, :8]), linear_positions(8))
    runtime.step(ids[:, 8:12], linear_positions(4, 8))
    runtime.rollback(torch.tensor([9]))
    assert runtime.cache.host_length is None and runtime.length == 9
    logits = runtime.step(ids[:, 12:14], linear_positions(2, 9))
    expected = hf_logits(model, runtime.embed(torch.cat([ids[:, :9], ids[:, 12:14]], 1)),
                         linear_positions(11))
    torch.testing.assert_close(logits, expected[:, 9:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_prefill_after_rollback_to_row_lengths_continues_each_row(family, fused):
    """Rows of different lengths (a right-padded prompt rolled back to each row's own length by
    a device tensor): a further prefill of S tokens continues every row's own prefix, as steps
    do, each row following HF's forward of that sequence alone. It used to mask every row as
    the longest, so the shorter rows saw the stale padding past their length."""
    model, positions_for = build(family)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, batch=3, fused=fused)
    lengths, chunk = [5, 8, 12], 4
    ids = torch.randint(0, VOCAB, (3, 16))
    embeds = runtime.embed(ids)
    positions = positions_for(16)
    runtime.prefill(embeds[:, :12], torch.cat([positions] * 3, dim=-2)[..., :12])
    runtime.rollback(torch.tensor(lengths))
    chunk_embeds = torch.stack([embeds[b, n:n + chunk] for b, n in enumerate(lengths)])
    chunk_positions = torch.cat([positions[..., n:n + chunk] for n in lengths], dim=-2)
    logits = runtime.prefill(chunk_embeds, chunk_positions, all_logits=True).logits
    assert runtime.cache.length.tolist() == [n + chunk for n in lengths]
    for b, n in enumerate(lengths):
        expected = hf_logits(model, embeds[b:b + 1], positions)[0, n:n + chunk]
        torch.testing.assert_close(logits[b], expected, atol=ATOL, rtol=0)


def test_prefill_after_rollback_to_row_lengths_refuses_overflow():
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16, batch=2)
    embeds = runtime.embed(torch.randint(0, VOCAB, (2, 12)))
    runtime.prefill(embeds, linear_positions(12).expand(2, 12))
    runtime.rollback(torch.tensor([5, 12]))
    with pytest.raises(HippoError, match="prefill of 5 positions at length 12 exceeds"):
        runtime.prefill(embeds[:, :5], linear_positions(5).expand(2, 5))
    assert runtime.cache.length.tolist() == [5, 12]  # refused before anything moved


@pytest.mark.parametrize("length,message", [
    (torch.tensor([7.9, 8.0]), "must hold integers"),
    (torch.tensor([True, False]), "must hold integers"),
    (torch.tensor([7 + 0j, 8 + 0j]), "must hold integers"),
    (torch.tensor([5, 6, 7]), r"scalar or \[B\] = \[2\]"),
    (torch.tensor([[5, 6]]), r"scalar or \[B\] = \[2\]"),
], ids=["float", "bool", "complex", "other-batch", "2-d"])
def test_rollback_to_device_tensor_refuses_floats_and_other_shapes(length, message):
    """A float length tensor was cut to integers in silence (7.9 -> 7), where an int 7.9 is
    refused; a tensor of another batch failed inside expand_as."""
    cache = StaticKVCache(1, 2, 1, 16, 4, dtype=torch.float32, device="cpu")
    cache.fill_to(9)
    with pytest.raises(HippoError, match=message):
        cache.rollback(length)
    assert cache.length.tolist() == [9, 9] and cache.host_length == 9
    cache.rollback(torch.tensor(4, dtype=torch.int32))  # a scalar serves every row
    assert cache.length.tolist() == [4, 4]


def reference_queries(model, layer: int, embeds: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """Float64 post-RoPE queries [Hq, S, D] of one layer, from the HF layer's input hidden
    states, its RMSNorm weight, q_proj and the RoPE frequencies recomputed here."""
    text_model = text_model_of(model)
    with torch.no_grad():
        hidden = model(inputs_embeds=embeds, position_ids=positions,
                       output_hidden_states=True).hidden_states[layer][0].double()
    block = text_model.layers[layer]
    norm = block.input_layernorm
    x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    x = norm.weight.double() * x
    attention = block.self_attn
    q = x @ attention.q_proj.weight.double().T + attention.q_proj.bias.double()
    head_dim = attention.head_dim
    q = q.view(q.shape[0], -1, head_dim).transpose(0, 1)  # [Hq, S, D]
    inv_freq = text_model.rotary_emb.inv_freq.double()
    if positions.dim() == 3:  # M-RoPE: frequency band i uses section i's positions
        sections = text_model.rotary_emb.mrope_section
        owner = torch.cat([torch.full((size,), i) for i, size in enumerate(sections)])
        angles = positions[owner, 0].double().T * inv_freq  # [S, D/2]
    else:
        angles = positions[0].double()[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    rotated = torch.cat([-q[..., head_dim // 2:], q[..., :head_dim // 2]], dim=-1)
    return q * angles.cos() + rotated * angles.sin()


@pytest.mark.parametrize("family,query_len", [("qwen2", 4), ("qwen2_5_vl", 4),
                                              ("qwen2_5_vl", 13)])
def test_queries_match_float64_recomputation(family, query_len):
    model, positions_for = build(family)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    embeds = runtime.embed(torch.randint(0, VOCAB, (1, 13)))
    positions = positions_for(13)
    result = runtime.prefill(embeds, positions, query_layers=[1, 0], query_len=query_len)
    assert result.queries.shape == (2, runtime.num_heads, query_len, runtime.head_dim)
    for slot, layer in enumerate([1, 0]):
        expected = reference_queries(model, layer, embeds, positions)[:, 13 - query_len:]
        torch.testing.assert_close(result.queries[slot].double(), expected, atol=1e-5, rtol=0)


def text_prompt(runtime: LanguageModelRuntime, input_ids: torch.Tensor) -> PreparedPrompt:
    length = input_ids.shape[1]
    positions = torch.arange(length)[None]
    if runtime.uses_mrope:
        positions = positions[None].expand(3, 1, length)
    return PreparedPrompt(input_ids=input_ids, inputs_embeds=runtime.embed(input_ids),
                          position_ids=positions, rope_delta=0, visual_start=0, num_visual=0,
                          grid=(0, 0, 0), visual_features=torch.zeros(0, 0, 0, 0))



@pytest.mark.parametrize("runtime_batch,prompt_batch", [(2, 2), (2, 1), (1, 2)])
def test_autoregressive_baseline_refuses_batches_above_one(runtime_batch, prompt_batch):
    """The baseline generates one sequence: a batched runtime or prompt is refused up front
    (a batch-2 runtime with a batch-2 prompt ran the prefill, then failed in Tensor.item())."""
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, batch=runtime_batch)
    prompt = text_prompt(runtime, torch.randint(0, VOCAB, (1, 6)))
    prompt.input_ids = prompt.input_ids.expand(prompt_batch, -1)
    prompt.inputs_embeds = prompt.inputs_embeds.expand(prompt_batch, -1, -1)
    prompt.position_ids = prompt.position_ids.expand(prompt_batch, -1)
    with pytest.raises(HippoError, match="one sequence: it needs a runtime of batch 1"):
        generate_autoregressive(runtime, prompt, 4)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_greedy_ar_equals_hf_generate(family):
    model, _ = build(family, seed=3)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=64)
    input_ids = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        hf = model.generate(input_ids, do_sample=False, max_new_tokens=16, eos_token_id=None,
                            pad_token_id=0, min_new_tokens=16)
    expected = hf[0, 9:].tolist()
    ours = generate_autoregressive(runtime, text_prompt(runtime, input_ids), 16)
    assert ours.tokens == expected

    # eos stops the generation and is included, as in HF generate
    eos = expected[5]
    stop = expected.index(eos) + 1
    with torch.no_grad():
        hf_eos = model.generate(input_ids, do_sample=False, max_new_tokens=16, eos_token_id=eos,
                                pad_token_id=0)
    ours_eos = generate_autoregressive(runtime, text_prompt(runtime, input_ids), 16, eos)
    assert ours_eos.tokens == hf_eos[0, 9:].tolist() == expected[:stop]


def test_sampling_is_reproducible_and_respects_top_k():
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=64)
    prompt = text_prompt(runtime, torch.randint(0, 500, (1, 6)))
    runs = [generate_autoregressive(runtime, prompt, 12, temperature=0.8, top_k=1,
                                    generator=torch.Generator().manual_seed(seed)).tokens
            for seed in (1, 2)]
    greedy = generate_autoregressive(runtime, prompt, 12).tokens
    assert runs[0] == runs[1] == greedy  # top-k 1 leaves only the argmax
    first = generate_autoregressive(runtime, prompt, 12, temperature=1.5, top_p=0.9,
                                    generator=torch.Generator().manual_seed(7)).tokens
    again = generate_autoregressive(runtime, prompt, 12, temperature=1.5, top_p=0.9,
                                    generator=torch.Generator().manual_seed(7)).tokens
    assert first == again and len(first) == 12


def test_warp_logits_matches_hf_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    logits = torch.randn(3, 50)
    expected = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(10)(
        None, TemperatureLogitsWarper(0.6)(None, logits.clone())))
    torch.testing.assert_close(warp_logits(logits, 0.6, 10, 0.7), expected)
    kept = torch.isfinite(warp_logits(logits, 1.0, 5, None)).sum(-1)
    assert kept.tolist() == [5, 5, 5]
    # Temperature 1, top-k 0 and top-p 1 warp nothing, as in HF generate (HF's top-k warper
    # given 0 keeps one token; its top-p warper given 1 drops the tokens of probability 0).
    wide = torch.cat([logits, torch.full((3, 2), -200.0)], dim=-1)
    for warped in (warp_logits(wide), warp_logits(wide, 1.0, 0, 1.0), warp_logits(wide, top_k=0)):
        torch.testing.assert_close(warped, wide, atol=0, rtol=0)
    # [..., V]: a [1, n, V] block of rows (speculative verification) warps row by row
    torch.testing.assert_close(warp_logits(logits[None], 0.6, 10, 0.7), expected[None])


def test_sampling_options_of_ints_and_numpy_scalars_sample():
    """temperature=2 or numpy scalars pass SamplingOptions' checks: they must also sample (HF's
    warpers take only a float temperature and an int top_k)."""
    import numpy as np

    from hippo.speculative.acceptance import SamplingOptions, TokenAcceptance

    logits = torch.randn(1, 50)
    for options in (dict(temperature=2), dict(temperature=np.float32(0.7), top_k=np.int64(5)),
                    dict(temperature=1, top_k=np.int32(3), top_p=np.float64(0.9))):
        sampling = SamplingOptions(**options, seed=0)
        assert TokenAcceptance(sampling, 50).choose(logits).shape == (1,)
        tokens = choose_next_token(logits, options["temperature"], options.get("top_k"),
                                   options.get("top_p"), torch.Generator().manual_seed(0))
        assert tokens.shape == (1,)


@pytest.mark.parametrize("warp", [dict(temperature=0.3), dict(temperature=2.0, top_k=4),
                                  dict(temperature=0.7, top_p=0.8)])
def test_autoregressive_sampling_follows_the_warped_distribution(warp):
    """The AR baseline draws from softmax(warp(logits)), temperature included: a chi-square test
    of 40,000 draws against HF's warpers (false alarm about 1e-6)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 1.5]])
    scores = TemperatureLogitsWarper(warp["temperature"])(None, logits.clone())
    if "top_k" in warp:
        scores = TopKLogitsWarper(warp["top_k"])(None, scores)
    if "top_p" in warp:
        scores = TopPLogitsWarper(warp["top_p"])(None, scores)
    probs = torch.softmax(scores.double(), -1)[0]
    tokens = choose_next_token(logits.expand(40_000, -1), warp["temperature"], warp.get("top_k"),
                               warp.get("top_p"), torch.Generator().manual_seed(3))
    cells = int((probs > 0).sum())
    assert chi_square(tokens, probs) < chi_square_critical(df=cells - 1)


def test_cache_overflow_is_a_clear_error():
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16)
    prompt = text_prompt(runtime, torch.randint(0, 500, (1, 10)))
    with pytest.raises(HippoError, match="prompt plus max_new_tokens beyond the cache: 10 "
                                         r"prompt tokens \+ 8 new tokens need 17 positions"):
        generate_autoregressive(runtime, prompt, 8)
    # The last new token is never fed: 7 of them need 16 positions (they were refused).
    assert len(generate_autoregressive(runtime, prompt, 7).tokens) == 7
    assert runtime.length == 16
    runtime.reset()
    runtime.prefill(prompt.inputs_embeds, prompt.position_ids)
    runtime.step(torch.zeros(1, 5, dtype=torch.long), linear_positions(5, 10))
    with pytest.raises(HippoError, match="beyond the cache"):
        runtime.step(torch.zeros(1, 2, dtype=torch.long), linear_positions(2, 15))
    assert runtime.length == 15  # the refused step changed nothing
    runtime.reset()
    with pytest.raises(HippoError, match="beyond the cache"):
        runtime.prefill(runtime.embed(torch.zeros(1, 17, dtype=torch.long)),
                        linear_positions(17))


def test_bad_inputs_are_clear_errors():
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16)
    embeds = runtime.embed(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(HippoError, match="position ids"):
        runtime.prefill(embeds, mrope_positions(4))
    with pytest.raises(HippoError, match="query_len"):
        runtime.prefill(embeds, linear_positions(4), query_layers=[0], query_len=5)
    for layer in (2, -1):  # -1 is no layer index here, not the last layer
        with pytest.raises(HippoError, match=rf"query layers \[{layer}\] out of range 0..1"):
            runtime.prefill(embeds, linear_positions(4), query_layers=[layer], query_len=1)
    with pytest.raises(HippoError, match="roll the KV cache forward"):
        runtime.rollback(3)
    with pytest.raises(HippoError, match="unsupported model type"):
        LanguageModelRuntime.from_hf(torch.nn.Linear(2, 2), max_seq_len=8)
    for size in (2.5, 0, "16"):
        with pytest.raises(HippoError, match="positive integers"):
            LanguageModelRuntime.from_hf(model, max_seq_len=size)


def test_bad_generation_requests_are_clear_errors():
    """generate_autoregressive checks its arguments as the pipeline does: no TypeError from
    range() or a comparison, no eos id that can never match."""
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16)
    prompt = text_prompt(runtime, torch.randint(0, 500, (1, 4)))
    for count in (4.5, "4", None, True, 0):
        with pytest.raises(HippoError, match="max_new_tokens must be an integer of at least 1"):
            generate_autoregressive(runtime, prompt, count)
    for eos in ("eos", 3.5, True):
        with pytest.raises(HippoError, match="eos_token_id must be a token id"):
            generate_autoregressive(runtime, prompt, 4, eos_token_id=eos)
    for eos in (VOCAB, -1, [3, 10**6]):
        with pytest.raises(HippoError, match="is not a token id"):
            generate_autoregressive(runtime, prompt, 4, eos_token_id=eos)
    with pytest.raises(HippoError, match="prompt must be a PreparedPrompt"):
        generate_autoregressive(runtime, None, 4)
    with pytest.raises(HippoError, match="runtime must be a LanguageModelRuntime, got Qwen2"):
        generate_autoregressive(model, prompt, 4)
    for sampling, message in [(dict(top_k=5), "they need a temperature > 0"),
                              (dict(top_p=0.9), "they need a temperature > 0"),
                              (dict(temperature=-1.0), "temperature must be >= 0"),
                              (dict(temperature=1.0, top_p=1.5), "top_p must be in")]:
        with pytest.raises(HippoError, match=message):  # not greedy in silence, nor HF's error
            generate_autoregressive(runtime, prompt, 4, **sampling)
    assert len(generate_autoregressive(runtime, prompt, 3, eos_token_id=[VOCAB - 1]).tokens) <= 3
    assert len(generate_autoregressive(runtime, prompt, 3, eos_token_id=0).tokens) <= 3


def test_autoregressive_timings_split_the_prefill_from_the_decoding(monkeypatch):
    """prefill_s is the prefill's time (to the first token), decode_s the steps' after it, and
    decode_s_per_token their mean over the tokens after the first. The module's clock jumps an
    hour inside the prefill and a second inside each step: wall times of a loaded machine would
    blur the split."""
    import time
    from types import SimpleNamespace

    from hippo.runtime import autoregressive

    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    prompt = text_prompt(runtime, torch.randint(0, 500, (1, 6)))
    jumped = [0.0]
    prefill, step = runtime.prefill, runtime.step

    def slow(call, seconds):
        def run(*args, **kwargs):
            jumped[0] += seconds
            return call(*args, **kwargs)
        return run

    monkeypatch.setattr(runtime, "prefill", slow(prefill, 3600.0))
    monkeypatch.setattr(runtime, "step", slow(step, 1.0))
    monkeypatch.setattr(autoregressive, "time",
                        SimpleNamespace(perf_counter=lambda: time.perf_counter() + jumped[0]))
    result = generate_autoregressive(runtime, prompt, 5)
    assert len(result.tokens) == 5 and jumped[0] == 3604.0
    assert 3600.0 <= result.prefill_s < 3601.0 and 4.0 <= result.decode_s < 5.0
    assert 1.0 <= result.decode_s_per_token < 1.25
    one = generate_autoregressive(runtime, prompt, 1)  # the prefill's token only: no step
    assert len(one.tokens) == 1 and one.decode_s < 1.0 and one.decode_s_per_token is None


@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_autoregressive_steps_feed_each_token_at_its_position(monkeypatch, family):
    """Step j feeds generated token j at prompt.generated_positions(j, 1) (rope_delta
    included). A position off by one keeps test_greedy_ar_equals_hf_generate's output (the
    tiny random model's attention is too flat to change an argmax): it is checked here."""
    model, _ = build(family)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    prompt = text_prompt(runtime, torch.randint(0, 500, (1, 6)))
    prompt.rope_delta = 3
    fed = []
    step = runtime.step

    def spy_step(input_ids, position_ids):
        fed.append((input_ids.tolist(), position_ids.clone()))
        return step(input_ids, position_ids)

    monkeypatch.setattr(runtime, "step", spy_step)
    tokens = generate_autoregressive(runtime, prompt, 5).tokens
    assert [ids for ids, _ in fed] == [[[token]] for token in tokens[:-1]]
    for j, (_, positions) in enumerate(fed):
        assert torch.equal(positions, prompt.generated_positions(j, 1))
        assert positions.flatten().tolist() == [6 + 3 + j] * positions.numel()


def test_generation_result_rates_by_hand():
    from hippo.runtime.autoregressive import GenerationResult

    fresh = GenerationResult()
    assert (fresh.tokens, fresh.prefill_s, fresh.decode_s) == ([], 0.0, 0.0)
    assert fresh.decode_s_per_token is None
    assert GenerationResult(tokens=[7], decode_s=0.5).decode_s_per_token is None
    assert GenerationResult(tokens=[7, 8], decode_s=0.5).decode_s_per_token == 0.5
    assert GenerationResult(tokens=[7, 8, 9, 1, 2], decode_s=0.5).decode_s_per_token == 0.125


def test_bad_prompt_inputs_are_refused_before_the_cache_moves():
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16)
    ids = torch.randint(0, 500, (1, 4))
    embeds = runtime.embed(ids)
    for bad_embeds, bad_positions, message in [
            (runtime.embed(ids[:, :0]), linear_positions(0), "no token"),
            (embeds[0], linear_positions(4), "floating tensor"),
            (ids, linear_positions(4), "embeddings, not token ids"),
            (embeds.long(), linear_positions(4), "floating tensor"),
            (embeds[..., :32], linear_positions(4), "width 32 do not fit this model's hidden size 64"),
            (embeds.tolist(), linear_positions(4), "inputs_embeds must be a tensor"),
            (embeds, linear_positions(4).float(), "position_ids must be an integer tensor"),
            (embeds, [[0, 1, 2, 3]], "position_ids must be an integer tensor")]:
        with pytest.raises(HippoError, match=message):
            runtime.prefill(bad_embeds, bad_positions)
        assert runtime.length == 0
    for bad_batch in (2, 0):  # not broadcast, nor an error deep in the cache write
        message = f"batch {bad_batch} does not match the runtime's batch 1"
        with pytest.raises(HippoError, match=message):
            runtime.prefill(embeds.expand(bad_batch, 4, 64),
                            linear_positions(4).expand(bad_batch, 4))
        assert runtime.length == 0
    for layers, query_len, message in [(["a"], 2, "query_layers"), (1, 2, "query_layers"),
                                       ([0], 2.5, "query_len"), ([0], 0, "query_len")]:
        with pytest.raises(HippoError, match=message):
            runtime.prefill(embeds, linear_positions(4), query_layers=layers, query_len=query_len)
        assert runtime.length == 0
    assert runtime.prefill(embeds, linear_positions(4), query_layers=iter([0, 1]),
                           query_len=2).queries.shape[0] == 2
    for bad, message in [(torch.tensor([[VOCAB]]), rf"input_ids must lie in \[0, {VOCAB}\)"),
                         (torch.tensor([[-1]]), "input_ids must lie in"),
                         (torch.tensor([[1.0]]), "input_ids must be an integer tensor"),
                         ([[1, 2]], "input_ids must be an integer tensor")]:
        with pytest.raises(HippoError, match=message):
            runtime.embed(bad)


def test_bad_steps_are_refused_before_the_cache_moves():
    """A step of another batch than the runtime's, or of a token count outside 1..64
    (decode_attention's query block), is refused with the length unchanged."""
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=128)
    runtime.prefill(runtime.embed(torch.zeros(1, 4, dtype=torch.long)), linear_positions(4))
    with pytest.raises(HippoError, match="batch 2 does not match the runtime's batch 1"):
        runtime.step(torch.zeros(2, 1, dtype=torch.long), linear_positions(1, 4).expand(2, 1))
    for count in (0, 65):
        with pytest.raises(HippoError, match=f"a step takes 1..64 tokens, got {count}"):
            runtime.step(torch.zeros(1, count, dtype=torch.long), linear_positions(count, 4))
    assert runtime.length == 4
    logits = runtime.step(torch.zeros(1, 64, dtype=torch.long), linear_positions(64, 4))
    assert logits.shape == (1, 64, VOCAB)


def test_steps_refuse_float_ids_and_positions_before_the_cache_moves():
    """As prefill does: float position ids were cut to integers in silence (4.7 -> 4), and
    float token ids failed inside the embedding lookup after the cache length had advanced, as
    ids out of the vocabulary did (an unnamed IndexError on the CPU)."""
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16)
    runtime.prefill(runtime.embed(torch.zeros(1, 4, dtype=torch.long)), linear_positions(4))
    ids = torch.zeros(1, 1, dtype=torch.long)
    for bad_ids, bad_positions, message in [
            (ids, linear_positions(1, 4) + 0.7, "position_ids must be an integer tensor"),
            (ids.float(), linear_positions(1, 4), "input_ids must be an integer tensor"),
            (ids, [[4]], "position_ids must be an integer tensor"),
            (ids + VOCAB, linear_positions(1, 4),
             rf"^input_ids must lie in \[0, {VOCAB}\), got ids from {VOCAB} to {VOCAB}$"),
            (torch.tensor([[3, -1]]), linear_positions(2, 4), "got ids from -1 to 3")]:
        with pytest.raises(HippoError, match=message):
            runtime.step(bad_ids, bad_positions)
        assert runtime.length == 4
    # The last id of the vocabulary is in.
    assert runtime.step(ids + VOCAB - 1, linear_positions(1, 4)).shape == (1, 1, VOCAB)


def _failing_once(monkeypatch, runtime, error: Exception):
    """Make the runtime's next layer pass raise `error` (after the cache length advanced)."""
    logits = runtime._logits

    def fail(*args, **kwargs):
        monkeypatch.setattr(runtime, "_logits", logits)
        raise error

    monkeypatch.setattr(runtime, "_logits", fail)


@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_a_step_or_prefill_that_fails_part_way_leaves_the_cache_as_it_was(monkeypatch, family):
    """Memory running out in a long prefill, or any error after the length advanced, left the
    cache longer than what it held: the next prefill or step then attended to scratch
    positions or was refused for room. The length comes back, and the runtime goes on as if the
    failed call had never been made."""
    model, positions_for = build(family)
    failing = LanguageModelRuntime.from_hf(model, max_seq_len=24)
    clean = LanguageModelRuntime.from_hf(model, max_seq_len=24)
    prompt = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    embeds = failing.embed(prompt)
    _failing_once(monkeypatch, failing, torch.OutOfMemoryError("out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        failing.prefill(embeds, positions_for(16))
    assert failing.length == 0 and failing.cache.length.tolist() == [0]
    for runtime in (failing, clean):
        runtime.prefill(embeds, positions_for(16))
    ids = torch.tensor([[7, 8, 9]])
    _failing_once(monkeypatch, failing, RuntimeError("a kernel failed"))
    with pytest.raises(RuntimeError, match="a kernel failed"):
        failing.step(ids, positions_for(3, 16))
    assert failing.length == 16 and failing.cache.length.tolist() == [16]
    # The cache still has room for the 8 positions left, and the steps equal a clean runtime's.
    for count in (3, 5):
        args = ids.repeat(1, 2)[:, :count], positions_for(count, failing.length)
        torch.testing.assert_close(failing.step(*args), clean.step(*args), atol=0, rtol=0)
    assert failing.length == clean.length == 24


def test_an_interrupted_prefill_leaves_the_cache_as_it_was(monkeypatch):
    """Ctrl-C in a long prefill (a KeyboardInterrupt, no Exception) left the length advanced
    over positions never written: the next step attended to them."""
    model, positions_for = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=24)
    embeds = runtime.embed(torch.randint(0, VOCAB, (1, 16)))
    _failing_once(monkeypatch, runtime, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        runtime.prefill(embeds, positions_for(16))
    assert runtime.length == 0 and runtime.cache.length.tolist() == [0]


def test_finite_rows_flags_nan_and_inf_in_three_ops():
    """NaN, +inf and -inf rows are flagged, large finite fp16 rows are not; three ATen ops (a
    kernel each on CUDA: torch.isfinite alone took four), in bool or int64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hippo.runtime.autoregressive import finite_rows

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in (torch.ops.aten.empty.memory_format,):  # an allocation, no kernel
                self.ops.append(func)
            return func(*args, **(kwargs or {}))

    logits = torch.full((4, 8), 60000.0, dtype=torch.float16)  # sums past fp16's range
    logits[1, 3], logits[2, 0], logits[3, 7] = float("nan"), float("inf"), float("-inf")
    for dtype, expected in [(torch.bool, [True, False, False, False]), (torch.int64, [1, 0, 0, 0])]:
        with Ops() as ops:
            finite = finite_rows(logits, dtype)
        assert finite.dtype == dtype and finite.tolist() == expected
        assert len(ops.ops) == 3, ops.ops
    # [..., V]: the rows of a [B, n, V] step's logits, each over its own vocabulary.
    assert finite_rows(logits.view(2, 2, 8)).tolist() == [[True, False], [False, False]]


def test_queries_are_refused_for_a_batch_above_one():
    """Token selection reads the queries of one prompt: a batch of two is refused, not answered
    with row 0's queries."""
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16, batch=2)
    embeds = runtime.embed(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(HippoError, match="batch 1 only"):
        runtime.prefill(embeds, linear_positions(4).expand(2, 4), query_layers=[0], query_len=2)
    assert runtime.length == 0
    assert runtime.prefill(embeds, linear_positions(4).expand(2, 4)).queries is None


def test_bad_cache_lengths_and_options_are_clear_errors():
    model, _ = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=16)
    runtime.prefill(runtime.embed(torch.zeros(1, 6, dtype=torch.long)), linear_positions(6))
    for length in (3.7, "2", None):  # never cut to an int in silence
        with pytest.raises(HippoError, match="rollback: length must be an integer"):
            runtime.rollback(length)
    assert runtime.length == 6
    runtime.rollback(__import__("numpy").int64(4))
    assert runtime.length == 4
    with pytest.raises(HippoError, match="fill_to: length must be an integer"):
        runtime.cache.fill_to(2.5)
    for counts in ([2.5], ["a"], 3):
        with pytest.raises(HippoError, match="a step takes|counts must be an iterable"):
            runtime.capture_steps(counts)
    for option, value in [("fused", "no"), ("skinny_gemm", "no"), ("use_cuda_graphs", "no"),
                          ("gemm_prologues", 1), ("step_invariant", None)]:
        allowed = "True, False or None" if option in ("fused", "use_cuda_graphs") else "True or False"
        with pytest.raises(HippoError, match=f"{option} must be {allowed}, got"):
            LanguageModelRuntime.from_hf(model, max_seq_len=8, **{option: value})
    with pytest.raises(HippoError, match=r"unknown step_attention 'flash'; choose one of \("):
        LanguageModelRuntime.from_hf(model, max_seq_len=8, step_attention="flash")
    with pytest.raises(HippoError, match="use_cuda_graphs=True needs the model on a CUDA device"):
        LanguageModelRuntime.from_hf(model, max_seq_len=8, use_cuda_graphs=True)


def test_a_model_in_a_dtype_the_kernels_do_not_take_is_refused():
    """A float64 model failed in its first prefill, inside rotary_tables, with a RuntimeError;
    it is refused by name when the runtime is built, before its weights are fused."""
    model, _ = build("qwen2")
    model.double()
    with pytest.raises(HippoError, match=r"^the model's dtype must be one of float32, bfloat16, "
                                         r"float16, got torch.float64$"):
        LanguageModelRuntime.from_hf(model, max_seq_len=16)
    assert model.model.layers[0].self_attn.q_proj.weight._base is None  # nothing fused


def test_sliding_window_layers_are_refused():
    """The runtime's steps attend to every cached position: a model with sliding-window layers
    is refused by name, not decoded with attention its layers do not have."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding_attention" in config.layer_types
    with pytest.raises(HippoError, match="sliding-window attention layers are not supported"):
        LanguageModelRuntime.from_hf(Qwen2ForCausalLM(config).eval(), max_seq_len=16)


def test_static_cache_layout_and_rollback():
    cache = StaticKVCache(3, 1, 2, 8, 4, dtype=torch.float32, device="cpu")
    assert cache.tensor.shape == (3, 2, 1, 2, 8, 4) and cache.length.dtype == torch.int64
    cache.reserve(3)
    cache.advance(3)
    keys = torch.randn(1, 2, 3, 4)
    cache.write(1, keys, -keys, cache.write_positions(3))
    torch.testing.assert_close(cache.tensor[1, 0, :, :, :3], keys)
    torch.testing.assert_close(cache.tensor[1, 1, :, :, :3], -keys)
    before = cache.tensor.clone()
    cache.rollback(1)
    assert cache.length.tolist() == [1] and torch.equal(cache.tensor, before)
    with pytest.raises(HippoError, match="beyond the cache"):
        cache.reserve(8)


def test_static_cache_lengths_at_their_bounds():
    """A cache fills to exactly max_seq_len, its last position written where it belongs;
    rollback and fill_to take 0, the current length and max_seq_len and refuse -1,
    max_seq_len + 1 and a roll forward; reset empties it on the device and the host."""
    cache = StaticKVCache(1, 1, 1, 4, 2, dtype=torch.float32, device="cpu")
    cache.check_room(1, 3)  # 1 + 3 = max_seq_len fits
    cache.reserve(4)
    cache.advance(4)
    positions = cache.write_positions(4)
    assert positions.tolist() == [[0, 1, 2, 3]]
    keys = torch.randn(1, 1, 4, 2)
    cache.write(0, keys, -keys, positions)
    torch.testing.assert_close(cache.keys(0), keys)
    with pytest.raises(HippoError, match="append of 1 positions at length 4 exceeds"):
        cache.reserve(1)
    cache.rollback(4)  # to its own length: forgets nothing
    assert (cache.host_length, cache.length.tolist()) == (4, [4])
    for length in (-1, 5):
        with pytest.raises(HippoError, match=f"cannot roll the KV cache back to length {length}"):
            cache.rollback(length)
    cache.rollback(0)
    assert (cache.host_length, cache.length.tolist()) == (0, [0])
    with pytest.raises(HippoError, match="roll the KV cache forward from length 0 to 1"):
        cache.rollback(1)
    for length in (-1, 5):
        with pytest.raises(HippoError, match=f"cannot fill the KV cache to length {length}"):
            cache.fill_to(length)
    for length in (4, 0, 3):
        cache.fill_to(length)
        assert (cache.host_length, cache.length.tolist()) == (length, [length])
    cache.reset()
    assert (cache.host_length, cache.length.tolist()) == (0, [0])
    for sizes in ((0, 1, 1, 4, 2), (1, 0, 1, 4, 2), (1, 1, 0, 4, 2), (1, 1, 1, 0, 2), (1, 1, 1, 4, 0),
                  (1, 1, 1, 4.0, 2)):
        with pytest.raises(HippoError, match="sizes must be positive integers"):
            StaticKVCache(*sizes, dtype=torch.float32, device="cpu")


def test_writes_stay_in_the_buffer_while_the_host_does_not_know_the_length():
    """After a rollback to a device tensor the host checks no overflow: positions past the
    buffer, or before it where a row holds fewer than `count`, are clamped into it (an index
    out of the buffer fails or writes elsewhere). An integer rollback makes the length known
    again, and current_length reads the longest row from the device meanwhile."""
    cache = StaticKVCache(1, 2, 1, 4, 2, dtype=torch.float32, device="cpu")
    cache.fill_to(4)
    cache.rollback(torch.tensor([0, 4]))
    cache.reserve(2)  # not checked: the host does not know the length
    cache.advance(2)
    assert cache.host_length is None and cache.current_length() == 6
    positions = cache.write_positions(3)
    assert positions.tolist() == [[0, 0, 1], [3, 3, 3]]
    keys = torch.randn(2, 1, 3, 2)
    cache.write(0, keys, keys, positions)
    torch.testing.assert_close(cache.keys(0)[1, :, 3], keys[1, :, 2])
    cache.rollback(3)
    assert (cache.host_length, cache.length.tolist()) == (3, [3, 3])


@pytest.mark.parametrize("layers, is_view", [((1, 3, 5), True), ((2,), True), ((0, 1, 2, 3, 4, 5), True),
                                            ((1, 2, 5), False), ((4, 1), False), ((2, 2), False),
                                            ((1, 4), True)])
def test_layer_keys_are_a_view_when_evenly_spaced(gen, layers, is_view):
    cache = StaticKVCache(6, 2, 3, 16, 8, dtype=torch.float32, device="cpu")
    cache.tensor.copy_(torch.randn(cache.tensor.shape, generator=gen))
    keys = cache.layer_keys(layers, 11, row=1)
    expected = torch.stack([cache.tensor[layer, 0, 1, :, :11] for layer in layers])
    assert torch.equal(keys, expected)
    assert (keys.untyped_storage().data_ptr() == cache.tensor.untyped_storage().data_ptr()) == is_view
    first_row = torch.stack([cache.tensor[layer, 0, 0, :, :11] for layer in layers])
    assert torch.equal(cache.layer_keys(layers, 11), first_row)  # row 0 by default


def test_cpu_decode_attention_backend_matches_sdpa(monkeypatch):
    """The hippo_ext op on the CPU through the runtime's CUDA code path (layout, length, scale);
    each backend's steps run that backend (prefill runs SDPA with either)."""
    model, positions_for = build("qwen2_5_vl")
    ids = torch.randint(0, VOCAB, (1, 16))
    positions = positions_for(16)
    assert LanguageModelRuntime.from_hf(model, max_seq_len=32).step_attention == "sdpa"  # HF's
    calls = count_calls(monkeypatch, hippo_ext, ("decode_attention",))
    outputs = []
    for backend in ("sdpa", "hippo_ext"):
        runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, step_attention=backend)
        runtime.prefill(runtime.embed(ids[:, :10]), positions[..., :10])
        outputs.append(runtime.step(ids[:, 10:16], positions[..., 10:16]))
        assert len(calls) == (len(runtime.layers) if backend == "hippo_ext" else 0)
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)


def _compute_ops_per_step(runtime, ids, positions) -> int:
    """aten/hippo_ext ops of one step that are not views (a proxy for kernels on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if not (func.is_view or "view" in name or name.startswith("aten.t.")):
                CountOps.count += 1
            return func(*args, **(kwargs or {}))

    with CountOps():
        runtime.step(ids, positions)
    return CountOps.count


def test_fused_layers_run_nine_ops_per_layer():
    """Guards the fusion (the step's kernel count decides its speed on a GPU): per layer, two
    RMSNorms, four GEMMs, RoPE + cache append, attention and the gating, nothing else."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    counts = {}
    for layers in (2, 3):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2)).eval()
        runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, step_attention="hippo_ext")
        assert runtime.fused is not None
        ids = torch.randint(0, VOCAB, (1, 12))
        runtime.prefill(runtime.embed(ids[:, :8]), linear_positions(8))
        counts[layers] = _compute_ops_per_step(runtime, ids[:, 8:12], linear_positions(4, 8))
    assert counts[3] - counts[2] == 9


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda,
                                                                        pytest.mark.cuda])])
@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_fused_layers_match_hf_modules_in_bf16(family, device):
    """The fused ops keep HF's rounding points: in bf16 the fused path stays within bf16
    noise of HF's own modules (the GEMMs of fused weights may round differently)."""
    model, positions_for = build(family)
    model = model.to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 20), device=device)
    positions = positions_for(20).to(device)
    logits = []
    for fused in (True, False):
        runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, fused=fused,
                                               use_cuda_graphs=False)
        assert (runtime.fused is not None) == fused
        prefill = runtime.prefill(runtime.embed(ids[:, :12]), positions[..., :12],
                                  all_logits=True).logits
        steps = [runtime.step(ids[:, 12:13], positions[..., 12:13]),
                 runtime.step(ids[:, 13:20], positions[..., 13:20])]
        logits.append(torch.cat([prefill, *steps], dim=1).double())
    error = (logits[0] - logits[1]).norm() / logits[1].norm()
    assert error < 1e-2


def step_logits(model, positions_for, device, **options) -> torch.Tensor:
    """Logits of three decode steps, a 5-token verify step and a 17-token step after a
    12-token prefill, through a runtime built with `options`."""
    ids = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, 37), generator=ids).to(device)
    positions = positions_for(37).to(device)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=48, **options)
    runtime.prefill(runtime.embed(ids[:, :12]), positions[..., :12])
    steps = [runtime.step(ids[:, 12 + i:13 + i], positions[..., 12 + i:13 + i]).clone()
             for i in range(3)]
    for start, end in ((15, 20), (20, 37)):
        steps.append(runtime.step(ids[:, start:end], positions[..., start:end]).clone())
    return torch.cat(steps, dim=1).double()


# Runtime options that change which kernels run, not what they compute (on the CPU
# skinny_linear's reference sums in its own order, so within fp32 rounding): skinny_linear for
# the GEMMs; the norms and gating inside the GEMMs (in the single-token steps).
# fma_decode: every GEMM of the single-token steps on skinny_linear's FMA kernel (the CUDA
# default, so asked for and refused both).
KERNEL_OPTIONS = {"skinny_gemm": dict(skinny_gemm=True),
                  "gemm_prologues": dict(gemm_prologues=True),
                  "fma_decode": dict(fma_decode=True), "no fma_decode": dict(fma_decode=False)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda,
                                                                        pytest.mark.cuda])])
@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
@pytest.mark.parametrize("option", list(KERNEL_OPTIONS))
def test_kernel_options_match_the_default_runtime(device, family, option):
    """Within fp32 rounding on the CPU (skinny_linear's CPU reference sums in its own order,
    not BLAS's); within bf16 noise on CUDA."""
    model, positions_for = build(family)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = model.to(device=device, dtype=dtype)
    default = step_logits(model, positions_for, device)
    changed = step_logits(model, positions_for, device, **KERNEL_OPTIONS[option])
    assert (default - changed).norm() / changed.norm() < (1e-6 if device == "cpu" else 1e-2)


def count_calls(monkeypatch, module, names: tuple[str, ...]) -> list[str]:
    """Wrap module.<name> for each name so that every call appends its name to the list returned."""
    calls: list[str] = []
    for name in names:
        def counted(*args, _op=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def count_fma_gemms(monkeypatch) -> list[str]:
    """Wrap hippo_ext.skinny_linear: the list returned gets "fma" for every call that asks for
    the FMA kernel."""
    calls: list[str] = []
    skinny_linear = hippo_ext.skinny_linear

    def counted(*args, impl="auto", **kwargs):
        if impl == "fma":
            calls.append(impl)
        return skinny_linear(*args, impl=impl, **kwargs)
    monkeypatch.setattr(hippo_ext, "skinny_linear", counted)
    return calls


@pytest.mark.parametrize("gemm_prologues,batch", [(False, 1), (True, 1), (True, 2)])
def test_gemm_prologues_run_in_decode_steps_only(monkeypatch, gemm_prologues, batch):
    """The fused GEMM ops serve steps of up to FMA_GEMM_MAX_ROWS rows, batch x tokens
    (their kernel's cost grows with the rows): every layer's q/k/v (the first adding a zero
    residual), gate/up and down GEMM; o_proj and the output head then take their FMA kernel
    too. Wider steps, batched ones included, and prefill keep the ops apart around cuBLAS, as
    every step does without the option."""
    model, positions_for = build("qwen2")
    ids = torch.randint(0, VOCAB, (batch, 30))
    positions = torch.cat([positions_for(30)] * batch, dim=-2)
    calls = count_calls(monkeypatch, hippo_ext, GEMM_PROLOGUE_OPS)
    fma_gemms = count_fma_gemms(monkeypatch)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, batch=batch,
                                           gemm_prologues=gemm_prologues)
    runtime.prefill(runtime.embed(ids[:, :20]), positions[..., :20])
    wide = FMA_GEMM_MAX_ROWS + 1
    runtime.step(ids[:, 20:20 + wide], positions[..., 20:20 + wide])
    assert calls == [] and fma_gemms == []
    start = 20 + wide
    runtime.step(ids[:, start:start + 1], positions[..., start:start + 1])
    layers = len(runtime.layers)
    narrow = batch <= FMA_GEMM_MAX_ROWS
    expected = {"qkv_projection": layers, "add_rms_norm_linear": layers,
                "silu_and_mul_linear": layers} if gemm_prologues and narrow else {}
    assert {name: calls.count(name) for name in set(calls)} == expected
    assert len(fma_gemms) == (layers + 1 if gemm_prologues and narrow else 0)  # o_proj, head


@pytest.mark.parametrize("batch", [1, 2])
def test_fma_decode_runs_every_gemm_of_decode_steps_on_the_fma_kernel(monkeypatch, batch):
    """fma_decode: the q/k/v, o_proj, gate/up and down GEMMs of every layer and the output head
    take skinny_linear's FMA kernel in steps of up to FMA_GEMM_MAX_ROWS rows (batch x tokens),
    cuBLAS in wider steps (batched decode steps too) and in prefill, with no prologue op."""
    model, positions_for = build("qwen2")
    ids = torch.randint(0, VOCAB, (batch, 30))
    positions = torch.cat([positions_for(30)] * batch, dim=-2)
    prologue_ops = count_calls(monkeypatch, hippo_ext, GEMM_PROLOGUE_OPS)
    fma_gemms = count_fma_gemms(monkeypatch)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, batch=batch, fma_decode=True)
    assert runtime.fma_decode and runtime.replica().fma_decode
    runtime.prefill(runtime.embed(ids[:, :20]), positions[..., :20])
    wide = FMA_GEMM_MAX_ROWS + 1
    runtime.step(ids[:, 20:20 + wide], positions[..., 20:20 + wide])
    assert fma_gemms == []
    start = 20 + wide
    runtime.step(ids[:, start:start + 1], positions[..., start:start + 1])
    narrow = batch <= FMA_GEMM_MAX_ROWS
    assert len(fma_gemms) == (4 * len(runtime.layers) + 1 if narrow else 0)
    assert prologue_ops == []


def test_fma_decode_is_a_cuda_default_where_no_other_option_picks_the_gemms():
    """On by default for CUDA's fused path only (on the CPU skinny_linear's reference is slower
    than BLAS); asked for beside an option that picks the GEMMs itself, or without the fused
    path, an error naming both."""
    model, _ = build("qwen2")
    assert not LanguageModelRuntime.from_hf(model, max_seq_len=32).fma_decode
    assert LanguageModelRuntime.from_hf(model, max_seq_len=32, fma_decode=True).fma_decode
    for options, conflict in ((dict(fused=False), "fused"),
                              (dict(skinny_gemm=True), "skinny_gemm"),
                              (dict(gemm_prologues=True), "gemm_prologues"),
                              (dict(step_invariant=True, step_attention="hippo_ext"),
                               "step_invariant")):
        with pytest.raises(HippoError, match=f"fma_decode=True.*{conflict}"):
            LanguageModelRuntime.from_hf(model, max_seq_len=32, fma_decode=True, **options)
        assert not LanguageModelRuntime.from_hf(model, max_seq_len=32, **options).fma_decode
    with pytest.raises(HippoError, match="fma_decode"):
        LanguageModelRuntime.from_hf(model, max_seq_len=32, fma_decode="yes")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("options,expected", [(dict(), True), (dict(fma_decode=False), False),
                                              (dict(skinny_gemm=True), False),
                                              (dict(gemm_prologues=True), False),
                                              (dict(fused=False), False)])
def test_cuda_fma_decode_by_default(options, expected):
    model, _ = build("qwen2")
    model = model.to(device="cuda", dtype=torch.bfloat16)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32, **options)
    assert runtime.fma_decode == expected


def test_the_default_cpu_runtime_runs_its_gemms_on_aten(monkeypatch):
    """Built directly with its defaults on the CPU: a batch of one, eager, the fused path, and
    every GEMM of prefill, decode and verify steps on ATen's linear (skinny_linear's CPU
    reference is slower than BLAS; it runs only when an option asks for it)."""
    model, positions_for = build("qwen2")
    ids = torch.randint(0, VOCAB, (1, 12))
    calls = count_calls(monkeypatch, hippo_ext, ("skinny_linear",) + GEMM_PROLOGUE_OPS)
    runtime = LanguageModelRuntime(model.model, model.lm_head, 16)
    assert runtime.cache.batch == 1 and runtime.fused is not None
    assert (runtime.use_cuda_graphs, runtime.skinny_gemm, runtime.fma_decode,
            runtime.gemm_prologues, runtime.step_invariant) == (False, False, False, False, False)
    runtime.prefill(runtime.embed(ids[:, :8]), positions_for(8))
    runtime.step(ids[:, 8:9], positions_for(1, 8))
    runtime.step(ids[:, 9:12], positions_for(3, 9))
    assert calls == []


@pytest.mark.parametrize("option", ["skinny_gemm", "fma_decode", "gemm_prologues"])
def test_skinny_linear_gets_the_runtimes_own_workspace_sized_for_its_widest_gemm(monkeypatch,
                                                                                  option):
    """skinny_linear's split-K semaphores: every call of a runtime's steps passes that runtime's
    own workspace (a draft and a target on two streams must not share one, nor a CUDA graph
    capture find none), holding the widest GEMM: here the fused gate/up (2 x 128 outputs),
    wider than the output head (96)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 96, (1, 12))
    workspaces = []
    skinny_linear = hippo_ext.skinny_linear

    def recorded(*args, workspace=None, **kwargs):
        workspaces.append(workspace)
        return skinny_linear(*args, workspace=workspace, **kwargs)
    monkeypatch.setattr(hippo_ext, "skinny_linear", recorded)
    runtimes = [LanguageModelRuntime.from_hf(model, max_seq_len=16, **{option: True})
                for _ in range(2)]
    own = []
    for runtime in runtimes:
        workspaces.clear()
        runtime.prefill(runtime.embed(ids[:, :8]), linear_positions(8))
        runtime.step(ids[:, 8:9], linear_positions(1, 8))
        assert workspaces and workspaces[0] is not None
        assert all(workspace is workspaces[0] for workspace in workspaces)
        own.append(workspaces[0])
    assert own[0] is not own[1]


def test_gemm_prologues_need_the_fused_path_and_no_step_invariance():
    model, _ = build("qwen2")
    with pytest.raises(HippoError, match="gemm_prologues"):
        LanguageModelRuntime.from_hf(model, max_seq_len=32, fused=False, gemm_prologues=True)
    with pytest.raises(HippoError, match="gemm_prologues"):
        LanguageModelRuntime.from_hf(model, max_seq_len=32, gemm_prologues=True,
                                     step_invariant=True)


def test_skinny_gemm_needs_the_fused_path():
    model, _ = build("qwen2")
    with pytest.raises(HippoError, match="skinny_gemm"):
        LanguageModelRuntime.from_hf(model, max_seq_len=32, fused=False, skinny_gemm=True)


def test_step_invariance_needs_hippo_ext_kernels():
    model, _ = build("qwen2")
    for options in (dict(fused=False), dict(step_attention="sdpa")):
        with pytest.raises(HippoError, match="step_invariant=True needs step_attention='hippo_ext' "
                                             "and the fused layer path"):
            LanguageModelRuntime.from_hf(model, max_seq_len=32, step_invariant=True, **options)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda,
                                                                        pytest.mark.cuda])])
@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_step_invariant_verify_equals_single_steps_bitwise(family, device):
    """With step_invariant=True a verify step's logits are exactly those of single-token steps,
    in fp32 on the CPU (whose BLAS and SDPA round a row differently with every step size: the
    default runtime's differ by ~1e-7) and in bf16 on CUDA: speculative decoding then
    reproduces the runtime's own greedy output."""
    if device == "cuda":
        model, positions_for = cuda_model(family, 256)
        model = model.to(torch.bfloat16)
    else:
        model, positions_for = build(family)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=128, step_invariant=True)
    assert runtime.step_attention == "hippo_ext" and runtime.skinny_gemm
    ids = torch.randint(0, VOCAB, (1, 80), device=device)
    positions = positions_for(80).to(device)
    runtime.prefill(runtime.embed(ids[:, :40]), positions[..., :40])
    with pytest.raises(HippoError, match="up to 32 tokens, got 33"):  # cuBLAS would take it
        runtime.step(ids[:, 40:73], positions[..., 40:73])
    for count in (2, 5, 9, 17, 32):
        verify = runtime.step(ids[:, 40:40 + count], positions[..., 40:40 + count]).clone()
        runtime.rollback(40)
        singles = [runtime.step(ids[:, 40 + i:41 + i], positions[..., 40 + i:41 + i]).clone()
                   for i in range(count)]
        runtime.rollback(40)
        assert torch.equal(verify, torch.cat(singles, dim=1)), f"{count}-token step differs"


def assert_steps_equal_single_steps(runtime, ids, positions, start, counts):
    for count in counts:
        window = slice(start, start + count)
        verify = runtime.step(ids[:, window], positions[..., window]).clone()
        runtime.rollback(start)
        singles = [runtime.step(ids[:, start + i:start + i + 1],
                                positions[..., start + i:start + i + 1]).clone()
                   for i in range(count)]
        runtime.rollback(start)
        assert torch.equal(verify, torch.cat(singles, dim=1)), f"{count}-token step differs"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda,
                                                                        pytest.mark.cuda])])
def test_step_invariant_counts_the_rows_of_every_batch_row(device):
    """skinny_linear keeps rows independent of M up to 32 rows of batch x tokens, not 32 tokens
    per batch row: with batch 2 a 17-token step (34 rows) would run ATen's linear (cuBLAS), whose
    rows depend on M. It is refused; 16 tokens still equal single-token steps."""
    if device == "cuda":
        model, positions_for = cuda_model("qwen2", 256)
        model = model.to(torch.bfloat16)
    else:
        model, positions_for = build("qwen2")
    batch = 2
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=128, batch=batch,
                                           step_invariant=True)
    ids = torch.randint(0, VOCAB, (batch, 80), device=device)
    positions = positions_for(80).expand(batch, 80).contiguous().to(device)
    runtime.prefill(runtime.embed(ids[:, :40]), positions[..., :40])
    with pytest.raises(HippoError, match="up to 16 tokens, got 17"):
        runtime.step(ids[:, 40:57], positions[..., 40:57])
    assert_steps_equal_single_steps(runtime, ids, positions, 40, (2, 9, 16))


def test_step_invariant_refuses_a_batch_beyond_its_rows(monkeypatch):
    """A batch of 33 rows was built and prefilled, then every step, decode's too, was refused
    ("steps of up to 0 tokens")."""
    model, _ = build("qwen2")
    with pytest.raises(HippoError, match="batch 33 leaves no step"):
        LanguageModelRuntime.from_hf(model, max_seq_len=16, batch=33, step_invariant=True)
    monkeypatch.setenv("HIPPO_SKINNY_KERNEL", "fma")
    with pytest.raises(HippoError, match="up to 16 rows"):
        LanguageModelRuntime.from_hf(model, max_seq_len=16, batch=17, step_invariant=True)
    LanguageModelRuntime.from_hf(model, max_seq_len=16, batch=16, step_invariant=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda,
                                                                        pytest.mark.cuda])])
def test_step_invariant_with_the_fma_kernel_holds_16_rows(device, monkeypatch):
    """HIPPO_SKINNY_KERNEL=fma runs skinny_linear's FMA kernel up to 16 rows and tensor cores
    beyond, which round otherwise: a 17-token step would differ from single-token steps, so it
    is refused; steps of up to 16 tokens stay bitwise equal to them."""
    monkeypatch.setenv("HIPPO_SKINNY_KERNEL", "fma")
    if device == "cuda":
        model, positions_for = cuda_model("qwen2", 256)
        model = model.to(torch.bfloat16)
    else:
        model, positions_for = build("qwen2")
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=128, step_invariant=True)
    ids = torch.randint(0, VOCAB, (1, 80), device=device)
    positions = positions_for(80).to(device)
    runtime.prefill(runtime.embed(ids[:, :40]), positions[..., :40])
    with pytest.raises(HippoError, match="up to 16 tokens, got 17"):
        runtime.step(ids[:, 40:57], positions[..., 40:57])
    assert_steps_equal_single_steps(runtime, ids, positions, 40, (2, 9, 16))


def test_step_invariant_refuses_gemm_widths_cublas_would_take():
    """On CUDA skinny_linear runs K % 32 != 0 on cuBLAS (rows then depend on M): a model with
    one head of 80 (hidden 80) cannot be step-invariant there; the CPU reference takes any K."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hippo.runtime import kernel_choice
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=80, intermediate_size=160,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    model = Qwen2ForCausalLM(config).eval()
    layers, head = list(model.model.layers), model.lm_head
    kernel_choice.check_row_invariant_gemm_widths(layers, head, torch.device("cpu"))
    even, _ = build("qwen2")  # hidden 64, intermediate 128: every K a multiple of 32
    kernel_choice.check_row_invariant_gemm_widths(list(even.model.layers), even.lm_head,
                                                  torch.device("cuda"))
    with pytest.raises(HippoError, match=r"multiples of 32 on CUDA .*got \[80\]"):
        kernel_choice.check_row_invariant_gemm_widths(layers, head, torch.device("cuda"))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("options", [{}, {"step_invariant": True}, {"gemm_prologues": True}])
def test_dependent_launch_changes_no_bit(monkeypatch, options):
    """Programmatic dependent launch of the step's hippo_ext kernels (on unless HIPPO_PDL=0)
    only lets a kernel start while the previous one finishes: graph-replayed steps give the
    same bits as without it, for the default, the skinny/row-invariant and the fused-GEMM
    kernels (whose FMA kernel reads its first weights before it waits)."""
    model, positions_for = cuda_model("qwen2", 256)
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 60), device="cuda")
    positions = positions_for(60).cuda()
    logits = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("HIPPO_PDL", pdl)  # read when the step graphs are captured
        runtime = LanguageModelRuntime.from_hf(model, max_seq_len=128, **options)
        runtime.prefill(runtime.embed(ids[:, :40]), positions[..., :40])
        steps, start = [], 40
        for count in (1, 9, 1, 5):
            steps.append(runtime.step(ids[:, start:start + count],
                                      positions[..., start:start + count]).clone())
            start += count
        logits[pdl] = torch.cat(steps, dim=1)
    assert torch.equal(logits["0"], logits["1"])


def qwen2_with_rope(rope_parameters: dict, max_positions: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=0.2, rope_parameters=rope_parameters)).eval()


LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 12,
            "short_factor": [1.0] * 8, "long_factor": [1.0 + 3 * i for i in range(8)]}
DYNAMIC = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 8.0}


@pytest.mark.parametrize("rope", [LONGROPE, DYNAMIC], ids=["longrope", "dynamic"])
def test_step_invariance_refuses_ropes_that_switch_by_the_steps_largest_position(rope):
    """HF picks longrope's factors (and dynamic NTK's scale) from the largest position of each
    call: a step of 4 tokens crossing the switch rotates its first tokens otherwise than 4
    one-token steps do, which step_invariant promises equal."""
    model = qwen2_with_rope(rope, max_positions=48 if rope is LONGROPE else 12)
    ids = torch.randint(0, VOCAB, (1, 14))
    single = LanguageModelRuntime.from_hf(model, max_seq_len=16)
    single.prefill(single.embed(ids[:, :10]), linear_positions(10))
    rows = [single.step(ids[:, i:i + 1], linear_positions(1, i)) for i in range(10, 14)]
    block = LanguageModelRuntime.from_hf(model, max_seq_len=16)
    block.prefill(block.embed(ids[:, :10]), linear_positions(10))
    together = block.step(ids[:, 10:14], linear_positions(4, 10))
    assert (together - torch.cat(rows, 1)).abs().max() > 1e-3  # the switch shows
    with pytest.raises(HippoError, match="step_invariant=True cannot hold with rope_type"):
        LanguageModelRuntime.from_hf(model, max_seq_len=16, step_invariant=True)


def test_rope_switches_only_where_hf_picks_frequencies_by_the_largest_position():
    """rope_switches_within (the pipeline's lossless check) and the CUDA-graph check: a default
    RoPE never switches, at any length; longrope switches past original_max_position_embeddings
    (not max_position_embeddings), dynamic NTK past max_position_embeddings; CUDA graphs refuse
    both (their frequencies are recomputed from the positions on the host)."""
    from hippo.runtime import rope
    default = build("qwen2")[0].model.rotary_emb
    assert not rope.rope_switches_within(default, 10**9)
    rope.reject_dynamic_rope(default)
    longrope = qwen2_with_rope(LONGROPE, max_positions=48).model.rotary_emb
    assert not rope.rope_switches_within(longrope, 12)
    assert rope.rope_switches_within(longrope, 13)
    dynamic = qwen2_with_rope(DYNAMIC, max_positions=20).model.rotary_emb
    assert not rope.rope_switches_within(dynamic, 20)
    assert rope.rope_switches_within(dynamic, 21)
    for rotary in (longrope, dynamic):
        with pytest.raises(HippoError, match="run with use_cuda_graphs=False"):
            rope.reject_dynamic_rope(rotary)
    # Without a bound to read, the switch is assumed anywhere.
    unbounded = [SimpleNamespace(rope_type="longrope"), SimpleNamespace(rope_type="dynamic")]
    assert all(rope.rope_switches_within(rotary, 1) for rotary in unbounded)


@pytest.mark.parametrize("change", ["q_proj without bias", "gate_proj with bias"])
def test_fusing_needs_qwen2_projections(change):
    """The fused q/k/v GEMM adds one bias of all three and the gate/up GEMM none: a layer laid
    out otherwise is refused, not run with a bias missing or dropped."""
    from hippo.runtime.fused_projections import fuse_layer_projections

    model, _ = build("qwen2")
    layer = text_model_of(model).layers[0]
    if change == "q_proj without bias":
        layer.self_attn.q_proj.bias = None
    else:
        layer.mlp.gate_proj.bias = torch.nn.Parameter(torch.zeros(layer.mlp.gate_proj.out_features))
    with pytest.raises(HippoError, match="expected Qwen2 projections"):
        fuse_layer_projections(layer)


@pytest.mark.parametrize("layout", ["q transposed", "k after v", "k in another storage"])
def test_projections_that_are_not_rows_of_one_storage_are_copied(layout):
    """q/k/v weights are used in place only when they are, in order, consecutive rows of one
    storage. Laid out almost so (q transposed there, k and v swapped, or k at the right offset
    of another storage), the fused weight is the concatenation of what the parameters read, and
    the fused runtime equals the unfused one."""
    from hippo.runtime.fused_projections import fuse_layer_projections

    model, positions_for = build("qwen2", num_heads=4, num_kv_heads=4)  # q, k, v all 64 x 64
    layer = text_model_of(model).layers[0]
    projections = [getattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj")]
    q, k, v = weights = [projection.weight.detach().clone() for projection in projections]
    if layout == "q transposed":
        storage = torch.cat([q.t().contiguous(), k, v])
        views = [storage[:64].t(), storage[64:128], storage[128:]]
    elif layout == "k after v":
        storage = torch.cat([q, v, k])
        views = [storage[:64], storage[128:], storage[64:128]]
    else:
        storage, other = torch.cat([q, -k, v]), torch.cat([q, k, v])
        views = [storage[:64], other[64:128], storage[128:]]
    for projection, view in zip(projections, views):
        projection.weight = torch.nn.Parameter(view, requires_grad=False)
    fused = fuse_layer_projections(layer)
    torch.testing.assert_close(fused.qkv_weight, torch.cat(weights), atol=0, rtol=0)
    ids = torch.randint(0, VOCAB, (1, 8))
    outputs = [LanguageModelRuntime.from_hf(model, max_seq_len=16, fused=fused_path).prefill(
        model.model.embed_tokens(ids).detach(), positions_for(8)).logits
        for fused_path in (True, False)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)


def test_fused_needs_a_silu_mlp():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="gelu")).eval()
    with pytest.raises(HippoError, match="not SiLU"):
        LanguageModelRuntime.from_hf(model, max_seq_len=32, fused=True)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)  # falls back to HF's modules
    assert runtime.fused is None
    ids = torch.randint(0, VOCAB, (1, 6))
    logits = runtime.prefill(runtime.embed(ids), linear_positions(6), all_logits=True).logits
    torch.testing.assert_close(logits, model(input_ids=ids).logits, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- CUDA only

# fp32 with head dim 16 runs the SDPA step; bf16 with head dim 64 runs hippo_ext.decode_attention.
CUDA_SETUPS = [pytest.param(torch.float32, 64, "sdpa", id="fp32-sdpa"),
               pytest.param(torch.bfloat16, 256, "hippo_ext", id="bf16-decode_attention")]


def cuda_model(family: str, hidden: int):
    """A tiny fp32 model on the GPU with 4 heads (head dim hidden / 4)."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen2":
        from transformers import Qwen2ForCausalLM
        model, positions_for = Qwen2ForCausalLM(Qwen2Config(**text)), linear_positions
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration
        half = hidden // 8  # half the head dim, split 2:3:3 like the real [16, 24, 24]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section":
                                   [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]}
        config = Qwen2_5_VLConfig(vision_config=dict(depth=2, hidden_size=32,
                                                     intermediate_size=64, num_heads=2,
                                                     out_hidden_size=hidden,
                                                     fullatt_block_indexes=[1]),
                                  text_config=text)
        model, positions_for = Qwen2_5_VLForConditionalGeneration(config), mrope_positions
    return model.cuda().eval(), positions_for


# Opt-in kernels a graph must replay exactly like the eager path: (runtime options, environment).
OPT_IN_KERNELS = {
    "default": ({}, {}),
    "gemm_prologues": ({"gemm_prologues": True}, {}),
    "fused_merge": ({}, {"HIPPO_DECODE_ATTENTION_FUSED_MERGE": "1"}),
}


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("kernels", list(OPT_IN_KERNELS))
@pytest.mark.parametrize("dtype,hidden,backend", CUDA_SETUPS)
@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_graph_replay_equals_eager_runtime(monkeypatch, family, dtype, hidden, backend, kernels):
    options, environment = OPT_IN_KERNELS[kernels]
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    model, positions_for = cuda_model(family, hidden)
    ids = torch.randint(0, VOCAB, (1, 80), device="cuda")
    positions = positions_for(80).cuda()
    steps = (1, 5, 1, 9, 1, 17)
    end = 40 + sum(steps)
    with torch.no_grad():  # fp32 reference before any cast
        embeds32 = model.get_input_embeddings()(ids[:, :end])
        expected = model(inputs_embeds=embeds32, position_ids=positions[..., :end]).logits
    model.to(dtype)
    graphed = LanguageModelRuntime.from_hf(model, max_seq_len=256, **options)
    eager = LanguageModelRuntime.from_hf(model, max_seq_len=256, use_cuda_graphs=False,
                                         **options)
    assert graphed.use_cuda_graphs and not eager.use_cuda_graphs
    assert graphed.step_attention == eager.step_attention == backend
    for runtime in (graphed, eager):
        runtime.prefill(runtime.embed(ids[:, :40]), positions[..., :40])
    start = 40
    for count in steps:
        args = ids[:, start:start + count], positions[..., start:start + count]
        got = graphed.step(*args).clone()
        torch.testing.assert_close(got, eager.step(*args), atol=0, rtol=0)
        start += count
        # and both follow the HF forward (fp32) of the whole sequence
        error = (got.double() - expected[:, start - count:start].double()).norm()
        assert error / expected[:, start - count:start].double().norm() < (
            1e-5 if dtype == torch.float32 else 3e-2)
    torch.testing.assert_close(graphed.cache.length, eager.cache.length, atol=0, rtol=0)
    graphed.rollback(41)  # a replay after a rollback still matches the eager path
    eager.rollback(41)
    args = ids[:, 50:55], positions[..., 41:46]
    torch.testing.assert_close(graphed.step(*args).clone(), eager.step(*args), atol=0, rtol=0)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,hidden,backend", CUDA_SETUPS)
def test_thousand_graph_steps_with_rollbacks_do_not_grow_memory(dtype, hidden, backend):
    model, positions_for = cuda_model("qwen2", hidden)
    graphed = LanguageModelRuntime.from_hf(model.to(dtype), max_seq_len=64)
    assert graphed.step_attention == backend
    ids = torch.randint(0, VOCAB, (1, 16), device="cuda")
    graphed.prefill(graphed.embed(ids), positions_for(16).cuda())
    draft = torch.randint(0, VOCAB, (1, 5), device="cuda")
    one, five = positions_for(1, 16).cuda(), positions_for(5, 17).cuda()

    def one_round():
        graphed.step(draft[:, :1], one)
        graphed.step(draft, five)
        graphed.rollback(16)

    one_round()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for _ in range(500):  # 1000 steps
        one_round()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    assert graphed.length == 16 and graphed.cache.length.tolist() == [16]


@requires_cuda
@pytest.mark.cuda
def test_cuda_a_failed_capture_gives_the_stream_and_the_length_back(monkeypatch):
    """An error inside a graph capture invalidates it, and torch.cuda.graph's exit, whose
    capture_end then raises, left its capture stream current: the caller's later work ran
    there, unordered with its own stream. The caller's stream and the cache length come back,
    and the next step of that size captures and replays as the eager path runs."""
    model, positions_for = cuda_model("qwen2", 256)
    model.to(torch.bfloat16)
    graphed = LanguageModelRuntime.from_hf(model, max_seq_len=48)
    eager = LanguageModelRuntime.from_hf(model, max_seq_len=48, use_cuda_graphs=False)
    ids = torch.randint(0, VOCAB, (1, 19), device="cuda")
    positions = positions_for(19).cuda()
    for runtime in (graphed, eager):
        runtime.prefill(runtime.embed(ids[:, :16]), positions[..., :16])
    body = graphed.step_body

    def syncing_while_capturing(*args):
        logits = body(*args)
        if torch.cuda.is_current_stream_capturing():
            logits.sum().item()  # a host sync: not permitted inside a capture
        return logits

    monkeypatch.setattr(graphed, "step_body", syncing_while_capturing)
    stream = torch.cuda.current_stream()
    args = ids[:, 16:19], positions[..., 16:19]
    with pytest.raises(RuntimeError):
        graphed.step(*args)
    assert torch.cuda.current_stream() == stream
    assert graphed.length == 16 and graphed.cache.length.tolist() == [16]
    monkeypatch.setattr(graphed, "step_body", body)
    torch.testing.assert_close(graphed.step(*args).clone(), eager.step(*args), atol=0, rtol=0)


def test_capture_steps_is_a_no_op_without_graphs_and_checks_counts():
    model, positions_for = build("qwen2", num_heads=4, num_kv_heads=2)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=32)
    runtime.capture_steps(range(1, 10))  # the CPU runs eagerly: nothing to capture
    assert runtime.length == 0
    with pytest.raises(HippoError, match="a step takes"):
        runtime.capture_steps([0])


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen2", "qwen2_5_vl"])
def test_cuda_capture_steps_ahead_changes_nothing_but_the_graphs(family):
    """Graphs captured ahead (speculative decoding captures every size its g can reach) leave
    the cache's length as it was, skip sizes the cache has no room for, and replay like the
    eager path."""
    model, positions_for = cuda_model(family, 256)
    model.to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 64), device="cuda")
    positions = positions_for(64).cuda()
    graphed = LanguageModelRuntime.from_hf(model, max_seq_len=48)
    eager = LanguageModelRuntime.from_hf(model, max_seq_len=48, use_cuda_graphs=False)
    for runtime in (graphed, eager):
        runtime.prefill(runtime.embed(ids[:, :40]), positions[..., :40])
    graphed.capture_steps(range(1, 12))
    assert sorted(graphed._graphs.captured) == list(range(1, 9))  # 8 positions left
    assert graphed.length == 40 and int(graphed.cache.length[0]) == 40
    start = 40
    for count in (3, 1, 4):
        args = ids[:, start:start + count], positions[..., start:start + count]
        torch.testing.assert_close(graphed.step(*args).clone(), eager.step(*args), atol=0, rtol=0)
        start += count


@requires_cuda
@pytest.mark.cuda
def test_cuda_a_dropped_runtime_is_freed_without_the_cycle_collector():
    """A runtime and its CUDA graphs form no reference cycle: dropping the runtime frees its
    cache and graphs at once. (A graph left to the cycle collector could be freed in the middle
    of another capture, which invalidates that capture.)"""
    import gc
    import weakref
    model, positions_for = cuda_model("qwen2", 256)
    model.to(torch.bfloat16)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=64)
    runtime.prefill(runtime.embed(torch.zeros(1, 8, dtype=torch.long, device="cuda")),
                    positions_for(8).cuda())
    runtime.capture_steps((1, 3))
    alive = weakref.ref(runtime)
    gc.disable()
    try:
        del runtime
        assert alive() is None
    finally:
        gc.enable()


def test_no_garbage_collection_holds_the_collector_off_and_restores_it():
    import gc
    from hippo.runtime.cuda_graphs import no_garbage_collection
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with no_garbage_collection():
            assert not gc.isenabled()
            raise RuntimeError("a capture that fails")
    assert gc.isenabled()
    gc.disable()  # a caller that had it off keeps it off
    try:
        with no_garbage_collection():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_live_runtimes_capture_on_distinct_streams(monkeypatch):
    """torch hands streams out round-robin from a pool of 32: a runtime rebuilt after many
    generations could get the other runtime's capture stream, and two graphs captured on one
    stream hung the GPU when replayed at once. A stream a live owner holds is skipped, and
    freed with its owner (the pool is faked: no GPU needed)."""
    import gc
    from types import SimpleNamespace

    from hippo.runtime import cuda_graphs

    handles = iter([11, 11, 11, 12, 11])  # what the pool hands out, in turn
    monkeypatch.setattr(torch.cuda, "Stream",
                        lambda device=None: SimpleNamespace(cuda_stream=next(handles)))
    monkeypatch.setattr(cuda_graphs, "_CAPTURE_STREAMS", {})

    class Owner:
        pass

    device = torch.device("cuda:0")
    first, second = Owner(), Owner()
    assert cuda_graphs.distinct_capture_stream(first, device).cuda_stream == 11
    assert cuda_graphs.distinct_capture_stream(second, device).cuda_stream == 12  # 11 twice held
    del first
    gc.collect()
    assert cuda_graphs.distinct_capture_stream(Owner(), device).cuda_stream == 11  # freed
