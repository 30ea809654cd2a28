"""Serving a model split over ranks: rank 0's engine tells the other ranks each model call it makes, in order.

Every rank holds a slice of the model (llmkit.distributed), so every rank must make each model call, a prefill, a
decode step or a cache row move, with the same inputs at the same time. Rank 0 serves HTTP and runs the engine
(`MirroredEngine`), broadcasting each call's inputs before making it; the other ranks (`follow`) make the same
calls. Only rank 0 samples: every rank ends a forward with the same logits. The calls travel on a gloo group of
their own with no useful timeout, as an idle server sends nothing; a rank that dies is stopped by the launcher.
"""

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from llmkit.engine import Engine
from llmkit.generate import LLM


class MirroredEngine(Engine):
    """An `Engine` whose model calls the other ranks repeat (they run `follow`). Every rank constructs one."""

    def __init__(self, llm: LLM, max_batch_size: int = 16, max_queue: int = 64):
        super().__init__(llm, max_batch_size, max_queue)
        self.calls = dist.new_group(backend="gloo", timeout=timedelta(days=365))

    def _tell(self, call: tuple) -> None:
        dist.broadcast_object_list([call], src=0, group=self.calls)

    def _forward(self, blocks: list[tuple[Tensor, Tensor]], cache_len: int) -> list[Tensor]:
        self._tell(("forward", [(tokens.tolist(), positions.tolist()) for tokens, positions in blocks], cache_len))
        return super()._forward(blocks, cache_len)

    def _move_row(self, src: int, dst: int) -> None:
        self._tell(("move", src, dst))
        super()._move_row(src, dst)

    def stop(self) -> None:
        super().stop()
        self._tell(("stop",))


def follow(engine: MirroredEngine) -> None:
    """On ranks other than 0: make rank 0's model calls as they come, until it stops."""
    device = engine.llm.device
    with torch.inference_mode():
        while True:
            call = [None]
            dist.broadcast_object_list(call, src=0, group=engine.calls)
            kind, *args = call[0]
            if kind == "stop":
                return
            if kind == "move":
                Engine._move_row(engine, *args)
            else:
                blocks, cache_len = args
                Engine._forward(engine, [(torch.tensor(tokens, device=device), torch.tensor(positions, device=device))
                                         for tokens, positions in blocks], cache_len)  # fmt: skip
