"""qwen2 GGUF files: a llama with biases on q, k and v, its rows in Hugging Face's order, and Qwen2's pre-tokenizer.

A tiny random Qwen2 from transformers is written as llama.cpp's converter writes qwen2 files (gguf's writer); both
llmkit and transformers' own GGUF loader read it back, and they must agree with each other and with the original.
"""

import gguf
import pytest
import torch

import llmkit
from llmkit.tokenizer import _byte_level_chars

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world 12345 and 3.14", "  spaces\n\nnew lines\tand tabs", "ünïcode 東京 🤖", "it's they'LL DON'T"]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> tuple:
    """(the transformers model, its qwen2 GGUF file)"""
    config = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # transformers starts biases at 0 and norms at 1: vary them
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    write_qwen2_gguf(model, path)
    return model, path


def write_qwen2_gguf(model, path) -> None:
    """As llama.cpp's convert_hf_to_gguf.py writes a Qwen2 model: no permutation of q and k, a byte-level vocabulary
    (the 256 byte characters, merges of a few pairs, two control tokens) with the "qwen2" pre-tokenizer."""
    c = model.config
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    chars = list(_byte_level_chars())
    merges = ["Ġ t", "Ġ a", "h e", "i n", "Ġt he", "e r", "1 2", "o n"]
    tokens = chars + [m.replace(" ", "") for m in merges]
    tokens += [f"<|extra_{i}|>" for i in range(c.vocab_size - len(tokens) - 2)] + ["<|im_start|>", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(False)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            _, _, layer, *module, kind = name.split(".")
            name = f"blk.{layer}.{names['.'.join(module)]}.{kind}"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]  # fmt: skip
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qwen2_file_gives_the_original_logits_as_transformers_reads_it(qwen2):
    model, path = qwen2
    ours = llmkit.load(path)
    assert ours.model.args.qkv_bias and (ours.model.args.n_heads, ours.model.args.n_kv_heads) == (4, 2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()  # fmt: skip
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original, from_file = model(tokens).logits, theirs(tokens).logits
        logits = ours.model(tokens)
    torch.testing.assert_close(from_file, original, rtol=0, atol=1e-5)  # the file holds the model
    torch.testing.assert_close(logits, original, rtol=0, atol=1e-4)  # the float32 tolerance


def test_qwen2_tokenizer_splits_as_transformers_does(qwen2):
    _, path = qwen2
    ours = llmkit.load(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours.bos_id is None  # add_bos_token false, as Qwen2's files say
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    assert len(ours.encode("12")) == 2  # digits one by one (Llama 3's split takes three), though "1 2" is a merge
    assert ours.encode("<|im_start|>12") == [298, *ours.encode("12")]  # a control token read whole
