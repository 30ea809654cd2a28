"""Load llama.cpp's GGUF files: the model's weights (dequantized), its config and its tokenizer, from one file.

A GGUF file holds key-value metadata (the architecture's sizes, the vocabulary, merges, the chat template) and
tensors in ggml's block formats. `gguf`, llama.cpp's own Python reader, parses the file and dequantizes the
blocks; this module maps llama.cpp's names and layouts onto `llmkit.model.Transformer`:

- Two architectures: `llama` and `qwen2` (a llama with biases on q, k and v). For `llama` files llama.cpp's
  converter permutes the rows of the q and k projections so that its RoPE can rotate interleaved pairs; the model
  rotates halves, so they are permuted back (as for llama2.c and Meta files). qwen2's rows keep their order.
- ggml lists a tensor's sizes fastest-varying first, the reverse of PyTorch's order.
- The tokenizer is rebuilt on the `tokenizers` library from the vocabulary in the metadata: byte-level BPE
  (`tokenizer.ggml.model` gpt2, split into words as the pre-tokenizer named by `tokenizer.ggml.pre` does) or
  SentencePiece (llama, its merges ranked by the pieces' scores).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

from llmkit import ggml_blocks
from llmkit.checkpoint import build_model, interleaved_to_halves
from llmkit.errors import LLMKitError, first_line
from llmkit.files import check_output_path, write_file_atomically
from llmkit.model import ModelArgs, Transformer
from llmkit.tokenizer import LLAMA3_PATTERN, HuggingFaceTokenizer

# The block formats dequantized here: llama.cpp's usual float, 8-, 4- and k-quant files.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# the block formats that can stay in their blocks, as torchao tensors (llmkit.ggml_blocks)
BLOCK_TYPES = {Q.Q8_0: "q8_0", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1"}

# what `convert` writes: llama.cpp's float and basic block formats (its k-quants have no writer in `gguf`)
WRITABLE_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}

# llama.cpp's tensor name (after blk.N.) -> ours (after layers.N.)
LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}
GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4

# GPT-2's split into words, which `tokenizers`' ByteLevel applies when use_regex is on.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# tokenizer.ggml.pre -> the regular expressions llama.cpp splits text with, one after the other (llama-vocab.cpp)
PRE_TOKENIZERS = {
    "default": [GPT2_PATTERN],
    "gpt-2": [GPT2_PATTERN],
    "smollm": [r"\p{N}", GPT2_PATTERN],  # every digit alone, then GPT-2's words
    "llama-bpe": [LLAMA3_PATTERN],
    "qwen2": [LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")],  # Llama 3's split, digits one by one
}
# llama.cpp's converter interleaves the q and k rows of `llama` files for its RoPE; qwen2's keep Hugging Face's order
ARCHITECTURES = {"llama": True, "qwen2": False}  # architecture -> q/k rows interleaved


def read(path: Path) -> gguf.GGUFReader:
    """The parsed file, or one clear error for a file that is not GGUF, or is cut short or damaged."""
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # ValueError, IndexError...: the reader fails as it maps each tensor past the file's end
        raise LLMKitError(f"{path}: not a GGUF file, or a truncated one ({first_line(e)}); download it again") from None
    return reader


def metadata(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    """One metadata value as Python (str, int, float, list), or default when the file lacks it."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def model_args(reader: gguf.GGUFReader, path: Path, max_seq_len: int | None) -> ModelArgs:
    """ModelArgs from the `{architecture}.*` metadata; the vocabulary size is read off the embedding."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise LLMKitError(f"{path}: GGUF architecture {arch!r} is not supported; llmkit loads "
                          f"{' and '.join(map(repr, ARCHITECTURES))} GGUF files")  # fmt: skip

    def key(name: str, default: object = None) -> object:
        value = metadata(reader, f"{arch}.{name}", default)
        if value is None:
            raise LLMKitError(f"{path}: the GGUF metadata lacks {arch}.{name}; the file is incomplete")
        return value

    dim, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = dim // n_heads
    if key("rope.dimension_count", head_dim) != head_dim or key("attention.key_length", head_dim) != head_dim:
        raise LLMKitError(f"{path}: heads of another width than embedding_length / head_count are not supported")
    scaling = key("rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise LLMKitError(f"{path}: RoPE scaling ({scaling}, or a rope_freqs tensor) is not supported for GGUF files")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise LLMKitError(f"{path}: no token_embd.weight tensor; the file is incomplete")
    ctx = key("context_length", 2048)
    return ModelArgs(
        dim=dim, n_layers=key("block_count"), n_heads=n_heads, n_kv_heads=key("attention.head_count_kv", n_heads),
        vocab_size=int(embedding.shape[1]), hidden_dim=key("feed_forward_length"),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(key("rope.freq_base", 1e4)),
        max_seq_len=min(ctx, max_seq_len or ctx),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        qkv_bias=any(t.name == "blk.0.attn_q.bias" for t in reader.tensors),
    )  # fmt: skip


def our_name(name: str) -> str | None:
    """Our parameter name of a llama.cpp tensor name, or None for one the model has no place for."""
    base, _, suffix = name.rpartition(".")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def dequantized(tensor: gguf.ReaderTensor, path: Path) -> torch.Tensor:
    """A tensor as float32 in PyTorch's order of sizes."""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        known = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise LLMKitError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}; llmkit reads {known}")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: F32 data is a read-only map


def load_gguf_model(path: Path, reader: gguf.GGUFReader, max_seq_len: int | None = None,
                    keep: frozenset[str] = frozenset()) -> Transformer:  # fmt: skip
    """The Transformer of a llama GGUF file, every tensor dequantized to float32 but those named in `keep`
    (ours): they hold uninitialised placeholders of their shape until `keep_blocks` puts their blocks there."""
    args, interleaved = model_args(reader, path, max_seq_len), ARCHITECTURES[metadata(reader, "general.architecture")]
    state = {}
    for tensor in reader.tensors:
        name = our_name(tensor.name)
        if name is None:
            raise LLMKitError(f"{path}: tensor {tensor.name} has no place in a llama model; the file is not one")
        if name in keep:
            state[name] = torch.empty(tuple(int(d) for d in reversed(tensor.shape)))
        else:
            state[name] = in_our_row_order(dequantized(tensor, path), name, args, interleaved)
    if args.tie_embeddings:
        state["output.weight"] = state.get("tok_embeddings.weight")
    return build_model(args, state, path)


def in_our_row_order(weight: torch.Tensor, name: str, args: ModelArgs, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        return weight
    if name.endswith("attention.wq.weight"):
        return interleaved_to_halves(weight, args.n_heads)
    if name.endswith("attention.wk.weight"):
        return interleaved_to_halves(weight, args.n_kv_heads)
    return weight


def kept_in_blocks(reader: gguf.GGUFReader) -> frozenset[str]:
    """Our names of the weights that can stay in their blocks: the Q8_0, Q4_0 and Q4_1 ones, but q, k and v of a
    layer only when they share a format (the model holds them as one fused wqkv)."""
    types = {name: t.tensor_type for t in reader.tensors if t.tensor_type in BLOCK_TYPES and (name := our_name(t.name))}
    qkv = tuple(f"attention.{w}.weight" for w in ("wq", "wk", "wv"))
    keep = {name for name in types if not name.endswith(qkv)}
    for name in [n for n in types if n.endswith(qkv[0])]:
        parts = [name.replace(qkv[0], part) for part in qkv]
        if len({types.get(p) for p in parts}) == 1:
            keep.update(parts)
    return frozenset(keep)


def keep_blocks(model: Transformer, reader: gguf.GGUFReader, keep: frozenset[str]) -> None:
    """Put the file's blocks of the weights named in `keep` (`kept_in_blocks`) into the model, as torchao tensors
    (`ggml_blocks.as_torchao`); q, k and v go into the fused wqkv, and a tied output shares the embedding's."""
    blocks, interleaved = {}, ARCHITECTURES[metadata(reader, "general.architecture")]
    for tensor in reader.tensors:
        if (name := our_name(tensor.name)) in keep:
            shape = tuple(int(d) for d in reversed(tensor.shape))
            enc = ggml_blocks.from_bytes(torch.from_numpy(np.array(tensor.data)), BLOCK_TYPES[tensor.tensor_type],
                                         shape)  # fmt: skip
            blocks[name] = ggml_blocks.map_rows(
                enc, lambda rows, name=name: in_our_row_order(rows, name, model.args, interleaved)
            )
    for layer in range(model.args.n_layers):
        parts = [blocks.pop(f"layers.{layer}.attention.{w}.weight", None) for w in ("wq", "wk", "wv")]
        if all(parts):
            blocks[f"layers.{layer}.attention.wqkv.weight"] = ggml_blocks.cat_rows(parts)
    for name, enc in blocks.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        module.weight = torch.nn.Parameter(ggml_blocks.as_torchao(enc), requires_grad=False)
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


# ---- the tokenizer ---------------------------------------------------------------------------------------


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str, path: Path) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE, splitting text into words with the regular expressions of llama.cpp's `pre`."""
    if pre not in PRE_TOKENIZERS:
        raise LLMKitError(f"{path}: pre-tokenizer {pre!r} is not supported (llmkit knows {', '.join(PRE_TOKENIZERS)})")
    vocab: dict[str, int] = {}
    for id, token in enumerate(tokens):
        vocab.setdefault(token, id)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    # Llama 3's vocabulary holds whole words its merges can't reach; llama.cpp takes a word in the vocab as is.
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, pairs, ignore_merges=pre == "llama-bpe"))
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], scores: list[float], unk: int) -> tokenizers.Tokenizer:
    """A SentencePiece BPE vocabulary as `tokenizers` BPE: SentencePiece merges the pair whose joined piece scores
    best, so every piece that splits into two pieces of the vocabulary is a merge, ranked by its score."""
    vocab: dict[str, int] = {}
    for id, token in enumerate(tokens):
        vocab.setdefault(token, id)
    merges = []
    for piece, id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[id], vocab[left], vocab[right], (left, right)))
    merges.sort()
    model = tokenizers.models.BPE(vocab, [m[3] for m in merges], unk_token=tokens[unk], fuse_unk=True,
                                  byte_fallback=True)  # fmt: skip
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


class GGUFTokenizer(HuggingFaceTokenizer):
    """The tokenizer a GGUF file describes, with its BOS/EOS ids and chat template.

    bos_id is None when the file says add_bos_token is false (SmolLM2's), so encode() adds none; the template
    still writes bos_token, the text of tokenizer.ggml.bos_token_id, where it asks for it.
    """

    def __init__(self, path: Path, reader: gguf.GGUFReader):  # not super().__init__(): it reads a tokenizer.json
        self.path = path
        model = metadata(reader, "tokenizer.ggml.model")
        tokens = metadata(reader, "tokenizer.ggml.tokens")
        if model not in ("gpt2", "llama") or not tokens:
            raise LLMKitError(f"{path}: tokenizer {model!r} is not supported; llmkit reads gpt2 (BPE) and llama (SPM)")
        types = metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
        if model == "gpt2":
            merges = metadata(reader, "tokenizer.ggml.merges", [])
            self.tok = _byte_level_bpe(tokens, merges, metadata(reader, "tokenizer.ggml.pre", "default"), path)
        else:
            scores = metadata(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
            self.tok = _sentencepiece_bpe(tokens, scores, metadata(reader, "tokenizer.ggml.unknown_token_id", 0))
        # control tokens (<|im_start|>, <s>) are read whole from text, as llama.cpp parses special tokens
        self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                     for t, kind in zip(tokens, types, strict=True) if kind == CONTROL])  # fmt: skip
        self.tok.add_tokens([AddedToken(t, normalized=False)
                             for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED])  # fmt: skip
        self.vocab_size = len(tokens)
        self.added = {id: token.content for id, token in self.tok.get_added_tokens_decoder().items()}
        self.byte_level = model == "gpt2"
        bos = metadata(reader, "tokenizer.ggml.bos_token_id")
        self.bos_token = tokens[bos] if bos is not None else None
        # llama.cpp's default: SentencePiece vocabularies start with BOS, byte-level BPE ones don't
        self.bos_id = bos if metadata(reader, "tokenizer.ggml.add_bos_token", model == "llama") else None
        eos = [metadata(reader, f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot")]
        self.eos_ids = list(dict.fromkeys(id for id in eos if id is not None))
        self.eos_token = tokens[self.eos_ids[0]] if self.eos_ids else None
        self.chat_template: str | None = metadata(reader, "tokenizer.chat_template")


def load_gguf_tokenizer(path: str | Path) -> GGUFTokenizer:
    """The tokenizer of a GGUF file alone (an exported model's copy of its checkpoint's file, say)."""
    path = Path(path)
    return GGUFTokenizer(path, read(path))


def load_gguf(
    path: str | Path, max_seq_len: int | None = None, blocks: bool = False
) -> tuple[Transformer, GGUFTokenizer]:
    """The model and the tokenizer of a GGUF file; blocks=True keeps its Q8_0/Q4_0/Q4_1 weights in their blocks."""
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"checkpoint not found: {path} (check the path, or use --model with an alias)")
    reader = read(path)
    keep = kept_in_blocks(reader) if blocks else frozenset()
    if blocks and not keep:
        raise LLMKitError(f"{path}: no Q8_0, Q4_0 or Q4_1 weights to keep; drop --quantize gguf (it loads as floats)")
    model = load_gguf_model(path, reader, max_seq_len, keep)
    if keep:
        keep_blocks(model, reader, keep)
    return model, GGUFTokenizer(path, reader)


# ---- writing ---------------------------------------------------------------------------------------------


def convert(source: str | Path, target: str | Path, type: str, force: bool = False) -> Path:
    """A copy of a GGUF file whose matrices are stored as `type` (f32, f16, q8_0, q4_0 or q4_1), with gguf's writer.

    The metadata (config, tokenizer, chat template) is copied as is; each matrix is dequantized and encoded again
    by `gguf.quants.quantize`, as llama.cpp's `llama-quantize --allow-requantize` would; vectors (the norms) stay
    F32, as llama.cpp wants them. Written under a temporary name and renamed when complete.
    """
    if type not in WRITABLE_TYPES:
        raise LLMKitError(f"cannot write GGUF tensors as {type!r}; use one of {', '.join(WRITABLE_TYPES)}")
    source, target = Path(source), check_output_path(target, force)
    reader = read(source)
    qtype = WRITABLE_TYPES[type]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, metadata(reader, "general.architecture"))
        for field in reader.fields.values():  # the writer adds the architecture and the GGUF.* header itself
            if not field.name.startswith("GGUF.") and field.name != "general.architecture":
                writer.add_key_value(field.name, field.contents(), field.types[0], field.types[-1])
        for tensor in reader.tensors:
            values = dequantized(tensor, source).numpy()  # PyTorch's order: rows of the last, fastest size
            kind = qtype if values.ndim > 1 else Q.F32
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()

    return write_file_atomically(target, write)
