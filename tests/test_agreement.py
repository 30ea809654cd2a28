"""llmkit.evaluate.agreement: top-1 agreement with a reference's greedy tokens, and where the greedy continuations
part, on a hand-made step function and on the kit's default model, float and quantized."""

import pytest
import torch

from llmkit.errors import LLMKitError
from llmkit.evaluate import Agreement, agreement, greedy_choices
from llmkit.generate import LLM
from llmkit.loading import load
from llmkit.quantize import quantize

VOCAB = 16


def counting_llm(detour_after: int) -> LLM:
    """A model whose greedy choice is the last token + 1, except after `detour_after`, where it is 9."""

    def step(tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        nxt = torch.where(tokens == detour_after, 9, (tokens + 1) % VOCAB)
        return torch.nn.functional.one_hot(nxt, VOCAB).float()

    return LLM(None, None, name="counting", step=step, max_seq_len=64, device="cpu")


def test_agreement_by_hand() -> None:
    llm = counting_llm(detour_after=3)
    # fed 0 1 | 2 3 4 5, it picks 2 3 9 5: the third choice differs, the rest agree
    assert greedy_choices(llm, [0, 1], [2, 3, 4, 5]) == [2, 3, 9, 5]
    a = agreement(llm, [0, 1], [2, 3, 4, 5])
    assert (a.top1, a.identical, a.first_difference) == (0.75, False, 2)
    assert agreement(counting_llm(detour_after=7), [0, 1], [2, 3, 4, 5]) == Agreement(1.0, True, None)
    with pytest.raises(LLMKitError, match="no tokens"):
        agreement(llm, [0, 1], [])


def test_a_quantized_model_agrees_less_than_the_float_model_with_itself() -> None:
    prompt = "The built-in function"
    llm = load("default")
    reference = llm.generate(prompt, max_new_tokens=48, temperature=0).tokens
    same = agreement(llm, prompt, reference)
    assert (same.top1, same.identical, same.first_difference) == (1.0, True, None)
    quantized = quantize(load("default"), "8da4w-256")
    low = agreement(quantized, prompt, reference)
    assert low.top1 < 1.0 and not low.identical
    own = quantized.generate(prompt, max_new_tokens=48, temperature=0).tokens  # parts where agreement says
    assert own[: low.first_difference] == reference[: low.first_difference]
    assert own[low.first_difference] != reference[low.first_difference]
