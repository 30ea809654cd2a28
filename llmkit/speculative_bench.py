"""Measuring speculative decoding: acceptance rate and decode speed against k, with and without the draft.

Speculation pays when a verify step of k + 1 positions costs little more than a one-token decode step, which is
true where a decode step is bound by reading the weights (memory) and not by arithmetic or by the per-operator
overhead of running the model. So each row also carries the three step times that decide it: the target's
one-token step, and the two halves of a round as generation runs them: the target's verify of k + 1 positions
and the draft's step, each with its distributions (and the draft's with its draw).
"""

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmkit.bench import environment, path_name
from llmkit.compile import compile
from llmkit.data import heldout_text, paragraphs
from llmkit.devices import resolve_device, sync
from llmkit.errors import LLMKitError
from llmkit.generate import LLM
from llmkit.loading import load
from llmkit.speculative import SpeculativeLLM, check_k, load_draft, speculate

SPEC_PATHS = ("eager", "compile")


def heldout_prompts(n: int = 4, words: int = 6) -> list[str]:
    """The first `words` words of the first `n` held-out paragraphs that have more: text neither model trained on."""
    starts = [" ".join(p.split()[:words]) for p in paragraphs(heldout_text()) if len(p.split()) > 3 * words]
    return starts[:n]


@torch.inference_mode()
def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    """Median milliseconds of fn() (after two warm-up calls), the device synchronised around each."""
    times = []
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def step_ms(llm: LLM, length: int, at: int = 32) -> float:
    """Milliseconds of one forward of `length` positions starting at position `at`."""
    tokens = torch.randint(3, 100, (1, length), device=llm.device)
    return time_ms(lambda: llm.step(tokens, torch.arange(at, at + length, device=llm.device)), llm.device)


def round_ms(spec: SpeculativeLLM, temperature: float, at: int = 32) -> tuple[float, float]:
    """Milliseconds of a round's two halves as generation runs them: the draft's k guesses, per guess (its step,
    distribution and draw), and the target's verify of k + 1 positions with their distributions."""
    device, k = spec.draft.device, spec.k
    sampling = (temperature, None, None)
    token = torch.randint(3, 100, (1,), device=device)
    noise = torch.empty(k, spec.tokenizer.vocab_size, device=device).exponential_()
    with torch.inference_mode():
        verify = torch.cat([token, spec.propose(token, at, noise, sampling)[0]])
    return time_ms(lambda: spec.propose(token, at, noise, sampling), device) / k, time_ms(
        lambda: spec.score(verify, at, sampling), device)  # fmt: skip


def bench_speculative(
    target_path: str = "default",
    draft_path: str | Path = "data/pydoc-lm-draft",
    ks: list[int] = (1, 2, 4, 8),
    paths: list[str] = ("eager",),
    device: str = "cpu",
    dtype: str = "float32",
    new_tokens: int = 64,
    temperature: float = 0.0,
    repeats: int = 2,
    prompts: list[str] | None = None,
    out: str | Path | None = None,
    command: str | None = None,
) -> list[dict]:
    """Decode speed of the target alone (k = 0) and with the draft at each k, on each path, over held-out prompts.

    Each (path, k) generates `new_tokens` from every prompt `repeats` times (seeds 0, 1, ...); the row's speed
    is the median over those runs and its acceptance rate pools them all. JSON lines are appended to `out`.
    """
    for k in ks:
        check_k(k)
    bad = [p for p in paths if p not in SPEC_PATHS]
    if bad or not paths:
        raise LLMKitError(f"speculative decoding is measured on the paths {', '.join(SPEC_PATHS)}, not {bad or paths}")
    if out is not None and (not Path(out).parent.is_dir() or Path(out).is_dir()):
        raise LLMKitError(f"--out {out}: give a file in an existing folder (results are appended to it)")
    prompts = prompts or heldout_prompts()
    env = {**environment(resolve_device(device)), "command": command}  # environment() names the commit
    rows = []
    for path, k in tqdm([(p, k) for p in paths for k in [0, *ks]], desc="bench", unit="run"):
        target = load(target_path, device=device, dtype=dtype)
        draft = load_draft(draft_path, target, device, dtype)
        llm = target if k == 0 else speculate(target, draft, k)
        if path == "compile":
            compile(llm)
        llm.generate(prompts[0], max_new_tokens=8, temperature=temperature, seed=0)  # warm-up
        runs = [llm.generate(p, max_new_tokens=new_tokens, temperature=temperature, seed=seed)
                for seed in range(repeats) for p in prompts]  # fmt: skip
        speeds = [r.stats.decode_tokens_per_s for r in runs]
        draft_ms, verify_ms = round_ms(llm, temperature) if k else (None, None)
        row = {
            "source": target_path, "draft": None if k == 0 else str(draft_path), "path": path, "k": k,
            "device": device, "dtype": dtype, "temperature": temperature, "new_tokens": new_tokens,
            "prompts": len(prompts), "repeats": repeats,
            "decode_tokens_per_s": statistics.median(speeds),
            "decode_tokens_per_s_stdev": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
            "new_tokens_total": sum(r.stats.new_tokens for r in runs),
            "target_step_ms": step_ms(target, 1),
            "draft_step_ms": draft_ms,
            "verify_step_ms": verify_ms,
            "compile_fallback": llm.compile_fallback,  # not None: "compile" ran eager, for this reason
            **env, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        if k:
            proposed = sum(r.stats.proposed for r in runs)
            rounds = sum(r.stats.rounds for r in runs)
            row["acceptance_rate"] = sum(r.stats.accepted for r in runs) / proposed if proposed else 0.0
            row["tokens_per_round"] = (sum(r.stats.accepted for r in runs) + rounds) / rounds if rounds else 0.0
        rows.append(row)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def spec_table(rows: list[dict]) -> str:
    """A Markdown table: speed against the target alone on the same path, and why (acceptance, step costs)."""
    alone = {r["path"]: r["decode_tokens_per_s"] for r in rows if r["k"] == 0}
    lines = [
        "| path | k | decode tok/s | speed-up | acceptance | tokens per round | target step ms | verify ms | "
        "draft step ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = alone.get(r["path"])
        speedup = f"{r['decode_tokens_per_s'] / base:.2f}x" if base else "-"
        if r["k"]:
            how = (f"{100 * r['acceptance_rate']:.0f}% | {r['tokens_per_round']:.2f} | {r['target_step_ms']:.2f} | "
                   f"{r['verify_step_ms']:.2f} | {r['draft_step_ms']:.2f}")  # fmt: skip
        else:
            how = f"- | 1 | {r['target_step_ms']:.2f} | - | -"
        lines.append(f"| {path_name(r)} | {r['k']} | {r['decode_tokens_per_s']:.1f} | {speedup} | {how} |")
    return "\n".join(lines)
