"""A Llama-family decoder in one file, in the style of gpt-fast's model.py.

One definition serves Llama 2, Llama 3.x, Qwen2, SmolLM and llama2.c's TinyStories models:
RMSNorm, rotary position embeddings (RoPE, "halves" layout as in Hugging Face files),
grouped-query attention through `scaled_dot_product_attention`, a SwiGLU MLP and a static
KV cache: preallocated buffers updated in place, so decoding is one token at a time.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.errors import LLMKitError


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouping)
    vocab_size: int = 32000
    hidden_dim: int = 768  # width of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1: factor, low_freq_factor, high_freq_factor, original_max_...
    max_seq_len: int = 2048  # length of the KV cache, and so of the context
    tie_embeddings: bool = False  # the output layer reuses the token embedding matrix
    qkv_bias: bool = False  # Qwen2 has biases on the q, k and v projections

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        sizes = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len")
        bad = [f"{name}={getattr(self, name)!r}" for name in sizes
               if type(getattr(self, name)) is not int or getattr(self, name) < 1]  # fmt: skip
        if bad:
            raise LLMKitError(f"the model's config has sizes that are not positive integers ({', '.join(bad)})")
        numbers = {name: getattr(self, name) for name in ("norm_eps", "rope_theta")}
        bad = [f"{k}={v!r}" for k, v in numbers.items() if not isinstance(v, int | float) or not 0 < v < float("inf")]
        if bad:
            raise LLMKitError(f"the model's config has numbers that must be positive and finite ({', '.join(bad)})")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise LLMKitError(
                f"the model's config does not fit together: dim ({self.dim}) must divide into n_heads "
                f"({self.n_heads}) heads of an even size, and n_heads into n_kv_heads ({self.n_kv_heads}) groups"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> Tensor:
    """The rotation speed of each pair of head dimensions, with Llama 3.1's long-context scaling."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    if s:  # Llama 3.1: slow down low frequencies, keep high ones, blend in between
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = ((old_len / wavelen) - low) / (high - low)
        blended = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = torch.where(wavelen > old_len / low, freqs / factor, freqs)
        freqs = torch.where((wavelen >= old_len / high) & (wavelen <= old_len / low), blended, freqs)
    return freqs


def rope_cache(args: ModelArgs) -> tuple[Tensor, Tensor]:
    """cos and sin of every position's angle, shape [max_seq_len, head_dim] (halves layout)."""
    t = torch.arange(args.max_seq_len, dtype=torch.float64)
    angles = torch.outer(t, rope_frequencies(args))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (i, i + head_dim/2) pair of x [B, H, T, D] by its position's angle."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)


class KVCache(nn.Module):
    """Keys and values of every position so far, in preallocated [B, H_kv, max_seq_len, D] buffers.

    `n_kv_heads` is the model's unless given: an attention split over devices caches only its own heads.
    """

    def __init__(self, args: ModelArgs, max_batch_size: int = 1, dtype: torch.dtype = torch.float32,
                 n_kv_heads: int | None = None):  # fmt: skip
        super().__init__()
        shape = (max_batch_size, n_kv_heads or args.n_kv_heads, args.max_seq_len, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, first_row: int = 0) -> tuple[Tensor, Tensor]:
        """Write k and v [B, H_kv, T, D] at their positions; return the cache rows the batch attends to.

        input_pos [T]: every row at the same positions, and the batch fills the cache (one request, or an export).
        input_pos [B, T]: each row at its own positions, in the cache's rows from `first_row` on (a server's).
        """
        if input_pos.dim() == 1:
            self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
            self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
            return self.k_cache, self.v_cache
        B = k.shape[0]
        rows = torch.arange(first_row, first_row + B, device=k.device)[:, None]
        # indexing [rows, :, input_pos] selects [B, T, H_kv, D]: the heads move behind the positions. Written
        # into the whole buffer, not a view of its first B rows: compiled with B dynamic, a write into the view
        # becomes a copy of those rows out and back, every row's whole cache at every step
        self.k_cache[rows, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[rows, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache[first_row : first_row + B], self.v_cache[first_row : first_row + B]


class Rows(NamedTuple):
    """A block of rows in a step of several (`Transformer.forward_blocks`): positions [B, T], RoPE, mask."""

    input_pos: Tensor
    cos: Tensor
    sin: Tensor
    mask: Tensor


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.qkv_sizes = [args.dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim]
        # q, k and v in one matrix: decoding reads it in one product instead of three
        self.wqkv = nn.Linear(args.dim, sum(self.qkv_sizes), bias=args.qkv_bias)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.kv_cache = KVCache(args)
        self.register_load_state_dict_pre_hook(join_qkv)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None):
        return self.wo(self.concat_heads(self.wqkv(x), cos, sin, mask, input_pos))

    def forward_blocks(self, x: Tensor, blocks: Sequence[Rows]) -> Tensor:
        """x [1, N, dim]: the blocks' tokens one after another, block i in the cache rows after block i - 1's.
        The products take all N tokens at once; attention runs per block."""
        qkv, out, start, first_row = self.wqkv(x)[0], [], 0, 0
        for rows in blocks:
            B, T = rows.input_pos.shape
            part = qkv[start : start + B * T].view(B, T, -1)
            out.append(self.concat_heads(part, rows.cos, rows.sin, rows.mask, rows.input_pos, first_row).flatten(0, 1))
            start, first_row = start + B * T, first_row + B
        return self.wo(torch.cat(out)[None])

    def concat_heads(self, qkv: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None,
                     first_row: int = 0) -> Tensor:  # fmt: skip
        """Every head's attention for tokens [B, T] from their projections `qkv`, side by side: the paper's
        Concat(head_1, ..., head_h) before W^O, [B, T, dim]."""
        B, T, _ = qkv.shape
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:  # decoding: attend to the whole cache, masked to the past
            k, v = self.kv_cache.update(input_pos, k, v, first_row)
            k, v = k.to(q.dtype), v.to(q.dtype)
            # as many positions as the mask has: all, or the cache's first `cache_len`
            width = mask.shape[-1]
            if isinstance(width, torch.SymInt):  # a length given as a graph input (llmkit.aoti's decode window):
                window = torch.arange(width, device=k.device)  # gathered, as a slice's layout would depend on it
                k, v = k.index_select(2, window), v.index_select(2, window)
            else:
                k, v = k[:, :, :width], v[:, :, :width]
        return attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of q [B, H, T, D] to k, v [B, H_kv, S, D] under mask (causal where there is none)."""
    if mask is not None and k.shape[1] != q.shape[1]:
        return grouped_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])  # fmt: skip


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of q [B, H, T, D] to k, v [B, H_kv, S, D], H = g * H_kv, under mask [B or 1, 1, T, S].

    Query heads j*g ... j*g + g-1 share key/value head j: their queries are stacked as g*T rows of head j, so
    each cached key and value is read once. SDPA's `enable_gqa` with a mask repeats the cache g times instead:
    with a batch of requests that copy, not the weights, was most of a decode step's bytes.
    """
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    g = H // H_kv
    # unflatten/flatten rather than reshape: export then needs no guard on the length T
    y = F.scaled_dot_product_attention(q.unflatten(1, (H_kv, g)).flatten(2, 3), k, v, attn_mask=mask.repeat(1, 1, g, 1))
    return y.unflatten(2, (g, T)).flatten(1, 2)


def join_qkv(attention: Attention, state: dict, prefix: str, *_) -> None:
    """Checkpoints keep wq, wk and wv apart; load them as the one wqkv matrix the model multiplies by."""
    for kind in ("weight", "bias"):
        names = [f"{prefix}{w}.{kind}" for w in ("wq", "wk", "wv")]
        if all(name in state for name in names):  # else strict loading names what is missing
            state[f"{prefix}wqkv.{kind}"] = torch.cat([state.pop(name) for name in names])


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_blocks(self, x: Tensor, blocks: Sequence[Rows]) -> Tensor:
        h = x + self.attention.forward_blocks(self.attention_norm(x), blocks)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.setup_buffers()

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, cache_len: int | None = None,
                layer_step: Callable[..., Tensor] | None = None) -> Tensor:  # fmt: skip
        """Logits [B, T, vocab] for tokens [B, T].

        With `input_pos` (a LongTensor) keys and values go into the KV cache and each token attends to
        every cached position before it: prefill, then one-token decode. `input_pos` [T] puts every row
        at the same positions; [B, T] gives each row its own, so one decode step can run requests of
        different lengths together (continuous batching, llmkit.engine).
        Without it the sequence is scored on its own, causally, with no cache (training, perplexity).
        `cache_len` (above every position in `input_pos`) has the tokens attend to the cache's first positions
        only, not all max_seq_len of them: a server's requests use a small part of the context.
        `layer_step(layer, x, cos, sin, mask, input_pos)`, if given, runs each layer (`compile_layer_rows`'s
        compiled layer).
        """
        T = tokens.shape[1]
        if input_pos is None:
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            cos, sin, mask = self.rope_and_mask(input_pos, cache_len)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos) if layer_step is None else layer_step(layer, x, cos, sin, mask,
                                                                                             input_pos)  # fmt: skip
        return self.output(self.norm(x))

    def forward_blocks(
        self,
        blocks: Sequence[tuple[Tensor, Tensor]],
        cache_len: int | None = None,
        layer_step: Callable[..., Tensor] = TransformerBlock.forward_blocks,
    ) -> list[Tensor]:
        """Logits [B_i, T_i, vocab] for blocks of (tokens, positions) [B_i, T_i] in one pass, block i in the
        cache rows after block i - 1's: a server's step, the running requests' next tokens [B, 1] with arriving
        prompts [n, T]. The matrix products take every block's tokens at once, reading the weights once.
        `layer_step(layer, x, rows)` runs each layer (`compile_batched_prefill` passes one layer's compiled step)."""
        rows = [Rows(pos, *self.rope_and_mask(pos, cache_len)) for _, pos in blocks]
        x = self.tok_embeddings(torch.cat([tokens.flatten() for tokens, _ in blocks]))[None]
        for layer in self.layers:
            x = layer_step(layer, x, rows)
        logits = self.output(self.norm(x))[0]
        sizes = [tokens.numel() for tokens, _ in blocks]
        return [part.view(*tokens.shape, -1) for part, (tokens, _) in zip(logits.split(sizes), blocks, strict=True)]

    def rope_and_mask(self, input_pos: Tensor, cache_len: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE's cos and sin and the causal mask at these positions, shaped to broadcast over the heads."""
        # [T, D] and [T, S], or per row [B, T, D] and [B, T, S]: each needs a head dimension before T
        cos, sin, mask = self.rope_cos[input_pos], self.rope_sin[input_pos], self.causal_mask[input_pos]
        mask = mask if cache_len is None else mask[..., :cache_len]
        if input_pos.dim() == 2:
            return cos[:, None], sin[:, None], mask[:, None]
        return cos, sin, mask[None, None]

    def setup_buffers(self, max_batch_size: int = 1) -> None:
        """(Re)build the RoPE tables, the causal mask and empty KV caches of `max_batch_size` rows on the
        weights' device.

        Called after moving the model to another device or dtype, or loading it on the meta device.
        """
        args, w = self.args, self.tok_embeddings.weight
        device = w.device
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        cos, sin = rope_cache(args)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        causal = torch.tril(torch.ones(args.max_seq_len, args.max_seq_len, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(args, max_batch_size, dtype, layer.attention.n_kv_heads).to(device)


# Architectures of well-known models, to measure speed with random weights and no download.
SHAPES = {
    "stories15M": ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, hidden_dim=768),
    "stories110M": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048),
    "llama-3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                              rope_theta=500000.0, tie_embeddings=True),  # fmt: skip
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008),
    "llama-3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                            rope_theta=500000.0),  # fmt: skip
}


def shape_args(name: str, max_seq_len: int) -> ModelArgs:
    """The arguments of a known architecture (`SHAPES`) with the context cut to `max_seq_len`."""
    if name not in SHAPES:
        raise LLMKitError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    return ModelArgs(**{**SHAPES[name].to_dict(), "max_seq_len": max_seq_len})


def random_model(args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, std: float = 0.02) -> Transformer:  # fmt: skip
    """A model of the given shape with small random weights, built directly on the device."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    model = model.to(dtype).eval()
    model.setup_buffers()
    return model
