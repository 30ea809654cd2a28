"""Quantization numerics lab: any format by name, its error metrics, and the sweeps and explorer of notebook 3.

`quantize_tensor(x, format, **params) -> encoded` and `dequantize_tensor(encoded) -> x_hat` reach every
codec of `float_formats` and `scaled_formats` by a name such as "int4", "fp8_e4m3", "mxfp4" or "nvfp4";
`fake_quantize_linears` puts a model's weights through one (`llmkit.quantize` is the torchao path that
really stores them quantized).
"""

import copy
import math

import torch
from torch import Tensor, nn

from llmkit import ggml_blocks
from llmkit.errors import LLMKitError
from llmkit.float_formats import FLOAT_FORMATS, representable_values
from llmkit.scaled_formats import (
    MX_BLOCK,
    NVFP4_BLOCK,
    BlockEncoded,
    FloatEncoded,
    IntEncoded,
    block_scale_values,
    dequantize_block,
    dequantize_float,
    dequantize_int,
    quantize_float,
    quantize_int,
    quantize_mx,  # fmt: skip
    quantize_nvfp4,
)

# ---------------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------------

Encoded = FloatEncoded | IntEncoded | BlockEncoded | ggml_blocks.GGMLEncoded

FORMATS = [
    "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1",
    "int8", "int4",
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
    "nvfp4",
    "q8_0", "q4_0", "q4_1",
]  # fmt: skip
MX_FORMATS = {"mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6_e3m2": "fp6_e3m2",
              "mxfp6_e2m3": "fp6_e2m3", "mxfp4": "fp4_e2m1"}  # fmt: skip
PARAMETERS = {
    "float": ("granularity", "group_size", "saturate"),
    "int": ("bits", "granularity", "group_size", "symmetric", "eps"),
    "mx": ("block_size",),
    "nvfp4": ("tensor_scale",),
    "ggml": (),
}


def parse_format(format: str) -> tuple[str, str | int | None]:
    """("float", name) | ("int", bits or None) | ("mx", element) | ("nvfp4", None) | ("ggml", GGUF block type);
    int2..int8 and "int" work too."""
    if format in FLOAT_FORMATS:
        return "float", format
    if format in MX_FORMATS:
        return "mx", MX_FORMATS[format]
    if format == "nvfp4":
        return "nvfp4", None
    if format in ggml_blocks.TYPES:
        return "ggml", format
    if format == "int":
        return "int", None
    if isinstance(format, str) and format.startswith("int") and format[3:].isdigit():
        return "int", int(format[3:])
    raise LLMKitError(f"unknown format {format!r}; use one of {', '.join(FORMATS)} (or int2..int8)")


def quantize_tensor(x: Tensor, format: str, **params) -> Encoded:
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
    if kind == "ggml":
        return ggml_blocks.quantize(x, arg)
    return quantize_nvfp4(x, **params)


def dequantize_tensor(enc: Encoded) -> Tensor:
    """x_hat from any encoding, in the input's dtype."""
    if isinstance(enc, FloatEncoded):
        return dequantize_float(enc)
    if isinstance(enc, IntEncoded):
        return dequantize_int(enc)
    if isinstance(enc, ggml_blocks.GGMLEncoded):
        return ggml_blocks.dequantize(enc)
    return dequantize_block(enc)


def fake_quantize(x: Tensor, format: str, **params) -> Tensor:
    """x -> codes -> x_hat in x's dtype: the rounding error of a format, without its kernels."""
    return dequantize_tensor(quantize_tensor(x, format, **params))


def bits_per_value(enc: Encoded) -> int:
    """Bits of one element code, scales not counted."""
    if isinstance(enc, IntEncoded):
        return enc.bits
    if isinstance(enc, ggml_blocks.GGMLEncoded):
        return 8 if enc.type == "q8_0" else 4
    return enc.fmt.bits if isinstance(enc, FloatEncoded) else enc.element.bits


def effective_bits_per_weight(enc: Encoded) -> float:
    """Storage per value with the scales and zero points: codes at their width, metadata as stored."""
    n = enc.codes.numel()
    total = n * bits_per_value(enc)
    for meta in (enc.scales, getattr(enc, "zero_points", None), getattr(enc, "tensor_scale", None),
                 getattr(enc, "mins", None)):  # fmt: skip
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
    if isinstance(enc, ggml_blocks.GGMLEncoded):
        d = enc.scales.flatten()[group].float()
        if enc.type == "q8_0":
            return torch.arange(-127, 128, dtype=torch.float32) * d
        if enc.type == "q4_0":
            return (torch.arange(16, dtype=torch.float32) - 8) * d
        return torch.arange(16, dtype=torch.float32) * d + enc.mins.flatten()[group].float()
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
    enc = quantize_tensor(row, format, **params)
    x_hat = dequantize_tensor(enc)
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
    return configs + [(f, {}) for f in ggml_blocks.TYPES]


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
        enc = quantize_tensor(x, format, **params)
        x_hat = dequantize_tensor(enc)
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
    if kind == "ggml":
        return ggml_blocks.BLOCK
    return params.get("group_size") or 1


def fake_quantize_linears(
    model: nn.Module, format: str, skip: tuple[str, ...] = ("output",), pad: bool = False, **params
) -> nn.Module:
    """A copy of the model whose nn.Linear weights went through the codec (names in `skip` are kept).

    The output layer is skipped by default: like the embedding, it is usually kept in higher
    precision. A tied output weight is untied in the copy, so the embedding stays exact.
    pad=True zero-pads a weight whose input width is not a multiple of the group or block size
    (an MLP width of 688 under blocks of 32) and crops it back: zeros raise no amax and every
    range holds 0, so this is exactly a shorter last group (except for Q4_1, whose range then stretches to 0).
    Without it such a layer is an error.
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
