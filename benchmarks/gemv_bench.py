"""Time each weight-only kernel on a model's matrices at one token, against cuBLAS in bf16 and torchao's kernels.

    python benchmarks/gemv_bench.py --shape llama-2-7b llama-3-8b --out data/benchmarks/gpu/h200-gemv.jsonl
    python benchmarks/gemv_bench.py --shape llama-2-7b --sweep      # every configuration of llmkit's kernels

Each timing is one CUDA graph that multiplies one token by enough copies of the matrix to overflow the L2
cache several times (as a decode step reads every layer's matrices once), replayed; the median of 5 replays,
divided by the number of products. Bytes are the weights (with scales and offsets) plus the activations and
output. Each kernel's fixed cost and streaming rate are a straight-line fit of time against bytes over the
matrices. Rows go to --out with the GPU, the command and the commit.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkit import kernels  # noqa: E402
from llmkit.bench import environment, memory_bandwidth  # noqa: E402
from llmkit.model import shape_args  # noqa: E402

L2_BYTES = 60e6


def matrices(shape: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of one layer's products and the output layer, w1 and w3 stacked as llmkit multiplies them."""
    a = shape_args(shape, 8)
    head = a.dim // a.n_heads
    kv = a.n_kv_heads or a.n_heads
    return {"wqkv": (a.dim + 2 * kv * head, a.dim), "wo": (a.dim, a.dim), "w13": (2 * a.hidden_dim, a.dim),
            "w2": (a.dim, a.hidden_dim), "output": (a.vocab_size, a.dim)}  # fmt: skip


def time_per_call(calls: list) -> float:
    """Microseconds per call: the calls recorded once as a CUDA graph, replayed 20 times, median of 5."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (20 * len(calls)))
    return statistics.median(times)


def weights_for(kind: str, w: torch.Tensor):
    """(the weight tensors, the function multiplying x by them) for one kind of kernel."""
    if kind == "bf16-cublas":
        return (w,), lambda x, t: F.linear(x, t[0])
    if kind == "llmkit-int8":
        return kernels.quantize_int8(w), lambda x, t, cfg=None: kernels.int8_matmul(x, *t, cfg)
    if kind.startswith("llmkit-int4"):  # llmkit-int4-G, or llmkit-int4tc-G on the tensor-core kernel
        group, (n, k) = int(kind.rsplit("-", 1)[1]), w.shape
        default = kernels.config_for("int4tc", 1, n, k) if kind.startswith("llmkit-int4tc") else None
        return kernels.quantize_int4(w, group), lambda x, t, cfg=None: kernels.int4_matmul(x, *t, cfg or default)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=w.dtype)
    linear.weight.data.copy_(w)
    if kind == "torchao-int8":  # torchao's int8 is a dequantize-and-multiply that inductor fuses
        quantize_(linear, Int8WeightOnlyConfig())
        return (linear,), torch.compile(lambda x, t: t[0](x))
    quantize_(linear, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))  # tinygemm
    return (linear,), lambda x, t: t[0](x)


def nbytes(tensors) -> int:
    from llmkit.quantize import model_size

    return sum(model_size(t) if isinstance(t, torch.nn.Module) else t.nbytes for t in tensors)


def measure(kind: str, n: int, k: int, configs=(None,)) -> list[dict]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    first, fn = weights_for(kind, w)
    size = nbytes(first)
    copies = [first] + [weights_for(kind, torch.randn_like(w) * 0.02)[0] for _ in range(int(3 * L2_BYTES // size))]
    rows = []
    for cfg in configs:
        extra = {} if cfg is None else {"cfg": cfg}
        try:
            us = time_per_call([lambda t=t, e=extra: fn(x, t, **e) for t in copies])
        except Exception as e:  # a configuration the compiler rejects (too many registers, say)
            print(f"{kind} {n}x{k} {cfg}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
            continue
        moved = size + x.nbytes + n * 2
        rows.append({"kernel": kind, "n": n, "k": k, "m": 1, "us": us, "bytes": moved, "gb_per_s": moved / us / 1e3,
                     "config": None if cfg is None else vars(cfg)})  # fmt: skip
    return rows


def fit(rows: list[dict]) -> tuple[float, float]:
    """(fixed cost in us, streaming rate in GB/s): least squares of us against bytes."""
    xs, ys = [r["bytes"] for r in rows], [r["us"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)
    return my - slope * mx, 1 / slope / 1e3


SWEEP = {
    "llmkit-int8": [kernels.Config(bn, bk, s, w) for bn, bk, s, w in
                    itertools.product((4, 8, 16), (512, 1024), (1, 2), (4, 8))],  # fmt: skip
    "llmkit-int4-128": [kernels.Config(bn, bk, s, w) for bn, bk, s, w in
                        itertools.product((4, 8, 16), (1024, 2048), (1, 2), (4, 8))]  # fmt: skip
    + [kernels.Config(bn, 1024, s, w, tensor_cores=True) for bn, s, w in
       itertools.product((16, 32, 64), (1, 2, 4), (4, 8))],  # fmt: skip
}
KINDS = ("bf16-cublas", "llmkit-int8", "torchao-int8", "llmkit-int4-32", "llmkit-int4-64", "llmkit-int4-128",
         "llmkit-int4tc-32", "llmkit-int4tc-128", "torchao-int4-128")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", default=["llama-2-7b"])
    p.add_argument("--kernels", nargs="+", default=list(KINDS))
    p.add_argument("--sweep", action="store_true", help="time every configuration in SWEEP; print the best")
    p.add_argument("--out", help="append the rows to this JSON-lines file")
    p.add_argument("--write-tuned", help="with --sweep: write the best configurations here")
    args = p.parse_args()
    env = {**environment(torch.device("cuda")), "copy_bandwidth_gb_per_s": memory_bandwidth("cuda", 2048) / 1e9,
           "command": "python benchmarks/gemv_bench.py " + " ".join(sys.argv[1:]),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    print(f"{env['gpu']}: copy bandwidth {env['copy_bandwidth_gb_per_s']:.0f} GB/s")
    rows, best = [], {}
    for shape in args.shape:
        for kind in (SWEEP if args.sweep else args.kernels):
            for name, (n, k) in matrices(shape).items():
                got = measure(kind, n, k, SWEEP[kind] if args.sweep else (None,))
                for r in got:
                    r.update(shape=shape, matrix=name, **env)
                rows += got
                if args.sweep and got:
                    top = min(got, key=lambda r: r["us"])
                    best[f"{kind.split('-')[1]} {n} {k}"] = top["config"]
                    print(f"{shape} {name} {kind}: best {top['config']} {top['us']:.1f} us {top['gb_per_s']:.0f} GB/s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.sweep:
        print("TUNED", json.dumps(best))
        if args.write_tuned:
            Path(args.write_tuned).write_text(json.dumps(best, indent=1) + "\n")
        return
    bw = env["copy_bandwidth_gb_per_s"]
    print("| shape | matrix | N x K | " + " | ".join(args.kernels) + " |")
    print("| --- | --- | --- |" + " --- |" * len(args.kernels))
    for shape in args.shape:
        for name, (n, k) in matrices(shape).items():
            cells = [next((f"{r['us']:.1f} us {r['gb_per_s']:.0f} GB/s" for r in rows if (r["shape"], r["matrix"],
                     r["kernel"]) == (shape, name, kind)), "-") for kind in args.kernels]  # fmt: skip
            print(f"| {shape} | {name} | {n} x {k} | " + " | ".join(cells) + " |")
    for shape in args.shape:
        for kind in args.kernels:
            mine = [r for r in rows if (r["shape"], r["kernel"]) == (shape, kind)]
            if len(mine) > 1:
                fixed, rate = fit(mine)
                print(f"FIT {shape} {kind}: fixed {fixed:.1f} us + bytes at {rate:.0f} GB/s ({100 * rate / bw:.0f}% "
                      f"of copy); largest matrix at {100 * max(r['gb_per_s'] for r in mine) / bw:.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
