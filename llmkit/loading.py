"""From a checkpoint on disk to a ready `LLM`: the model, its tokenizer, the device and dtype."""

from pathlib import Path

from llmkit.checkpoint import load_checkpoint
from llmkit.devices import resolve_device, resolve_dtype
from llmkit.errors import LLMKitError
from llmkit.generate import LLM
from llmkit.gguf import load_gguf
from llmkit.huge_pages import collapse_weights, own_memory
from llmkit.tokenizer import find_tokenizer, load_tokenizer

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # what the kit ships: its model, benchmark results
DEFAULT_MODEL = DATA_DIR / "pydoc-lm"
GGUF_SCHEME = "gguf"  # `--quantize gguf`: a GGUF file's own Q8_0, Q4_0 and Q4_1 blocks, kept at load time


def load(
    checkpoint: str | Path = "default",
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    max_seq_len: int | None = 2048,
    gguf_blocks: bool = False,
) -> LLM:
    """Load a checkpoint (file, folder, or "default" for the kit's own model) and its tokenizer.

    The tokenizer is looked for beside the checkpoint unless given. `max_seq_len` caps the context
    (and so the KV cache and mask memory) of models trained for very long ones. gguf_blocks=True keeps a GGUF
    file's Q8_0, Q4_0 and Q4_1 weights in their blocks, as torchao tensors, rather than dequantized.
    """
    if max_seq_len is not None and max_seq_len < 2:
        raise LLMKitError(f"max-seq-len must be at least 2 (a prompt token and a new one), not {max_seq_len}")
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    path = DEFAULT_MODEL if str(checkpoint) == "default" else Path(checkpoint)
    if gguf_blocks and path.suffix != ".gguf":
        raise LLMKitError(f"--quantize {GGUF_SCHEME} keeps a .gguf file's own blocks, and {path} is not one")
    if path.suffix == ".gguf":  # the file holds its tokenizer too
        model, tok = load_gguf(path, max_seq_len, gguf_blocks)
        tok = tok if tokenizer is None or Path(tokenizer) == path else load_tokenizer(tokenizer)
    else:
        model = load_checkpoint(path, max_seq_len=max_seq_len)
        if tokenizer is None:
            tokenizer = find_tokenizer(path if path.is_dir() else path.parent)
            if tokenizer is None:
                raise LLMKitError(f"no tokenizer found beside {path}; pass --tokenizer-path")
        tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.args.vocab_size:
        raise LLMKitError(
            f"the tokenizer {tok.path} has {tok.vocab_size} tokens but the model knows {model.args.vocab_size}: "
            "it is not this model's tokenizer; pass the right --tokenizer-path"
        )
    model = model.to(device=torch_device, dtype=torch_dtype)
    model.setup_buffers()
    if torch_device.type == "cpu":  # a CPU step reads every weight: on 2 MB pages they stream faster
        own_memory(model)
        collapse_weights(model)
    llm = LLM(model, tok, name=path.stem if path.is_file() else path.name)
    if gguf_blocks:
        llm.scheme = GGUF_SCHEME
    return llm
