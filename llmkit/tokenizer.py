"""One interface over the four tokenizer files a checkpoint folder can hold.

    llama2c        tokenizer.bin / tok*.bin   llama2.c's export, encoded in pure Python exactly as run.c does
    sentencepiece  tokenizer.model            Llama 2, Mistral, TinyLlama (protobuf, via `sentencepiece`)
    huggingface    tokenizer.json             most Hugging Face repos (via `tokenizers`)
    tiktoken       tokenizer.model            Llama 3 (base64 "token rank" lines, via `tiktoken`)

`load_tokenizer(path)` picks the kind from the file's content.
"""

from __future__ import annotations

import abc
import base64
import heapq
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import sentencepiece
import tiktoken
import tokenizers

from llmkit.errors import LLMKitError
from llmkit.files import read_json_object


class Tokenizer(abc.ABC):
    """What the rest of llmkit needs from a tokenizer: text <-> ids, and where generation stops."""

    bos_id: int | None  # prepended by encode(bos=True); None when the model has no BOS
    eos_ids: list[int]  # generation stops at any of these
    vocab_size: int
    kind: str  # "llama2c" | "sentencepiece" | "huggingface" | "tiktoken"
    path: Path

    @abc.abstractmethod
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of text, with bos_id first when bos is true (and the model has one)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids. BOS/EOS and other special tokens print nothing, as in the model's own decoder."""

    @abc.abstractmethod
    def piece(self, id: int) -> str:
        """The token's own text, to show tokens one by one: spaces kept, special tokens by name, and bytes
        that are not a whole UTF-8 character as <0xXX>."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} vocab_size={self.vocab_size} path={str(self.path)!r}>"


def _show_bytes(data: bytes) -> str:
    """Text of a token's bytes, or <0xXX> for each byte when they are not whole UTF-8 characters."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in data)


# ----------------------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


def _read_llama2c(path: Path) -> tuple[int, list[bytes], list[float]]:
    """Parse tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, bytes.

    The file does not store the vocab size (run.c takes it from the model), so tokens are read to the end.
    A cut that falls exactly between two tokens cannot be seen here, only a cut inside one.
    """
    data = path.read_bytes()
    redo = "re-download it or re-export it with llama2.c's tokenizer.py"
    if len(data) < 4:
        raise LLMKitError(f"{path} is truncated ({len(data)} bytes, not even a header); {redo}")
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_token_length < 65536:
        raise LLMKitError(
            f"{path} is not a llama2.c tokenizer.bin (max_token_length {max_token_length}); "
            "pass a tokenizer.bin, tokenizer.model or tokenizer.json"
        )
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise LLMKitError(f"{path} is truncated inside token {len(pieces)}; {redo}")
        score, length = struct.unpack_from("<fi", data, offset)
        if not 0 <= length <= max_token_length:
            raise LLMKitError(
                f"{path} is corrupt or not a llama2.c tokenizer.bin (token {len(pieces)} has length {length}, "
                f"max_token_length is {max_token_length}); {redo}"
            )
        if offset + 8 + length > len(data):
            raise LLMKitError(f"{path} is truncated inside token {len(pieces)}; {redo}")
        pieces.append(data[offset + 8 : offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    if len(pieces) < 259 or pieces[3] != b"<0x00>":
        raise LLMKitError(
            f"{path} is not a complete llama2.c tokenizer.bin ({len(pieces)} tokens; expected <unk>, <s>, </s> "
            f"and the 256 byte tokens first); {redo}"
        )
    return max_token_length, pieces, scores


class Llama2cTokenizer(Tokenizer):
    """llama2.c's tokenizer.bin, encoded and decoded exactly as run.c's encode() and decode() do.

    BOS is 1 and EOS is 2, but eos_ids is [2, 1]: run.c's generate loop stops at BOS, because the
    TinyStories models start the next story with BOS rather than ending this one with EOS.
    """

    kind = "llama2c"

    def __init__(self, path: Path):
        self.path = path
        self.max_token_length, self.pieces, self.scores = _read_llama2c(path)
        self.ids: dict[bytes, int] = {}  # piece -> id; the first one if a piece repeats
        for id, piece in enumerate(self.pieces):
            self.ids.setdefault(piece, id)
        self.vocab_size = len(self.pieces)
        self.bos_id = 1
        self.eos_ids = [2, 1]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        tokens = [self.bos_id] if bos else []
        if text:  # SentencePiece's add_dummy_prefix, only for non-empty text (as run.c)
            tokens.append(self.ids[b" "])
        for char in text:
            tokens += self._char_ids(char)
        return self._merge(tokens)

    def _char_ids(self, char: str) -> list[int]:
        """The codepoint's token, or one token per UTF-8 byte when the vocab lacks it (byte fallback)."""
        utf8 = char.encode("utf-8", errors="surrogatepass")
        if utf8 in self.ids:
            return [self.ids[utf8]]
        return [byte + 3 for byte in utf8]  # <0x00> is id 3, after <unk>, <s>, </s>

    def _merge(self, tokens: list[int]) -> list[int]:
        """run.c's loop (best-scoring adjacent pair first, the first on a tie) on a heap: rescans were quadratic."""
        n = len(tokens)
        left, right, alive, heap = list(range(-1, n)), list(range(1, n + 1)), [True] * n, []  # left[n]: past the end

        def push(i: int) -> None:  # the pair of token i and the one after it, if the vocab has their merge
            j = right[i] if i >= 0 else n
            if j < n and (id := self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[j]])) is not None:
                heapq.heappush(heap, (-self.scores[id], i, tokens[i], tokens[j], j, id))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b, j, id = heapq.heappop(heap)
            if alive[i] and right[i] == j and (tokens[i], tokens[j]) == (a, b):  # else one of them merged since
                tokens[i], alive[j], right[i] = id, False, right[j]
                left[right[j]] = i
                push(left[i])
                push(i)
        return [t for t, keep in zip(tokens, alive, strict=True) if keep]

    def decode(self, ids: Sequence[int]) -> str:
        data = b"".join(self._piece_bytes(prev, id) for prev, id in zip([None, *ids], ids, strict=False))
        return data.decode("utf-8", errors="replace")

    def _piece_bytes(self, prev: int | None, id: int) -> bytes:
        """run.c's decode(prev_token, token): no leading space right after BOS, <0xXX> is a raw byte.

        BOS and EOS (exported as "\\n<s>\\n" and "\\n</s>\\n") give nothing: run.c stops before printing them.
        """
        if id in (1, 2):
            return b""
        piece = self.pieces[id]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if match := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(match[1], 16)])
        return piece

    def piece(self, id: int) -> str:
        return self.pieces[id].strip().decode() if id in (1, 2) else _show_bytes(self.pieces[id])


# ----------------------------------------------------------------------------------------------------------
# SentencePiece tokenizer.model


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Llama 2, Mistral, TinyLlama); BOS and EOS come from the model itself."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        self.path = path
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises RuntimeError or OSError with a C++ message
            raise LLMKitError(
                f"{path} is neither a SentencePiece model nor a tiktoken file ({str(e).strip()}); "
                "pass a tokenizer.model, tokenizer.json or tokenizer.bin"
            ) from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []

    def encode(self, text: str, bos: bool = True) -> list[int]:
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        return prefix + self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def piece(self, id: int) -> str:
        text = self.sp.id_to_piece(id)
        return text if self.sp.is_byte(id) or self.sp.is_control(id) else text.replace("\u2581", " ")


# ----------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character; this maps them back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


_BYTE_LEVEL_CHARS = _byte_level_chars()


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json; BOS/EOS from the config files beside it.

    bos_id: tokenizer_config.json's bos_token (null there means no BOS, as for Qwen), else config.json or
    generation_config.json's bos_token_id, else the token the post-processor puts first.
    eos_ids: generation_config.json's eos_token_id (often a list), then config.json's, then
    tokenizer_config.json's eos_token.
    """

    kind = "huggingface"

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception with serde's message
            raise LLMKitError(f"{path} is not a Hugging Face tokenizer.json ({e}); pass a valid one") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.added = {id: token.content for id, token in self.tok.get_added_tokens_decoder().items()}
        self.byte_level = "ByteLevel" in repr(self.tok.decoder)
        self.bos_id, self.eos_ids = self._special_ids(path.parent)

    def _special_ids(self, folder: Path) -> tuple[int | None, list[int]]:
        configs = [read_json_object(folder / name, "tokenizer", optional=True)
                   for name in ("tokenizer_config.json", "config.json", "generation_config.json")]  # fmt: skip
        tokenizer_config, config, generation_config = configs
        if "bos_token" in tokenizer_config:
            bos = self._token_id(tokenizer_config["bos_token"])
        else:
            bos = config.get("bos_token_id", generation_config.get("bos_token_id"))
            bos = self._post_processor_bos() if bos is None else bos
        eos = [
            *_as_list(generation_config.get("eos_token_id")),
            *_as_list(config.get("eos_token_id")),
            self._token_id(tokenizer_config.get("eos_token")),
        ]
        return bos, list(dict.fromkeys(id for id in eos if id is not None))

    def _token_id(self, token: str | dict | None) -> int | None:
        """Id of a token as tokenizer_config.json names it: a string, or an AddedToken dict."""
        if isinstance(token, dict):
            token = token.get("content")
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def _post_processor_bos(self) -> int | None:
        """The id the post-processor puts before the text, if it adds one (a TemplateProcessing "<s> $A")."""
        with_special = self.tok.encode("a").ids
        plain = self.tok.encode("a", add_special_tokens=False).ids
        return with_special[0] if with_special[:1] != plain[:1] and with_special[0] in self.added else None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        # Without add_special_tokens, so a post-processor that adds BOS itself cannot add a second one.
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        return prefix + self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def piece(self, id: int) -> str:
        if id in self.added:
            return self.added[id]
        token = self.tok.id_to_token(id) or ""
        if self.byte_level and all(char in _BYTE_LEVEL_CHARS for char in token):
            return _show_bytes(bytes(_BYTE_LEVEL_CHARS[char] for char in token))
        return token.replace("\u2581", " ")  # SentencePiece-style vocab (Llama 2, Gemma) writes spaces as ▁


# ----------------------------------------------------------------------------------------------------------
# tiktoken tokenizer.model (Llama 3)

# Llama 3's pre-tokenizer split (from Meta's llama3 tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# The 256 special tokens after the ranks (128000 onwards in Llama 3), as Meta's llama-models names them.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - 11 + 2)]

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def _looks_like_tiktoken(head: bytes) -> bool:
    """Whether a file's first bytes are tiktoken's base64 "token rank" lines (a protobuf never is)."""
    lines = head.split(b"\n")[:-1][:4]  # complete lines only
    return bool(lines) and all(_TIKTOKEN_LINE.fullmatch(line.rstrip(b"\r")) for line in lines)


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse the "base64-token rank" lines. (tiktoken's load_tiktoken_bpe would also do it, but it keeps a
    copy of the file in /tmp/data-gym-cache keyed by the path, and returns that copy if the file changes.)"""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # also binascii.Error
            raise LLMKitError(
                f"{path} line {number} is not a tiktoken 'base64-token rank' line; the file is corrupt, re-download it"
            ) from None
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tiktoken tokenizer.model: the ranks from the file, Llama 3's pattern and special tokens.

    Special-token text in the input (e.g. "<|eot_id|>") encodes as that token, as Llama 3's
    tokenizer.json does, so a chat template written as text works.
    """

    kind = "tiktoken"

    def __init__(self, path: Path):
        self.path = path
        ranks = _read_tiktoken_ranks(path)
        self.n_ranks = len(ranks)
        special = {token: self.n_ranks + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )
        self.vocab_size = self.n_ranks + len(special)
        self.bos_id = special["<|begin_of_text|>"]
        self.eos_ids = [special["<|end_of_text|>"], special["<|eot_id|>"]]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        prefix = [self.bos_id] if bos else []
        return prefix + self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([id for id in ids if id < self.n_ranks])

    def piece(self, id: int) -> str:
        if id >= self.n_ranks:
            return LLAMA3_SPECIAL_TOKENS[id - self.n_ranks]
        return _show_bytes(self.encoding.decode_single_token_bytes(id))


# ----------------------------------------------------------------------------------------------------------
# finding and loading

_NAMES = "tokenizer.model, tokenizer.json or tokenizer.bin"


def find_tokenizer(directory: str | Path) -> Path | None:
    """The tokenizer file in a checkpoint folder, or None. tokenizer.model comes before tokenizer.json (a
    Llama 2 repo has both), and original/tokenizer.model (Meta's Llama 3 layout) comes last."""
    directory = Path(directory).expanduser()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer.bin"):
        if (directory / name).is_file():
            return directory / name
    custom = [c for c in sorted(directory.glob("tok*.bin")) if c.is_file()]  # llama2.c's tok512.bin, tok4096.bin
    original = directory / "original" / "tokenizer.model"
    return custom[0] if custom else original if original.is_file() else None


def _kind_of(path: Path) -> type[Tokenizer] | None:
    """Tell the kind from the content first (a Llama 3 tokenizer.model is tiktoken), then the name."""
    with path.open("rb") as f:
        head = f.read(4096)
    if path.suffix == ".json" or head.lstrip().startswith(b"{"):
        return HuggingFaceTokenizer
    if _looks_like_tiktoken(head):
        return TiktokenTokenizer
    return {".bin": Llama2cTokenizer, ".model": SentencePieceTokenizer}.get(path.suffix)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer file, or the one find_tokenizer() picks in a checkpoint folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise LLMKitError(f"no tokenizer in {path}: expected {_NAMES} there; pass the tokenizer file's path")
        path = found
    if not path.is_file():
        raise LLMKitError(f"tokenizer file not found: {path}; pass the path of a {_NAMES} (or its folder)")
    kind = _kind_of(path)
    if kind is not None:
        return kind(path)
    for kind in (SentencePieceTokenizer, Llama2cTokenizer):  # an unusual name: try the binary formats
        try:
            return kind(path)
        except LLMKitError:
            pass
    raise LLMKitError(
        f"unrecognised tokenizer file: {path} (not SentencePiece, tiktoken, JSON or llama2.c); pass a {_NAMES}"
    )
