"""One rank of the tensor-parallel checks in test_distributed.py (started by llmkit.distributed.launch, or alone
for the one-process reference): greedy decoding of a fixed prompt, whose tokens and logits rank 0 saves."""

import sys
import warnings
from pathlib import Path

import torch

import llmkit
from llmkit import distributed
from llmkit.generate import LLM

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402

PROMPT = [1, 17, 42, 5, 63, 8, 23]
NEW_TOKENS = 12


def build(name: str) -> LLM:
    if name == "default":
        return llmkit.load("default", max_seq_len=64)
    # grouped-query (4 query heads, 2 key/value heads) with an untied output layer and q/k/v biases: every part of
    # the split (the default model ties its output layer to the embedding and has no biases)
    return LLM(tiny_model(qkv_bias=True), None, name="gqa")


@torch.inference_mode()
def greedy(llm: LLM) -> tuple[list[int], torch.Tensor]:
    """Tokens and the logits of every step (prefill's last position, then each decode)."""
    logits = llm.step(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))[0, -1]
    tokens, rows = [], [logits]
    for pos in range(len(PROMPT), len(PROMPT) + NEW_TOKENS):
        tokens.append(int(logits.argmax()))
        logits = llm.step(torch.tensor([[tokens[-1]]]), torch.tensor([pos]))[0, -1]
        rows.append(logits)
    return tokens, torch.stack(rows)


def main(out: str, tp: int, runs: list[str]) -> None:
    torch.set_num_threads(1)
    results = {}
    for run in runs:
        name, compiled = run.split("-") if "-" in run else (run, "")
        llm = build(name)
        if tp > 1:
            distributed.tensor_parallel(llm, tp)
            try:  # torchao would quantize each rank's part as if it were the whole weight: refused
                llmkit.quantize(llm, "int8wo")
                results["quantize"] = "quantized a split model"
            except llmkit.LLMKitError as e:
                results["quantize"] = str(e)
        if compiled:
            with warnings.catch_warnings():
                # a fall-back to eager must fail the check, not pass it
                warnings.filterwarnings("error", "torch.compile can.t compile")
                llmkit.compile(llm)
        results[run] = greedy(llm)
    if distributed.rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
