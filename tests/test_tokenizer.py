"""Tokenizers against their references: llama2.c's run.c, sentencepiece, transformers and tiktoken."""

import base64
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from llmkit.errors import LLMKitError
from llmkit.generate import StreamDecoder
from llmkit.tokenizer import Tokenizer, find_tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tok512(shared_data: Path) -> Tokenizer:
    return load_tokenizer(shared_data / "stories260K" / "tok512.bin")


SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park.",
    "One day, she saw a big, red ball.",
    "She wanted to play with it, but it was too high.",
    'Lily\'s mom said: "Be careful!"',
    "The sun was warm and the sky was blue.",
    "Tom and Lily were friends. They'll play again tomorrow.",
    "They played in the garden every day, 123 times.",
    "A cat sat on the mat, happy and fat.",
]
# Characters outside the training text, so they are split into byte tokens.
UNSEEN = "Lily's ball, é日本 🙂\nnext line"


def stream(tokenizer: Tokenizer, ids: list[int], prompt_ids: list[int] = ()) -> list[str]:
    decoder = StreamDecoder(tokenizer, prompt_ids)
    return [decoder.push(id) for id in ids]


# ----------------------------------------------------------------------------------------------------------
# llama2.c tok512.bin against run.c

# The start of stories260K's greedy output (llama2.c doc/stories260K.md, `./run ... -t 0.0`).
LILY = "Once upon a time, there was a little girl named Lily."
GREEDY = LILY + " She loved to play outside in the park."

# Token ids printed by llama2.c's own encode(t, text, bos=1, eos=0) for tok512.bin (vocab_size 512). Produced
# by copying the Tokenizer section of karpathy/llama2.c (build_tokenizer, str_lookup, encode, decode; the copy
# in runq.c at b233b77, the same code as run.c's) into /tmp with a small main() that prints the ids, built
# with `gcc -O2` and run as `./tok tok512.bin 512 "<prompt>"`.
RUN_C_IDS = {
    "": [1],
    "Once upon a time": [1, 403, 407, 261, 378],
    "Lily's ball, é日本": [1, 317, 439, 419, 268, 388, 432, 410, 485, 233, 154, 168, 233, 159, 175],
    "Hello\nworld": [1, 346, 306, 414, 13, 424, 304, 341],
    LILY: [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426],
    # long enough that merging the first or the last mergeable pair, not the best-scoring one, differs
    "They laughed and danced.\nThe peach will be ripe soon.": [
        1, 342, 278, 412, 425, 428, 260, 418, 269, 279, 303, 429, 266, 426, 13,
        434, 260, 282, 411, 412, 402, 263, 290, 421, 329, 410, 325, 427, 411, 384, 289, 426,
    ],
}  # fmt: skip


@pytest.mark.parametrize("text", RUN_C_IDS)
def test_llama2c_encode_matches_run_c(tok512: Tokenizer, text: str):
    assert tok512.encode(text) == RUN_C_IDS[text]
    assert tok512.encode(text, bos=False) == RUN_C_IDS[text][1:]


def run_c_merges(tok: Tokenizer, tokens: list[int]) -> list[int]:
    """run.c's encode() loop as it is written: rescan every pair, merge the best-scoring (first on a tie)."""
    while True:
        best_score, best = -1e10, None
        for i in range(len(tokens) - 1):
            id = tok.ids.get(tok.pieces[tokens[i]] + tok.pieces[tokens[i + 1]])
            if id is not None and tok.scores[id] > best_score:
                best_score, best = tok.scores[id], (i, id)
        if best is None:
            return tokens
        tokens[best[0] : best[0] + 2] = [best[1]]


def test_llama2c_merges_as_run_c_loop_on_random_text(tok512: Tokenizer):
    rng = random.Random(0)
    alphabet = "aeiou tnsrhldcmfpgwybvk.,!?'\n\tTLSAé日本"  # common letters, runs of space, and byte fallback
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
        unmerged = [tok512.bos_id, tok512.ids[b" "]] + [i for c in text for i in tok512._char_ids(c)]
        assert tok512.encode(text) == run_c_merges(tok512, unmerged), text


@pytest.mark.parametrize("text", [*RUN_C_IDS, GREEDY, UNSEEN])
def test_llama2c_decode_round_trips(tok512: Tokenizer, text: str):
    assert tok512.decode(tok512.encode(text)) == text


def test_llama2c_file_facts(tok512: Tokenizer):
    assert (tok512.kind, tok512.vocab_size, tok512.bos_id, tok512.eos_ids) == ("llama2c", 512, 1, [2, 1])


def test_llama2c_decode_follows_run_c(tok512: Tokenizer):
    once = RUN_C_IDS["Once upon a time"][1]
    assert tok512.decode([1, once]) == "Once"  # run.c strips a piece's leading space only right after BOS
    assert tok512.decode([once]) == " Once"
    assert tok512.decode([2, 3 + 0x41]) == "A"  # EOS prints nothing; <0x41> is the raw byte "A"
    assert tok512.piece(1) == "<s>" and tok512.piece(13) == "<0x0A>" and tok512.piece(once) == " Once"


def test_llama2c_stream_decoder(tok512: Tokenizer):
    ids = tok512.encode(GREEDY + " é日本")
    pieces = stream(tok512, ids[1:], ids[:1])
    assert "".join(pieces) == tok512.decode(ids)
    assert pieces[-1] == "本" and pieces[-2] == ""  # 本 is three byte tokens; only the last prints it
    # with a prompt: the new text continues it
    assert "".join(stream(tok512, ids[5:], ids[:5])) == tok512.decode(ids)[len("Once upon a time") :]


# ----------------------------------------------------------------------------------------------------------
# SentencePiece, against sentencepiece itself and transformers' LlamaTokenizer


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 3),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=300,  # 3 specials + 256 byte pieces + ~40 learned ones
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="identity",  # as Llama 2's: keep newlines and runs of spaces
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def test_sentencepiece_matches_references(sp_model: Path):
    tokenizer = load_tokenizer(sp_model)
    reference = spm.SentencePieceProcessor(model_file=str(sp_model))
    hf = LlamaTokenizer.from_pretrained(sp_model.parent)
    assert tokenizer.kind == "sentencepiece" and tokenizer.vocab_size == 300
    assert (tokenizer.bos_id, tokenizer.eos_ids) == (hf.bos_token_id, [hf.eos_token_id]) == (1, [2])
    for text in [*SENTENCES, UNSEEN, " two  spaces ", ""]:
        ids = reference.encode(text)
        if not text.startswith(" "):  # transformers 5 drops one leading space there: ["▁t", ...], not ["▁", "▁t", ...]
            assert ids == hf.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text) == [1, *ids]
        assert tokenizer.encode(text, bos=False) == ids
        assert tokenizer.decode(tokenizer.encode(text)) == reference.decode(ids)
    assert tokenizer.decode(tokenizer.encode(UNSEEN)) == UNSEEN


def test_sentencepiece_stream_decoder_and_pieces(sp_model: Path):
    tokenizer = load_tokenizer(sp_model)
    ids = tokenizer.encode(UNSEEN)
    pieces = stream(tokenizer, ids[1:], ids[:1])
    assert "".join(pieces) == tokenizer.decode(ids) == UNSEEN
    assert pieces.count("") >= 6  # é, 日, 本 and 🙂 are split over byte-fallback tokens
    assert tokenizer.piece(3 + 0xE6) == "<0xE6>" and tokenizer.piece(1) == "<s>"
    assert "".join(tokenizer.piece(id) for id in tokenizer.encode(SENTENCES[0], bos=False)) == " " + SENTENCES[0]


# ----------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json, against transformers' PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE (GPT-2 style) whose post-processor adds <s>, like Llama 3's tokenizer.json."""
    folder = tmp_path_factory.mktemp("huggingface")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 3, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_huggingface_matches_transformers(hf_folder: Path):
    tokenizer = load_tokenizer(hf_folder)  # the folder: find_tokenizer picks tokenizer.json
    reference = PreTrainedTokenizerFast(tokenizer_file=str(hf_folder / "tokenizer.json"))
    assert tokenizer.kind == "huggingface" and tokenizer.vocab_size == len(reference)
    assert tokenizer.bos_id == 0 and tokenizer.eos_ids == []  # no config files: BOS from the post-processor
    for text in [*SENTENCES, UNSEEN, ""]:
        ids = reference.encode(text)  # the post-processor adds <s>
        assert ids[0] == 0 and ids[1:2] != [0]
        assert tokenizer.encode(text) == ids  # one BOS, not two
        assert tokenizer.encode(text, bos=False) == ids[1:]
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text


def test_huggingface_special_ids_from_config_files(hf_folder: Path, tmp_path: Path):
    shutil.copy(hf_folder / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tokenizer.bos_id, tokenizer.eos_ids) == (0, [2, 1])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))  # Qwen-style: no BOS
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.bos_id is None and tokenizer.encode("a sat") == tokenizer.encode("a sat", bos=False)


def test_huggingface_stream_decoder_and_pieces(hf_folder: Path):
    tokenizer = load_tokenizer(hf_folder)
    ids = tokenizer.encode(UNSEEN)
    pieces = stream(tokenizer, ids[1:], ids[:1])
    assert "".join(pieces) == UNSEEN and "" in pieces
    assert "".join(tokenizer.piece(id) for id in tokenizer.encode(SENTENCES[0], bos=False)) == SENTENCES[0]
    assert tokenizer.piece(0) == "<s>"
    assert tokenizer.piece(tokenizer.encode("日", bos=False)[0]) == "<0xE6>"  # GPT-2's "æ" for the byte E6


# ----------------------------------------------------------------------------------------------------------
# tiktoken (Llama 3 format), against tiktoken.Encoding built from the same ranks

# Llama 3's split pattern, as in Meta's llama3 tokenizer.py.
LLAMA3_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
MERGES = [b"he", b"ll", b"llo", b"hello", b" t", b"th", b" th", b"the", b" the", b"in", b" in", b"12", b"'ll"]


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, int]]:
    ranks = {bytes([b]): b for b in range(256)} | {merge: 256 + i for i, merge in enumerate(MERGES)}
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks.items()))
    return path, ranks


def test_tiktoken_matches_tiktoken(tiktoken_file: tuple[Path, dict[bytes, int]]):
    path, ranks = tiktoken_file
    tokenizer = load_tokenizer(path)
    reference = tiktoken.Encoding(name="reference", pat_str=LLAMA3_PAT, mergeable_ranks=ranks, special_tokens={})
    n = len(ranks)  # special tokens follow the ranks (128000 in Llama 3)
    assert tokenizer.kind == "tiktoken" and tokenizer.vocab_size == n + 256
    assert (tokenizer.bos_id, tokenizer.eos_ids) == (n, [n + 1, n + 9])
    for text in ["hello the thin in 12345, they'll", *SENTENCES, UNSEEN, "  spaces\n\n\tand tabs  "]:
        ids = reference.encode(text)
        assert tokenizer.encode(text) == [n, *ids]
        assert tokenizer.decode([n, *ids, n + 9]) == reference.decode(ids) == text
    assert tokenizer.encode("hi<|eot_id|>", bos=False) == [*reference.encode("hi"), n + 9]


def test_tiktoken_stream_decoder_and_pieces(tiktoken_file: tuple[Path, dict[bytes, int]]):
    tokenizer = load_tokenizer(tiktoken_file[0])
    ids = tokenizer.encode(UNSEEN)
    pieces = stream(tokenizer, ids[1:], ids[:1])
    assert "".join(pieces) == UNSEEN and "" in pieces
    assert [tokenizer.piece(id) for id in tokenizer.encode("hello the 日", bos=False)] == [
        "hello", " the", " ", "<0xE6>", "<0x97>", "<0xA5>",
    ]  # fmt: skip
    assert tokenizer.piece(tokenizer.eos_ids[1]) == "<|eot_id|>"


# ----------------------------------------------------------------------------------------------------------
# finding files, and bad input


def test_find_tokenizer(tmp_path: Path):
    assert find_tokenizer(tmp_path) is None
    (tmp_path / "original").mkdir()
    for name in ["original/tokenizer.model", "tok4096.bin", "tokenizer.bin", "tokenizer.json", "tokenizer.model"]:
        (tmp_path / name).touch()
        assert find_tokenizer(tmp_path) == tmp_path / name  # each one is preferred to those before it


def expect_error(path: Path, *words: str) -> None:
    with pytest.raises(LLMKitError) as error:
        load_tokenizer(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


def test_missing_path(tmp_path: Path):
    expect_error(tmp_path / "nope" / "tokenizer.model", "not found", "tokenizer.json")
    expect_error(tmp_path, "no tokenizer in", "tokenizer.model")


def test_random_binary_files(tmp_path: Path):
    data = random.Random(0).randbytes(5000)
    for name, words in [
        ("tokenizer.model", ["neither a SentencePiece model nor a tiktoken file"]),
        ("tokenizer.bin", ["not a llama2.c tokenizer.bin"]),
        ("mystery.dat", ["unrecognised tokenizer file"]),
        ("tokenizer.json", ["not a Hugging Face tokenizer.json"]),
    ]:
        (tmp_path / name).write_bytes(data)
        expect_error(tmp_path / name, *words)


def test_broken_tok512(shared_data: Path, tmp_path: Path):
    data = (shared_data / "stories260K" / "tok512.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:3000])
    expect_error(tmp_path / "cut.bin", "truncated", "re-export")
    (tmp_path / "header.bin").write_bytes(data[:2])
    expect_error(tmp_path / "header.bin", "truncated")
    bad_length = bytearray(data)
    bad_length[8:12] = (1000).to_bytes(4, "little")  # token 0's byte length
    (tmp_path / "bad.bin").write_bytes(bad_length)
    expect_error(tmp_path / "bad.bin", "corrupt", "length 1000")
    (tmp_path / "short.bin").write_bytes(data[:4] + data[4 : 4 + 8 + 5])  # one whole token: <unk>
    expect_error(tmp_path / "short.bin", "not a complete llama2.c tokenizer.bin (1 tokens")
