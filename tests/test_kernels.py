"""llmkit's Triton kernels (llmkit.kernels) against a float64 product with the dequantized weights.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, which conftest.py sets
before anything imports Triton) on small shapes; with one, on CUDA on
shapes up to a 7B model's. Every check draws fresh random inputs and poisons the output with NaN first, so an
element the kernel never wrote fails. Bounds on ||out - ref|| / ||ref||: float32 outputs sum float32 products
(1e-5; the interpreter's float32 dots are exact, the GPU's tensor cores take tf32 for them: 5e-3); bfloat16
outputs round each result to 8 bits (relative rounding up to 2**-9): 1e-2, as for bf16 operands generally.
"""

import dataclasses
import zlib

import pytest
import torch

pytest.importorskip("triton")
from llmkit import kernels  # noqa: E402
from llmkit.generate import LLM  # noqa: E402
from llmkit.quantize import quantize  # noqa: E402
from llmkit.quantized_linear import KernelLinear  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

CONFIGS = [kernels.Config(16, 256, 1), kernels.Config(8, 256, 2), kernels.Config(32, 512, 3, num_warps=8)]


def _bound(dtype: torch.dtype, m: int) -> float:
    if dtype == torch.bfloat16:
        return 1e-2
    return 5e-3 if CUDA and m > 1 else 1e-5


def _shapes(rng: torch.Generator, count: int) -> list[tuple[int, int, int]]:
    """(m, n, k): k a multiple of 128 (int4 groups), n anything, on the GPU up to a 7B matrix's."""
    big = 64 if CUDA else 4
    out = []
    for _ in range(count):
        m = [1, 1, 2, 5, 16][int(torch.randint(0, 5, (), generator=rng))]
        n = int(torch.randint(1, 48 * big, (), generator=rng))
        k = 128 * int(torch.randint(1, 4 * big, (), generator=rng))
        out.append((m, n, k))
    return out


def _seed(*case: object) -> int:
    """The same inputs for a case in every run (Python's hash of a string changes between processes), so a
    failing random shape can be run again."""
    return zlib.crc32(repr(case).encode())


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "an output element was never written"
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None, *CONFIGS])
def test_int8_kernel_matches_the_dequantized_product_in_float64(dtype, cfg):
    rng = torch.Generator().manual_seed(_seed(dtype, cfg))
    for m, n, k in _shapes(rng, 3 if CUDA else 1):
        w = torch.randn(n, k, generator=rng).to(DEVICE, dtype)
        x = torch.randn(m, k, generator=rng).to(DEVICE, dtype)
        q, scale = kernels.quantize_int8(w)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        kernels.int8_matmul(x, q, scale, cfg, out=out)
        ref = x.double() @ kernels.dequantize_int8(q, scale).T
        assert _rel(out, ref) < _bound(dtype, m), (m, n, k)


@pytest.mark.parametrize("group", kernels.INT4_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None, *CONFIGS])
@pytest.mark.parametrize("tensor_cores", [False, True], ids=["fma", "tensor-cores"])
def test_int4_kernel_matches_the_dequantized_product_in_float64(group, dtype, cfg, tensor_cores):
    rng = torch.Generator().manual_seed(_seed(group, dtype, cfg, tensor_cores))
    for m, n, k in _shapes(rng, 3 if CUDA else 1):
        w = torch.randn(n, k, generator=rng).to(DEVICE, dtype)
        x = torch.randn(m, k, generator=rng).to(DEVICE, dtype)
        packed, scale, offset = kernels.quantize_int4(w, group)
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        if tensor_cores:  # the tensor cores take at least 16 output rows a tile
            cfg = kernels.config_for("int4tc", m, n, k) if cfg is None else dataclasses.replace(
                cfg, block_n=max(16, cfg.block_n), tensor_cores=True)  # fmt: skip
        kernels.int4_matmul(x, packed, scale, offset, cfg, out=out)
        ref = x.double() @ kernels.dequantize_int4(packed, scale, offset).T
        assert _rel(out, ref) < _bound(dtype, m), (m, n, k)


def test_int4_packing_round_trips_and_quantizes_within_half_a_step():
    w = torch.randn(24, 256, dtype=torch.float64)
    packed, scale, offset = kernels.quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128) and scale.shape == (24, 8)
    q = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(24, 256)  # byte j: columns 2j and 2j+1
    assert torch.equal(kernels.dequantize_int4(packed, scale, offset), (q.double().reshape(24, 8, 32)
                       * scale[..., None] + offset[..., None]).reshape(24, 256))  # fmt: skip
    step = scale.repeat_interleave(32, dim=1)
    assert ((kernels.dequantize_int4(packed, scale, offset) - w).abs() <= step / 2 + 1e-12).all()
    q8, s8 = kernels.quantize_int8(w)
    assert ((kernels.dequantize_int8(q8, s8) - w).abs() <= s8[:, None] / 2 + 1e-12).all()


def test_the_custom_ops_trace_into_a_graph_with_their_shapes():
    """torch.compile and export see the ops through their fake implementations: shapes without running them."""
    x, w = torch.randn(3, 256, device=DEVICE), torch.randn(40, 256, device=DEVICE)
    q, scale = kernels.quantize_int8(w)
    packed, s4, o4 = kernels.quantize_int4(w, 64)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fq, fs = mode.from_tensor(x), mode.from_tensor(q), mode.from_tensor(scale)
        assert torch.ops.llmkit.int8_mm(fx, fq, fs).shape == (3, 40)
        f4 = [mode.from_tensor(t) for t in (packed, s4, o4)]
        assert torch.ops.llmkit.int4_mm(fx, *f4).shape == (3, 40)


@pytest.mark.parametrize("scheme", ['{"linear:int8": {"groupsize": 0, "kernel": "llmkit"}}',
                                    '{"linear:int4": {"groupsize": 32, "kernel": "llmkit"}}'])  # fmt: skip
def test_a_model_on_llmkits_kernels_matches_the_same_model_with_its_weights_dequantized(scheme, make_model):
    """Decode (one row: the GEMV path), a 3-token prefill (the tensor-core path) and a 20-token one (cuBLAS on
    the dequantized weights), against the float model given exactly the weights the kernels multiply."""
    dtype = torch.float32
    llm = LLM(make_model(dtype=dtype, device=DEVICE), None)
    quantize(llm, scheme)
    reference = make_model(dtype=dtype, device=DEVICE)
    state = reference.state_dict()
    for name, module in llm.model.named_modules():
        if isinstance(module, KernelLinear):
            w = module.dequantized(dtype)
            if name.endswith("w13"):  # w1 and w3 stacked
                state[name[:-3] + "w1.weight"], state[name[:-3] + "w3.weight"] = w.split(module.out_features // 2)
            else:
                state[name + ".weight"] = w
    reference.load_state_dict(state)
    assert any(isinstance(m, KernelLinear) for m in llm.model.modules())
    tokens = torch.randint(0, 300, (1, 24), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    with torch.inference_mode():
        for model in (llm.model, reference):
            model.setup_buffers()
        for start, length in ((0, 3), (3, 1), (4, 20)):
            pos = torch.arange(start, start + length, device=DEVICE)
            ours, ref = llm.model(tokens[:, pos], pos).double(), reference(tokens[:, pos], pos).double()
            assert ((ours - ref).norm() / ref.norm()).item() < (5e-3 if CUDA else 1e-5), (start, length)


def test_kernel_choice_is_checked_before_the_model_changes(make_model, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # quantize checks it on the CPU
    from llmkit.errors import LLMKitError

    llm = LLM(make_model(), None)
    with pytest.raises(LLMKitError, match="groups of 32, 64 or 128"):
        quantize(llm, '{"linear:int4": {"groupsize": 256, "kernel": "llmkit"}}', device=DEVICE)
    with pytest.raises(LLMKitError, match="unknown kernel 'cutlass'"):
        quantize(llm, '{"linear:int8": {"kernel": "cutlass"}}')
    if not CUDA:
        with pytest.raises(LLMKitError, match="TRITON_INTERPRET=1"):
            quantize(llm, '{"linear:int8": {"groupsize": 0, "kernel": "llmkit"}}')
    assert not any(isinstance(m, KernelLinear) for m in llm.model.modules())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_ops_compile_and_replay_in_a_cuda_graph_like_eager():
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    q, scale = kernels.quantize_int8(w)
    packed, s4, o4 = kernels.quantize_int4(w, 128)

    def f(x):
        return torch.ops.llmkit.int8_mm(x, q, scale) + torch.ops.llmkit.int4_mm(x, packed, s4, o4)

    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    compiled(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = compiled(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, f(x))
