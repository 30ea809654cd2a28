"""llmkit's C++ CPU kernels, one-row weight products and decode attention, built at first use and loaded as custom ops.

`torch.ops.llmkit_cpu.int8_weight_mm(x, q, scale)` computes x (q * scale[:, None])^T for float32 x [M, K],
int8 q [N, K] and float32 scale [N], as ATen's `_weight_int8pack_mm` does, with each row of x rounded to 16-bit
integers so that the sums are integer dot products (AVX-512 VNNI or AVX2; csrc/cpu_kernels.cpp says how). The
rounding moves each x by at most 1/65278 of its row's largest value, a 250th of what rounding the weights to int8
costs. `torch.ops.llmkit_cpu.float_weight_mm(x, w)` computes x w^T in float32, four rows of w at a time. They exist
because neither ATen's ops nor inductor's code is fast at one row on the CPU (benchmarks/cpu_gemv_bench.py measures
each). `torch.ops.llmkit_cpu.float_packed_mm(x, packed, n)` is the same float32 product by weights packed in
blocks of 16 rows (`PackedLinear`), as AOTInductor packages hold them. `torch.ops.llmkit_cpu.decode_attention(q,
k_cache, v_cache, mask)` is float32 attention of a few query rows over the caches' first positions (as many as
the mask is wide), read in place. The source is compiled by
`torch.utils.cpp_extension` the first time a process needs it (about 15 s on 2 cores, then cached under
~/.cache/torch_extensions); `llmkit-run` compiles the same file in. Where no C++ compiler
is found, or `LLMKIT_CPU_KERNEL=none` is set (to compare), `available()` says why and callers keep inductor's
loops.
"""

import copy
import functools
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class PackedLinear(nn.Module):
    """A float32 `nn.Linear` without bias whose weight [N, K] is held as blocks of 16 rows, each block [K, 16]
    (column k's 16 weights side by side, the last block padded with zeros), for `float_packed_mm`: a product streams
    the blocks in order and needs no sum across vector lanes, as XNNPACK's packed weights."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        n, k = linear.weight.shape
        self.out_features = n
        blocks = F.pad(linear.weight.detach(), (0, 0, 0, -n % 16)).view(-1, 16, k)
        self.register_buffer("packed", blocks.transpose(1, 2).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.llmkit_cpu.float_packed_mm(x.reshape(-1, x.shape[-1]), self.packed, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)


class PackedEmbedding(nn.Module):
    """An embedding whose table is a `PackedLinear`'s weight (a tied classifier): rows read from the packed blocks,
    so the table is held once."""

    def __init__(self, linear: PackedLinear):
        super().__init__()
        self.register_buffer("packed", linear.packed)  # the same tensor: exported as one constant

    def forward(self, tokens: Tensor) -> Tensor:
        return self.packed[tokens // 16, :, tokens % 16]


def with_packed_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` (sharing its other weights) whose plain float32 linear layers without bias are
    `PackedLinear`s, and an embedding tied to one of them a `PackedEmbedding`; `model` itself where the kernels
    can't run (`why_not`). Quantized weights are left alone."""
    if not available():
        return model
    plain = [name for name, m in model.named_modules() if type(m) is nn.Linear and m.bias is None
             and type(m.weight.data) is Tensor and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    if not plain:
        return model
    copy_ = copy.deepcopy(model, memo={id(p): p for p in model.parameters()} | {id(b): b for b in model.buffers()})

    def put(name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(copy_.get_submodule(parent), child, module)

    packed = {}  # id of a weight -> its PackedLinear
    for name in plain:
        linear = model.get_submodule(name)
        put(name, packed.setdefault(id(linear.weight), PackedLinear(linear)))
    for name, m in model.named_modules():
        if type(m) is nn.Embedding and id(m.weight) in packed:
            put(name, PackedEmbedding(packed[id(m.weight)]))
    return copy_
