"""Text generation: prefill the prompt into the KV cache, then decode one token at a time.

`LLM` ties a model to its tokenizer. Its `step(tokens, input_pos) -> logits` is the one function
generation calls; compiling, AOTInductor and ExecuTorch each supply another `step` for the same
loop, so every stage of the road is measured and compared the same way.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmkit.errors import LLMKitError
from llmkit.model import Transformer
from llmkit.sampling import check_sampling, sample
from llmkit.tokenizer import Tokenizer

Step = Callable[[Tensor, Tensor], Tensor]  # (tokens [B, T], input_pos [T]) -> logits [B, T, vocab]


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds: prefill plus sampling the first new token
    decode_time: float = 0.0  # seconds spent on the new tokens after the first
    compile_time: float = 0.0  # seconds the first (compiling) calls took, before generation

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.time_to_first_token if self.time_to_first_token else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_time if self.decode_time else 0.0

    def __str__(self) -> str:
        compiled = f"compile {self.compile_time:.1f} s (first calls) | " if self.compile_time else ""
        return compiled + (
            f"{self.prompt_tokens} prompt + {self.new_tokens} new tokens | "
            f"time to first token {self.time_to_first_token * 1000:.1f} ms | "
            f"prefill {self.prefill_tokens_per_s:.1f} tok/s | decode {self.decode_tokens_per_s:.1f} tok/s"
        )


@dataclass
class Generation:
    text: str = ""
    tokens: list[int] = field(default_factory=list)  # the new tokens, without the prompt
    stats: Stats = field(default_factory=Stats)


class StreamDecoder:
    """Turns generated ids, one at a time, into the text to print.

    Decoding each id alone is wrong twice over: SentencePiece drops the leading space of the first piece it
    decodes, and one character can be split over several byte tokens. So push() decodes the ids with a few
    ids of context before them (the prompt's at first), with and without the ids not yet printed, and returns
    the difference; while that ends in U+FFFD, an incomplete UTF-8 character, it returns "" and waits.
    The context window moves along, so each push costs the same however long the text gets (the
    "prefix/read offset" scheme of Hugging Face's text-generation-inference and vLLM).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.printed = len(self.ids)  # ids[:printed] are already printed (or are the prompt)
        self.context = max(0, self.printed - 5)  # decode from here: enough for the spaces to come out right

    def push(self, id: int) -> str:
        self.ids.append(id)
        before = self.tokenizer.decode(self.ids[self.context : self.printed])
        after = self.tokenizer.decode(self.ids[self.context :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.context, self.printed = self.printed, len(self.ids)
        return after[len(before) :]


class LLM:
    """A tokenizer and the step function that runs the model: eager, compiled, AOTI or ExecuTorch.

    `model` is the eager `Transformer` where there is one (an exported program has none).
    """

    def __init__(self, model: Transformer | None, tokenizer: Tokenizer | None, name: str = "model",
                 step: Step | None = None, max_seq_len: int | None = None, device: str | None = None,
                 metadata: dict | None = None, buffers: dict[str, Tensor] | None = None):  # fmt: skip
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.step: Step = step if step is not None else model
        self.max_seq_len: int = max_seq_len or model.args.max_seq_len
        self.device = torch.device(device) if device else model.tok_embeddings.weight.device
        self.compile_time = 0.0  # seconds the first, compiling calls took (llmkit.compile)
        self.compile_fallback: str | None = None  # why torch.compile failed, so that the step runs eager
        self.scheme: str | None = None  # the quantization scheme applied, as torchchat JSON (llmkit.quantize)
        self.metadata: dict = metadata or {}  # what an exported package or program says of itself
        self.buffers: dict[str, Tensor] = buffers or {}  # tensors the step's compiled code points at: kept alive here

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str) and not prompt.isascii():
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:  # bytes that were not UTF-8, kept by Python as lone surrogates
                raise LLMKitError("the prompt is not valid UTF-8 text; convert it to UTF-8 first") from None
        ids = self.tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
        if len(ids) >= self.max_seq_len:
            raise LLMKitError(
                f"the prompt is {len(ids)} tokens but the context holds {self.max_seq_len}; shorten the prompt"
            )
        return ids

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[int] = "",
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continue the prompt; `on_text` receives the text as it is produced (streaming).

        Stops at an end-of-sequence token, a stop string, `max_new_tokens` or the end of the context.
        """
        check_sampling(temperature, top_k, top_p, max_new_tokens, stop, seed)
        ids = self.encode_prompt(prompt)
        rng = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        stop_ids = set(self.tokenizer.eos_ids)
        stream = StreamDecoder(self.tokenizer, ids)
        out = Generation(stats=Stats(prompt_tokens=len(ids), compile_time=self.compile_time))
        device = self.device
        max_new_tokens = min(max_new_tokens, self.max_seq_len - len(ids))

        start = time.perf_counter()
        tokens = torch.tensor([ids], device=device)
        logits = self.step(tokens, torch.arange(len(ids), device=device))
        for pos in range(len(ids), len(ids) + max_new_tokens):
            # a model's vocabulary may be padded past its tokenizer's: those ids have no text
            token = sample(logits[0, -1, : self.tokenizer.vocab_size], temperature, top_k, top_p, rng)
            now = time.perf_counter()
            if not out.tokens:
                out.stats.time_to_first_token = now - start
                decode_start = now
            if token in stop_ids:
                break
            out.tokens.append(token)
            piece = stream.push(token)
            out.text += piece
            if stop and any(s in out.text for s in stop):
                out.text = out.text[: min(out.text.find(s) for s in stop if s in out.text)]
                break
            if on_text and piece:
                on_text(piece)
            if pos + 1 < len(ids) + max_new_tokens:
                logits = self.step(torch.tensor([[token]], device=device), torch.tensor([pos], device=device))
        out.stats.new_tokens = len(out.tokens)
        if out.tokens:
            out.stats.decode_time = time.perf_counter() - decode_start
        return out
