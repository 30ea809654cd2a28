"""The flags that pick, build and run a model, shared by the `llmkit` subcommands (`llmkit.cli`)."""

import argparse
import sys

from llmkit import distributed, hub
from llmkit.errors import LLMKitError
from llmkit.generate import LLM
from llmkit.model import SHAPES


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="ALIAS", help="a downloaded model by name (see `llmkit list`)")
    p.add_argument("--checkpoint-path", default="default", help="checkpoint file or folder (default: the kit's model)")
    p.add_argument("--tokenizer-path", default=None, help="tokenizer file (default: found beside the checkpoint)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--max-seq-len", type=int, default=2048, help="cap on the context length (KV cache size)")
    add_threads_argument(p)
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="a preset (int8wo, int4wo-32, 8da4w-256, mobile...), torchchat JSON or JSON file; "
                        "gguf keeps a .gguf file's Q8_0/Q4_0/Q4_1 blocks")  # fmt: skip
    add_tp_argument(p)


def add_tp_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism: split the model over N processes (GPUs)")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    # Decoding a small model is a chain of small matrix-vector products: splitting each over threads costs
    # more in synchronisation than it gains, most of all on a busy machine.
    p.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch (default 1; more for big models)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """How to run the model: compiled, or from an exported package instead of the checkpoint."""
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--compile-prefill", action="store_true", help="also compile the prefill (dynamic length)")
    p.add_argument("--aoti-package-path", default=None, help="run an AOTInductor .pt2 made by llmkit export")
    p.add_argument("--pte-path", default=None, help="run an ExecuTorch .pte made by llmkit export")
    p.add_argument("--draft-checkpoint-path", default=None,
                   help="speculative decoding: a small model with the same tokenizer guesses, the model checks")
    p.add_argument("--speculate-k", type=int, default=None, help="tokens the draft guesses per round (default 4)")


def load_from_args(args: argparse.Namespace) -> LLM:
    from llmkit.loading import GGUF_SCHEME, load

    checkpoint, tokenizer = args.checkpoint_path, args.tokenizer_path
    if args.model:
        if checkpoint != "default":
            raise LLMKitError("give --model or --checkpoint-path, not both")
        files = hub.resolve(args.model)
        checkpoint, tokenizer = files.checkpoint, tokenizer or files.tokenizer
    blocks = args.quantize == GGUF_SCHEME  # kept as the file has them: nothing to quantize after loading
    if args.quantize and not blocks:
        from llmkit.quantize import parse_scheme

        parse_scheme(args.quantize)  # a malformed scheme fails before the model loads
    if args.tp > 1:  # before loading: on a GPU, each rank loads onto its own
        distributed.init(args.tp, args.device)
        args.seed = distributed.shared_seed(getattr(args, "seed", None))  # every rank must sample the same tokens
    llm = load(checkpoint, tokenizer, args.device, args.dtype, args.max_seq_len, gguf_blocks=blocks)
    if args.tp > 1:
        distributed.tensor_parallel(llm, args.tp)
    if args.model:
        llm.name = args.model  # a Hub snapshot folder is named by its commit hash
    if args.quantize and not blocks:
        from llmkit.quantize import quantize

        quantize(llm, args.quantize)
    return llm


def llm_from_args(args: argparse.Namespace) -> LLM:
    """The LLM the flags describe: a package, or a checkpoint optionally compiled, optionally with a draft."""
    draft_path, k = getattr(args, "draft_checkpoint_path", None), getattr(args, "speculate_k", None)
    if k is not None and draft_path is None:
        raise LLMKitError("--speculate-k needs --draft-checkpoint-path (the model that guesses)")
    check_package_flags(args)
    if getattr(args, "aoti_package_path", None):
        from llmkit.aoti import load_aoti

        return with_draft(load_aoti(args.aoti_package_path, args.tokenizer_path), args)
    if getattr(args, "pte_path", None):
        from llmkit.executorch import load_pte

        return with_draft(load_pte(args.pte_path, args.tokenizer_path), args)
    llm = with_draft(load_from_args(args), args)
    if getattr(args, "compile", False) or getattr(args, "compile_prefill", False):
        from llmkit.compile import compile

        print("compiling (the first calls take a while)...", file=sys.stderr)
        compile(llm, prefill=args.compile_prefill)
    return llm


def check_package_flags(args: argparse.Namespace) -> None:
    """An exported package was fixed when it was made (weights, scheme, device, context): refuse the flags that
    would change the model rather than ignore them without a word."""
    packages = [f"--{n.replace('_', '-')}" for n in ("aoti_package_path", "pte_path") if getattr(args, n, None)]
    if len(packages) > 1:
        raise LLMKitError("give --aoti-package-path or --pte-path, not both")
    defaults = argparse.ArgumentParser()
    add_model_arguments(defaults)
    add_run_arguments(defaults)
    keep = {"tokenizer_path", "threads", "aoti_package_path", "pte_path", "draft_checkpoint_path", "speculate_k"}
    given = [f"--{n.replace('_', '-')}" for n, v in vars(defaults.parse_args([])).items()
             if n not in keep and getattr(args, n, v) != v]  # fmt: skip
    if packages and given:
        raise LLMKitError(f"{', '.join(given)} can't change the program {packages[0]} runs (it was fixed by llmkit "
                          "export); leave them out, or export again with them")  # fmt: skip


def with_draft(llm: LLM, args: argparse.Namespace) -> LLM:
    """`llm` sped up by the draft of --draft-checkpoint-path, on the same device and dtype (unquantized), read
    with the tokenizer beside it, or else the target's; `llm` itself without one."""
    if getattr(args, "draft_checkpoint_path", None) is None:
        return llm
    from llmkit.speculative import check_k, load_draft, speculate

    k = 4 if args.speculate_k is None else args.speculate_k
    check_k(k)  # before the draft loads
    return speculate(llm, load_draft(args.draft_checkpoint_path, llm, args.device, args.dtype, args.max_seq_len), k)


def check_tp(args: argparse.Namespace) -> None:
    """What --tp cannot do, said before the processes start; the ranks check the split of what this can't read."""
    if args.command == "export":
        raise LLMKitError(f"--tp is not supported by {args.command} yet; run it on one device")
    if getattr(args, "quantize", None) not in (None, ["none"]):  # bench takes a list of schemes
        raise LLMKitError(distributed.QUANTIZE_LIMITATION)
    for flag in ("draft_checkpoint_path", "aoti_package_path", "pte_path"):
        if getattr(args, flag, None):
            raise LLMKitError(f"--tp does not work with --{flag.replace('_', '-')} yet; leave one of them out")
    distributed.check_devices(args.tp, args.device)
    if getattr(args, "shape", None) in SHAPES:
        distributed.check_split(SHAPES[args.shape], args.tp)
    elif not getattr(args, "model", None) and (model_args := distributed.header_args(args.checkpoint_path or "")):
        distributed.check_split(model_args, args.tp)
