"""Quantization numerics lab: small reference codecs for the number formats of LLM inference.

Every codec is `quantize(x, ...) -> encoded`, a small dataclass of plain tensors (integer codes,
scales, zero points) plus the format's parameters, and `dequantize(encoded) -> x_hat`. The code
follows the specs (IEEE 754, OCP 8-bit floating point, OCP Microscaling v1.0, NVIDIA NVFP4) and
tests/test_numerics.py checks it bit for bit against torch's casts and torchao's quantizers.

What a value beyond a format's largest finite number becomes (the saturation rule):
  fp16, bf16, fp8_e5m2  round to nearest even, overflow to +-inf (IEEE; torch's casts do this).
  fp8_e4m3 (the "fn" variant: no inf, one NaN)  saturates to +-448, infinities included: torch
      2.12+ eager casts saturate (older versions gave NaN; `saturate=False` gives that).
  fp6_e3m2, fp6_e2m3, fp4_e2m1  saturate to +-max: they have no inf or NaN (OCP MX spec, torchao).
  Scaled formats (int, MX, NVFP4, scaled floats) clamp to the code range, as torchao does.
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmkit.errors import LLMKitError

# ---------------------------------------------------------------------------------------------
# Floating-point element formats
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatFormat:
    """A binary float: 1 sign bit, `ebits` exponent bits (stored with `bias` added), `mbits` mantissa bits.

    specials: "ieee" reserves the all-ones exponent for inf and NaN (fp16, bf16, e5m2); "fn" keeps
    it for numbers except S.1111.111, the only NaN (e4m3fn: finite + NaN); "none" makes every bit
    pattern a number (fp6, fp4). `saturate` is the default overflow rule of `encode`. `nan_bits` is
    the NaN that `encode` writes, OR-ed with x's sign: any all-ones-exponent pattern with a nonzero
    mantissa is a NaN, and these are the ones torch's casts write (it writes bf16 NaN as 0xFFFF).
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    specials: str
    saturate: bool
    nan_bits: int | None

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.nan_bits is not None

    @property
    def max(self) -> float:
        """Largest finite value: all-ones mantissa in the largest exponent that holds numbers."""
        top = 2**self.ebits - 1
        if self.specials == "ieee":
            return (2 - 2.0**-self.mbits) * 2.0 ** (top - 1 - self.bias)
        if self.specials == "fn":  # mantissa all ones is the NaN, so the max stops one step below
            return (2 - 2.0 ** (1 - self.mbits)) * 2.0 ** (top - self.bias)
        return (2 - 2.0**-self.mbits) * 2.0 ** (top - self.bias)

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.mbits)


FP16 = FloatFormat("fp16", ebits=5, mbits=10, bias=15, specials="ieee", saturate=False, nan_bits=0x7E00)
BF16 = FloatFormat("bf16", ebits=8, mbits=7, bias=127, specials="ieee", saturate=False, nan_bits=0xFFFF)
FP8_E4M3 = FloatFormat("fp8_e4m3", ebits=4, mbits=3, bias=7, specials="fn", saturate=True, nan_bits=0x7F)
FP8_E5M2 = FloatFormat("fp8_e5m2", ebits=5, mbits=2, bias=15, specials="ieee", saturate=False, nan_bits=0x7F)
FP6_E3M2 = FloatFormat("fp6_e3m2", ebits=3, mbits=2, bias=3, specials="none", saturate=True, nan_bits=None)
FP6_E2M3 = FloatFormat("fp6_e2m3", ebits=2, mbits=3, bias=1, specials="none", saturate=True, nan_bits=None)
FP4_E2M1 = FloatFormat("fp4_e2m1", ebits=2, mbits=1, bias=1, specials="none", saturate=True, nan_bits=None)
FLOAT_FORMATS = {f.name: f for f in (FP16, BF16, FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1)}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16,
                "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # fmt: skip


def float_format(fmt: "str | FloatFormat") -> FloatFormat:
    if isinstance(fmt, FloatFormat):
        return fmt
    if fmt not in FLOAT_FORMATS:
        raise LLMKitError(f"unknown floating-point format {fmt!r}; use one of {', '.join(FLOAT_FORMATS)}")
    return FLOAT_FORMATS[fmt]


def check_floating(x) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise LLMKitError(f"quantization needs a floating-point tensor, got {got}; convert it with x.float()")


def floor_log2(x: Tensor) -> Tensor:
    """floor(log2(x)) of positive finite x, read exactly from frexp (torch.log2 may round up just below 2^k)."""
    return torch.frexp(x)[1].long() - 1


def decode(bits: Tensor, fmt: "str | FloatFormat") -> Tensor:
    """The float32 value of each bit pattern: (-1)^s * 2^(e - bias) * 1.m, or * 0.m when e == 0."""
    fmt = float_format(fmt)
    bits = bits.long()
    sign = (bits >> (fmt.ebits + fmt.mbits)) & 1
    exp = (bits >> fmt.mbits) & (2**fmt.ebits - 1)
    man = bits & (2**fmt.mbits - 1)
    subnormal = exp == 0  # no implicit leading 1, and the exponent of the smallest normal binade
    significand = torch.where(subnormal, man, man + 2**fmt.mbits).double()
    mag = torch.ldexp(significand, torch.where(subnormal, 1 - fmt.bias, exp - fmt.bias) - fmt.mbits)
    top = exp == 2**fmt.ebits - 1
    if fmt.specials == "ieee":
        mag = torch.where(top & (man == 0), math.inf, mag)
        mag = torch.where(top & (man != 0), math.nan, mag)
    elif fmt.specials == "fn":
        mag = torch.where(top & (man == 2**fmt.mbits - 1), math.nan, mag)
    return torch.where(sign == 1, -mag, mag).float()


def representable_values(fmt: "str | FloatFormat") -> Tensor:
    """Every finite value of the format, sorted (+0 and -0 counted once)."""
    fmt = float_format(fmt)
    values = decode(torch.arange(2**fmt.bits), fmt)
    return torch.unique(values[values.isfinite()])


def code_dtype(fmt: FloatFormat) -> torch.dtype:
    return torch.uint8 if fmt.bits <= 8 else torch.int32


def encode(x: Tensor, fmt: "str | FloatFormat", saturate: bool | None = None) -> Tensor:
    """Bit pattern of the representable value nearest to each x (ties to even), with the overflow rule.

    saturate=True clamps overflow to +-max; False sends it to inf (ieee) or NaN (fn). None: the
    format's default, which is what torch's cast does (see the module docstring).
    """
    check_floating(x)
    fmt = float_format(fmt)
    saturate = fmt.saturate if saturate is None else saturate
    if not saturate and not fmt.has_nan:
        raise LLMKitError(f"{fmt.name} has no inf or NaN to overflow to; encode it with saturate=True")
    x = x.detach().double()  # exact for float32/16/bf16 inputs, so only one rounding happens below
    sign, mag = torch.signbit(x).long(), x.abs()
    # 1. Round: in mag's binade the values are ulp = 2^(exp - mbits) apart (subnormals share the
    #    smallest normal binade's ulp). mag / ulp is exact, and torch.round breaks ties to even.
    #    (0, inf and NaN get meaningless exponents but round to themselves.)
    exp = floor_log2(mag).clamp(min=1 - fmt.bias)
    ulp = torch.ldexp(torch.ones_like(mag), exp - fmt.mbits)
    mag = torch.round(mag / ulp) * ulp
    # 2. Overflow: whatever rounded above max (inf included) takes max's fields here; without
    #    saturation its code is replaced by inf or NaN below.
    overflow = mag > fmt.max
    mag = torch.where(overflow, fmt.max, mag).nan_to_num(0.0)
    # 3. Fields: the significand mag / ulp is the integer 1m for normals, 0m for subnormals.
    exp = floor_log2(mag).clamp(min=1 - fmt.bias)
    significand = (mag / torch.ldexp(torch.ones_like(mag), exp - fmt.mbits)).long()
    normal = significand >= 2**fmt.mbits
    exp_field = torch.where(normal, exp + fmt.bias, 0)
    man_field = significand - torch.where(normal, 2**fmt.mbits, 0)
    code = (exp_field << fmt.mbits) | man_field
    # 4. Special values.
    if not saturate:
        inf_code = (2**fmt.ebits - 1) << fmt.mbits  # exponent all ones, mantissa 0
        code = torch.where(overflow, inf_code if fmt.has_inf else fmt.nan_bits, code)
    sign_bit = sign << (fmt.bits - 1)
    # fp6/fp4 have no NaN and encode it as zero (MX carries a NaN block in its scale).
    code = torch.where(x.isnan(), sign_bit | (fmt.nan_bits or 0), code | sign_bit)
    return code.to(code_dtype(fmt))


def round_to_format(x: Tensor, fmt: "str | FloatFormat", saturate: bool | None = None) -> Tensor:
    """x rounded to the format and back: decode(encode(x))."""
    return decode(encode(x, fmt, saturate), fmt).to(x.dtype)


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


# ---------------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------------

Encoded = FloatEncoded | IntEncoded | BlockEncoded

FORMATS = [
    "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1",
    "int8", "int4",
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
    "nvfp4",
]  # fmt: skip
MX_FORMATS = {"mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6_e3m2": "fp6_e3m2",
              "mxfp6_e2m3": "fp6_e2m3", "mxfp4": "fp4_e2m1"}  # fmt: skip
PARAMETERS = {
    "float": ("granularity", "group_size", "saturate"),
    "int": ("bits", "granularity", "group_size", "symmetric", "eps"),
    "mx": ("block_size",),
    "nvfp4": ("tensor_scale",),
}


def parse_format(format: str) -> tuple[str, str | int | None]:
    """("float", name) | ("int", bits or None) | ("mx", element) | ("nvfp4", None); int2..int8 and "int" work too."""
    if format in FLOAT_FORMATS:
        return "float", format
    if format in MX_FORMATS:
        return "mx", MX_FORMATS[format]
    if format == "nvfp4":
        return "nvfp4", None
    if format == "int":
        return "int", None
    if isinstance(format, str) and format.startswith("int") and format[3:].isdigit():
        return "int", int(format[3:])
    raise LLMKitError(f"unknown format {format!r}; use one of {', '.join(FORMATS)} (or int2..int8)")


def quantize(x: Tensor, format: str, **params) -> Encoded:
    """Encode x in a named format (see FORMATS); params go to quantize_float/int/mx/nvfp4."""
    kind, arg = parse_format(format)
    unknown = set(params) - set(PARAMETERS[kind])
    if unknown:
        raise LLMKitError(
            f"format {format!r} takes no parameter {', '.join(sorted(unknown))}; it takes {', '.join(PARAMETERS[kind])}"
        )
    if kind == "float":
        return quantize_float(x, arg, **params)
    if kind == "int":
        if arg is not None and params.get("bits", arg) != arg:
            raise LLMKitError(f"format {format!r} is {arg}-bit but bits={params['bits']}; use format 'int' with bits")
        return quantize_int(x, **{**params, "bits": params.get("bits", arg or 8)})
    if kind == "mx":
        return quantize_mx(x, arg, **params)
    return quantize_nvfp4(x, **params)


def dequantize(enc: Encoded) -> Tensor:
    if isinstance(enc, FloatEncoded):
        return dequantize_float(enc)
    if isinstance(enc, IntEncoded):
        return dequantize_int(enc)
    return dequantize_block(enc)


def fake_quantize(x: Tensor, format: str, **params) -> Tensor:
    """x -> codes -> x_hat in x's dtype: the rounding error of a format, without its kernels."""
    return dequantize(quantize(x, format, **params))


def bits_per_value(enc: Encoded) -> int:
    """Bits of one element code, scales not counted."""
    if isinstance(enc, IntEncoded):
        return enc.bits
    return enc.fmt.bits if isinstance(enc, FloatEncoded) else enc.element.bits


def effective_bits_per_weight(enc: Encoded) -> float:
    """Storage per value with the scales and zero points: codes at their width, metadata as stored."""
    n = enc.codes.numel()
    total = n * bits_per_value(enc)
    for meta in (enc.scales, getattr(enc, "zero_points", None), getattr(enc, "tensor_scale", None)):
        if meta is not None:
            total += meta.numel() * meta.element_size() * 8
    return total / n


# ---------------------------------------------------------------------------------------------
# Error metrics (float64, returned as Python floats)
# ---------------------------------------------------------------------------------------------


def mse(x: Tensor, x_hat: Tensor) -> float:
    return (x.double() - x_hat.double()).pow(2).mean().item()


def sqnr_db(x: Tensor, x_hat: Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|x|^2 / |x - x_hat|^2): ~6 dB per bit of a uniform grid."""
    noise = (x.double() - x_hat.double()).pow(2).sum().item()
    signal = x.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def max_abs_error(x: Tensor, x_hat: Tensor) -> float:
    return (x.double() - x_hat.double()).abs().max().item()


def relative_frobenius_error(x: Tensor, x_hat: Tensor) -> float:
    return (torch.linalg.norm(x.double() - x_hat.double()) / torch.linalg.norm(x.double())).item()


# ---------------------------------------------------------------------------------------------
# For the notebook: grids, the explorer, a sweep and model weights
# ---------------------------------------------------------------------------------------------


def value_grid(enc: Encoded, group: int = 0) -> Tensor:
    """Every value x_hat can take in one group (block) of the encoding: the format's grid times its scale."""
    if isinstance(enc, IntEncoded):
        zero = 0 if enc.zero_points is None else enc.zero_points.flatten()[group].item()
        levels = torch.arange(enc.qmin, enc.qmax + 1, dtype=torch.float32) - zero
        return levels * enc.scales.flatten()[group].float()
    if isinstance(enc, FloatEncoded):
        grid = representable_values(enc.fmt)
        return grid if enc.scales is None else grid * enc.scales.flatten()[group]
    return representable_values(enc.element) * block_scale_values(enc).flatten()[group]


def metrics(x: Tensor, x_hat: Tensor) -> dict[str, float]:
    return {"mse": mse(x, x_hat), "sqnr_db": sqnr_db(x, x_hat), "max_abs_error": max_abs_error(x, x_hat),
            "relative_frobenius_error": relative_frobenius_error(x, x_hat)}  # fmt: skip


def explore(row: Tensor, format: str = "int", bits: int = 4, group_size: int | None = 32) -> dict:
    """What the widget explorer shows for one weight row: x_hat, the first group's grid, the errors.

    bits is used by format "int" only; group_size by int and plain float formats (None: the whole
    row shares one scale); MX and NVFP4 have fixed blocks of 32 and 16.
    """
    kind, _ = parse_format(format)
    params: dict = {"bits": bits} if format == "int" else {}
    if kind == "int" or (kind == "float" and format not in ("fp16", "bf16")):
        params |= {"group_size": group_size} if group_size else {"granularity": "per_channel"}
    enc = quantize(row, format, **params)
    x_hat = dequantize(enc)
    return {"format": format, "params": params, "x_hat": x_hat, "error": x_hat - row, "grid": value_grid(enc),
            "bits_per_weight": effective_bits_per_weight(enc), **metrics(row, x_hat)}  # fmt: skip


def sweep_configs(group_sizes: "list[int] | tuple[int, ...]" = (32, 64, 128, 256)) -> list[tuple[str, dict]]:
    """(format, params) pairs for comparing every format: group-size variants where the format has them."""
    configs: list[tuple[str, dict]] = [("fp16", {}), ("bf16", {}), ("fp8_e4m3", {"granularity": "none"})]
    configs += [("fp8_e4m3", {"granularity": "per_channel"})]
    configs += [(f, {"granularity": "per_channel"}) for f in ("int8", "int4")]
    for g in group_sizes:
        configs += [(f, {"group_size": g}) for f in ("int8", "int4", "fp6_e2m3", "fp4_e2m1")]
    configs += [(f, {}) for f in MX_FORMATS] + [("nvfp4", {})]
    return configs


def describe(format: str, params: dict) -> str:
    """A short label such as 'int4 g32', 'fp8_e4m3 per_channel' or 'fp8_e4m3 cast'."""
    if "group_size" in params:
        return f"{format} g{params['group_size']}"
    if "granularity" in params:
        return f"{format} {'cast' if params['granularity'] == 'none' else params['granularity']}"
    return format


def sweep(x: Tensor, configs: list[tuple[str, dict]] | None = None) -> list[dict]:
    """Fake-quantize x with every config: label, effective bits per weight and the error metrics."""
    rows = []
    for format, params in configs if configs is not None else sweep_configs():
        enc = quantize(x, format, **params)
        x_hat = dequantize(enc)
        rows.append({"label": describe(format, params), "format": format, "params": params,
                     "bits_per_weight": effective_bits_per_weight(enc), **metrics(x, x_hat)})  # fmt: skip
    return rows


def block_multiple(format: str, params: dict) -> int:
    """The last-dim multiple a format needs: its group or block size (1 when a row shares one scale)."""
    kind, _ = parse_format(format)
    if kind == "mx":
        return params.get("block_size", MX_BLOCK)
    if kind == "nvfp4":
        return NVFP4_BLOCK
    return params.get("group_size") or 1


def fake_quantize_linears(
    model: nn.Module, format: str, skip: tuple[str, ...] = ("output",), pad: bool = False, **params
) -> nn.Module:
    """A copy of the model whose nn.Linear weights went through the codec (names in `skip` are kept).

    The output layer is skipped by default: like the embedding, it is usually kept in higher
    precision. A tied output weight is untied in the copy, so the embedding stays exact.
    pad=True zero-pads a weight whose input width is not a multiple of the group or block size
    (an MLP width of 688 under blocks of 32) and crops it back: zeros raise no amax and every
    range holds 0, so this is exactly a shorter last group. Without it such a layer is an error.
    """
    model = copy.deepcopy(model)
    multiple = block_multiple(format, params)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or name in skip:
                continue
            w = module.weight
            width = w.shape[-1]
            if width % multiple and not pad:
                raise LLMKitError(
                    f"{name}: its input width {width} is not a multiple of {format}'s group/block size {multiple}; "
                    "pass pad=True (a shorter last group) or pick a size that divides it"
                )
            padded = nn.functional.pad(w, (0, -width % multiple))
            module.weight = nn.Parameter(fake_quantize(padded, format, **params)[..., :width], requires_grad=False)
    return model
