"""llmkit's C++ CPU kernels, one-row weight products and decode attention, built at first use and loaded as custom ops.

`torch.ops.llmkit_cpu.int8_weight_mm(x, q, scale)` computes x (q * scale[:, None])^T for float32 x [M, K],
int8 q [N, K] and float32 scale [N], as ATen's `_weight_int8pack_mm` does, with each row of x rounded to 16-bit
integers so that the sums are integer dot products (AVX-512 VNNI or AVX2; csrc/cpu_kernels.cpp says how). The
rounding moves each x by at most 1/65278 of its row's largest value, a 250th of what rounding the weights to int8
costs. `torch.ops.llmkit_cpu.float_weight_mm(x, w)` computes x w^T in float32, four rows of w at a time. They exist
because neither ATen's ops nor inductor's code is fast at one row on the CPU (benchmarks/cpu_gemv_bench.py measures
each). `torch.ops.llmkit_cpu.decode_attention(q, k_cache, v_cache, mask)` is float32 attention of a few query rows
over the caches' first positions (as many as the mask is wide), read in place. The source is compiled by
`torch.utils.cpp_extension` the first time a process needs it (about 15 s on 2 cores, then cached under
~/.cache/torch_extensions); `llmkit-run` compiles the same file in. Where no C++ compiler
is found, or `LLMKIT_CPU_KERNEL=none` is set (to compare), `available()` says why and callers keep inductor's
loops.
"""

import functools
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
STALE_LOCK_S = 180  # a build takes 15-60 s here; a lock older than this was left by a build that was killed


@functools.cache
def load() -> str | None:
    """Build (once per source version) and load the op library; None where it is built already in this process
    (llmkit-run, a test) or can't be: then `why_not()` says why."""
    if hasattr(torch.ops.llmkit_cpu, "int8_weight_mm"):
        return None
    from torch.utils import cpp_extension

    name = f"llmkit_cpu_{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}"  # a changed source builds anew
    clear_stale_lock(Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock")
    # -fopenmp: at::parallel_for is OpenMP written in ATen's headers, so without it the rows run on one thread
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], is_python_module=False)  # fmt: skip


def clear_stale_lock(lock: Path) -> None:
    """Wait while another process builds the library; remove the lock a killed build left (Ctrl-C, a timeout),
    on which torch's own wait would last for ever."""
    told = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            print(f"removed {lock}, left by a build of llmkit's C++ kernels that did not finish", file=sys.stderr)
            return
        if not told:
            print(f"waiting for another process's build of llmkit's C++ kernels ({lock})", file=sys.stderr)
            told = True
        time.sleep(1)


@functools.cache
def why_not() -> str | None:
    """Why the kernel can't run in this process, or None when it can (building it if needed)."""
    if os.environ.get("LLMKIT_CPU_KERNEL") == "none":
        return "LLMKIT_CPU_KERNEL=none asks for inductor's loops"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (apt-get install g++)"
    try:
        load()
    except Exception as e:  # the compiler's errors come as several types; inductor's loops still work
        return f"building {SOURCE.name} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e)}"
    return None


def available() -> bool:
    return why_not() is None
