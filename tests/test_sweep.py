"""`llmkit sweep`: a sweep runs a parameterized notebook over its grid with papermill and collects the results."""

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import disk_full_while_writing

from llmkit.bench import across_runs
from llmkit.errors import LLMKitError
from llmkit.loading import load
from llmkit.sweep import grid_points, read_sweep, run_name, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def bench_notebook(folder: Path) -> Path:
    """A two-cell notebook as a sweep runs one: papermill's parameters cell, then `bench` on them."""
    import nbformat

    parameters = nbformat.v4.new_code_cell('source = "stories15M"\nschemes = ["none"]\nnew_tokens = 8\nout = ""')
    parameters.metadata["tags"] = ["parameters"]
    run = nbformat.v4.new_code_cell("from llmkit.bench import bench\n\n"
                                    "rows = bench(source, schemes, ['eager'], prompt_len=4, new_tokens=new_tokens, "
                                    "repeats=2, out=out or None)")  # fmt: skip
    path = folder / "bench.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[parameters, run], metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}), path)  # fmt: skip
    return path


def test_a_sweep_runs_each_grid_point_records_a_failure_and_collects(tmp_path, tiny_folder):
    """Each grid point runs the notebook with its parameters; the run that fails is recorded and the next one
    still runs; summary.md lists both runs and tables the results, which the notebook wrote as bench rows."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "tiny", "notebook": str(bench_notebook(tmp_path)),
                                     "parameters": {"source": str(tiny_folder), "new_tokens": 8},
                                     "grid": {"schemes": [["no-such-scheme"], ["none"]]}}))  # fmt: skip
    out = run_sweep(sweep, tmp_path / "results")
    runs = json.loads((out / "runs.json").read_text())
    assert [(r["run"], r["status"]) for r in runs] == [("schemes-no-such-scheme", "failed"), ("schemes-none", "ok")]
    assert "unknown scheme 'no-such-scheme'" in runs[0]["error"]
    assert sorted(p.name for p in out.glob("*.ipynb")) == ["schemes-no-such-scheme.ipynb", "schemes-none.ipynb"]
    assert not (out / "schemes-no-such-scheme.jsonl").exists()
    (row,) = [json.loads(line) for line in (out / "schemes-none.jsonl").read_text().splitlines()]
    assert (row["source"], row["scheme"], row["path"], row["new_tokens"]) == (str(tiny_folder), "none", "eager", 8)
    float32_bytes = 4 * sum(p.numel() for p in load(tiny_folder).model.parameters())
    assert row["decode_tokens_per_s"] > 0 and row["weight_bytes"] == float32_bytes
    summary = (out / "summary.md").read_text()
    assert "| schemes-none | ok |" in summary and "| schemes-no-such-scheme | failed: " in summary
    assert f"| {tiny_folder} | none | eager |" in summary
    assert (out / "roofline.png").stat().st_size > 0 and (out / "decode.png").stat().st_size > 0


def test_the_grid_is_every_combination_of_its_values():
    points = grid_points({"schemes": [["none"], ["int8wo", "int4wo-32"]], "paths": [["eager", "compile"]], "n": [1, 2]})
    assert points == [{"schemes": ["none"], "paths": ["eager", "compile"], "n": 1},
                      {"schemes": ["none"], "paths": ["eager", "compile"], "n": 2},
                      {"schemes": ["int8wo", "int4wo-32"], "paths": ["eager", "compile"], "n": 1},
                      {"schemes": ["int8wo", "int4wo-32"], "paths": ["eager", "compile"], "n": 2}]  # fmt: skip
    assert [run_name(p) for p in points][2:] == ["schemes-int8wo+int4wo-32_paths-eager+compile_n-1",
                                                 "schemes-int8wo+int4wo-32_paths-eager+compile_n-2"]  # fmt: skip


def test_the_ci_sweep_names_the_benchmark_notebook_and_its_parameters():
    """sweeps/ci.yaml reads as a sweep; its notebook exists and sets, in its parameters cell, every
    parameter the sweep gives it, so papermill overrides real variables rather than adding unused ones."""
    import nbformat

    spec = read_sweep(ROOT / "sweeps" / "ci.yaml")
    notebook = ROOT / spec["notebook"]
    (cell,) = [c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    names = set(re.findall(r"^(\w+) =", cell.source, re.MULTILINE))
    assert set(spec["parameters"]) | set(spec["grid"]) <= names, names
    assert len(grid_points(spec["grid"])) == 2


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


# A disk that fills up while the sweep writes one of its outputs: the previous file stays whole and no temporary
# file is left beside it. One test per place sweep.py writes through llmkit.files' atomic writer.


@pytest.mark.parametrize("name", ["roofline.png", "decode.png", "summary.md"])
def test_a_full_disk_while_summarizing_keeps_the_previous_file(tmp_path, tiny_folder, monkeypatch, name):
    """summarize() draws the charts (save_figure) and writes summary.md (write_text)."""
    from llmkit import bench, sweep

    bench.bench(str(tiny_folder), prompt_len=4, new_tokens=4, repeats=1, out=tmp_path / "run.jsonl")
    runs = [{"run": "run", "status": "ok"}]
    sweep.summarize(tmp_path, runs)
    previous = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(previous) == {"run.jsonl", "roofline.png", "decode.png", "summary.md"}
    disk_full_while_writing(monkeypatch, sweep, name)
    with pytest.raises(LLMKitError, match=f"cannot write .*{name}"):
        sweep.summarize(tmp_path, [{"run": "run", "status": "failed", "error": "a later run"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(previous)
    assert (tmp_path / name).read_bytes() == previous[name]


def test_a_full_disk_while_recording_the_runs_keeps_the_previous_record(tmp_path, monkeypatch):
    """run_sweep writes runs.json after each run (here one papermill refuses at once: its kernel does not exist)."""
    import nbformat

    from llmkit import sweep

    notebook = tmp_path / "n.ipynb"
    nbformat.write(nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "no-such-kernel", "language": "python",
                                                                     "display_name": "none"}}), notebook)  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "notebook": str(notebook), "grid": {"n": [1]}}))
    (tmp_path / "results" / "s").mkdir(parents=True)
    (tmp_path / "results" / "s" / "runs.json").write_text("the previous sweep's runs")
    disk_full_while_writing(monkeypatch, sweep, "runs.json")
    with pytest.raises(LLMKitError, match="cannot write .*runs.json"):
        sweep.run_sweep(tmp_path / "s.yaml", tmp_path / "results")
    assert sorted(p.name for p in (tmp_path / "results" / "s").iterdir()) == ["n-1.ipynb", "runs.json"]
    assert (tmp_path / "results" / "s" / "runs.json").read_text() == "the previous sweep's runs"
