"""llmkit against llama2.c's run.c on one llama2.c file, at each thread count, as ratios measured in one run.

    python benchmarks/runc_compare.py --llama2c PATH/TO/llama2.c [--threads 1 2] [--schemes int8wo] [--out FILE]

PATH is a checkout of github.com/karpathy/llama2.c (not vendored). The script builds run.c as its Makefile's
`runomp` does (gcc -Ofast -fopenmp -march=native), writes a stories15M-shaped llama2.c file with random
weights and a shared classifier beside the checkout's tokenizer.bin, times run.c's greedy decode of 256 steps
(median of --repeats runs, its own "achieved tok/s") and llmkit's paths on the same file and steps; each llmkit
row's ratio is to run.c timed just before and after it (the mean of the two medians).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmkit.bench import bench_in_subprocess, environment, table
from llmkit.model import SHAPES

STEPS = 256  # run.c's -n: the BOS token, then 255 decoded
LLMKIT_RUNS = (("none", "compile"), ("none", "aoti"), ("none", "pte"), ("int8wo", "compile"), ("int8wo", "aoti"),
               ("8da4w-32", "compile"), ("8da4w-32", "aoti"), ("8da4w-32", "pte"))  # fmt: skip


def write_llama2c_file(path: Path, seed: int = 0) -> None:
    """A version-0 llama2.c checkpoint of the stories15M shape: random float32 weights, shared classifier."""
    a = SHAPES["stories15M"]
    head_dim, kv_heads = a.dim // a.n_heads, a.n_kv_heads or a.n_heads
    kv_dim, n = kv_heads * head_dim, a.n_layers
    header = np.array([a.dim, a.hidden_dim, n, a.n_heads, kv_heads, a.vocab_size, STEPS], dtype=np.int32)
    # run.c's order; True marks an RMSNorm weight (ones), False a random matrix; last, RoPE tables run.c skips
    tensors = [((a.vocab_size, a.dim), False), ((n, a.dim), True), ((n, a.dim, a.dim), False),
               ((n, kv_dim, a.dim), False), ((n, kv_dim, a.dim), False), ((n, a.dim, a.dim), False),
               ((n, a.dim), True), ((n, a.hidden_dim, a.dim), False), ((n, a.dim, a.hidden_dim), False),
               ((n, a.hidden_dim, a.dim), False), ((a.dim,), True), ((STEPS, head_dim), False)]  # fmt: skip
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for shape, norm in tensors:
            f.write((np.ones(shape) if norm else rng.normal(0, 0.02, shape)).astype(np.float32).tobytes())


def build_runc(checkout: Path, workdir: Path) -> Path:
    binary = workdir / "run"
    subprocess.run(["gcc", "-Ofast", "-fopenmp", "-march=native", str(checkout / "run.c"), "-lm", "-o", str(binary)],
                   check=True)  # fmt: skip
    return binary


def time_runc(binary: Path, model: Path, tokenizer: Path, threads: int, repeats: int) -> float:
    """run.c's median "achieved tok/s" (from its second token to its last) over `repeats` greedy runs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    speeds = []
    for _ in range(repeats):
        out = subprocess.run([str(binary), str(model), "-z", str(tokenizer), "-t", "0", "-n", str(STEPS)],
                             capture_output=True, text=True, env=env, check=True)  # fmt: skip
        speeds.append(float(re.search(r"achieved tok/s: ([\d.]+)", out.stderr + out.stdout)[1]))
    return statistics.median(speeds)


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of the fastest of `repeats` float32 sums over `nbytes` on torch's threads: about what a decode step
    that reads each of that many bytes of weights once can reach (a ceiling for the float32 paths)."""
    x = torch.ones(nbytes // 4)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return nbytes / min(times[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama2c", type=Path, required=True, help="a checkout of karpathy/llama2.c")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--schemes", nargs="+", default=None, help="only llmkit's runs of these schemes (none, int8wo...)")
    p.add_argument("--out", type=Path, default=None, help="append the rows as JSON lines to this file")
    args = p.parse_args()
    if not (args.llama2c / "run.c").is_file() or not (args.llama2c / "tokenizer.bin").is_file():
        p.error(f"{args.llama2c} has no run.c and tokenizer.bin: give a checkout of karpathy/llama2.c")
    if shutil.which("gcc") is None:
        p.error("run.c is built with gcc, which is not installed (apt-get install gcc)")
    commit = subprocess.run(["git", "-C", args.llama2c, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, tokenizer = workdir / "stories15M-random.bin", workdir / "tokenizer.bin"
        write_llama2c_file(model)
        shutil.copy(args.llama2c / "tokenizer.bin", tokenizer)  # beside the model, where llmkit looks for it
        binary = build_runc(args.llama2c, workdir)
        for threads in args.threads:
            torch.set_num_threads(threads)
            runc = time_runc(binary, model, tokenizer, threads, args.repeats)
            weights = model.stat().st_size
            sums = read_bandwidth(weights)
            rows.append({"command": f"OMP_NUM_THREADS={threads} run model.bin -t 0 -n {STEPS}", "source": "run.c",
                         "llama2c_commit": commit, "decode_tokens_per_s": runc, "repeats": args.repeats,
                         "weights_read_bandwidth": runc * weights, "sum_read_bandwidth": sums,
                         **environment(torch.device("cpu"))})  # fmt: skip
            print(f"{threads} thread(s): run.c reads its weights at {runc * weights / 1e9:.1f} GB/s, a sum over as "
                  f"many bytes at {sums / 1e9:.1f} GB/s: float32 weights read once a step allow at most "
                  f"{sums / (runc * weights):.2f}x run.c")  # fmt: skip
            ours = []
            for scheme, path in LLMKIT_RUNS:
                if args.schemes is None or scheme in args.schemes:
                    r = bench_in_subprocess(model, scheme, path, threads, 1, STEPS - 2, args.repeats, workdir)
                    # a VM's speed drifts by 10-20% over minutes: each ratio is to run.c timed just before and after
                    after = time_runc(binary, model, tokenizer, threads, args.repeats)
                    r["runc_tokens_per_s"] = statistics.median([runc, after])
                    r["vs_runc"] = r["decode_tokens_per_s"] / r["runc_tokens_per_s"]
                    ours.append(r)
                    runc = after
            print(f"\n{threads} thread(s)\n{table(ours)}")
            for r in ours:
                print(f"{r['scheme']:>9} {r['path']:<8} {r['vs_runc']:.2f}x run.c ({r['runc_tokens_per_s']:.1f} tok/s)")
            rows += ours
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
