"""The reference codecs of llmkit.float_formats, scaled_formats and numerics against the real implementations:
torch's casts and torchao."""

import math

import pytest
import torch
from torch import nn

from llmkit import float_formats as ff
from llmkit import numerics as nm
from llmkit import scaled_formats as sf
from llmkit.errors import LLMKitError

torchao = pytest.importorskip("torchao")
from torchao.prototype.custom_fp_utils import _f32_to_floatx_unpacked, _floatx_unpacked_to_f32  # noqa: E402
from torchao.prototype.mx_formats.mx_tensor import MXTensor  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerAxis,
    PerGroup,
    quantize_,
)
from torchao.quantization.quant_primitives import (  # noqa: E402
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (  # noqa: E402
    _apply_int8_act_asym_per_token_quant_dequant,
)

TORCH_FORMATS = list(ff.TORCH_DTYPES)
SMALL_FORMATS = ["fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]


def torch_bits(x: torch.Tensor, name: str) -> torch.Tensor:
    """torch's own cast of x, as unsigned bit patterns in int32."""
    fmt, dtype = ff.FLOAT_FORMATS[name], ff.TORCH_DTYPES[name]
    container = torch.int16 if fmt.bits == 16 else torch.uint8
    return x.to(dtype).view(container).to(torch.int32) & (2**fmt.bits - 1)


def all_patterns_as(name: str) -> torch.Tensor:
    """Every bit pattern of a torch float dtype, viewed as that dtype."""
    fmt, dtype = ff.FLOAT_FORMATS[name], ff.TORCH_DTYPES[name]
    bits = torch.arange(2**fmt.bits, dtype=torch.int32)
    if fmt.bits == 16:
        return torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16).view(dtype)
    return bits.to(torch.uint8).view(dtype)


def hard_inputs(name: str) -> torch.Tensor:
    """float32 values that test rounding: random magnitudes, every value, halfway ties and their neighbours,
    subnormals, the max and just above it, infinities, NaN and signed zeros."""
    fmt = ff.FLOAT_FORMATS[name]
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-12, 12, 25) if fmt.bits > 8 else torch.logspace(-4, 5, 10)
    random = (torch.randn(len(scales), 4000, generator=gen) * scales[:, None]).flatten()
    values = ff.representable_values(fmt).double()
    ties = ((values[1:] + values[:-1]) / 2).float()  # exact in float32 for these formats
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    edges = torch.tensor([fmt.max, fmt.max * 1.01, fmt.max * 1.0625, fmt.max * 1.2, fmt.max * 4, fmt.min_subnormal / 2,
                          fmt.min_subnormal * 0.75, fmt.min_subnormal / 4, 0.0, math.inf, math.nan])  # fmt: skip
    edges = torch.cat([edges, -edges])
    return torch.cat([random, values.float(), ties, ties.nextafter(up), ties.nextafter(down), edges])


# ---------------------------------------------------------------------------------------------
# Floating-point element formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_format_description_matches_torch_finfo(name):
    fmt, info = ff.FLOAT_FORMATS[name], torch.finfo(ff.TORCH_DTYPES[name])
    assert (fmt.bits, fmt.max, fmt.min_normal) == (info.bits, info.max, info.smallest_normal)


def test_small_format_values_and_maxima():
    assert ff.representable_values("fp4_e2m1").tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert (ff.FP6_E3M2.max, ff.FP6_E2M3.max, ff.FP4_E2M1.max) == (28.0, 7.5, 6.0)
    assert len(ff.representable_values("fp6_e2m3")) == 63 and len(ff.representable_values("fp8_e4m3")) == 253
    assert ff.decode(torch.tensor([0x7E, 0x7F, 0x01, 0x80]), "fp8_e4m3")[[0, 2, 3]].tolist() == [448, 2**-9, -0.0]


@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_decode_equals_torch_on_every_bit_pattern(name):
    fmt = ff.FLOAT_FORMATS[name]
    reference = all_patterns_as(name).float()
    mine = ff.decode(torch.arange(2**fmt.bits), fmt)
    assert torch.equal(mine.isnan(), reference.isnan())
    finite = ~reference.isnan()
    assert torch.equal(mine[finite].view(torch.int32), reference[finite].view(torch.int32))  # -0.0 included


@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_encode_equals_torch_cast_bit_for_bit(name):
    x = hard_inputs(name)
    assert torch.equal(ff.encode(x, name).to(torch.int32), torch_bits(x, name))


@pytest.mark.parametrize("name", TORCH_FORMATS)
def test_every_value_round_trips(name):
    values = all_patterns_as(name).float()
    values = values[values.isfinite()]
    assert torch.equal(ff.decode(ff.encode(values, name), name).view(torch.int32), values.view(torch.int32))


def test_saturation_rules():
    big = torch.tensor([500.0, 1e6, math.inf, -math.inf])
    assert ff.round_to_format(big, "fp8_e4m3").tolist() == [448, 448, 448, -448]  # torch >= 2.12 saturates
    assert ff.round_to_format(big, "fp8_e4m3", saturate=False).isnan().all()  # the OCP non-saturating mode
    assert ff.round_to_format(torch.tensor([61439.0, 61440.0]), "fp8_e5m2").tolist() == [57344, math.inf]
    assert ff.round_to_format(torch.tensor([61440.0]), "fp8_e5m2", saturate=True).item() == 57344
    assert ff.round_to_format(torch.tensor([7.0, -100.0, math.inf]), "fp4_e2m1").tolist() == [6, -6, 6]
    assert ff.round_to_format(torch.tensor([2.5, 3.5, 0.25, 0.75]), "fp4_e2m1").tolist() == [2, 4, 0, 1]  # ties to even


@pytest.mark.parametrize("name", SMALL_FORMATS)
def test_small_formats_equal_torchao(name):
    fmt = ff.FLOAT_FORMATS[name]
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8)
    assert torch.equal(ff.decode(codes, fmt), _floatx_unpacked_to_f32(codes, fmt.ebits, fmt.mbits))
    x = hard_inputs(name)
    x = x[~x.isnan()]  # torchao has no NaN rule for these formats
    assert torch.equal(ff.encode(x, fmt), _f32_to_floatx_unpacked(x, fmt.ebits, fmt.mbits))


# ---------------------------------------------------------------------------------------------
# Integer affine
# ---------------------------------------------------------------------------------------------


def weights(rows: int = 32, cols: int = 256, dtype=torch.float32) -> torch.Tensor:
    """Small weights with an outlier, a row offset from zero and a half-empty row."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w[2, 7], w[5], w[6, :64] = 0.5, w[5] + 0.03, 0.0
    return w.to(dtype)


def torchao_affine(x, bits, block, symmetric, eps=None):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    scale, zp = choose_qparams_affine(x, mapping, block, torch.int8, qmin, qmax, eps=eps,
                                      zero_point_dtype=torch.int8, keepdim=True)  # fmt: skip
    q = quantize_affine(x, block, scale, zp, torch.int8, qmin, qmax)
    return q, scale, zp, dequantize_affine(q, block, scale, zp, torch.int8, qmin, qmax, output_dtype=x.dtype)


def assert_int_equal(enc, q, scale, zp, x_hat):
    assert torch.equal(enc.codes, q) and torch.equal(enc.scales, scale)
    assert torch.equal(enc.zero_points, zp) if enc.zero_points is not None else not zp.any()
    assert torch.equal(nm.dequantize_tensor(enc), x_hat)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_equals_torchao_affine_primitives(bits, group_size, symmetric):
    w = weights()
    enc = sf.quantize_int(w, bits, group_size=group_size, symmetric=symmetric)
    assert_int_equal(enc, *torchao_affine(w, bits, (1, group_size or w.shape[1]), symmetric))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int_equals_torchao_in_half_precision(dtype):
    w = weights(dtype=dtype)
    enc = sf.quantize_int(w, 4, group_size=32, symmetric=False)
    assert enc.scales.dtype == dtype
    assert_int_equal(enc, *torchao_affine(w, 4, (1, 32), symmetric=False))


def test_int_per_tensor_equals_torchao():
    w = weights()
    enc = sf.quantize_int(w, 8, granularity="per_tensor", symmetric=False)
    assert_int_equal(enc, *torchao_affine(w, 8, tuple(w.shape), symmetric=False))


def test_per_token_activations_equal_torchao_dynamic_int8():
    a = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(2)) * 3 + 1
    assert torch.equal(
        nm.fake_quantize(a, "int8", granularity="per_token"), _apply_int8_act_asym_per_token_quant_dequant(a)
    )


@pytest.mark.parametrize(
    "config, params",
    [
        (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), {"bits": 4, "group_size": 32}),
        (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64), mapping_type=MappingType.ASYMMETRIC),
         {"bits": 4, "group_size": 64, "symmetric": False}),
        (IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(128)), {"bits": 2, "group_size": 128}),
        (IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), {"bits": 8}),
        (Int8WeightOnlyConfig(), {"bits": 8, "eps": torch.finfo(torch.float32).eps}),
    ],
    ids=["intx-int4-g32", "intx-int4-g64-asym", "intx-int2-g128", "intx-int8-per-axis", "int8-weight-only"],
)  # fmt: skip
def test_int_equals_quantize_on_linear(config, params):
    w = weights()
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    quantize_(linear, config)
    q = linear.weight
    enc = sf.quantize_int(w, **params)
    assert torch.equal(enc.codes, q.qdata) and torch.equal(enc.scales, q.scale)
    assert torch.equal(enc.zero_points, q.zero_point) if enc.zero_points is not None else not q.zero_point.any()
    assert torch.equal(nm.dequantize_tensor(enc), q.dequantize())


def test_scaled_fp8_equals_float8_weight_only():
    w = weights()
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    quantize_(linear, Float8WeightOnlyConfig())
    q = linear.weight
    enc = sf.quantize_float(w, "fp8_e4m3", granularity="per_channel")
    assert torch.equal(enc.codes, q.qdata.view(torch.uint8)) and torch.equal(enc.scales, q.scale)
    assert torch.equal(nm.dequantize_tensor(enc), q.dequantize())


# ---------------------------------------------------------------------------------------------
# Block scaling: MX and NVFP4
# ---------------------------------------------------------------------------------------------


def block_input() -> torch.Tensor:
    """Rows spanning five decades, an outlier, an all-zero block and a float32 subnormal."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(48, 256, generator=gen) * torch.logspace(-3, 2, 48)[:, None]
    x[3, 5], x[9, 40] = 1e3, 1e-40
    x[7, :32] = 0.0
    return x


MX_CASES = [
    (torch.float8_e4m3fn, "mxfp8_e4m3"),
    (torch.float8_e5m2, "mxfp8_e5m2"),
    ("fp6_e3m2", "mxfp6_e3m2"),
    ("fp6_e2m3", "mxfp6_e2m3"),
    (torch.float4_e2m1fn_x2, "mxfp4"),
]


@pytest.mark.parametrize("elem_dtype, name", MX_CASES, ids=[name for _, name in MX_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_equals_torchao_mxtensor(elem_dtype, name, dtype):
    x = block_input().to(dtype)
    reference = MXTensor.to_mx(x, elem_dtype, block_size=32)
    enc = nm.quantize_tensor(x, name)
    codes = sf.pack_fp4(enc.codes) if name == "mxfp4" else enc.codes
    assert torch.equal(codes, reference.qdata.view(torch.uint8))
    assert torch.equal(enc.scales, reference.scale.view(torch.uint8))
    assert torch.equal(nm.dequantize_tensor(enc), reference.dequantize(dtype))


def test_mx_nan_block_has_the_nan_scale():
    x = torch.ones(2, 64)
    x[1, 3] = math.nan
    enc = sf.quantize_mx(x, "fp8_e4m3")
    assert enc.scales.tolist() == [[119, 119], [255, 119]]  # 2^(0 - 8): 1.0 is 256 in e4m3 units
    x_hat = nm.dequantize_tensor(enc)
    assert x_hat[1, :32].isnan().all() and torch.equal(x_hat[[0]], x[[0]]) and torch.equal(x_hat[1, 32:], x[1, 32:])
    assert torch.equal(enc.codes, MXTensor.to_mx(x, torch.float8_e4m3fn).qdata.view(torch.uint8))


@pytest.mark.parametrize("two_level", [True, False])
def test_nvfp4_equals_torchao_nvfp4tensor(two_level):
    x = block_input()
    scale = per_tensor_amax_to_scale(x.abs().amax()) if two_level else None
    reference = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale)
    enc = sf.quantize_nvfp4(x, tensor_scale=two_level)
    assert torch.equal(sf.pack_fp4(enc.codes), reference.qdata.view(torch.uint8))
    assert torch.equal(enc.scales, reference.scale.view(torch.uint8))
    assert (enc.tensor_scale is None) == (scale is None) and (scale is None or torch.equal(enc.tensor_scale, scale))
    assert torch.equal(nm.dequantize_tensor(enc), reference.dequantize(torch.float32))


def test_nvfp4_equals_nvfp4_weight_only_on_linear():
    from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig
    from torchao.prototype.mx_formats.utils import from_blocked

    w = weights()
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    quantize_(linear, NVFP4WeightOnlyConfig())
    q = linear.weight
    enc = sf.quantize_nvfp4(w)
    assert q.is_swizzled_scales  # tiled for the tensor cores: undo the tiling to compare
    scales = from_blocked(q.scale, w.shape[0], w.shape[1] // 16).view(torch.uint8)
    assert torch.equal(sf.pack_fp4(enc.codes), q.qdata) and torch.equal(enc.scales, scales)
    assert torch.equal(enc.tensor_scale, q.per_tensor_scale)
    assert torch.equal(sf.block_scale_values(enc), q.get_hp_scales())
    assert torch.equal(nm.dequantize_tensor(enc), q.dequantize(torch.float32))


# ---------------------------------------------------------------------------------------------
# Dispatch, storage and metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("format", nm.FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_every_format(format, dtype):
    w = weights(dtype=dtype)
    x_hat = nm.fake_quantize(w, format)
    assert x_hat.shape == w.shape and x_hat.dtype == dtype and x_hat.isfinite().all()
    assert nm.sqnr_db(w, x_hat) > 5


def test_storage_counts_scales_and_zero_points():
    w = weights()  # 32 x 256
    bits = {
        ("int4", (("group_size", 32),)): 4 + 32 / 32,  # float32 scale per 32
        ("int4", (("group_size", 32), ("symmetric", False))): 4 + 40 / 32,  # + int8 zero point
        ("int8", ()): 8 + 32 / 256,
        ("mxfp4", ()): 4 + 8 / 32,  # E8M0 per 32
        ("mxfp6_e2m3", ()): 6 + 8 / 32,
        ("nvfp4", ()): 4 + 8 / 16 + 32 / w.numel(),  # E4M3 per 16 + one float32
        ("fp8_e4m3", ()): 8 + 32 / 256,  # scaled per channel by default
        ("fp8_e4m3", (("granularity", "none"),)): 8,  # a plain cast
        ("bf16", ()): 16,
    }
    for (format, params), expected in bits.items():
        enc = nm.quantize_tensor(w, format, **dict(params))
        assert nm.effective_bits_per_weight(enc) == pytest.approx(expected), format
    assert nm.bits_per_value(nm.quantize_tensor(w, "nvfp4")) == 4
    assert nm.bits_per_value(nm.quantize_tensor(w, "int3")) == 3


def test_metrics():
    x = torch.tensor([3.0, -4.0])
    assert nm.sqnr_db(x, x) == math.inf
    assert nm.mse(x, torch.tensor([3.0, -3.0])) == 0.5
    assert nm.max_abs_error(x, torch.tensor([2.0, -4.5])) == 1.0
    assert nm.relative_frobenius_error(x, torch.tensor([3.0, -3.5])) == pytest.approx(0.1)
    assert nm.sqnr_db(x, torch.tensor([3.0, -3.5])) == pytest.approx(20.0)


def test_more_bits_and_smaller_groups_mean_less_error():
    w = weights()
    sqnr = {label: nm.sqnr_db(w, nm.fake_quantize(w, f, **p)) for label, f, p in [
        ("int8 pc", "int8", {}), ("int4 g32", "int4", {"group_size": 32}), ("int4 pc", "int4", {}),
        ("nvfp4", "nvfp4", {}), ("mxfp4", "mxfp4", {})]}  # fmt: skip
    assert sqnr["int8 pc"] > sqnr["int4 g32"] > sqnr["int4 pc"]
    assert sqnr["nvfp4"] > sqnr["mxfp4"]


def test_explore_and_sweep():
    row = weights()[2]
    out = nm.explore(row, "int", bits=3, group_size=32)
    assert len(out["grid"]) == 8 and out["x_hat"].shape == row.shape and out["bits_per_weight"] == 4
    assert torch.equal(out["x_hat"], nm.fake_quantize(row, "int3", group_size=32))
    for format in ["int8", "fp8_e4m3", "fp4_e2m1", "mxfp4", "nvfp4", "bf16"]:
        out = nm.explore(row, format, group_size=None)
        assert math.isfinite(out["sqnr_db"]) and out["error"].shape == row.shape
    rows = nm.sweep(weights(), nm.sweep_configs([32, 128]))
    assert {"int4 g32", "int4 g128", "mxfp4", "nvfp4", "fp8_e4m3 per_channel"} <= {r["label"] for r in rows}


def test_fake_quantize_linears_keeps_the_output_layer():
    from llmkit.model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, hidden_dim=128, max_seq_len=16, tie_embeddings=True)
    model = Transformer(args).eval()
    quantized = nm.fake_quantize_linears(model, "int4", group_size=32)
    w1 = model.layers[0].feed_forward.w1.weight
    assert torch.equal(quantized.layers[0].feed_forward.w1.weight, nm.fake_quantize(w1, "int4", group_size=32))
    assert torch.equal(quantized.output.weight, model.output.weight)
    assert torch.equal(quantized.tok_embeddings.weight, model.tok_embeddings.weight)
    assert model.layers[0].feed_forward.w1.weight is w1  # the original is untouched
    tokens = torch.randint(0, 32, (1, 8))
    assert quantized(tokens).shape == (1, 8, 32)


def test_fake_quantize_linears_pads_to_whole_blocks():
    from llmkit.model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, hidden_dim=80, max_seq_len=16)  # 80 = 2.5 * 32
    model = Transformer(args).eval()
    with pytest.raises(LLMKitError, match="feed_forward.w2: its input width 80"):
        nm.fake_quantize_linears(model, "mxfp4")
    quantized = nm.fake_quantize_linears(model, "mxfp4", pad=True)
    w2 = model.layers[0].feed_forward.w2.weight  # 64 x 80: blocks of 32, 32 and a last one of 16
    expected = torch.cat(
        [nm.fake_quantize(w2[:, :64], "mxfp4"), nm.fake_quantize(w2[:, 64:], "mxfp4", block_size=16)], 1
    )
    assert torch.equal(quantized.layers[0].feed_forward.w2.weight, expected)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: nm.fake_quantize(w, "int5x"), "unknown format"),
        (lambda w: nm.fake_quantize(w, "fp3"), "unknown format"),
        (lambda w: nm.fake_quantize(w, "int4", group_size=48), "does not divide"),
        (lambda w: nm.fake_quantize(w[:, :100], "mxfp4"), "does not divide"),
        (lambda w: nm.fake_quantize(w[:, :40], "nvfp4"), "does not divide"),
        (lambda w: nm.fake_quantize(w, "int9"), "2 to 8 bits"),
        (lambda w: nm.fake_quantize(w, "int", bits=1), "2 to 8 bits"),
        (lambda w: sf.quantize_int(w, bits=16), "2 to 8 bits"),
        (lambda w: nm.fake_quantize(w.to(torch.int32), "int8"), "floating-point tensor"),
        (lambda w: ff.encode(torch.arange(4), "fp8_e4m3"), "floating-point tensor"),
        (lambda w: nm.fake_quantize(w.tolist(), "int8"), "floating-point tensor"),
        (lambda w: nm.fake_quantize(w, "mxfp4", group_size=32), "takes no parameter group_size"),
        (lambda w: nm.fake_quantize(w, "int4", bits=8), "use format 'int'"),
        (lambda w: sf.quantize_int(w, granularity="per_row"), "unknown granularity"),
        (lambda w: sf.quantize_int(w, granularity="per_group"), "needs a group_size"),
        (lambda w: sf.quantize_mx(w, "bf16"), "MX elements"),
        (lambda w: ff.encode(w, "fp4_e2m1", saturate=False), "saturate=True"),
        (lambda w: nm.fake_quantize(torch.tensor(1.0), "mxfp4"), "0-dim"),
    ],
)  # fmt: skip
def test_bad_input_raises_llmkit_error(call, message):
    with pytest.raises(LLMKitError, match=message) as info:
        call(weights())
    assert "\n" not in str(info.value)
