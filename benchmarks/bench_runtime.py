"""Step times of hippo's language-model runtime against HF eager and the bandwidth floor.

A plain script (not a pytest benchmark): `python benchmarks/bench_runtime.py --help`.

On CUDA, in bf16 with random weights, it builds Qwen2-7B- and Qwen2-0.5B-shaped
Qwen2ForCausalLM models, prefills a context of each requested length and times with CUDA events:
  * the runtime's decode step (1 token) and verify steps (g + 1 tokens), each a CUDA graph
    replay followed by a rollback to the context length (one tiny fill kernel);
  * the same steps under the runtime options in VARIANTS (skinny_gemm and step_invariant, each
    with skinny_linear's tensor-core and FMA kernels; the defaults switched off one at a time:
    programmatic dependent launch, the decode steps' GEMMs on the FMA kernel (fma_decode),
    decode_attention's eight-warp blocks and wide registers;
    decode_attention's fused merge; the decode steps' GEMMs on the FMA kernel with the norms,
    gating and RoPE inside them, with and without the fused merge; HF's modules), each its own
    runtime on the same weights;
  * HF eager forward of the same number of tokens on a DynamicCache holding the same keys and
    values (cropped back after each call);
  * the runtime's prefill of the context (SDPA), and of a question's QUESTION_TOKENS tokens
    after the context kept in the cache (what a second question about an encoded video
    prefills: hippo.runtime.prefix_reuse);
  * per-token time of greedy AR: hippo's generate_autoregressive (one graph step per token,
    one host read of the token) against HF `generate` (prefill subtracted);
  * the floor: (weight bytes + KV bytes read) / copy bandwidth (timing.hbm_bandwidth: recorded
    for the lent H100 SXM, 3.0e12 B/s, and H200, 4.3e12; measured on any other card; the table's
    first line says which). Weight bytes count every parameter once, except an untied input
    embedding (a step reads one row of it): for the 7B shape 14.14 GB, 4.71 ms on an H100,
    where counting the embedding too (15.23 GB) gives 5.08 ms.
and prints one markdown table. `--tiny` runs a tiny fp32 model on the CPU as a smoke test (host
clock, no floor). `--quick` picks sizes that fit in about a minute on an H100.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hippo.devices import device_name
from hippo.errors import HippoError
from hippo.runtime import LanguageModelRuntime
from timing import hbm_bandwidth  # same folder: run as a script from the repository root

MODEL_SHAPES = {
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                 tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Variant:
    options: dict                 # LanguageModelRuntime options
    env: tuple = ()               # (name, value) pairs set while its graphs are captured


FMA = (("HIPPO_SKINNY_KERNEL", "fma"),)  # skinny_linear's FMA kernel (M <= 16)

# Runtime options timed beside the default in the same run (same model, same weights).
VARIANTS = {
    "skinny_gemm": Variant(dict(skinny_gemm=True)),  # hippo_ext.skinny_linear instead of cuBLAS
    "skinny_gemm fma": Variant(dict(skinny_gemm=True), FMA),
    "step_invariant": Variant(dict(step_invariant=True)),  # verify rows = decode rows, bitwise
    "step_invariant fma": Variant(dict(step_invariant=True), FMA),
    # the default's programmatic dependent launch of hippo_ext kernels turned off
    "no PDL": Variant({}, (("HIPPO_PDL", "0"),)),
    # the decode steps' GEMMs on cuBLAS (the default's fma_decode runs them on the FMA kernel)
    "cuBLAS decode": Variant(dict(fma_decode=False)),
    # verify steps' attention in four-warp blocks (the default runs eight for 2+ row tiles)
    "attention 4 warps": Variant({}, (("HIPPO_DECODE_ATTENTION_WARPS", "4"),)),
    # the split kernel under its narrower launch bounds (the default opens the register file)
    "attention narrow registers": Variant({}, (("HIPPO_DECODE_ATTENTION_WIDE_REGISTERS", "0"),)),
    # decode steps: the last KV-split block merges the splits (no second kernel per layer)
    "attention fused merge": Variant({}, (("HIPPO_DECODE_ATTENTION_FUSED_MERGE", "1"),)),
    # single-token steps: add_rms_norm and silu_and_mul inside the GEMMs after them, RoPE and
    # the cache append inside the q/k/v GEMM, and o_proj and the output head on the same FMA
    # kernel, so a decode step runs hippo_ext kernels only (wider steps run the default)
    "GEMM prologues": Variant(dict(gemm_prologues=True)),
    # the same with the fused merge: the decode step's candidates at once (five kernels a layer)
    "GEMM prologues + fused merge": Variant(dict(gemm_prologues=True), (
        ("HIPPO_DECODE_ATTENTION_FUSED_MERGE", "1"),)),
    "HF modules": Variant(dict(fused=False)),  # no fused layer ops
}


@contextmanager
def scoped_env(pairs: tuple):
    """Environment variables set for the duration (the ops read them when a graph is captured)."""
    saved = {name: os.environ.get(name) for name, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class Row:
    model: str
    context: int
    what: str
    hippo_ms: float
    hf_ms: float | None
    floor_ms: float | None
    variant_ms: dict[str, float | None] | None = None  # the same step in each variant runtime

    def cells(self, variants: list[str]) -> list[str]:
        """The row's cells, with a column for each of `variants` (the runs asked for)."""
        ratio = f"{self.hippo_ms / self.floor_ms:.2f}x" if self.floor_ms else "n/a"
        speedup = f"{self.hf_ms / self.hippo_ms:.1f}x" if self.hf_ms else "n/a"
        variants = [_fmt((self.variant_ms or {}).get(name)) for name in variants]
        return [self.model, str(self.context), self.what, f"{self.hippo_ms:.3f}", *variants,
                _fmt(self.hf_ms), _fmt(self.floor_ms), ratio, speedup]


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="7b,0.5b", help="comma list of 7b, 0.5b")
    parser.add_argument("--contexts", default="6400,12600", help="comma list of context lengths")
    parser.add_argument("--verify", default="2,5,9,17", help="verify step sizes g+1")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per step size")
    parser.add_argument("--prefill-reps", type=int, default=2, help="timed prefills per context")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF eager baseline")
    parser.add_argument("--no-variants", action="store_true",
                        help="time only the default runtime, not " + ", ".join(VARIANTS))
    parser.add_argument("--variants", default=None,
                        help="comma list of the VARIANTS to time (default: all)")
    parser.add_argument("--ar-tokens", type=int, default=32,
                        help="tokens for the AR rows (hippo AR vs HF generate); 0 skips them")
    parser.add_argument("--quick", action="store_true",
                        help="6.4k context, verify 5 and 9, 20 iterations (about a minute)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: tiny fp32 model, contexts 64 and 128")
    args = parser.parse_args(argv)
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.variants = [] if args.no_variants else chosen
    if args.quick:
        args.contexts, args.verify, args.iters, args.prefill_reps = "6400", "5,9", 20, 1
    if args.tiny:
        args.models, args.contexts, args.iters, args.prefill_reps = "tiny", "64,128", 3, 1
        args.ar_tokens = min(args.ar_tokens, 4)
    return args


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Qwen2ForCausalLM of the given shape, created directly on device in
    dtype (no fp32 copy on the host)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**MODEL_SHAPES[shape], max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()  # (no .to(dtype): RoPE's inv_freq buffer stays fp32, as HF loads it)


def weight_bytes(model) -> int:
    """Bytes of parameters a decode step reads (an untied input embedding only by one row)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size()
    return total


def kv_bytes(runtime: LanguageModelRuntime, context: int) -> int:
    cache = runtime.cache.tensor
    return (cache.size(0) * 2 * cache.size(2) * cache.size(3) * context * cache.size(5)
            * cache.element_size())


def bandwidth(device: torch.device) -> tuple[float, str] | None:
    """(bytes/s, where it comes from) of the floors; None on the CPU (no floor)."""
    return hbm_bandwidth(device) if device.type == "cuda" else None


def time_ms(fn: Callable[[], object], iters: int, device: torch.device,
            warmup: int = 2) -> float:
    """Mean time of fn() in ms: CUDA events around `iters` back-to-back calls, or the host
    clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - started) * 1e3 / iters
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def hf_cache_like(model, runtime: LanguageModelRuntime, context: int):
    """A DynamicCache holding the runtime's keys/values of the first `context` positions."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    for layer in range(runtime.cache.num_layers):
        cache.update(runtime.cache.keys(layer)[:, :, :context].clone(),
                     runtime.cache.values(layer)[:, :, :context].clone(), layer)
    return cache


def time_hf_step(model, cache, context: int, count: int, iters: int,
                 device: torch.device) -> float:
    """HF eager forward of `count` tokens on a cache of `context` positions (cropped back)."""
    ids = torch.randint(0, model.config.vocab_size, (1, count), device=device)
    positions = torch.arange(context, context + count, device=device)[None]

    def call():
        model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
              logits_to_keep=count)
        cache.crop(-count)  # forget the tokens just appended
    return time_ms(call, iters, device)


def time_runtime_step(runtime: LanguageModelRuntime, context: int, count: int, iters: int,
                      device: torch.device) -> float:
    ids = torch.randint(0, runtime.text_model.config.vocab_size, (1, count), device=device)
    positions = torch.arange(context, context + count, device=device)[None]

    def call():
        runtime.step(ids, positions)
        runtime.rollback(context)
    return time_ms(call, iters, device)


def time_prefill(runtime: LanguageModelRuntime, context: int, reps: int,
                 device: torch.device) -> float:
    embeds = runtime.embed(torch.randint(0, runtime.text_model.config.vocab_size,
                                         (1, context), device=device))
    positions = torch.arange(context, device=device)[None]

    def call():
        runtime.reset()
        runtime.prefill(embeds, positions)
    return time_ms(call, reps, device, warmup=1)


# The text after the video of a typical question and chat suffix (Video-MME's run 40-120).
QUESTION_TOKENS = 64


def time_prefill_after_prefix(runtime: LanguageModelRuntime, context: int, reps: int,
                              device: torch.device) -> float:
    """A QUESTION_TOKENS prefill at the end of `context` cached positions, rolled back to them
    after each call, as prefix reuse prefills a question after a kept video prefix."""
    vocab = runtime.text_model.config.vocab_size
    prefix = runtime.embed(torch.randint(0, vocab, (1, context), device=device))
    question = runtime.embed(torch.randint(0, vocab, (1, QUESTION_TOKENS), device=device))
    positions = torch.arange(context, context + QUESTION_TOKENS, device=device)[None]
    runtime.reset()
    runtime.prefill(prefix, torch.arange(context, device=device)[None])

    def call():
        runtime.rollback(context)
        runtime.prefill(question, positions)
    return time_ms(call, reps, device, warmup=1)


def time_autoregressive(model, runtime: LanguageModelRuntime, context: int, tokens: int,
                        use_hf: bool, device: torch.device) -> tuple[float, float | None]:
    """Per-token decode time (ms) of hippo's greedy AR and of HF `generate` after a `context`
    prompt; HF's is (time for tokens + 1) - (time for 1), which removes its prefill."""
    from hippo.models.base import PreparedPrompt
    from hippo.runtime import generate_autoregressive
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    prompt = PreparedPrompt(input_ids=ids, inputs_embeds=runtime.embed(ids),
                            position_ids=torch.arange(context, device=device)[None],
                            rope_delta=0, visual_start=0, num_visual=0, grid=(0, 0, 0),
                            visual_features=torch.zeros(0, 0, 0, 0))
    generate_autoregressive(runtime, prompt, tokens + 1)  # warm-up (captures the graph)
    hippo = generate_autoregressive(runtime, prompt, tokens + 1).decode_s_per_token * 1e3
    if not use_hf:
        return hippo, None

    def hf_seconds(new_tokens: int) -> float:
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        synchronize()
        started = time.perf_counter()
        # The mask says every prompt id is real: with pad_token_id given and no mask, HF masks
        # the random prompt's 0 ids out as padding and times another path.
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        synchronize()
        return time.perf_counter() - started

    hf_seconds(2)  # warm-up
    per_token = (hf_seconds(tokens + 1) - hf_seconds(1)) / tokens * 1e3
    return hippo, per_token


def build_variants(model, max_seq_len: int, names: list[str]) -> dict[str, LanguageModelRuntime]:
    """The same model under each named VARIANTS option (those that this device can run)."""
    variants = {}
    for name in names:
        try:
            variants[name] = LanguageModelRuntime.from_hf(model, max_seq_len=max_seq_len,
                                                          **VARIANTS[name].options)
        except HippoError as error:  # e.g. step_invariant on the CPU
            print(f"skipping {name}: {error}")
    return variants


def bench_model(shape: str, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> list[Row]:
    contexts = [int(c) for c in args.contexts.split(",")]
    step_sizes = [1] + [int(g) for g in args.verify.split(",")]
    model = build_model(shape, device, dtype)
    # tokens appended after the context
    headroom = max(max(step_sizes), args.ar_tokens + 1, QUESTION_TOKENS)
    runtime = LanguageModelRuntime.from_hf(model, max_seq_len=max(contexts) + headroom)
    variants = build_variants(model, max(contexts) + max(step_sizes), args.variants)
    bw = bandwidth(device)
    bw = bw[0] if bw else None
    rows = []
    for context in contexts:
        prefill_ms = time_prefill(runtime, context, args.prefill_reps, device)
        floor = (weight_bytes(model) + kv_bytes(runtime, context)) / bw * 1e3 if bw else None
        hf_cache = None if args.no_hf else hf_cache_like(model, runtime, context)
        for name, other in variants.items():
            with scoped_env(VARIANTS[name].env):
                time_prefill(other, context, 1, device)
        for count in step_sizes:
            hippo = time_runtime_step(runtime, context, count, args.iters, device)
            variant_ms = {}
            for name, other in variants.items():
                with scoped_env(VARIANTS[name].env):
                    try:
                        variant_ms[name] = time_runtime_step(other, context, count, args.iters,
                                                             device)
                    except HippoError:  # a step the variant refuses (step_invariant's rows): n/a
                        variant_ms[name] = None
            hf = (None if hf_cache is None
                  else time_hf_step(model, hf_cache, context, count, args.iters, device))
            what = "decode (1)" if count == 1 else f"verify ({count})"
            rows.append(Row(shape, context, what, hippo, hf, floor, variant_ms))
        rows.append(Row(shape, context, "prefill", prefill_ms, None, None))
        question_ms = time_prefill_after_prefix(runtime, context, max(args.prefill_reps, 3), device)
        rows.append(Row(shape, context, f"prefill of {QUESTION_TOKENS} after a kept prefix",
                        question_ms, None, None))
        if args.ar_tokens > 0:
            hippo_ar, hf_generate = time_autoregressive(model, runtime, context, args.ar_tokens,
                                                        not args.no_hf, device)
            rows.append(Row(shape, context, "AR per token (HF: generate)", hippo_ar,
                            hf_generate, floor))
        del hf_cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del runtime, variants, model
    gc.collect()  # the runtime and its graphs reference each other
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown_header(device: torch.device, dtype: torch.dtype, variants: list[str]) -> str:
    """The table's head: a column per variant asked for (none with --no-variants)."""
    name = device_name(device)
    header = ["model", "context", "step", "hippo ms", *(f"hippo {name} ms" for name in variants),
              "HF eager ms", "floor ms", "hippo / floor", "HF / hippo"]
    bw = bandwidth(device)
    floors = (f"floors at {bw[0] / 1e12:.2f} TB/s ({bw[1]})" if bw
              else "host clock, no floors: absolute times count from a GPU run only")
    lines = [f"Device: {name}, {str(dtype).removeprefix('torch.')}, batch 1, random weights; "
             + floors,
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines)


def markdown_rows(rows: list[Row], variants: list[str]) -> str:
    return "\n".join("| " + " | ".join(row.cells(variants)) + " |" for row in rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_runtime needs a CUDA GPU (or --tiny for a CPU smoke test)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    # Rows are printed per model as they are measured, so that a run cut short keeps its tables.
    print(markdown_header(device, dtype, args.variants), flush=True)
    with torch.no_grad():
        for shape in args.models.split(","):
            rows = bench_model(shape.strip(), args, device, dtype)
            print(markdown_rows(rows, args.variants), flush=True)


if __name__ == "__main__":
    main()
