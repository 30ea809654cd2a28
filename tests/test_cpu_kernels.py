"""llmkit.cpu_kernels: the C++ int8 and float32 products and one-query attention against float64, ATen's ops and
eager torchao, and their use by torch.compile and AOTInductor.

Tolerances: the int8 kernel rounds each row of x to 16-bit integers (a step of sx = max|x| / 32639) and sums
exactly, so output n differs from the float64 product by at most scale[n] * sx / 2 * sum_k |q[n, k]| (each x moves
by half a step at most), plus float32 rounding of the result: 2**-24 of it. The float32 kernel sums K products in
float32 in some order: the textbook bound for any order is K 2**-24 sum_k |x[k] w[n, k]| (Higham's gamma_K).
"""

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from llmkit import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"llmkit's C++ kernel: {cpu_kernels.why_not()}")


def int8_weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, generator=g) / 100


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double() @ (q.double() * scale.double()[:, None]).T


def within_bound(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """The module docstring's bound, row by row of x."""
    step = x.double().abs().amax(1, keepdim=True) / 32639
    bound = step / 2 * (scale.double() * q.double().abs().sum(1))[None]
    expected = reference(x, q, scale)
    return bool(((out.double() - expected).abs() <= bound + 2**-24 * expected.abs() + 1e-30).all())


# rows not a multiple of the kernel's 4 and columns not of its 64 (VNNI) or 16 (AVX2) take its tails; up to 768
# columns VNNI holds x in registers, past them it loads x at each step (two sums, 128 columns a step); 3 rows of
# activations
@pytest.mark.parametrize("m, n, k", [(1, 768, 288), (1, 37, 333), (1, 4, 7), (3, 50, 40), (1, 1, 1), (1, 12, 64),
                                     (2, 8, 768), (1, 9, 832), (1, 5, 1000), (1, 6, 1536)])
def test_matches_float64_and_aten(m, n, k):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    q, scale = int8_weights(n, k)
    out = torch.ops.llmkit_cpu.int8_weight_mm(x, q, scale)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert within_bound(out, x, q, scale)
    # the bound is tight enough to see a 0.1% error (1% past 768 columns: it grows with the sum of |q|, the
    # product with its square root)
    assert not within_bound(out, x * (1.001 if k <= 768 else 1.01), q, scale)
    aten = torch.ops.aten._weight_int8pack_mm(x, q, scale)  # the same contract, in float32
    assert ((out - aten).abs() <= 1e-4 * aten.abs().max()).all()


def test_zeros_and_non_finite_rows():
    """A row of zeros gives zeros; a row with an inf or a nan gives nan (its scale can't be formed), which the
    callers' finite checks see, as they would a float product's inf or nan."""
    q, scale = int8_weights(8, 16)
    x = torch.zeros(3, 16)
    x[1, 3], x[2, 5] = float("inf"), float("nan")
    out = torch.ops.llmkit_cpu.int8_weight_mm(x, q, scale)
    assert torch.equal(out[0], torch.zeros(8)) and out[1:].isnan().all()


def test_two_threads_give_the_same_numbers():
    """Threads split the output rows, never a sum: the result does not depend on how many there are."""
    x, (q, scale) = torch.randn(1, 288), int8_weights(4000, 288)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.llmkit_cpu.int8_weight_mm(x, q, scale)
        torch.set_num_threads(2)
        assert torch.equal(torch.ops.llmkit_cpu.int8_weight_mm(x, q, scale), one)
    finally:
        torch.set_num_threads(threads)


def test_every_path_gives_the_same_bits():
    """The AVX-512 VNNI, AVX2 and portable paths compute the same integer sums: forced one by one in fresh
    processes (LLMKIT_CPU_KERNEL), they return identical outputs; a path the CPU lacks falls back to the next."""
    code = (  # 333 columns: VNNI's loop with x held in registers; 1000: its loop that loads x at each step
        "import torch; from llmkit import cpu_kernels; cpu_kernels.load(); g = torch.Generator().manual_seed(0)\n"
        "for k in (333, 1000):\n"
        "    x = torch.randn(2, k, generator=g) * 3; q = torch.randint(-128, 128, (37, k), dtype=torch.int8, "
        "generator=g); s = torch.rand(37, generator=g)\n"
        "    print(torch.ops.llmkit_cpu.int8_weight_mm(x, q, s).view(torch.int32).tolist())"
    )
    outputs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "LLMKIT_CPU_KERNEL": path}).stdout.splitlines()[-2:]
               for path in ("portable", "avx2", "best")]  # fmt: skip
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 2


def test_bad_shapes_are_refused_in_one_line():
    q, scale = int8_weights(8, 16)
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and q \\[N, K\\]"):
        torch.ops.llmkit_cpu.int8_weight_mm(torch.randn(1, 15), q, scale)
    with pytest.raises(RuntimeError, match="float32 x, int8 q and float32 scale"):
        torch.ops.llmkit_cpu.int8_weight_mm(torch.randn(1, 16, dtype=torch.float64), q, scale)


def test_the_op_traces_with_fake_tensors():
    """torch.library's own checks: schema, fake (meta) kernel against the real one, and its use by compile."""
    x, (q, scale) = torch.randn(1, 40), int8_weights(12, 40)
    torch.library.opcheck(torch.ops.llmkit_cpu.int8_weight_mm, (x, q, scale),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))  # fmt: skip


def float_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The module docstring's float32 bound, [M, N]."""
    return x.shape[1] * 2.0**-24 * (x.double().abs() @ w.double().abs().T)


# rows not a multiple of 4 and columns not of 32 (AVX-512: two 16-lane sums) or 16 (AVX2) take the tails
@pytest.mark.parametrize(
    "m, n, k", [(1, 768, 288), (1, 37, 333), (1, 4, 7), (3, 50, 40), (1, 1, 1), (1, 9, 17), (2, 8, 768), (1, 5, 1000)]
)
def test_float_product_matches_float64_and_aten(m, n, k):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    out = torch.ops.llmkit_cpu.float_weight_mm(x, w)
    assert out.shape == (m, n) and out.dtype == torch.float32
    expected, bound = x.double() @ w.double().T, float_bound(x, w)
    assert ((out.double() - expected).abs() <= bound).all()
    assert ((out.double() - (x @ w.T).double()).abs() <= 2 * bound).all()  # ATen's sums in float32 too
    assert not ((out.double() * 1.01 - expected).abs() <= bound).all()  # the bound sees a 1% error


PRODUCTS = {"rows": "torch.ops.llmkit_cpu.float_weight_mm(x, w)", "packed": "cpu_kernels.PackedLinear(linear)(x)"}


@pytest.mark.parametrize("product", PRODUCTS.values(), ids=PRODUCTS.keys())
def test_every_float_path_is_within_the_bound(product):
    """The AVX-512, AVX2 and portable float32 paths, of the product by rows and by packed blocks, forced one by one
    in fresh processes, each within the bound (they add in different orders, so their bits differ)."""
    code = (
        "import torch; from llmkit import cpu_kernels; cpu_kernels.load(); g = torch.Generator().manual_seed(0)\n"
        "x, w = torch.randn(5, 333, generator=g), torch.randn(37, 333, generator=g)\n"
        f"linear = torch.nn.Linear(333, 37, bias=False); linear.weight.data = w; print({product}.tolist())"
    )
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 333, generator=g), torch.randn(37, 333, generator=g)
    for path in ("portable", "avx2", "best"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "LLMKIT_CPU_KERNEL": path}).stdout.splitlines()[-1]  # fmt: skip
        assert ((torch.tensor(eval(out)).double() - x.double() @ w.double().T).abs() <= float_bound(x, w)).all()


def test_float_product_refuses_bad_input_in_one_line():
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and w \\[N, K\\]"):
        torch.ops.llmkit_cpu.float_weight_mm(torch.randn(1, 15), torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="float32 x and w"):
        torch.ops.llmkit_cpu.float_weight_mm(torch.randn(1, 16), torch.randn(8, 16, dtype=torch.float64))
    x, w = torch.randn(1, 40), torch.randn(12, 40)
    torch.library.opcheck(torch.ops.llmkit_cpu.float_weight_mm, (x, w),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))  # fmt: skip


# rows of x not a multiple of 4 (the AVX-512 path takes four at a time) and outputs not of 16 (the last block)
@pytest.mark.parametrize("m, n, k", [(1, 768, 288), (1, 37, 333), (5, 50, 40), (9, 16, 7), (1, 1, 1), (4, 33, 768)])
def test_packed_product_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = w
    packed = cpu_kernels.PackedLinear(linear)
    assert packed.packed.shape == (-(-n // 16), k, 16) and packed.packed[-1, :, n % 16 or 16:].eq(0).all()
    out = packed(x)
    expected, bound = x.double() @ w.double().T, float_bound(x, w)
    assert out.shape == (m, n) and ((out.double() - expected).abs() <= bound).all()
    assert not ((out.double() * 1.01 - expected).abs() <= bound).all()  # the bound sees a 1% error


def test_packed_product_refuses_bad_input_and_traces():
    packed = torch.zeros(3, 40, 16)
    with pytest.raises(RuntimeError, match="x \\[M, K\\] and packed \\[ceil\\(N / 16\\), K, 16\\]"):
        torch.ops.llmkit_cpu.float_packed_mm(torch.randn(1, 40), packed, 16)  # 3 blocks hold 33 to 48 outputs
    with pytest.raises(RuntimeError, match="float32 x and packed weights"):
        torch.ops.llmkit_cpu.float_packed_mm(torch.randn(1, 40, dtype=torch.float64), packed, 40)
    torch.library.opcheck(torch.ops.llmkit_cpu.float_packed_mm, (torch.randn(2, 40), torch.randn(3, 40, 16), 40),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))  # fmt: skip


def test_packed_copy_of_a_model(tiny_folder):
    """with_packed_linears: the copy's logits are the model's (float32 rounding), its plain linear layers packed and
    the embedding tied to the classifier read from the same packed blocks; the model itself is untouched."""
    from llmkit.loading import load

    model = load(tiny_folder).model
    model.output.weight = model.tok_embeddings.weight  # tied, as stories15M's
    copy_ = cpu_kernels.with_packed_linears(model)
    assert type(model.output) is torch.nn.Linear and type(copy_.output) is cpu_kernels.PackedLinear
    assert copy_.tok_embeddings.packed is copy_.output.packed
    assert copy_.layers[0].attention_norm.weight is model.layers[0].attention_norm.weight
    tokens = torch.tensor([[5, 6, 7, 8, 299]])
    with torch.no_grad():
        assert (copy_(tokens) - model(tokens)).abs().max() <= 1e-4


ATTENTION_CASE = (  # B, H, H_kv, R query rows, D, cache positions, window; a mask row per batch row and query row
    "import torch; g = torch.Generator().manual_seed(0)\n"
    "B, H, H_kv, R, D, S_max, S = 2, 9, 3, 2, 64, 300, 203\n"
    "q = torch.randn(B, H, R, D, generator=g); k, v = torch.randn(2, B, H_kv, S_max, D, generator=g) * 2\n"
    "mask = torch.where(torch.rand(B, 1, R, S, generator=g) < 0.2, float('-inf'), 0.0); mask[..., 0] = 0\n"
)


def attention_float64(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v and its log-sum-exp in float64, each key head repeated for its queries."""
    S, group = mask.shape[-1], q.shape[1] // k.shape[1]
    k, v = (t[:, :, :S].double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask.double()
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


def test_decode_attention_matches_float64_on_every_path():
    """softmax(q k^T / sqrt(D) + mask) v over the caches' first S positions (S the mask's width), its
    log-sum-exp too, with groups of query heads sharing a key head, two query rows with masks of their own and
    masked positions: the AVX-512 path (its own exp) and the portable one (std::exp), forced in fresh processes,
    within 2e-6 of float64 relative to the largest value (float32 sums of S = 203 terms, weights that sum to 1; a
    1e-4 error in one weight would show)."""
    code = ATTENTION_CASE + (
        "from llmkit import cpu_kernels; cpu_kernels.load()\n"
        "out, lse = torch.ops.llmkit_cpu.decode_attention(q, k, v, mask); print([out.tolist(), lse.tolist()])"
    )
    scope = {}
    exec(ATTENTION_CASE, scope)
    expected, expected_lse = attention_float64(*(scope[n] for n in ("q", "k", "v", "mask")))
    for path in ("portable", "best"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "LLMKIT_CPU_KERNEL": path}).stdout.splitlines()[-1]  # fmt: skip
        out, lse = (torch.tensor(t, dtype=torch.float64) for t in eval(out))
        assert (out - expected).abs().max() <= 2e-6 * expected.abs().max(), path
        assert (lse - expected_lse).abs().max() <= 2e-6 * expected_lse.abs().max(), path


def test_decode_attention_refuses_bad_input_and_traces():
    q, k, mask = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 32, 16), torch.zeros(1, 1, 3, 20)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.llmkit_cpu.decode_attention(q, k, k, torch.zeros(1, 1, 3, 40))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.llmkit_cpu.decode_attention(q.double(), k, k, mask)
    torch.library.opcheck(torch.ops.llmkit_cpu.decode_attention, (q, k, k, mask),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))  # fmt: skip


@pytest.mark.parametrize("op", ["float_weight_mm", "int8_weight_mm"])
def test_compiled_layer_calls_the_kernel_at_one_row(op):
    """A float32 linear layer, or torchao's int8 weight-only one, compiled: at one row the product is the kernel's
    call (not inductor's loop, not MKL), at two inductor's own. Float32 within its bound of float64, int8 within
    float32 rounding of eager torchao."""
    from torch._inductor.utils import run_and_get_code
    from torchao.quantization import Int8WeightOnlyConfig, PerRow, quantize_

    from llmkit.compile import _options

    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 200, bias=False)
    weight = layer.weight.detach().clone()
    if op == "int8_weight_mm":
        quantize_(layer, Int8WeightOnlyConfig(granularity=PerRow()))
    options = _options(layer, torch.device("cpu"))
    for rows, called in ((1, True), (2, False)):
        torch._dynamo.reset()
        x = torch.randn(1, rows, 96)
        with torch.no_grad():
            out, (code, *_) = run_and_get_code(torch.compile(layer, fullgraph=True, options=options), x)
            expected = layer(x)
        assert (f"llmkit_cpu::{op}" in code or f"llmkit_cpu.{op}" in code) == called, rows
        if op == "float_weight_mm":
            assert ((out[0].double() - x[0].double() @ weight.double().T).abs() <= float_bound(x[0], weight)).all()
        else:
            assert ((out - expected).abs() <= 1e-4 * expected.abs().max()).all()


@pytest.mark.parametrize("scheme", ["int8wo", None], ids=["int8wo", "float32"])
def test_package_calls_the_kernel_in_python_and_in_the_cpp_runner(tiny_folder, tmp_path, scheme):
    """An int8 weight-only or a float32 .pt2: its decode model calls a kernel by name (the package lists the op), and
    loads in a fresh Python process, which builds or finds the op library first, and in llmkit-run, which has the
    kernels compiled in. Logits within 1e-4 of eager's (test_compile_export's bound), the same greedy tokens."""
    from llmkit.aoti import CPU_OP, export_aoti
    from llmkit.loading import load
    from llmkit.quantize import quantize

    eager = quantize(load(tiny_folder), scheme) if scheme else load(tiny_folder)
    package = export_aoti(eager, tmp_path / f"{scheme or 'float32'}.pt2")
    code = (
        "import sys, torch; from llmkit.aoti import load_aoti; llm = load_aoti(sys.argv[1]); "
        "print(llm.step(torch.tensor([[5, 6, 7]]), torch.arange(3))[0, -1].tolist()); "
        "print(llm.step(torch.tensor([[8]]), torch.tensor([3]))[0, -1].tolist()); "
        "print(llm.generate('the model reads the text', max_new_tokens=20, temperature=0).tokens)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(package)], capture_output=True, text=True, check=True)
    prefill, decode, tokens = (eval(line) for line in out.stdout.strip().splitlines()[-3:])
    with torch.inference_mode():
        expected = eager.model(torch.tensor([[5, 6, 7, 8]]))[0]
    assert (torch.tensor(prefill) - expected[2]).abs().max() <= 1e-4
    assert (torch.tensor(decode) - expected[3]).abs().max() <= 1e-4
    assert tokens == eager.generate("the model reads the text", max_new_tokens=20, temperature=0).tokens
    with zipfile.ZipFile(package) as z:
        assert any(CPU_OP.encode() in z.read(n) for n in z.namelist() if n.endswith(".json"))
        # the attention (float32 in both) by the kernel too
        decode = b"".join(z.read(n) for n in z.namelist() if "/decode/" in n and n.endswith(".json"))
        assert b"decode_attention" in decode
        assert (b"float_packed_mm" in decode) == (scheme is None)  # float32 weights packed (cpu_kernels.PackedLinear)

    runner = Path(__file__).resolve().parents[1] / "runner" / "build" / "llmkit-run"
    if not runner.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{runner} is missing: `make runner` builds it")
        pytest.skip(f"{runner} is not built; run `make runner`")
    result = subprocess.run([str(runner), str(package), "-z", str(tiny_folder / "tokenizer.model"), "-p",
                             "the model reads the text", "-n", "20", "-t", "0", "--ids"], capture_output=True,
                            text=True, check=True)  # fmt: skip
    ids = next(line for line in result.stdout.splitlines() if line.startswith("ids:"))
    assert [int(t) for t in ids.split()[1:]] == tokens


def test_none_keeps_inductors_loops():
    """LLMKIT_CPU_KERNEL=none (benchmarks/step_ab.py's baseline): the kernels are not used, and why_not says so."""
    code = "from llmkit import cpu_kernels; print(cpu_kernels.available(), cpu_kernels.why_not())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "LLMKIT_CPU_KERNEL": "none"}).stdout  # fmt: skip
    assert out.startswith("False LLMKIT_CPU_KERNEL=none")


def test_a_killed_builds_lock_is_removed_and_a_live_one_waited_for(tmp_path):
    """torch's build lock outlives a build that was killed, and torch then waits on it for ever: a lock older than
    a build takes is removed; a fresh one (another process building) is waited for until it goes."""
    import threading

    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (0, time.time() - cpu_kernels.STALE_LOCK_S - 1))
    cpu_kernels.clear_stale_lock(lock)
    assert not lock.exists()
    lock.touch()
    timer = threading.Timer(1.5, lock.unlink)
    timer.start()
    start = time.monotonic()
    cpu_kernels.clear_stale_lock(lock)
    assert 1.4 <= time.monotonic() - start < cpu_kernels.STALE_LOCK_S and not lock.exists()
    timer.join()
