"""Weights on 2 MB pages: the memory a model loads into, collapsed into transparent huge pages (Linux).

A CPU decode step reads every weight once. With 4 KB pages each page read costs a TLB miss, and in a virtual
machine (nested paging) a miss walks two page tables: on the VM this kit is measured on, stories15M's float32
decode step ran up to 1.4x as fast with its weights on 2 MB pages (data/benchmarks/runc/). The kernel
backs anonymous memory with 2 MB pages only where a program asks (`transparent_hugepage=madvise`, a common
default), so the loaders ask: `MADV_COLLAPSE` (Linux 6.1) moves the private anonymous memory a load mapped onto
huge pages, once, in about a second per GB; weights mapped from a file (a safetensors checkpoint, in the page
cache's 4 KB pages) are first copied into memory of their own (`own_memory`). `LLMKIT_HUGE_PAGES=0` leaves
memory alone (to measure the difference).
"""

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

HUGE = 2 << 20
MADV_COLLAPSE = 25  # linux/mman.h


@dataclass
class Collapsed:
    """What a collapse did: bytes now on 2 MB pages, bytes the kernel would not collapse."""

    bytes: int = 0
    refused: int = 0

    def add(self, start: int, end: int) -> None:
        span, ok = collapse(start, end)
        if ok:
            self.bytes += span
        else:
            self.refused += span


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("LLMKIT_HUGE_PAGES") != "0"


def mappings() -> Iterator[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of each of this process's memory mappings."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            yield start, end, fields[1], fields[5] if len(fields) > 5 else ""


def file_regions() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files."""
    return [(start, end) for start, end, _, path in mappings() if path.startswith("/")]


def anonymous_regions() -> dict[int, int]:
    """Start -> end of this process's private writable anonymous mappings (the heap among them)."""
    return {start: end for start, end, perms, path in mappings()
            if perms.startswith("rw") and perms.endswith("p") and path in ("", "[heap]")}  # fmt: skip


def own_memory(module: torch.nn.Module) -> int:
    """Copy the module's CPU weights that are mapped from a file into memory of their own (which
    `collapse_weights` can then put on 2 MB pages); the bytes copied. A no-op with LLMKIT_HUGE_PAGES=0."""
    if not enabled():
        return 0
    files, copied = file_regions(), 0
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu" and type(t.data) is torch.Tensor and t.numel():
                ptr = t.data_ptr()
                if any(start <= ptr < end for start, end in files):
                    t.data = t.data.clone()
                    copied += t.nbytes
    return copied


def plain_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding t's data: t itself, or a tensor subclass's (torchao's) inner tensors."""
    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from plain_tensors(getattr(t, name))
    else:
        yield t


def collapse_weights(module: torch.nn.Module) -> Collapsed:
    """Collapse into 2 MB pages the anonymous memory holding the module's CPU weights (each weight's 2 MB pages,
    wherever malloc put it: in a mapping of its own or in the heap)."""
    done = Collapsed()
    if not enabled():
        return done
    regions = sorted(anonymous_regions().items())
    spans = []
    for weight in [*module.parameters(), *module.buffers()]:
        for t in plain_tensors(weight):
            if t.device.type != "cpu" or not t.numel():
                continue
            ptr = t.data_ptr()
            region = next(((start, end) for start, end in regions if start <= ptr < end), None)
            if region is not None:  # its 2 MB pages, within the mapping
                spans.append([max(region[0], ptr // HUGE * HUGE), min(region[1], -(-(ptr + t.nbytes) // HUGE) * HUGE)])
    merged = []
    for span in sorted(spans):
        if merged and span[0] <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], span[1])
        else:
            merged.append(span)
    for start, end in merged:
        done.add(start, end)
    return done


@functools.cache
def _madvise() -> ctypes._CFuncPtr:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def collapse(start: int, end: int) -> tuple[int, bool]:
    """Collapse the whole 2 MB pages within [start, end) into huge pages: their bytes, and whether it worked."""
    first, last = -(-start // HUGE) * HUGE, end // HUGE * HUGE
    if last <= first:
        return 0, True
    return last - first, _madvise()(first, last - first, MADV_COLLAPSE) == 0


@contextlib.contextmanager
def collapsing_new_memory() -> Iterator[Collapsed]:
    """Collapse into 2 MB pages the anonymous memory mapped, or grown, while the block runs (a model's load)."""
    done = Collapsed()
    if not enabled():
        yield done
        return
    before = anonymous_regions()
    yield done
    for start, end in anonymous_regions().items():
        if before.get(start, start) < end:  # new, or grown (the heap: its new part, and the 2 MB page it starts in)
            done.add(max(start, before.get(start, start) // HUGE * HUGE), end)
