"""Models by alias through the real huggingface_hub cache code, offline: a cache laid out file by file the way
huggingface_hub writes one, then resolve, load, generate and chat; and each failure's one-line message."""

import hashlib
import io
import json
import os
import re
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmkit import chat, hub
from llmkit.cli import build_parser
from llmkit.errors import LLMKitError
from llmkit.loading import load

PUBLISHED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline, for huggingface_hub (its constants are read at import)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("LLMKIT_MODELS", raising=False)
    return cache


def put(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """Store files as huggingface_hub does: content-addressed blobs/, a snapshots/<commit>/ folder of relative
    symlinks to them, and refs/main naming that commit. Returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def add_models(tmp_path: Path, monkeypatch, entries: dict) -> None:
    """Aliases for these tests only, through $LLMKIT_MODELS."""
    (tmp_path / "models.json").write_text(json.dumps(entries))
    monkeypatch.setenv("LLMKIT_MODELS", str(tmp_path / "models.json"))


def run_cli(*argv: str) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


def put_stories260k(cache: Path, shared_data: Path) -> Path:
    d = shared_data / "stories260K"
    return put(cache, "karpathy/tinyllamas", {f"stories260K/{f.name}": f.read_bytes() for f in d.iterdir()})


def test_registry_names_the_issue_models():
    models = hub.registry()
    for alias in (
        "stories260K",
        "stories15M",
        "stories42M",
        "stories110M",
        "SmolLM2-135M-Instruct",
        "SmolLM2-360M",
        "Qwen2.5-0.5B-Instruct",
        "Llama-3.2-1B",
        "Llama-3.2-1B-Instruct",
    ):
        assert alias in models
    assert models["stories15M"].sources[1] == ("hf-internal-testing/llama-tokenizer", "main", ("tokenizer.model",))
    assert models["Llama-3.2-1B-Instruct"].gated and not models["Qwen2.5-0.5B-Instruct"].gated
    assert hub.model_info("smollm2-135m-instruct").alias == "SmolLM2-135M-Instruct"


def test_stories260k_by_alias_offline_generates_llama2c_output(cache, shared_data, capsys):
    snapshot = put_stories260k(cache, shared_data)
    files = hub.resolve("stories260K")
    assert files == (snapshot / "stories260K" / "stories260K.bin", snapshot / "stories260K" / "tok512.bin")
    assert load(*files).generate("", max_new_tokens=60, temperature=0).text.startswith(PUBLISHED)
    assert hub.where("stories260K") == snapshot / "stories260K"
    assert hub.download("stories260K") == files  # offline, a cached model needs no network
    with pytest.raises(LLMKitError, match="cannot download stories15M: HF_HUB_OFFLINE is set"):
        hub.download("stories15M")  # its repository is in the cache, its file is not
    downloaded = {row.alias: row.downloaded for row in hub.list_models()}
    assert downloaded["stories260K"] and not downloaded["stories15M"]
    run_cli("list")
    run_cli("where", "stories260K")
    out = capsys.readouterr().out
    assert re.search(r"^stories260K +karpathy/tinyllamas +1 MB  yes$", out, re.MULTILINE)
    assert re.search(r"^Llama-3.2-1B +meta-llama/Llama-3.2-1B +2.5 GB  no  \(gated\)$", out, re.MULTILINE)
    assert out.endswith(f"{snapshot / 'stories260K'}\n")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random tiny Llama saved by transformers, with a byte-level BPE tokenizer and a ChatML template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["Hello! How are you? The cat sat on the mat and the dog ran."], trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", chat_template=chat.CHATML_TEMPLATE
    )
    hf_tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_hf_model_by_alias_loads_and_chats(cache, tiny_llama, tmp_path, monkeypatch, capsys):
    files = sorted(f.name for f in tiny_llama.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(files)
    add_models(
        tmp_path,
        monkeypatch,
        {
            "tiny": {
                "repo": "llmkit-test/tiny-llama",
                "files": files,
                "format": "hf",
                "checkpoint": ".",
                "tokenizer": "tokenizer.json",
                "size_mb": 1,
                "gated": False,
            }
        },
    )
    snapshot = put(cache, "llmkit-test/tiny-llama", {name: (tiny_llama / name).read_bytes() for name in files})
    assert hub.resolve("tiny") == (snapshot, snapshot / "tokenizer.json")
    llm = load(*hub.resolve("tiny"))
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello!"}]
    out = chat.chat(llm, messages, max_new_tokens=6, temperature=0)
    assert out.tokens and out.text == llm.tokenizer.decode(out.tokens)
    prompt = chat.encode_chat(llm.tokenizer, messages)
    assert llm.tokenizer.decode(prompt) == "system\nBe kind.\nuser\nHello!\nassistant\n"  # specials print nothing
    reference = LlamaForCausalLM.from_pretrained(snapshot).generate(
        torch.tensor([prompt]), max_new_tokens=len(out.tokens), do_sample=False
    )
    assert out.tokens == reference[0, len(prompt) :].tolist()

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n/reset\nHi\n/quit\n"))
    run_cli(
        "chat",
        "--checkpoint-path",
        str(snapshot),
        "--tokenizer-path",
        str(snapshot / "tokenizer.json"),
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    )
    err = capsys.readouterr().err
    assert "[conversation reset]" in err and err.count("prompt +") == 2


def test_not_downloaded_says_how_to_download(cache):
    with pytest.raises(LLMKitError, match=r"^stories15M is not downloaded; run `llmkit download stories15M` \(61 MB"):
        hub.resolve("stories15M")
    with pytest.raises(LLMKitError, match="gated: accept its licence on the Hub and set HF_TOKEN"):
        run_cli("where", "Llama-3.2-1B-Instruct")
    with pytest.raises(LLMKitError, match="HF_HUB_OFFLINE is set and the cache does not hold it"):
        hub.download("SmolLM2-135M")  # the real snapshot_download, offline


def test_unknown_alias_suggests_close_ones(cache):
    with pytest.raises(LLMKitError, match=r"unknown model 'stories15'; did you mean stories15M"):
        hub.resolve("stories15")
    with pytest.raises(LLMKitError, match=r"unknown model 'qwen-0.5b'.*`llmkit list`"):
        hub.download("qwen-0.5b")


@pytest.mark.parametrize("damage", ["deleted blob", "deleted link"])
def test_cache_entry_missing_a_file_is_refused(cache, shared_data, damage):
    snapshot = put_stories260k(cache, shared_data)
    link = snapshot / "stories260K" / "tok512.bin"
    (link.resolve() if damage == "deleted blob" else link).unlink()
    with pytest.raises(
        LLMKitError,
        match=r"lacks karpathy/tinyllamas/stories260K/tok512\.bin .* run `llmkit "
        r"download stories260K` again",
    ):
        hub.resolve("stories260K")


def online(monkeypatch, fetch) -> None:
    """Go online with a stand-in for snapshot_download's network part: fetch(repo_id, cache_dir) -> folder.
    Cache look-ups (local_files_only) still run the real code."""
    real = hub.snapshot_download
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kwargs)
        return fetch(repo_id, kwargs.get("cache_dir") or constants.HF_HUB_CACHE)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)


def test_gated_repository_without_access(cache, monkeypatch):
    def fetch(repo_id, cache_dir):
        url = f"https://huggingface.co/api/models/{repo_id}/revision/main"
        raise GatedRepoError("403 Forbidden", response=httpx2.Response(403, request=httpx2.Request("GET", url)))

    online(monkeypatch, fetch)
    with pytest.raises(LLMKitError) as e:
        hub.download("Llama-3.2-1B-Instruct")
    assert str(e.value).startswith(
        "meta-llama/Llama-3.2-1B-Instruct is gated and this account has no access: accept its licence at "
        "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct, then set HF_TOKEN"
    )
    assert not any(cache.iterdir())


def test_failed_download_leaves_another_downloads_partial_file_alone(cache, monkeypatch):
    blobs = cache / "models--hf-internal-testing--llama-tokenizer" / "blobs"
    blobs.mkdir(parents=True)
    theirs = blobs / "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347.1a2b3c4d.incomplete"
    theirs.write_bytes(b"another process is writing this")

    def fetch(repo_id, cache_dir):
        if repo_id == "karpathy/tinyllamas":
            return str(put(Path(cache_dir), repo_id, {"stories15M.bin": b"weights"}))
        raise httpx2.ReadError("connection reset by peer")

    online(monkeypatch, fetch)
    with pytest.raises(
        LLMKitError,
        match=r"^the download of stories15M from https://huggingface.co/hf-internal-testing/"
        r"llama-tokenizer failed \(ReadError: connection reset by peer\)",
    ):
        hub.download("stories15M")
    assert theirs.read_bytes() == b"another process is writing this"
    with pytest.raises(LLMKitError, match="lacks hf-internal-testing/llama-tokenizer/tokenizer.model"):
        hub.resolve("stories15M")


def test_download_fetches_every_source_and_checks_the_files(cache, monkeypatch, capsys):
    fetched = []

    def fetch(repo_id, cache_dir):
        fetched.append(repo_id)
        name = "stories42M.bin" if repo_id == "karpathy/tinyllamas" else "tokenizer.model"
        return str(put(Path(cache_dir), repo_id, {name: repo_id.encode()}))

    online(monkeypatch, fetch)
    run_cli("download", "stories42M")
    assert fetched == ["karpathy/tinyllamas", "hf-internal-testing/llama-tokenizer"]
    assert capsys.readouterr().out.strip().endswith("stories42M.bin")
    assert hub.resolve("stories42M").tokenizer.read_bytes() == b"hf-internal-testing/llama-tokenizer"
    online(monkeypatch, lambda repo_id, cache_dir: str(hub.where("stories42M")))  # as when the Hub is unreachable
    with pytest.raises(LLMKitError, match="stories15M.bin did not arrive from https://huggingface.co/karpathy/tiny"):
        hub.download("stories15M")


def test_remove_keeps_files_another_downloaded_model_uses(cache, tmp_path, monkeypatch):
    entry = {
        "repo": "llmkit-test/stories",
        "format": "llama2c",
        "tokenizer_repo": "llmkit-test/tokenizer",
        "tokenizer": "tok.model",
        "size_mb": 1,
        "gated": False,
    }
    add_models(
        tmp_path,
        monkeypatch,
        {
            "a": {**entry, "files": ["a.bin"], "checkpoint": "a.bin"},
            "b": {**entry, "files": ["b.bin"], "checkpoint": "b.bin"},
        },
    )
    put(cache, "llmkit-test/stories", {"a.bin": b"a", "b.bin": b"b"})
    put(cache, "llmkit-test/tokenizer", {"tok.model": b"tok"})
    assert [p.name for p in hub.remove("a")] == ["a.bin"]
    assert {row.alias: row.downloaded for row in hub.list_models()}.items() >= {"a": False, "b": True}.items()
    assert len(list(cache.glob("models--llmkit-test--stories/blobs/*"))) == 1  # a's blob went, b's stays
    run_cli("remove", "b")
    assert not list(cache.iterdir())
    with pytest.raises(LLMKitError, match="b is not downloaded; there is nothing to remove"):
        hub.remove("b")


def test_gguf_model_by_alias_is_the_file_it_names(cache, make_model, sentencepiece_model, tmp_path):
    """A registry GGUF entry (one file, its own tokenizer) resolves offline to the cached file, which loads with the
    tokenizer inside it, as the file itself does."""
    from conftest import write_gguf

    entry = hub.model_info("SmolLM2-135M-Instruct-Q8_0")
    assert entry.format == "gguf" and entry.checkpoint == entry.tokenizer == entry.files[0]
    written = write_gguf(tmp_path / "m.gguf", make_model(), sentencepiece_model(tmp_path / "sp"))
    put(cache, entry.repo, {entry.checkpoint: written.read_bytes()})
    files = hub.resolve("SmolLM2-135M-Instruct-Q8_0")
    assert files.checkpoint.name == entry.checkpoint and files.checkpoint.read_bytes() == written.read_bytes()
    by_alias, direct = load(*files), load(written)
    prompt = "the model reads the text"
    assert by_alias.tokenizer.encode(prompt, bos=True) == direct.tokenizer.encode(prompt, bos=True)
    assert by_alias.generate(prompt, max_new_tokens=8, temperature=0).text == direct.generate(
        prompt, max_new_tokens=8, temperature=0
    ).text
