"""Where a serving step's time goes: the engine's decode step alone, by batch size, then the same engine under HTTP.

Builds a random-weight folder of a known shape (as serve_shapes.py does), loads it, and runs the continuous-batching
engine (compiled with `--compile`, as `llmkit serve --compile` does). First the engine alone: B requests at once,
each step timed, the model's forward timed apart (synchronized). Then, with `--http`, the same engine behind the
app in this process on a loopback port while `llmkit bench-serve --url` (its own process) sends the load: the
step, forward and the gap between steps per batch size tell whether the model, the engine's own work or the HTTP
side (the event loop sharing the interpreter) sets the pace; the process's CPU time per step (`cpu ms`) says how
much host work each step costs, the engine's alone and with the HTTP side's. `--forward-ms MS` replaces the
model's forward with a wait of MS that releases the GIL, as a GPU's does, so the host's share can be measured on
any machine (the logits are then fixed random ones). Prints tables; `--out` appends JSON lines.

    python benchmarks/engine_steps.py --shape llama-3.2-1b --device cuda --dtype bfloat16 --compile \
        --batch-sizes 1 4 16 --http 1 16
    python benchmarks/engine_steps.py --shape stories15M --device cpu --dtype float32 --forward-ms 2.2 \
        --batch-sizes 16 --http 16
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

import torch
import uvicorn
from serve_shapes import write_shape_folder

import llmkit
from llmkit.bench import environment
from llmkit.engine import Engine, Request, run_to_completion
from llmkit.serve import create_app, listening_socket

PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class StepTimer:
    """Records each engine step (start, end, and its decode forward: rows, seconds, synchronized) and prefill."""

    def __init__(self, engine: Engine, device: torch.device):
        self.steps: list[tuple[float, float, int, float]] = []  # start, end, rows decoded, forward seconds
        self.admits: list[tuple[int, float]] = []  # (requests, seconds) of each step that prefills arrivals
        self.cpu: list[float] = []  # the process's CPU time (all threads) at the end of each step
        step, decode, admit = engine.step, engine.decode_step, engine._admit
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        forward = [0, 0.0]  # the rows and seconds of this step's decode, if it decoded

        def timed_decode(tokens, positions, cache_len=None):
            sync()
            start = time.perf_counter()
            out = decode(tokens, positions, cache_len=cache_len)
            sync()
            forward[:] = tokens.shape[0], time.perf_counter() - start
            return out

        def timed_admit(requests):
            start = time.perf_counter()
            admit(requests)
            sync()
            self.admits.append((len(requests), time.perf_counter() - start))

        def timed_step():
            forward[:] = 0, 0.0
            start = time.perf_counter()
            step()
            self.steps.append((start, time.perf_counter(), *forward))
            self.cpu.append(time.process_time())

        engine.decode_step, engine.step, engine._admit = timed_decode, timed_step, timed_admit

    def summary(self, since: int = 0) -> list[dict]:
        """Per batch size: decode steps, median step, forward, gap before the next step and process CPU time from
        the previous step's end to this one's (ms), tokens/s."""
        steps, by_rows = self.steps[since:], {}
        cpu = [float("nan"), *(b - a for a, b in pairwise(self.cpu[since:]))]
        for (start, end, rows, forward), after, used in zip(steps, [*steps[1:], None], cpu, strict=True):
            if rows:
                gap = after[0] - end if after else float("nan")
                by_rows.setdefault(rows, []).append((end - start, forward, gap, used))
        out = []
        for rows, records in sorted(by_rows.items()):
            columns = zip(*records, strict=True)
            step, forward, gap, cpu = (median([x for x in column if x == x]) * 1000 for column in columns)
            out.append({"rows": rows, "steps": len(records), "step_ms": step, "forward_ms": forward, "gap_ms": gap,
                        "cpu_ms": cpu, "tokens_per_s": rows / (step + gap) * 1000})  # fmt: skip
        return out


def waiting_forward(engine: Engine, seconds: float) -> None:
    """The engine's forwards become a sleep (which releases the GIL, as waiting for a GPU does) returning fixed
    random logits: what is left of a step is the host's work."""
    llm = engine.llm
    logits = torch.randn(engine.max_batch_size, 1, llm.model.args.vocab_size, device=llm.device)

    def decode(tokens, positions, cache_len=None):
        time.sleep(seconds)
        return logits[: tokens.shape[0]]

    def prefill(blocks, cache_len=None):
        time.sleep(seconds)
        return [logits[: t.shape[0]].expand(*t.shape, -1) for t, _ in blocks]

    engine.decode_step, engine.prefill_step = decode, prefill


def profile(engine: Engine, rows: int, steps: int = 10) -> None:
    """The kernels of `steps` decode steps of `rows` rows, by their total device time."""
    device = engine.llm.device
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
    positions = torch.full((rows, 1), 100, dtype=torch.long, device=device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.decode_step(tokens, positions, cache_len=256)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))


def show(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n rows  steps  step ms  forward ms  gap ms  cpu ms    tok/s")
    for r in rows:
        print(f"{r['rows']:>5} {r['steps']:>6} {r['step_ms']:>8.2f} {r['forward_ms']:>11.2f} {r['gap_ms']:>7.2f} "
              f"{r['cpu_ms']:>7.2f} {r['tokens_per_s']:>8.1f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--http", type=int, nargs="*", default=[], help="concurrency levels to send over HTTP")
    p.add_argument("--switch-intervals", type=float, nargs="+", default=[None],
                   help="sys.setswitchinterval values for the HTTP levels (default: Python's)")  # fmt: skip
    p.add_argument("--profile", type=int, default=None, metavar="ROWS", help="profile decode steps of ROWS rows")
    p.add_argument("--forward-ms", type=float, default=None, metavar="MS",
                   help="replace the model's forward by a GIL-free wait of MS: the host's share of a step")  # fmt: skip
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    record = {"shape": args.shape, "dtype": args.dtype, "compile": args.compile, "max_tokens": args.max_tokens,
              **environment(device)}  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_shape_folder(args.shape, Path(tmp) / args.shape, args.device, args.dtype, args.max_seq_len)
        llm = llmkit.load(folder, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len)
    engine = Engine(llm, args.max_batch_size, max_queue=max([*args.http, 1]))
    if args.compile:
        from llmkit.compile import compile_batched_decode, compile_batched_prefill

        engine.decode_step = compile_batched_decode(llm, args.max_batch_size)
        if device.type == "cuda":
            engine.prefill_step = compile_batched_prefill(llm)
    if args.forward_ms is not None:
        waiting_forward(engine, args.forward_ms / 1000)
    timer = StepTimer(engine, device)
    prompt = llm.tokenizer.encode(PROMPT)
    run_to_completion(engine, [Request(prompt, 4, temperature=0, ignore_eos=True)])  # warm-up
    for b in args.batch_sizes:
        since = len(timer.steps)
        run_to_completion(engine, [Request(prompt, args.max_tokens, temperature=0, ignore_eos=True)
                                   for _ in range(b)])  # fmt: skip
        rows = [r for r in timer.summary(since) if r["rows"] == b]
        show(f"engine alone, {b} requests (prefill of all {b}: {timer.admits[-1][1] * 1000:.1f} ms)", rows)
        results += [{"mode": "engine", "requests": b, **r, **record} for r in rows]
    if args.profile:
        profile(engine, args.profile)
    if args.http:
        sock = listening_socket("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        default_interval = sys.getswitchinterval()
        for interval, c in ((i, c) for i in args.switch_intervals for c in args.http):
            sys.setswitchinterval(interval or default_interval)
            since, admits_since = len(timer.steps), len(timer.admits)
            client = ["bench-serve", "--url", url, "--concurrency", str(c), "--max-tokens", str(args.max_tokens)]
            subprocess.run([sys.executable, "-m", "llmkit", *client, "--requests", str(max(8, 4 * c))], check=True)
            rows = timer.summary(since)
            admits = timer.admits[admits_since:]
            prefill_ms = median([a[1] for a in admits]) * 1000
            show(f"over HTTP, {c} clients, switch interval {sys.getswitchinterval() * 1000:g} ms "
                 f"(prefills: {len(admits)}, median {prefill_ms:.1f} ms)", rows)  # fmt: skip
            results += [{"mode": "http", "clients": c, "switch_interval": sys.getswitchinterval(), **r, **record}
                        for r in rows]  # fmt: skip
        server.should_exit = True
        thread.join()
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
