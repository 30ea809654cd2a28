"""Checkpoint formats: llama2.c (shared and unshared classifier) and Meta .pth load into the same model."""

import json
import struct

import pytest
import torch

from llmkit.checkpoint import checkpoint_state, halves_to_interleaved, interleaved_to_halves, load_checkpoint
from llmkit.errors import LLMKitError
from llmkit.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=100, hidden_dim=96, max_seq_len=64)


def test_permutation_round_trip():
    w = torch.randn(64, 32)
    assert torch.equal(interleaved_to_halves(halves_to_interleaved(w, 8), 8), w)


@pytest.fixture
def random_model(make_model):
    """Weights N(0, 0.3): logits large enough that a mixed-up weight would show."""
    return lambda tie: make_model(ARGS, std=0.3, tie_embeddings=tie)


def write_llama2c(model: Transformer, path):
    """llama2.c's version-0 export (export.py legacy_export), written here from our weights."""
    a = model.args
    L = model.layers
    vocab = a.vocab_size if a.tie_embeddings else -a.vocab_size
    state = checkpoint_state(model)  # wq, wk and wv apart, as llama2.c stores them
    per_layer = {w: [state[f"layers.{i}.attention.{w}.weight"] for i in range(a.n_layers)] for w in ("wq", "wk", "wv")}
    tensors = [model.tok_embeddings.weight]
    tensors += [layer.attention_norm.weight for layer in L]
    tensors += [halves_to_interleaved(w, a.n_heads) for w in per_layer["wq"]]
    tensors += [halves_to_interleaved(w, a.n_kv_heads) for w in per_layer["wk"]]
    tensors += per_layer["wv"]
    tensors += [layer.attention.wo.weight for layer in L]
    tensors += [layer.ffn_norm.weight for layer in L]
    for name in ("w1", "w2", "w3"):
        tensors += [getattr(layer.feed_forward, name).weight for layer in L]
    tensors += [model.norm.weight, torch.zeros(a.max_seq_len, a.head_dim)]  # freq_cis, unused
    if not a.tie_embeddings:
        tensors.append(model.output.weight)
    with open(path, "wb") as f:
        f.write(struct.pack("7i", a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, vocab, a.max_seq_len))
        for t in tensors:
            f.write(t.detach().float().contiguous().numpy().tobytes())


@pytest.mark.parametrize("tie", [True, False])
def test_llama2c_round_trip(tie, tmp_path, random_model):
    model = random_model(tie)
    write_llama2c(model, tmp_path / "m.bin")
    loaded = load_checkpoint(tmp_path / "m.bin")
    assert loaded.args == model.args
    tokens = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), model(tokens), atol=1e-5)


def test_meta_consolidated_pth(tmp_path, random_model):
    model = random_model(tie=False)
    state = {k: v.clone() for k, v in checkpoint_state(model).items()}
    for i in range(ARGS.n_layers):
        for w, heads in (("wq", ARGS.n_heads), ("wk", ARGS.n_kv_heads)):
            key = f"layers.{i}.attention.{w}.weight"
            state[key] = halves_to_interleaved(state[key], heads)
    torch.save(state, tmp_path / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 100, "norm_eps": 1e-5}
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = load_checkpoint(tmp_path, max_seq_len=64)
    tokens = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), model(tokens), atol=1e-5)


def test_truncated_llama2c_is_named(tmp_path, random_model):
    write_llama2c(random_model(tie=True), tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(LLMKitError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.bin")


def test_corrupt_safetensors_is_named(tmp_path, random_model):
    from llmkit.checkpoint import save_hf

    save_hf(random_model(tie=True), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LLMKitError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "hf")


def test_a_missing_projection_is_named(tmp_path, random_model):
    """q, k and v load as one matrix; a file without one of them still gets a clear error, not a KeyError."""
    from safetensors.torch import load_file, save_file

    from llmkit.checkpoint import save_hf

    save_hf(random_model(tie=True), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, weights)
    with pytest.raises(LLMKitError, match=r"weights do not fit .*layers\.1\.attention\.wqkv\.weight"):
        load_checkpoint(tmp_path / "hf")


def test_save_refuses_to_overwrite(tmp_path, random_model):
    from llmkit.checkpoint import save_hf

    (tmp_path / "exists").mkdir()
    with pytest.raises(LLMKitError, match="already exists"):
        save_hf(random_model(tie=True), tmp_path / "exists")
    assert not list(tmp_path.glob(".exists.*")), "no temporary folder left behind"
