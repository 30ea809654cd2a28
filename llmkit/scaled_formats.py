"""Scaled formats: integer affine, scaled floats, MX and NVFP4 blocks, each a quantizer and its dequantizer.

A quantizer returns a small dataclass of plain tensors (element codes, scales, zero points) plus the
format's parameters, and its dequantizer gives x_hat back. Which values share a scale is the
granularity: the whole tensor, a row, a token, or a group or block of neighbours along the last dim.
Values beyond the scaled range clamp to the code range, as torchao does. Numerics follow torchao's
quantizers (tests/test_numerics.py checks them bit for bit) and the OCP Microscaling v1.0 and NVIDIA
NVFP4 specs.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.errors import LLMKitError
from llmkit.float_formats import FP4_E2M1, FP8_E4M3, FloatFormat, check_floating, decode, encode, float_format

# ---------------------------------------------------------------------------------------------
# Granularity: which values share one scale
# ---------------------------------------------------------------------------------------------

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")


def group_length(x: Tensor, granularity: str, group_size: int | None) -> int:
    """How many consecutive values (row-major) share one scale.

    per_tensor: all of them. per_channel (weights, one scale per output row) and per_token
    (activations, one per token, computed at run time): a whole last-dim row. per_group: group_size
    neighbours along the last dim, so an outlier only spoils its own group.
    """
    if granularity not in GRANULARITIES:
        raise LLMKitError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    if granularity == "per_tensor":
        return x.numel()
    if granularity in ("per_channel", "per_token"):
        if group_size is not None:
            raise LLMKitError(f"{granularity} takes no group_size; use granularity='per_group' for groups")
        return last_dim(x)
    if group_size is None:
        raise LLMKitError("per_group quantization needs a group_size, e.g. group_size=32")
    check_divides(last_dim(x), group_size, "group size")
    return group_size


def last_dim(x: Tensor) -> int:
    if x.dim() == 0:
        raise LLMKitError("cannot quantize a 0-dim tensor by rows, groups or blocks; reshape it to at least 1-D")
    return x.shape[-1]


def check_divides(dim: int, size: int, what: str) -> None:
    if not isinstance(size, int) or size < 1 or dim % size:
        raise LLMKitError(f"{what} {size} does not divide the last dimension ({dim}); pick a {what} that divides {dim}")


def scale_shape(shape: torch.Size, group: int) -> tuple[int, ...]:
    """torchao's keepdim layout: one scale per group, the group dimension divided out."""
    if group == math.prod(shape):
        return (1,) * len(shape)
    return (*shape[:-1], shape[-1] // group)


# ---------------------------------------------------------------------------------------------
# Scaled floats (a plain cast when unscaled)
# ---------------------------------------------------------------------------------------------


@dataclass
class FloatEncoded:
    codes: Tensor  # one bit pattern per value, shaped like x (uint8, or int32 for 16-bit formats)
    fmt: FloatFormat
    scales: Tensor | None  # float32 amax / fmt.max per group; None for a plain cast
    group_size: int  # values per scale
    dtype: torch.dtype  # of the input, and so of x_hat


def quantize_float(
    x: Tensor,
    fmt: "str | FloatFormat" = "fp8_e4m3",
    granularity: str | None = None,
    group_size: int | None = None,
    saturate: bool | None = None,
) -> FloatEncoded:
    """A float format, scaled: x / (amax / fmt.max) per group is rounded to the format; or, with
    granularity "none", a plain cast (torch's `.to(dtype)`).

    The scale moves the weights' small range (|w| ~ 0.02, where fp8 has few values and fp4 none)
    up to the format's largest values; this is torchao's Float8Tensor recipe (x / scale, clamp to
    +-max, cast). Default: per_group when group_size is given, else per_channel for formats under
    16 bits (torchao's Float8WeightOnlyConfig) and a plain cast for fp16 and bf16.
    """
    check_floating(x)
    fmt = float_format(fmt)
    if granularity is None:
        granularity = "per_group" if group_size is not None else "per_channel" if fmt.bits < 16 else "none"
    if granularity == "none":
        return FloatEncoded(encode(x, fmt, saturate), fmt, None, x.numel(), x.dtype)
    group = group_length(x, granularity, group_size)
    groups = x.detach().reshape(-1, group)
    amax = groups.abs().amax(-1, keepdim=True)
    # torchao divides by amax / max as is; an all-zero group would give 0/0, so keep the scale above 0.
    scales = (amax / fmt.max).float().clamp(min=torch.finfo(torch.float32).tiny)
    codes = encode(groups.float() / scales, fmt, saturate=True if saturate is None else saturate)
    return FloatEncoded(codes.reshape(x.shape), fmt, scales.reshape(scale_shape(x.shape, group)), group, x.dtype)


def dequantize_float(enc: FloatEncoded) -> Tensor:
    values = decode(enc.codes, enc.fmt)
    if enc.scales is not None:
        values = (values.reshape(-1, enc.group_size) * enc.scales.reshape(-1, 1)).reshape(enc.codes.shape)
    return values.to(enc.dtype)


# ---------------------------------------------------------------------------------------------
# Integer affine: x ~ (q - zero_point) * scale
# ---------------------------------------------------------------------------------------------


@dataclass
class IntEncoded:
    codes: Tensor  # int8 in [qmin, qmax], shaped like x (int4 codes unpacked, as torchao's intx)
    scales: Tensor  # one per group, shaped like torchao's keepdim scales, in the input's dtype
    zero_points: Tensor | None  # int8, one per group; None when symmetric (always 0)
    bits: int
    group_size: int
    granularity: str
    dtype: torch.dtype

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise LLMKitError(f"integer quantization takes 2 to 8 bits, not {bits!r}; pick bits in 2..8")


def quantize_int(
    x: Tensor,
    bits: int = 8,
    granularity: str | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    eps: float | None = None,
) -> IntEncoded:
    """Signed `bits`-bit affine quantization with torchao's numerics (choose_qparams_affine, quantize_affine).

    symmetric: scale = amax / ((qmax - qmin) / 2), zero point 0: the grid is centred on 0, so the
    largest positive value clips by half a step (torchao's choice) and a skewed range wastes codes.
    asymmetric: the grid spans [min, max] (always holding 0 exactly) and a zero point shifts it.
    Defaults: per_channel (per_group when group_size is given); symmetric except per_token, which is
    torchao's dynamic int8 activation scheme (asymmetric). eps is the smallest scale: torchao's
    default is the input dtype's smallest normal, Int8WeightOnlyConfig uses float32's eps.
    """
    check_floating(x)
    check_bits(bits)
    if granularity is None:
        granularity = "per_group" if group_size is not None else "per_channel"
    group = group_length(x, granularity, group_size)
    symmetric = granularity != "per_token" if symmetric is None else symmetric
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    eps = torch.finfo(x.dtype).smallest_normal if eps is None else eps
    groups = x.detach().reshape(-1, group)
    lo = groups.amin(-1, keepdim=True).clamp(max=0)  # the range always includes 0, so 0 is exact
    hi = groups.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        scale = (torch.max(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=eps)
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    # x * (1 / scale), not x / scale: the last bit of torchao's quantize_affine
    codes = (torch.round(groups * (1.0 / scale)) + zero_point).clamp(qmin, qmax).to(torch.int8)
    shape = scale_shape(x.shape, group)
    zero_points = None if symmetric else zero_point.to(torch.int8).reshape(shape)
    return IntEncoded(codes.reshape(x.shape), scale.reshape(shape), zero_points, bits, group, granularity, x.dtype)


def dequantize_int(enc: IntEncoded) -> Tensor:
    q = enc.codes.reshape(-1, enc.group_size).float()
    if enc.zero_points is not None:
        q = q - enc.zero_points.reshape(-1, 1).float()
    return (q * enc.scales.reshape(-1, 1).float()).reshape(enc.codes.shape).to(enc.dtype)


# ---------------------------------------------------------------------------------------------
# Block scaling: MX (OCP Microscaling) and NVFP4
# ---------------------------------------------------------------------------------------------

E8M0_BIAS = 127  # E8M0: an 8-bit exponent alone, value 2^(code - 127); code 255 is NaN, there is no zero
MX_BLOCK = 32
NVFP4_BLOCK = 16
MX_ELEMENTS = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1")


@dataclass
class BlockEncoded:
    codes: Tensor  # uint8 element codes, one per value, shaped like x (pack_fp4 packs two per byte)
    scales: Tensor  # uint8 per block: an E8M0 exponent (MX) or an FP8 E4M3 bit pattern (NVFP4)
    element: FloatFormat
    scale_format: str  # "e8m0" or "e4m3"
    block_size: int
    tensor_scale: Tensor | None  # NVFP4's float32 second-level scale (None: block scales only)
    dtype: torch.dtype


def e8m0_to_float(codes: Tensor) -> Tensor:
    """2^(code - 127) in float32; 255 is NaN."""
    value = torch.exp2(codes.float() - E8M0_BIAS)
    return torch.where(codes == 255, math.nan, value)


def float32_exponent(x: Tensor) -> Tensor:
    """floor(log2(x)) read from float32's exponent field; 0 and subnormals give -127, as in torchao."""
    return ((x.float().view(torch.int32) >> 23) & 0xFF) - 127


def quantize_mx(x: Tensor, element: "str | FloatFormat" = "fp8_e4m3", block_size: int = MX_BLOCK) -> BlockEncoded:
    """OCP MX: each block of 32 values shares the scale X = 2^(floor(log2(amax)) - emax_elem), stored as E8M0.

    emax_elem is the exponent of the element format's largest power of two (8 for e4m3: 256), so
    amax / X lands in [2^emax, 2^(emax+1)) and the elements saturate above max (the spec's
    'minimally supported' FLOOR rounding, torchao's default). Power-of-two scales cost 8 bits and
    divide exactly, but waste up to one binade compared with amax / max.
    """
    check_floating(x)
    fmt = float_format(element)
    if fmt.name not in MX_ELEMENTS:
        raise LLMKitError(f"MX elements are {', '.join(MX_ELEMENTS)}, not {fmt.name}")
    check_divides(last_dim(x), block_size, "block size")
    blocks = x.detach().float().reshape(-1, block_size)
    amax = blocks.abs().amax(-1, keepdim=True)
    emax_elem = math.floor(math.log2(fmt.max))
    shared_exp = (float32_exponent(amax) - emax_elem).clamp(-E8M0_BIAS, E8M0_BIAS)
    scales = torch.where(amax.isnan(), 255, shared_exp + E8M0_BIAS).to(torch.uint8)
    # torchao divides by at least 2^-126 (float32's smallest normal) but multiplies back by 2^-127
    # for code 0: only blocks with amax below 2^(emax_elem - 126) notice.
    scale = torch.exp2(shared_exp.float()).clamp(min=2.0**-126)
    codes = encode(blocks / scale, fmt, saturate=True)
    return BlockEncoded(codes.reshape(x.shape), scales.reshape(*x.shape[:-1], -1), fmt, "e8m0", block_size,
                        None, x.dtype)  # fmt: skip


def nvfp4_tensor_scale(x: Tensor) -> Tensor:
    """NVFP4's per-tensor float32 scale amax / (448 * 6): the largest block scale then fits E4M3's max.

    Kept above 0 so that an all-zero tensor quantizes to zeros (torchao would divide 0 by 0).
    """
    amax = x.detach().abs().amax().float()
    return (amax / (FP8_E4M3.max * FP4_E2M1.max)).clamp(min=torch.finfo(torch.float32).tiny)


def quantize_nvfp4(x: Tensor, tensor_scale: "bool | Tensor" = True) -> BlockEncoded:
    """NVFP4: blocks of 16 FP4 E2M1 values, each with an FP8 E4M3 scale amax / 6, under a float32 tensor scale.

    The E4M3 block scale has 3 mantissa bits, so it tracks amax far closer than MX's powers of two;
    the tensor scale lifts the block scales into E4M3's range (they are clamped to [2^-6, 448]).
    tensor_scale: True computes it from x (torchao's NVFP4WeightOnlyConfig), False uses block scales
    only, or pass a float32 scalar (calibrated). Numerics follow torchao's nvfp4_quantize.
    """
    check_floating(x)
    check_divides(last_dim(x), NVFP4_BLOCK, "block size")
    if tensor_scale is True:
        tensor_scale = nvfp4_tensor_scale(x)
    elif tensor_scale is False:
        tensor_scale = None
    blocks = x.detach().float().reshape(-1, NVFP4_BLOCK)
    block_scale = blocks.abs().amax(-1, keepdim=True) / FP4_E2M1.max
    if tensor_scale is not None:
        block_scale = block_scale / tensor_scale
    scales = encode(block_scale.clamp(min=FP8_E4M3.min_normal, max=FP8_E4M3.max), FP8_E4M3)
    # multiply by the reciprocal, as the GPU kernels (and so torchao) do
    reciprocal = 1.0 / decode(scales, FP8_E4M3)
    if tensor_scale is not None:
        reciprocal = (1.0 / tensor_scale) / decode(scales, FP8_E4M3)
    codes = encode(blocks * reciprocal, FP4_E2M1, saturate=True)
    return BlockEncoded(codes.reshape(x.shape), scales.reshape(*x.shape[:-1], -1), FP4_E2M1, "e4m3", NVFP4_BLOCK,
                        tensor_scale, x.dtype)  # fmt: skip


def block_scale_values(enc: BlockEncoded) -> Tensor:
    """The float32 multiplier of each block: E8M0 power of two, or E4M3 scale times the tensor scale."""
    if enc.scale_format == "e8m0":
        return e8m0_to_float(enc.scales)
    scales = decode(enc.scales, FP8_E4M3)
    return scales if enc.tensor_scale is None else enc.tensor_scale * scales


def dequantize_block(enc: BlockEncoded) -> Tensor:
    values = decode(enc.codes, enc.element).reshape(-1, enc.block_size)
    return (values * block_scale_values(enc).reshape(-1, 1)).reshape(enc.codes.shape).to(enc.dtype)


def pack_fp4(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte, the first in the low nibble (torchao's float4_e2m1fn_x2 layout)."""
    return codes[..., ::2] | (codes[..., 1::2] << 4)
