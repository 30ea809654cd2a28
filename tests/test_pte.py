"""ExecuTorch .pte export: the custom-op model, the program in ExecuTorch's runtime and in its C++ LLM runner
agree with eager, for float32 and for a torchao-quantized model; bad input is a clear LLMKitError.

Tolerances. float32: the same arithmetic, with XNNPACK's kernels summing in another order, so logits of size
~1-10 may differ by float32 rounding; we allow 1e-4 (measured: about 1e-5) and require eager's greedy tokens.
Quantized (8da4w, 4-bit embedding): ExecuTorch hands XNNPACK the int4 group scales in bfloat16, which moves
the logits by about 5% of what quantization itself moves them, enough to flip a close greedy choice. So the
test rounds torchao's scales to bfloat16 first: eager and the program then run the same integer arithmetic,
and differ only where float rounding carries an activation across an int8 rounding boundary (one level of one
element: measured 0 to 3.5% of the quantization change). We allow 10% and require the same greedy tokens.
"""

import subprocess
import sys

import pytest
import torch
from torch import nn

from llmkit.checkpoint import load_checkpoint, save_meta
from llmkit.errors import LLMKitError
from llmkit.executorch import (
    TextRunner,
    check_pte,
    executorch_tokenizer,
    export_pte,
    load_pte,
    non_delegated_ops,
    pte_metadata,
    pte_tokenizer,
    with_executorch_modules,
)
from llmkit.files import sha256
from llmkit.generate import LLM
from llmkit.loading import load
from llmkit.model import Attention
from llmkit.quantize import quantize
from llmkit.tokenizer import load_tokenizer

PROMPT = "the model reads the text"
VOCAB, CONTEXT, KV_HEADS = 300, 128, 2  # conftest.TINY's
# what stays outside XNNPACK, per forward call: see notebooks/07_executorch.ipynb for why each one does
OUTSIDE = {"aten::embedding.out": 1, "aten::index.Tensor_out": 2, "aten::select_copy.int_out": 2,
           "aten::_local_scalar_dense": 2, "llama::update_cache.out": 4, "llama::custom_sdpa.out": 2,
           "delegate:XnnpackBackend": 3}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """conftest's random 2-layer model (std 0.2) with grouped-query attention and a SentencePiece tokenizer."""
    return tiny_folder


def quantize_8da4w(llm):
    """mobile-style, in groups of 32 (the model is 64 wide): a 4-bit embedding, 8da4w on every linear layer, with
    the linear layers' group scales then rounded to bfloat16, as XNNPACK will hold them."""
    quantize(llm, '{"embedding": {"bitwidth": 4, "groupsize": 32}, "linear:a8w4dq": {"groupsize": 32}}')
    with torch.no_grad():
        for m in llm.model.modules():
            if isinstance(m, nn.Linear):
                m.weight.scale.copy_(m.weight.scale.bfloat16())
    return llm


@pytest.fixture(scope="module")
def fp32_pte(tiny_pte):
    return tiny_pte


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """(eager quantized LLM, its .pte)."""
    llm = quantize_8da4w(load(tiny))
    return llm, export_pte(llm, tmp_path_factory.mktemp("pte") / "tiny-8da4w.pte")


def tokens(n: int = 30) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))


def greedy(llm, n: int = 40) -> list[int]:
    return llm.generate(PROMPT, max_new_tokens=n, temperature=0).tokens


def test_custom_op_modules_match_eager(tiny):
    """The export-time transform gives eager's logits, prefill then decode, and leaves the eager model plain."""
    eager = load(tiny).model
    swapped = with_executorch_modules(eager)
    x = tokens()
    with torch.no_grad():
        for t, pos in ((x[:, :20], torch.arange(20)), (x[:, 20:21], torch.tensor([20]))):
            assert (swapped(t, pos) - eager(t, pos)).abs().max() <= 1e-5
    assert all(type(layer.attention) is Attention for layer in eager.layers)
    assert swapped.layers[0].attention.wq.weight.data_ptr() == eager.layers[0].attention.wqkv.weight.data_ptr()
    assert swapped.layers[0].attention.kv_cache.k_cache.shape == (1, CONTEXT, KV_HEADS, 16)


def test_fp32_pte_matches_eager(tiny, fp32_pte):
    eager, pte = load(tiny), load_pte(fp32_pte)
    with torch.no_grad():
        assert (pte.step(tokens(), torch.arange(30)) - eager.model(tokens())).abs().max() <= 1e-4
    assert greedy(pte) == greedy(eager)
    assert non_delegated_ops(fp32_pte) == OUTSIDE


def test_pte_runs_on_torch_threads(fp32_pte):
    """--threads sets torch's thread count; ExecuTorch's pool (XNNPACK's threads) follows it, where by itself it
    starts one thread per core. In fresh processes: the pool is sized once, before a process's first program."""
    code = (
        "import sys, torch; torch.set_num_threads(int(sys.argv[2])); from llmkit.executorch import load_pte; "
        "from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count as count; "
        "load_pte(sys.argv[1]).generate('the', max_new_tokens=4, temperature=0); print('pool', count())"
    )
    for n in (1, 3):  # 1 and 3 differ from the default on 2 cores; 1 on any machine of several
        done = subprocess.run([sys.executable, "-c", code, str(fp32_pte), str(n)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split()[-2:] == ["pool", str(n)]


def test_quantized_pte_matches_eager_quantized(tiny, fp32_pte, quantized):
    llm, path = quantized
    pte = load_pte(path)
    with torch.no_grad():
        float_logits, eager_logits = load(tiny).model(tokens()), llm.model(tokens())
        pte_logits = pte.step(tokens(), torch.arange(30))
    assert (pte_logits - eager_logits).abs().max() <= 0.1 * (eager_logits - float_logits).abs().max()
    assert greedy(pte) == greedy(llm)
    quantized_embedding = {"aten::embedding.out": None, "quantized_decomposed::embedding_4bit.out": 1}
    assert non_delegated_ops(path) == {k: v for k, v in (OUTSIDE | quantized_embedding).items() if v}
    assert path.stat().st_size < 0.5 * fp32_pte.stat().st_size


def same_text(runner_text: str, streamed: str) -> bool:
    """Equal but for a last, unfinished UTF-8 character (U+FFFD), which streaming holds back and the runner prints:
    random models emit byte-fallback tokens."""
    return runner_text.rstrip("\ufffd") == streamed.rstrip("\ufffd")


def test_cpp_runner_matches_eager(tiny, fp32_pte, quantized):
    eager = load(tiny).generate(PROMPT, max_new_tokens=40, temperature=0)
    out = TextRunner(fp32_pte).generate(PROMPT, max_new_tokens=40)
    assert same_text(out.text, eager.text) and out.n_tokens == len(eager.tokens)
    assert out.stats.prompt_tokens == len(load_tokenizer(tiny / "tokenizer.model").encode(PROMPT))
    llm, path = quantized
    expected = llm.generate(PROMPT, max_new_tokens=40, temperature=0)
    assert same_text(TextRunner(path).generate(PROMPT, max_new_tokens=40).text, expected.text)


def test_runner_metadata(tiny, fp32_pte):
    _, meta = check_pte(fp32_pte)
    tok = load_tokenizer(tiny / "tokenizer.model")
    expected = {"get_max_seq_len": 128, "get_max_context_len": 128, "get_vocab_size": 300, "get_n_layers": 2,
                "get_bos_id": tok.bos_id, "get_eos_ids": tok.eos_ids, "use_kv_cache": True,
                "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True, "llmkit_format_version": 1}  # fmt: skip
    assert {k: meta[k] for k in expected} == expected
    assert load_pte(fp32_pte).metadata["tokenizer_sha256"] == sha256(tiny / "tokenizer.model")


def test_program_without_tokenizer(tiny, tmp_path):
    """Random-weight benchmarks export without a tokenizer: no BOS/EOS methods, and none is looked for."""
    meta = pte_metadata(LLM(load(tiny).model, None))
    assert "get_eos_ids" not in meta and "get_bos_id" not in meta
    tok, llmkit_meta = pte_tokenizer(tmp_path / "x.pte", meta, None)
    assert tok is None and llmkit_meta["tokenizer_file"] == ""
    assert pte_tokenizer(tmp_path / "x.pte", meta, tiny / "tokenizer.model")[0].vocab_size == 300  # any that fits


def test_export_bad_input(tiny, fp32_pte, tmp_path):
    with pytest.raises(LLMKitError, match="does not exist"):
        export_pte(load(tiny), tmp_path / "missing" / "x.pte")
    before = sorted(p.name for p in fp32_pte.parent.iterdir())
    with pytest.raises(LLMKitError, match="already exists"):
        export_pte(load(tiny), fp32_pte)
    assert sorted(p.name for p in fp32_pte.parent.iterdir()) == before == ["tiny.pte", "tiny.tokenizer.model"]


def test_load_bad_input(tiny, fp32_pte, tmp_path, sentencepiece_model):
    junk = tmp_path / "junk.pte"
    junk.write_bytes(b"not a program" * 10)
    with pytest.raises(LLMKitError, match="is not an ExecuTorch program"):
        load_pte(junk)
    with pytest.raises(LLMKitError, match="not found"):
        load_pte(tmp_path / "nothing.pte")
    with pytest.raises(LLMKitError, match="has no get_max_seq_len or get_vocab_size method"):
        load_pte(plain_program(tmp_path))
    lonely = tmp_path / "lonely.pte"
    lonely.write_bytes(fp32_pte.read_bytes())
    with pytest.raises(LLMKitError, match="tokenizer .* is missing"):
        load_pte(lonely)
    bigger = sentencepiece_model(tmp_path, 400)
    with pytest.raises(LLMKitError, match="has 400 tokens but .* knows 300"):
        load_pte(fp32_pte, bigger)
    _, meta = check_pte(fp32_pte)
    from_elsewhere = {k: v for k, v in meta.items() if k != "llmkit_metadata"}  # export_llm's: no checksum to check
    with pytest.raises(LLMKitError, match="has 400 tokens but .* knows 300"):
        pte_tokenizer(fp32_pte, from_elsewhere, bigger)
    with pytest.raises(LLMKitError, match="checksum differs"):
        TextRunner(fp32_pte, sentencepiece_model(tmp_path / "other", 300, verb="writes"))


def plain_program(folder):
    """A .pte with a forward method and none of the metadata an LLM program carries."""
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(nn.Linear(4, 4), (torch.ones(1, 4),))
    path = folder / "linear.pte"
    path.write_bytes(to_edge_transform_and_lower(ep).to_executorch().buffer)
    return path


def test_prompt_longer_than_the_context(fp32_pte):
    long_prompt = "the model reads the text " * 100
    with pytest.raises(LLMKitError, match="context holds 128"):
        load_pte(fp32_pte).generate(long_prompt, max_new_tokens=5)
    runner = TextRunner(fp32_pte)
    with pytest.raises(LLMKitError, match="context holds 128"):
        runner.generate(long_prompt, max_new_tokens=5)
    with pytest.raises(LLMKitError, match="needs a prompt"):
        runner.generate("", max_new_tokens=5)


def test_meta_checkpoint_round_trip(tiny, tmp_path):
    """What export_llm reads: Meta's layout, q/k rows back in interleaved order; llmkit loads it to the same model."""
    llm = load(tiny)
    again = load_checkpoint(save_meta(llm.model, tmp_path / "meta"), max_seq_len=CONTEXT)
    with torch.no_grad():
        assert torch.equal(again(tokens()), llm.model(tokens()))


def test_llama2c_tokenizer_for_the_runner(shared_data, tmp_path):
    """ExecuTorch's C++ llama2.c tokenizer reads the converted file and encodes as llmkit (and run.c) do."""
    from pytorch_tokenizers import CppLlama2cTokenizer

    tok = load_tokenizer(shared_data / "stories260K" / "tok512.bin")
    cpp = CppLlama2cTokenizer()
    cpp.load(str(executorch_tokenizer(tok, tmp_path)))
    assert (cpp.vocab_size(), cpp.bos_tok(), cpp.eos_tok()) == (512, 1, 2)
    for text in ("Once upon a time", "Lily and Tom, h\u00e9llo \U0001f600!", " two  spaces"):
        assert cpp.encode(text, 1, 0) == tok.encode(text, bos=True)
