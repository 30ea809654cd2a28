"""Tensor parallelism: one model split over N processes (one per GPU, or CPU processes), and the launcher.

The split is a transform applied to a loaded model, as quantize and compile are (gpt-fast's tp.py, written here
with DTensor's tensor-parallel API); `model.py` knows nothing of it. Each of the N ranks holds:

- attention: whole heads. The fused `wqkv` is split per head: its rows are first regrouped so that rank r's block
  is [its q heads, its k heads, its v heads], then DTensor splits it by rows (`ColwiseParallel`). `wo` is split by
  columns (`RowwiseParallel`): each rank's product is a partial sum, all-reduced. The KV cache holds the rank's
  key/value heads only.
- the MLP: `w1` and `w3` by rows (output features), `w2` by columns, all-reduced: the layer's second all-reduce.
- the embedding, whole: a step reads one row of it per token, and splitting it would cost another all-reduce.
  The output layer is whole too when it is tied to the embedding (the same matrix); an untied one is split by
  vocabulary rows and each rank's slice of the logits is all-gathered.
- the norms and the RoPE tables, whole (they are small).

So each layer costs two all-reduces of one [B, T, dim] activation, and every rank ends a step with the same logits
and samples the same token (from one seed, `shared_seed`).

A server split this way runs its engine on rank 0 and has the other ranks repeat its model calls
(llmkit.engine_tp). `launch` starts N copies of a command with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR...), so the user needn't type torchrun; `init` joins a process to its group (NCCL on GPUs, gloo on the
CPU), so `torchrun --nproc-per-node N -m llmkit ... --tp N` works too.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from llmkit.checkpoint import args_from_hf_config, read_json_object
from llmkit.errors import LLMKitError, first_line
from llmkit.generate import LLM
from llmkit.loading import DEFAULT_MODEL
from llmkit.model import Attention, ModelArgs

TIMEOUT_S = 300  # how long a rank waits for the others, at start-up and in each collective
QUANTIZE_LIMITATION = (
    "--quantize does not work with --tp yet: torchao 0.18's quantized weights do not compose with DTensor "
    "(Int8Tensor cannot be split, and quantizing a split weight loses the split; pytorch/ao#988 tracks tensor "
    "parallel support); use --tp without --quantize, or --quantize on one device"
)


def in_group() -> bool:
    """Whether this process is one rank of several, started by `launch` or torchrun."""
    return "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def split_over_devices(model: nn.Module) -> bool:
    """Whether `tensor_parallel` split the model: some of its weights are DTensors."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def check_split(args: ModelArgs, tp: int) -> None:
    """Each rank must hold whole query heads and whole key/value heads."""
    if tp < 1:
        raise LLMKitError(f"--tp must be at least 1, not {tp}")
    if args.n_heads % tp or args.n_kv_heads % tp:
        fits = " or ".join(str(n) for n in range(1, args.n_kv_heads + 1) if args.n_kv_heads % n == 0)
        raise LLMKitError(f"--tp {tp} does not split the model's {args.n_heads} query heads and {args.n_kv_heads} "
                          f"key/value heads into whole heads per rank; use --tp {fits}")  # fmt: skip


def check_devices(tp: int, device: str) -> None:
    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        if tp > n:
            raise LLMKitError(f"--tp {tp} needs {tp} GPUs (one per rank) but this machine has {n}; use --tp {n} "
                              "or fewer, or --device cpu")  # fmt: skip


def header_args(checkpoint: str | Path) -> ModelArgs | None:
    """The config of a Hugging Face folder (the kit's default model among them), read without its weights, so a
    bad --tp fails before any process starts; None for other formats, whose ranks check the split as they load."""
    path = DEFAULT_MODEL if str(checkpoint) == "default" else Path(checkpoint)
    config = path / "config.json" if path.is_dir() else path
    if config.name != "config.json" or not config.is_file():
        return None
    return args_from_hf_config(read_json_object(config, "Hugging Face config"))


_MESH: DeviceMesh | None = None
# Each layer's split. Colwise: the output features (the weight's rows) split, nothing to add up. Rowwise: the input
# features (its columns) split, each rank's product a partial sum that is all-reduced.
LAYER_PLAN = {"attention.wqkv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
              "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
              "feed_forward.w2": RowwiseParallel()}  # fmt: skip


def init(tp: int, device: str = "cpu", timeout_s: float = TIMEOUT_S) -> DeviceMesh:
    """Join this process to its group of `tp` ranks (once) and return the one-dimensional mesh over them.

    Ranks other than 0 print nothing on stdout from here on. On a GPU each rank takes GPU LOCAL_RANK.
    """
    global _MESH
    if _MESH is not None:
        return _MESH
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise LLMKitError(f"--tp {tp} but {world} processes were started; start as many as --tp (torchrun "
                          f"--nproc-per-node {tp}), or leave the starting to llmkit")  # fmt: skip
    me, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    check_devices(tp, device)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _MESH = init_device_mesh(_device_type(device), (tp,))
    except (RuntimeError, ValueError) as e:  # a store or socket that timed out, refused or was closed
        raise LLMKitError(f"rank {me} of {tp} could not join the others within {timeout_s:.0f} s ({first_line(e)}); "
                          "did every rank start, with the same MASTER_ADDR and MASTER_PORT?") from None  # fmt: skip
    if me:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return _MESH


def _device_type(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def tensor_parallel(llm: LLM, tp: int) -> LLM:
    """Split `llm`'s model over the `tp` ranks of this process's group, in place (see the module's docstring).

    Call `init` before loading the model on a GPU, so that it loads on this rank's own GPU.
    """
    model = llm.model
    if model is None:
        raise LLMKitError(f"{llm.name} was exported; --tp splits a checkpoint's model: load the checkpoint")
    if llm.scheme:
        raise LLMKitError(QUANTIZE_LIMITATION)
    check_split(model.args, tp)
    mesh = init(tp, llm.device.type)
    for layer in model.layers:
        group_heads_by_rank(layer.attention, tp)
        parallelize_module(layer, mesh, LAYER_PLAN, src_data_rank=None)  # every rank has the weights: keeps its part
        layer.attention.n_heads //= tp
        layer.attention.n_kv_heads //= tp
        layer.attention.qkv_sizes = [size // tp for size in layer.attention.qkv_sizes]
    if not model.args.tie_embeddings:
        parallelize_module(model, mesh, {"output": ColwiseParallel(output_layouts=Replicate())}, src_data_rank=None)
    model.setup_buffers()  # KV caches of the local heads
    return llm


@torch.no_grad()
def group_heads_by_rank(attention: Attention, tp: int) -> None:
    """Reorder `wqkv`'s rows from [q | k | v] to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], where q_r, k_r and v_r are the
    heads rank r computes, so that splitting the rows into `tp` equal blocks gives each rank whole heads of all three.
    Query heads and key/value heads go in the same order, so each rank's queries find their own group's keys."""
    for name in ("weight", "bias"):
        w = getattr(attention.wqkv, name)
        if w is None:
            continue
        q, k, v = (part.chunk(tp) for part in w.split(attention.qkv_sizes))
        regrouped = torch.cat([torch.cat(parts) for parts in zip(q, k, v, strict=True)])
        setattr(attention.wqkv, name, nn.Parameter(regrouped, requires_grad=w.requires_grad))


def shared_seed(seed: int | None) -> int:
    """One sampling seed for every rank: all must draw the same tokens. Rank 0's choice when none is given."""
    chosen = [seed if seed is not None else torch.seed() % 2**63]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


_LINES: dist.ProcessGroup | None = None


def read_line(prompt: str) -> str:
    """`input()` on rank 0, and the same line on every other rank (for `llmkit chat`). EOFError everywhere at the
    end of input. The line travels over a gloo group of its own that waits as long as the user takes to type."""
    global _LINES
    if _LINES is None:
        _LINES = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    line = [None]
    if rank() == 0:
        try:
            line[0] = input(prompt)
        except EOFError:
            pass
    dist.broadcast_object_list(line, src=0, group=_LINES)
    if line[0] is None:
        raise EOFError
    return line[0]


def all_reduce_time(numel: int, dtype: torch.dtype, device: torch.device, repeats: int = 50) -> float:
    """Median seconds of one all-reduce of `numel` elements over this group: a decode step does two per layer,
    each of one token's activation (`dim` elements)."""
    x = torch.ones(numel, dtype=dtype, device=device)
    times = []
    for _ in range(repeats + 5):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[5:])
    return times[len(times) // 2]


def launch(command: Sequence[str], nprocs: int, poll_s: float = 0.05, grace_s: float = 5.0) -> int:
    """Run `command` as ranks 0..nprocs-1 of one group, with torchrun's environment, and wait for all of them.

    Rank 0 keeps this process's stdin, stdout and stderr; the others write to log files. When a rank fails, the
    others are stopped at once (they may be waiting on it in a collective) and this raises an `LLMKitError`
    naming it, unless it was rank 0 exiting by itself, which has printed its own error: then its status is
    returned. Returns 0 when every rank succeeded.
    """
    logs = Path(tempfile.mkdtemp(prefix="llmkit-tp-"))
    env = {**os.environ, "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    procs = []
    # SIGTERM goes to rank 0, which stops as it would alone (a server finishes its requests) and tells the others
    previous = signal.signal(signal.SIGTERM, lambda *_: procs[0].send_signal(signal.SIGTERM) if procs else None)
    try:
        for r in range(nprocs):
            env_r = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
            if r == 0:
                procs.append(subprocess.Popen(command, env=env_r))
            else:
                with open(logs / f"rank{r}.log", "wb") as log:
                    procs.append(subprocess.Popen(command, env=env_r, stdin=subprocess.DEVNULL, stdout=log,
                                                  stderr=subprocess.STDOUT))  # fmt: skip
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                break
            time.sleep(poll_s)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(procs, grace_s)
    if not failed:
        for log in logs.iterdir():
            log.unlink()
        logs.rmdir()
        return 0
    r, code = failed[0], codes[failed[0]]
    if r == 0 and code > 0:
        return code
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    last = _last_line(logs / f"rank{r}.log") if r else ""
    raise LLMKitError(f"rank {r} of {nprocs} {how}{f' ({last})' if last else ''}; the other ranks were stopped"
                      f"{f' (its output: {logs}/rank{r}.log)' if r else ''}")  # fmt: skip


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """Terminate the ranks still running, then kill those that did not stop within `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
