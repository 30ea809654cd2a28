"""Speculative decoding against the target alone: the same greedy tokens, the same sampling distribution."""

from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from torch._dynamo.utils import counters

import llmkit
from llmkit.cli import main
from llmkit.errors import LLMKitError
from llmkit.generate import LLM
from llmkit.loading import DATA_DIR
from llmkit.model import ModelArgs
from llmkit.sampling import distributions, probabilities, sampling_options
from llmkit.speculative import accept, forward, speculate
from llmkit.tokenizer import Tokenizer

DRAFT = DATA_DIR / "pydoc-lm-draft"
PROMPTS = ["The built-in function", "Return a new list of", "This module provides", ""]


@pytest.fixture(scope="module")
def pair() -> tuple[LLM, LLM]:
    torch.set_num_threads(1)  # small models on a shared CPU: threads only wait for each other
    return llmkit.load("default"), llmkit.load(DRAFT)


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_output_is_the_targets_token_for_token(pair, k):
    target, draft = pair
    spec = speculate(target, draft, k)
    accepted = 0
    for prompt in PROMPTS:
        alone = target.generate(prompt, max_new_tokens=48, temperature=0)
        out = spec.generate(prompt, max_new_tokens=48, temperature=0)
        assert out.tokens == alone.tokens and out.text == alone.text, prompt
        accepted += out.stats.accepted
    assert accepted > 0  # the draft's guesses were used, not only rejected


def test_greedy_compiled_is_the_targets_token_for_token(pair):
    target, draft = pair
    alone = target.generate(PROMPTS[0], max_new_tokens=48, temperature=0)
    spec = llmkit.compile(speculate(llmkit.load("default"), llmkit.load(DRAFT), 3))
    out = spec.generate(PROMPTS[0], max_new_tokens=48, temperature=0)
    assert out.tokens == alone.tokens and out.stats.accepted > 0 and spec.compile_time > 0


OPTIONS = [(0.0, None, None), (0.8, None, None), (0.8, 200, None), (1.3, 1, None), (0.7, None, 0.9),
           (1.0, 50, 0.5), (2.0, None, 1e-3), (1e-4, 10**6, None)]  # fmt: skip


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), OPTIONS)
def test_distributions_on_the_device_are_the_samplers(temperature, top_k, top_p):
    """The round's distributions (options as a tensor, no branch in Python) against `probabilities`, row by row:
    the same tokens kept, the same probabilities to float32 rounding."""
    logits = 3 * torch.randn(32, 1000, generator=torch.Generator().manual_seed(0))
    got = distributions(logits, sampling_options(temperature, top_k, top_p, torch.device("cpu")))
    want = torch.stack([probabilities(row, temperature, top_k, top_p) for row in logits])
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_compiled_round_is_the_eager_round(pair):
    """The compiled round's halves (graphs with `distributions` and the draws inside) against the eager ones
    (`probabilities`), on the same tokens, noise and options: the same guesses, distributions within float32
    rounding."""
    target, draft = pair
    k, vocab = 3, target.tokenizer.vocab_size
    spec = llmkit.compile(speculate(llmkit.load("default"), llmkit.load(DRAFT), k))
    assert spec.compile_fallback is None
    graphs = counters["stats"]["unique_graphs"]
    spec.generate(PROMPTS[1], max_new_tokens=16, temperature=0.8, top_k=40, seed=0)
    assert counters["stats"]["unique_graphs"] == graphs, "generation compiled a graph that compile() had not"
    eager = speculate(target, draft, k)
    prompt = torch.tensor(target.encode_prompt(PROMPTS[0]))
    n = len(prompt) - 1
    for llm in (spec, eager):
        for model in (llm.target, llm.draft):
            forward(model, prompt[:-1], 0)
    noise = torch.empty(k, vocab).exponential_(generator=torch.Generator().manual_seed(0))
    for sampling in OPTIONS[:6]:
        (guesses, q), (want_guesses, want_q) = spec.propose(prompt[-1:], n, noise, sampling), eager.propose(
            prompt[-1:], n, noise, sampling)  # fmt: skip
        assert torch.equal(guesses, want_guesses)
        torch.testing.assert_close(q, want_q, rtol=1e-4, atol=1e-5)
        verify = torch.cat([prompt[-1:], guesses])
        torch.testing.assert_close(spec.score(verify, n, sampling), eager.score(verify, n, sampling), rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_greedy_on_the_gpu_is_the_targets(compiled):
    """float32 on the GPU: the round's guesses and verify (a CUDA graph each when compiled) give the target's
    tokens."""
    alone = llmkit.load("default", device="cuda").generate(PROMPTS[0], max_new_tokens=48, temperature=0)
    spec = speculate(llmkit.load("default", device="cuda"), llmkit.load(DRAFT, device="cuda"), 4)
    if compiled:
        assert llmkit.compile(spec).compile_fallback is None  # the round's two CUDA graphs were recorded
    out = spec.generate(PROMPTS[0], max_new_tokens=48, temperature=0)
    assert out.tokens == alone.tokens and out.stats.accepted > 0


def test_chat_with_a_draft_replies_as_the_target(pair):
    from llmkit.chat import chat

    target, draft = pair
    messages = [{"role": "user", "content": "What does the built-in function len return?"}]
    alone = chat(target, messages, max_new_tokens=24, temperature=0)
    assert chat(speculate(target, draft, 3), messages, max_new_tokens=24, temperature=0).tokens == alone.tokens


def test_speculation_stops_where_the_context_ends(pair):
    """Near the end of the context the target goes on alone; the output is still the target's."""
    target, draft = pair
    short = llmkit.load("default", max_seq_len=40)
    alone = short.generate(PROMPTS[1], max_new_tokens=100, temperature=0)
    out = speculate(short, draft, 8).generate(PROMPTS[1], max_new_tokens=100, temperature=0)
    assert out.tokens == alone.tokens and len(out.tokens) == 40 - len(short.encode_prompt(PROMPTS[1]))


def test_a_draft_that_is_the_target_is_always_accepted(pair):
    target, _ = pair
    out = speculate(target, target, 4).generate(PROMPTS[0], max_new_tokens=40, temperature=1.0, seed=3)
    assert out.stats.proposed > 0 and out.stats.accepted == out.stats.proposed


# ---- the sampling distribution --------------------------------------------------------------------------------


class Letters(Tokenizer):
    """Ids 0..n-1 as letters, with no end of sequence: every sampled sequence has the asked length."""

    kind, bos_id, eos_ids, path = "letters", None, [], None

    def __init__(self, n: int):
        self.vocab_size = n

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)

    def piece(self, id: int) -> str:
        return chr(ord("a") + id)


V = 6  # a small vocabulary, so pairs of tokens make 36 cells with plenty of samples each
SMALL = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=V, hidden_dim=128, max_seq_len=16)
PROMPT = [0, 3, 1]
TEMPERATURE = 1.5  # the random models' logits are large; this spreads their distributions
SIGNIFICANCE = 0.001  # a correct sampler fails the test once in a thousand seed sets
N = 2500


def exact_pair_distribution(model, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """P(second, third new token) when sampling `model` alone at TEMPERATURE with top-k and top-p, summed over the
    first: [V, V]. The distributions are `llmkit.sampling.probabilities`, which `LLM.generate` draws from."""
    def probs(ids: list[int]) -> torch.Tensor:
        return probabilities(model(torch.tensor([ids]))[0, -1], TEMPERATURE, top_k, top_p).double()

    joint = torch.zeros(V, V, dtype=torch.float64)
    with torch.no_grad():
        p0 = probs(PROMPT)
        for a in range(V):
            p1 = probs([*PROMPT, a])
            for b in range(V):
                joint[b] += p0[a] * p1[b] * probs([*PROMPT, a, b])
    return joint


def chi_square_p_value(counts: Counter, expected: torch.Tensor) -> float:
    """Pearson's test of counts of (second, third) tokens against `expected` probabilities: the p-value, from the
    chi-square survival function Q(df / 2, x / 2) (regularised upper incomplete gamma). Cells expected fewer than
    5 times are pooled into one, as the chi-square approximation needs; a pair of probability 0 must never occur."""
    n = sum(counts.values())
    observed = torch.tensor([[counts[(b, c)] for c in range(V)] for b in range(V)], dtype=torch.float64).flatten()
    e = expected.flatten() * n
    assert observed[e == 0].sum() == 0, "a pair the target never samples came out"
    rare = (e > 0) & (e < 5)
    if rare.any():  # one cell of all the rare pairs (the approximation tolerates one cell expected 1 to 5 times)
        observed = torch.cat([observed[e >= 5], observed[rare].sum().view(1)])
        e = torch.cat([e[e >= 5], e[rare].sum().view(1)])
        assert e[-1] >= 1
    else:
        observed, e = observed[e > 0], e[e > 0]
    statistic = ((observed - e) ** 2 / e).sum()
    df = torch.tensor(len(e) - 1.0, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, statistic / 2))


@pytest.fixture(scope="module")
def small_pair(make_model) -> tuple[LLM, LLM]:
    torch.set_num_threads(1)
    tok = Letters(V)
    # different seeds: the draft's distributions are far from the target's
    return LLM(make_model(SMALL, seed=0, std=0.3), tok), LLM(make_model(SMALL, seed=5, std=0.3), tok)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_draft_with_broken_weights_is_one_clear_error(pair, temperature):
    """The draft's guesses are drawn on the device, where NaN logits would still give a token: the round checks
    them and stops with the same line as the target alone."""
    draft = llmkit.load(DRAFT)
    with torch.no_grad():
        draft.model.output.weight[0, 0] = float("nan")
    with pytest.raises(LLMKitError, match="weights are broken"):
        speculate(pair[0], draft, 3).generate(PROMPTS[0], max_new_tokens=8, temperature=temperature, seed=0)


def test_the_chi_square_test_tells_the_draft_from_the_target(small_pair):
    """The test has the power to fail: the draft's own samples are rejected as the target's."""
    target, draft = small_pair
    counts = Counter(tuple(draft.generate(PROMPT, max_new_tokens=3, temperature=TEMPERATURE, top_k=None,
                                          seed=s).tokens[1:]) for s in range(N))  # fmt: skip
    assert chi_square_p_value(counts, exact_pair_distribution(target.model)) < SIGNIFICANCE


@pytest.mark.parametrize(("k", "top_k", "top_p"), [(1, None, None), (2, None, None), (3, 4, None), (3, None, 0.9)])
def test_sampled_tokens_follow_the_targets_distribution(small_pair, k, top_k, top_p):
    """The second and third new tokens: with k=1 the third is the bonus token after an accepted guess or the next
    round's; with k=2 both come from the acceptance rule's accept or resample; top-k and top-p cut both models'
    distributions, as the target alone would be cut."""
    target, draft = small_pair
    spec = speculate(target, draft, k)
    counts = Counter()
    accepted = proposed = 0
    for s in range(N):
        out = spec.generate(PROMPT, max_new_tokens=3, temperature=TEMPERATURE, top_k=top_k, top_p=top_p, seed=s)
        counts[tuple(out.tokens[1:])] += 1
        accepted, proposed = accepted + out.stats.accepted, proposed + out.stats.proposed
    assert 0.1 < accepted / proposed < 0.9  # both branches of the rule ran, many times
    assert chi_square_p_value(counts, exact_pair_distribution(target.model, top_k, top_p)) > SIGNIFICANCE


def test_the_acceptance_rule_on_a_worked_example():
    """p = (0.5, 0.3, 0.2), q = (0.2, 0.6, 0.2), guess 1: accepted with p/q = 0.5; else the residual
    max(0, p - q) = (0.3, 0, 0) normalised always gives token 0."""
    p = [torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.1, 0.1, 0.8])]
    q = [torch.tensor([0.2, 0.6, 0.2])]
    rng = torch.Generator().manual_seed(0)
    results = Counter(accept(p, q, [1], rng) for _ in range(4000))
    assert set(results) == {(0, 0), (1, 0), (1, 1), (1, 2)}
    assert results[(0, 0)] / 4000 == pytest.approx(0.5, abs=0.03)  # rejected: the residual's one token
    assert results[(1, 2)] / 4000 == pytest.approx(0.5 * 0.8, abs=0.03)  # accepted, then the bonus from p[1]


# ---- bad input ------------------------------------------------------------------------------------------------


def refused(capsys, *argv, says: str) -> None:
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert says in err, err


def test_a_draft_with_another_tokenizer_is_refused(capsys, tiny_folder):
    refused(capsys, "generate", "--draft-checkpoint-path", tiny_folder, "--max-new-tokens", 4,
            says="a draft must share its target's vocabulary")  # fmt: skip


@pytest.mark.parametrize(("argv", "says"), [
    (["--draft-checkpoint-path", DRAFT, "--speculate-k", "0"], "speculate-k must be a whole number from 1 to 32"),
    (["--draft-checkpoint-path", DRAFT, "--speculate-k", "33"], "speculate-k must be a whole number from 1 to 32"),
    (["--speculate-k", "4"], "--speculate-k needs --draft-checkpoint-path"),
    (["--draft-checkpoint-path", DRAFT / "missing"], "draft checkpoint not found"),
])  # fmt: skip
def test_bad_speculation_flags(capsys, argv, says):
    refused(capsys, "generate", "--max-new-tokens", 4, *argv, says=says)


def test_a_k_that_does_not_fit_the_context(pair):
    target, draft = pair
    with pytest.raises(LLMKitError, match="needs a context of at least 10 tokens"):
        speculate(llmkit.load("default", max_seq_len=8), draft, 8)


def test_cli_generate_with_a_draft_prints_the_targets_text(capsys):
    argv = ["generate", "--prompt", PROMPTS[0], "--max-new-tokens", 24, "--temperature", 0]
    assert main([str(a) for a in argv]) == 0
    alone = capsys.readouterr()
    assert main([str(a) for a in [*argv, "--draft-checkpoint-path", DRAFT, "--speculate-k", 3]]) == 0
    spec = capsys.readouterr()
    assert spec.out == alone.out and "draft tokens accepted" in spec.err
