"""An AOTInductor decode step with llmkit's C++ kernels against the same step with inductor's loops, interleaved.

    python benchmarks/step_ab.py [--source stories15M] [--quantize none] [--threads 1 2] [--processes 6] [--out FILE]

Exports the source (a shape with random weights, or a checkpoint) twice, once with `LLMKIT_CPU_KERNEL=none`
(inductor's loops), then in each of --processes fresh processes loads both packages and times blocks of one-token
steps of each in turn: each block's ratio is measured within a second of its neighbour, so a VM whose speed
drifts 10-20% in minutes (this one) moves both alike. Where a package's weights land in memory changes its speed
too: the same package loaded twice into one process ran 5-15% apart, the one loaded first slower, in six of six
processes on this VM. So the processes alternate which way loads first, and the figure is the median over
processes of each one's median ratio.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from llmkit.aoti import load_aoti
from llmkit.bench import environment

WAYS = {"loops": "none", "kernels": ""}  # LLMKIT_CPU_KERNEL for each package


def export(source: str, scheme: str, max_seq_len: int, way: str, folder: Path) -> Path:
    """The package of one way, exported in a process of its own (the kernels' availability is per process)."""
    code = ("import sys, torch; from pathlib import Path; from llmkit.bench import build_model, on_path; "
            "model, tok = build_model(sys.argv[1], torch.device('cpu'), torch.float32, int(sys.argv[3])); "
            "on_path(model, tok, sys.argv[2], 'aoti', Path(sys.argv[4]))")  # fmt: skip
    (folder / way).mkdir()
    subprocess.run([sys.executable, "-c", code, source, scheme, str(max_seq_len), str(folder / way)], check=True,
                   env={**os.environ, "LLMKIT_CPU_KERNEL": WAYS[way]})  # fmt: skip
    return folder / way / f"{scheme}.pt2"


def interleaved(steps: dict, blocks: int, steps_per_block: int) -> dict[str, list[float]]:
    """Milliseconds per step of each way, block by block, the ways taking turns."""
    token, position = torch.tensor([[5]]), torch.tensor([100])
    steps = dict(sorted(steps.items()))  # the same turns whichever loaded first
    times = {way: [] for way in steps}
    for step in steps.values():
        for _ in range(20):
            step(token, position)
    for _ in range(blocks):
        for way, step in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per_block):
                step(token, position)
            times[way].append((time.perf_counter() - start) / steps_per_block * 1e3)
    return times


def measure(packages: dict[str, Path], threads: list[int], blocks: int, steps_per_block: int) -> None:
    """In this process: each way's step in turn at each thread count; prints {threads: (loops, kernels, ratio)}."""
    steps = {way: load_aoti(path).step for way, path in packages.items()}
    result = {}
    for n in threads:
        torch.set_num_threads(n)
        times = interleaved(steps, blocks, steps_per_block)
        ratios = [a / b for a, b in zip(times["loops"], times["kernels"], strict=True)]
        result[n] = (statistics.median(times["loops"]), statistics.median(times["kernels"]), statistics.median(ratios))
    print(json.dumps(result))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="stories15M", help="a shape (random weights) or a checkpoint")
    p.add_argument("--quantize", default="none", help="none or a preset (int8wo...)")
    p.add_argument("--max-seq-len", type=int, default=257)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--processes", type=int, default=6)
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--steps", type=int, default=100, help="steps per block")
    p.add_argument("--out", type=Path, default=None, help="append the rows as JSON lines to this file")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # a worker: {way: package} as JSON
    args = p.parse_args()
    if args.measure:
        measure({w: Path(f) for w, f in json.loads(args.measure).items()}, args.threads, args.blocks, args.steps)
        return 0
    command = "python benchmarks/step_ab.py " + shlex.join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        packages = {way: str(export(args.source, args.quantize, args.max_seq_len, way, Path(tmp))) for way in WAYS}
        runs = []
        for i in tqdm(range(args.processes), desc="processes", unit="process"):
            order = dict(sorted(packages.items(), reverse=i % 2 == 1))  # which way loads first alternates
            worker = [sys.executable, __file__, "--measure", json.dumps(order), "--blocks", str(args.blocks),
                      "--steps", str(args.steps), "--threads", *map(str, args.threads)]  # fmt: skip
            out = subprocess.run(worker, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for n in args.threads:
        loops, kernels, ratios = zip(*(run[str(n)] for run in runs), strict=True)
        row = {"command": command, "source": args.source, "scheme": args.quantize, "threads": n,
               "ms_per_step": {"loops": round(statistics.median(loops), 4),
                               "kernels": round(statistics.median(kernels), 4)},
               "kernels_speedup": round(statistics.median(ratios), 4),
               "speedup_per_process": [round(r, 4) for r in ratios], "blocks": args.blocks,
               "steps_per_block": args.steps, **environment(torch.device("cpu"))}  # fmt: skip
        rows.append(row)
        print(f"{n} thread(s): loops {row['ms_per_step']['loops']:.3f} ms, kernels {row['ms_per_step']['kernels']:.3f} "
              f"ms a step: kernels {row['kernels_speedup']:.3f}x (processes {min(ratios):.3f}-{max(ratios):.3f})")
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
