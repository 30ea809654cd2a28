"""What travels with an exported model: its metadata, and its tokenizer file beside it, checked on load."""

import json
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch

from llmkit.devices import dtype_name
from llmkit.errors import LLMKitError
from llmkit.files import sha256, write_file_atomically
from llmkit.generate import LLM


def package_metadata(llm: LLM, format_version: str) -> dict[str, str]:
    """What a runner needs besides the graph. A model benchmarked with random weights has no tokenizer."""
    tok, cache = llm.tokenizer, llm.model.layers[0].attention.kv_cache.k_cache
    meta = {
        "llmkit_format": format_version,
        "llmkit_version": version("llmkit"),
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


def write_with_tokenizer(llm: LLM, path: Path, write: Callable[[str], object]) -> Path:
    """Write the artifact atomically and copy `llm`'s tokenizer beside it (before the artifact takes its
    name), so the pair travels together."""

    def write_both(tmp: str) -> None:
        write(tmp)
        if llm.tokenizer is not None:
            data = llm.tokenizer.path.read_bytes()
            write_file_atomically(tokenizer_beside(path, llm.tokenizer.path), lambda t: Path(t).write_bytes(data))

    return write_file_atomically(path, write_both)


def check_tokenizer(artifact: Path, tok_path: Path, expected_sha256: str | None) -> None:
    """The tokenizer file must exist and, where the metadata names its checksum, be the one exported with."""
    if not tok_path.is_file():
        raise LLMKitError(f"the tokenizer {tok_path} of {artifact} is missing; pass --tokenizer-path to the original")
    if expected_sha256 and sha256(tok_path) != expected_sha256:
        raise LLMKitError(f"{tok_path} is not the tokenizer {artifact} was exported with (checksum differs)")
