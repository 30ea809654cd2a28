"""One layer's decode attention on the GPU by batch size and cache window: the ways a serving step can compute it.

A batch of B requests, one query each, attends to a window of S cached positions under a mask, as
`llmkit.model.Attention` does in a decode step ([B, H, 1, D] queries, [B, H_kv, S, D] keys and values). Ways:
  sdpa            eager `scaled_dot_product_attention` (grouped-query shapes through `grouped_attention`), PyTorch's
                  default backend choice
  sdpa no cuDNN   the same with cuDNN's attention left out
  compiled        the model's attention code compiled with llmkit's inductor options (its graph pass writes a
                  one-query attention as loops), as the serving decode step is
  compiled, no pass  compiled with inductor's defaults
Each is timed as gemv_bench.py times a product, recorded as a CUDA graph as the serving step is (microseconds per
call, median of 5 runs of 20 replays), with the rate at which it reads the window's keys and values.

    python benchmarks/decode_attention.py --shape llama-2-7b --batch-sizes 1 16 --windows 256 1024
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from gemv_bench import time_per_call
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkit.bench import environment  # noqa: E402
from llmkit.compile import _options, own_copy  # noqa: E402
from llmkit.model import attend, shape_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-2-7b")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--windows", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    a = shape_args(args.shape, max(args.windows))
    H, H_kv, D = a.n_heads, a.n_kv_heads or a.n_heads, a.head_dim
    device, dtype = torch.device("cuda"), torch.bfloat16
    # each its own copy of `attend`, and room for every shape: past dynamo's limit of compiled shapes per code
    # object (8) a call runs eager, as the first run of this script did for its last shapes
    torch._dynamo.config.recompile_limit = 2 * len(args.batch_sizes) * len(args.windows)
    compiled = torch.compile(own_copy(attend), dynamic=False, options=_options(torch.nn.Module(), device, tune=False))
    plain = torch.compile(own_copy(attend), dynamic=False)
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    rows = []
    for S in args.windows:
        for B in args.batch_sizes:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=g)
            k, v = (torch.randn(B, H_kv, S, D, device=device, dtype=dtype, generator=g) for _ in range(2))
            mask = torch.zeros(B, 1, 1, S, device=device, dtype=dtype)
            mask[:, :, :, S // 2 :] = float("-inf")  # half the window in use, as a step's rounding leaves it

            def without_cudnn(q=q, k=k, v=v, mask=mask):
                with sdpa_kernel(no_cudnn):
                    return attend(q, k, v, mask)

            ways = {"sdpa": lambda q=q, k=k, v=v, mask=mask: attend(q, k, v, mask), "sdpa no cuDNN": without_cudnn,
                    "compiled": lambda q=q, k=k, v=v, mask=mask: compiled(q, k, v, mask),
                    "compiled, no pass": lambda q=q, k=k, v=v, mask=mask: plain(q, k, v, mask)}  # fmt: skip
            expected = without_cudnn().float()
            with torch.inference_mode():
                us = {name: time_per_call([fn]) for name, fn in ways.items()}
                error = {name: (fn().float() - expected).abs().max().item() for name, fn in ways.items()}
            kv_bytes = 2 * B * H_kv * S * D * k.element_size()
            row = {"shape": args.shape, "batch": B, "window": S, "kv_bytes": kv_bytes, "us": us,
                   "max_abs_error_vs_sdpa_no_cudnn": error, "command": "python benchmarks/decode_attention.py "
                   + " ".join(sys.argv[1:]), **environment(device)}  # fmt: skip
            rows.append(row)
            print(f"B={B:>2} S={S:>5} ({kv_bytes / 1e6:6.1f} MB): " + ", ".join(
                f"{n} {t:7.1f} us ({kv_bytes / t / 1e3:5.0f} GB/s)" for n, t in us.items()), flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
