"""pyproject.toml and environment.yml describe the same environment."""

import tomllib
from pathlib import Path

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


def test_quantizing_on_a_cpu_prints_no_cuda_library_noise():
    """torchao logs a "Failed to load" line per CUDA library it ships when there is no CUDA; llmkit drops them."""
    import subprocess
    import sys

    import torch

    code = "import llmkit, torchao.quantization"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ("Failed to load" in result.stderr) == torch.cuda.is_available()
