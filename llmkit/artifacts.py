"""What travels with an exported model: its metadata, and its tokenizer file beside it, checked on load."""

import json
from collections.abc import Callable
from pathlib import Path

import torch

from llmkit.devices import dtype_name
from llmkit.errors import LLMKitError
from llmkit.files import check_output_path, sha256, write_file_atomically
from llmkit.generate import LLM
from llmkit.gguf import load_gguf_tokenizer
from llmkit.tokenizer import Tokenizer, load_tokenizer
from llmkit.version import __version__


def package_metadata(llm: LLM, format_version: str) -> dict[str, str]:
    """What a runner needs besides the graph. A model benchmarked with random weights has no tokenizer."""
    tok, cache = llm.tokenizer, llm.model.layers[0].attention.kv_cache.k_cache
    meta = {
        "llmkit_format": format_version,
        "llmkit_version": __version__,
        "torch_version": torch.__version__,
        "device": llm.device.type,
        "model_args": json.dumps(llm.model.args.to_dict()),
        "max_seq_len": str(llm.max_seq_len),
        "scheme": llm.scheme or "none",
        "kv_cache_dtype": dtype_name(cache.dtype),
        "kv_cache_shape": ",".join(map(str, cache.shape)),
        "tokenizer_file": "",
    }
    if tok is not None:
        meta.update(tokenizer_file=tok.path.name, tokenizer_sha256=sha256(tok.path), bos_id=str(tok.bos_id),
                    eos_ids=",".join(map(str, tok.eos_ids)))  # fmt: skip
    return meta


def tokenizer_beside(artifact: Path, tokenizer_file: str | Path) -> Path:
    """Where an artifact's tokenizer is copied: its own name with `.tokenizer` and the tokenizer's suffix."""
    return artifact.with_name(artifact.stem + ".tokenizer" + Path(tokenizer_file).suffix)


def check_targets(llm: LLM, path: str | Path, force: bool) -> Path:
    """Check, before the slow part, that the artifact and the tokenizer copy beside it may be written."""
    path = check_output_path(path, force)
    if llm.tokenizer is not None:
        check_output_path(tokenizer_beside(path, llm.tokenizer.path), force)
    return path


def write_with_tokenizer(llm: LLM, path: Path, write: Callable[[str], object]) -> Path:
    """Write the artifact atomically and copy `llm`'s tokenizer beside it (before the artifact takes its
    name), so the pair travels together."""

    def write_both(tmp: str) -> None:
        write(tmp)
        if llm.tokenizer is not None:
            data = llm.tokenizer.path.read_bytes()
            write_file_atomically(tokenizer_beside(path, llm.tokenizer.path), lambda t: Path(t).write_bytes(data))

    return write_file_atomically(path, write_both)


def load_checked_tokenizer(artifact: Path, given: str | Path | None, tokenizer_file: str, vocab_size: int,
                           expected_sha256: str | None) -> Tokenizer:  # fmt: skip
    """The artifact's tokenizer (the file given, else the copy beside it), refused if missing, bigger than the
    model's vocabulary, or (where the metadata names its checksum) not the file the artifact was exported with."""
    tok_path = Path(given) if given else tokenizer_beside(artifact, tokenizer_file)
    if not tok_path.is_file():
        raise LLMKitError(f"the tokenizer {tok_path} of {artifact} is missing; pass --tokenizer-path to the original")
    # a GGUF model's tokenizer is its checkpoint file, copied beside the artifact: the vocabulary is in its metadata
    tok = load_gguf_tokenizer(tok_path) if tok_path.suffix == ".gguf" else load_tokenizer(tok_path)
    if tok.vocab_size > vocab_size:
        raise LLMKitError(
            f"the tokenizer {tok_path} has {tok.vocab_size} tokens but {artifact} knows {vocab_size}: it is not "
            "this model's tokenizer; pass the right --tokenizer-path"
        )
    if expected_sha256 and sha256(tok_path) != expected_sha256:
        raise LLMKitError(f"{tok_path} is not the tokenizer {artifact} was exported with (checksum differs)")
    return tok
