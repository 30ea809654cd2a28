"""llmkit's model gives transformers' logits and greedy tokens on the same Hugging Face checkpoints."""

import pytest
import torch
import transformers

from llmkit.checkpoint import load_checkpoint

CONFIGS = {
    "llama-gqa": transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=160,
        vocab_size=300, max_position_embeddings=128,
    ),
    "llama-tied": transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
        vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    "llama3.1-rope-scaling": transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=300, max_position_embeddings=128,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "qwen2": transformers.Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
}  # fmt: skip


def reference_and_ours(name, tmp_path):
    torch.manual_seed(0)
    config = CONFIGS[name]
    cls = transformers.Qwen2ForCausalLM if name == "qwen2" else transformers.LlamaForCausalLM
    ref = cls(config).eval()
    with torch.no_grad():  # random non-trivial norms and biases, so a mix-up would show
        for n, p in ref.named_parameters():
            if "norm" in n or "bias" in n:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
    ref.save_pretrained(tmp_path / name)
    return ref, load_checkpoint(tmp_path / name)


def greedy(model, ids, n):
    """Greedy decoding with llmkit's KV cache: prefill, then one token at a time."""
    logits = model(torch.tensor([ids]), torch.arange(len(ids)))
    out = []
    for pos in range(len(ids), len(ids) + n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_tokens_match_transformers(name, tmp_path):
    ref, ours = reference_and_ours(name, tmp_path)
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        assert (ours(tokens) - expected).abs().max() <= 1e-4
        assert (ours(tokens, torch.arange(40)) - expected).abs().max() <= 1e-4
        prompt = tokens[0, :8].tolist()
        expected_ids = ref.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, 8:].tolist()  # fmt: skip
        assert greedy(ours, prompt, 32) == expected_ids


def test_decoding_with_the_cache_equals_one_full_forward(tmp_path):
    _, model = reference_and_ours("llama-gqa", tmp_path)
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        step_logits = [model(tokens[:, :10], torch.arange(10))]
        for pos in range(10, 24):
            step_logits.append(model(tokens[:, pos : pos + 1], torch.tensor([pos])))
        assert torch.allclose(torch.cat(step_logits, dim=1), full, atol=1e-5)


def test_saved_model_loads_back_identically(tmp_path):
    from llmkit.checkpoint import save_hf

    _, model = reference_and_ours("llama3.1-rope-scaling", tmp_path)
    save_hf(model, tmp_path / "saved")
    again = load_checkpoint(tmp_path / "saved")
    assert again.args == model.args
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    reloaded_by_transformers = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert (reloaded_by_transformers(tokens).logits - model(tokens)).abs().max() <= 1e-4


@pytest.mark.parametrize("B, H, H_kv, T, S", [(1, 32, 8, 1, 64), (4, 9, 3, 5, 40), (3, 6, 2, 7, 7)])
def test_grouped_attention_equals_sdpa_with_repeated_heads(B, H, H_kv, T, S):
    from llmkit.model import grouped_attention

    g = torch.Generator().manual_seed(B * T)
    q = torch.randn(B, H, T, 16, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, H_kv, S, 16, dtype=torch.float64, generator=g) for _ in range(2))
    mask = torch.rand(B, 1, T, S, generator=g) > 0.3  # each row and query its own mask, as a batch of requests
    mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (grouped_attention(q, k, v, mask) - expected).abs().max() <= 1e-12
