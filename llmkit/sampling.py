"""Choosing the next token: temperature, top-k and top-p (nucleus) applied to one row of logits."""

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from llmkit.errors import LLMKitError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int,
                   stop: Sequence[str] = (), seed: int | None = None) -> None:  # fmt: skip
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise LLMKitError(f"temperature must be 0 (greedy) or a finite number above it, not {temperature}")
    if top_k is not None and top_k < 1:
        raise LLMKitError(f"top-k must be at least 1, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LLMKitError(f"top-p must be in (0, 1], not {top_p}")
    if max_new_tokens < 1:
        raise LLMKitError(f"max-new-tokens must be at least 1, not {max_new_tokens}")
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.Generator takes
        raise LLMKitError(f"seed must be a whole number from 0 to 2**64 - 1, not {seed}")
    if any(not s for s in stop):  # an empty string is in every text: it would stop after the first token
        raise LLMKitError("a stop string is empty; give the text to stop at (--stop TEXT)")


def probabilities(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """The distribution the next token is drawn from: all mass on the argmax at temperature 0, else the
    temperature-scaled softmax cut to the top k tokens and to the top-p probability mass, renormalised."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    logits = (logits.float() - logits.max()) / temperature  # at most 0: a tiny temperature can't overflow
    if top_k is not None and top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # mass before this token already > p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum()
    return probs


def sampling_options(temperature: float, top_k: int | None, top_p: float | None, device: torch.device) -> Tensor:
    """`probabilities`' options as a tensor for `distributions`: [temperature, top_k (0: all), top_p (1: all)]."""
    return torch.tensor([temperature, top_k or 0, 1.0 if top_p is None else top_p], device=device)


def distributions(logits: Tensor, options: Tensor) -> Tensor:
    """`probabilities` of each row of logits [..., V], the options a tensor (`sampling_options`): nothing branches
    on their values in Python, so one compiled graph serves every request's options. The cuts keep the logits at
    or above a threshold, so a tie at the boundary keeps every tied token where `probabilities` keeps some."""
    temperature, top_k, top_p = options.unbind()
    logits, vocab = logits.float(), logits.shape[-1]
    greedy = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    scaled = (logits - logits.amax(-1, keepdim=True)) / torch.where(temperature > 0, temperature, 1.0)
    ranked = scaled.sort(-1, descending=True).values
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).long()
    kth = ranked.gather(-1, (k - 1).expand_as(ranked[..., :1]))
    ranked_probs = torch.softmax(ranked.masked_fill(ranked < kth, float("-inf")), dim=-1)
    inside = (ranked_probs.cumsum(-1) - ranked_probs <= top_p) | (top_p >= 1.0)  # a prefix: at least the first
    # both cuts as one threshold on the logits: softmax over what is kept is the renormalised cut
    cut = torch.maximum(kth, ranked.gather(-1, (inside.sum(-1, keepdim=True) - 1).clamp(min=0)))  # NaN: none inside
    probs = torch.softmax(scaled.masked_fill(scaled < cut, float("-inf")), dim=-1)
    return torch.where(temperature > 0, probs, greedy)


def _as_numpy(logits: Tensor) -> np.ndarray | None:
    """A float32 row on the CPU as numpy, whose argmax and isfinite are vectorized where ATen's CPU ones are not
    (a 32000-entry row on a 2-core AVX-512 VM: argmax 57 us against 6, isfinite then all 65 us against 5, a tenth
    of a small model's decode step)."""
    return logits.numpy() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None


def argmax(logits: Tensor) -> int | list[int]:
    """The index of the largest entry along the last axis (the first of equals): an int for one row, a list for
    a batch of rows [B, vocab]."""
    rows = _as_numpy(logits)
    return (np.argmax(rows, axis=-1) if rows is not None else logits.argmax(-1)).tolist()


BROKEN_LOGITS = ("the model's logits hold NaN or infinity: its weights are broken (or overflow this dtype); "
                 "check the checkpoint, or load it in float32")  # fmt: skip


def check_finite(logits: Tensor) -> None:
    row = _as_numpy(logits)
    if not (np.isfinite(row).all() if row is not None else torch.isfinite(logits).all()):
        raise LLMKitError(BROKEN_LOGITS)


def sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, rng: torch.Generator) -> int:
    """Pick the next token from one row of logits: greedy at temperature 0, else drawn from `probabilities`."""
    check_finite(logits)
    if temperature == 0:
        return argmax(logits)
    return int(torch.multinomial(probabilities(logits.cpu(), temperature, top_k, top_p), 1, generator=rng))
