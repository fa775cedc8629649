"""Both packages ship py.typed: what users import must exist as `__all__` says, the option
objects must be as immutable as their frozen dataclasses promise, and typed code using the
public API as documented must type-check (mypy, where it is installed)."""
from __future__ import annotations

import importlib
import inspect
import typing
from pathlib import Path

import pytest

import hippo_ext
from hippo.pipeline import HippoOptions
from hippo.preserve import PreservationOptions

ROOT = Path(__file__).resolve().parents[1]
MODULES_WITH_ALL = ["hippo_ext", "hippo_ext.activation", "hippo_ext.attention", "hippo_ext.fused_linear",
                    "hippo_ext.kv_compaction", "hippo_ext.linear", "hippo_ext.normalization",
                    "hippo_ext.rotary_embedding", "hippo_ext.verification", "hippo.models",
                    "hippo.runtime", "hippo.speculative"]


@pytest.mark.parametrize("name", MODULES_WITH_ALL)
def test_every_name_in_all_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported), "a name listed twice"
    assert [n for n in exported if not hasattr(module, n)] == []
    assert [n for n in exported if n.startswith("_")] == []


def test_every_op_is_exported() -> None:
    assert set(hippo_ext.OP_NAMES) <= set(hippo_ext.__all__)


def test_from_hf_options_are_the_runtime_constructor_options() -> None:
    from hippo.runtime.decoder import LanguageModelRuntime, RuntimeOptions

    keyword_only = [name for name, parameter in
                    inspect.signature(LanguageModelRuntime.__init__).parameters.items()
                    if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    assert list(RuntimeOptions.__annotations__) == keyword_only
    typing.get_type_hints(LanguageModelRuntime.from_hf)  # resolvable at run time too


def test_preservation_options_hold_tuples_whatever_sequence_was_given() -> None:
    weights, layers = [1.0, 0.0, 0.0], [0, 1]
    options = PreservationOptions(weights=weights, layers=layers)
    weights[0], layers[0] = -5.0, 99  # the caller's lists, changed after the checks ran
    assert options.weights == (1.0, 0.0, 0.0) and options.layers == (0, 1)
    assert options == PreservationOptions(weights=(1.0, 0.0, 0.0), layers=(0, 1))
    hash(HippoOptions(preservation=options))  # frozen dataclasses are hashable


USER_CODE = '''
from pathlib import Path
import torch
from hippo.models import load_adapter
from hippo.pipeline import HippoPipeline
from hippo.runtime import LanguageModelRuntime, SamplingOptions, find_text_model

adapter = load_adapter(Path("/checkpoints/Qwen2.5-VL-7B-Instruct"))
runtime = LanguageModelRuntime.from_hf(adapter.model, 256, use_cuda_graphs=False)
generator = torch.Generator(runtime.device)
embeds = torch.zeros(1, 1, runtime.hidden_size, dtype=runtime.dtype)
pipeline = HippoPipeline(adapter, None)
target_prompt, draft_prompt = pipeline.prepare("clip.mp4", "hi", num_frames=4)
pipeline.generate_prepared(target_prompt, draft_prompt, 8, SamplingOptions(), None)
pipeline.generate("clip.mp4", "hi").no_such_field  # error: HippoOutput, not Any
pipeline.generate("clip.mp4", "hi", on_tokens=lambda tokens: print(tokens[0] + 1))
pipeline.generate("clip.mp4", "hi", on_tokens=lambda tokens: tokens.no_such)  # error: list[int]
pipeline.generate_prepared(target_prompt, None, 8, SamplingOptions(), None).no_such  # error
runtime.prefill(embeds, torch.zeros(1, 1, dtype=torch.long)).no_such_field  # error
runtime.step(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1)).no_such_field  # error
LanguageModelRuntime(*find_text_model(adapter.model), max_seq_len="256")  # error: str
LanguageModelRuntime.from_hf(adapter.model, 256, use_cuda_graph=False)  # error: no such option
'''


# Modules the checked calls do not go through, left unanalysed (their names are Any): with them
# mypy took 35-80 s on 2 cores, without them 5 s. torch's core, torch.nn and torch.autograd (the
# no_grad decorator) stay checked.
UNCHECKED = ["transformers.*", "sympy.*", "numpy.*"] + [f"torch.{name}.*" for name in (
    "_dynamo", "_inductor", "fx", "distributed", "onnx", "export", "_export", "_functorch",
    "testing", "_higher_order_ops", "_subclasses", "_prims", "_refs", "_decomp", "ao",
    "quantization", "distributions", "optim", "masked", "nested", "sparse", "jit", "package",
    "profiler", "func", "signal", "special", "fft", "linalg")]


def test_typed_user_code_type_checks(tmp_path: Path) -> None:
    """The documented calls pass mypy, and wrong ones are caught: LanguageModelRuntime's
    constructor, from_hf's options and what the decorated methods return are typed, not Any
    (a decorator typed Callable -> Callable erases a signature)."""
    import mypy.api as api  # a test requirement (requirements.txt)

    script = tmp_path / "user_code.py"
    script.write_text(USER_CODE.strip("\n") + "\n")
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\nfollow_imports = silent\nmypy_path = {ROOT / 'python'}:{ROOT}\n"
                      f"[mypy-{','.join(UNCHECKED)}]\nfollow_imports = skip\n")
    report, _, _ = api.run(["--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
                            "--strict", str(script)])
    lines = USER_CODE.strip("\n").splitlines()
    flagged = {int(line.split(":")[1]) for line in report.splitlines() if ": error:" in line}
    expected = {number for number, line in enumerate(lines, 1) if "# error" in line}
    assert flagged == expected, report
