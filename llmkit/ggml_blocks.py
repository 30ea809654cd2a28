"""GGUF's block formats Q8_0, Q4_0 and Q4_1 in PyTorch: ggml's exact bytes, their values, and torchao tensors.

Each block holds 32 consecutive values of a row and a float16 scale d:
- Q8_0: x = d q, q = round(x / d) in -127..127, d = amax / 127;
- Q4_0: x = d (q - 8), q in 0..15, d = -max / 8 where max is the value largest in magnitude, so that value lands
  exactly on code 0 and the grid's extra negative step is spent on it;
- Q4_1: x = d q + m, q in 0..15, m the block's minimum (float16 too) and d = (max - min) / 15.
The arithmetic follows ggml-quants.c's reference functions step by step in float32 (the scale is rounded to float16
only when stored), so the bytes are llama.cpp's, bit for bit.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.errors import LLMKitError

BLOCK = 32
TYPES = ("q8_0", "q4_0", "q4_1")
BYTES_PER_BLOCK = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2, "q4_1": 4 + BLOCK // 2}


@dataclass
class GGMLEncoded:
    type: str  # one of TYPES
    codes: Tensor  # int8 in -127..127 (q8_0) or uint8 in 0..15 (q4_0, q4_1), shaped like x
    scales: Tensor  # float16 d per block: (*x.shape[:-1], x.shape[-1] // 32)
    mins: Tensor | None  # float16 m per block (q4_1), else None
    dtype: torch.dtype  # of the values decoded


def _check_type(type: str) -> None:
    if type not in TYPES:
        raise LLMKitError(f"unknown GGUF block format {type!r}; llmkit encodes {', '.join(TYPES)}")


def _roundf(x: Tensor) -> Tensor:
    """C's roundf (halves away from zero) as ggml's Python port writes it: floor(|x| + 0.5) would round
    0.49999997 up, since the sum rounds to 1.0 in float32."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _reciprocal(d: Tensor) -> Tensor:
    return torch.where(d == 0, 0.0, 1.0 / d)


def quantize(x: Tensor, type: str) -> GGMLEncoded:
    """x (any float dtype, last dimension a multiple of 32) in one of GGUF's block formats."""
    _check_type(type)
    if not x.is_floating_point():
        raise LLMKitError(f"GGUF block formats encode floating-point tensors, not {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % BLOCK:
        raise LLMKitError(f"{type} encodes rows in blocks of {BLOCK}: the last dimension {tuple(x.shape)} must divide")
    blocks = x.detach().float().reshape(-1, BLOCK)
    mins = None
    if type == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        codes = _roundf(blocks * _reciprocal(d)).to(torch.int8)
    elif type == "q4_0":
        largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # the first of equals, as numpy's argmax
        d = largest / -8
        codes = torch.trunc(blocks * _reciprocal(d) + 8.5).clamp(0, 15).to(torch.uint8)
    else:
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        codes = torch.trunc((blocks - lo) * _reciprocal(d) + 0.5).clamp(0, 15).to(torch.uint8)
        mins = lo.to(torch.float16).reshape(*x.shape[:-1], -1)
    scales = d.to(torch.float16).reshape(*x.shape[:-1], -1)
    return GGMLEncoded(type, codes.reshape(x.shape), scales, mins, x.dtype)


def dequantize(enc: GGMLEncoded) -> Tensor:
    """The values the blocks stand for, computed as ggml does in float32, then cast to enc.dtype."""
    codes = enc.codes.reshape(-1, BLOCK).float()
    d = enc.scales.reshape(-1, 1).float()
    if enc.type == "q8_0":
        x = codes * d
    elif enc.type == "q4_0":
        x = d * (codes - 8)
    else:
        x = d * codes + enc.mins.reshape(-1, 1).float()
    return x.reshape(enc.codes.shape).to(enc.dtype)


def to_bytes(enc: GGMLEncoded) -> Tensor:
    """The blocks as a GGUF file stores them: uint8, one row of BYTES_PER_BLOCK per block.

    d (then m) as little-endian float16, then the codes: Q8_0's 32 bytes, or 16 bytes of nibbles whose low half
    is value j of the block and high half value j + 16.
    """
    codes = enc.codes.reshape(-1, BLOCK)
    parts = [enc.scales.reshape(-1, 1).view(torch.uint8)]
    if enc.mins is not None:
        parts.append(enc.mins.reshape(-1, 1).view(torch.uint8))
    if enc.type == "q8_0":
        parts.append(codes.view(torch.uint8))
    else:
        parts.append(codes[:, : BLOCK // 2] | (codes[:, BLOCK // 2 :] << 4))
    return torch.cat(parts, dim=1)


def from_bytes(raw: Tensor, type: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> GGMLEncoded:
    """The blocks of a tensor of `shape` (PyTorch's order) from the bytes a GGUF file stores (see to_bytes)."""
    _check_type(type)
    raw = raw.reshape(-1, BYTES_PER_BLOCK[type])
    blocks_shape = (*shape[:-1], shape[-1] // BLOCK)

    def half(column: int) -> Tensor:
        return raw[:, column : column + 2].contiguous().view(torch.float16).reshape(blocks_shape)

    scales, mins = half(0), half(2) if type == "q4_1" else None
    packed = raw[:, 4 if type == "q4_1" else 2 :]
    if type == "q8_0":
        codes = packed.contiguous().view(torch.int8)
    else:
        codes = torch.cat([packed & 0x0F, packed >> 4], dim=1)
    return GGMLEncoded(type, codes.reshape(shape), scales, mins, dtype)


def map_rows(enc: GGMLEncoded, reorder: Callable[[Tensor], Tensor]) -> GGMLEncoded:
    """The blocks with their rows reordered by `reorder` (a row's blocks move with it)."""
    mins = None if enc.mins is None else reorder(enc.mins)
    return GGMLEncoded(enc.type, reorder(enc.codes), reorder(enc.scales), mins, enc.dtype)


def cat_rows(parts: list[GGMLEncoded]) -> GGMLEncoded:
    """One matrix of blocks from the rows of several in the same format (wq, wk and wv as wqkv)."""
    first = parts[0]
    if any(p.type != first.type for p in parts):
        raise ValueError(f"rows of different formats: {', '.join(p.type for p in parts)}")
    mins = None if first.mins is None else torch.cat([p.mins for p in parts])
    return GGMLEncoded(first.type, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins,
                       first.dtype)  # fmt: skip


def as_torchao(enc: GGMLEncoded, dtype: torch.dtype = torch.float32) -> Tensor:
    """The blocks as torchao's IntxUnpackedToInt8Tensor (codes one per int8, x = (q - zero) * scale, groups of 32),
    which torch.compile and torch.export take as any torchao weight.

    Q8_0 and Q4_0 map exactly (zero 0). Q4_1's d q + m becomes d (q - 8 - z) with a float zero z = -8 - m / d:
    in float32 that costs a rounding or two (a few units in the last place of the value); in bfloat16 the zero
    point is rounded to 8 bits: up to 1/64 of a step for a block that holds 0 (|z| <= 8), more for one that
    doesn't. A block with d = 0 holds m alone: scale m, codes -8, z -9.
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    block_size = (*[1] * (enc.codes.ndim - 1), BLOCK)
    d, zero = enc.scales.float(), torch.zeros_like(enc.scales, dtype=torch.int8)
    if enc.type == "q8_0":
        qdata, target = enc.codes, torch.int8
    else:
        qdata, target = (enc.codes.to(torch.int16) - 8).to(torch.int8), torch.int4
        if enc.type == "q4_1":
            m = enc.mins.float()
            empty = d == 0
            zero = torch.where(empty, -9.0, -8.0 - m / torch.where(empty, 1.0, d)).to(dtype)
            qdata = torch.where(empty.repeat_interleave(BLOCK, -1), -8, qdata).to(torch.int8)
            d = torch.where(empty, m, d)
    return IntxUnpackedToInt8Tensor(qdata.contiguous(), d.to(dtype), zero, target, block_size, dtype, None)
