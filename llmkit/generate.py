"""Text generation: prefill the prompt into the KV cache, then decode one token at a time.

`LLM` ties a model to its tokenizer. Its `step(tokens, input_pos) -> logits` is the one function
generation calls; compiling, AOTInductor and ExecuTorch each supply another `step` for the same
loop, so every stage of the road is measured and compared the same way.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llmkit.errors import LLMKitError
from llmkit.model import Transformer
from llmkit.tokenizer import StreamDecoder, Tokenizer

Step = Callable[[Tensor, Tensor], Tensor]


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


def sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, rng: torch.Generator) -> int:
    """Pick the next token from one row of logits: greedy at temperature 0, else from the
    temperature-scaled distribution cut to the top k tokens and to the top-p probability mass."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # mass before this token already > p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=rng))


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise LLMKitError(f"temperature must be 0 (greedy) or more, not {temperature}")
    if top_k is not None and top_k < 1:
        raise LLMKitError(f"top-k must be at least 1, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LLMKitError(f"top-p must be in (0, 1], not {top_p}")
    if max_new_tokens < 1:
        raise LLMKitError(f"max-new-tokens must be at least 1, not {max_new_tokens}")


class LLM:
    """A tokenizer and the step function that runs the model: eager, compiled, AOTI or ExecuTorch.

    `model` is the eager `Transformer` where there is one (an exported program has none).
    """

    def __init__(self, model: Transformer | None, tokenizer: Tokenizer, name: str = "model",
                 step: Step | None = None, max_seq_len: int | None = None, device: str | None = None):  # fmt: skip
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.step: Step = step if step is not None else model
        self.compile_time = 0.0  # set by llmkit.compile
        self.scheme: str | None = None  # set by llmkit.quantize
        self.max_seq_len = max_seq_len or model.args.max_seq_len
        self.device = torch.device(device) if device else model.tok_embeddings.weight.device

    def chat(self, messages: Sequence[dict[str, str]], **options) -> Generation:
        """Reply to a conversation in the model's chat format; see llmkit.chat.chat for the options."""
        from llmkit.chat import chat

        return chat(self, messages, **options)

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
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
        check_sampling(temperature, top_k, top_p, max_new_tokens)
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
            token = sample(logits[0, -1], temperature, top_k, top_p, rng)
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_MODEL = DATA_DIR / "pydoc-lm"


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


def load(
    checkpoint: str | Path = "default",
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    max_seq_len: int | None = 2048,
) -> LLM:
    """Load a checkpoint (file, folder, or "default" for the kit's own model) and its tokenizer.

    The tokenizer is looked for beside the checkpoint unless given. `max_seq_len` caps the context
    (and so the KV cache and mask memory) of models trained for very long ones.
    """
    from llmkit.checkpoint import load_checkpoint
    from llmkit.tokenizer import find_tokenizer, load_tokenizer

    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    path = DEFAULT_MODEL if str(checkpoint) == "default" else Path(checkpoint)
    model = load_checkpoint(path, max_seq_len=max_seq_len)
    if tokenizer is None:
        tokenizer = find_tokenizer(path if path.is_dir() else path.parent)
        if tokenizer is None:
            raise LLMKitError(f"no tokenizer found beside {path}; pass --tokenizer-path")
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.args.vocab_size:
        raise LLMKitError(
            f"the tokenizer {tokenizer} has {tok.vocab_size} tokens but the model knows {model.args.vocab_size}: "
            "it is not this model's tokenizer; pass the right --tokenizer-path"
        )
    model = model.to(device=torch_device, dtype=torch_dtype)
    model.setup_buffers()
    return LLM(model, tok, name=path.stem if path.is_file() else path.name)
