"""Inductor's C++ code, corrected where AVX2 makes it slow: short vector loads in one instruction.

A vectorized loop over float32 handles 8 values at a time, so inductor loads 8 int8 weights (a quarter of
an AVX2 register) or 8 bfloat16 values (half of one) with `Vectorized<T>::loadu(ptr, 8)`. On AVX-512
ATen loads such a part with one instruction; on AVX2 it fills a stack buffer, copies the bytes in and
loads the buffer back, and the processor stalls on that reload every 8 weights: an int8 decode step
ran 5 times slower than with the load below (notebook 05 measures it). The replacement loads the same
lanes and fills the rest as ATen does (ones for 8-bit integers, zeros for 16-bit floats).
"""

import contextlib
from collections.abc import Iterator

import torch
from torch._inductor import cpu_vec_isa
from torch._inductor.codegen import cpp
from torch._inductor.codegen.cpp_utils import DTYPE_TO_CPP

_LOAD = {8: "_mm_loadl_epi64", 16: "_mm_loadu_si128"}  # a quarter and a half of a 256-bit register


def _short_load(dtype: torch.dtype, count: int, address: str) -> str | None:
    """C++ for `count` values of `dtype` at `address` in one load, or None where ATen's own load is fine."""
    if dtype in (torch.int8, torch.uint8):
        tail = "_mm256_set1_epi8(1)"
    elif dtype in (torch.bfloat16, torch.float16):
        tail = "_mm256_setzero_si256()"
    else:
        return None
    nbytes = count * dtype.itemsize
    if nbytes not in _LOAD:
        return None
    part = f"_mm256_castsi128_si256({_LOAD[nbytes]}(reinterpret_cast<const __m128i*>({address})))"
    filled = (1 << nbytes // 4) - 1  # the 32-bit lanes the load filled
    return f"at::vec::Vectorized<{DTYPE_TO_CPP[dtype]}>(_mm256_blend_epi32({tail}, {part}, {filled}))"


@contextlib.contextmanager
def short_loads_in_one_instruction() -> Iterator[None]:
    """Inductor's CPU code generated inside this block loads short vectors in one instruction, on AVX2."""
    if str(cpu_vec_isa.pick_vec_isa()) != "avx2":
        yield
        return
    vec_load_line = cpp.CppVecKernel._get_vec_load_line

    def load_line(self, var, index, dtype, load_mask=None):
        address = f"{var} + {cpp.cexpr_index(index)}" if index != 0 else var
        line = None if load_mask is not None else _short_load(dtype, self.num_elems, address)
        return line or vec_load_line(self, var, index, dtype, load_mask)

    cpp.CppVecKernel._get_vec_load_line = load_line
    try:
        yield
    finally:
        cpp.CppVecKernel._get_vec_load_line = vec_load_line
