"""Random, truncated and corrupted bytes in every file format the kit loads: one `llmkit: error:` line and exit
status 2 (or a normal run, where the damage happened to leave a valid file), never a traceback or a crash.

One driver process runs every format (this file is also the driver: `python test_fuzz_loaders.py SPEC LOG`), as
starting one per format cost most of the time. A crash inside a C++ loader takes that process with it: the driver
logs each case before it runs it, so the crash is that case's outcome, and a new driver goes on after it.
"""

import contextlib
import io
import json
import random
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

CASES_PER_FORMAT = 24
SEED = 22
FORMATS = ["llama2.c .bin", "safetensors", "config.json", "Meta .pth", "params.json", "gguf", "tokenizer.bin",
           "tokenizer.model", "tokenizer.json", "tokenizer_config.json", ".pt2", ".pte"]  # fmt: skip


def damaged(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """Ways a download or a disk damages a file: cut short (at the start, in the header, anywhere), replaced by
    noise, bytes overwritten in the header or anywhere, a block zeroed."""
    n = len(data)
    cases = [("empty", b""), ("4 bytes", data[:4]), ("noise", rng.randbytes(min(n, 4096)))]
    while len(cases) < CASES_PER_FORMAT:
        kind = len(cases) % 4
        if kind == 0:
            cut = rng.randrange(n)
            cases.append((f"cut at {cut}", data[:cut]))
        elif kind == 1:  # the first kilobyte holds the headers, where parsers trust what they read
            where = sorted(rng.sample(range(min(n, 1024)), 4))
            cases.append((f"header bytes {where} overwritten", overwrite(data, where, rng)))
        elif kind == 2:
            where = sorted(rng.sample(range(n), 8))
            cases.append((f"bytes {where} overwritten", overwrite(data, where, rng)))
        else:
            start = rng.randrange(n)
            cases.append((f"zeroed from {start}", data[:start] + bytes(min(4096, n - start)) + data[start + 4096 :]))
    return cases


def overwrite(data: bytes, where: list[int], rng: random.Random) -> bytes:
    out = bytearray(data)
    for i in where:
        out[i] = rng.randrange(256)
    return bytes(out)


@pytest.fixture(scope="module")
def formats(tmp_path_factory, tiny_folder, make_model, tiny_pt2, tiny_pte):
    """{format: (the file to damage, the command line that loads it)}, each from the tests' tiny model."""
    from conftest import write_gguf

    import llmkit
    from llmkit.checkpoint import save_meta
    from llmkit.pte_bench import filler_tokenizer

    root = tmp_path_factory.mktemp("formats")
    sp = tiny_folder / "tokenizer.model"
    run = ["generate", "--prompt", "the model", "--max-new-tokens", "2", "--temperature", "0"]
    hf = Path(shutil.copytree(tiny_folder, root / "hf"))
    meta = save_meta(llmkit.load(tiny_folder).model, root / "meta")
    llama2c = write_llama2c(make_model(), root / "model.bin")
    pt2, pte = (Path(shutil.copy(p, root / p.name)) for p in (tiny_pt2, tiny_pte))
    hf_tokenizer = write_hf_tokenizer(root / "hf-tok")
    return {
        "llama2.c .bin": (llama2c, [*run, "--checkpoint-path", llama2c, "--tokenizer-path", sp]),
        "safetensors": (hf / "model.safetensors", [*run, "--checkpoint-path", hf]),
        "config.json": (hf / "config.json", [*run, "--checkpoint-path", hf]),
        "Meta .pth": (meta / "consolidated.00.pth", [*run, "--checkpoint-path", meta, "--tokenizer-path", sp]),
        "params.json": (meta / "params.json", [*run, "--checkpoint-path", meta, "--tokenizer-path", sp]),
        "gguf": (write_gguf(root / "m.gguf", make_model(), sp), [*run, "--checkpoint-path", root / "m.gguf"]),
        "tokenizer.bin": (filler_tokenizer(root / "tok.bin", 300), [*run, "--tokenizer-path", root / "tok.bin",
                                                                     "--checkpoint-path", hf]),  # fmt: skip
        "tokenizer.model": (hf / "tokenizer.model", [*run, "--checkpoint-path", hf]),
        "tokenizer.json": (hf_tokenizer, [*run, "--checkpoint-path", hf, "--tokenizer-path", hf_tokenizer]),
        "tokenizer_config.json": (hf_tokenizer.parent / "tokenizer_config.json",
                                  [*run, "--checkpoint-path", hf, "--tokenizer-path", hf_tokenizer]),  # fmt: skip
        ".pt2": (pt2, [*run, "--aoti-package-path", pt2, "--tokenizer-path", sp]),
        ".pte": (pte, [*run, "--pte-path", pte, "--tokenizer-path", sp]),
    }


def write_llama2c(model, path: Path) -> Path:
    """`model` in llama2.c's version 0 format: the header, then each weight in run.c's order (q and k rows in
    interleaved-pair order), its own classifier last (a negative vocabulary size in the header says so)."""
    import struct

    import torch

    from llmkit.checkpoint import checkpoint_state, halves_to_interleaved

    a, state = model.args, checkpoint_state(model)
    heads = {"attention.wq": a.n_heads, "attention.wk": a.n_kv_heads}

    def stacked(name: str) -> torch.Tensor:
        ws = [state[f"layers.{i}.{name}.weight"] for i in range(a.n_layers)]
        return torch.stack([halves_to_interleaved(w, heads[name]) if name in heads else w for w in ws])

    order = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]  # fmt: skip
    weights = [state["tok_embeddings.weight"], *map(stacked, order), state["norm.weight"],
               torch.zeros(a.max_seq_len * a.head_dim), state["output.weight"]]  # fmt: skip
    header = struct.pack("7i", a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, -a.vocab_size, a.max_seq_len)
    path.write_bytes(header + b"".join(w.detach().float().contiguous().numpy().tobytes() for w in weights))
    return path


def write_hf_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json of 300 tokens, with the tokenizer_config.json that names its specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([f"the model reads the text number {i}" for i in range(200)], trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def outcomes(formats, tmp_path_factory) -> dict[str, list[dict]]:
    """{format: each damaged case's outcome}: one driver process over every format, and a new one after each case
    that crashed its process (that case's outcome: the exit status)."""
    root = tmp_path_factory.mktemp("fuzz")
    spec = [{"name": name, "file": str(formats[name][0]), "argv": list(map(str, formats[name][1]))} for name in FORMATS]
    (root / "spec.json").write_text(json.dumps(spec))
    originals = {Path(f["file"]): Path(f["file"]).read_bytes() for f in spec}
    results: dict[str, list[dict]] = {name: [] for name in FORMATS}
    start = (0, 0)
    try:
        while start is not None:
            log = root / f"log-{start[0]}-{start[1]}.jsonl"
            done = subprocess.run([sys.executable, __file__, str(root / "spec.json"), str(log), *map(str, start)],
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
            running, start = None, None
            for event in map(json.loads, log.read_text().splitlines() if log.exists() else []):
                if "status" in event:
                    results[FORMATS[event["format"]]].append(event)
                    running = None
                else:
                    running = event
            if done.returncode != 0:
                assert running is not None, f"the driver failed between cases: exit {done.returncode}\n{done.stderr}"
                crash = {**running, "status": f"crash (exit {done.returncode})", "errors": [],
                         "detail": done.stderr[-3000:]}  # fmt: skip
                results[FORMATS[running["format"]]].append(crash)
                for path, data in originals.items():  # the crashed driver left its damaged file in place
                    path.write_bytes(data)
                start = (running["format"], running["case"] + 1)
    finally:
        for path, data in originals.items():
            path.write_bytes(data)
    return results


@pytest.mark.parametrize("name", FORMATS)
def test_damaged_files_are_one_line_never_a_crash(outcomes, name):
    cases = outcomes[name]
    assert [c["case"] for c in cases] == list(range(CASES_PER_FORMAT)), cases
    problems = [c for c in cases if not (c["status"] == 0 or (c["status"] == 2 and len(c["errors"]) == 1))
                or c.get("traceback")]  # fmt: skip
    assert not problems, "\n".join(f"case {c['case']} ({c['what']}): {c['status']}\n{c.get('detail', '')}"
                                    for c in problems)  # fmt: skip
    assert sum(c["status"] == 2 for c in cases) >= 3, cases  # the damage was seen, not ignored


def drive(spec_file: str, log_file: str, first_format: int, first_case: int) -> int:
    """Run every damaged version of each format's file through the command line, from the given format and case
    on; log each case before it runs (a crash ends the process there) and its outcome after."""
    from llmkit.cli import main

    with open(log_file, "a", buffering=1) as log:
        for f, spec in enumerate(json.loads(Path(spec_file).read_text())):
            if f < first_format:
                continue
            target = Path(spec["file"])
            original = target.read_bytes()
            try:
                for i, (what, data) in enumerate(damaged(original, random.Random(f"{SEED} {spec['name']}"))):
                    if f == first_format and i < first_case:
                        continue
                    log.write(json.dumps({"format": f, "case": i, "what": what}) + "\n")
                    target.write_bytes(data)
                    log.write(json.dumps({"format": f, "case": i, "what": what, **run(main, spec["argv"])}) + "\n")
            finally:
                target.write_bytes(original)
    return 0


def run(main, argv: list[str]) -> dict:
    """The command line's exit status, its `llmkit: error:` lines, and whether its stderr holds a traceback."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
    except BaseException:  # noqa: BLE001 (whatever escapes the command line is the failure to report)
        status, err = "raised", io.StringIO(err.getvalue() + traceback.format_exc())
    errors = [line[:200] for line in err.getvalue().splitlines() if line.startswith("llmkit: error: ")]
    return {"status": status, "errors": errors, "traceback": "Traceback" in err.getvalue(),
            "detail": err.getvalue()[-1500:]}  # fmt: skip


if __name__ == "__main__":
    sys.exit(drive(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
