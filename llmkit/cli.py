"""The `llmkit` command line, with torchchat's flag names: every subcommand, and nothing the library imports.

Every user-fixable problem is an `LLMKitError`: one line on stderr, exit status 2, no traceback.
"""

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from llmkit import distributed, hub
from llmkit.cli_model import (
    add_model_arguments,
    add_run_arguments,
    add_threads_argument,
    add_tp_argument,
    check_tp,
    llm_from_args,
    load_from_args,
)
from llmkit.errors import LLMKitError


def cmd_generate(args: argparse.Namespace) -> None:
    llm = llm_from_args(args)
    ids = llm.encode_prompt(args.prompt)  # a prompt that can't be encoded fails before anything is printed
    print(args.prompt, end="", flush=True)
    out = llm.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or (),
        on_text=lambda piece: print(piece, end="", flush=True),
    )
    print()
    print(out.stats, file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    from llmkit.data import heldout_text
    from llmkit.evaluate import perplexity, read_text

    llm = load_from_args(args)
    text = read_text(args.text) if args.text else heldout_text()
    result = perplexity(llm, text, seq_len=args.seq_len)
    print(f"perplexity {result.value:.4f} over {result.n_tokens} tokens (seq-len {args.seq_len})")


def cmd_export(args: argparse.Namespace) -> None:
    from llmkit.aoti import export_aoti
    from llmkit.executorch import export_pte, non_delegated_ops
    from llmkit.files import check_output_path

    outputs = [p for p in (args.output_aoti_package_path, args.output_pte_path) if p]
    if not outputs:
        raise LLMKitError("say where to write: --output-aoti-package-path model.pt2 and/or --output-pte-path model.pte")
    for out in outputs:
        check_output_path(out, args.force)  # fail before the slow part
    llm = load_from_args(args)
    if args.output_aoti_package_path:
        print("exporting and compiling ahead of time (about a minute)...", file=sys.stderr)
        path = export_aoti(llm, args.output_aoti_package_path, force=args.force)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.output_pte_path:
        print("exporting and lowering to ExecuTorch with XNNPACK...", file=sys.stderr)
        path = export_pte(llm, args.output_pte_path, force=args.force)
        ops = non_delegated_ops(path).most_common()
        outside = ", ".join(f"{op} x{n}" for op, n in ops if not op.startswith("delegate:")) or "none"
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); operators outside XNNPACK: {outside}")


def cmd_bench(args: argparse.Namespace) -> None:
    from llmkit.bench import bench, table

    if args.draft_checkpoint_path:
        return bench_speculative(args)
    if (args.checkpoint_path is None) == (args.shape is None):
        raise LLMKitError("give one of --checkpoint-path P or --shape NAME")
    if args.checkpoint_path not in (None, "default") and not Path(args.checkpoint_path).exists():
        raise LLMKitError(f"checkpoint not found: {args.checkpoint_path}; give an existing file or folder, or "
                          "--shape NAME for random weights of a known shape")  # fmt: skip
    rows = bench(args.checkpoint_path or args.shape, args.quantize or ["none"], args.path or ["eager"], args.device,
                 args.dtype, args.prompt_len, args.new_tokens, args.repeats, args.out, tp=args.tp)  # fmt: skip
    print(table(rows))
    if args.out:
        print(f"appended {len(rows)} results to {args.out}")


def bench_speculative(args: argparse.Namespace) -> None:
    from llmkit.speculative_bench import bench_speculative, spec_table

    if args.shape:
        raise LLMKitError("speculative decoding is measured on a trained --checkpoint-path (random weights accept "
                          "nothing), not a --shape")  # fmt: skip
    rows = bench_speculative(args.checkpoint_path or "default", args.draft_checkpoint_path, args.speculate_k or [4],
                             args.path or ["eager"], args.device, args.dtype, args.new_tokens, args.temperature,
                             args.repeats, out=args.out, command="llmkit " + " ".join(args.argv))  # fmt: skip
    print(spec_table(rows))
    if args.out:
        print(f"appended {len(rows)} results to {args.out}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from llmkit.sweep import run_sweep

    out = run_sweep(args.sweep_file, args.results_dir)
    print((out / "summary.md").read_text())
    print(f"results in {out}/")
    runs = json.loads((out / "runs.json").read_text())
    failed = sum(r["status"] != "ok" for r in runs)
    if failed:
        print(f"llmkit: {failed} of {len(runs)} runs failed (see {out / 'summary.md'})", file=sys.stderr)
    return 1 if failed else 0


def cmd_chat(args: argparse.Namespace) -> None:
    from llmkit.chat import chat_loop

    read = distributed.read_line if args.tp > 1 else input
    chat_loop(llm_from_args(args), args.system, read=read, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> None:
    from llmkit.engine import Engine
    from llmkit.serve import serve

    if not 0 <= args.port <= 65535:
        raise LLMKitError(f"--port must be 0 to 65535, not {args.port}")
    llm = load_from_args(args)
    if args.tp > 1:  # every rank makes rank 0's model calls; rank 0 alone serves
        from llmkit.engine_tp import MirroredEngine, follow

        engine = MirroredEngine(llm, args.max_batch_size, args.max_queue)
    else:
        engine = Engine(llm, args.max_batch_size, args.max_queue)
    if args.compile:
        from llmkit.compile import compile_batched_decode, compile_batched_prefill

        engine.decode_step = compile_batched_decode(llm, args.max_batch_size)
        if llm.device.type == "cuda":  # on a CPU eager prefill is bound by arithmetic, not by launches
            engine.prefill_step = compile_batched_prefill(llm)
    if args.tp > 1 and distributed.rank() != 0:
        return follow(engine)
    serve(engine, args.host, args.port, args.api_key,
          on_ready=lambda url: print(f"serving {llm.name} on {url} (up to {args.max_batch_size} requests at once); "
                                     "Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True))  # fmt: skip


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from llmkit.serve_bench import bench_serve, table

    server = ["--checkpoint-path", args.checkpoint_path, "--device", args.device, "--dtype", args.dtype,
              "--threads", args.server_threads, "--max-batch-size", args.max_batch_size,
              "--max-queue", max(args.concurrency)]  # fmt: skip
    server += ["--model", args.model] if args.model else []
    server += ["--quantize", args.quantize] if args.quantize else []
    server += ["--compile"] if args.compile else []
    print(f"serving with: {' '.join(map(str, server))}", file=sys.stderr)
    rows = bench_serve(server, args.concurrency, args.max_tokens, args.requests, args.out,
                       command="llmkit " + " ".join(args.argv), url=args.url, server_log=args.server_log)  # fmt: skip
    print(table(rows))
    if args.out:
        print(f"appended {len(rows)} results to {args.out}")


def cmd_download(args: argparse.Namespace) -> None:
    model = hub.model_info(args.model)
    print(f"downloading {model.alias} (about {model.size}) from https://huggingface.co/{model.repo} into "
          f"{hub.constants.HF_HUB_CACHE}", file=sys.stderr)  # fmt: skip
    files = hub.download(model.alias)
    print(f"{model.alias} is ready; try `llmkit generate --model {model.alias}`", file=sys.stderr)
    print(files.checkpoint)


def cmd_list(args: argparse.Namespace) -> None:
    rows = hub.list_models()
    width = max(len(row.alias) for row in rows)
    repo_width = max(len(row.repo) for row in rows)
    print(f"{'alias':<{width}}  {'repository':<{repo_width}}  {'size':>8}  downloaded")
    for row in rows:
        downloaded = ("yes" if row.downloaded else "no") + ("  (gated)" if row.gated else "")
        print(f"{row.alias:<{width}}  {row.repo:<{repo_width}}  {row.size:>8}  {downloaded}")


def cmd_where(args: argparse.Namespace) -> None:
    print(hub.where(args.model))


def cmd_remove(args: argparse.Namespace) -> None:
    for path in hub.remove(args.model):
        print(f"removed {path}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> None:
    from llmkit.train import TrainConfig, make_model, prepare_corpus

    if args.stage == "prepare":
        print(json.dumps(prepare_corpus(args.work, args.vocab_size, args.tokenizer_path, args.force), indent=2))
        return
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    command = "llmkit " + " ".join(args.argv)
    result = make_model(args.out, args.preset, cfg, args.vocab_size, command, prepared=args.data,
                        tokenizer_path=args.tokenizer_path, force=args.force)  # fmt: skip
    print(f"{args.out}: held-out perplexity {result['ppl']:.2f} (unigram {result['unigram']:.1f}), "
          f"trained in {result['train_s']:.0f} s on {result['device']}")  # fmt: skip


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from llmkit.train import PRESETS, TrainConfig

    p = sub.add_parser("train", help="train the kit's default model (pydoc-lm): corpus, tokenizer, model")
    p.add_argument("stage", nargs="?", choices=["all", "prepare"], default="all")
    p.add_argument("--work", type=Path, default=Path(".gpu"), help="prepare's output folder")
    p.add_argument("--data", type=Path, default=None, help="train from a prepared folder")
    p.add_argument("--out", type=Path, default=Path("data/pydoc-lm"), help="model folder to write")
    p.add_argument("--force", action="store_true", help="replace --out (or prepare's --work corpus) if it exists")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-path", type=Path, default=None,
                   help="use this SentencePiece model, not a new one (a draft shares its target's)")  # fmt: skip
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmkit", description="Learn and measure LLM inference in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    add_model_arguments(p)
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    add_run_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity on a text file (default: the kit's held-out text)")
    add_model_arguments(p)
    p.add_argument("--text", default=None, help="UTF-8 text file, paragraphs separated by blank lines")
    p.add_argument("--seq-len", type=int, default=256)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export the model ahead of time (.pt2, .pte)")
    add_model_arguments(p)
    p.add_argument("--output-aoti-package-path", default=None, help="write an AOTInductor package here")
    p.add_argument("--output-pte-path", default=None, help="write an ExecuTorch program (XNNPACK) here")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="measure decode speed against the memory-bandwidth limit")
    p.add_argument("--checkpoint-path", default=None, help="a checkpoint, or 'default'")
    p.add_argument("--shape", default=None, help="random weights of a known architecture, e.g. stories15M")
    p.add_argument("--quantize", nargs="+", default=None, help="schemes to compare (none = unquantized)")
    p.add_argument("--path", nargs="+", default=None, help="eager, compile, aoti and/or pte")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="append results as JSON lines to this file")
    p.add_argument("--draft-checkpoint-path", default=None,
                   help="measure speculative decoding of --checkpoint-path with this draft (eager, compile)")
    p.add_argument("--speculate-k", type=int, nargs="+", default=None, help="with a draft: the k values to measure")
    p.add_argument("--temperature", type=float, default=0.0, help="with a draft: sampling temperature (0: greedy)")
    add_threads_argument(p)
    add_tp_argument(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="run a notebook with papermill over a grid of parameters")
    p.add_argument("sweep_file", help="YAML: name, notebook, parameters, grid")
    p.add_argument("--results-dir", default="results")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("chat", help="talk with a model in its chat format (/reset starts over, /quit leaves)")
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt, kept when old turns are dropped")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply")
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    add_run_arguments(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching (GET / is a chat page)")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (KV cache rows)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get a 503")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-row decode step (on a GPU batches too: CUDA graphs of 1, 2, 4, ... max rows)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench-serve", help="measure llmkit serve under 1 to 32 concurrent streaming clients")
    p.add_argument("--model", default=None, metavar="ALIAS", help="a downloaded model by name")
    p.add_argument("--checkpoint-path", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", default=None, metavar="SCHEME")
    p.add_argument("--server-threads", type=int, default=1, help="the server's --threads")
    p.add_argument("--compile", action="store_true", help="the server's --compile")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (end of sequence ignored)")
    p.add_argument("--requests", type=int, default=None, help="per level (default: 2 x concurrency, at least 8)")
    p.add_argument("--url", default=None, help="measure a server already running here instead of starting one")
    p.add_argument("--server-log", default=None, help="write the started server's output (compile progress) here")
    p.add_argument("--out", default=None, help="append results as JSON lines to this file")
    p.set_defaults(func=cmd_bench_serve)

    for name, func, help in (
        ("download", cmd_download, "download a model by alias into the Hugging Face cache"),
        ("where", cmd_where, "print the folder in the cache that holds a downloaded model"),
        ("remove", cmd_remove, "delete a downloaded model from the cache"),
    ):
        p = sub.add_parser(name, help=help)
        p.add_argument("model", metavar="ALIAS", help="a model name from `llmkit list`")
        p.set_defaults(func=func)
    p = sub.add_parser("list", help="the models known by name, and which are downloaded")
    p.set_defaults(func=cmd_list)

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # what the user typed, for records such as the model card
    try:
        if getattr(args, "threads", None) is not None:
            if not 1 <= args.threads <= 4 * (os.cpu_count() or 1):  # more only starts threads that wait
                raise LLMKitError(f"--threads must be 1 to {4 * (os.cpu_count() or 1)} here, not {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        if getattr(args, "tp", 1) > 1 and not distributed.in_group():
            check_tp(args)  # before any process starts
            return distributed.launch([sys.executable, "-m", "llmkit", *argv], args.tp)
        return args.func(args) or 0
    except LLMKitError as e:
        print(f"llmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
