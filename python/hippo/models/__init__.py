"""Model adapters, one file per family, and the registry that picks one for a preset or a checkpoint."""
from __future__ import annotations

import os

import torch

from hippo.devices import check_model_dtype, resolve_device
from hippo.errors import HippoError, is_int, short_repr
from hippo.models.base import PreparedPrompt, VideoEmbedding, VideoLLMAdapter
from hippo.models.checkpoint import read_checkpoint_json
from hippo.models.pairing import check_compatible

# model_type in a checkpoint's config.json -> family (LLaVA-Video checkpoints are llava_onevision too).
FAMILIES = ("qwen2_5_vl", "llava_onevision")


def adapter_class(family: str) -> type[VideoLLMAdapter]:
    check_model_type(family)
    if family == "qwen2_5_vl":
        from hippo.models.qwen2_5_vl import Qwen2_5_VLAdapter

        return Qwen2_5_VLAdapter
    if family == "llava_onevision":
        from hippo.models.llava_onevision import LlavaOnevisionAdapter

        return LlavaOnevisionAdapter
    hint = _UNSUPPORTED_HINTS.get(family, "")
    raise HippoError(f"unsupported model type {family!r}; supported: {', '.join(FAMILIES)}{hint}")


def check_model_type(model_type: object, where: str = "") -> None:
    """config.json is the user's: its model_type may be any JSON value, and a list or an object
    cannot even be looked up among the hints below. `where` names the file for the message."""
    if isinstance(model_type, str):
        return
    raise HippoError(f"{where}model_type must be a string naming the model family "
                     f"({', '.join(FAMILIES)}), got {type(model_type).__name__} {short_repr(model_type)}")


# Near misses users hold checkpoints of: what to use instead.
_UNSUPPORTED_HINTS = {
    "llava_qwen": " (the original LLaVA-NeXT / LLaVA-Video release format: use its Hugging Face "
                  "conversion, model_type llava_onevision, as the llava-hf checkpoints are)",
    "llava": " (LLaVA-1.5 images-only; LLaVA-OneVision and LLaVA-Video are llava_onevision)",
    "llava_next_video": " (LLaVA-NeXT-Video has another vision pipeline; LLaVA-Video checkpoints "
                        "converted to llava_onevision are supported)",
    "qwen2_vl": " (Qwen2-VL's vision tower differs from Qwen2.5-VL's)",
}


def load_adapter(source: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", seed: int = 0) -> VideoLLMAdapter:
    """A preset name (tiny random model, fp32 by default, weights drawn from `seed`) or a local checkpoint
    directory (its config.json's model_type picks the family; bf16 by default; nothing is downloaded)."""
    from hippo.models.presets import PRESETS

    if not isinstance(source, (str, os.PathLike)):
        raise HippoError(f"a model is a preset name or a checkpoint directory, got {source!r}")
    if not is_int(seed):
        raise HippoError(f"seed must be an integer, got {seed!r}")
    source = os.fspath(source)
    device = resolve_device(device)
    if dtype is not None:
        check_model_dtype(dtype)
    if source in PRESETS:
        preset = PRESETS[source]
        return adapter_class(preset.family).from_preset(source, dtype=dtype or torch.float32, device=device,
                                                        seed=seed)
    if not os.path.isdir(source):
        raise HippoError(f"{source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a local "
                         "checkpoint directory")
    model_type = read_checkpoint_json(source, "config.json").get("model_type")
    if model_type is None:
        raise HippoError(f"{source} has no config.json with a model_type")
    check_model_type(model_type, f"{os.path.join(source, 'config.json')}: ")
    return adapter_class(model_type).from_pretrained(source, dtype=dtype or torch.bfloat16, device=device)


__all__ = ["HippoError", "PreparedPrompt", "VideoEmbedding", "VideoLLMAdapter", "check_compatible", "load_adapter", "adapter_class",
           "resolve_device"]
