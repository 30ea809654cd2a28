"""Floating-point element formats bit by bit: fp16 and bf16 down to fp8, fp6 and fp4, encoded and decoded.

Each format is a `FloatFormat` (sign, exponent and mantissa widths, bias, which patterns are special).
`encode(x, fmt)` gives the bit pattern of the nearest representable value, `decode(bits, fmt)` its value.
The code follows the specs (IEEE 754, OCP 8-bit floating point, OCP Microscaling v1.0) and
tests/test_numerics.py checks it bit for bit against torch's casts and torchao's.

What a value beyond a format's largest finite number becomes (the saturation rule):
  fp16, bf16, fp8_e5m2  round to nearest even, overflow to +-inf (IEEE; torch's casts do this).
  fp8_e4m3 (the "fn" variant: no inf, one NaN)  saturates to +-448, infinities included: torch
      2.12+ eager casts saturate (older versions gave NaN; `saturate=False` gives that).
  fp6_e3m2, fp6_e2m3, fp4_e2m1  saturate to +-max: they have no inf or NaN (OCP MX spec, torchao).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.errors import LLMKitError


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
