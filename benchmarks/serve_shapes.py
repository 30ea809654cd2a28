"""Serving figures for a known shape (llama-3.2-1b, llama-2-7b...) with random weights: `llmkit bench-serve` on it.

A server needs a checkpoint and a tokenizer, and no real model of these shapes can be downloaded on the GPU
machine. So this writes a Hugging Face folder of the shape with random weights (llmkit.checkpoint.save_hf) and a
word-level tokenizer.json of the shape's vocabulary (token i is the word "w<i>"), then measures. Decode speed
depends on the shape, not on the weights' values or the words: the requests ignore end of sequence.

    python benchmarks/serve_shapes.py --shape llama-3.2-1b --device cuda --dtype bfloat16 --compile \
        --max-batch-size 16 --concurrency 1 2 4 8 16 --out data/benchmarks/serve/h200-llama-3.2-1b.jsonl
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import tokenizers
import torch

from llmkit.checkpoint import save_hf
from llmkit.model import random_model, shape_args


def write_word_tokenizer(vocab_size: int, path: Path) -> None:
    """A tokenizer.json whose ids are the words w0 ... w<vocab_size - 1>, split on spaces (w0 is unknown)."""
    model = tokenizers.models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def write_shape_folder(shape: str, folder: Path, device: str, dtype: str, max_seq_len: int) -> Path:
    """A Hugging Face folder of the shape with random weights and a word-level tokenizer of its vocabulary."""
    model = random_model(shape_args(shape, max_seq_len), device, getattr(torch, dtype))
    save_hf(model, folder)
    del model
    write_word_tokenizer(shape_args(shape, max_seq_len).vocab_size, folder / "tokenizer.json")
    (folder / "shape.json").write_text(json.dumps({"shape": shape, "weights": "random"}) + "\n")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--out", default=None, help="append results as JSON lines to this file")
    args, bench_args = p.parse_known_args()  # the rest goes to llmkit bench-serve
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_shape_folder(args.shape, Path(tmp) / args.shape, args.device, args.dtype, args.max_seq_len)
        command = [sys.executable, "-m", "llmkit", "bench-serve", "--checkpoint-path", str(folder), "--device",
                   args.device, "--dtype", args.dtype, *bench_args]  # fmt: skip
        command += ["--out", args.out] if args.out else []
        sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
