"""Decode speed against the number of devices (tensor parallelism, #26): `llmkit bench --tp N` at each N.

Each N runs in its own group of N processes (llmkit's launcher), on random weights of a known shape. Rows are
appended to --out as JSON lines (command, commit, machine, GPU) and carry, beside the decode speed, the time of one
all-reduce of a token's activation and the two per layer a step needs. Prints a table with the speed-up over N=1.

On a machine with several GPUs (the figures the issue asks for):
    python benchmarks/tp_bench.py --shapes llama-2-7b llama-3-8b --tp 1 2 4 8 --out data/benchmarks/tp/h200.jsonl
Checking the script on a CPU (gloo; figures of no interest):
    python benchmarks/tp_bench.py --shapes stories15M --tp 1 2 --device cpu --dtype float32 --path eager
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llmkit.bench import read_results


def run(shape: str, tp: int, args: argparse.Namespace, out: Path) -> None:
    command = [sys.executable, "-m", "llmkit", "bench", "--shape", shape, "--device", args.device, "--dtype",
               args.dtype, "--path", args.path, "--prompt-len", str(args.prompt_len), "--new-tokens",
               str(args.new_tokens), "--repeats", str(args.repeats), "--out", str(out), "--tp", str(tp)]  # fmt: skip
    print(" ".join(command[2:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def table(rows: list[dict]) -> str:
    lines = ["| shape | device | tp | decode tok/s | speed-up over tp 1 | all-reduce us | all-reduces ms/step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    base = {r["source"]: r["decode_tokens_per_s"] for r in rows if r.get("tp", 1) == 1}
    for r in rows:
        speedup = r["decode_tokens_per_s"] / base[r["source"]] if r["source"] in base else float("nan")
        lines.append(f"| {r['source']} | {r.get('gpu') or r.get('cpu')} | {r.get('tp', 1)} | "
                     f"{r['decode_tokens_per_s']:.1f} | {speedup:.2f}x | {r.get('all_reduce_s', 0) * 1e6:.0f} | "
                     f"{r.get('all_reduce_s_per_step', 0) * 1e3:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["llama-2-7b", "llama-3-8b"])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--path", default="compile", help="eager or compile (compiled, with CUDA graphs on a GPU)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="append the rows here (default: a temporary file)")
    args = p.parse_args()
    tps = args.tp
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        skipped = [n for n in tps if n > gpus]
        if skipped:
            print(f"skipping tp {skipped}: this machine has {gpus} GPUs", file=sys.stderr)
        tps = [n for n in tps if n <= gpus]
    out = args.out or Path(tempfile.mkdtemp(prefix="tp-bench-")) / "rows.jsonl"
    before = len(read_results(out)) if out.exists() else 0
    for shape in args.shapes:
        for tp in tps:
            run(shape, tp, args, out)
    print(table(read_results(out)[before:]))
    print(f"rows appended to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
