"""Benchmarks: how fast each path decodes, and how close that is to the memory-bandwidth limit.

Decoding one token reads every weight once, so tokens/s x weight bytes is the bandwidth the
decode achieves; the device's copy bandwidth, measured in the same run, is the limit it can
approach. Results are JSON lines carrying the machine, versions and settings.
"""

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llmkit import distributed
from llmkit.aoti import export_aoti, load_aoti
from llmkit.compile import compile
from llmkit.devices import dtype_name, resolve_device, resolve_dtype, sync
from llmkit.errors import LLMKitError
from llmkit.executorch import export_pte, load_pte
from llmkit.generate import LLM
from llmkit.loading import GGUF_SCHEME, load
from llmkit.model import SHAPES, Transformer, random_model, shape_args
from llmkit.quantize import model_size, quantize
from llmkit.sampling import argmax
from llmkit.version import __version__

PATHS = ("eager", "compile", "aoti", "pte")


def memory_bandwidth(device: str | torch.device = "cpu", megabytes: int = 512, repeats: int = 5) -> float:
    """The device's achievable memory bandwidth in bytes/s: a large copy (bytes read + written)."""
    device = torch.device(device)
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times[1:])


def bytes_read_per_token(model: Transformer, nbytes: int) -> int:
    """What one decode step reads: every weight but an untied embedding table (one row of it is read),
    plus the whole KV cache, which attention reads at every step."""
    if not model.args.tie_embeddings:
        nbytes -= model_size(model.tok_embeddings)
    caches = [layer.attention.kv_cache for layer in model.layers]
    return nbytes + sum(c.k_cache.nbytes + c.v_cache.nbytes for c in caches)


@dataclass
class Timing:
    time_to_first_token: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


@torch.inference_mode()
def time_generation(llm: LLM, prompt_len: int, new_tokens: int) -> Timing:
    """Greedy prefill of a random prompt then `new_tokens` one-token decodes, timed with syncs.

    Tokens and positions stay on the device, so the host never waits for a GPU between steps: it
    queues the next step while the GPU runs this one, as a serving loop would.
    """
    device = llm.device

    def pick(logits: Tensor) -> Tensor:  # on the CPU llmkit.sampling's argmax (ATen's is slower than a small step)
        return logits[0, -1].argmax().view(1, 1) if device.type != "cpu" else torch.tensor([[argmax(logits[0, -1])]])

    prompt = torch.randint(0, 100, (1, prompt_len), device=device)
    sync(device)
    start = time.perf_counter()
    token = pick(llm.step(prompt, torch.arange(prompt_len, device=device)))
    sync(device)
    ttft = time.perf_counter() - start
    input_pos = torch.tensor([prompt_len], device=device)
    for _ in range(new_tokens):
        token = pick(llm.step(token, input_pos))
        input_pos = input_pos + 1
    sync(device)
    decode = time.perf_counter() - start - ttft
    return Timing(ttft, prompt_len / ttft, new_tokens / decode)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak resident set


def environment(device: torch.device) -> dict:
    """Where a figure was measured: the machine, its processor and instruction set, the versions, the commit."""
    env = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
           "torch": torch.__version__, "python": platform.python_version(), "llmkit": __version__,
           "commit": source_commit()}  # fmt: skip
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:  # a VM's processor can change between runs, and with it the instructions inductor writes
        env["cpu"] = cpu_model()
        env["cpu_isa"] = torch.backends.cpu.get_cpu_capability()
        env["cpu_count"] = os.cpu_count()
        env["cpu_threads"] = torch.get_num_threads()
        env["load_average"] = os.getloadavg()[0]  # what else ran: one minute's average of runnable processes
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except ImportError:
        pass
    return env


def cpu_model() -> str:
    """The processor's model name as Linux reports it (the platform's name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_commit() -> str | None:
    """The git commit of the llmkit source that ran, with "-dirty" if it had changes; None outside a checkout."""
    folder = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
        status = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--", "."],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def command(source: str, scheme: str, path: str, device: str, dtype: str, prompt_len: int, new_tokens: int,
            repeats: int, tp: int = 1) -> str:  # fmt: skip
    """The command line that measures this one row again."""
    where = f"--shape {source}" if is_shape(source) else f"--checkpoint-path {shlex.quote(source)}"
    threads = f" --threads {torch.get_num_threads()}" if device == "cpu" else ""
    return (f"llmkit bench {where} --quantize {scheme} --path {path} --device {device} --dtype {dtype} "
            f"--prompt-len {prompt_len} --new-tokens {new_tokens} --repeats {repeats}{threads}"
            f"{f' --tp {tp}' if tp > 1 else ''}")  # fmt: skip


def on_path(model: Transformer, tokenizer, scheme: str, path: str, workdir: Path, tp: int = 1) -> LLM:
    """An LLM on the requested path (eager, compiled, or exported and loaded back), quantized with the scheme first,
    split over the `tp` ranks of this process's group first where tp > 1."""
    llm = LLM(model, tokenizer, name="bench")
    if tp > 1:
        distributed.tensor_parallel(llm, tp)
    if scheme not in ("none", GGUF_SCHEME):  # a GGUF file's blocks were kept as it loaded
        quantize(llm, scheme)
    if path == "compile":
        compile(llm)
    elif path == "aoti":
        llm = load_aoti(export_aoti(llm, workdir / f"{scheme}.pt2", force=True))
    elif path == "pte":
        llm = load_pte(export_pte(llm, workdir / f"{scheme}.pte", force=True))
    elif path != "eager":
        raise LLMKitError(f"unknown path {path!r}; use one of {', '.join(PATHS)}")
    return llm


def is_shape(source: str) -> bool:
    """A source that is neither "default" nor an existing path names a shape (or is a typo of one)."""
    return source in SHAPES or (source != "default" and not Path(source).exists())


def build_model(source: str, device: torch.device, dtype: torch.dtype, max_seq_len: int, scheme: str = "none"):
    """(model, tokenizer) from a shape name (random weights) or a checkpoint path."""
    if is_shape(source):
        return random_model(shape_args(source, max_seq_len), device, dtype), None
    llm = load(source, device=device.type, dtype=dtype_name(dtype), max_seq_len=max_seq_len,
               gguf_blocks=scheme == GGUF_SCHEME)  # fmt: skip
    return llm.model, llm.tokenizer


def bench(
    source: str,
    schemes: list[str] = ("none",),
    paths: list[str] = ("eager",),
    device: str = "cpu",
    dtype: str = "float32",
    prompt_len: int = 64,
    new_tokens: int = 64,
    repeats: int = 3,
    out: str | Path | None = None,
    workdir: str | Path = "results/artifacts",
    tp: int = 1,
) -> list[dict]:
    """Measure every (scheme, path) on `source`, a shape name or a checkpoint; append JSON lines to `out`.

    With `tp` > 1 this process is one rank of a group of `tp` (`llmkit.distributed`): each rank holds its split of
    the model, rows also carry the time of one all-reduce of a token's activation, and rank 0 alone appends.
    """
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    if tp > 1:  # before the models are built: on a GPU, each rank builds on its own
        if set(schemes) != {"none"} or not set(paths) <= {"eager", "compile"}:
            raise LLMKitError("--tp measures unquantized models (--quantize none) on --path eager or compile")
        distributed.init(tp, device)
        torch_device = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch_device
    if not schemes or not paths:
        raise LLMKitError("nothing to measure: give at least one scheme and one path")
    for p in paths:
        if p not in PATHS:
            raise LLMKitError(f"unknown path {p!r}; use one of {', '.join(PATHS)}")
    for name, value in (("prompt-len", prompt_len), ("new-tokens", new_tokens), ("repeats", repeats)):
        if value < 1:
            raise LLMKitError(f"--{name} must be at least 1, not {value}")
    if out is not None:  # checked before the measurement, not after it
        out = Path(out)
        if not out.parent.is_dir() or out.is_dir():
            raise LLMKitError(f"--out {out}: give a file in an existing folder (results are appended to it)")
    if is_shape(source):
        shape_args(source, 8)  # an unknown shape fails here, before any work
    if GGUF_SCHEME in schemes and not source.endswith(".gguf"):
        raise LLMKitError(f"--quantize {GGUF_SCHEME} keeps a .gguf file's own blocks; give one as --checkpoint-path")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    max_seq_len = prompt_len + new_tokens + 1
    bandwidth = memory_bandwidth(torch_device)
    env = environment(torch_device)
    rows = []
    # .pte runs last: ExecuTorch's thread pool, once started, slows later runs in the same process
    combos = sorted(((s, p) for s in schemes for p in paths), key=lambda c: c[1] == "pte")
    for scheme, path in tqdm(combos, desc="bench", unit="run"):
        model, tokenizer = build_model(source, torch_device, torch_dtype, max_seq_len, scheme)
        if torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        llm = on_path(model, tokenizer, scheme, path, workdir, tp)
        nbytes = model_size(model)
        read_per_token = bytes_read_per_token(model, nbytes)
        time_generation(llm, min(prompt_len, 8), min(new_tokens, 8))  # warm-up: compiled kernels, CUDA graphs
        timings = [time_generation(llm, prompt_len, new_tokens) for _ in range(repeats)]
        decode = [t.decode_tokens_per_s for t in timings]
        row = {
            "command": command(source, scheme, path, torch_device.type, dtype, prompt_len, new_tokens, repeats, tp),
            "source": source, "scheme": scheme, "path": path, "device": torch_device.type, "dtype": dtype,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "decode_tokens_per_s": statistics.median(decode),
            "decode_tokens_per_s_stdev": statistics.stdev(decode) if repeats > 1 else 0.0,
            "prefill_tokens_per_s": statistics.median(t.prefill_tokens_per_s for t in timings),
            "time_to_first_token_s": statistics.median(t.time_to_first_token for t in timings),
            "weight_bytes": nbytes, "bytes_read_per_token": read_per_token,
            "peak_memory_bytes": peak_memory(torch_device),
            "achieved_bandwidth": read_per_token * statistics.median(decode), "device_bandwidth": bandwidth,
            "compile_fallback": llm.compile_fallback,  # not None: "compile" ran eager, for this reason
            **env, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        row["bandwidth_fraction"] = row["achieved_bandwidth"] / bandwidth
        if tp > 1:  # a decode step does two per layer
            row["tp"] = tp
            row["all_reduce_s"] = distributed.all_reduce_time(model.args.dim, torch_dtype, torch_device)
            row["all_reduce_s_per_step"] = 2 * model.args.n_layers * row["all_reduce_s"]
        rows.append(row)
        if out and distributed.rank() == 0:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del llm, model
    return rows


# (faster, slower): on any CPU the first (scheme, path) must decode faster than the second in the same run
SPEED_ORDER = (
    (("none", "compile"), ("none", "eager")),
    (("none", "aoti"), ("none", "eager")),
    (("int8wo", "compile"), ("none", "compile")),
    (("int8wo", "aoti"), ("none", "compile")),
    (("8da4w-32", "compile"), ("none", "compile")),
    (("8da4w-32", "aoti"), ("none", "compile")),
)


@dataclass
class SpeedCheck:
    faster: tuple[str, str]
    slower: tuple[str, str]
    ratio: float  # the first's decode tokens/s over the second's

    @property
    def holds(self) -> bool:
        return self.ratio > 1


def check_speed_order(rows: list[dict], order=SPEED_ORDER) -> list[SpeedCheck]:
    """Each pair of `order` as a ratio of the rows' decode speeds (ratios, not times: they hold on any machine)."""
    speed = {(r["scheme"], r["path"]): r["decode_tokens_per_s"] for r in rows}
    eager = sorted({(r["scheme"], r["path"]) for r in rows if r.get("compile_fallback")})
    if eager:
        raise LLMKitError(f"{eager} could not be compiled and ran eager; their figures are not compiled speeds")
    missing = sorted({key for pair in order for key in pair} - speed.keys())
    if missing:
        raise LLMKitError(f"no measurement for {missing}: bench every scheme and path the check compares")
    return [SpeedCheck(faster, slower, speed[faster] / speed[slower]) for faster, slower in order]


def read_results(*files: str | Path) -> list[dict]:
    """The rows of JSON-lines result files, as `bench(..., out=...)` appends them."""
    return [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line]


def bench_in_subprocess(checkpoint: str | Path, scheme: str, path: str, threads: int, prompt_len: int,
                        new_tokens: int, repeats: int, workdir: Path) -> dict:  # fmt: skip
    """One `llmkit bench` row, in a process of its own: ExecuTorch's thread pool, once started, slows what follows."""
    out = workdir / "row.jsonl"
    out.unlink(missing_ok=True)
    flags = {"--checkpoint-path": checkpoint, "--quantize": scheme, "--path": path, "--threads": threads,
             "--prompt-len": prompt_len, "--new-tokens": new_tokens, "--repeats": repeats, "--out": out}  # fmt: skip
    argv = [str(x) for flag, value in flags.items() for x in (flag, value)]
    subprocess.run([sys.executable, "-m", "llmkit", "bench", *argv], check=True, cwd=workdir)
    (row,) = read_results(out)
    return row


def across_runs(rows: list[dict]) -> list[dict]:
    """One row per source, device, scheme and path: the run with the median decode speed, with the
    number of runs and their slowest and fastest decode speeds. Compiled decode on a GPU can vary from one
    compilation to the next, as inductor's tuner picks kernel configurations anew: one run is one sample.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["source"], r.get("gpu") or r.get("processor"), r["device"], r["scheme"], r["path"])
        groups.setdefault(key, []).append(r)
    merged = []
    for runs in groups.values():
        speeds = [r["decode_tokens_per_s"] for r in runs]
        median = next(r for r in runs if r["decode_tokens_per_s"] == statistics.median_low(speeds))
        merged.append({**median, "runs": len(runs), "decode_tokens_per_s_range": (min(speeds), max(speeds))})
    return merged


def path_name(row: dict) -> str:
    """The row's path, and "ran eager" where torch.compile failed: a figure never passes for one it isn't."""
    return f"{row['path']} (failed, ran eager)" if row.get("compile_fallback") else row["path"]


def table(rows: list[dict]) -> str:
    """A Markdown table of the figures that matter."""
    lines = [
        "| source | scheme | path | decode tok/s (± sd) | prefill tok/s | TTFT ms | weights MB | % of bandwidth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['scheme']} | {path_name(r)} | {r['decode_tokens_per_s']:.1f} "
            f"(± {r['decode_tokens_per_s_stdev']:.1f}) | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['time_to_first_token_s'] * 1000:.1f} | {r['weight_bytes'] / 1e6:.1f} | "
            f"{100 * r['bandwidth_fraction']:.0f}% |"
        )
    return "\n".join(lines)
