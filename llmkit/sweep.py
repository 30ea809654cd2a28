"""Experiment sweeps: run a parameterized notebook with papermill over a grid, then collect.

A sweep file (YAML) names the notebook, fixed parameters and a grid:

    name: ci
    notebook: notebooks/08_benchmarks.ipynb
    parameters: {source: default, repeats: 2}
    grid:
      schemes: [[none], [int8wo]]
      paths: [[eager, compile]]

Each grid point runs the notebook once, writing the executed notebook and its JSON-lines results
under `results/<name>/`; a failed run is recorded and the sweep goes on. The results are collected
into `summary.md` and charts.
"""

import itertools
import json
import re
from pathlib import Path

import yaml

from llmkit.errors import LLMKitError, first_line
from llmkit.files import write_file_atomically


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"sweep file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LLMKitError(f"{path} is not valid YAML ({first_line(e)})") from None
    if not isinstance(spec, dict):
        raise LLMKitError(f"{path} holds a YAML {type(spec).__name__}; a sweep is a mapping of name, notebook, grid")
    for key in ("name", "notebook", "grid"):
        if key not in spec:
            raise LLMKitError(f"{path} has no '{key}'; a sweep names its notebook, its grid and its name")
    if not isinstance(spec["name"], str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", spec["name"]) or spec["name"] in (
        ".", "..",
    ):  # fmt: skip
        raise LLMKitError(f"{path}: name {spec['name']!r} must be a plain folder name (letters, digits, _ . + -)")
    grid = spec["grid"]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise LLMKitError(
            f"{path}: the grid is empty or malformed ({grid!r}); give each parameter a non-empty list of values"
        )
    if not isinstance(spec.get("parameters", {}), dict):
        raise LLMKitError(f"{path}: parameters must be a mapping of name: value, not {spec['parameters']!r}")
    if not Path(spec["notebook"]).is_file():
        raise LLMKitError(f"{path}: notebook {spec['notebook']} not found (paths are relative to where llmkit runs)")
    return spec


def grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(point: dict) -> str:
    text = "_".join(f"{k}-{'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.+-]", "", text)


def run_sweep(path: str | Path, results_dir: str | Path = "results") -> Path:
    """Run every grid point; return the sweep's folder, which holds summary.md."""
    import papermill

    spec = read_sweep(path)
    out_dir = Path(results_dir) / spec["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for point in grid_points(spec["grid"]):
        name = run_name(point)
        results = (out_dir / f"{name}.jsonl").resolve()
        results.unlink(missing_ok=True)
        params = {**spec.get("parameters", {}), **point, "out": str(results)}
        try:
            papermill.execute_notebook(spec["notebook"], str(out_dir / f"{name}.ipynb"), parameters=params,
                                       progress_bar=False, cwd=str(Path(spec["notebook"]).parent))  # fmt: skip
            runs.append({"run": name, "status": "ok"})
        except Exception as e:  # papermill raises its own error for a failed cell, others for a bad kernel
            runs.append({"run": name, "status": "failed", "error": str(e).strip().splitlines()[-1][:200]})
        write_text(out_dir / "runs.json", json.dumps(runs, indent=2))  # after each run: a record if stopped
    summarize(out_dir, runs)
    return out_dir


def summarize(out_dir: Path, runs: list[dict]) -> None:
    """summary.md (the runs, then one table of every result) and a roofline chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmkit.bench import read_results, table
    from llmkit.plots import roofline

    rows = read_results(*sorted(out_dir.glob("*.jsonl")))
    lines = [f"# Sweep {out_dir.name}", "", "| run | status |", "| --- | --- |"]
    lines += [f"| {r['run']} | {r['status']}{': ' + r['error'] if r.get('error') else ''} |" for r in runs]
    nothing = "every run failed" if all(r["status"] != "ok" for r in runs) else "no run wrote any"
    lines += ["", table(rows) if rows else f"No results: {nothing}.", ""]
    if rows:
        ax = roofline(rows, title=f"Sweep {out_dir.name}")
        save_figure(ax.figure, out_dir / "roofline.png")
        plt.close(ax.figure)
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
        labels = [f"{r['source']} {r['scheme']}/{r['path']}" for r in rows]
        ax.barh(labels, [r["decode_tokens_per_s"] for r in rows],
                xerr=[r["decode_tokens_per_s_stdev"] for r in rows])  # fmt: skip
        ax.set(xlabel="decode tokens/s", title=f"Sweep {out_dir.name}")
        save_figure(fig, out_dir / "decode.png")
        plt.close(fig)
        lines += ["![roofline](roofline.png)", "", "![decode tokens/s](decode.png)"]
    write_text(out_dir / "summary.md", "\n".join(lines) + "\n")


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` whole: a sweep stopped midway leaves the last complete file, never half of one."""
    write_file_atomically(path, lambda tmp: Path(tmp).write_text(text))


def save_figure(fig, path: Path) -> None:
    write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
