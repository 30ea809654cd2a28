"""GGUF files written here with gguf's own writer load back as the model and tokenizer they were written from."""

import subprocess
import sys
from dataclasses import replace

import gguf
import numpy as np
import pytest
import sentencepiece
import torch
from conftest import TINY, write_gguf

import llmkit
from llmkit.checkpoint import checkpoint_state
from llmkit.gguf import GGUFTokenizer, read

Q = gguf.GGMLQuantizationType
# No leading spaces, runs of them or newlines: the tests' SentencePiece model normalizes them (its trainer's default)
# and llama.cpp does not (nor does Llama 2's model, which turns normalization off).
TEXTS = ["the model reads the text number 42", "spaces, ünïcode 東京 and 🤖", "", "words 12 3 and writes"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, sentencepiece_model):
    return sentencepiece_model(tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("tied", [False, True])
def test_float32_file_gives_the_same_logits(tmp_path, make_model, sp_model, tied):
    model = make_model(tie_embeddings=tied)
    llm = llmkit.load(write_gguf(tmp_path / "m.gguf", model, sp_model))
    assert replace(llm.model.args, norm_eps=1e-5) == model.args  # GGUF keeps the epsilon as a float32
    assert llm.model.args.norm_eps == pytest.approx(1e-5, rel=1e-7)
    tokens = torch.randint(0, TINY.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(llm.model(tokens), model(tokens))  # the q/k permutation undone exactly


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_block_formats_load_as_gguf_dequantizes_them(tmp_path, make_model, sp_model, qtype):
    model = make_model()
    names = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight", "output.weight"]
    path = write_gguf(tmp_path / "m.gguf", model, sp_model, types=dict.fromkeys(names, qtype))
    loaded = checkpoint_state(llmkit.load(path).model)
    original = checkpoint_state(model)
    for ours in ["layers.1.feed_forward.w2.weight", "tok_embeddings.weight"]:
        data = gguf.quants.quantize(original[ours].numpy(), qtype)
        assert torch.equal(loaded[ours], torch.from_numpy(gguf.quants.dequantize(data, qtype)))
    error = (loaded["layers.0.attention.wq.weight"] - original["layers.0.attention.wq.weight"]).abs().max()
    assert 0 < error < 0.1  # rounded, but each row back in its place


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_dequantize_as_gguf_does(tmp_path, make_model, sp_model, qtype):
    """gguf can't write k-quants, so random blocks (with small finite fp16 scales) stand in for a 256-wide tensor."""
    model = make_model(TINY, dim=256, hidden_dim=256, n_heads=4, n_kv_heads=2)
    path = write_gguf(tmp_path / "m.gguf", model, sp_model)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (256, size), dtype=np.uint8)
    scales = slice(size - 2, size) if qtype == Q.Q6_K else slice(0, 4)  # d (and dmin) as fp16
    raw[:, scales] = np.full((256, (scales.stop - scales.start) // 2), 0.01, np.float16).view(np.uint8)
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            writer.add_key_value(field.name, field.contents(), field.types[0], field.types[-1])
    for t in reader.tensors:
        data = raw if t.name == "blk.0.ffn_down.weight" else np.array(t.data)
        writer.add_tensor(t.name, data, raw_dtype=qtype if data is raw else t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = checkpoint_state(llmkit.load(tmp_path / "k.gguf").model)["layers.0.feed_forward.w2.weight"]
    assert torch.equal(loaded, torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(256, 256))


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(tmp_path, make_model, sp_model):
    tok = GGUFTokenizer(tmp_path / "m.gguf", read(write_gguf(tmp_path / "m.gguf", make_model(), sp_model)))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.bos_id == sp.bos_id() and tok.eos_ids == [sp.eos_id()]  # llama vocabularies add BOS by default
    for text in TEXTS:
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text


def test_block_weights_stay_in_their_blocks_as_torchao_tensors(tmp_path, make_model, sp_model):
    """`gguf_blocks=True`: Q8_0/Q4_0/Q4_1 weights become torchao tensors holding what the float load holds (Q4_1
    within float32 rounding); a wqkv whose parts differ in format, and F32 tensors, stay float."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    model = make_model()
    types = {f"blk.0.attn_{w}.weight": Q.Q4_1 for w in "qkv"} | {"blk.1.attn_q.weight": Q.Q4_0}  # layer 1: mixed
    types |= {f"blk.{i}.ffn_{w}.weight": Q.Q4_0 for i in (0, 1) for w in ("gate", "up", "down")}
    types |= {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0, "blk.0.attn_output.weight": Q.Q8_0}
    path = write_gguf(tmp_path / "m.gguf", model, sp_model, types=types)
    floats, blocks = llmkit.load(path), llmkit.load(path, gguf_blocks=True)
    assert blocks.scheme == "gguf"
    kept = {n for n, p in blocks.model.named_parameters() if isinstance(p, IntxUnpackedToInt8Tensor)}
    mlp = {f"layers.{i}.feed_forward.{w}.weight" for i in (0, 1) for w in ("w1", "w2", "w3")}
    assert kept == mlp | {"layers.0.attention.wqkv.weight", "layers.0.attention.wo.weight", "tok_embeddings.weight",
                          "output.weight"}  # fmt: skip
    expected = dict(floats.model.named_parameters())
    for name, weight in blocks.model.named_parameters():
        values = weight.dequantize() if name in kept else weight
        torch.testing.assert_close(values, expected[name], rtol=0, atol=1e-6)  # Q4_1's float zero: a rounding
    tokens = torch.randint(0, TINY.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(blocks.model(tokens), floats.model(tokens), rtol=0, atol=1e-5)


def test_gguf_blocks_need_a_gguf_file_with_blocks(tmp_path, make_model, sp_model, tiny_folder):
    with pytest.raises(llmkit.LLMKitError, match="not one"):
        llmkit.load(tiny_folder, gguf_blocks=True)
    with pytest.raises(llmkit.LLMKitError, match="no Q8_0, Q4_0 or Q4_1 weights"):
        llmkit.load(write_gguf(tmp_path / "f32.gguf", make_model(), sp_model), gguf_blocks=True)


def test_cli_quantize_gguf_generates_what_the_float_load_generates(tmp_path, make_model, sp_model):
    """Q8_0 and Q4_0 blocks hold exactly the float load's values, so greedy text is the same token for token."""
    types = {f"blk.{i}.{w}.weight": Q.Q4_0 for i in (0, 1) for w in ("attn_q", "attn_k", "attn_v", "ffn_up")}
    path = write_gguf(tmp_path / "m.gguf", make_model(), sp_model, types=types | {"output.weight": Q.Q8_0})
    args = [sys.executable, "-m", "llmkit", "generate", "--checkpoint-path", path, "--prompt", "the model reads",
            "--max-new-tokens", "12", "--temperature", "0"]  # fmt: skip
    floats = subprocess.run(args, capture_output=True, text=True)
    blocks = subprocess.run([*args, "--quantize", "gguf"], capture_output=True, text=True)
    assert floats.returncode == blocks.returncode == 0, blocks.stderr
    assert blocks.stdout == floats.stdout and len(floats.stdout) > len("the model reads")
    wrong = subprocess.run([*args[:5], "default", "--quantize", "gguf"], capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "not one" in wrong.stderr


def test_convert_rewrites_the_matrices_and_keeps_the_rest(tmp_path, make_model, sp_model):
    """A Q4_1 file converted to F32 loads as the same model; to Q8_0, each matrix is gguf's own encoding of those
    values; the metadata is copied whole; an existing target is kept unless forced."""
    from llmkit.gguf import convert

    model = make_model()
    source = write_gguf(tmp_path / "m.gguf", model, sp_model, types=dict.fromkeys(["blk.0.attn_q.weight",
                                                                                  "blk.1.ffn_up.weight"], Q.Q4_1))
    f32, q8 = convert(source, tmp_path / "f32.gguf", "f32"), convert(source, tmp_path / "q8.gguf", "q8_0")
    floats = llmkit.load(source)
    tokens = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(llmkit.load(f32).model(tokens), floats.model(tokens))
    original, written = read(source), read(q8)
    for before, after in zip(original.tensors, written.tensors, strict=True):
        values = gguf.quants.dequantize(before.data, before.tensor_type)
        expected_type = Q.Q8_0 if len(before.shape) > 1 else Q.F32
        assert after.name == before.name and after.tensor_type == expected_type
        encoded = gguf.quants.quantize(values, expected_type)
        assert np.array_equal(np.asarray(after.data), encoded.reshape(after.data.shape))
    keep = {name for name in original.fields if not name.startswith("GGUF.")}
    assert {n: original.fields[n].contents() for n in keep} == {n: written.fields[n].contents() for n in keep}
    with pytest.raises(llmkit.LLMKitError, match="already exists"):
        convert(source, q8, "q8_0")
    with pytest.raises(llmkit.LLMKitError, match="use one of"):
        convert(source, tmp_path / "k.gguf", "q4_k")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_an_exported_gguf_model_loads_back_with_the_files_tokenizer(tmp_path, make_model, sp_model):
    """The .pte of a GGUF model travels with a copy of the file, whose metadata holds the tokenizer."""
    from llmkit.executorch import export_pte, load_pte

    llm = llmkit.load(write_gguf(tmp_path / "m.gguf", make_model(), sp_model))
    pte = load_pte(export_pte(llm, tmp_path / "m.pte"))
    prompt = "the model reads the text"
    assert pte.tokenizer.encode(prompt, bos=True) == llm.tokenizer.encode(prompt, bos=True)
    assert pte.generate(prompt, max_new_tokens=8, temperature=0).tokens == llm.generate(
        prompt, max_new_tokens=8, temperature=0
    ).tokens
