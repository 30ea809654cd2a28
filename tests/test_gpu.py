"""The GPU paths agree with eager PyTorch on the GPU: run on a machine with CUDA, skipped elsewhere.

`llmkit.compile` on a GPU records the compiled decode step as a CUDA graph and replays it. Both
models here have the same weights; each is fed the same tokens, one step at a time, and the logits
of every step are compared. Tolerance: bfloat16 keeps 8 bits of mantissa, and the compiled step sums
its products in another order than cuBLAS (in float32, rounded to bfloat16 at each layer), so
logits of size ~1 may differ by a few bfloat16 steps (0.0156 between 2 and 4). We allow 0.1;
measured on an H100 (torch 2.11, `python -m pytest -s tests/test_gpu.py` prints it), logits up to
2.34: 0.027 unquantized (0.023 with one key head per query head), 0.025 int8wo, 0.027 int4wo-128.
"""

import pytest
import torch

from llmkit.compile import compile
from llmkit.generate import LLM
from llmkit.model import ModelArgs
from llmkit.quantize import quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512, max_seq_len=64)
TOLERANCE = 0.1


def _model(make_model, scheme: str, n_kv_heads: int, **changes) -> LLM:
    # std 0.2: logits ~1
    model = make_model(ARGS, std=0.2, dtype=torch.bfloat16, device="cuda", n_kv_heads=n_kv_heads, **changes)
    llm = LLM(model, None, name=scheme)
    if scheme != "none":
        quantize(llm, scheme)
    return llm


@torch.inference_mode()
def _logits(llm: LLM, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a 4-token prefill, then of one-token decode steps over the rest of `tokens`."""
    out = [llm.step(tokens[:, :4], torch.arange(4, device="cuda"))[:, -1]]
    for pos in range(4, tokens.shape[1]):
        out.append(llm.step(tokens[:, pos : pos + 1], torch.tensor([pos], device="cuda"))[:, -1])
    return torch.stack(out).float()


# Grouped key heads (2 for 4 query heads) and one per query head, as llama-2-7b: SDPA may pick another
# kernel for each.
@pytest.mark.parametrize("scheme, n_kv_heads", [("none", 2), ("none", 4), ("int8wo", 2), ("int4wo-128", 2)])
def test_compiled_decode_on_the_gpu_matches_eager(scheme, n_kv_heads, make_model):
    tokens = torch.randint(0, ARGS.vocab_size, (1, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def model() -> LLM:
        return _model(make_model, scheme, n_kv_heads)

    eager = _logits(model(), tokens)
    compiled = compile(model())
    other = compile(model())  # a second graph in the same process leaves the first one alone
    diff = (_logits(compiled, tokens) - eager).abs().max().item()
    print(f"MEASURED {scheme}, {n_kv_heads} key heads: max |compiled - eager| = {diff:.4f}, "
          f"logits up to {eager.abs().max():.2f}")
    assert diff <= TOLERANCE
    assert (_logits(other, tokens) - eager).abs().max() <= TOLERANCE


def test_serving_engine_compiled_per_batch_size_matches_eager_on_the_gpu(make_model):
    """`serve --compile` on a GPU: a CUDA graph per batch size (1, 2, 4) and cache window (256, 512, 600), batches
    of 3 padded to 4, the positions in use rounded up to a window. The logits of every row of every step, batched,
    against the eager batched step on the same rows and positions (same tolerance)."""
    from llmkit.compile import compile_batched_decode, decode_windows

    llm = _model(make_model, "none", 2, max_seq_len=600)
    assert decode_windows(600) == [256, 512, 600]
    llm.model.setup_buffers(4)
    step = compile_batched_decode(llm, 4)
    prompts = torch.randint(0, ARGS.vocab_size, (3, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.inference_mode():
        llm.model(prompts, torch.arange(8, device="cuda")[None].expand(3, 8))  # each row's prompt in its cache row
        tokens, positions, diffs = prompts[:, -1:], torch.full((3, 1), 8, device="cuda"), []
        # requests leave: the batch shrinks, padded to 4, then 2 and 1; the engine's windows, then the whole cache
        for rows, cache_len in ((3, 16), (3, 300), (2, 512), (2, None), (1, 256)):
            compiled = step(tokens[:rows], positions[:rows], cache_len=cache_len)[:, -1].float()
            # rewrites the same cache entries
            eager = llm.model(tokens[:rows], positions[:rows], cache_len=cache_len)[:, -1].float()
            diffs.append((compiled - eager).abs().max().item())
            tokens, positions = eager.argmax(-1, keepdim=True), positions + 1
    print(f"MEASURED serving engine, compiled per batch size and window: max |compiled - eager| = {max(diffs):.4f}")
    assert max(diffs) <= TOLERANCE


def test_serving_prefill_compiled_matches_eager_on_the_gpu(make_model):
    """`serve --compile`'s prefill on a GPU (dynamic graphs, cuDNN attention left out): logits of prompts of
    several rows and lengths, one token among them, alone or after running rows' next tokens, against eager's
    (same tolerance)."""
    from llmkit.compile import compile_batched_prefill

    llm = _model(make_model, "none", 2)
    llm.model.setup_buffers(4)
    prefill, g, diffs = compile_batched_prefill(llm), torch.Generator("cuda").manual_seed(2), []

    def block(rows: int, length: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, ARGS.vocab_size, (rows, length), device="cuda", generator=g)
        return tokens, torch.arange(start, start + length, device="cuda").expand(rows, length)

    with torch.inference_mode():
        for running, rows, length in [(0, 1, 1), (0, 3, 7), (0, 4, 12), (2, 2, 5), (3, 1, 9)]:
            blocks = [block(running, 1, 20)] * bool(running) + [block(rows, length, 0)]
            compiled = [t.float() for t in prefill(blocks, 64)]
            eager = llm.model.forward_blocks(blocks, 64)
            diffs += [(a - b.float()).abs().max().item() for a, b in zip(compiled, eager, strict=True)]
    print(f"MEASURED serving prefill, compiled: max |compiled - eager| = {max(diffs):.4f}")
    assert max(diffs) <= TOLERANCE
