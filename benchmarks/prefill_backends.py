"""The eager prefill of a serving engine by attention backend: each new shape's first call against the next two.

A random-weight model of a known shape (as serve_shapes.py writes it) prefills n prompts of T tokens at once, each
row at its own positions over a cache window of 256, three times per (n, T), with SDPA's default choice, with
cuDNN's attention left out, and with the memory-efficient kernel alone. Prints milliseconds per call.

    python benchmarks/prefill_backends.py --shape llama-3.2-1b
"""

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from serve_shapes import write_shape_folder
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmkit

CHOICES = {"default": None, "no cuDNN": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
           "efficient": [SDPBackend.EFFICIENT_ATTENTION]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_shape_folder(args.shape, Path(tmp) / args.shape, "cuda", "bfloat16", 1024)
        model = llmkit.load(folder, device="cuda", dtype="bfloat16", max_seq_len=1024).model
    model.setup_buffers(16)

    def prefill_ms(n: int, T: int) -> float:
        tokens = torch.ones(n, T, dtype=torch.long, device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model(tokens, torch.arange(T, device="cuda").expand(n, T), cache_len=256)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    for i, (name, backends) in enumerate(CHOICES.items()):
        for n, T in [(1, 8), (4, 8), (16, 8), (16, 9), (7, 30)]:
            T += i  # a shape no earlier choice has seen
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                times = [prefill_ms(n, T) for _ in range(3)]
            print(f"{name:>10}  {n:>2} prompts of {T:>2}: " + " ".join(f"{t:7.1f}" for t in times) + " ms")


if __name__ == "__main__":
    main()
