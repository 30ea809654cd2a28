"""Quantize a whole model with torchao, in torchchat's scheme language, and count what it really weighs.

A scheme is a preset name (`int8wo`, `int4wo-32`, `mobile`...), torchchat's JSON
(`'{"embedding": {"bitwidth": 4, "groupsize": 32}, "linear:a8w4dq": {"groupsize": 256}}'`) or the path
of a file holding such JSON. Each JSON key becomes one torchao config, chosen for the device, because
the same scheme needs different kernels (and so tensor layouts) on a CPU and on a GPU:

| key | cpu | cuda |
| --- | --- | --- |
| precision | `model.to(dtype)` | `model.to(dtype)` |
| embedding | `IntxWeightOnlyConfig(int<b>, PerGroup(g) or PerAxis(0))` | same |
| linear:int8 | `Int8WeightOnlyConfig(PerRow() or PerGroup(g))` | per row: llmkit's kernel (`llmkit.kernels`) |
| linear:a8w8dq | `Int8DynamicActivationInt8WeightConfig()` | same |
| linear:int4 | `PrototypeInt4WeightOnlyConfig(g)`, g 32/64/128 | `Int4WeightOnlyConfig(g, "tile_packed_to_4d")`, bf16 |
| linear:a8w4dq | `Int8DynamicActivationIntxWeightConfig(int4, PerGroup(g))` | same |
| linear:fp8 | `Float8WeightOnlyConfig()` | same |
| linear:mxfp4 | `MXDynamicActivationMXWeightConfig(fp4, fp4, EMULATED)`, bf16 | same |
| linear:nvfp4 | `NVFP4WeightOnlyConfig()` | same |

Steps run in the order precision, embedding, linear, whatever the order of the JSON. A group size of 0
means one group per row (per channel), where the config has that granularity. On the CPU, int4 wants a
bfloat16 model (torchao's CPU int4 kernel is slow with float32 activations); on a GPU, int4 takes
tinygemm's tile packing, whose kernel ships with torch (torchao's other int4 packings need the MSLK package).
linear:int8/int4 take `"kernel"`: "auto" (torchao's, for now), "torchao" or "llmkit", the kit's Triton kernels
(`llmkit.quantized_linear`, per-row int8, int4 g 32/64/128): `'{"linear:int8": {"groupsize": 0, "kernel": "llmkit"}}'`.
"""

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from llmkit.devices import DTYPES, resolve_device
from llmkit.distributed import QUANTIZE_LIMITATION, split_over_devices
from llmkit.errors import LLMKitError
from llmkit.generate import LLM
from llmkit.huge_pages import collapse_weights
from llmkit.model import Transformer


def _drop_cuda_library_noise(record: logging.LogRecord) -> bool:
    """torchao's wheel carries CUDA kernels; without CUDA, importing it logs a "Failed to load" line for each."""
    return torch.cuda.is_available() or not record.getMessage().startswith("Failed to load")


def _drop_enum_registration_notice(record: logging.LogRecord) -> bool:
    """torchao 0.18 registers its config enums (KernelPreference, ...) with torch's pytree as constants, which
    torch 2.13 logs as deprecated once per enum; nothing a user of the kit can change."""
    return "Calling register_constant() on Enum subclasses is deprecated" not in record.getMessage()


# installed before torchao is first imported
logging.getLogger("torchao").addFilter(_drop_cuda_library_noise)
logging.getLogger("torch.utils._pytree").addFilter(_drop_enum_registration_notice)


PRESETS = {
    "int8wo": {"linear:int8": {"groupsize": 0}},
    "int8dq": {"linear:a8w8dq": {}},
    "int4wo-<g>": {"linear:int4": {"groupsize": "<g>"}},
    "8da4w-<g>": {"linear:a8w4dq": {"groupsize": "<g>"}},
    "fp8wo": {"linear:fp8": {}},
    "mxfp4": {"precision": {"dtype": "bfloat16"}, "linear:mxfp4": {}},
    "nvfp4": {"linear:nvfp4": {}},
    "mobile": {"embedding": {"bitwidth": 4, "groupsize": 32}, "linear:a8w4dq": {"groupsize": 256}},  # torchchat's
    "cuda": {"precision": {"dtype": "bfloat16"}, "linear:int4": {"groupsize": 256}},  # torchchat's cuda.json
}

# key -> {parameter: default (None: required)}, in the order the steps run
KEYS = {
    "precision": {"dtype": None},
    "embedding": {"bitwidth": None, "groupsize": 0},
    "linear:int8": {"groupsize": 0, "kernel": "auto"},
    "linear:a8w8dq": {},
    "linear:int4": {"groupsize": None, "kernel": "auto"},
    "linear:a8w4dq": {"groupsize": None},
    "linear:fp8": {},
    "linear:mxfp4": {},
    "linear:nvfp4": {},
}
CPU_INT4_GROUPS = (32, 64, 128)  # the CPU int4 kernel (tinygemm for CPU)
CUDA_INT4_GROUPS = (32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class SchemeEntry:
    """One key of a scheme with its parameters, defaults filled in."""

    key: str
    params: dict = dataclasses.field(default_factory=dict)


def _preset(name: str) -> dict | None:
    if name in PRESETS and "<g>" not in name:
        return PRESETS[name]
    m = re.fullmatch(r"(int4wo|8da4w)-(\d+)", name)
    if m is None:
        return None
    (key,) = PRESETS[f"{m[1]}-<g>"]
    return {key: {"groupsize": int(m[2])}}


def _read_scheme(text: str) -> dict:
    if text.lstrip().startswith("{"):
        try:
            scheme = json.loads(text)
        except json.JSONDecodeError as e:
            example = '{"linear:int8": {"groupsize": 0}}'
            raise LLMKitError(
                f"scheme {text!r} is not valid JSON ({e}); write e.g. '{example}' or use a preset"
            ) from None
        if not isinstance(scheme, dict):
            raise LLMKitError(f'scheme {text!r} must be a JSON object of keys like "linear:int4"')
        return scheme
    preset = _preset(text)
    if preset is not None:
        return preset
    if Path(text).expanduser().is_file():
        try:
            return _read_scheme(Path(text).expanduser().read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise LLMKitError(f"scheme file {text} is not UTF-8 text; give a JSON file or a preset") from None
    names = ", ".join(PRESETS)
    raise LLMKitError(f"unknown scheme {text!r}: use a preset ({names}), torchchat JSON or a JSON file's path")


def parse_scheme(text: str | Path) -> list[SchemeEntry]:
    """A preset, JSON or JSON file as the steps to run, checked for everything that needs no model."""
    text = str(text)
    scheme = _read_scheme(text)
    steps = []
    for key, params in scheme.items():
        if key not in KEYS:
            raise LLMKitError(f"scheme {text!r}: unknown key {key!r}; known keys are {', '.join(KEYS)}")
        if not isinstance(params, dict):
            raise LLMKitError(f"scheme {text!r}: {key} takes an object of parameters, not {params!r}")
        unknown = set(params) - set(KEYS[key])
        if unknown:
            allowed = ", ".join(KEYS[key]) or "no parameters"
            raise LLMKitError(f"scheme {text!r}: {key} has no parameter {sorted(unknown)[0]!r}; it takes {allowed}")
        missing = [p for p, default in KEYS[key].items() if default is None and p not in params]
        if missing:
            raise LLMKitError(f"scheme {text!r}: {key} needs {missing[0]!r}")
        steps.append(SchemeEntry(key, {**KEYS[key], **params}))
    for step in steps:
        _check_params(text, step)
    linear = [s.key for s in steps if s.key.startswith("linear:")]
    if len(linear) > 1:
        raise LLMKitError(f"scheme {text!r}: {' and '.join(linear)} both quantize the linear layers; keep one")
    if not steps:
        raise LLMKitError(f'scheme {text!r} is empty; give at least one key, e.g. "linear:int8"')
    return sorted(steps, key=lambda s: list(KEYS).index(s.key))


def _check_params(text: str, step: SchemeEntry) -> None:
    p = step.params
    if "dtype" in p and p["dtype"] not in DTYPES:
        raise LLMKitError(f"scheme {text!r}: unknown dtype {p['dtype']!r}; use one of {', '.join(DTYPES)}")
    if "bitwidth" in p and (type(p["bitwidth"]) is not int or not 1 <= p["bitwidth"] <= 8):
        raise LLMKitError(f"scheme {text!r}: embedding bitwidth {p['bitwidth']!r} is not supported; use 1 to 8")
    if "kernel" in p and p["kernel"] not in ("auto", "llmkit", "torchao"):
        raise LLMKitError(f"scheme {text!r}: unknown kernel {p['kernel']!r}; use one of auto, llmkit, torchao")
    if "groupsize" in p:
        g = p["groupsize"]
        per_row = step.key in ("embedding", "linear:int8")
        if type(g) is not int or g < 0 or (g == 0 and not per_row):
            use = "0 (one group per row) or a positive integer" if per_row else "a positive integer such as 32"
            raise LLMKitError(f"scheme {text!r}: {step.key} groupsize {g!r} is not valid; use {use}")


def scheme_text(steps: list[SchemeEntry]) -> str:
    """The steps as one line of torchchat JSON: how a quantized model records what was done to it."""
    return json.dumps({s.key: {k: v for k, v in s.params.items() if (k, v) != ("kernel", "auto")} for s in steps})


# ---- applying --------------------------------------------------------------------------------


def _config(step: SchemeEntry, device: torch.device, dtype: torch.dtype, scheme: str, width: int = 0):
    """The torchao config that runs `step` on `device`; LLMKitError with the alternative where none does."""
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
        PerRow,
    )

    key, g = step.key, step.params.get("groupsize")
    cuda = device.type == "cuda"
    if key == "embedding":
        bits = getattr(torch, f"int{step.params['bitwidth']}")
        return IntxWeightOnlyConfig(weight_dtype=bits, granularity=PerGroup(g) if g else PerAxis(0))
    if key == "linear:int8":
        return Int8WeightOnlyConfig(granularity=PerGroup(g) if g else PerRow())
    if key == "linear:a8w8dq":
        return Int8DynamicActivationInt8WeightConfig()
    if key == "linear:a8w4dq":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(g))
    if key == "linear:fp8":
        return Float8WeightOnlyConfig()
    if key == "linear:int4":
        groups = CUDA_INT4_GROUPS if cuda else CPU_INT4_GROUPS
        if g not in groups:  # g passed the shape check, so 8da4w-g fits; an int4 group must divide `width` too
            fits = [f"int4wo-{x}" for x in sorted(groups, key=lambda x: abs(x - g)) if width % x == 0][:1]  # nearest
            raise LLMKitError(
                f"scheme {scheme!r}: int4 group size {g} does not run on {device.type} (its kernel takes "
                f"{', '.join(map(str, groups))}); use {' or '.join([*fits, f'8da4w-{g}'])}"
            )
        if cuda:
            if dtype != torch.bfloat16:
                raise LLMKitError(
                    f'scheme {scheme!r}: int4 on cuda runs on a bfloat16 model; add "precision": '
                    '{"dtype": "bfloat16"} or use the preset cuda'
                )
            from torchao.quantization import Int4WeightOnlyConfig

            return Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d")
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=g)
    if key == "linear:mxfp4":
        if dtype != torch.bfloat16:
            raise LLMKitError(
                f'scheme {scheme!r}: MX formats run on a bfloat16 model; add "precision": '
                '{"dtype": "bfloat16"} or use the preset mxfp4'
            )
        from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig
        from torchao.quantization.quantize_.common import KernelPreference

        fp4 = torch.float4_e2m1fn_x2
        return MXDynamicActivationMXWeightConfig(
            activation_dtype=fp4, weight_dtype=fp4, kernel_preference=KernelPreference.EMULATED
        )
    if key == "linear:nvfp4":
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

        return NVFP4WeightOnlyConfig()
    raise AssertionError(key)


def _kernel(step: SchemeEntry, device: torch.device, scheme: str) -> str:
    """Whose kernel multiplies the weights of `step`: "llmkit" or "torchao" (the module docstring says how)."""
    kernel, g = step.params.get("kernel", "torchao"), step.params.get("groupsize")
    fits, triton = g == 0 if step.key == "linear:int8" else g in (32, 64, 128), importlib.util.find_spec("triton")
    if kernel == "auto":
        return "torchao"  # until a whole-model GPU run shows llmkit's faster (issue #27); per matrix it ties at int8
    off_gpu = device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    for problem, needs in [(not fits, "groupsize 0" if step.key == "linear:int8" else "groups of 32, 64 or 128"),
                           (not triton, "Triton"), (off_gpu, "a CUDA GPU, or TRITON_INTERPRET=1 on the CPU")]:
        if kernel == "llmkit" and problem:
            raise LLMKitError(f"scheme {scheme!r}: llmkit's {step.key} kernel needs {needs}; use kernel torchao")
    return kernel


def _block(step: SchemeEntry) -> tuple[int, int]:
    """(rows, columns) that each weight's shape must be a multiple of: the quantization block."""
    g = step.params.get("groupsize") or 1
    return {"linear:mxfp4": (1, 32), "linear:nvfp4": (16, 16), "linear:int4": (16, g)}.get(step.key, (1, g))


def _check_shapes(modules: dict[str, nn.Module], step: SchemeEntry, scheme: str) -> int:
    """Refuse a step whose block doesn't fit every layer, with a scheme that does; return the layers' common
    input width (their greatest common divisor), which any group size must divide."""
    rows, cols = _block(step)
    common = math.gcd(*(m.weight.shape[1] for m in modules.values()))
    for name, module in modules.items():
        out_features, in_features = module.weight.shape
        if in_features % cols == 0 and out_features % rows == 0:
            continue
        if rows == 1 and "groupsize" in step.params:
            raise LLMKitError(
                f"scheme {scheme!r}: group size {cols} does not divide the {in_features} input features of {name}; "
                f"use a group size that divides {common}"
            )
        fits = min(common & -common, 256)  # the largest power of two (up to 256) that divides every layer's input
        raise LLMKitError(
            f"scheme {scheme!r}: {name} is {out_features}x{in_features} but {step.key} needs multiples of "
            f"{rows}x{cols}; use int8wo, fp8wo or 8da4w-{fits} for this model"
        )
    return common


def _untie(model: Transformer) -> None:
    """Give the output layer its own copy of the embedding matrix, so quantizing one leaves the other alone."""
    if model.output.weight is model.tok_embeddings.weight:
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone(), requires_grad=False)
        model.args = dataclasses.replace(model.args, tie_embeddings=False)  # args may be shared with other models


def quantize(llm: LLM, scheme: str | Path, device: str | None = None) -> LLM:
    """Quantize `llm`'s model in place with torchao and return it, the scheme recorded in `llm.scheme`.

    Precision runs first, then the embedding, then every `nn.Linear` (the output layer included).
    A model whose output layer shares the embedding matrix (tied) is untied first when either is
    quantized: the two are used differently (a row lookup and a matrix product), get different
    configs, and quantizing the shared tensor for one would silently change the other. The cost is
    a second copy, which `model_size` counts. The compiled or exported step of `llm`, if any, is
    dropped: compile again after quantizing.
    """
    from torchao.quantization import quantize_

    model = llm.model
    if model is None:
        raise LLMKitError(f"{llm.name} has no eager model to quantize (it was exported); load the checkpoint")
    if split_over_devices(model):  # torchao would quantize each rank's part as if it were the whole weight
        raise LLMKitError(QUANTIZE_LIMITATION)
    # a DTensor is a wrapper subclass too: checked first; llmkit's own kernels keep int8 weights in plain tensors
    if any(is_traceable_wrapper_subclass(p) or p.dtype in (torch.int8, torch.uint8) for p in model.parameters()):
        raise LLMKitError(f"{llm.name} is already quantized ({llm.scheme}); load the float model and quantize that")
    steps = parse_scheme(scheme)
    text = str(scheme)
    target = resolve_device(device) if device is not None else llm.device
    dtype = model.tok_embeddings.weight.dtype
    for step in steps:  # everything that can fail, before the model changes
        if step.key == "precision":
            dtype = DTYPES[step.params["dtype"]]
            continue
        kind = nn.Embedding if step.key == "embedding" else nn.Linear
        ours = step.key in ("linear:int8", "linear:int4") and _kernel(step, target, text) == "llmkit"
        layers = {n: m for n, m in model.named_modules() if isinstance(m, kind)}
        width = _check_shapes(layers, dataclasses.replace(step, key="linear:int8") if ours else step, text)  # any rows
        if not ours:
            _config(step, target, dtype, text, width)
    old = (llm.device, model.tok_embeddings.weight.dtype)
    model.to(device=target, dtype=dtype)
    for step in steps:
        if step.key == "precision":
            continue
        _untie(model)
        if step.key in ("linear:int8", "linear:int4") and _kernel(step, target, text) == "llmkit":
            from llmkit.quantized_linear import use_kernels

            use_kernels(model, 8 if step.key == "linear:int8" else 4, step.params["groupsize"])
            continue
        kind = nn.Embedding if step.key == "embedding" else nn.Linear
        quantize_(model, _config(step, target, dtype, text), filter_fn=lambda m, _, kind=kind: isinstance(m, kind))
    if target.type == "cpu":  # the quantized weights are new memory: onto 2 MB pages (llmkit.huge_pages)
        collapse_weights(model)
    if (target, dtype) != old:
        model.setup_buffers()
    llm.device, llm.step, llm.scheme = target, model, scheme_text(steps)
    return llm


# ---- measuring and saving --------------------------------------------------------------------


def quantize_like_export_llm(llm: LLM, group_size: int) -> LLM:
    """8da4w as ExecuTorch's export_llm applies it, in place: a linear layer whose input width the group size
    does not divide stays float, where `quantize` refuses the scheme rather than leave a layer unquantized."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    quantize_(llm.model, config, filter_fn=lambda m, _: isinstance(m, nn.Linear) and m.in_features % group_size == 0)
    return llm


def _storages(t: Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages that hold a tensor's data: its own, or a torchao tensor's inner tensors', recursively; of a
    weight split over devices (a DTensor), this rank's part."""
    if isinstance(t, DTensor):
        yield from _storages(t.to_local())
    elif is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _storages(getattr(t, name))
    else:
        yield t.untyped_storage()


def model_size(llm_or_model: LLM | nn.Module) -> int:
    """Bytes the weights occupy: every storage behind the parameters, each counted once.

    A quantized tensor's own `numel() * element_size()` is its float size, so its inner tensors
    (data, scales, zero points) are counted instead. Buffers (KV cache, RoPE tables, mask) are not weights.
    """
    model = llm_or_model.model if isinstance(llm_or_model, LLM) else llm_or_model
    seen = {}
    for p in model.parameters():
        for s in _storages(p):
            seen[(s.data_ptr(), s.device)] = s.nbytes()
    return sum(seen.values())
