"""Export the model: AOTInductor `.pt2` packages (run from Python or C++ without Python).

`torch.export` captures the model's forward (tokens, input positions) once, with a dynamic
sequence length so one graph serves prefill and decode, and the KV cache as buffers that the
loaded package keeps and updates. What a runner needs besides the graph (model arguments,
tokenizer name and checksum, BOS/EOS ids, device, llmkit version) travels as package metadata.
"""

import hashlib
import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor

from llmkit.errors import LLMKitError
from llmkit.generate import LLM
from llmkit.tokenizer import load_tokenizer

FORMAT_VERSION = "1"  # bump when the package layout or metadata changes


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_output_path(path: str | Path, force: bool) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise LLMKitError(f"folder {path.parent} does not exist; create it or choose another output path")
    if path.exists() and not force:
        raise LLMKitError(f"{path} already exists; pass --force to replace it")
    return path


def export_program(llm: LLM) -> torch.export.ExportedProgram:
    """torch.export of forward(tokens [1, T], input_pos [T]) with 1 <= T < max_seq_len."""
    seq = torch.export.Dim("seq", min=1, max=llm.max_seq_len - 1)
    example = (torch.zeros(1, 2, dtype=torch.long, device=llm.device), torch.arange(2, device=llm.device))
    with torch.no_grad():
        ep = torch.export.export(llm.model, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    return ep.run_decompositions()  # makes the in-place cache update a buffer mutation


def runner_metadata(llm: LLM) -> dict[str, str]:
    """What a runner needs besides the graph. A model benchmarked with random weights has no tokenizer."""
    tok = llm.tokenizer
    meta = {
        "llmkit_format": FORMAT_VERSION,
        "llmkit_version": version("llmkit"),
        "torch_version": torch.__version__,
        "device": llm.device.type,
        "model_args": json.dumps(llm.model.args.to_dict()),
        "max_seq_len": str(llm.max_seq_len),
        "scheme": str(getattr(llm, "scheme", "none")),
        "tokenizer_file": "",
    }
    if tok is not None:
        meta.update(tokenizer_file=tok.path.name, tokenizer_sha256=sha256(tok.path), bos_id=str(tok.bos_id),
                    eos_ids=",".join(map(str, tok.eos_ids)))  # fmt: skip
    return meta


def export_aoti(llm: LLM, path: str | Path, force: bool = False) -> Path:
    """Compile `llm`'s model ahead of time into a `.pt2` package, written atomically.

    The tokenizer file is copied beside the package (same stem, its own suffix) so the pair
    travels together; its checksum in the metadata catches a mismatched one.
    """
    path = check_output_path(path, force)
    ep = export_program(llm)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        torch._inductor.aoti_compile_and_package(
            ep, package_path=tmp, inductor_configs={"aot_inductor.metadata": runner_metadata(llm)}
        )
        if llm.tokenizer is not None:
            tokenizer_beside(path, llm.tokenizer.path).write_bytes(llm.tokenizer.path.read_bytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def tokenizer_beside(package: Path, tokenizer_file: str | Path) -> Path:
    return package.with_name(package.stem + ".tokenizer" + Path(tokenizer_file).suffix)


def load_aoti(path: str | Path, tokenizer: str | Path | None = None) -> LLM:
    """Load a `.pt2` package as an `LLM` whose step runs the compiled model."""
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"AOTInductor package not found: {path}")
    try:
        runner = torch._inductor.aoti_load_package(str(path))
        meta = runner.get_metadata()
    except Exception as e:  # a damaged zip or a package for another build surfaces as many types
        raise LLMKitError(f"{path} is not a loadable AOTInductor package ({str(e).splitlines()[0][:120]})") from None
    if meta.get("llmkit_format") != FORMAT_VERSION:
        raise LLMKitError(
            f"{path} was made by another llmkit (package format {meta.get('llmkit_format', 'unknown')}, "
            f"this llmkit reads {FORMAT_VERSION}); export it again with this version"
        )
    device = meta["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise LLMKitError(f"{path} was compiled for cuda but this machine has no GPU; export again with --device cpu")
    tok = None
    if meta["tokenizer_file"]:
        tok_path = Path(tokenizer) if tokenizer else tokenizer_beside(path, meta["tokenizer_file"])
        if not tok_path.is_file():
            raise LLMKitError(f"the package's tokenizer {tok_path} is missing; pass --tokenizer-path to the original")
        if sha256(tok_path) != meta["tokenizer_sha256"]:
            raise LLMKitError(f"{tok_path} is not the tokenizer {path} was exported with (checksum differs)")
        tok = load_tokenizer(tok_path)
    def step(tokens: Tensor, input_pos: Tensor) -> Tensor:
        return runner(tokens, input_pos)

    llm = LLM(None, tok, name=path.stem, step=step,
              max_seq_len=int(meta["max_seq_len"]), device=device)  # fmt: skip
    llm.metadata = meta
    return llm
