"""Compiled, AOTInductor (Python) and AOTInductor (C++ runner) paths agree with eager.

Tolerance: the same float32 graph compiled by inductor reorders reductions and fuses ops, so
logits differ from eager by float32 rounding only; we allow 1e-4 absolute on logits of size ~1-10
(measured: about 1e-5) and require identical greedy tokens.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from llmkit.aoti import export_aoti, export_program, load_aoti
from llmkit.compile import compile
from llmkit.errors import LLMKitError
from llmkit.generate import LLM
from llmkit.graph_passes import OneRowProductsAsLoops
from llmkit.loading import load
from llmkit.model import ModelArgs

RUNNER = Path(__file__).resolve().parents[1] / "runner" / "build" / "llmkit-run"
PROMPT = "the model reads the text"


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """conftest's random small model (std 0.2) with a SentencePiece tokenizer, saved in the kit's format."""
    return tiny_folder


@pytest.fixture(scope="module")
def package(tiny_pt2):
    return tiny_pt2


def test_aoti_package_matches_eager(tiny, package):
    eager, aoti = load(tiny), load_aoti(package)
    tokens = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (aoti.step(tokens, torch.arange(30)) - eager.model(tokens)).abs().max() <= 1e-4
    assert aoti.generate(PROMPT, max_new_tokens=40, temperature=0).tokens == \
        eager.generate(PROMPT, max_new_tokens=40, temperature=0).tokens  # fmt: skip


def test_aoti_decode_reads_only_the_cache_written_so_far(tiny, package):
    """The decode model attends to the cache's first pos + 1 positions (its window input): with every later
    position poisoned with nan its logits are still eager's. A step over the whole cache turns nan: the mask
    adds -inf to a nan score, it does not remove it."""
    eager, aoti = load(tiny), load_aoti(package)
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        aoti.step(tokens[:, :11], torch.arange(11))
        for cache in aoti.buffers.values():
            cache[:, :, 11:] = float("nan")
        logits = aoti.step(tokens[:, 11:], torch.tensor([11]))
        assert (logits[0, -1] - eager.model(tokens)[0, -1]).abs().max() <= 1e-4


def test_compiled_decode_matches_eager(tiny):
    eager, compiled = load(tiny), compile(load(tiny), prefill=True)
    assert compiled.step is not compiled.model and compiled.compile_time > 0
    a = eager.generate(PROMPT, max_new_tokens=40, temperature=0)
    b = compiled.generate(PROMPT, max_new_tokens=40, temperature=0)
    assert a.tokens == b.tokens
    assert "compile" in str(b.stats)


def test_one_row_products_become_fused_loops():
    """A decode step's int8 weight-only linear and its attention of one query compile to loops.

    Without the pass inductor converts the whole int8 weight to float32 into a buffer and calls
    MKL's matmul, and calls ATen's flash attention; with it, neither call is left, and the results
    are eager's to float32 rounding. Products of two rows (a prefill) keep the library calls. Where llmkit's
    C++ kernels build, the one-row int8 product is its call instead, which rounds x to 16 bits: within 1e-4 of
    the largest output (tests/test_cpu_kernels.py bounds it exactly), and float32 attention of a few query rows
    (here 1 and 3) is its attention kernel's call.
    """
    from torch._inductor.utils import run_and_get_code

    from llmkit import cpu_kernels

    torch.manual_seed(0)
    w, s = torch.randint(-127, 128, (96, 64), dtype=torch.int8), torch.rand(96)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)  # 2 key heads shared by 4 query heads
    mask = (torch.arange(40) < 25)[None, None, None]  # the model's mask: one row for all heads

    def linear_int8(x):
        return torch.mm(x, w.t().to(x.dtype)) * s

    def attention(q):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    options = {"post_grad_custom_pre_pass": OneRowProductsAsLoops()}
    for fn, x, call in ((linear_int8, torch.randn(1, 64), "extern_kernels.mm("),
                        (attention, torch.randn(1, 4, 1, 16), "flash_attention_for_cpu.default(")):  # fmt: skip
        for rows, kept in ((1, False), (3, True)):
            torch._dynamo.reset()
            x = torch.cat([x] * rows, dim=-2)
            out, (code, *_) = run_and_get_code(torch.compile(fn, options=options), x)
            kernel = cpu_kernels.available() and (fn is attention or rows == 1)
            assert (call in code) == (kept and not kernel), (fn.__name__, rows)
            assert ("llmkit_cpu" in code) == kernel
            rounded = kernel and fn is linear_int8
            atol = 1e-4 * out.abs().max().item() if rounded else 1e-5
            torch.testing.assert_close(out, fn(x), atol=atol, rtol=0 if rounded else 1e-5)


def test_the_input_of_a_one_row_reduction_is_computed_once():
    """On a GPU inductor writes a one-row matmul as (x[:, :, None] * w[None]).sum(1); the pass marks x,
    here silu(a) * b as in the MLP, to be computed once rather than inside each output row's program."""
    from torch._dynamo.utils import counters

    def mlp_down(a, b, w):
        x = torch.nn.functional.silu(a) * b
        return (x.unsqueeze(2) * w.unsqueeze(0)).sum(dim=1)

    torch.manual_seed(0)
    w = torch.randn(64, 32)
    for rows, matches in ((1, 1), (3, 0)):
        torch._dynamo.reset()
        counters.clear()
        a, b = torch.randn(rows, 64), torch.randn(rows, 64)
        out = torch.compile(mlp_down, options={"post_grad_custom_pre_pass": OneRowProductsAsLoops()})(a, b, w)
        assert counters["inductor"]["pattern_matcher_count"] == matches, rows
        torch.testing.assert_close(out, mlp_down(a, b, w), atol=1e-5, rtol=1e-5)


def test_the_input_of_a_one_row_reduction_stays_in_bfloat16():
    """Inductor sums a bfloat16 one-row matmul in float32, (x.float()[:, :, None] * w.float()[None]).sum(1);
    the x computed once is kept in bfloat16, half the bytes each output row's program reads (on an H100,
    llama-2-7b shape, int8wo 324.6 -> 345.5 tok/s): x is rounded to bfloat16 once, as eager stores it.
    Without the pass inductor's CPU code holds x in float32."""
    import re

    from torch._inductor.utils import run_and_get_code

    def mlp_down(a, b, w):
        x = torch.nn.functional.silu(a) * b
        return (x.float().unsqueeze(2) * w.float().unsqueeze(0)).sum(dim=1)

    def x_buffers(code: str) -> list[str]:
        """The dtypes of the buffers of x's shape, (1, 64) contiguous, that the generated code allocates."""
        return re.findall(r"= empty_strided\w*\(\(1, 64\), \(64, 1\), torch\.(\w+)\)", code)

    torch.manual_seed(0)
    a, b, w = (torch.randn(shape, dtype=torch.bfloat16) for shape in ((1, 64), (1, 64), (64, 32)))
    x = (torch.nn.functional.silu(a.float()) * b.float()).bfloat16()
    for options, dtypes in (({"post_grad_custom_pre_pass": OneRowProductsAsLoops()}, ["bfloat16"]), ({}, None)):
        torch._dynamo.reset()
        out, (code, *_) = run_and_get_code(torch.compile(mlp_down, options=options), a, b, w)
        if dtypes:  # x, computed once into one buffer, in bfloat16
            assert x_buffers(code) == dtypes, code
            torch.testing.assert_close(out, (x.float()[:, :, None] * w.float()[None]).sum(1), atol=1e-5, rtol=1e-5)
        else:  # the control: what the check tells apart
            assert "bfloat16" not in x_buffers(code), code


def test_the_gpu_tuner_times_kernels_by_the_profiler_only_while_compiling(monkeypatch):
    """Inductor's tuner, timing candidates with CUDA events, timed Python's launch of short kernels; while
    `compile` tunes on a GPU, each timing asks for the profiler's kernel time, and afterwards all is as before."""
    import warnings

    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    from llmkit.compile import _tuner_times_kernels_alone

    calls = []
    monkeypatch.setattr(CachingAutotuner, "bench", lambda self, launcher, *a, **k: calls.append(k) or 1.0)
    original = CachingAutotuner.bench
    with _tuner_times_kernels_alone(torch.device("cpu")):
        assert CachingAutotuner.bench is original
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _tuner_times_kernels_alone(torch.device("cuda")):
            CachingAutotuner.bench(None, "launcher", 1, with_profiler=False)
            warnings.warn("Warning: Profiler clears events at the end of each cycle.", UserWarning, stacklevel=1)
        warnings.warn("other warnings still show", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["other warnings still show"]
    assert calls == [{"with_profiler": True}]
    assert CachingAutotuner.bench is original


@pytest.mark.parametrize("scheme", ["int8wo", "8da4w-32"])
def test_compiled_quantized_decode_matches_eager(tiny, scheme):
    """The same quantized model, eager and compiled: identical greedy tokens, logits (of size ~1)
    within 1e-4, float32 rounding of reordered sums (measured: 2e-7 for both schemes)."""
    from llmkit.quantize import quantize

    eager, compiled = quantize(load(tiny), scheme), compile(quantize(load(tiny), scheme))
    assert compiled.compile_time > 0
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        for llm in (eager, compiled):
            llm.step(tokens, torch.arange(4))
        a, b = (llm.step(tokens[:, :1], torch.tensor([4])) for llm in (eager, compiled))
    assert (a - b).abs().max() <= 1e-4
    assert eager.generate(PROMPT, max_new_tokens=30, temperature=0).tokens == \
        compiled.generate(PROMPT, max_new_tokens=30, temperature=0).tokens  # fmt: skip


def test_what_inductor_cannot_compile_runs_eager_with_one_warning(tiny):
    """MX formats on the CPU: inductor's C++ backend has no float8_e8m0 scales, so compile warns and keeps eager."""
    from llmkit.quantize import quantize

    eager = quantize(load(tiny), "mxfp4")
    with pytest.warns(UserWarning, match=r"^torch.compile can't compile this model here \(.+\); running eager$"):
        fallback = compile(quantize(load(tiny), "mxfp4"))
    assert fallback.compile_time == 0.0 and fallback.step is fallback.model
    assert "float8_e8m0" in fallback.compile_fallback  # why, for benchmarks to record
    assert fallback.generate(PROMPT, max_new_tokens=20, temperature=0).tokens == \
        eager.generate(PROMPT, max_new_tokens=20, temperature=0).tokens  # fmt: skip


def test_a_ninth_model_still_compiles(make_model):
    """Dynamo keeps at most 8 compiled versions of a function and runs a ninth caller eager, silently; each LLM
    gets its own copy of the step, so the ninth model's step is compiled too: a graph of its own, run as
    compiled code (the profiler sees dynamo's compiled region), with eager's logits within the module's 1e-4 (here
    of size ~0.5, where another model's differ by ~0.3)."""
    import warnings

    from torch._dynamo.utils import counters

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=16)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile can't compile")
        for seed in range(9):
            graphs = counters["stats"]["unique_graphs"]
            llm = compile(LLM(make_model(args, seed=seed), None, name=f"model {seed}"))
            assert counters["stats"]["unique_graphs"] == graphs + 1, f"model {seed} compiled no graph"
    assert llm.compile_time > 0 and llm.step is not llm.model
    with torch.inference_mode():
        expected = llm.model(tokens)[:, -1]  # no cache: the whole sequence at once, eager
        llm.step(tokens[:, :3], torch.arange(3))  # the prefill runs eager (compile(prefill=False))
        with torch.profiler.profile() as prof:
            decoded = llm.step(torch.tensor([[8]]), torch.tensor([3]))[:, -1]
    events = {e.name for e in prof.events()}
    assert any(e.startswith("Torch-Compiled Region") for e in events), "the decode step ran eager"
    assert not any("compile_inner" in e for e in events), "the decode step compiled again"
    assert expected.abs().max() > 0.1 and (decoded - expected).abs().max() <= 1e-4


def test_cpp_runner_gives_the_python_greedy_tokens(package, tiny):
    if not RUNNER.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{RUNNER} is missing: `make runner` builds it")
        pytest.skip(f"{RUNNER} is not built; run `make runner`")
    expected = load_aoti(package).generate(PROMPT, max_new_tokens=40, temperature=0)
    result = subprocess.run([str(RUNNER), str(package), "-z", str(tiny / "tokenizer.model"), "-p", PROMPT,
                             "-n", "40", "-t", "0", "--ids"], capture_output=True, text=True, check=True)  # fmt: skip
    ids_line = next(line for line in result.stdout.splitlines() if line.startswith("ids:"))
    assert [int(t) for t in ids_line.split()[1:]] == expected.tokens
    assert result.stdout.startswith(PROMPT + expected.text)
    assert "decode" in result.stderr


def test_export_bad_input(tiny, package, tmp_path, make_model):
    with pytest.raises(LLMKitError, match="does not exist"):
        export_aoti(load(tiny), tmp_path / "missing" / "x.pt2")
    with pytest.raises(LLMKitError, match="already exists"):
        export_aoti(load(tiny), package)
    lonely = tmp_path / "lonely.pt2"
    lonely.write_bytes(package.read_bytes())
    with pytest.raises(LLMKitError, match="tokenizer .* is missing"):
        load_aoti(lonely)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(LLMKitError, match="damaged or not an AOTInductor package"):
        load_aoti(junk)
    older = tmp_path / "one_model.pt2"  # llmkit's format 1: a single dynamic-length model (of one small layer)
    small = LLM(make_model(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, hidden_dim=32, max_seq_len=8)), None)
    torch._inductor.aoti_compile_and_package(export_program(small), package_path=str(older))
    with pytest.raises(LLMKitError, match="not a loadable llmkit AOTInductor package .*export it again"):
        load_aoti(older)
