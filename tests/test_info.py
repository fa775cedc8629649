"""`hippo info`: the installation report, on this machine and on simulated GPUs."""
from __future__ import annotations

import pytest
import torch

import hippo_ext
from hippo import info
from hippo.cli import main


def test_hippo_info_prints_versions_kernels_and_decoders(capsys):
    assert main(["info"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()
                 if not line.startswith(("hippo_ext", "video")))
    assert lines["torch"].startswith(torch.__version__)
    assert "transformers" in lines
    report = dict(info.installation_report())
    built = hippo_ext.cuda_kernels_built()
    assert report["hippo_ext CUDA kernels"] == ("built" if built else "not built (CPU kernels only)")
    assert report["video decoders"].split(", ")[-1] == "opencv"
    assert report["hippo_ext library"] == hippo_ext._C.__file__


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """An old GPU the kernels cannot run on beside a Hopper one, on a build with CUDA kernels."""
    gpus = {0: ("Old", (7, 5)), 1: ("New", (9, 0))}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: gpus[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: gpus[index][1])
    monkeypatch.setattr(hippo_ext, "cuda_kernels_built", lambda: True)
    monkeypatch.setattr(hippo_ext, "kernels_unsupported",
                        lambda index: "too old" if gpus[index][1] < (8, 0) else None)


def test_each_gpu_says_whether_the_kernels_run_there(two_gpus):
    report = dict(info.installation_report())
    assert report["cuda:0"] == "Old, compute capability 7.5; hippo_ext kernels do not run: too old"
    assert report["cuda:1"] == "New, compute capability 9.0; hippo_ext kernels run"


def test_without_cuda_kernels_gpus_are_only_described(two_gpus, monkeypatch):
    monkeypatch.setattr(hippo_ext, "cuda_kernels_built", lambda: False)
    report = dict(info.installation_report())
    assert report["cuda:0"] == "Old, compute capability 7.5"
    assert report["hippo_ext CUDA kernels"] == "not built (CPU kernels only)"


def test_no_video_decoder_is_reported(monkeypatch):
    monkeypatch.setattr(info, "available_backends", lambda: [])
    assert dict(info.installation_report())["video decoders"] == "none installed"


@pytest.mark.parametrize("cuda,available,expected", [
    (None, False, "(CPU build)"), ("12.4", False, "(CUDA 12.4; no GPU visible)"),
    ("12.4", True, "(CUDA 12.4; a GPU is visible)")])
def test_the_torch_line_says_which_build_and_whether_a_gpu_is_visible(monkeypatch, cuda,
                                                                      available, expected):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert info._torch_build() == f"{torch.__version__} {expected}"


def test_the_report_s_values_start_in_one_column(capsys, monkeypatch):
    monkeypatch.setattr(info, "installation_report",
                        lambda: [("hippo", "1"), ("video decoders", "opencv"), ("torch", "2")])
    info.print_report()
    assert capsys.readouterr().out.splitlines() == [
        "hippo           1", "video decoders  opencv", "torch           2"]
