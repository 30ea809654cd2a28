"""Bad input on the command line, class by class: exit status 2, one line on stderr naming the problem and the
fix, no traceback, and nothing the user had changed or left behind."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from conftest import write_gguf

from llmkit.checkpoint import save_hf
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.files import write_file_atomically
from llmkit.loading import DEFAULT_MODEL

TOKENIZER = DEFAULT_MODEL / "tokenizer.model"  # SentencePiece, 4096 tokens


def refused(capsys, *argv: str, says: str) -> str:
    """Run the command line; it must exit 2 with one `llmkit: error:` line that says `says`, and no traceback."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("llmkit: error: ")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert says in errors[0], errors[0]
    return errors[0]


# ---- checkpoints ------------------------------------------------------------------------------------------


def test_weights_without_their_config(tmp_path, capsys):
    (tmp_path / "x.pth").write_bytes(b"not read")
    refused(capsys, "generate", "--checkpoint-path", tmp_path / "x.pth", says="params.json is missing")
    (tmp_path / "x.safetensors").write_bytes(b"not read")
    refused(capsys, "generate", "--checkpoint-path", tmp_path / "x.safetensors", says="config.json is missing")


@pytest.mark.parametrize(("name", "text", "says"), [
    ("config.json", "[1, 2]", "holds a JSON list, not an object"),
    ("config.json", '{"architectures": ["LlamaForCausalLM"]}', "does not describe a model (KeyError"),
    ("config.json", '{"architectures": ["LlamaForCausalLM"], "hidden_size": "64"', "is not valid JSON"),
    ("params.json", "{dim: 64}", "is not valid JSON"),
])  # fmt: skip
def test_a_broken_config_file(tmp_path, capsys, name, text, says):
    (tmp_path / name).write_text(text)
    refused(capsys, "generate", "--checkpoint-path", tmp_path, says=says)


def test_a_broken_shard_index(tmp_path, capsys, tiny_folder):
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "m"))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    refused(capsys, "generate", "--checkpoint-path", folder, says="has no weight_map")


@pytest.fixture
def tiny_gguf(tmp_path, make_model, sentencepiece_model):
    """A GGUF writer over the tests' small model: `tiny_gguf(name, **write_gguf's options)`."""
    return lambda name, **options: write_gguf(
        tmp_path / name, make_model(), sentencepiece_model(tmp_path / "sp"), **options
    )


def test_bad_gguf_files(tmp_path, capsys, tiny_gguf):
    (tmp_path / "text.gguf").write_text("not a GGUF file")
    refused(capsys, "generate", "--checkpoint-path", tmp_path / "text.gguf", says="or a truncated one")
    refused(capsys, "generate", "--checkpoint-path", tmp_path / "none.gguf", says="checkpoint not found")
    whole = tiny_gguf("whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) - 1000])
    refused(capsys, "generate", "--checkpoint-path", tmp_path / "cut.gguf", says="truncated")
    (tmp_path / "header.gguf").write_bytes(whole[:100])
    refused(capsys, "generate", "--checkpoint-path", tmp_path / "header.gguf", says="or a truncated one")
    path = tiny_gguf("qwen.gguf", architecture="gpt2")
    refused(capsys, "generate", "--checkpoint-path", path, says="GGUF architecture 'gpt2' is not supported")
    path = tiny_gguf("q5.gguf", types={"blk.0.attn_v.weight": gguf.GGMLQuantizationType.Q5_0})
    refused(capsys, "generate", "--checkpoint-path", path, says="tensor blk.0.attn_v.weight is Q5_0; llmkit reads")


def test_a_gguf_whose_vocabulary_is_larger_than_its_model(tmp_path, capsys, make_model, sentencepiece_model):
    path = write_gguf(tmp_path / "m.gguf", make_model(vocab_size=260), sentencepiece_model(tmp_path / "sp"))
    refused(capsys, "generate", "--checkpoint-path", path, says="has 300 tokens but the model knows 260")


def test_a_llama2c_header_whose_sizes_do_not_fit(tmp_path, capsys):
    path = tmp_path / "m.bin"
    path.write_bytes(struct.pack("7i", 65, 96, 1, 8, 8, 32, 16) + bytes(4 * 37893))  # as many floats as it says
    refused(capsys, "generate", "--checkpoint-path", path, "--tokenizer-path", TOKENIZER, says="does not fit together")


def test_weights_holding_nan_are_a_broken_checkpoint(tmp_path, capsys, make_model, tiny_folder):
    model = make_model()
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight[0, 0] = float("nan")
    folder = save_hf(model, tmp_path / "m", tokenizer_path=tiny_folder / "tokenizer.model")
    refused(capsys, "generate", "--checkpoint-path", folder, "--max-new-tokens", 4, says="weights are broken")


# ---- tokenizers, prompts and sampling ---------------------------------------------------------------------


def test_a_smaller_tokenizer_than_the_model_only_ever_sees_its_own_ids(shared_data, capsys):
    """llama2.c's 512-token tokenizer on the 4096-token default model: generation never picks an id it lacks."""
    import llmkit

    llm = llmkit.load("default", tokenizer=shared_data / "stories260K" / "tok512.bin")
    out = llm.generate("Once upon a time", max_new_tokens=40, temperature=1.0, top_k=None, seed=0)
    assert out.tokens and max(out.tokens) < 512


def test_a_prompt_that_is_not_utf8(capsys):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over such a command-line argument
    refused(capsys, "generate", "--prompt", prompt, says="not valid UTF-8")


def test_a_tiny_temperature_is_greedy_not_nan(capsys):
    assert main(["generate", "--prompt", "The", "--max-new-tokens", "8", "--temperature", "1e-45"]) == 0
    tiny = capsys.readouterr().out
    assert main(["generate", "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert tiny == capsys.readouterr().out


@pytest.mark.parametrize("value", ["-1", "0", "1"])
def test_a_context_too_short_to_generate(capsys, value):
    refused(capsys, "generate", "--max-seq-len", value, says="max-seq-len must be at least 2")


def test_a_scheme_file_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "scheme.json").write_bytes(b'{"linear:int8": {"groupsize": 0}}\xff\xfe')
    refused(capsys, "generate", "--quantize", tmp_path / "scheme.json", says="is not UTF-8 text")


# ---- writing ----------------------------------------------------------------------------------------------


def test_export_onto_a_folder_fails_before_the_slow_part(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    refused(capsys, "export", "--output-aoti-package-path", tmp_path / "adir", "--force", says="is a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["adir"]


def test_export_never_replaces_the_tokenizer_beside_it_silently(tmp_path):
    import llmkit
    from llmkit.aoti import export_aoti

    beside = tmp_path / "m.tokenizer.model"
    beside.write_text("mine")
    with pytest.raises(LLMKitError, match="m.tokenizer.model already exists"):
        export_aoti(llmkit.load("default"), tmp_path / "m.pt2")
    assert beside.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [beside.name]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_into_a_read_only_folder(tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        refused(capsys, "export", "--output-pte-path", tmp_path / "m.pte", says="is not writable")
    finally:
        tmp_path.chmod(0o755)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    def fill_the_disk(tmp: str) -> None:
        Path(tmp).write_bytes(b"part of it")
        raise OSError(28, "No space left on device")

    with pytest.raises(LLMKitError, match=r"cannot write .*m\.pt2 \(No space left on device\)"):
        write_file_atomically(tmp_path / "m.pt2", fill_the_disk)
    assert not list(tmp_path.iterdir())


# ---- benchmarks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "says"), [
    (["--prompt-len", "0"], "--prompt-len must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--out", "no-such-folder/r.jsonl"], "give a file in an existing folder"),
])  # fmt: skip
def test_bench_refuses_before_measuring(capsys, argv, says):
    refused(capsys, "bench", "--shape", "stories15M", *argv, says=says)


def test_bench_names_a_missing_checkpoint_as_a_checkpoint_not_a_shape(capsys):
    refused(capsys, "bench", "--checkpoint-path", "stories15M.bni", says="checkpoint not found: stories15M.bni")


def test_bench_with_fewer_new_tokens_than_its_warm_up(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--checkpoint-path", "default", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["new_tokens"] == 2


# ---- model lists and sweeps -------------------------------------------------------------------------------


@pytest.mark.parametrize(("entries", "says"), [
    ([{"repo": "a/b"}], "holds a JSON list"),
    ({"m": {"repo": "a/b", "files": ["m.bin", "tok.bin"], "format": "llama2c", "checkpoint": "m.bin",
            "tokenizer": "tok.bin", "size_mb": "1", "gated": False}}, "size_mb is '1'; it must be a int"),
    ({"m": {"repo": "a/b", "files": "m.bin", "format": "llama2c", "checkpoint": "m.bin", "tokenizer": "m.bin",
            "size_mb": 1, "gated": False}}, "must be a list of file names"),
])  # fmt: skip
def test_a_malformed_model_list(tmp_path, capsys, monkeypatch, entries, says):
    (tmp_path / "models.json").write_text(json.dumps(entries))
    monkeypatch.setenv("LLMKIT_MODELS", str(tmp_path / "models.json"))
    refused(capsys, "list", says=says)


@pytest.mark.parametrize(("text", "says"), [
    ("just a string", "holds a YAML str"),
    ("name: s\nnotebook: n.ipynb\ngrid: {a: 1}", "non-empty list of values"),
    ("name: s\nnotebook: n.ipynb\ngrid: {a: [1]}\nparameters: [1]", "parameters must be a mapping"),
    ("name: ../../escaped\nnotebook: n.ipynb\ngrid: {a: [1]}", "must be a plain folder name"),
])  # fmt: skip
def test_a_malformed_sweep(tmp_path, capsys, text, says):
    (tmp_path / "n.ipynb").write_text("{}")
    (tmp_path / "sweep.yaml").write_text(text.replace("n.ipynb", str(tmp_path / "n.ipynb")))
    refused(capsys, "sweep", tmp_path / "sweep.yaml", "--results-dir", tmp_path / "results", says=says)
    assert not (tmp_path / "results").exists() and not (tmp_path.parent / "escaped").exists()


def test_a_pte_whose_identifier_is_not_text_is_refused_not_a_crash(tmp_path):
    """ExecuTorch's runtime aborts the whole process on such a file, so the command runs in a process of its own."""
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\0\0\0\0\xff\xfe\xcd\x80" + bytes(4088))
    done = subprocess.run([sys.executable, "-m", "llmkit", "generate", "--pte-path", str(bad), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("llmkit: error: ") and "file identifier" in done.stderr


# ---- files a loader reads beside the weights, and torch files -----------------------------------------------


@pytest.mark.parametrize(("text", "says"), [
    ("{broken", "tokenizer_config.json is not valid JSON"),
    ('["a list"]', "tokenizer_config.json holds a JSON list"),
    ('{"chat_template": 7}', "chat_template is not text"),
])  # fmt: skip
def test_a_corrupt_tokenizer_config_is_one_line_not_a_silent_change(tmp_path, capsys, monkeypatch, tiny_folder,
                                                                      text, says):  # fmt: skip
    """It holds the chat template and the special tokens: ignoring it would change both without a word."""
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "m"))
    (folder / "tokenizer_config.json").write_text(text)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    refused(capsys, "chat", "--checkpoint-path", folder, says=says)


def test_a_corrupt_config_beside_a_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models

    from llmkit.tokenizer import load_tokenizer

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_bytes(b'{"eos_token_id": \xff}')
    with pytest.raises(LLMKitError, match="generation_config.json is not valid JSON"):
        load_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not a zip", b"\x80\x02}q\x00X\x01"])
def test_a_damaged_pth_names_the_file(tmp_path, capsys, tiny_folder, damage):
    from llmkit.checkpoint import save_meta
    from llmkit.loading import load

    folder = save_meta(load(tiny_folder).model, tmp_path / "meta")
    (folder / "consolidated.00.pth").write_bytes(damage)
    refused(capsys, "generate", "--checkpoint-path", folder, "--tokenizer-path", tiny_folder / "tokenizer.model",
            says="consolidated.00.pth is damaged or not a PyTorch file")  # fmt: skip


# ---- sampling options and messages ------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "says"), [
    (["--stop", ""], "a stop string is empty"),
    (["--stop", "x", "--stop", ""], "a stop string is empty"),
    (["--temperature", "nan"], "temperature must be 0 (greedy) or a finite number"),
    (["--temperature", "inf"], "temperature must be 0 (greedy) or a finite number"),
])  # fmt: skip
def test_sampling_options_that_mean_nothing(capsys, argv, says):
    refused(capsys, "generate", "--prompt", "The", "--max-new-tokens", "4", *argv, says=says)


@pytest.mark.parametrize("run", [["--pte-path", "m.pte"], ["--aoti-package-path", "m.pt2"]])
@pytest.mark.parametrize("flags", [["--quantize", "int8wo"], ["--device", "cuda"], ["--compile"],
                                   ["--max-seq-len", "64"], ["--checkpoint-path", "other"]])  # fmt: skip
def test_flags_an_exported_program_cannot_honour_are_refused_not_ignored(capsys, run, flags):
    refused(capsys, "generate", *run, *flags, says=f"{flags[0]} can't change the program {run[0]} runs")


def test_the_quantize_hints_name_schemes_that_run(capsys, shared_data):
    """Each scheme a refusal suggests for the model quantizes it (llama2.c's 260K model: 172 hidden features)."""
    import re

    import llmkit
    from llmkit.quantize import quantize

    stories = shared_data / "stories260K"
    load = lambda: llmkit.load(stories / "stories260K.bin", tokenizer=stories / "tok512.bin")  # noqa: E731
    for scheme in ("int4wo-32", "mxfp4", "nvfp4", "8da4w-32", "int4wo-16"):
        with pytest.raises(LLMKitError) as refusal:
            quantize(load(), scheme)
        hints = re.findall(r"\b(?:int8wo|fp8wo|8da4w-\d+|int4wo-\d+)\b", str(refusal.value).split("; use ")[-1])
        assert hints or "divides 4" in str(refusal.value), refusal.value
        for hint in hints:
            quantize(load(), hint)  # runs


# ---- chat ---------------------------------------------------------------------------------------------------


def test_chat_refuses_a_message_too_long_for_the_context_and_goes_on(capsys, monkeypatch):
    """A message too long for the context (the default model's is 512 tokens), then one that is not UTF-8: each
    is refused in a line and the session goes on to answer the next one. The chat format in use is named."""
    not_utf8 = b"caf\xe9".decode("utf-8", "surrogateescape")
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 2000 + "\n" + not_utf8 + "\nhello\n/quit\n"))
    status = main(["chat", "--max-new-tokens", "4", "--temperature", "0"])
    err = capsys.readouterr().err
    assert status == 0 and "Traceback" not in err, err
    assert "[chat format: Llama 2's [INST], built in: the model has no chat template of its own" in err
    assert "[the message is too long: its prompt is" in err and "512-token context" in err
    assert "[that message is not valid UTF-8 text; type it again]" in err
    assert err.count("prompt +") == 1  # "hello" was answered


@pytest.mark.parametrize(("change", "says"), [
    ({"num_attention_heads": 0}, "does not describe a model (ZeroDivisionError"),
    ({"rms_norm_eps": "x"}, "numbers that must be positive and finite (norm_eps='x')"),
    ({"rope_theta": -1}, "numbers that must be positive and finite (rope_theta=-1.0)"),
    ({"num_hidden_layers": 100000}, "its config says 100000 layers but its weights hold 2"),
])  # fmt: skip
def test_a_config_whose_numbers_are_wrong_for_its_weights(tmp_path, capsys, tiny_folder, change, says):
    """Refused before the model is built: 100000 layers took minutes to build on the meta device."""
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    refused(capsys, "generate", "--checkpoint-path", folder, says=says)


@pytest.mark.parametrize(("argv", "says"), [
    (["--seed", str(2**70)], "seed must be a whole number from 0 to 2**64 - 1"),
    (["--threads", "100000"], "--threads must be 1 to"),
])  # fmt: skip
def test_numbers_out_of_what_the_machine_takes(capsys, argv, says):
    refused(capsys, "generate", "--prompt", "The", "--max-new-tokens", "2", *argv, says=says)
