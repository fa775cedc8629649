"""Loading a family's model from a local checkpoint directory (nothing is ever downloaded):
config.json, the tokenizer and the chat format first, checked against a weightless skeleton,
then the weights. Whatever is wrong with the user's files is one message naming the file."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hippo.errors import HippoError, errors_prefixed, first_few, is_int
from hippo.models.tokenizer import HFPromptTokenizer, PromptTokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from hippo.models.chat_format import ChatFormat


def check_text_config(model: torch.nn.Module) -> None:
    """check_text_config_values on the language model's config."""
    check_text_config_values(model.model.language_model.config)


def check_text_config_values(config: object) -> None:
    """Values of a language model's config that would load, then fail in the first prompt (or,
    for a kv head count of 0, in transformers' model construction): grouped-query attention
    shares each kv head among num_attention_heads / num_key_value_heads query heads (the counts
    must divide), and a context of max_position_embeddings positions must hold at least one."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and not (is_int(limit) and limit > 0):
        raise HippoError(f"config.json: max_position_embeddings must be a positive integer (the "
                         f"model's context), got {limit!r}")
    eps = getattr(config, "rms_norm_eps", None)
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)
                            or not math.isfinite(eps) or eps < 0):
        raise HippoError(f"config.json: rms_norm_eps must be a finite number >= 0, got {eps!r}")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is None:  # transformers' rule: as many as the query heads
        kv_heads = heads
    if not (is_int(heads) and is_int(kv_heads) and heads > 0 and kv_heads > 0 and heads % kv_heads == 0):
        raise HippoError(f"config.json: num_attention_heads ({heads}) must be a positive multiple of "
                         f"num_key_value_heads ({kv_heads})")


def check_token_ids_in_vocabulary(model: torch.nn.Module, fields: dict[str, str]) -> None:
    """The special ids an adapter places in prompts (video placeholders, vision start / end) must
    index the embedding table: a checkpoint whose config.json names an id beyond it would load,
    then fail deep in the embedding lookup of the first prompt. `fields` maps the config
    attribute to the name config.json gives it (LLaVA's video_token_id is video_token_index)."""
    config, rows = model.config, model.get_input_embeddings().num_embeddings
    for attribute, field in fields.items():
        value = getattr(config, attribute, None)
        if not is_int(value) or not 0 <= value < rows:
            raise HippoError(f"config.json: {field} is {value!r}, not a token id of this model "
                             f"(its vocabulary holds ids 0 to {rows - 1}): correct {field} in "
                             "config.json")


def find_checkpoint_file(path: str, *names: str) -> str | None:
    """The path of the first of `names` that exists in the checkpoint directory; None if none does."""
    import os

    return next((os.path.join(path, name) for name in names if os.path.isfile(os.path.join(path, name))),
                None)


def read_checkpoint_json(path: str, *names: str) -> dict:
    """The first of `names` that exists in the checkpoint directory, parsed; {} if none does."""
    file = find_checkpoint_file(path, *names)
    return read_json_object(file) if file is not None else {}


def read_json_object(file: str) -> dict:
    """A checkpoint's JSON file, which must hold an object. The file is the user's: whatever is
    wrong with it is one message naming it."""
    import json

    try:
        with open(file, encoding="utf-8") as f:
            content = json.load(f)
    except RecursionError as err:  # json recurses once per nesting level ([[[[... x 100000)
        raise HippoError(f"cannot read {file}: its JSON is nested too deeply") from err
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise HippoError(f"cannot read {file}: {err}") from err
    if not isinstance(content, dict):
        raise HippoError(f"{file} must hold a JSON object, got {type(content).__name__}")
    return content


def load_local_tokenizer(path: str) -> PromptTokenizer | None:
    """The checkpoint's own tokenizer, from the local directory only; None if it ships none."""
    import os

    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        with transformers_quiet():  # it reads config.json too, whose warnings hippo reports itself
            return HFPromptTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except Exception as err:  # noqa: BLE001  malformed tokenizer files fail with any type
        # (KeyError, TypeError, tokenizers' bare Exception): the user's files are at fault.
        raise HippoError(f"cannot load the tokenizer in {path}: {type(err).__name__}: {err}") from err


@dataclass
class LocalCheckpoint:
    """What every family's adapter takes from a local checkpoint directory."""

    model: torch.nn.Module
    tokenizer: PromptTokenizer | None
    prompt_prefix_ids: list[int]
    prompt_suffix_ids: list[int]
    chat: ChatFormat | None = None  # None without a tokenizer: prompts are token ids then


def load_local_checkpoint(model_class: type[torch.nn.Module], path: str, dtype: torch.dtype, label: str,
                          builtin_chat: ChatFormat, video_placeholder: str,
                          check_model: Callable[[torch.nn.Module], None] | None = None
                          ) -> LocalCheckpoint:
    """The checkpoint's tokenizer and the chat-format ids it makes of its own chat template (or
    the family's built-in format; see chat_format.py), then its weights (see load_local_model).
    config.json and the tokenizer come before the weights so that the ids the tokenizer gives
    are checked against the weightless skeleton, with the family's config checks, before the
    weights load."""
    from hippo.models.chat_format import checkpoint_chat_format

    # config.json first: the tokenizer's loader parses it too, and would be blamed for its faults.
    config = load_local_config(model_class, path, label)
    tokenizer = load_local_tokenizer(path)
    # transformers skips a generation_config.json it cannot parse in silence, and with it the
    # eos ids that stop a generation: read it here first, so that it is one clear error.
    read_checkpoint_json(path, "generation_config.json")
    chat = checkpoint_chat_format(path, tokenizer, video_placeholder, builtin_chat)
    prefix, suffix = chat_ids(tokenizer, chat.prefix, chat.suffix)

    def check_skeleton(skeleton: torch.nn.Module) -> None:
        if check_model is not None:
            with errors_prefixed(path):  # which of a target and a draft is wrong
                check_model(skeleton)
        check_tokenizer_fits_embeddings(skeleton, path, tokenizer, prefix + suffix)

    model = load_local_model(model_class, path, dtype, label, config=config,
                             check_model=check_skeleton)
    return LocalCheckpoint(model, tokenizer, prefix, suffix, chat if tokenizer is not None else None)


def check_tokenizer_fits_embeddings(model: torch.nn.Module, path: str, tokenizer: PromptTokenizer | None,
                                    chat_format_ids: list[int]) -> None:
    """The tokenizer's ids that the adapter feeds the model on its own (the chat-format ids
    around the prompt, eos) must index the input embeddings: a tokenizer of a larger model would
    load, then fail in the embedding lookup of the first prompt (an IndexError). The user's
    prompt ids are checked as they are encoded; the placeholder ids config.json names, by the
    family's check_model (check_token_ids_in_vocabulary)."""
    if tokenizer is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    for role, ids in (("the chat template", chat_format_ids), ("eos", [tokenizer.eos_token_id])):
        beyond = [token for token in ids if token is not None and not 0 <= token < rows]
        if beyond:
            raise HippoError(f"{path}: the tokenizer gives {role} token id {max(beyond)}, but the "
                             f"weights embed ids 0 to {rows - 1} only: tokenizer and weights seem "
                             "to come from different models")


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers draws "Loading weights: 0%|...|" on stderr while loading and logs warnings
    and a load report (missing or mismatched tensors, a config value out of range), which would
    put lines before hippo's one-line errors; hippo reports what matters itself. The caller's
    settings are restored after, for the models a script of theirs loads later."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_local_config(model_class: type[torch.nn.Module], path: str,
                      label: str) -> PretrainedConfig:
    """The checkpoint directory's config.json, parsed by the family's config class; whatever is
    wrong with it is one message naming it."""
    import os

    if not os.path.isdir(path):
        raise HippoError(f"no checkpoint directory at {path}")
    try:
        with transformers_quiet():
            return model_class.config_class.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001  transformers' validation raises many types
        raise HippoError(f"cannot read the {label} config.json in {path}: "
                         f"{type(err).__name__}: {err}") from err


def load_local_model(model_class: type[torch.nn.Module], path: str, dtype: torch.dtype, label: str,
                     config: PretrainedConfig | None = None,
                     check_model: Callable[[torch.nn.Module], None] | None = None
                     ) -> torch.nn.Module:
    """from_pretrained on a local directory only (nothing is ever downloaded), with `config`
    (load_local_config's) when already read. Every parameter must come from the checkpoint:
    transformers would otherwise initialise what is missing at random and carry on. check_model
    (the family's config checks) runs on a weightless skeleton first, so that a wrong
    config.json is refused before the weights load (minutes for a 7B)."""
    if config is None:
        config = load_local_config(model_class, path, label)
    try:
        with transformers_quiet():
            with errors_prefixed(path):
                check_not_quantized(config)
                check_activations_known(config)
                # Before the skeleton: a kv head count of 0 fails inside its construction.
                check_text_config_values(config.get_text_config())
            with torch.device("meta"):
                skeleton = model_class(config)
            # What config.json says wrongly first, then whether it fits the weights at all.
            if check_model is not None:
                check_model(skeleton)
            check_config_fits_weights(skeleton, path)
            del skeleton
            # ignore_mismatched_sizes: a tensor whose shape differs from the config's is then
            # listed in info (named below) instead of failing with "see the report above".
            model, info = model_class.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                      output_loading_info=True,
                                                      ignore_mismatched_sizes=True)
    except HippoError:
        raise
    except Exception as err:  # noqa: BLE001  corrupt weights or a config that does not fit them
        # (safetensors, transformers and torch each raise their own types): the user's files
        # are at fault whatever the type, so it is one clear message either way.
        raise HippoError(f"cannot load the {label} checkpoint in {path}: "
                         f"{type(err).__name__}: {err}") from err
    for kind in ("missing_keys", "mismatched_keys"):
        names = sorted(_describe_loading_entry(entry) for entry in info.get(kind) or ())
        if names:
            shown = first_few(names, "; ")
            raise HippoError(f"the {label} checkpoint in {path} does not fit its config.json "
                             f"({kind.replace('_', ' ')}: {shown})")
    return model


def check_not_quantized(config: PretrainedConfig) -> None:
    """hippo's runtime borrows a model's plain Linear weights (bf16, fp16 or fp32) and runs its
    own kernels on them: the packed weights of a quantized checkpoint (AWQ, GPTQ, bitsandbytes,
    FP8, ...) have no kernels in hippo. Refused by name from config.json, before transformers
    asks for its quantization library (whose install would only lead to a failure later)."""
    for where, part in (("", config), ("text_config.", config.get_text_config())):
        quantization = getattr(part, "quantization_config", None)
        if quantization:
            method = (quantization.get("quant_method") if isinstance(quantization, dict)
                      else getattr(quantization, "quant_method", None))
            raise HippoError(f"config.json: {where}quantization_config ({method or 'unnamed'}): "
                             "quantized checkpoints are not supported; hippo runs bf16, fp16 or "
                             "fp32 weights (use the unquantized checkpoint)")


def check_activations_known(config: object, where: str = "") -> None:
    """Every hidden_act in the config and its sub-configs (text, vision) must name an activation
    transformers has: building the model would otherwise fail with a bare KeyError naming only
    the value."""
    from transformers import PretrainedConfig
    from transformers.activations import ACT2FN

    act = getattr(config, "hidden_act", None)
    if act is not None and (not isinstance(act, str) or act not in ACT2FN):
        known = ", ".join(sorted(ACT2FN))
        raise HippoError(f"config.json: {where}hidden_act {act!r} is not an activation transformers "
                         f"knows ({known})")
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            check_activations_known(value, f"{where}{name}.")


def _describe_loading_entry(entry: object) -> str:
    """A tensor name of from_pretrained's loading info; mismatched ones come as (name,
    checkpoint shape, config shape)."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, stored, described = entry
        return (f"{name} is {list(stored)} in the checkpoint, {list(described)} by the config")
    return str(entry)


def check_config_fits_weights(skeleton: torch.nn.Module, path: str) -> None:
    """Compare the parameter count that config.json describes (the model built from it on the
    meta device) with the tensors in the checkpoint's weight files (safetensors headers, or
    pytorch_model*.bin memory-mapped), before anything is allocated: a config missing its size
    fields falls back to transformers' defaults (a 72B-sized Qwen2.5-VL), which would exhaust
    memory rather than fail. Loading relies on this bound (it lets transformers go on past
    mismatched shapes, so that hippo can name them)."""
    check_shards_present(path)
    stored = stored_parameter_count(path)
    described = sum(p.numel() for p in skeleton.parameters())
    if stored is not None and described > stored:
        raise HippoError(f"config.json in {path} describes {described:,} parameters but the "
                         f"weights hold {stored:,}: the config does not fit the weights (size "
                         "fields missing from config.json take transformers' defaults)")


def stored_parameter_count(path: str) -> int | None:
    """How many numbers the checkpoint's weight files hold (safetensors preferred, as
    transformers does); None where it has neither kind (from_pretrained then says so)."""
    import glob
    import os

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from safetensors import safe_open

        stored = 0
        for file in files:
            with safe_open(file, framework="pt") as weights:
                stored += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
        return stored
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        return None
    stored = 0
    for file in files:  # mapped, not read: only the shapes are looked at
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict):
            raise HippoError(f"{file} holds no state dict of tensors")
        stored += sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    return stored


def check_shards_present(path: str) -> None:
    """Every weight file a sharded checkpoint's index names must be there: one missing would
    otherwise read as a config that does not fit its weights."""
    import os

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index_name)
        if not os.path.isfile(index_path):
            continue
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HippoError(f"{index_path} has no weight_map of tensor names to file names")
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
        if missing:
            shown = first_few(missing, ", ")
            raise HippoError(f"{path} lacks {len(missing)} of the {len(shards)} weight files "
                             f"that {index_name} lists: {shown}")


def chat_ids(tokenizer: PromptTokenizer | None, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat text around the prompt (none without a tokenizer)."""
    if tokenizer is None:
        return [], []
    return tokenizer.encode(prefix), tokenizer.encode(suffix)
