"""llmkit against llama.cpp on one GGUF model, at each thread count: decode speed and greedy text, in one run.

    python benchmarks/llamacpp_compare.py --llama-cpp PATH [--gguf FILE] [--threads 1 2] [--out FILE.jsonl]

PATH is a llama.cpp source tree (not vendored), e.g. the one inside PyPI's llama-cpp-python source package
(`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`, then its vendor/llama.cpp). The script
builds llama-bench and llama-simple there with GGML_NATIVE=ON unless built already, writes F32 and Q8_0 copies of
FILE (default: SmolLM2-135M-Instruct.Q4_1.gguf from `make smollm2`) with `llmkit.gguf.convert`, and measures:
- llama.cpp: `llama-bench -p 0 -n NEW` (decode only) on the F32, Q8_0 and original files;
- llmkit: `llmkit bench --prompt-len 8 --new-tokens NEW` on the F32 file (float32, int8wo, 8da4w-32) and with
  `--quantize gguf` on the Q8_0 and original files, each in a process of its own;
- greedy text: llama-simple's continuation of a prompt from the F32 file against `llmkit generate --temperature 0`.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from llmkit.bench import bench_in_subprocess, environment, table
from llmkit.gguf import convert

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
GREEDY_TOKENS = 32
# (file, scheme, path, the llama.cpp file of comparable precision): the F32 file for float32 and torchao's
# schemes, each GGUF file for its own blocks
LLMKIT_RUNS = (("f32", "none", "compile", "f32"), ("f32", "none", "pte", "f32"), ("f32", "int8wo", "compile", "q8_0"),
               ("f32", "int8wo", "aoti", "q8_0"), ("f32", "8da4w-32", "pte", "original"),
               ("q8_0", "gguf", "compile", "q8_0"), ("original", "gguf", "compile", "original"))  # fmt: skip


def build(source: Path) -> Path:
    """llama.cpp's build folder with llama-bench and llama-simple, built for this CPU when missing."""
    out = source / "build"
    if not (out / "bin" / "llama-bench").is_file() or not (out / "bin" / "llama-simple").is_file():
        options = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                   "-DLLAMA_BUILD_SERVER=OFF"]  # fmt: skip
        subprocess.run(["cmake", "-S", source, "-B", out, *options], check=True)
        subprocess.run(["cmake", "--build", out, "-j", str(os.cpu_count()), "--target", "llama-bench", "llama-simple"],
                       check=True)  # fmt: skip
    return out / "bin"


def llama_bench(bin: Path, model: Path, threads: int, new_tokens: int, repeats: int) -> float:
    """llama-bench's mean decode tokens/s over `repeats` generations of `new_tokens` from an empty context."""
    out = subprocess.run([bin / "llama-bench", "-m", model, "-p", "0", "-n", str(new_tokens), "-t", str(threads),
                          "-r", str(repeats), "-o", "jsonl"], capture_output=True, text=True, check=True)  # fmt: skip
    (row,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return row["avg_ts"]


def llama_simple(bin: Path, model: Path, prompt: str, new_tokens: int) -> str:
    """llama-simple's greedy continuation of `prompt` (it prints the prompt, then what it generates)."""
    out = subprocess.run([bin / "llama-simple", "-m", model, "-n", str(new_tokens), prompt], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return out.stdout.split(prompt, 1)[1] if prompt in out.stdout else out.stdout


def llmkit_generate(model: Path, prompt: str, new_tokens: int) -> str:
    out = subprocess.run([sys.executable, "-m", "llmkit", "generate", "--checkpoint-path", model, "--prompt", prompt,
                          "--max-new-tokens", str(new_tokens), "--temperature", "0"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return out.stdout.split(prompt, 1)[1].rstrip("\n") if prompt in out.stdout else out.stdout



def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree")
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="the model (default: make smollm2's SmolLM2)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-cpp-only", action="store_true", help="llama.cpp's figures and the greedy check alone")
    p.add_argument("--workdir", type=Path, default=REPO / "results" / "llamacpp")
    p.add_argument("--out", type=Path, default=None, help="append the rows as JSON lines to this file")
    args = p.parse_args()
    if not (args.llama_cpp / "CMakeLists.txt").is_file():
        p.error(f"{args.llama_cpp} is not a llama.cpp source tree (no CMakeLists.txt)")
    if not args.gguf.is_file():
        p.error(f"{args.gguf} not found; `make smollm2` fetches the default")
    bin = build(args.llama_cpp)
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = {"original": args.gguf.resolve()}
    for kind in ("f32", "q8_0"):
        files[kind] = args.workdir / f"{args.gguf.stem}.{kind}.gguf"
        if not files[kind].is_file():
            convert(args.gguf, files[kind], kind)
    theirs_text = llama_simple(bin, files["f32"], PROMPT, GREEDY_TOKENS)
    ours_text = llmkit_generate(files["f32"], PROMPT, GREEDY_TOKENS)
    same = theirs_text.strip() == ours_text.strip()
    print(f"greedy from the F32 file, {GREEDY_TOKENS} tokens: {'the same text' if same else 'DIFFERENT'}\n"
          f"  llama.cpp: {theirs_text!r}\n  llmkit:    {ours_text!r}")  # fmt: skip
    env = environment(torch.device("cpu"))
    rows = [{"source": "greedy", "prompt": PROMPT, "new_tokens": GREEDY_TOKENS, "llama_cpp_text": theirs_text,
             "llmkit_text": ours_text, "same_text": same, **env}]  # fmt: skip
    for threads in args.threads:
        torch.set_num_threads(threads)
        env = environment(torch.device("cpu"))
        ref = {}
        for kind, model in files.items():
            ref[kind] = llama_bench(bin, model, threads, args.new_tokens, args.repeats)
            rows.append({"command": f"llama-bench -m {model.name} -p 0 -n {args.new_tokens} -t {threads} "
                                    f"-r {args.repeats}", "source": "llama.cpp", "file": kind,
                         "decode_tokens_per_s": ref[kind], **env})  # fmt: skip
        print(f"\n{threads} thread(s), llama.cpp: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in ref.items()))
        if args.llama_cpp_only:
            continue
        ours = []
        for kind, scheme, path, versus in LLMKIT_RUNS:
            row = bench_in_subprocess(files[kind], scheme, path, threads, 8, args.new_tokens, args.repeats,
                                      args.workdir)
            row |= {"file": kind, "llama_cpp_file": versus, "llama_cpp_tokens_per_s": ref[versus],
                    "vs_llama_cpp": row["decode_tokens_per_s"] / ref[versus]}  # fmt: skip
            ours.append(row)
        print(table(ours))
        for r in ours:
            versus = f"{r['vs_llama_cpp']:.2f}x llama.cpp {r['llama_cpp_file']}"
            print(f"{r['file']:>9} {r['scheme']:>9} {r['path']:<8} {versus}")
        rows += ours
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
