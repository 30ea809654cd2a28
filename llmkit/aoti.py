"""AOTInductor: the model compiled ahead of time into a `.pt2` package, run from Python or C++ without Python.

`torch.export` captures the model's forward (tokens, input positions) with the KV cache as buffers,
twice: once with a dynamic sequence length for the prompt (prefill) and once for one token (decode),
which inductor compiles into fused one-row loops (`llmkit.graph_passes`). The decode model takes a third
input whose length is how many cache positions to attend to (a dynamic size): a step early in the context
reads only the part of the cache written so far, as llama2.c's run.c does. The two compiled models are
packaged together and, once loaded, share one set of KV cache tensors, so decode reads what prefill
wrote. What a runner needs besides the graph travels as package metadata (`llmkit.artifacts`).
"""

import json
import zipfile
import zlib
from pathlib import Path

import torch
from torch import Tensor, nn

from llmkit import cpu_kernels
from llmkit.artifacts import check_targets, load_checked_tokenizer, package_metadata, write_with_tokenizer
from llmkit.cpu_codegen import short_loads_in_one_instruction
from llmkit.errors import LLMKitError, first_line
from llmkit.generate import LLM
from llmkit.graph_passes import OneRowProductsAsLoops
from llmkit.huge_pages import collapsing_new_memory

FORMAT_VERSION = "3"  # bump when the package layout or metadata changes; 2: prefill and decode; 3: decode window
AOTI_MODELS = ("prefill", "decode")
CPU_OP = "llmkit_cpu::"  # how a package's list of operators it calls names llmkit's C++ kernels


class Step(nn.Module):
    """The model's step, exported: with `window`, attending to the cache's first `len(window)` positions (its values
    are unused). Both exported models hold the model under this one name, so their KV caches' names match."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, input_pos: Tensor, window: Tensor | None = None) -> Tensor:
        return self.model(tokens, input_pos, cache_len=None if window is None else window.shape[0])


def export_program(llm: LLM, one_token: bool = False, model: nn.Module | None = None) -> torch.export.ExportedProgram:
    """torch.export of forward(tokens [1, T], input_pos [T]), with 1 <= T < max_seq_len, or of the one-token
    step forward(tokens [1, 1], input_pos [1], window [W]) attending to the cache's first W positions; of `model`
    (export_aoti's copy with packed weights) in place of `llm.model` if given."""
    device, max_len = llm.device, llm.max_seq_len
    if one_token:
        example = (torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device),
                   torch.empty(2, dtype=torch.uint8, device=device))  # fmt: skip
        dynamic = (None, None, {0: torch.export.Dim("window", min=1, max=max_len)})
    else:
        example = (torch.zeros(1, 2, dtype=torch.long, device=device), torch.arange(2, device=device))
        seq = torch.export.Dim("seq", min=1, max=max_len - 1)
        dynamic = ({1: seq}, {0: seq})
    with torch.no_grad():
        ep = torch.export.export(Step(model or llm.model), example, dynamic_shapes=dynamic, strict=False)
    # decomposing makes the in-place cache update a buffer mutation; attention stays one operator, which inductor
    # lowers as in a compiled step (llmkit.graph_passes at one query), not as generic matmul and softmax loops
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.scaled_dot_product_attention.default)
    return ep.run_decompositions(table)


def export_aoti(llm: LLM, path: str | Path, force: bool = False) -> Path:
    """Compile `llm`'s model ahead of time into a `.pt2` package of two models, prefill and decode,
    written atomically.

    Each model carries its own copy of the weights (the package is twice the size of one); the
    decode model is what makes the package fast: with one token, a CPU's matmuls and attention
    become fused loops. The tokenizer file is copied beside the package (same stem, its own suffix)
    so the pair travels together; its checksum in the metadata catches a mismatched one.
    """
    from torch._inductor.package import package_aoti

    if llm.model is None:
        raise LLMKitError(f"{llm.name} has no eager model to export (it came from a package); load the checkpoint")
    path = check_targets(llm, path, force)
    # the pass rewrites only products statically of one row: the decode model's, not the prefill's
    options = {"aot_inductor.metadata": package_metadata(llm, FORMAT_VERSION), "aot_inductor.package": True,
               "post_grad_custom_pre_pass": OneRowProductsAsLoops()}  # fmt: skip
    # on the CPU, float32 weights packed for llmkit's kernel (one stream of blocks, as XNNPACK holds them), once
    model = cpu_kernels.with_packed_linears(llm.model) if llm.device.type == "cpu" else llm.model
    files = {}
    for name in AOTI_MODELS:
        ep = export_program(llm, one_token=name == "decode", model=model)
        with short_loads_in_one_instruction():
            files[name] = torch._inductor.aot_compile(ep.module(), ep.example_inputs[0], options=options)
    return write_with_tokenizer(llm, path, lambda tmp: package_aoti(tmp, files))


def check_zip(path: Path) -> None:
    """Refuse a package whose zip is damaged (CRCs checked) before torch loads it: torch checks none, and a damaged
    shared library inside it crashes the process when it runs."""
    try:
        with zipfile.ZipFile(path) as package:
            damaged = package.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error) as e:
        damaged = first_line(e)
    if damaged is not None:
        raise LLMKitError(f"{path} is damaged or not an AOTInductor package (bad zip entry: {damaged}); export it "
                          "again with llmkit export")  # fmt: skip


def load_op_library(path: Path) -> None:
    """Load llmkit's C++ op library where the package calls its kernel (`llmkit.cpu_kernels`): torch finds the op
    by name when the package loads."""
    with zipfile.ZipFile(path) as package:
        calls = any(CPU_OP.encode() in package.read(name) for name in package.namelist() if name.endswith(".json"))
    if calls and not cpu_kernels.available():
        raise LLMKitError(f"{path} calls llmkit's C++ kernel, which can't be built here ({cpu_kernels.why_not()}); "
                          "install g++ or export the package again on this machine")  # fmt: skip


def load_aoti(path: str | Path, tokenizer: str | Path | None = None) -> LLM:
    """Load a `.pt2` package as an `LLM` whose step runs the compiled model."""
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"AOTInductor package not found: {path}")
    from torch._inductor.package import load_package

    check_zip(path)
    load_op_library(path)
    try:
        with collapsing_new_memory():  # the constants the runtime copies out of each model
            runners = {name: load_package(str(path), name) for name in AOTI_MODELS}
        meta = runners["decode"].get_metadata()
    except Exception as e:  # a damaged zip, an older layout or another build surface as many types
        raise LLMKitError(
            f"{path} is not a loadable llmkit AOTInductor package ({first_line(e)}); export it again with llmkit export"
        ) from None
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
        vocab_size = json.loads(meta["model_args"])["vocab_size"]
        tok = load_checked_tokenizer(path, tokenizer, meta["tokenizer_file"], vocab_size, meta["tokenizer_sha256"])
    caches = share_kv_cache(runners, meta)
    max_len = int(meta["max_seq_len"])
    window = torch.empty(max_len, dtype=torch.uint8, device=device)

    def step(tokens: Tensor, input_pos: Tensor) -> Tensor:
        if tokens.shape[1] != 1:
            return runners["prefill"](tokens, input_pos)
        # the positions up to this one; on a GPU the whole cache, as reading the position would wait for it
        used = int(input_pos[-1]) + 1 if device == "cpu" else max_len
        return runners["decode"](tokens, input_pos, window[:used])

    # the models hold raw pointers to the caches: the tensors live with the LLM
    return LLM(None, tok, name=path.stem, step=step, max_seq_len=max_len, device=device,
               metadata=meta, buffers=caches)  # fmt: skip


def share_kv_cache(runners: dict, meta: dict[str, str]) -> dict[str, Tensor]:
    """Give the prefill and decode models the same KV cache tensors, owned by the caller (user-managed)."""
    shape = [int(n) for n in meta["kv_cache_shape"].split(",")]
    device, dtype = torch.device(meta["device"]), getattr(torch, meta["kv_cache_dtype"])
    caches = {name: torch.zeros(shape, dtype=dtype, device=device)
              for name in runners["decode"].get_constant_fqns() if ".kv_cache." in name}  # fmt: skip
    for runner in runners.values():
        runner.load_constants(caches, check_full_update=False, user_managed=True)
    return caches
