"""What a user has today: HF `generate` (eager) and HF assisted generation (`assistant_model=`
the same draft), timed the same way as hippo's methods.

Decode time per token is (time of a generation of n tokens - time of a generation of 1 token) /
(n - 1): the prompt's prefill and the first token cancel, as hippo's decode_s excludes them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class HFRun:
    tokens: list[int]
    total_s: float          # the whole generate call of n tokens
    decode_s_per_token: float


def _timed_generate(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int,
                    **kwargs) -> tuple[list[int], float]:
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out[0, input_ids.shape[1]:].tolist(), time.perf_counter() - started


def hf_generate(model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int,
                assistant: torch.nn.Module | None = None, num_assistant_tokens: int = 8) -> HFRun:
    """Greedy HF generate (eager, dynamic cache); with an assistant, HF's assisted generation
    with a constant number of assistant tokens per round."""
    kwargs = {}
    if assistant is not None:
        config = assistant.generation_config
        config.num_assistant_tokens = num_assistant_tokens
        config.num_assistant_tokens_schedule = "constant"
        # HF's default threshold (0.4) ends a round's drafting at the first draft token whose
        # probability is below it (and, with scikit-learn installed, retunes it from call to
        # call): rounds would draft fewer than num_assistant_tokens, down to one per round on a
        # synthetic pair, whose near-flat distributions never reach 0.4. 0 turns it off.
        config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = assistant
    pad = model.generation_config.pad_token_id
    kwargs["pad_token_id"] = 0 if pad is None else pad
    _timed_generate(model, input_ids, 2, **kwargs)  # warm-up
    _, first_s = _timed_generate(model, input_ids, 1, **kwargs)
    tokens, total_s = _timed_generate(model, input_ids, new_tokens, **kwargs)
    per_token = (total_s - first_s) / max(new_tokens - 1, 1)
    return HFRun(tokens, total_s, per_token)
