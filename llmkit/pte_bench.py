"""A `.pte` measured as an app runs it: ExecuTorch's C++ text LLM runner in a fresh process, its speed and memory.

`measure_pte` starts `python -m llmkit.pte_bench` on the program, which loads it in ExecuTorch's
`TextLLMRunner`, warms up, prefills a prompt and decodes, three times, and reports the median
prefill and decode speeds and the process's peak resident memory. A fresh process, because an app
starts with nothing loaded, and because a process's peak memory only ever grows. A random-weight
model has no tokenizer; `filler_tokenizer` writes one of its vocabulary size for the runner.
"""

import json
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from llmkit.errors import LLMKitError
from llmkit.executorch import executorch_tokenizer, import_executorch_ops
from llmkit.tokenizer import Tokenizer

RESULT = "RESULT "  # marks the result line: the runner prints its text and its log to the same stdout


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's
    peak into a child through fork and exec, so a child started from a notebook would report the notebook's."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def run_runner(program: str, tokenizer: str, prompt: str, new_tokens: int, runs: int = 3) -> dict:
    """In this process: the C++ runner on `program`, one warm-up then `runs` generations (medians reported).

    rss_imports_mb is the peak after importing torch and ExecuTorch's Python modules, which an app does not
    carry; rss_peak_mb the peak at the end."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    import_executorch_ops()
    imports = peak_rss_mb()
    runner = TextLLMRunner(program, tokenizer)

    def run(n: int) -> tuple[float, float]:
        stats = []
        runner.reset()
        config = GenerationConfig(echo=False, max_new_tokens=n, temperature=0.0, num_bos=1)
        runner.generate(prompt, config, None, stats.append)
        s = stats[0]  # whole milliseconds: at least 1, so a very fast phase reads as fast, not as a division by 0
        return (s.num_prompt_tokens / max(s.prompt_eval_end_ms - s.inference_start_ms, 1) * 1000,
                s.num_generated_tokens / max(s.inference_end_ms - s.first_token_ms, 1) * 1000)  # fmt: skip

    run(8)
    timings = [run(new_tokens) for _ in range(runs)]
    prefill, decode = zip(*timings, strict=True)
    return {"rss_imports_mb": imports, "rss_peak_mb": peak_rss_mb(),
            "prefill": statistics.median(prefill), "decode": statistics.median(decode)}  # fmt: skip


def filler_prompt(tokenizer: Tokenizer, n_tokens: int = 96) -> str:
    """A prompt of about n_tokens tokens (the runner re-encodes it) of ordinary words."""
    ids = tokenizer.encode(" ".join(["the value of the function"] * n_tokens), bos=False)[:n_tokens]
    return tokenizer.decode(ids)


def measure_pte(path: str | Path, tokenizer: Tokenizer, new_tokens: int = 64, prompt_tokens: int = 96) -> dict:
    """Peak resident memory and the C++ runner's prefill and decode tokens/s on a `.pte`, in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="llmkit-pte-bench-") as tmp:
        tok_file = executorch_tokenizer(tokenizer, Path(tmp))
        args = [str(path), str(tok_file), filler_prompt(tokenizer, prompt_tokens), str(new_tokens)]
        done = subprocess.run([sys.executable, "-m", "llmkit.pte_bench", *args], capture_output=True, text=True)
    _, found, result = done.stdout.rpartition(RESULT)  # the runner's unfinished last line may precede it
    if done.returncode or not found:
        last = (done.stderr.strip().splitlines() or ["no error output"])[-1]  # a traceback's last line says what
        raise LLMKitError(f"measuring {path} failed (exit {done.returncode}): {last}")
    r = json.loads(result.splitlines()[0])
    return {"peak RSS MB": r["rss_peak_mb"], "above imports MB": r["rss_peak_mb"] - r["rss_imports_mb"],
            "prefill tok/s": r["prefill"], "decode tok/s": r["decode"]}  # fmt: skip


def filler_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """A llama2.c tokenizer.bin of vocab_size tokens, to run a random-weight model of that vocabulary.

    <unk>, <s>, </s>, the 256 byte tokens (those of bytes 0x80 and up renamed, so that no token is a broken
    UTF-8 character, which the runner's Python binding cannot hand over), the space, then filler words.
    What a random model writes is noise anyway."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b if b < 0x80 else b"<x%02X>" % b for b in range(256)]
    if vocab_size <= len(pieces):
        raise LLMKitError(f"a filler tokenizer has at least {len(pieces) + 1} tokens; {vocab_size} is too few")
    pieces += [b" "] + [b" w%d" % i for i in range(vocab_size - len(pieces) - 1)]
    records = b"".join(struct.pack("<fi", -float(i), len(p)) + p for i, p in enumerate(pieces))
    path = Path(path)
    path.write_bytes(struct.pack("<i", max(map(len, pieces))) + records)
    return path


if __name__ == "__main__":  # python -m llmkit.pte_bench PROGRAM TOKENIZER PROMPT NEW_TOKENS (measure_pte starts it)
    program, tokenizer, prompt, new_tokens = sys.argv[1:5]
    print(RESULT + json.dumps(run_runner(program, tokenizer, prompt, int(new_tokens))), flush=True)
