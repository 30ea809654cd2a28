"""The corpus, the perplexity evaluator, the training loop and the shipped default model."""

import json
import math
import platform
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import disk_full_while_writing

import llmkit
from llmkit import data, train
from llmkit.checkpoint import load_checkpoint
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.evaluate import perplexity, read_text, score_ids, unigram_perplexity
from llmkit.model import ModelArgs
from llmkit.train import TrainConfig, lr_at, prepare_corpus

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "data" / "pydoc-lm"
SHIPPED_FILES = ("README.md", "config.json", "model.safetensors", "tokenizer.model")


LETTERS = "abcdefghijklmnopqrstuvwxyz "
LETTER_MODEL = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=28, hidden_dim=32, max_seq_len=8)


class LetterTokenizer:
    """a -> 1, b -> 2, ..., space -> 27; BOS is 0."""

    bos_id, eos_ids, vocab_size = 0, [], 28

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return [0] * bos + [LETTERS.index(c) + 1 for c in text]


class FixedDistribution(torch.nn.Module):
    """A model that ignores its input and predicts the same distribution everywhere."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_probs = probs.log()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.log_probs.expand(*tokens.shape, -1)


@pytest.fixture(scope="module")
def default_llm():
    return llmkit.load("default")


# ---- corpus -------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_clean():
    first = data.build_corpus()
    data.build_corpus.cache_clear()
    assert data.build_corpus() == first
    names = [d.name for d in first]
    assert len(set(names)) == len(names) > 300
    assert names[0].startswith("topics/") and "json" in names and "builtins" in names
    for name in names:
        assert data.is_public(name) and name.split(".")[0] not in data.SKIP_MODULES
    for doc in first:
        assert doc.text == doc.text.strip() and "\n\n\n" not in doc.text
        for paragraph in doc.text.split("\n\n"):
            assert paragraph and "\n" not in paragraph and not paragraph.startswith(">>>")


def test_split_rule_holds():
    docs = data.build_corpus()
    train, heldout = data.split(docs)
    assert len(train) + len(heldout) == len(docs)
    assert all(zlib.crc32(d.name.encode()) % 100 < 3 for d in heldout)
    assert all(zlib.crc32(d.name.encode()) % 100 >= 3 for d in train)
    assert 0.01 < len(heldout) / len(docs) < 0.1
    assert data.heldout_text() == "\n\n".join(d.text for d in heldout)


def test_corpus_size_counts_bos_per_paragraph():
    docs = [data.Document("x", "ab c\n\nd"), data.Document("y", "ef")]
    size = data.corpus_size(docs, LetterTokenizer())
    assert (size.documents, size.paragraphs, size.chars, size.tokens) == (2, 3, 9, 5 + 2 + 3)
    assert data.corpus_size(docs).tokens is None


# ---- perplexity ---------------------------------------------------------------------------------


def test_perplexity_of_a_known_distribution_matches_the_hand_computed_value():
    probs = torch.softmax(torch.randn(28, generator=torch.Generator().manual_seed(0)), dim=0)
    llm = SimpleNamespace(model=FixedDistribution(probs), tokenizer=LetterTokenizer(), device="cpu")
    # ids: [0 1 2 0 2 1 3]; windows of 4: [0 1 2 0] [2 1 3]; predicted: 1 2 0 | 1 3
    result = perplexity(llm, "ab\n\n\nbac\n", seq_len=4)
    expected = math.exp(-sum(math.log(probs[i]) for i in (1, 2, 0, 1, 3)) / 5)
    assert result.n_tokens == 5
    assert result.value == pytest.approx(expected, rel=1e-6)


def test_uniform_transformer_has_perplexity_equal_to_its_vocabulary(make_model):
    model = make_model(LETTER_MODEL)
    torch.nn.init.zeros_(model.output.weight)  # every logit 0: a uniform distribution
    llm = SimpleNamespace(model=model, tokenizer=LetterTokenizer(), device="cpu")
    assert perplexity(llm, "hello world\n\nagain", seq_len=8).value == pytest.approx(28, rel=1e-5)


def test_unigram_perplexity_by_hand():
    # training ids [0 1 1 2]: counts + 1 -> p(0) = 2/32, p(1) = 3/32, p(2) = 2/32, the 25 others 1/32
    result = unigram_perplexity(LetterTokenizer(), "aab", "ab\n\nz")
    expected = math.exp(-(2 * math.log(2 / 32) + math.log(3 / 32) + math.log(2 / 32) + math.log(1 / 32)) / 5)
    assert result.n_tokens == 5
    assert result.value == pytest.approx(expected)


@pytest.mark.parametrize("seq_len", [0, 1, 9])
def test_bad_seq_len_is_refused(seq_len, make_model):
    model = make_model(LETTER_MODEL)
    llm = SimpleNamespace(model=model, tokenizer=LetterTokenizer(), device="cpu")
    with pytest.raises(LLMKitError, match="seq-len"):
        perplexity(llm, "abc", seq_len=seq_len)


@pytest.mark.parametrize("text", ["", "\n\n  \n\t\n"])
def test_text_without_paragraphs_is_refused(text):
    uniform = FixedDistribution(torch.ones(28) / 28)
    llm = SimpleNamespace(model=uniform, tokenizer=LetterTokenizer(), device="cpu")
    with pytest.raises(LLMKitError, match="empty"):
        perplexity(llm, text)


def test_read_text_refuses_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(LLMKitError, match="not found"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(LLMKitError, match="not found"):
        read_text(tmp_path)
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(LLMKitError, match="empty"):
        read_text(tmp_path / "blank.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(LLMKitError, match="UTF-8"):
        read_text(tmp_path / "bin.txt")
    (tmp_path / "ok.txt").write_text("One.\n\nTwo.\n")
    assert read_text(tmp_path / "ok.txt") == "One.\n\nTwo.\n"


# ---- training -----------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    rates = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] == pytest.approx(1e-4)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """`llmkit train prepare`'s folder (tokenizer, token ids, corpus.json), made once for the tests that train."""
    work = tmp_path_factory.mktemp("work")
    prepare_corpus(work)
    return work


def test_prepare_and_train_write_a_loadable_model(prepared, tmp_path, capsys):
    """The pipeline end to end with a tiny model and a few steps; the tokenizer is reproducible. An existing
    --out folder is refused in one line before any work, and replaced whole with --force."""
    stats = json.loads((prepared / "corpus.json").read_text())
    assert stats["vocab_size"] == 4096 and stats["unigram_perplexity"] > 100
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale").write_text("the user's")
    argv = ["train", "--data", str(prepared), "--out", str(out), "--preset", "tiny", "--steps", "4",
            "--batch-size", "2", "--seq-len", "32", "--warmup", "2", "--eval-every", "0"]  # fmt: skip
    assert main(argv) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(f"llmkit: error: {out} already exists") and "--force" in error, error
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in out.iterdir()] == ["stale"]
    assert (out / "stale").read_text() == "the user's"
    argv.append("--force")
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == set(SHIPPED_FILES)
    card = (out / "README.md").read_text()
    assert "llmkit " + " ".join(argv) in card  # the card records the command that made the model
    heldout = torch.from_numpy(np.load(prepared / "heldout.npy").astype(np.int64))
    saved = load_checkpoint(out).float()  # the bfloat16 weights it wrote, scored as training scored them
    assert f"**{score_ids(saved, heldout, 128, progress=False).value:.2f}**" in card
    model = load_checkpoint(out)
    assert model.args.dim == 64 and model.tok_embeddings.weight.dtype == torch.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind
    if platform.python_version() == shipped_python():  # the same corpus gives the same tokenizer
        shipped = (DEFAULT_MODEL / "tokenizer.model").read_bytes()
        assert (prepared / "tokenizer.model").read_bytes() == shipped


# A disk that fills up while the kit writes one of its outputs: the previous file (or folder) stays whole, and no
# temporary file is left beside it. One test per place train.py writes through llmkit.files' atomic writers.


def test_a_full_disk_while_writing_the_model_keeps_the_previous_folder(prepared, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("the previous model's")
    disk_full_while_writing(monkeypatch, train, "model")
    argv = ["train", "--data", prepared, "--out", out, "--force", "--preset", "tiny", "--steps", "1", "--batch-size",
            "1", "--seq-len", "16", "--warmup", "1", "--eval-every", "0"]  # fmt: skip
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("llmkit: error: ")]
    assert len(errors) == 1 and f"cannot write {out} (" in errors[0] and "Traceback" not in err, err
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "the previous model's"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_full_disk_while_training_a_tokenizer_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.model"
    path.write_text("the previous tokenizer")
    disk_full_while_writing(monkeypatch, train, "tokenizer.model")
    with pytest.raises(LLMKitError, match="cannot write .*tokenizer.model"):
        train.train_tokenizer(data.train_text()[:50_000], path, vocab_size=400)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]
    assert path.read_text() == "the previous tokenizer"


@pytest.mark.parametrize("name", ["tokenizer.model", "train.npy", "corpus.json"])
def test_a_full_disk_while_preparing_keeps_the_previous_file(prepared, tmp_path, monkeypatch, name):
    """prepare_corpus writes the tokenizer it is given, each split's token ids, then corpus.json."""
    previous = {n: f"the previous {n}" for n in ("tokenizer.model", "train.npy", "heldout.npy", "corpus.json")}
    for n, text in previous.items():
        (tmp_path / n).write_text(text)
    disk_full_while_writing(monkeypatch, train, name)
    with pytest.raises(LLMKitError, match=f"cannot write .*{name}"):
        prepare_corpus(tmp_path, tokenizer_path=prepared / "tokenizer.model", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(previous)
    assert (tmp_path / name).read_text() == previous[name]


def test_a_prepared_corpus_or_a_model_is_replaced_only_with_force(prepared, tmp_path, capsys):
    """`train prepare --work W` over W's earlier corpus, and `train_from` (the API chapter A1 calls) over an
    existing model folder: one line naming --force (force=True), before any work, nothing changed."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "corpus.json").write_text("the user's corpus")
    assert main(["train", "prepare", "--work", str(work)]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert "already holds a prepared corpus" in error and "--force" in error, error
    assert [p.name for p in work.iterdir()] == ["corpus.json"]
    assert (work / "corpus.json").read_text() == "the user's corpus"
    out = tmp_path / "model"
    out.mkdir()
    with pytest.raises(LLMKitError, match="already exists.*force=True"):
        train.train_from(prepared, out, "tiny", TrainConfig(steps=1), "test")
    assert list(out.iterdir()) == []


def shipped_python() -> str:
    """The Python version the shipped model's corpus was built with, as its card says."""
    card = (DEFAULT_MODEL / "README.md").read_text()
    return card.split("from Python ", 1)[1].split(":", 1)[0]


# ---- the shipped model --------------------------------------------------------------------------


def test_shipped_model_files():
    sizes = {p.name: p.stat().st_size for p in DEFAULT_MODEL.iterdir()}
    assert set(sizes) == set(SHIPPED_FILES)
    assert sum(sizes.values()) <= 16_000_000
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True


def test_shipped_model_beats_a_unigram_model_fourfold(default_llm):
    """On the whole held-out text (about 15k tokens, a few seconds on a CPU)."""
    heldout = data.heldout_text()
    model_ppl = perplexity(default_llm, heldout)
    unigram = unigram_perplexity(default_llm.tokenizer, data.train_text(), heldout)
    assert model_ppl.value <= unigram.value / 4, (model_ppl, unigram)
    if platform.python_version() == shipped_python():  # the same corpus: the card's number
        assert f"**{model_ppl.value:.2f}**" in (DEFAULT_MODEL / "README.md").read_text()


def test_perplexity_agrees_with_transformers(default_llm):
    """transformers' mean loss over the same windows of the same weights, to 0.1%."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    text = "\n\n".join(data.paragraphs(data.heldout_text())[:40])
    ours = perplexity(default_llm, text, seq_len=128)
    ids = torch.from_numpy(data.encode(text, default_llm.tokenizer).astype(np.int64))
    nll, n = 0.0, 0
    with torch.no_grad():
        for window in ids.split(128):
            if len(window) >= 2:
                nll += hf(input_ids=window[None], labels=window[None]).loss.item() * (len(window) - 1)
                n += len(window) - 1
    assert ours.n_tokens == n
    assert ours.value == pytest.approx(math.exp(nll / n), rel=1e-3)
