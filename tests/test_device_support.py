"""hippo_ext.kernels_unsupported: whether hippo_ext's kernels run on a device (on a GPU, this
build's CUDA kernels), and the paths that ask it: the runtime falls back to HF's modules and SDPA where they do not, HIPPO
decoding is refused with the reason. GPUs are simulated on the CPU (the probe, the device
queries); the last test asks the real GPU when there is one."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import hippo_ext
from hippo.errors import HippoError
from hippo.pipeline import check_kernels_run
from hippo.runtime import kernel_choice
from hippo_ext import _device_support
from hippo_testing import requires_cuda

CUDA = torch.device("cuda", 0)
NO_KERNEL_IMAGE = "CUDA error: no kernel image is available for execution on the device"


@pytest.fixture
def simulated_gpu(monkeypatch: pytest.MonkeyPatch):
    """A GPU named "Simulated" of the capability the test sets, on a build with CUDA kernels;
    probe launches are counted, and fail with `probe_error` when it is set."""
    gpu = SimpleNamespace(capability=(9, 0), probe_error=None, probes=0)

    def launch_probe(index: int) -> None:
        gpu.probes += 1
        if gpu.probe_error is not None:
            raise gpu.probe_error

    _device_support._unsupported_on.cache_clear()
    monkeypatch.setattr(hippo_ext, "cuda_kernels_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Simulated")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: gpu.capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_device_support, "_launch_probe", launch_probe)
    yield gpu
    _device_support._unsupported_on.cache_clear()


def test_a_gpu_the_build_covers_is_probed_once(simulated_gpu):
    assert hippo_ext.kernels_unsupported(CUDA) is None
    assert hippo_ext.kernels_unsupported("cuda") is None  # the current device: index 0
    assert hippo_ext.kernels_unsupported(0) is None
    assert simulated_gpu.probes == 1


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (6, 1)])
def test_a_gpu_older_than_the_kernels_is_named_without_a_launch(simulated_gpu, capability):
    simulated_gpu.capability = capability
    reason = hippo_ext.kernels_unsupported(CUDA)
    assert f"Simulated has compute capability {capability[0]}.{capability[1]}" in reason
    assert "8.0 or later" in reason
    assert simulated_gpu.probes == 0


@pytest.mark.parametrize("message", [NO_KERNEL_IMAGE, "CUDA error: invalid device function"])
def test_a_gpu_the_build_holds_no_code_for_says_how_to_rebuild(simulated_gpu, message):
    simulated_gpu.capability = (12, 0)
    simulated_gpu.probe_error = RuntimeError(message)
    reason = hippo_ext.kernels_unsupported(CUDA)
    assert "holds no code for Simulated (compute capability 12.0)" in reason
    assert "TORCH_CUDA_ARCH_LIST" in reason


def test_other_probe_errors_are_not_taken_for_a_missing_architecture(simulated_gpu):
    simulated_gpu.probe_error = RuntimeError("CUDA error: out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        hippo_ext.kernels_unsupported(CUDA)


def test_without_a_gpu_cuda_is_refused_plainly(simulated_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hippo_ext.kernels_unsupported("cuda") == "no CUDA GPU is available here"
    assert simulated_gpu.probes == 0


def test_a_build_without_cuda_kernels_says_so(monkeypatch):
    monkeypatch.setattr(hippo_ext, "cuda_kernels_built", lambda: False)
    assert "no CUDA kernels" in hippo_ext.kernels_unsupported(CUDA)


def test_the_cpu_always_runs_them_and_other_devices_never(simulated_gpu):
    assert hippo_ext.kernels_unsupported("cpu") is None
    assert "CPU and CUDA GPUs only, not for mps" in hippo_ext.kernels_unsupported("mps")
    assert simulated_gpu.probes == 0


# ------------------------------------------------------------- who asks, and what they do then

SILU_TEXT_MODEL = SimpleNamespace(config=SimpleNamespace(hidden_act="silu"))


@pytest.fixture
def uncovered_gpu(simulated_gpu):
    simulated_gpu.capability = (7, 5)
    return simulated_gpu


def test_the_runtime_runs_hf_modules_and_sdpa_where_the_kernels_do_not_run(uncovered_gpu):
    assert kernel_choice.choose_fused(None, CUDA, SILU_TEXT_MODEL) is False
    assert kernel_choice.choose_step_attention(None, CUDA, torch.bfloat16, 128) == "sdpa"
    assert kernel_choice.choose_step_attention("sdpa", CUDA, torch.bfloat16, 128) == "sdpa"
    assert kernel_choice.choose_fused(False, CUDA, SILU_TEXT_MODEL) is False


def test_the_runtime_uses_the_kernels_where_they_run(simulated_gpu):
    assert kernel_choice.choose_fused(None, CUDA, SILU_TEXT_MODEL) is True
    assert kernel_choice.choose_step_attention(None, CUDA, torch.bfloat16, 128) == "hippo_ext"
    # decode_attention's CUDA kernel takes bf16/fp16 and head dims 64/80/128: SDPA otherwise.
    for dtype, head_dim in ((torch.float32, 128), (torch.float16, 96)):
        assert kernel_choice.choose_step_attention(None, CUDA, dtype, head_dim) == "sdpa"
        with pytest.raises(HippoError, match="step_attention='hippo_ext' has no kernel for cuda"):
            kernel_choice.choose_step_attention("hippo_ext", CUDA, dtype, head_dim)
    # On the CPU SDPA is HF's path; step_invariant asks for decode_attention's reference.
    cpu = torch.device("cpu")
    assert kernel_choice.choose_step_attention(None, cpu, torch.float32, 96) == "sdpa"
    assert kernel_choice.choose_step_attention(None, cpu, torch.float32, 96, True) == "hippo_ext"


def test_asking_the_runtime_for_kernels_that_do_not_run_is_an_error_with_the_reason(uncovered_gpu):
    with pytest.raises(HippoError, match="fused=True cannot run: Simulated has compute capab"):
        kernel_choice.choose_fused(True, CUDA, SILU_TEXT_MODEL)
    with pytest.raises(HippoError, match="step_attention='hippo_ext' has no kernel for cuda"):
        kernel_choice.choose_step_attention("hippo_ext", CUDA, torch.bfloat16, 128)
    with pytest.raises(HippoError, match="gemm_prologues=True cannot run: Simulated has"):
        kernel_choice.check_gemm_prologues_possible(True, True, False, CUDA)


# (requested, device, fused, skinny_gemm, gemm_prologues) -> fma_decode
FMA_DECODE_CHOICES = [
    ((None, CUDA, True, False, False), True),  # the CUDA fused path's default
    ((False, CUDA, True, False, False), False),  # cuBLAS asked for (the bench's column)
    ((None, CUDA, False, False, False), False),  # HF's modules: no GEMM of its own to choose
    ((None, CUDA, True, True, False), False),  # skinny_gemm (and step_invariant) choose theirs
    ((None, CUDA, True, False, True), False),  # so do the prologue ops
    ((None, torch.device("cpu"), True, False, False), False),  # slower than BLAS there
    ((True, torch.device("cpu"), True, False, False), True),
]


@pytest.mark.parametrize("args,expected", FMA_DECODE_CHOICES)
def test_fma_decode_is_chosen_for_cuda_where_no_other_option_picks_the_gemms(args, expected):
    """The choice the CUDA runtime makes (tests/test_runtime.py asks a real GPU), on the CPU."""
    assert kernel_choice.choose_fma_decode(*args) is expected


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_hippo_decoding_on_a_gpu_the_kernels_do_not_run_on_is_refused(uncovered_gpu, mode):
    models = [SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=CUDA)]
    with pytest.raises(HippoError, match=f"{mode} decoding on cuda:0 needs hippo_ext's "
                                         "kernels.*compute capability 7.5.*mode='ar'"):
        check_kernels_run(models, mode)


def test_on_other_devices_the_runtime_runs_hf_modules_and_hippo_decoding_is_refused():
    mps = torch.device("mps")
    assert kernel_choice.choose_fused(None, mps, SILU_TEXT_MODEL) is False
    assert kernel_choice.choose_step_attention(None, mps, torch.float16, 128) == "sdpa"
    with pytest.raises(HippoError, match="parallel decoding on mps needs hippo_ext's kernels"):
        check_kernels_run([SimpleNamespace(device=mps)], "parallel")


def test_ar_and_the_cpu_need_no_probe(uncovered_gpu):
    check_kernels_run([SimpleNamespace(device=CUDA)], "ar")
    check_kernels_run([SimpleNamespace(device=torch.device("cpu"))], "parallel")
    assert uncovered_gpu.probes == 0


@requires_cuda
@pytest.mark.cuda
def test_cuda_the_build_runs_on_this_gpu():
    """The test machine's GPU is one the default build covers (8.0 or later)."""
    _device_support._unsupported_on.cache_clear()
    assert hippo_ext.kernels_unsupported(torch.device("cuda")) is None
