"""llmkit's own weight-only matrix kernels in Triton (int8 per channel, int4 groupwise) for a few tokens at a time.

Decoding one token multiplies a row of activations by every weight matrix: a GEMV, whose time is the time it
takes to read the weights. These kernels read int8 or packed int4 weights, dequantize them in registers and
accumulate in float32; split-K gives a matrix with few output rows enough programs to keep every multiprocessor
reading. They are PyTorch custom ops (`torch.ops.llmkit.int8_mm`, `torch.ops.llmkit.int4_mm`), so
torch.compile, CUDA graphs and torch.export keep them in the graph. On a CPU they run only in Triton's
interpreter (`TRITON_INTERPRET=1` set before this module is imported): slow, for tests and the notebook.

The kit's int4 packing: row n of the weight is K/2 bytes, byte j holding column 2j in its low nibble and
column 2j+1 in its high nibble; each group of G columns has a scale and an offset (its minimum), so a weight
is q * scale + offset with q in 0..15.
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmkit.errors import LLMKitError

MAX_M = 16  # rows of activations the kernels take at once; more is a prefill, which dequantizes and uses cuBLAS
INT4_GROUPS = (32, 64, 128)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# 2**23 as float32 bits: OR-ing an integer 0 <= i < 2**23 into the mantissa gives the float 2**23 + i exactly,
# one integer and one float instruction where a conversion (I2F) runs at a quarter of their rate on Hopper
MAGIC = tl.constexpr(0x4B000000)
MAGIC_F = tl.constexpr(8388608.0)


# ---- packing and references ------------------------------------------------------------------------------


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q, scale): w ~ q * scale[:, None], q int8 in -127..127, one scale per output row, in w's dtype."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-10).to(w.dtype)
    q = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, scale, offset) in the kit's packing (module docstring): asymmetric, one scale and offset per group."""
    n, k = w.shape
    if group not in INT4_GROUPS or k % group:
        raise LLMKitError(f"int4 group size {group} must be one of {INT4_GROUPS} and divide the {k} input features")
    g = w.float().reshape(n, k // group, group)
    low, high = g.amin(dim=2), g.amax(dim=2)
    scale = ((high - low) / 15).clamp(min=1e-10).to(w.dtype)
    offset = low.to(w.dtype)  # the stored (rounded) scale and offset are the ones q is computed against
    q = torch.round((g - offset.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, offset


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def dequantize_int4(packed: Tensor, scale: Tensor, offset: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    n, half = packed.shape
    q = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(n, 2 * half).to(dtype)
    group = 2 * half // scale.shape[1]
    return (q.reshape(n, -1, group) * scale.to(dtype)[..., None] + offset.to(dtype)[..., None]).reshape(n, -1)


# ---- kernels ---------------------------------------------------------------------------------------------


@triton.jit
def _int8_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, K_SPLIT,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 EVEN: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:  # one token: multiply-accumulate elementwise, sum across the columns once at the end
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    else:  # a few tokens: the tensor cores, on weights dequantized to the activations' type
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(pid_k * K_SPLIT, (pid_k + 1) * K_SPLIT, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rn[:, None] * K + rk[None, :]
        if EVEN:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
        # int8 -> float32 as 2**23 + 128 + w in the mantissa, then one subtraction (see MAGIC)
        wf = ((w.to(tl.int32) + (MAGIC + 128)).to(tl.float32, bitcast=True)) - (MAGIC_F + 128.0)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + pid_m * K + rk, mask=rk < K, other=0).to(tl.float32)
            acc += wf * x[None, :]
        else:
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
            acc += tl.dot(x.to(DOT), tl.trans(wf.to(DOT)))
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0).to(tl.float32)
    if BLOCK_M == 1:
        _store(out_ptr + pid_m * N + rn, tl.sum(acc, axis=1) * scale, rn < N, SPLIT_K)
    else:
        _store(out_ptr + rm[:, None] * N + rn[None, :], acc * scale[None, :], (rm[:, None] < M) & (rn[None, :] < N),
               SPLIT_K)  # fmt: skip


@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, M, N, K, K_SPLIT,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    # tiles are [rows, groups, bytes of a group]: a group's scale and offset apply to a whole last axis
    HALF: tl.constexpr = GROUP // 2
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_groups = K // GROUP
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, GROUPS), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(pid_k * K_SPLIT, (pid_k + 1) * K_SPLIT, BLOCK_K):
        rg = k0 // GROUP + tl.arange(0, GROUPS)  # groups of this tile
        byte = rg[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [groups, bytes]: byte j holds columns 2j, 2j+1
        w_ptrs = w_ptr + rn[:, None, None] * (K // 2) + byte[None, :, :]
        gs_ptrs = rn[:, None] * n_groups + rg[None, :]
        if EVEN:
            w = tl.load(w_ptrs).to(tl.int32)
            scale = tl.load(s_ptr + gs_ptrs).to(tl.float32)
            offset = tl.load(o_ptr + gs_ptrs).to(tl.float32)
        else:
            g_mask = (rn[:, None] < N) & (rg[None, :] < n_groups)
            w = tl.load(w_ptrs, mask=g_mask[:, :, None], other=0).to(tl.int32)
            scale = tl.load(s_ptr + gs_ptrs, mask=g_mask, other=0).to(tl.float32)
            offset = tl.load(o_ptr + gs_ptrs, mask=g_mask, other=0).to(tl.float32)
        low = ((w & 0xF) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F  # q of the even columns, exactly
        high = ((w >> 4) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F  # and of the odd ones
        x_mask = rg[:, None] < n_groups
        if BLOCK_M == 1:
            x_even = tl.load(x_ptr + pid_m * K + 2 * byte, mask=x_mask, other=0).to(tl.float32)
            x_odd = tl.load(x_ptr + pid_m * K + 2 * byte + 1, mask=x_mask, other=0).to(tl.float32)
            # sum over a group of (q * scale + offset) * x = scale * sum(q * x) + offset * sum(x)
            qx = tl.sum(low * x_even[None, :, :] + high * x_odd[None, :, :], axis=2)
            acc += qx * scale + offset * tl.sum(x_even + x_odd, axis=1)[None, :]
        else:
            xm = (rm[:, None, None] < M) & x_mask[None, :, :]
            x_even = tl.load(x_ptr + rm[:, None, None] * K + 2 * byte[None, :, :], mask=xm, other=0)
            x_odd = tl.load(x_ptr + rm[:, None, None] * K + 2 * byte[None, :, :] + 1, mask=xm, other=0)
            w_even = tl.reshape((low * scale[:, :, None] + offset[:, :, None]).to(DOT), (BLOCK_N, BLOCK_K // 2))
            w_odd = tl.reshape((high * scale[:, :, None] + offset[:, :, None]).to(DOT), (BLOCK_N, BLOCK_K // 2))
            acc += tl.dot(tl.reshape(x_even.to(DOT), (BLOCK_M, BLOCK_K // 2)), tl.trans(w_even))
            acc += tl.dot(tl.reshape(x_odd.to(DOT), (BLOCK_M, BLOCK_K // 2)), tl.trans(w_odd))
    if BLOCK_M == 1:
        _store(out_ptr + pid_m * N + rn, tl.sum(acc, axis=1), rn < N, SPLIT_K)
    else:
        _store(out_ptr + rm[:, None] * N + rn[None, :], acc, (rm[:, None] < M) & (rn[None, :] < N), SPLIT_K)


@triton.jit
def _int4_tc_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, M, N, K, K_SPLIT,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, EVEN: tl.constexpr, DOT: tl.constexpr, BIAS: tl.constexpr,
                    PRECISION: tl.constexpr):  # fmt: skip
    # One group per iteration, multiplied on the tensor cores (one token is padded to BLOCK_M = 16 rows), the
    # group's scale and offset applied once to the [rows, BLOCK_N] result: no multiply-add per weight on the
    # CUDA cores, which bound the elementwise kernel above at ~8 operations per byte.
    HALF: tl.constexpr = GROUP // 2
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(pid_k * K_SPLIT, (pid_k + 1) * K_SPLIT, GROUP):
        g = k0 // GROUP
        byte = g * HALF + tl.arange(0, HALF)  # byte j holds columns 2j and 2j + 1
        w_ptrs = w_ptr + rn[:, None] * (K // 2) + byte[None, :]
        if EVEN:
            w = tl.load(w_ptrs)
            scale = tl.load(s_ptr + rn * n_groups + g).to(tl.float32)
            offset = tl.load(o_ptr + rn * n_groups + g).to(tl.float32)
        else:
            n_mask = (rn < N) & (g < n_groups)
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
            scale = tl.load(s_ptr + rn * n_groups + g, mask=n_mask, other=0).to(tl.float32)
            offset = tl.load(o_ptr + rn * n_groups + g, mask=n_mask, other=0).to(tl.float32)
        x_mask = (rm[:, None] < M) & (g < n_groups)
        x_even = tl.load(x_ptr + rm[:, None] * K + 2 * byte[None, :], mask=x_mask, other=0)
        x_odd = tl.load(x_ptr + rm[:, None] * K + 2 * byte[None, :] + 1, mask=x_mask, other=0)
        if BIAS:  # bfloat16: a nibble's bits OR-ed under 128.0's (0x4300) are the bfloat16 128 + q, exactly
            w16 = w.to(tl.int16)
            low = ((w16 & 0xF) | 0x4300).to(tl.bfloat16, bitcast=True)
            high = ((w16 >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
        else:
            w32 = w.to(tl.int32)
            low, high = (w32 & 0xF).to(DOT), (w32 >> 4).to(DOT)
        qx = tl.dot(x_even.to(DOT), tl.trans(low), input_precision=PRECISION)
        qx += tl.dot(x_odd.to(DOT), tl.trans(high), input_precision=PRECISION)
        sx = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)
        # a group's sum of x (q scale + offset) = scale sum(x q) + offset sum(x), where sum(x q) = qx - BIAS sum(x)
        acc += qx * scale[None, :] + sx[:, None] * (offset - BIAS * scale)[None, :]
    _store(out_ptr + rm[:, None] * N + rn[None, :], acc, (rm[:, None] < M) & (rn[None, :] < N), SPLIT_K)


@triton.jit
def _store(ptrs, value, mask, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)
    else:  # each split adds its part into a float32 output that starts at zero
        tl.atomic_add(ptrs, value, mask=mask)


# ---- launching -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How one launch cuts the product: output rows and columns of K per program, K splits, warps, stages."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False  # int4 only: `_int4_tc_kernel`, whatever the rows


# "kind N K" -> the fastest configuration at one token on an H200, written by benchmarks/gemv_bench.py --sweep
# (its rows are in data/benchmarks/gpu/); other shapes get `_heuristic`'s
TUNED_FILE = Path(__file__).with_name("kernel_configs.json")
TUNED = {key: Config(**c) for key, c in json.loads(TUNED_FILE.read_text()).items()} if TUNED_FILE.is_file() else {}


def _heuristic(kind: str, n: int, k: int) -> Config:
    """Enough programs to fill the GPU: split K when the matrix has few output rows for its depth."""
    block_n = {"int8": 8, "int4": 16, "int4tc": 32}[kind]
    programs = -(-n // block_n)
    split = 1 if programs >= 512 or k < 4096 else 2 if programs >= 256 else 4
    return Config(block_n, 512 if kind == "int8" else 1024, split, tensor_cores=kind == "int4tc")


def config_for(kind: str, m: int, n: int, k: int) -> Config:
    """`kind` int8, int4 or int4tc (int4 on `_int4_tc_kernel`, for measuring it: a tuned int4 entry can name it)."""
    if m > 1:  # the tensor-core path: a 16-row tile of activations
        return Config(64, 128, 1, 4, 3, tensor_cores=kind == "int4tc")
    return TUNED.get(f"{kind} {n} {k}") or _heuristic(kind, n, k)


def _check(x: Tensor, k: int) -> None:
    if x.dim() != 2 or x.shape[1] != k or x.shape[0] > MAX_M:
        raise LLMKitError(f"activations {tuple(x.shape)} do not fit weights of {k} input features (at most "
                          f"{MAX_M} rows); flatten them to [rows, {k}]")  # fmt: skip
    if x.device.type != "cuda" and not INTERPRETED:
        raise LLMKitError("llmkit's kernels run on a CUDA GPU, or on the CPU with TRITON_INTERPRET=1 set before "
                          "llmkit.kernels is imported")  # fmt: skip


def _launch(kernel, x: Tensor, weights: tuple, n: int, k: int, cfg: Config, out: Tensor | None, **meta) -> Tensor:
    m = x.shape[0]
    block_m = 1 if m == 1 and not cfg.tensor_cores else 16
    k_split = -(-k // (cfg.split_k * cfg.block_k)) * cfg.block_k
    even = n % cfg.block_n == 0 and k % (cfg.split_k * cfg.block_k) == 0
    if cfg.split_k > 1:  # the splits add into float32 zeros; `out`, if given, receives the sum
        final, out = out, torch.zeros((m, n), dtype=torch.float32, device=x.device)
    elif out is None:
        out = x.new_empty((m, n))
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, triton.cdiv(m, block_m))
    if INTERPRETED and isinstance(x, torch._subclasses.FakeTensor):
        return out  # traced, not run (compiled, wrap_triton below does this for the GPU)
    run = kernel if INTERPRETED else torch.library.wrap_triton(kernel)
    # the tensor cores take the activations' type; the interpreter multiplies bfloat16 wrongly, so float32 there
    dot = tl.float32 if INTERPRETED else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(x.dtype)
    run[grid](x, *weights, out, m, n, k, k_split, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
              SPLIT_K=cfg.split_k, EVEN=even, DOT=dot or tl.float32, num_warps=cfg.num_warps,
              num_stages=cfg.num_stages, **meta)  # fmt: skip
    if cfg.split_k == 1:
        return out
    return out.to(x.dtype) if final is None else final.copy_(out)


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor, cfg: Config | None = None, out: Tensor | None = None) -> Tensor:
    """x [M, K] @ (q * scale[:, None]).T for int8 q [N, K]: [M, N] in x's dtype (written into `out` if given)."""
    (n, k), m = q.shape, x.shape[0]
    _check(x, k)
    return _launch(_int8_kernel, x.contiguous(), (q, scale), n, k, cfg or config_for("int8", m, n, k), out)


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, offset: Tensor, cfg: Config | None = None,
                out: Tensor | None = None) -> Tensor:  # fmt: skip
    """x [M, K] @ dequantize_int4(packed, scale, offset).T in the kit's int4 packing: [M, N] in x's dtype."""
    n, k, m = packed.shape[0], 2 * packed.shape[1], x.shape[0]
    _check(x, k)
    group = k // scale.shape[1]
    cfg = cfg or config_for("int4", m, n, k)
    if cfg.block_k % group:  # a tile holds whole groups
        cfg = dataclasses.replace(cfg, block_k=group)
    if not cfg.tensor_cores:
        return _launch(_int4_kernel, x.contiguous(), (packed, scale, offset), n, k, cfg, out, GROUP=group)
    # bfloat16 makes 128 + q from the nibble's bits; elsewhere q is converted, and float32 dots are exact (a
    # bias of 128 would cost float32 products their low bits)
    bias = 128 if x.dtype == torch.bfloat16 and not INTERPRETED else 0
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    return _launch(_int4_tc_kernel, x.contiguous(), (packed, scale, offset), n, k, cfg, out, GROUP=group, BIAS=bias,
                   PRECISION=precision)  # fmt: skip


# The ops torch.compile and export see: their bodies are traced, so the kernels land in the graph as
# user-defined Triton kernels that inductor launches itself.
@torch.library.triton_op("llmkit::int8_mm", mutates_args=())
def int8_mm(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    return int8_matmul(x, q, scale)


@torch.library.triton_op("llmkit::int4_mm", mutates_args=())
def int4_mm(x: Tensor, packed: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    return int4_matmul(x, packed, scale, offset)
