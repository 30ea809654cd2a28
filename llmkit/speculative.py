"""Speculative decoding: a small draft model proposes k tokens, the target checks all of them in one forward.

A decode step reads every weight of the model to make one token, so on memory-bound hardware scoring k + 1
positions costs about as much as scoring one. The draft guesses k tokens one by one (cheaply); the target scores
the last token and the k guesses in one forward of k + 1 positions; each guess is accepted with probability
min(1, p_target / p_draft), and the first rejected one is replaced by a draw from the normalised residual
max(0, p_target - p_draft). If all k are accepted the target's last position gives one more token for free. Every
token that comes out is distributed exactly as the target alone would draw it (Leviathan et al., 2023; Chen et
al., 2023), under the same temperature, top-k and top-p: only the speed depends on the draft.

Nothing is copied to roll a KV cache back: after a rejection the entries past the accepted tokens are stale, but
the next forward writes its own positions before attending, and the causal mask hides every position past the
one being scored, so the stale entries are never read.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from llmkit.errors import LLMKitError
from llmkit.generate import LLM, Generation, Stats, StreamDecoder
from llmkit.loading import load
from llmkit.sampling import BROKEN_LOGITS, check_finite, check_sampling, probabilities
from llmkit.tokenizer import Tokenizer, find_tokenizer

MAX_K = 32  # guesses per round: past this the draft's guesses are almost never all accepted


@dataclass
class SpeculativeStats(Stats):
    rounds: int = 0  # draft-then-verify rounds (each is one forward of the target)
    proposed: int = 0  # tokens the draft proposed
    accepted: int = 0  # of those, tokens the target accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def __str__(self) -> str:
        per_round = (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0
        return super().__str__() + (
            f" | draft tokens accepted {self.accepted}/{self.proposed} ({100 * self.acceptance_rate:.0f}%), "
            f"{per_round:.2f} tokens per target forward"
        )


def same_vocabulary(target: Tokenizer, draft: Tokenizer) -> bool:
    """Whether every token id means the same text to both tokenizers (the acceptance rule compares
    probabilities id by id, so a draft that numbers its tokens differently proposes nonsense)."""
    if target.vocab_size != draft.vocab_size or target.bos_id != draft.bos_id:
        return False
    if set(target.eos_ids) != set(draft.eos_ids):
        return False
    return all(target.piece(i) == draft.piece(i) for i in range(target.vocab_size))


def check_k(k: int) -> None:
    if type(k) is not int or not 1 <= k <= MAX_K:
        raise LLMKitError(f"speculate-k must be a whole number from 1 to {MAX_K}, not {k!r}")


def check_draft(target: LLM, draft: LLM, k: int) -> None:
    """One-line errors for a draft that can't serve the target, or a k that makes no sense."""
    check_k(k)
    if k + 2 > min(target.max_seq_len, draft.max_seq_len):
        raise LLMKitError(f"speculate-k {k} needs a context of at least {k + 2} tokens in both models")
    t, d = target.tokenizer, draft.tokenizer
    if not same_vocabulary(t, d):
        raise LLMKitError(
            f"the draft's tokenizer ({d.kind}, {d.vocab_size} tokens, {d.path}) is not the target's ({t.kind}, "
            f"{t.vocab_size} tokens, {t.path}): a draft must share its target's vocabulary"
        )


def _row_probabilities(logits: Tensor, vocab: int, temperature: float, top_k: int | None,
                       top_p: float | None) -> list[Tensor]:  # fmt: skip
    """`probabilities` of each row of logits [T, V], on the CPU, cut to the tokenizer's ids."""
    logits = logits[:, :vocab].float().cpu()
    check_finite(logits)
    return [probabilities(row, temperature, top_k, top_p) for row in logits]


def _draw(weights: Tensor, rng: torch.Generator) -> int:
    return int(torch.multinomial(weights, 1, generator=rng))


Sampling = tuple[float, int | None, float | None]  # temperature, top_k, top_p, as `probabilities` takes them


def checked(dist: Tensor, logits: Tensor) -> Tensor:
    """`dist`, or NaN where `logits` hold NaN or infinity: the round checks its distributions once, on the CPU."""
    return torch.where(torch.isfinite(logits).all(), dist, float("nan"))


def race(q: Tensor, noise: Tensor) -> Tensor:
    """A token [1] drawn from q, left on its device: the index of the largest q_i / e_i, e_i exponential
    (`noise`), the first of exponential clocks of rates q_i to ring, so nothing waits for a copy."""
    return (q / noise).argmax(-1, keepdim=True)


def forward(llm: LLM, tokens: Tensor, start: int) -> Tensor:
    """Logits [T, V] of tokens [T] at positions start...: tokens on the device, so the GPU need not wait."""
    positions = torch.arange(start, start + len(tokens), device=llm.device)
    logits = llm.step(tokens.to(llm.device)[None], positions)
    if logits.shape[1] != len(tokens):  # an exported .pte returns the last position only
        raise LLMKitError(f"{llm.name} returns only its last position's logits; speculative decoding needs "
                          "every position's: use its checkpoint")  # fmt: skip
    return logits[0]


def chain(guess: Callable, token: Tensor, start: int | Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Guesses [k] and their distributions [k, V] after `token` [1] at position `start`, one per row of `noise`
    [k, V], each guess fed to the next step: `guess(token, position, noise_row)` gives (guess, distribution)."""
    guesses, qs = [], []
    for i, row in enumerate(noise):
        token, q = guess(token, start + i, row)
        guesses.append(token)
        qs.append(q)
    return torch.cat(guesses), torch.stack(qs)


def propose(draft: LLM, token: Tensor, start: int, noise: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor]:
    """The draft's k guesses and their distributions (`chain`), eager."""

    def guess(token: Tensor, position: int, row: Tensor) -> tuple[Tensor, Tensor]:
        logits = forward(draft, token, position)[-1, : row.numel()]
        q = checked(probabilities(logits, *sampling), logits)
        return race(q, row), q

    return chain(guess, token, start, noise)


def score(target: LLM, tokens: Tensor, start: int, sampling: Sampling, vocab: int) -> Tensor:
    """The target's distributions [T, vocab] after each of tokens [T] at positions start...: the verify step."""
    logits = forward(target, tokens, start)[:, :vocab]
    return checked(torch.stack([probabilities(row, *sampling) for row in logits]), logits)


def accept(p: Sequence[Tensor], q: Sequence[Tensor], guesses: Sequence[int], rng: torch.Generator) -> tuple[int, int]:
    """The acceptance rule: (how many guesses are accepted, the token that follows them).

    `p` holds the target's k + 1 distributions (after the last token and after each guess), `q` the draft's k
    (the ones each guess was drawn from). Guess i is accepted with probability min(1, p_i / q_i); at the first
    rejection the next token is drawn from max(0, p - q), normalised; if all are accepted it is drawn from the
    target's last distribution.
    """
    for i, guess in enumerate(guesses):
        # q[guess] > 0 as the guess was drawn from q, so u * q < p is "u < p / q" without dividing
        if float(torch.rand((), generator=rng)) * q[i][guess] < p[i][guess]:
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        # p and q that differ by less than float rounding leave no residual: then p is the residual's direction
        return i, _draw(residual if residual.sum() > 0 else p[i], rng)
    return len(guesses), _draw(p[len(guesses)], rng)


class SpeculativeLLM(LLM):
    """A target `LLM` sped up by a draft `LLM` proposing `k` tokens at a time; `generate` is `LLM.generate`'s.

    A round has two halves, `propose` (the draft's k guesses) and `score` (the target's verify of k + 1
    positions), both on the device; `llmkit.compile` of it compiles both models and puts each half, with its
    distributions and draws, in compiled graphs (`llmkit.compile.compile_round`). The context is the target's;
    the draft only speculates while both have room for a round.
    """

    def __init__(self, target: LLM, draft: LLM, k: int = 4):
        check_draft(target, draft, k)
        super().__init__(target.model, target.tokenizer, name=f"{target.name} (draft {draft.name}, k={k})",
                         step=target.step, max_seq_len=target.max_seq_len, device=str(target.device))  # fmt: skip
        self.target, self.draft, self.k = target, draft, k
        self.propose = partial(propose, draft)
        self.score = partial(score, target, vocab=target.tokenizer.vocab_size)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[int] = "",
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """As `LLM.generate`; the statistics also count the draft's proposed and accepted tokens."""
        check_sampling(temperature, top_k, top_p, max_new_tokens, stop, seed)
        target, draft, k = self.target, self.draft, self.k
        ids = self.encode_prompt(prompt)
        rng = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        vocab = self.tokenizer.vocab_size
        stop_ids = set(self.tokenizer.eos_ids)
        stream = StreamDecoder(self.tokenizer, ids)
        stats = SpeculativeStats(prompt_tokens=len(ids), compile_time=target.compile_time + draft.compile_time)
        out = Generation(stats=stats)
        max_new_tokens = min(max_new_tokens, self.max_seq_len - len(ids))
        # a round writes positions up to n + k in both caches, n being the position of the last token
        room = min(target.max_seq_len, draft.max_seq_len) - k

        def dist(logits: Tensor) -> list[Tensor]:
            return _row_probabilities(logits, vocab, temperature, top_k, top_p)

        def emit(token: int) -> bool:
            """Add a token to the output; whether generation ends here."""
            if token in stop_ids:
                return True
            out.tokens.append(token)
            piece = stream.push(token)
            out.text += piece
            if stop and any(s in out.text for s in stop):
                out.text = out.text[: min(out.text.find(s) for s in stop if s in out.text)]
                return True
            if on_text and piece:
                on_text(piece)
            return len(out.tokens) == max_new_tokens

        def on_device(tokens: Sequence[int]) -> Tensor:
            return torch.tensor(tokens, device=draft.device)

        start = time.perf_counter()
        seq = list(ids)  # the prompt and every token so far; seq[-1] is not yet in any cache
        # the draft draws its guesses on the device with a generator of its own, seeded from the request's
        draws = torch.Generator(draft.device).manual_seed(int(torch.randint(2**62, (), generator=rng)))
        sampling = (temperature, top_k, top_p)
        (first,) = dist(forward(target, on_device(ids), 0)[-1:])
        seq.append(_draw(first, rng))
        decode_start = time.perf_counter()
        stats.time_to_first_token = decode_start - start
        done = emit(seq[-1])
        in_draft = 0  # positions the draft has cached; the target has cached len(seq) - 1
        while not done:
            n = len(seq) - 1
            if n >= room:  # no room for another round: the target alone, one token at a time
                (p,) = dist(forward(target, on_device(seq[-1:]), n))
                seq.append(_draw(p, rng))
                done = emit(seq[-1])
                continue
            if in_draft == 0:  # the draft's prefill, once a round is sure to fit
                forward(draft, on_device(seq[:n]), 0)
                in_draft = n
            # A round stays on the device between one copy in (the tokens the draft has not seen) and one out (the
            # guesses and both models' distributions): each guess is drawn there and fed to the next draft step, so
            # the GPU never waits for the CPU within a round. The draft first catches up on the tokens before the
            # last (after a round whose guesses were all accepted, its last guess).
            unseen = on_device(seq[in_draft:])
            for i in range(len(unseen) - 1):
                forward(draft, unseen[i : i + 1], in_draft + i)
            noise = torch.empty(k, vocab, device=draft.device).exponential_(generator=draws)
            guesses, q = self.propose(unseen[-1:], n, noise, sampling)
            p = self.score(torch.cat([unseen[-1:], guesses]), n, sampling)
            copied = torch.cat([guesses.float(), p.flatten(), q.flatten()]).cpu()  # ids below 2**24 are exact
            if not torch.isfinite(copied).all():
                raise LLMKitError(BROKEN_LOGITS)
            guesses, (p, q) = copied[:k].long().tolist(), copied[k:].split([(k + 1) * vocab, k * vocab])
            p, q = p.view(k + 1, vocab), q.view(k, vocab)
            n_accepted, next_token = accept(p, q, guesses, rng)
            stats.rounds += 1
            stats.proposed += k
            stats.accepted += n_accepted
            # the draft cached the last token and its first k - 1 guesses; those the target accepted stay valid
            in_draft = n + 1 + min(n_accepted, k - 1)
            for token in [*guesses[:n_accepted], next_token]:
                seq.append(token)
                if done := emit(token):
                    break
        stats.new_tokens = len(out.tokens)
        if out.tokens:
            stats.decode_time = time.perf_counter() - decode_start
        return out


def load_draft(path: str | Path, target: LLM, device: str = "cpu", dtype: str = "float32",
               max_seq_len: int | None = 2048) -> LLM:  # fmt: skip
    """A draft checkpoint with the tokenizer beside it, or else its target's (a llama2.c file has none beside it)."""
    path = Path(path)
    if not path.exists():
        raise LLMKitError(f"draft checkpoint not found: {path} (check the path)")
    tokenizer = find_tokenizer(path if path.is_dir() else path.parent) or target.tokenizer.path
    return load(path, tokenizer, device, dtype, max_seq_len)


def speculate(target: LLM, draft: LLM, k: int = 4) -> SpeculativeLLM:
    """`target` sped up by `draft` guessing `k` tokens per round; the output is distributed as the target's."""
    return SpeculativeLLM(target, draft, k)
