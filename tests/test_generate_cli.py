"""Generation against llama2.c's published output, and the command line's answers to bad input."""

import subprocess
import sys

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.sampling import argmax, check_finite, sample

PUBLISHED = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)


@pytest.fixture(scope="module")
def stories260k(shared_data):
    return llmkit.load(shared_data / "stories260K" / "stories260K.bin", shared_data / "stories260K" / "tok512.bin")


def test_stories260k_greedy_matches_llama2c_published_output(stories260k):
    out = stories260k.generate("", max_new_tokens=200, temperature=0)
    assert out.text.startswith(PUBLISHED)
    assert out.stats.new_tokens == len(out.tokens) > 0
    assert out.stats.decode_tokens_per_s > 0 and out.stats.time_to_first_token > 0


def test_streamed_text_is_the_whole_text(stories260k):
    pieces = []
    out = stories260k.generate("Lily", max_new_tokens=40, temperature=0.9, top_p=0.9, seed=3, on_text=pieces.append)
    assert "".join(pieces) == out.text
    assert out.text == stories260k.tokenizer.decode(stories260k.tokenizer.encode("Lily") + out.tokens)[len("Lily") :]


def test_seed_makes_sampling_repeatable(stories260k):
    a = stories260k.generate("Tom", max_new_tokens=30, temperature=1.0, top_k=50, seed=7)
    b = stories260k.generate("Tom", max_new_tokens=30, temperature=1.0, top_k=50, seed=7)
    c = stories260k.generate("Tom", max_new_tokens=30, temperature=1.0, top_k=50, seed=8)
    assert a.tokens == b.tokens != c.tokens


def test_stop_string_ends_generation(stories260k):
    out = stories260k.generate("", max_new_tokens=200, temperature=0, stop=["Lily"])
    assert out.text == "Once upon a time, there was a little girl named "


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    rng = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.5, 1, None, rng) for _ in range(20)} == {1}
    assert {sample(logits, 1.5, None, 0.01, rng) for _ in range(20)} == {1}
    assert {sample(logits, 1.5, None, 0.8, rng) for _ in range(200)} == {1, 2}  # 0.43 + 0.40 >= 0.8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick_and_finite_check_are_atens(dtype):
    """On the CPU float32 rows go through numpy (faster): the same index as ATen's argmax, the first of equals
    included, for one row or a batch, and the same verdict on nan, inf and -inf as torch.isfinite; bfloat16 rows
    stay with ATen."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 32000):
        row = torch.randn(n, generator=g).to(dtype)
        assert argmax(row) == int(row.argmax())
        row[n // 2] = row[-1] = row.max() + 1  # two equal largest: the first
        assert argmax(row) == int(row.argmax()) == n // 2
        check_finite(row)
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = row.clone()
            broken[n - 1] = bad
            with pytest.raises(LLMKitError, match="NaN or infinity"):
                check_finite(broken)
    # a batch, as the engine passes it: the last position of [B, 1, vocab] cut to the tokenizer's ids (strided)
    rows = torch.randn(5, 1, 32010, generator=g).to(dtype)[:, -1, :32000]
    rows[3, 10] = rows[3, 20] = rows[3].max() + 1
    assert argmax(rows) == rows.argmax(-1).tolist()
    assert argmax(rows)[3] == 10


def test_cli_generate_prints_prompt_continuation_and_stats(shared_data, capsys):
    d = shared_data / "stories260K"
    code = main(["generate", "--checkpoint-path", str(d / "stories260K.bin"), "--tokenizer-path",
                 str(d / "tok512.bin"), "--max-new-tokens", "200", "--temperature", "0"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith(PUBLISHED)
    assert "decode" in err and "tok/s" in err


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint-path", "/nonexistent/model.bin"], "checkpoint not found"),
        (["--temperature", "-1"], "temperature must be 0"),
        (["--dtype", "float64"], "unknown dtype"),
        (["--device", "cuda"], "no usable GPU"),
        (["--prompt", "word " * 200], "shorten the prompt"),  # 602 tokens, the context 512
    ],
)
def test_bad_input_gives_one_line_and_status_2(args, message, shared_data):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    d = shared_data / "stories260K"
    base = ["generate", "--checkpoint-path", str(d / "stories260K.bin"), "--tokenizer-path", str(d / "tok512.bin")]
    result = run_cli(*base, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_truncated_checkpoint_and_wrong_tokenizer(shared_data, tmp_path):
    d = shared_data / "stories260K"
    cut = tmp_path / "cut.bin"
    cut.write_bytes((d / "stories260K.bin").read_bytes()[:5000])
    result = run_cli("generate", "--checkpoint-path", str(cut), "--tokenizer-path", str(d / "tok512.bin"))
    assert result.returncode == 2 and "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr

    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"sentence number {i} about words and more words {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "big"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True)  # fmt: skip
    result = run_cli("generate", "--checkpoint-path", str(d / "stories260K.bin"),
                     "--tokenizer-path", str(tmp_path / "big.model"))  # fmt: skip
    assert result.returncode == 2 and "not this model's tokenizer" in result.stderr
