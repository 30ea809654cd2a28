"""Saving a quantized model and loading it back: its weights (torchao tensors) in a torch file, its tokenizer beside."""

import shutil
from pathlib import Path

import torch
from torch import nn

from llmkit.checkpoint import read_torch_file
from llmkit.devices import resolve_device
from llmkit.errors import LLMKitError, first_line
from llmkit.files import check_output_path, write_folder_atomically
from llmkit.generate import LLM
from llmkit.model import ModelArgs, Transformer

SAVED_NAME = "quantized.pt"
TOKENIZER_CONFIGS = ("tokenizer_config.json", "generation_config.json")  # special tokens, chat template
SAVED_FORMAT = "llmkit.quantized/1"


def save(llm: LLM, out_dir: str | Path, force: bool = False) -> Path:
    """Write `out_dir/quantized.pt` (weights, model args, scheme) and the tokenizer's files, atomically.

    torch.save of the state dict, not safetensors: torchao's tensors pickle as their inner tensors
    plus a few attributes (block size, dtypes) and load back with `weights_only=True`, so no code
    runs on load; safetensors would need an encoding of each tensor type's attributes of our own.
    The file is `model_size` plus the zip container's few hundred bytes per inner tensor.
    """
    out_dir = check_output_path(out_dir, force, folder=True)
    if llm.model is None:
        raise LLMKitError(f"{llm.name} has no eager model to save (it was exported); save before exporting")
    if any(p.dtype in (torch.int8, torch.uint8) for p in llm.model.parameters()):
        raise LLMKitError(f'{llm.name} runs on llmkit\'s kernels, not saved yet; save with "kernel": "torchao"')
    payload = {
        "format": SAVED_FORMAT,
        "args": llm.model.args.to_dict(),
        "scheme": llm.scheme,
        "state_dict": llm.model.state_dict(),
    }
    tokenizer = Path(llm.tokenizer.path)

    def fill(tmp: Path) -> None:
        torch.save(payload, tmp / SAVED_NAME)
        for source in [tokenizer, *(tokenizer.parent / name for name in TOKENIZER_CONFIGS)]:
            if source.is_file():
                shutil.copy(source, tmp / source.name)

    return write_folder_atomically(out_dir, fill)


def load_quantized(path: str | Path, device: str = "cpu") -> LLM:
    """Load what `save` wrote (the folder or its quantized.pt) as an LLM with the same scheme."""
    from llmkit.tokenizer import find_tokenizer, load_tokenizer

    path, target = Path(path), resolve_device(device)
    folder = path if path.is_dir() else path.parent
    file = folder / SAVED_NAME
    if not file.is_file():
        raise LLMKitError(f"{folder} holds no {SAVED_NAME}; give a folder written by llmkit.save")
    payload = read_torch_file(file, "save the model again")
    if not isinstance(payload, dict) or payload.get("format") != SAVED_FORMAT:
        raise LLMKitError(f"{file} is not an llmkit quantized model ({SAVED_FORMAT}); save it with llmkit.save")
    try:
        args, state = ModelArgs(**payload["args"]), dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError) as e:
        raise LLMKitError(f"{file} is damaged ({type(e).__name__}: {first_line(e)}); save the model again") from None
    with torch.device("meta"):
        model = Transformer(args)
    if set(state) != set(model.state_dict()):
        raise LLMKitError(f"{file}: its weights do not fit the model its args describe; save the model again")
    for name, tensor in state.items():  # loaded on the CPU, then moved: torchao tensors unpickle badly on "cuda"
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, nn.Parameter(tensor.to(target), requires_grad=False))
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.setup_buffers()
    tokenizer = find_tokenizer(folder)
    if tokenizer is None:
        raise LLMKitError(f"no tokenizer beside {file}; copy the model's tokenizer file into {folder}")
    llm = LLM(model.eval(), load_tokenizer(tokenizer), name=folder.name)
    llm.scheme = payload["scheme"]
    return llm
