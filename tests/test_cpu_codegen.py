"""llmkit.cpu_codegen: inductor's short vector loads on AVX2, checked in the C++ it writes and in the numbers."""

import re

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor import cpu_vec_isa
from torch._inductor.utils import run_and_get_cpp_code

from llmkit.cpu_codegen import short_loads_in_one_instruction

pytestmark = pytest.mark.skipif(
    str(cpu_vec_isa.pick_vec_isa()) != "avx2", reason="the correction applies to AVX2 code (this CPU picks another)"
)


def one_row_product(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A decode step's int8 weight-only linear as inductor sees it after llmkit's one-row pass."""
    return (x[:, :, None] * w.t().float()[None]).sum(1) * scale


def compiled_code(fn, *args) -> tuple[torch.Tensor, str]:
    torch._dynamo.reset()
    with inductor_config.patch(force_disable_caches=True):
        return run_and_get_cpp_code(torch.compile(fn, fullgraph=True), *args)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bfloat16])
def test_short_loads_are_one_instruction_and_change_no_number(dtype):
    torch.manual_seed(0)
    rows, cols = 40, 72  # for bfloat16 inductor takes 16 at a time and ends each row with 8
    x, scale = torch.randn(1, cols), torch.rand(rows)
    if dtype.is_floating_point:
        w = torch.randn(rows, cols).to(dtype)
    else:
        w = torch.randint(0 if dtype == torch.uint8 else -128, 128, (rows, cols), dtype=dtype)
    expected = x.double() @ w.double().t() * scale.double()

    before, code_before = compiled_code(one_row_product, x, w, scale)
    with short_loads_in_one_instruction():
        after, code_after = compiled_code(one_row_product, x, w, scale)

    ctype = {torch.int8: "int8_t", torch.uint8: "uint8_t", torch.bfloat16: "at::BFloat16"}[dtype]
    # ATen's buffered load of 8 values (for bfloat16, the loop's tail of 8), which the correction replaces
    short_load = re.compile(rf"Vectorized<{ctype}>::loadu\([^;]*, static_cast<int64_t>\(8L?\)\)")
    assert short_load.search(code_before)
    assert not short_load.search(code_after)
    assert ("_mm_loadl_epi64" if dtype.itemsize == 1 else "_mm_loadu_si128") in code_after
    torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-5)


def test_the_correction_ends_with_the_block():
    x, w, scale = torch.randn(1, 16), torch.randint(-128, 128, (8, 16), dtype=torch.int8), torch.rand(8)
    with short_loads_in_one_instruction():
        pass
    _, code = compiled_code(one_row_product, x, w, scale)
    assert "_mm_loadl_epi64" not in code
