"""llmkit.huge_pages: memory mapped while loading ends up on 2 MB pages, as the kernel's own accounting shows."""

import ctypes
import mmap
import sys

import pytest
import torch

from llmkit.huge_pages import HUGE, collapse, collapse_weights, collapsing_new_memory, file_regions, own_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def huge_bytes(ptr: int) -> int:
    """AnonHugePages of the mapping holding address ptr (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(v, 16) for v in fields[0].split("-"))
                inside = start <= ptr < end
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1]) * 1024
    raise AssertionError(f"no mapping holds {ptr:#x}")


def kernel_collapses() -> bool:
    probe = torch.ones(4 * HUGE // 4)  # private anonymous memory, as a model's weights are
    return collapse(probe.data_ptr(), probe.data_ptr() + probe.nbytes)[1]


@pytest.fixture
def collapsing(monkeypatch):
    monkeypatch.delenv("LLMKIT_HUGE_PAGES", raising=False)
    if not kernel_collapses():
        pytest.skip("this kernel does not collapse memory (MADV_COLLAPSE needs Linux 6.1, THP not 'never')")


def test_a_modules_weights_are_collapsed_into_huge_pages_wherever_malloc_put_them(collapsing):
    layer = torch.nn.Linear(4096, 4096, bias=False)  # 64 MB
    done = collapse_weights(layer)
    assert done.bytes >= 30 * HUGE
    assert huge_bytes(layer.weight.data_ptr()) >= 30 * HUGE  # all but the partial 2 MB pages at its ends
    assert torch.equal(layer.weight, layer.weight.detach().clone())


def test_memory_mapped_in_the_block_is_collapsed_into_huge_pages(collapsing):
    with collapsing_new_memory() as done:  # as a runtime's own allocation (an AOTI package's constants)
        memory = mmap.mmap(-1, 32 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.write(b"x" * len(memory))
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    assert done.bytes >= 30 * HUGE and huge_bytes(address) >= 30 * HUGE
    assert memory[:3] == b"xxx" and memory[-1:] == b"x"


def test_the_switch_leaves_memory_as_it_is(monkeypatch):
    monkeypatch.setenv("LLMKIT_HUGE_PAGES", "0")
    layer = torch.nn.Linear(4096, 4096, bias=False)
    with collapsing_new_memory() as done:
        weights = torch.ones(32 * HUGE // 4)
    assert done.bytes == 0 and collapse_weights(layer).bytes == 0 and weights.sum().item() == weights.numel()


def test_weights_mapped_from_a_file_are_copied_into_memory_of_their_own(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.delenv("LLMKIT_HUGE_PAGES", raising=False)
    save_file({"weight": torch.randn(512, 1024)}, tmp_path / "w.safetensors")
    layer = torch.nn.Linear(1024, 512, bias=False)
    layer.weight = torch.nn.Parameter(load_file(tmp_path / "w.safetensors")["weight"], requires_grad=False)
    in_file = lambda: any(s <= layer.weight.data_ptr() < e for s, e in file_regions())  # noqa: E731
    assert in_file(), "safetensors no longer maps its tensors from the file: this test needs another source"
    expected = layer.weight.clone()
    assert own_memory(layer) == 512 * 1024 * 4
    assert not in_file() and torch.equal(layer.weight, expected)
