"""Continuous batching: one decode step runs every active request together, each row at its own position.

The KV cache holds `max_batch_size` rows. The active requests always sit in its first rows, in order, so a decode
step is the model on the first B rows (`input_pos` [B, 1], each row's own position): a view of the cache, no
gather. Arriving requests take the first rows (their occupants move to free rows) and are prefilled there
together, in one forward of their prompts padded to the longest; a finished or cancelled one leaves at once, the
last row moving into its place. Moving a row copies one request's cache, which is small next to the weights
every step reads.

Each request keeps its own sampling options and random generator, seeded as `LLM.generate` seeds its own, so a
seeded request gets the same tokens alone or batched. Requests wait in a bounded queue (`QueueFull` when full).
The engine runs in a thread of its own; it tells each request what happened through the request's `on_update`,
called from that thread.
"""

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from llmkit.errors import LLMKitError, first_line
from llmkit.generate import LLM, StreamDecoder
from llmkit.sampling import argmax, check_finite, check_sampling, sample

CACHE_BLOCK = 256  # steps attend to the cache's first positions in use, rounded up to a multiple of this
PREFILL_TOKENS = 4096  # a step prefills arriving prompts together up to this many positions (padded), or one


class QueueFull(Exception):
    """Every row is busy and the queue of waiting requests is full: come back later."""


@dataclass
class Update:
    """What a request produced since its last update: new text, and how it finished once it has."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string), "length", "cancelled", "error"
    error: str | None = None


@dataclass(eq=False)  # compared by identity: the engine looks requests up in its lists
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # run to max_tokens whatever the model says (benchmarks want fixed lengths)
    on_update: Callable[[Update], None] = lambda update: None
    tokens: list[int] = field(default_factory=list)  # generated so far
    text: str = ""  # decoded so far, cut at a stop string
    sent: int = 0  # len(text) already given to on_update
    cancelled: bool = False  # set from any thread; the engine drops the request before its next step
    finish_reason: str | None = None
    rng: torch.Generator | None = field(default=None, repr=False)  # the request's own, made when it is submitted
    stream: StreamDecoder | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self.cancelled = True


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string, so must not be sent yet."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)  # fmt: skip


class Engine:
    """Serves many requests from one model at once. `submit` from any thread; `start` runs the steps in a thread."""

    def __init__(self, llm: LLM, max_batch_size: int = 16, max_queue: int = 64):
        if llm.model is None:
            raise LLMKitError(f"{llm.name} came from an exported package; serving needs the checkpoint (the engine "
                              "runs the model with a batch of its own)")  # fmt: skip
        if max_batch_size < 1 or max_queue < 0:
            raise LLMKitError(f"--max-batch-size must be at least 1 and --max-queue at least 0, "
                              f"not {max_batch_size} and {max_queue}")  # fmt: skip
        self.llm, self.model = llm, llm.model
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.model.setup_buffers(max_batch_size)  # the engine owns the model's cache from now on
        self.caches = [layer.attention.kv_cache for layer in self.model.layers]
        # tokens and positions [B, 1], cache positions in use -> logits: the model, or `compile_batched_decode`'s
        self.decode_step: Callable[..., Tensor] = self.model
        # blocks of (tokens, positions), cache positions in use -> each block's logits: arriving prompts, after the
        # running rows' next tokens if any (`Transformer.forward_blocks`, or `compile_batched_prefill`'s)
        self.prefill_step: Callable[..., list[Tensor]] = self.model.forward_blocks
        self.eos = set(llm.tokenizer.eos_ids)
        self.active: list[Request] = []  # row i of the cache is active[i]
        self.positions: list[int] = []  # where each row's next token goes
        self.queue: deque[Request] = deque()
        self.wake = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for /health and tests

    # ---- the outside: submit, start, stop ---------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (its options checked first); `QueueFull` when the queue already holds max_queue."""
        check_sampling(request.temperature, request.top_k, request.top_p, request.max_tokens, request.stop,
                       request.seed)
        if not request.prompt_ids or len(request.prompt_ids) >= self.llm.max_seq_len:
            raise LLMKitError(f"the prompt is {len(request.prompt_ids)} tokens; it must be 1 to "
                              f"{self.llm.max_seq_len - 1} (the context is {self.llm.max_seq_len})")  # fmt: skip
        with self.wake:
            if len(self.queue) >= self.max_queue + max(0, self.max_batch_size - len(self.active)):
                raise QueueFull(f"all {self.max_batch_size} rows are busy and {len(self.queue)} requests wait")
            request.rng = torch.Generator().manual_seed(request.seed if request.seed is not None
                                                        else secrets.randbits(63))  # fmt: skip
            request.stream = StreamDecoder(self.llm.tokenizer, request.prompt_ids)
            self.queue.append(request)
            self.wake.notify()

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Cancel what is queued or running and end the thread."""
        with self.wake:
            self.running = False
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()
        for request in [*self.queue, *self.active]:
            self._finish(request, "cancelled")
        self.queue.clear()
        self.active, self.positions = [], []

    def load(self) -> dict[str, int]:
        return {"active": len(self.active), "queued": len(self.queue), "max_batch_size": self.max_batch_size,
                "steps": self.steps}  # fmt: skip

    def _run(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.queue and not self.active:
                    self.wake.wait()
                if not self.running:
                    return
            self.step()

    # ---- one step: drop the cancelled, admit the waiting, decode every active row once ----------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Leave out cancelled requests, then decode every active row once; waiting requests that fit in free rows
        are prefilled in the same forward, so the weights are read once for both."""
        for request in [r for r in self.active if r.cancelled]:
            self._finish(request, "cancelled")
        arriving, cancelled, longest = [], [], 0
        with self.wake:  # as many as there are free rows, within the prefill's token budget
            while self.queue and len(self.active) + len(arriving) < self.max_batch_size:
                length = max(longest, len(self.queue[0].prompt_ids))
                if arriving and length * (len(arriving) + 1) > PREFILL_TOKENS:
                    break
                request = self.queue.popleft()
                if request.cancelled:
                    cancelled.append(request)
                else:
                    arriving.append(request)
                    longest = length
        for request in cancelled:
            self._finish(request, "cancelled")
        running = list(self.active)
        # a failed prefill ends the arriving requests only: the running rows then take their step alone
        if not (arriving and self._guarded(partial(self._admit, arriving), arriving)) and running:
            self._guarded(self._decode, running)
        self.steps += bool(running)

    def _guarded(self, work: Callable[[], None], requests: list[Request]) -> bool:
        """Run `work`; if the model fails (broken weights, out of memory), those requests end with the error and
        the engine keeps serving the others. Whether `work` succeeded."""
        try:
            work()
            return True
        except Exception as e:  # torch raises many types; one request's failure must not stop the server
            for request in requests:
                self._finish(request, "error", f"the model failed: {first_line(e)}")
            return False

    def _admit(self, requests: list[Request]) -> None:
        """Decode the running rows and prefill arriving requests into the rows after them, in one forward (each
        arriving prompt padded to the longest), and take every request's next token. Padding writes the cache past
        a prompt's end, where its decode writes before it reads."""
        running, n = list(self.active), len(requests)
        lengths = [len(r.prompt_ids) for r in requests]
        device, longest = self.llm.device, max(lengths)
        tokens = torch.tensor([r.prompt_ids + [0] * (longest - len(r.prompt_ids)) for r in requests], device=device)
        blocks = [self._running_rows()] if running else []
        blocks.append((tokens, torch.arange(longest, device=device).expand(n, longest)))
        logits = self._forward(blocks, self._cache_len(max([longest, *(p + 1 for p in self.positions)])))
        last = logits[-1][torch.arange(n), torch.tensor(lengths) - 1, : self.llm.tokenizer.vocab_size]
        first = [sample(row, r.temperature, r.top_k, r.top_p, r.rng) for r, row in zip(requests, last, strict=True)]
        taken = self._next_tokens(logits[0]) if running else []  # the running rows move on from here
        self.active += requests
        self.positions += lengths
        for request, token in zip([*running, *requests], taken + first, strict=True):
            self._take(request, token)

    def _decode(self) -> None:
        running = list(self.active)
        (logits,) = self._forward([self._running_rows()], self._cache_len(max(self.positions) + 1))
        for request, token in zip(running, self._next_tokens(logits), strict=True):
            self._take(request, token)

    def _running_rows(self) -> tuple[Tensor, Tensor]:
        """The active rows' last tokens and their positions, [B, 1] each."""
        device = self.llm.device
        return (torch.tensor([[r.tokens[-1]] for r in self.active], device=device),
                torch.tensor(self.positions, device=device)[:, None])  # fmt: skip

    def _next_tokens(self, logits: Tensor) -> list[int]:
        """The active rows' next tokens from their logits [B, 1, vocab]; each row's position moves on."""
        logits = logits[:, -1, : self.llm.tokenizer.vocab_size]  # ids past the tokenizer's have no text
        # checked and argmax-ed for every row at once, on the device (one row of a 128k vocabulary copied to a CPU
        # takes a millisecond); only rows that draw at a temperature are copied out, for their requests' generators
        check_finite(logits)
        greedy = argmax(logits)
        drawn = [i for i, r in enumerate(self.active) if r.temperature > 0]
        rows = dict(zip(drawn, logits[drawn].cpu(), strict=True)) if drawn else {}
        for i in range(len(self.active)):
            self.positions[i] += 1
        return [sample(rows[i], r.temperature, r.top_k, r.top_p, r.rng) if i in rows else greedy[i]
                for i, r in enumerate(self.active)]  # fmt: skip

    def _forward(self, blocks: list[tuple[Tensor, Tensor]], cache_len: int) -> list[Tensor]:
        """The model on the cache's first rows: a decode step alone (compiled when `decode_step` is), or blocks
        that prefill arriving prompts."""
        if len(blocks) == 1 and blocks[0][0].shape[1] == 1:
            return [self.decode_step(*blocks[0], cache_len=cache_len)]
        return self.prefill_step(blocks, cache_len=cache_len)

    def _cache_len(self, used: int) -> int:
        """The cache positions a step attends to: those in use, rounded up to a multiple of CACHE_BLOCK."""
        return min(-(-used // CACHE_BLOCK) * CACHE_BLOCK, self.model.args.max_seq_len)

    def _take(self, request: Request, token: int) -> None:
        """Record the request's next token (drawn with its own options and generator, as `LLM.generate` does)."""
        if token in self.eos and not request.ignore_eos:
            return self._finish(request, "stop")
        request.tokens.append(token)
        request.text += request.stream.push(token)
        found = [request.text.find(s) for s in request.stop if s in request.text]
        if found:
            request.text = request.text[: min(found)]
            return self._finish(request, "stop")
        room = self.llm.max_seq_len - len(request.prompt_ids)
        if len(request.tokens) >= min(request.max_tokens, room):
            return self._finish(request, "length")
        ready = len(request.text) - held_back(request.text, request.stop)
        if ready > request.sent:
            request.on_update(Update(request.text[request.sent : ready], len(request.tokens)))
            request.sent = ready

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """Send what is left of the text with the reason, and free the request's row (the last row moves in)."""
        request.finish_reason = reason
        if request in self.active:
            i, last = self.active.index(request), len(self.active) - 1
            if i != last:
                self._move_row(last, i)
                self.active[i], self.positions[i] = self.active[last], self.positions[last]
            self.active.pop()
            self.positions.pop()
        text = "" if reason in ("cancelled", "error") else request.text[request.sent :]
        request.sent = len(request.text)
        request.on_update(Update(text, len(request.tokens), reason, error))

    def _move_row(self, src: int, dst: int) -> None:
        for cache in self.caches:
            cache.k_cache[dst] = cache.k_cache[src]
            cache.v_cache[dst] = cache.v_cache[src]


def run_to_completion(engine: Engine, requests: Sequence[Request], timeout: float = 60) -> list[Request]:
    """Submit the requests to a stopped engine and step it until all have finished (tests, notebooks)."""
    for request in requests:
        engine.submit(request)
    deadline = time.monotonic() + timeout
    while any(r.finish_reason is None for r in requests):
        if time.monotonic() > deadline:
            raise TimeoutError(f"requests unfinished after {timeout} s")
        engine.step()
    return list(requests)
