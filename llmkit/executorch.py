"""ExecuTorch: the model as a `.pte` program with XNNPACK delegates, for a phone-sized CPU, run by
ExecuTorch's runtime (Python bindings) or its C++ text LLM runner.

The model is rewritten with ExecuTorch's LLM custom ops (its KV cache update and attention) and norms
XNNPACK delegates, as ExecuTorch's own `export_llm` does; one graph serves prefill and decode. What a
runner needs besides the graph travels as constant methods (`get_max_seq_len`, `get_eos_ids`, ...).
"""

import copy
import functools
import json
import re
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.artifacts import check_targets, load_checked_tokenizer, package_metadata, write_with_tokenizer
from llmkit.errors import LLMKitError, first_line
from llmkit.generate import LLM, Stats
from llmkit.huge_pages import collapsing_new_memory
from llmkit.model import Attention, ModelArgs, RMSNorm, Transformer
from llmkit.tokenizer import Tokenizer

if TYPE_CHECKING:
    from executorch.exir import ExecutorchProgramManager
    from executorch.runtime import Program

PTE_FORMAT_VERSION = 1  # bump when the program's inputs, outputs or metadata methods change
PTE_REQUIRED_METHODS = ("forward", "get_max_seq_len", "get_vocab_size")  # what load_pte and the runner need


def import_executorch_ops() -> None:
    """Register ExecuTorch's LLM custom ops (llama::update_cache, llama::custom_sdpa) and quantized kernels.

    Exporting needs the ops' PyTorch definitions, and a process that runs a .pte needs their kernels.
    """
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


class CustomKVCache(nn.Module):
    """The KV cache in ExecuTorch's layout [B, max_seq_len, H_kv, D], written in place by llama::update_cache."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        shape = (1, args.max_seq_len, args.n_kv_heads, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        return self.k_cache, self.v_cache


def row_blocks(linear: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    """`linear` as one Linear per block of its output rows, each a view of its weights (and bias).

    Slices rather than `split`: torchao's quantized weights implement slicing but not split_with_sizes."""
    blocks, start = [], 0
    for n in sizes:
        block = nn.Linear(linear.in_features, n, bias=linear.bias is not None, device="meta")
        block.weight = nn.Parameter(linear.weight[start : start + n], requires_grad=False)
        if linear.bias is not None:
            block.bias = nn.Parameter(linear.bias[start : start + n], requires_grad=False)
        blocks.append(block)
        start += n
    return blocks


class CustomOpAttention(nn.Module):
    """`Attention` computed as ExecuTorch's own LLM export does, with the same weights.

    Tensors stay [B, T, H, D], the layout of the custom ops: llama::custom_sdpa attends from positions
    start..start+T-1 to the cache up to each one (causal mask and grouped heads built in), so the model's
    mask goes unused. Rotating halves is a product with a fixed signed permutation rather than a split of
    the head dimension, and reshapes infer the dynamic length (-1): XNNPACK delegates neither a slice nor
    a reshape of a dynamic-length tensor, and each op it leaves out splits the graph into more delegates.
    """

    def __init__(self, attention: Attention, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        # XNNPACK delegates no slice of a dynamic-length tensor, so q, k and v are three products again
        self.wq, self.wk, self.wv = row_blocks(attention.wqkv, attention.qkv_sizes)
        self.wo = attention.wo
        self.kv_cache = CustomKVCache(args, attention.kv_cache.k_cache.dtype)
        half, eye = self.head_dim // 2, torch.eye(self.head_dim // 2)
        rotate = torch.zeros(self.head_dim, self.head_dim)  # float32, as model.apply_rope computes
        rotate[:half, half:], rotate[half:, :half] = -eye, eye  # x -> cat(-x2, x1), as model.rotate_half
        self.register_buffer("rotate", rotate, persistent=False)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * cos + F.linear(x32, self.rotate) * sin).type_as(x)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor) -> Tensor:
        B, _, dim = x.shape
        cos, sin = cos.view(-1, 1, self.head_dim), sin.view(-1, 1, self.head_dim)  # [T, 1, D] against [B, T, H, D]
        q = self.rope(self.wq(x).view(B, -1, self.n_heads, self.head_dim), cos, sin)
        k = self.rope(self.wk(x).view(B, -1, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, -1, self.n_kv_heads, self.head_dim)
        start = input_pos[0].item()  # positions are start..start+T-1, as generation makes them
        k_cache, v_cache = self.kv_cache.update(start, k, v)
        y = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True)
        return self.wo(y.view(B, -1, dim))


class XnnpackRMSNorm(nn.Module):
    """`RMSNorm` with its mean taken over the last two dims of a 4-D view, the only mean XNNPACK delegates."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps, self.weight = norm.eps, norm.weight

    def forward(self, x: Tensor) -> Tensor:
        B, _, dim = x.shape
        x4 = x.float().view(B, -1, 1, dim)
        normed = x4 * torch.rsqrt(x4.pow(2).mean((2, 3), keepdim=True) + self.eps)
        return normed.view(B, -1, dim).type_as(x) * self.weight


def with_executorch_modules(model: Transformer) -> Transformer:
    """A copy of `model` (sharing its weights) whose attention, KV caches and norms are the modules above."""
    import_executorch_ops()
    copy_ = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    for layer in copy_.layers:
        layer.attention = CustomOpAttention(layer.attention, model.args)
        layer.attention_norm, layer.ffn_norm = XnnpackRMSNorm(layer.attention_norm), XnnpackRMSNorm(layer.ffn_norm)
    copy_.norm = XnnpackRMSNorm(copy_.norm)
    if copy_.output.weight is copy_.tok_embeddings.weight:  # a constant shared with the embedding's kernel
        copy_.output.weight = nn.Parameter(copy_.output.weight.detach(), requires_grad=False)  # would split a delegate
    return copy_


def bytes_tensor(text: str) -> Tensor:
    """Text as a uint8 tensor: a constant method returns tensors and numbers, not strings."""
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def pte_metadata(llm: LLM) -> dict:
    """The constant methods: those ExecuTorch's text LLM runner reads, then llmkit's own.

    The 1.5 runner requires get_max_seq_len (the most tokens one forward call takes) and reads
    get_max_context_len, use_kv_cache, enable_dynamic_shape (prefill in one call rather than token by
    token), use_sdpa_with_kv_cache and get_eos_ids; BOS and vocabulary size it takes from its tokenizer.
    get_bos_id, get_vocab_size and get_n_layers are written as ExecuTorch's export_llm writes them.
    A model benchmarked with random weights has no tokenizer, and so no BOS or EOS.
    """
    args, tok = llm.model.args, llm.tokenizer
    meta = {
        "get_max_seq_len": llm.max_seq_len,
        "get_max_context_len": llm.max_seq_len,
        "get_vocab_size": args.vocab_size,
        "get_n_layers": args.n_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
        "llmkit_format_version": PTE_FORMAT_VERSION,
        "llmkit_metadata": bytes_tensor(json.dumps(package_metadata(llm, str(PTE_FORMAT_VERSION)))),
    }
    if tok is not None:
        meta["get_eos_ids"] = tok.eos_ids
        if tok.bos_id is not None:
            meta["get_bos_id"] = tok.bos_id
    return meta


def lower_to_executorch(llm: LLM) -> "ExecutorchProgramManager":
    """`llm`'s model (float or torchao-quantized) as an ExecuTorch program with XNNPACK delegates.

    One graph, forward(tokens [1, T], input_pos [T]) -> logits [1, T, vocab] with 1 <= T < max_seq_len,
    serves prefill and decode; the KV caches are mutable buffers that live in the loaded method.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if llm.model is None:
        raise LLMKitError(f"{llm.name} has no eager model to export (it came from a package); load the checkpoint")
    if llm.device.type != "cpu":
        raise LLMKitError(f"ExecuTorch's XNNPACK backend runs on the CPU, but {llm.name} is on {llm.device}; load it "
                          "with --device cpu")  # fmt: skip
    model = with_executorch_modules(llm.model)
    seq = torch.export.Dim("seq", min=1, max=llm.max_seq_len - 1)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    with torch.no_grad():
        ep = torch.export.export(model, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    edge = to_edge_transform_and_lower(
        ep.run_decompositions({}),  # functional cache updates, torchao tensors as quantize ops
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=pte_metadata(llm),
    )
    return edge.to_executorch(
        ExecutorchBackendConfig(
            do_quant_fusion_and_const_prop=True,  # quantized embeddings become ExecuTorch's embedding kernels
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),  # plan memory for the longest T, not the example
        )
    )


def export_pte(llm: LLM, path: str | Path, force: bool = False) -> Path:
    """Export `llm`'s model to an ExecuTorch `.pte` for the XNNPACK backend, written atomically.

    Quantize the model with torchao first for a smaller, faster program (8da4w: int8 dynamic
    activations, int4 grouped weights; XNNPACK keeps the group scales in bfloat16, so the program's
    logits differ from torchao's eager ones by that rounding). The tokenizer file is copied beside it,
    as for `.pt2` packages.
    """
    path = check_targets(llm, path, force)
    program = lower_to_executorch(llm)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            program.write_to_file(f)

    return write_with_tokenizer(llm, path, write)


def round_scales_to_bf16(llm: LLM) -> LLM:
    """Round an 8da4w model's int4 group scales to bfloat16 in place, as ExecuTorch hands them to XNNPACK, so that
    the eager model and its program run the same integer arithmetic."""
    with torch.no_grad():
        for m in llm.model.modules():
            if isinstance(m, nn.Linear) and hasattr(m.weight, "scale"):
                m.weight.scale.copy_(m.weight.scale.bfloat16())
    return llm


def non_delegated_ops(program: "str | Path | ExecutorchProgramManager") -> Counter:
    """How many times forward calls each operator outside a delegate (delegate calls counted by backend).

    `program` is a `.pte` path or what `lower_to_executorch` returns. The count is read from the
    program's instruction list, so it is what the runtime will execute, after every pass has run.
    """
    from executorch.exir.schema import DelegateCall, KernelCall

    if isinstance(program, str | Path):
        from executorch.exir._serialize._program import deserialize_pte_binary

        program = deserialize_pte_binary(Path(program).read_bytes()).program
    else:
        program = program.executorch_program
    plan = next(p for p in program.execution_plan if p.name == "forward")
    ops = Counter()
    for instruction in (i.instr_args for chain in plan.chains for i in chain.instructions):
        if isinstance(instruction, KernelCall):
            op = plan.operators[instruction.op_index]
            ops[f"{op.name}.{op.overload}" if op.overload else op.name] += 1
        elif isinstance(instruction, DelegateCall):
            ops[f"delegate:{plan.delegates[instruction.delegate_index].id}"] += 1
    return ops


@functools.cache
def size_thread_pool() -> None:
    """Size ExecuTorch's thread pool (XNNPACK's threads) as torch's, once, before this process loads a program.

    The pool starts one thread per core whatever `torch.set_num_threads` (`--threads`) says, so a one-thread
    run would use every core; and a program's delegates keep the pool they were loaded with, so resizing it
    after a load would leave them on freed threads (a crash): the first program's thread count stays."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    if _threadpool_get_thread_count() != torch.get_num_threads():
        _unsafe_reset_threadpool(torch.get_num_threads())


def check_pte(path: str | Path) -> tuple["Program", dict]:
    """Open a `.pte` in ExecuTorch's runtime, check it is a text LLM program: (program, metadata values)."""
    from executorch.runtime import Runtime

    import_executorch_ops()
    size_thread_pool()
    path = Path(path)
    if not path.is_file():
        raise LLMKitError(f"ExecuTorch program not found: {path}")
    with open(path, "rb") as f:
        identifier = f.read(8)[4:]
    # the runtime decodes these bytes as UTF-8 in C++ and aborts the process on anything else: check them first
    if re.fullmatch(rb"ET[0-9]{2}", identifier) is None:
        raise LLMKitError(
            f"{path} is not an ExecuTorch program (its file identifier, bytes 4 to 7, is {identifier!r}, not ET and "
            "a version); export one with llmkit export --output-pte-path"
        )
    try:
        program = Runtime.get().load_program(path)
    except Exception as e:  # the runtime raises RuntimeError or ValueError with the loader's error code
        raise LLMKitError(f"{path} is not an ExecuTorch program ({first_line(e)}); "
                          "export one with llmkit export --output-pte-path") from None  # fmt: skip
    missing = [m for m in PTE_REQUIRED_METHODS if m not in program.method_names]
    if missing:
        raise LLMKitError(f"{path} has no {' or '.join(missing)} method: it is not a text LLM program; "
                          "export it with llmkit export --output-pte-path")  # fmt: skip
    meta = {}
    try:  # the loader checks each method's data as it loads it: a damaged program fails here, or at forward's
        for name in program.method_names - {"forward"}:
            values = program.load_method(name).execute([])
            meta[name] = values if name == "get_eos_ids" else values[0]
    except RuntimeError as e:
        raise damaged_pte(path, e) from None
    return program, meta


def damaged_pte(path: Path, e: Exception) -> LLMKitError:
    return LLMKitError(f"{path} is a damaged ExecuTorch program ({first_line(e)}); export it again")


def pte_tokenizer(path: Path, meta: dict, tokenizer: str | Path | None) -> tuple[Tokenizer | None, dict | None]:
    """The tokenizer for a program, the one given or the copy beside it, checked against the program; and
    llmkit's metadata (None for a program from elsewhere, such as ExecuTorch's export_llm)."""
    try:
        llmkit_meta = json.loads(bytes(meta["llmkit_metadata"].tolist())) if "llmkit_metadata" in meta else None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: bytes damaged inside the program
        raise damaged_pte(path, e) from None
    if llmkit_meta is not None and meta.get("llmkit_format_version") != PTE_FORMAT_VERSION:
        raise LLMKitError(
            f"{path} was made by another llmkit (program format {meta.get('llmkit_format_version')}, this llmkit "
            f"reads {PTE_FORMAT_VERSION}); export it again with this version"
        )
    if tokenizer is None:
        if llmkit_meta is None:
            raise LLMKitError(f"{path} was not made by llmkit and names no tokenizer; pass --tokenizer-path")
        if not llmkit_meta["tokenizer_file"]:
            return None, llmkit_meta  # exported without one: random weights, benchmarks
    known = llmkit_meta or {}  # a program from elsewhere names no tokenizer
    tok = load_checked_tokenizer(path, tokenizer, known.get("tokenizer_file", ""), meta["get_vocab_size"],
                                 known.get("tokenizer_sha256"))  # fmt: skip
    return tok, llmkit_meta


def load_pte(path: str | Path, tokenizer: str | Path | None = None) -> LLM:
    """Load a `.pte` as an `LLM` whose step runs the program in ExecuTorch's runtime (Python bindings).

    Generation is `LLM.generate`, as for every other way to run the model: prefill, then one-token decode,
    with the same sampling. Programs from ExecuTorch's export_llm load too (pass their tokenizer): they
    take the start position alone and return the last position's logits, which the step adapts.
    """
    path = Path(path)
    with collapsing_new_memory():  # the program, and the weights XNNPACK packs from it
        program, meta = check_pte(path)
        tok, llmkit_meta = pte_tokenizer(path, meta, tokenizer)
        try:
            method = program.load_method("forward")
        except RuntimeError as e:
            raise damaged_pte(path, e) from None
    start_only = tuple(method.metadata.input_tensor_meta(1).sizes()) == (1,)

    def step(tokens: Tensor, input_pos: Tensor) -> Tensor:
        logits = method.execute([tokens, input_pos[:1] if start_only else input_pos])[0]
        return logits if logits.dim() == 3 else logits.unsqueeze(1)

    return LLM(None, tok, name=path.stem, step=step, max_seq_len=meta["get_max_seq_len"], device="cpu",
               metadata=llmkit_meta)  # fmt: skip


def executorch_tokenizer(tok: Tokenizer, folder: Path) -> Path:
    """A tokenizer file ExecuTorch's C++ runner reads: the file itself, or for a llama2.c tokenizer.bin,
    the same tokens behind ExecuTorch's llama2c header (vocab size, BOS, EOS, max token length)."""
    if tok.kind != "llama2c":
        return tok.path
    data = tok.path.read_bytes()
    out = folder / (tok.path.stem + ".executorch.bin")
    out.write_bytes(struct.pack("<4i", tok.vocab_size, tok.bos_id, tok.eos_ids[0], tok.max_token_length) + data[4:])
    return out


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def join_pieces(pieces: list[str]) -> str:
    """The runner's pieces as text. Its SentencePiece decoder hands over a byte-fallback token as the piece's
    name ("<0xE2>"); the bytes those stand for are joined and decoded as SentencePiece itself decodes them."""
    data = b"".join(bytes([int(m[1], 16)]) if (m := BYTE_PIECE.fullmatch(p)) else p.encode() for p in pieces)
    return data.decode("utf-8", errors="replace")


@dataclass
class RunnerGeneration:
    text: str  # the new text, without the prompt
    n_tokens: int  # new tokens, the first (from the prefill) included and an end token not
    stats: Stats  # the runner's timings (whole milliseconds) in llmkit's form


class TextRunner:
    """ExecuTorch's own C++ text LLM runner (`TextLLMRunner`) on a `.pte`: what an app links, tokenizer included.

    It reads the program's metadata methods, prefills the prompt in one call, decodes token by token and
    samples in C++ (temperature only: 0 is greedy, there is no top-k/top-p or seed). It prints the text
    and its log as it goes. Its Python binding hands each piece over as `str`, so a llama2.c byte token
    that is only part of a UTF-8 character raises UnicodeDecodeError (SentencePiece's byte tokens are fine).
    """

    def __init__(self, path: str | Path, tokenizer: str | Path | None = None):
        from executorch.extension.llm.runner import TextLLMRunner

        self.path = Path(path)
        _, meta = check_pte(self.path)
        self.tokenizer, _ = pte_tokenizer(self.path, meta, tokenizer)
        if self.tokenizer is None:
            raise LLMKitError(f"{self.path} was exported without a tokenizer; pass --tokenizer-path for the runner")
        self.max_seq_len = meta["get_max_seq_len"]
        self.max_context_len = meta.get("get_max_context_len", self.max_seq_len)
        with tempfile.TemporaryDirectory(prefix="llmkit-runner-") as tmp:  # the runner reads it when created
            tok_file = executorch_tokenizer(self.tokenizer, Path(tmp))
            try:
                self.runner = TextLLMRunner(str(self.path), str(tok_file))
            except RuntimeError as e:
                raise LLMKitError(f"ExecuTorch's runner cannot load {self.path} ({e})") from None

    def generate(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0) -> RunnerGeneration:
        from executorch.extension.llm.runner import GenerationConfig

        if not prompt:
            raise LLMKitError("ExecuTorch's runner needs a prompt of at least one character")
        n_prompt = len(self.tokenizer.encode(prompt, bos=self.tokenizer.bos_id is not None))
        if n_prompt >= self.max_seq_len:
            raise LLMKitError(
                f"the prompt is {n_prompt} tokens but the context holds {self.max_seq_len}; shorten the prompt"
            )
        pieces, stats = [], []
        config = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=temperature,
                                  num_bos=int(self.tokenizer.bos_id is not None))  # fmt: skip
        self.runner.reset()  # start at position 0, as LLM.generate does
        self.runner.generate(prompt, config, pieces.append, stats.append)
        s = stats[0]
        if len(pieces) < config.resolve_max_new_tokens(self.max_context_len, s.num_prompt_tokens):
            pieces.pop()  # it stopped at an end token, which it prints and LLM.generate does not
        first, end = s.first_token_ms - s.inference_start_ms, s.inference_end_ms - s.first_token_ms
        llm_stats = Stats(prompt_tokens=s.num_prompt_tokens, new_tokens=len(pieces),
                          time_to_first_token=first / 1000, decode_time=end / 1000)  # fmt: skip
        return RunnerGeneration(join_pieces(pieces), len(pieces), llm_stats)
