"""Check that the notebooks the book renders were saved executed. The book shows the outputs committed with each
notebook and runs none (book/_config.yml says why), so a notebook saved with its outputs cleared, run only in part,
out of order, or showing a traceback would become a page without its plots or with an error on it. Whether the
notebooks still run is nbval's check (`make test-notebooks`)."""

import json
import sys
from pathlib import Path


def problems(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    found, counts = [], []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code" or not "".join(cell["source"]).strip():  # an empty cell is never run
            continue
        if cell.get("execution_count") is None:
            found.append(f"cell {i} was not run")
        else:
            counts.append(cell["execution_count"])
        if any(output["output_type"] == "error" for output in cell.get("outputs", [])):
            found.append(f"cell {i} shows an error")
    if counts != sorted(set(counts)):
        found.append(f"cells were not run once each from top to bottom (execution counts {counts})")
    return [f"{path}: {problem}" for problem in found]


def main(folder: str = "notebooks") -> int:
    notebooks = sorted(Path(folder).glob("*.ipynb"))
    found = [problem for path in notebooks for problem in problems(path)]
    for line in found:
        print(line, file=sys.stderr)
    print(f"{folder}: {len(notebooks)} notebooks, {len(found)} problems (run and save a notebook to fix it)")
    return 1 if found or not notebooks else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
