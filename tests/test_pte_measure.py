"""llmkit.pte_bench: a filler tokenizer for random-weight models, and a .pte measured by ExecuTorch's C++ runner
in a fresh process (`python -m llmkit.pte_bench`)."""

import pytest

from llmkit.errors import LLMKitError
from llmkit.executorch import export_pte
from llmkit.generate import LLM
from llmkit.model import ModelArgs, random_model
from llmkit.pte_bench import filler_tokenizer, measure_pte
from llmkit.tokenizer import load_tokenizer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=128, max_seq_len=128)


def test_filler_tokenizer_has_the_vocabulary_and_only_whole_utf8_tokens(tmp_path) -> None:
    tok = load_tokenizer(filler_tokenizer(tmp_path / "filler.bin", 300))
    assert tok.vocab_size == 300 and tok.bos_id == 1
    assert [tok.decode([i]) for i in (3 + ord("a"), 3 + 0xC5, 259, 260, 299)] == ["a", "<xC5>", " ", " w0", " w39"]
    assert all("\ufffd" not in tok.decode([i]) for i in range(300))  # no token is part of a UTF-8 character
    with pytest.raises(LLMKitError, match="too few"):
        filler_tokenizer(tmp_path / "small.bin", 100)


def test_measure_pte_in_a_fresh_process(tmp_path) -> None:
    tok = load_tokenizer(filler_tokenizer(tmp_path / "filler.bin", ARGS.vocab_size))
    path = export_pte(LLM(random_model(ARGS), tok, name="tiny"), tmp_path / "tiny.pte")
    r = measure_pte(path, tok, new_tokens=8, prompt_tokens=16)
    assert set(r) == {"peak RSS MB", "above imports MB", "prefill tok/s", "decode tok/s"}
    assert r["prefill tok/s"] > 0 and r["decode tok/s"] > 0
    assert 0 < r["above imports MB"] < r["peak RSS MB"]
    with pytest.raises(LLMKitError, match="measuring .*missing.pte failed"):
        measure_pte(tmp_path / "missing.pte", tok)
