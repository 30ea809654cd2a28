"""pyproject.toml and environment.yml describe the same environment; importing torchao through llmkit is quiet."""

import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_conda_environment_pins_the_same_versions_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_pins = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    conda_pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {d for d in conda_pip if "==" in d} == pip_pins
    assert all("==" in d for d in pip_pins), "every dependency is pinned"
    assert project["requires-python"] == "==3.11.*"


def test_without_cuda_importing_torchao_through_llmkit_prints_no_failed_to_load_line():
    """torchao's wheel carries CUDA kernels; where CUDA is missing, importing it logs a "Failed to load" line
    for each (the control, without llmkit), and llmkit promises that none reaches stderr."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: torchao loads its CUDA kernels, and llmkit lets whatever it logs through")
    runs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
            for code in ("import torchao.quantization", "import llmkit, torchao.quantization")]  # fmt: skip
    (control, err_control), (ours, err_ours) = ((p.wait(), p.stderr.read()) for p in runs)
    assert control == ours == 0, err_control + err_ours
    assert "Failed to load" in err_control, "torchao no longer logs its CUDA libraries: is the filter still needed?"
    assert "Failed to load" not in err_ours


def test_the_filter_drops_torchaos_failed_to_load_records_only_without_cuda(monkeypatch):
    from llmkit.quantize import _drop_cuda_library_noise

    def record(message: str, *args) -> logging.LogRecord:
        return logging.LogRecord("torchao", logging.WARNING, "torchao/__init__.py", 96, message, args, None)

    assert _drop_cuda_library_noise in logging.getLogger("torchao").filters
    failed = record("Failed to load %s: %s", "torchao/_C_mxfp8.so", "Could not load this library")
    others = [record("Skipping import of cpp extensions due to incompatible torch version"),
              record("a kernel: Failed to load"), record("failed to load %s", "x.so")]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _drop_cuda_library_noise(failed)
    assert all(_drop_cuda_library_noise(r) for r in others)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # with CUDA, a library that fails is news
    assert _drop_cuda_library_noise(failed) and all(_drop_cuda_library_noise(r) for r in others)
