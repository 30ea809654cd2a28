"""Time one-row (decode) products by a model's matrices on the CPU: float32 and int8 weight-only, library and ours.

    python benchmarks/cpu_gemv_bench.py [--shape stories15M] [--threads 1 2] [--matrices output] [--out FILE]

Each timing multiplies one row of activations by COPIES copies of a matrix (as a decode step reads each layer's
matrix once, from memory or the last-level cache, not from a warm L1/L2), repeated, median of 7; microseconds
per matrix. The ways:
  fp32 F.linear          ATen (MKL) on float32 weights, eager
  fp32 compiled loops    the same product in llmkit's compiled decode step without its kernel (inductor's loop)
  fp32 compiled kernel   llmkit's compiled step with its C++ float32 kernel (`llmkit.cpu_kernels`)
  fp32 packed kernel     the compiled step's products by weights packed in blocks of 16 rows, as AOTI packages hold them
  int8 aten int8pack     ATen's `_weight_int8pack_mm`, the library's int8 weight-only op, eager
  int8 inductor woq      inductor's own int8 weight-only lowering: freezing + max-autotune, C++ GEMM template
                         (WOQ_COPIES copies, called until it has made as many products: the others' weights
                         may stay in the cache, which can only flatter it)
  int8 compiled loops    llmkit's compiled step without its kernel (inductor's loop, one accumulator per row)
  int8 compiled kernel   llmkit's compiled step with its C++ int8 kernel
At one thread each way is also timed by the thread's own CPU time (printed), which other processes sharing the
cores change least. Each int8 way is checked against a float64 reference. Rows carry the command, commit,
machine and load average.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkit import cpu_kernels  # noqa: E402
from llmkit.bench import environment  # noqa: E402
from llmkit.compile import _options  # noqa: E402
from llmkit.cpu_codegen import short_loads_in_one_instruction  # noqa: E402
from llmkit.model import shape_args  # noqa: E402

COPIES_BYTES = 16 * 2**20  # int8 bytes per timing: about a stories15M model, more than the L2 caches
MAX_COPIES = 16  # each copy is a product in the compiled graph: more take minutes to compile
WOQ_COPIES = 2  # inductor's int8 lowering autotunes each product (seconds each)


def matrices(shape: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of one layer's products and the output layer, as llmkit's model multiplies them."""
    a = shape_args(shape, 8)
    head, kv = a.dim // a.n_heads, a.n_kv_heads or a.n_heads
    return {"wqkv": (a.dim + 2 * kv * head, a.dim), "wo": (a.dim, a.dim), "w1": (a.hidden_dim, a.dim),
            "w2": (a.dim, a.hidden_dim), "output": (a.vocab_size, a.dim)}  # fmt: skip


def time_per_matrix(fn, copies: int, inner: int, clock=time.perf_counter) -> float:
    """Microseconds per matrix: `fn` multiplies by every copy; warmed up, then the median of 7 runs of `inner`."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(7):
        start = clock()
        for _ in range(inner):
            fn()
        times.append((clock() - start) / (inner * copies) * 1e6)
    return statistics.median(times)


def products(x, weights):
    """Every copy's one-row product, each input depending on the last output as a decode step's layers do (left
    independent, inductor would fuse them into one loop that keeps a sum per copy going, which no model has)."""
    out = None
    for q, s in weights:
        if out is not None:
            x = x * (1 + 1e-9 * out[:, :1])
        if isinstance(q, torch.nn.Module):  # cpu_kernels.PackedLinear
            y = q(x)
        else:
            y = torch.mm(x, q.t().to(torch.float32)) * s if q.dtype == torch.int8 else F.linear(x, q)
        out = y if out is None else out + y
    return out


def compiled(weights, x, options: dict, kernel: bool):
    """`products` compiled as llmkit compiles a decode step (or with `options`), its own kernel on or off."""
    available = cpu_kernels.available
    cpu_kernels.available = available if kernel else (lambda: False)
    try:
        torch._dynamo.reset()
        fn = torch.compile(products, fullgraph=True, options=options)
        with torch.no_grad(), short_loads_in_one_instruction():
            fn(x, weights)
    finally:
        cpu_kernels.available = available
    return lambda: fn(x, weights)


def packed(w: list[torch.Tensor]) -> list[tuple[torch.nn.Module, None]]:
    """The weights as `cpu_kernels.PackedLinear`s (blocks of 16 rows), for `products`."""
    layers = [torch.nn.Linear(wi.shape[1], wi.shape[0], bias=False) for wi in w]
    for layer, wi in zip(layers, w, strict=True):
        layer.weight.data = wi
    return [(cpu_kernels.PackedLinear(layer), None) for layer in layers]


class Frozen(torch.nn.Module):
    """Weights as module buffers, which inductor's freezing folds into constants (its int8 lowering needs it)."""

    def __init__(self, weights):
        super().__init__()
        for i, (q, s) in enumerate(weights):
            self.register_buffer(f"q{i}", q)
            self.register_buffer(f"s{i}", s)
        self.n = len(weights)

    def forward(self, x):
        return products(x, [(getattr(self, f"q{i}"), getattr(self, f"s{i}")) for i in range(self.n)])


def bench_matrix(n: int, k: int, threads: int) -> dict[str, float]:
    torch.manual_seed(0)
    copies = min(MAX_COPIES, max(1, COPIES_BYTES // (n * k)))
    inner = max(2, 200_000_000 // (n * k * copies))  # about 200M weights per timing
    x = torch.randn(1, k)
    w = [torch.randn(n, k) * 0.02 for _ in range(copies)]
    scales = [wi.abs().amax(1) / 127 for wi in w]
    q8 = [(wi / s[:, None]).round().clamp(-127, 127).to(torch.int8) for wi, s in zip(w, scales, strict=True)]
    int8 = list(zip(q8, scales, strict=True))
    fp32 = [(wi, None) for wi in w]
    reference = sum(x.double() @ (q.double() * s.double()[:, None]).T for q, s in int8)
    ways = {"fp32 F.linear": lambda: [F.linear(x, wi) for wi in w],
            "fp32 compiled loops": compiled(fp32, x, _options_cpu(), kernel=False),
            **({"fp32 compiled kernel": compiled(fp32, x, _options_cpu(), kernel=True),
                "fp32 packed kernel": compiled(packed(w), x, _options_cpu(), kernel=True)} if cpu_kernels.available()
               else {}),
            "int8 aten int8pack": lambda: [torch.ops.aten._weight_int8pack_mm(x, q, s) for q, s in int8]}  # fmt: skip
    frozen = Frozen(int8[:WOQ_COPIES]).eval()
    torch._dynamo.reset()
    woq = torch.compile(frozen, options={"freezing": True, "max_autotune": True,
                                         "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True})  # fmt: skip
    with torch.no_grad():
        woq(x)
    ways["int8 inductor woq"] = lambda: [woq(x) for _ in range(0, copies, WOQ_COPIES)]  # as many products
    ways["int8 compiled loops"] = compiled(int8, x, _options_cpu(), kernel=False)
    if cpu_kernels.available():
        ways["int8 compiled kernel"] = compiled(int8, x, _options_cpu(), kernel=True)
    row = {}
    with torch.no_grad():
        for name, fn in ways.items():
            row[name] = time_per_matrix(fn, copies, inner)
            if threads == 1:  # the time this thread ran: what a loaded machine changes least
                row[f"{name} cpu"] = time_per_matrix(fn, copies, inner, time.thread_time)
            if name.startswith("int8"):  # each output against its float64 sum of products
                out, expected = fn(), reference
                if name == "int8 inductor woq":
                    out, expected = woq(x), sum(x.double() @ (q.double() * s.double()[:, None]).T for q, s in
                                                int8[:WOQ_COPIES])  # fmt: skip
                out = sum(out) if isinstance(out, list) else out
                row[f"{name} max error"] = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    return row


def _options_cpu() -> dict:
    return _options(torch.nn.Module(), torch.device("cpu"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="stories15M")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--matrices", nargs="+", default=None, help="only these (wqkv, wo, w1, w2, output)")
    p.add_argument("--out", type=Path, default=None, help="append the rows as JSON lines to this file")
    args = p.parse_args()
    command = "python benchmarks/cpu_gemv_bench.py " + shlex.join(sys.argv[1:])
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (n, k) in matrices(args.shape).items():
            if args.matrices and name not in args.matrices:
                continue
            times = bench_matrix(n, k, threads)
            row = {"command": command, "shape": args.shape, "matrix": name, "n": n, "k": k, "threads": threads,
                   "us_per_matrix": {w: round(t, 2) for w, t in times.items() if not w.endswith(("error", "cpu"))},
                   "cpu_us_per_matrix": {w[:-4]: round(t, 2) for w, t in times.items() if w.endswith(" cpu")},
                   "max_relative_error": {w[: -len(" max error")]: t for w, t in times.items() if "error" in w},
                   "load_average_during": os.getloadavg()[0], **environment(torch.device("cpu"))}  # fmt: skip
            rows.append(row)
            us = row["cpu_us_per_matrix"] or row["us_per_matrix"]
            base = us["int8 compiled loops"]
            print(f"{threads} thread(s) {name} {n}x{k}: " + ", ".join(f"{w} {t:.1f} us" for w, t in us.items())
                  + f"  (kernel vs loops {base / us.get('int8 compiled kernel', base):.2f}x, load "
                  f"{row['load_average_during']:.2f})", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
