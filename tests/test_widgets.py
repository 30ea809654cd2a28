"""The notebook widgets driven through the same methods their buttons call: no browser needed."""

from html import escape

import pytest
import torch

import llmkit
from llmkit import widgets
from llmkit.sampling import probabilities, sample
from llmkit.widgets import ChatBox, chat_box, numerics_explorer, prompt_logits, tokens_html

PROMPT = "The built-in function"


@pytest.fixture(scope="module")
def llm() -> llmkit.LLM:
    return llmkit.load("default")


@pytest.fixture
def box(llm: llmkit.LLM) -> ChatBox:
    box = chat_box(llm, temperature=0, max_new_tokens=24, seed=0)
    box.prompt.value = PROMPT
    return box


def test_send_button_streams_the_reply_then_the_statistics(box: ChatBox, llm, monkeypatch) -> None:
    monkeypatch.setattr(widgets, "REDRAW_INTERVAL", 0)  # redraw on every piece
    seen = []
    box.conversation.observe(lambda change: seen.append(change["new"]), names="value")
    box.send_button.click()
    expected = llm.generate(PROMPT, max_new_tokens=24, temperature=0).text
    assert box.turns == [(PROMPT, expected)]
    assert len(seen) > 5  # the reply arrived piece by piece
    assert f"{PROMPT}</b>" in seen[-1] and escape(expected.split()[-1]) in seen[-1]
    assert box.stats.value.startswith("<code>") and "24 new tokens" in box.stats.value
    assert box.prompt.value == "" and box.message.value == "" and not box.send_button.disabled


def test_next_prompt_continues_the_transcript(box: ChatBox, llm) -> None:
    first = box.send()
    box.prompt.value = "It returns"
    second = box.send()
    assert box.transcript == f"{PROMPT}{first.text}\nIt returns{second.text}"
    assert second.stats.prompt_tokens == len(llm.tokenizer.encode(f"{PROMPT}{first.text}\nIt returns"))


def test_reset_button_starts_over(box: ChatBox) -> None:
    box.send()
    box.reset_button.click()
    assert box.turns == [] and box.transcript == ""
    assert box.conversation.value == box.stats.value == box.message.value == box.prompt.value == ""


def test_empty_prompt_is_a_message(box: ChatBox) -> None:
    box.prompt.value = "  \n "
    assert box.send() is None
    assert "Type a prompt first" in box.message.value
    assert box.turns == [] and box.stats.value == ""


def test_prompt_longer_than_the_context_is_a_message(box: ChatBox, llm) -> None:
    box.prompt.value = "word " * llm.max_seq_len
    assert box.send() is None
    assert f"but the context holds {llm.max_seq_len}; shorten the prompt." in box.message.value
    assert "Reset" not in box.message.value
    assert box.turns == [] and box.prompt.value.startswith("word") and not box.send_button.disabled


def test_conversation_that_outgrows_the_context_suggests_reset(box: ChatBox, llm) -> None:
    box.send()
    shown = box.conversation.value
    box.prompt.value = "word " * (llm.max_seq_len - 20)
    assert box.send() is None
    assert "context holds" in box.message.value and "press Reset" in box.message.value
    assert len(box.turns) == 1 and box.conversation.value == shown


def test_chat_box_shows_as_widget_and_as_snapshot(box: ChatBox) -> None:
    box.send()
    bundle = box._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == box.widget.model_id
    assert escape(box.turns[0][1]) in bundle["text/html"] and "new tokens" in bundle["text/html"]


def test_tokens_html(llm) -> None:
    tok = llm.tokenizer
    ids = tok.encode("Hi <b>")
    html = tokens_html(tok, ids)
    assert html.count('class="llmkit-token"') == len(ids)
    assert tok.piece(ids[0]) == "<s>" and "&lt;s&gt;" in html and "<b>" not in html  # escaped, not markup
    for i, id in enumerate(ids):
        assert f'title="id {id}" style="background:{widgets.PALETTE[i % len(widgets.PALETTE)]}' in html


def test_tokens_html_shows_newlines_and_tabs() -> None:
    class Pieces:
        def piece(self, id: int) -> str:
            return ["a", "\n", " \t"][id]

    html = tokens_html(Pieces(), [0, 1, 2])
    assert "\n" not in html and "\t" not in html and ">\u21b5<" in html and "> \u21e5<" in html


def test_probabilities_are_what_sample_draws_from() -> None:
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3
    assert probabilities(logits, 0).tolist() == torch.nn.functional.one_hot(logits.argmax(), 64).float().tolist()
    assert int((probabilities(logits, 1.0, top_k=5) > 0).sum()) == 5
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, 10, None), (1.3, None, 0.8), (1.0, 20, 0.5)]:
        probs = probabilities(logits, temperature, top_k, top_p)
        rng = torch.Generator().manual_seed(1)
        draws = torch.tensor([sample(logits, temperature, top_k, top_p, rng) for _ in range(3000)])
        frequency = torch.bincount(draws, minlength=64) / len(draws)
        assert abs(float(probs.sum()) - 1) < 1e-5
        assert bool((probs[draws] > 0).all())
        assert float((frequency - probs).abs().max()) < 0.04


def test_top_p_keeps_the_smallest_set_holding_p() -> None:
    probs = probabilities(torch.tensor([0.5, 0.3, 0.15, 0.05]).log(), 1.0, top_p=0.75)
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0, 0]))


def test_prompt_logits_score_each_next_token(llm) -> None:
    logits = prompt_logits(llm, PROMPT)
    assert logits.shape == (len(llm.tokenizer.encode(PROMPT)), llm.tokenizer.vocab_size)
    assert int(logits[-1].argmax()) == llm.generate(PROMPT, max_new_tokens=1, temperature=0).tokens[0]


def test_numerics_explorer_redraws_on_change() -> None:
    row = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 0.02
    explorer = numerics_explorer(row)
    assert explorer.result["format"] == "int" and len(explorer.result["grid"]) == 16  # 4 bits by default
    explorer.bits.value = 3
    assert len(explorer.result["grid"]) == 8 and explorer.result["bits_per_weight"] == 3 + 32 / 32
    explorer.format.value = "mxfp4"
    assert explorer.result["format"] == "mxfp4" and explorer.bits.disabled
    assert bytes(explorer.plot.value).startswith(b"\x89PNG") and "mxfp4" in explorer.summary.value
    assert "data:image/png;base64," in explorer._repr_mimebundle_()["text/html"]


def test_numerics_explorer_shows_a_bad_setting_as_a_message() -> None:
    explorer = numerics_explorer(torch.randn(48) * 0.02, group_sizes=(16,))
    explorer.format.value = "mxfp4"  # blocks of 32 do not divide 48 values
    assert explorer.result is None and "block size" in explorer.summary.value
