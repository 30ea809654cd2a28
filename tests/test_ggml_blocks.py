"""GGUF's block formats written by llmkit are the bytes the `gguf` package (llama.cpp's own Python port of
ggml-quants.c) writes, bit for bit; they read back as it reads them; as torchao tensors they hold the same values."""

import gguf
import numpy as np
import pytest
import torch

from llmkit import ggml_blocks, numerics
from llmkit.errors import LLMKitError

Q = gguf.GGMLQuantizationType


def hard_cases() -> list[torch.Tensor]:
    """Random rows at several scales, and blocks that catch the rounding rules: zeros, equal magnitudes of both signs
    (which one sets Q4_0's scale), values on half steps, one value alone, float16's edges."""
    g = torch.Generator().manual_seed(0)
    halves = torch.arange(-16, 16).float() / 2  # with max 8 (or -8), x / d lands on Q4 half steps
    return [
        torch.randn(64, 256, generator=g),
        torch.randn(8, 64, generator=g) * 1e-4,  # scales near float16's subnormals
        torch.randn(8, 64, generator=g) * 1e3,
        torch.zeros(2, 32),
        torch.tensor([[0.5] * 32, [-1.0] + [1.0] * 31, [1.0] + [-1.0] * 31]),
        halves.reshape(1, 32),
        torch.cat([torch.full((1, 31), 0.0), torch.tensor([[3.0]])], dim=1),
        (torch.randn(16, 64, generator=g) * 3).round() / 2,
        torch.randn(4, 96, generator=g).to(torch.bfloat16).float(),  # the values of a bfloat16 checkpoint
    ]


@pytest.mark.parametrize("type", ggml_blocks.TYPES)
def test_bytes_are_ggmls_bit_for_bit(type):
    for x in hard_cases():
        theirs = gguf.quants.quantize(x.numpy(), Q[type.upper()])
        ours = ggml_blocks.to_bytes(ggml_blocks.quantize(x, type)).numpy().reshape(theirs.shape)
        assert np.array_equal(ours, theirs), (type, x[:1, :8])


@pytest.mark.parametrize("type", ggml_blocks.TYPES)
def test_blocks_read_back_as_gguf_reads_them(type):
    for x in hard_cases():
        raw = gguf.quants.quantize(x.numpy(), Q[type.upper()])
        enc = ggml_blocks.from_bytes(torch.from_numpy(raw), type, tuple(x.shape))
        assert torch.equal(ggml_blocks.to_bytes(enc).flatten(), torch.from_numpy(raw).flatten())
        assert torch.equal(ggml_blocks.dequantize(enc), torch.from_numpy(gguf.quants.dequantize(raw, Q[type.upper()])))


@pytest.mark.parametrize("type", ggml_blocks.TYPES)
def test_torchao_tensor_holds_the_blocks_values(type):
    """Q8_0 and Q4_0 exactly; Q4_1's d q + m as d (q - 8 - z): the float zero z costs a rounding or two, bounded
    here by 4 float32 units in the last place of the block's largest term, max(16 |d|, |m|)."""
    for x in hard_cases():
        enc = ggml_blocks.quantize(x, type)
        reference = ggml_blocks.dequantize(enc)
        values = ggml_blocks.as_torchao(enc).dequantize()
        if type == "q4_1":
            terms = torch.maximum(16 * enc.scales.float().abs(), enc.mins.float().abs())
            bound = 4 * torch.finfo(torch.float32).eps * terms.repeat_interleave(ggml_blocks.BLOCK, -1)
            assert ((values - reference).abs() <= bound).all()
        else:
            assert torch.equal(values, reference)


def test_torchao_linear_computes_with_the_blocks_values():
    x, w = torch.randn(3, 128), torch.randn(40, 128)
    for type in ggml_blocks.TYPES:
        enc = ggml_blocks.quantize(w, type)
        expected = torch.nn.functional.linear(x, ggml_blocks.dequantize(enc))
        torch.testing.assert_close(torch.nn.functional.linear(x, ggml_blocks.as_torchao(enc)), expected)


def test_numerics_lab_knows_the_formats_and_their_storage():
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    bits = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}  # 34, 18 and 20 bytes per block of 32
    for type, expected in bits.items():
        enc = numerics.quantize_tensor(x, type)
        assert numerics.effective_bits_per_weight(enc) == expected == ggml_blocks.BYTES_PER_BLOCK[type] * 8 / 32
        x_hat = numerics.dequantize_tensor(enc)
        grid = numerics.value_grid(enc, group=0)
        assert torch.isin(x_hat[0, :32], grid).all()  # every value of the first block is on its grid


def test_bad_shapes_and_names_say_what_to_do():
    with pytest.raises(LLMKitError, match="blocks of 32"):
        ggml_blocks.quantize(torch.randn(4, 48), "q4_0")
    with pytest.raises(LLMKitError, match="unknown GGUF block format"):
        ggml_blocks.quantize(torch.randn(4, 64), "q5_0")
    with pytest.raises(LLMKitError, match="floating-point"):
        ggml_blocks.quantize(torch.ones(4, 64, dtype=torch.int32), "q8_0")
