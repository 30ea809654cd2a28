"""Device and dtype names as the command line takes them, checked against this machine."""

import torch

from llmkit.errors import LLMKitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise LLMKitError("CUDA was asked for but this machine has no usable GPU; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LLMKitError(f"unknown device {device!r}; use cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LLMKitError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
