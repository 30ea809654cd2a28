"""Judging a model: perplexity on a text, and agreement with a reference model's greedy tokens.

Perplexity is how surprised a model is by a text, exp(mean negative log-likelihood per token).

The text is split into paragraphs (blank-line separated); each is encoded with BOS, as the kit's
model was trained, and the tokens are concatenated and cut into non-overlapping windows of
`seq_len`. Each window is scored on its own, from scratch: the model predicts tokens 1..N-1 of
the window from those before them, so every token but each window's first is counted once.
A unigram model (token frequencies, no context) gives the baseline to beat.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from llmkit.data import encode, paragraphs
from llmkit.errors import LLMKitError
from llmkit.generate import LLM


@dataclass(frozen=True)
class Perplexity:
    value: float
    n_tokens: int  # tokens predicted (and so scored)

    def __str__(self) -> str:
        return f"perplexity {self.value:.3f} over {self.n_tokens} tokens"


def read_text(path: str | Path) -> str:
    """A UTF-8 text file to score, refused if missing, unreadable or without a paragraph of text."""
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"text file not found: {path} (give a UTF-8 text file with --text)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LLMKitError(f"{path} is not UTF-8 text; convert it to UTF-8 first") from None
    if not paragraphs(text):
        raise LLMKitError(f"{path} is empty: give a text with at least one paragraph")
    return text


def check_seq_len(seq_len: int, max_seq_len: int | None) -> None:
    if seq_len < 2:
        raise LLMKitError(f"seq-len {seq_len} is too short: a window needs 2 tokens; use 2 or more")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise LLMKitError(f"seq-len {seq_len} exceeds the model's context of {max_seq_len}; use at most that")


def windows(ids: Tensor, seq_len: int) -> list[Tensor]:
    """Non-overlapping windows of seq_len tokens; a last one too short to predict anything is dropped."""
    return [w for w in ids.split(seq_len) if len(w) >= 2]


@torch.no_grad()
def score_ids(model, ids: Tensor, seq_len: int, device: str | torch.device = "cpu", batch_size: int = 16,
              progress: bool = True) -> Perplexity:  # fmt: skip
    """Perplexity of a token stream: full windows go through the model in batches, a shorter last alone."""
    chunks = windows(ids, seq_len)
    full = [w for w in chunks if len(w) == seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in chunks if len(w) < seq_len]
    nll, n = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(batch[:, :-1]).float()
        nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        n += batch[:, 1:].numel()
    return Perplexity(math.exp(nll / n), n)


def perplexity(llm, text: str, seq_len: int = 256, batch_size: int = 16) -> Perplexity:
    """Perplexity of `llm` (with .model, .tokenizer and .device) on blank-line-separated paragraphs."""
    check_seq_len(seq_len, getattr(getattr(llm.model, "args", None), "max_seq_len", None))
    if not paragraphs(text):
        raise LLMKitError("the text is empty: give at least one paragraph of text to score")
    ids = torch.from_numpy(encode(text, llm.tokenizer).astype(np.int64))
    return score_ids(llm.model, ids, seq_len, llm.device, batch_size)


def unigram_perplexity_of_ids(train_ids: np.ndarray, heldout_ids: np.ndarray, vocab_size: int) -> Perplexity:
    """Add-one smoothed token frequencies of the training ids, scored on every held-out token."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return Perplexity(float(np.exp(-log_p[heldout_ids].mean())), len(heldout_ids))


def unigram_perplexity(tokenizer, train_text: str, heldout_text: str) -> Perplexity:
    """The no-context baseline: a model must beat this by far to have learnt anything about order."""
    train_ids, heldout_ids = encode(train_text, tokenizer), encode(heldout_text, tokenizer)
    return unigram_perplexity_of_ids(train_ids, heldout_ids, tokenizer.vocab_size)


@dataclass(frozen=True)
class Agreement:
    top1: float  # fraction of the reference's greedy tokens that the model also ranks first, fed the same text
    identical: bool  # the model's own greedy continuation is the reference's, token for token
    first_difference: int | None  # the index of the first new token where the two part; None when identical


@torch.inference_mode()
def greedy_choices(llm: LLM, prompt_ids: Sequence[int], tokens: Sequence[int]) -> list[int]:
    """The model's greedy choice after the prompt and after each of `tokens` but the last.

    The tokens go through `llm.step` as generation feeds them (the prompt in one call, then one token a call
    through the KV cache), so the choices are those `llm.generate` would make, for any way of running the model.
    """
    device = llm.device
    logits = llm.step(torch.tensor([list(prompt_ids)], device=device), torch.arange(len(prompt_ids), device=device))
    picks = [int(logits[0, -1].argmax())]
    for pos, token in enumerate(tokens[:-1], start=len(prompt_ids)):
        logits = llm.step(torch.tensor([[token]], device=device), torch.tensor([pos], device=device))
        picks.append(int(logits[0, -1].argmax()))
    return picks


def agreement(llm: LLM, prompt: str | Sequence[int], reference: Sequence[int]) -> Agreement:
    """How closely `llm` follows `reference`, a float model's greedy tokens after `prompt`.

    The model is fed the reference's tokens and its greedy choice is compared at each position. Until the
    first position where it picks another token, its inputs are its own greedy generation's, so that position
    is also where its greedy continuation parts from the reference's.
    """
    if not reference:
        raise LLMKitError("the reference has no tokens to agree with; generate at least one token")
    picks = greedy_choices(llm, llm.encode_prompt(prompt), reference)
    first = next((i for i, (a, b) in enumerate(zip(picks, reference, strict=True)) if a != b), None)
    return Agreement(sum(a == b for a, b in zip(picks, reference, strict=True)) / len(reference), first is None, first)
