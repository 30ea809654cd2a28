"""A model's linear layers swapped for int8 or int4 weights that llmkit's own kernels multiply, w1 and w3 as one.

A transform applied to a loaded model, as torchao's `quantize_` is: the model's code knows nothing of it. Each
feed-forward block's w1 and w3 become one matrix (both multiply the same input, so one kernel reads both and
the activations once); every other `nn.Linear` becomes a `KernelLinear`. Quantizing the rows of [w1; w3]
together gives exactly the weights quantizing each would: int8 scales and int4 groups never span two rows.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit import kernels


class KernelLinear(nn.Module):
    """y = x W^T with W stored as int8 per output row (bits 8) or the kit's int4 groups (bits 4)."""

    def __init__(self, weight: Tensor, bits: int, group: int = 0, bias: Tensor | None = None):
        super().__init__()
        self.bits, self.out_features, self.in_features = bits, *weight.shape
        if bits == 8:
            parts = kernels.quantize_int8(weight.detach())
        else:
            parts = kernels.quantize_int4(weight.detach(), group)
        # parameters, not buffers: they are the weights (model_size and state_dict count them)
        self.q = nn.Parameter(parts[0], requires_grad=False)
        self.scale = nn.Parameter(parts[1], requires_grad=False)
        self.offset = nn.Parameter(parts[2], requires_grad=False) if bits == 4 else None
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        if self.bits == 8:
            return kernels.dequantize_int8(self.q, self.scale, dtype)
        return kernels.dequantize_int4(self.q, self.scale, self.offset, dtype)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > kernels.MAX_M:  # a prefill multiplies enough rows to be compute-bound: cuBLAS
            y = F.linear(rows, self.dequantized(x.dtype))
        elif self.bits == 8:
            y = torch.ops.llmkit.int8_mm(rows, self.q, self.scale)
        else:
            y = torch.ops.llmkit.int4_mm(rows, self.q, self.scale, self.offset)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group={2 * self.q.shape[1] // self.scale.shape[1]}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


class FusedFeedForward(nn.Module):
    """SwiGLU, w2(silu(w1 x) * w3 x), with w1 and w3 stacked into one quantized matrix w13."""

    def __init__(self, w1: Tensor, w2: Tensor, w3: Tensor, bits: int, group: int):
        super().__init__()
        self.hidden_dim = w1.shape[0]
        self.w13 = KernelLinear(torch.cat([w1, w3]), bits, group)
        self.w2 = KernelLinear(w2, bits, group)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


def use_kernels(model: nn.Module, bits: int, group: int = 0) -> nn.Module:
    """Swap every linear layer of `model` (a `llmkit.model.Transformer`) for llmkit's kernels, in place."""
    for layer in getattr(model, "layers", ()):
        ff = layer.feed_forward
        if not isinstance(ff, FusedFeedForward):
            layer.feed_forward = FusedFeedForward(ff.w1.weight, ff.w2.weight, ff.w3.weight, bits, group)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, KernelLinear(module.weight, bits, group, module.bias))
    return model
