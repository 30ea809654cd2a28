"""A real GGUF file (SmolLM2-135M-Instruct, Q4_1) loads as transformers loads it: the same config, logits, token ids,
chat prompt and greedy replies, in Python and on the command line."""

import subprocess
import sys

import pytest
import torch

import llmkit
from llmkit.chat import chat, encode_chat, render, special_tokens, template_for

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Il était une fois, dans un pays lointain,",
    "1, 2, 3, 5, 8, 13,",
]
# Unicode (accents, CJK, emoji, a combining mark), code, runs of spaces, tabs and newlines, numbers, contractions.
CORPUS = [
    "Hello, world!",
    "naïve café, Ünïcödé and e\u0301, 東京タワー, Привет мир, مرحبا 🤖👍🏽",
    "for i in range(10):\n\tprint(f'{i:>4}')  # comment\n\n\n",
    "    four spaces,  two,   three and a trailing run   ",
    "3.14159 + 2,718 = 5859.87 at 12:45 on 2024-12-03; 1e-5 and 0x1F and 1000000",
    "I'm sure they're here, we'll see, it's John's. DON'T SHOUT",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    " ",
    "\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a fact about the moon."},
    ],
]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return llmkit.load(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' model and tokenizer of the same file, float32."""
    import transformers

    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_config_comes_from_the_metadata(ours, reference):
    args, config = ours.model.args, reference[0].config
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size, args.hidden_dim) == (
        576, 30, 9, 3, 49152, 1536
    )  # SmolLM2-135M's published shape
    assert args.n_layers == config.num_hidden_layers and args.n_kv_heads == config.num_key_value_heads
    assert args.hidden_dim == config.intermediate_size and args.max_seq_len == min(2048, config.max_position_embeddings)
    assert args.norm_eps == pytest.approx(config.rms_norm_eps)
    assert args.rope_theta == config.rope_parameters["rope_theta"]
    assert args.tie_embeddings and config.tie_word_embeddings  # the file has no output.weight


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(ours, reference, prompt):
    ids = torch.tensor([reference[1].encode(prompt)])
    with torch.no_grad():
        expected = reference[0](ids).logits
        got = ours.model(ids)
    assert expected.abs().max() > 1  # real logits, not a model of zeros
    assert (got - expected).abs().max() <= 1e-4


def test_kept_blocks_give_transformers_logits(smollm2_gguf, reference):
    """`--quantize gguf`: the file's Q4_1 and Q8_0 blocks as torchao tensors, not dequantized at load, give the
    same logits within the same 1e-4 (Q4_1's float zero point adds a float32 rounding per weight)."""
    blocks = llmkit.load(smollm2_gguf, gguf_blocks=True)
    ids = torch.tensor([reference[1].encode(PROMPTS[0])])
    with torch.no_grad():
        assert (blocks.model(ids) - reference[0](ids).logits).abs().max() <= 1e-4


def test_token_ids_match_transformers(ours, reference):
    tok = reference[1]
    for text in CORPUS:
        assert ours.tokenizer.encode(text, bos=False) == tok.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.encode(text) == tok.encode(text), text  # add_bos_token is false in this file
        ids = tok.encode(text, add_special_tokens=False)
        assert ours.tokenizer.decode(ids) == tok.decode(ids, skip_special_tokens=True), text


def test_digits_are_split_one_by_one_as_the_smollm_pre_tokenizer_says(ours):
    ids = ours.tokenizer.encode("2024", bos=False)
    assert [ours.tokenizer.piece(i) for i in ids] == ["2", "0", "2", "4"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_as_transformers(ours, reference, messages):
    tok = reference[1]
    bos, eos = special_tokens(ours.tokenizer)
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render(messages, template_for(ours.tokenizer), bos, eos) == expected
    assert "You are a helpful AI assistant named SmolLM" in expected or messages[0]["role"] == "system"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert encode_chat(ours.tokenizer, messages) == list(ids)


def reference_reply(reference, question: str) -> list[int]:
    model, tok = reference
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=48, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, prompt["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_chat_replies_match_transformers(ours, reference, question):
    expected = reference_reply(reference, question)
    got = chat(ours, [{"role": "user", "content": question}], max_new_tokens=48, temperature=0)
    assert got.tokens == [t for t in expected if t not in ours.tokenizer.eos_ids]
    assert got.text.strip() == reference[1].decode(expected, skip_special_tokens=True).strip()
    assert len(got.text.split()) >= 2  # the model answers, not an empty reply


def test_cli_chat_prints_the_reply(smollm2_gguf, reference):
    question = QUESTIONS[0]
    expected = reference[1].decode(reference_reply(reference, question), skip_special_tokens=True).strip()
    done = subprocess.run(
        [sys.executable, "-m", "llmkit", "chat", "--checkpoint-path", str(smollm2_gguf), "--temperature", "0",
         "--max-new-tokens", "48"],
        input=question + "\n", capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    reply = done.stdout.removeprefix("> ").removesuffix("\n> \n")  # input()'s prompts, before and after the reply
    assert reply.strip() == expected
