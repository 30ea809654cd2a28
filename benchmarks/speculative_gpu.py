"""A speculative-decoding pair on the GPU: a target trained there, many times the kit's model, with the kit's
own model (data/pydoc-lm, same corpus and tokenizer) as its draft; then `llmkit bench` with the draft.

The kit's model as a target is too small to pay on a GPU: its step is a few hundred kernel launches, not a read of
its weights. A target of a few GB is bound by reading them, so checking k + 1 tokens costs about one step there.
The target is trained for minutes on the corpus the draft learned (llmkit.train's `fit`), kept in a temporary
folder (never in the repository), and measured in bfloat16 on the eager and compiled paths.

    python benchmarks/speculative_gpu.py --dim 2048 --layers 24 --steps 300 \
        --out data/benchmarks/gpu/h200-speculative.jsonl
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from llmkit.checkpoint import write_hf
from llmkit.evaluate import score_ids
from llmkit.model import ModelArgs
from llmkit.train import TrainConfig, fit, prepare_corpus, round_to_bf16

DRAFT = Path(__file__).resolve().parents[1] / "data" / "pydoc-lm"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cuda")
    p.add_argument("--speculate-k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--path", nargs="+", default=["eager", "compile"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="append results as JSON lines to this file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work, folder = Path(tmp) / "work", Path(tmp) / f"target-{args.dim}x{args.layers}"
        stats = prepare_corpus(work, tokenizer_path=DRAFT / "tokenizer.model")
        shape = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                          hidden_dim=int(8 * args.dim / 3 + 255) // 256 * 256, max_seq_len=512,
                          vocab_size=stats["vocab_size"], tie_embeddings=True)  # fmt: skip
        model, _ = fit(shape, np.load(work / "train.npy"), TrainConfig(steps=args.steps, device=args.device,
                                                                        eval_every=0))  # fmt: skip
        round_to_bf16(model)
        heldout = torch.from_numpy(np.load(work / "heldout.npy").astype(np.int64))
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
            ppl = score_ids(model, heldout, 256, args.device, progress=False)
        params = sum(t.numel() for t in model.parameters())
        print(f"target: {params / 1e6:.0f}M parameters, held-out perplexity {ppl.value:.1f} (draft's card: 95.9)")
        folder.mkdir()
        write_hf(model.to(device="cpu", dtype=torch.bfloat16), folder, work / "tokenizer.model", stats["bos_id"],
                 stats["eos_ids"])  # fmt: skip
        del model
        command = [sys.executable, "-m", "llmkit", "bench", "--checkpoint-path", str(folder),
                   "--draft-checkpoint-path", str(DRAFT), "--speculate-k", *map(str, args.speculate_k),
                   "--path", *args.path, "--device", args.device, "--dtype", "bfloat16",
                   "--new-tokens", str(args.new_tokens)]  # fmt: skip
        command += ["--out", args.out] if args.out else []
        sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
