"""`llmkit sweep`: the CI sweep runs the benchmark notebook over its grid and collects the results."""

import json
from pathlib import Path

import pytest

from llmkit.bench import across_runs
from llmkit.errors import LLMKitError
from llmkit.sweep import read_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_ci_sweep_runs_and_collects(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = run_sweep(ROOT / "sweeps" / "ci.yaml", tmp_path)
    runs = json.loads((out / "runs.json").read_text())
    assert [r["status"] for r in runs] == ["ok", "ok"], runs
    rows = [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert {(r["scheme"], r["path"]) for r in rows} == {
        ("none", "eager"), ("none", "compile"), ("int8wo", "eager"), ("int8wo", "compile")
    }
    assert all(r["decode_tokens_per_s"] > 0 and r["weight_bytes"] > 0 for r in rows)
    int8 = next(r for r in rows if r["scheme"] == "int8wo")
    none = next(r for r in rows if r["scheme"] == "none")
    assert int8["weight_bytes"] < 0.6 * none["weight_bytes"]
    summary = (out / "summary.md").read_text()
    assert "| default | int8wo | compile |" in summary
    assert (out / "roofline.png").stat().st_size > 0 and (out / "decode.png").exists()
    assert len(list(out.glob("*.ipynb"))) == 2


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: bad\nnotebook: notebooks/08_benchmarks.ipynb\n"
                     "parameters: {new_tokens: 4, prompt_len: 4, repeats: 1}\n"
                     "grid: {source: [no-such-shape, stories15M-typo]}\n")  # fmt: skip
    out = run_sweep(sweep, tmp_path)
    runs = json.loads((out / "runs.json").read_text())
    assert [r["status"] for r in runs] == ["failed", "failed"]
    assert "unknown shape" in runs[0]["error"]
    assert "every run failed" in (out / "summary.md").read_text()


def test_empty_grid_says_so(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: empty\nnotebook: notebooks/08_benchmarks.ipynb\ngrid: {schemes: []}\n")
    with pytest.raises(LLMKitError, match="grid is empty"):
        read_sweep(sweep)


def test_runs_of_the_same_benchmark_merge_into_their_median():
    def run(scheme, speed, when):
        return {"source": "llama-2-7b", "gpu": "H100", "device": "cuda", "scheme": scheme, "path": "compile",
                "decode_tokens_per_s": speed, "time": when}  # fmt: skip

    rows = [run("none", 150.0, "t1"), run("none", 190.0, "t2"), run("int8wo", 250.0, "t2"), run("none", 180.0, "t3")]
    merged = {r["scheme"]: r for r in across_runs(rows)}
    assert len(merged) == 2
    assert merged["none"]["decode_tokens_per_s"] == 180.0 and merged["none"]["time"] == "t3"  # the median run itself
    assert merged["none"]["runs"] == 3 and merged["none"]["decode_tokens_per_s_range"] == (150.0, 190.0)
    assert merged["int8wo"]["runs"] == 1
