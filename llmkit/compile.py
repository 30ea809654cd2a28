"""torch.compile for generation: a compiled one-token decode step, and optionally the prefill.

Decode runs the same shapes every step, so it compiles once into a static graph: inductor's C++
path on the CPU, with the step's one-row products written as loops (`OneRowProductsAsLoops`);
on a GPU, Triton kernels recorded once as a CUDA graph that each step replays. The prefill's
length varies with the prompt, so it is compiled with a dynamic sequence length, only when asked.
"""

import contextlib
import time
import types
import warnings
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern
from torch.fx.experimental.symbolic_shapes import statically_known_true

from llmkit.errors import first_line
from llmkit.generate import LLM
from llmkit.model import Transformer

aten = torch.ops.aten
_one_row_products = PatternMatcherPass()


class OneRowProductsAsLoops(CustomGraphPass):
    """Write a decode step's one-row products, its linear layers and its attention of one query, as
    multiplies and sums, so that inductor's C++ backend makes them loops fused with their neighbours.

    Left alone, inductor calls MKL for a one-row matmul, which read float32 weights at 9.5 GB/s on a
    2-core AMD EPYC whose memory copies at 26 GB/s (the loop: 31 GB/s), and for int8 weight-only
    first converts the whole weight to float32 in a buffer (the loop converts as it reads). ATen's
    flash attention for the CPU, built for long queries, took 43 us a layer for one query over 129
    positions.

    On a GPU, inductor itself writes a one-row matmul as a reduction (with coordinate descent tuning),
    but it recomputed the product's input inside every output row's program: for w2, silu(w1 x) * w3 x,
    4096 times a step. The pass has that input computed once, in bfloat16 rather than float32, as every
    row's program reads it (H100, llama-2-7b shape: int8wo 324.6 -> 345.5 tok/s). cuDNN's attention,
    also built for long queries, took 7 us a layer for one query over 129 positions; written as sums it
    fuses with its neighbours: bfloat16 201.3 -> 203.3 tok/s, int8wo 319.9 -> 324.6.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        _one_row_products.apply(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))  # inductor's cache key: a changed pass recompiles


def _is_one_row(x, dim: int = 0) -> bool:
    val = x.meta.get("val")
    return val is not None and statically_known_true(val.shape[dim] == 1)


def _is_one_row_on_cpu(x, dim: int = 0) -> bool:
    return _is_one_row(x, dim) and x.meta["val"].device.type == "cpu"


@register_graph_pattern(
    CallFunction(aten.sum.dim_IntList,
                 CallFunction(aten.mul.Tensor, CallFunction(aten.unsqueeze.default, Arg(), 2),
                              CallFunction(aten.unsqueeze.default, Arg(), 0)), [1]),
    pass_dict=_one_row_products,
    extra_check=lambda match: _is_one_row(match.args[0]),
)  # fmt: skip
def _one_row_reduction(match: Match, x, w) -> None:
    """Inductor's own one-row matmul on a GPU, (x[:, :, None] * w[None]).sum(1): compute x once, and
    keep it in its own 16-bit dtype, not the float32 the product is summed in, since every output row's
    program reads all of x (for int8 weights, in float32, 4 times the weight's own bytes)."""
    widened = x.target == torch.ops.prims.convert_element_type.default
    if widened and x.args[0].meta["val"].dtype in (torch.bfloat16, torch.float16):
        x = x.args[0]
    x.meta["inductor_realize_to_strides"] = True


def _matmul_of_one_row(x: Tensor, w: Tensor) -> Tensor:
    return (x.float()[:, :, None] * w.float()[None]).sum(1)


@register_graph_pattern(CallFunction(aten.mm.default, Arg(), Arg()), pass_dict=_one_row_products)
def _one_row_mm(match: Match, x, w) -> None:
    if _is_one_row_on_cpu(x):
        x.meta["inductor_realize_to_strides"] = True  # computed once, not again inside every row's loop
        match.replace_by_example(lambda x, w: _matmul_of_one_row(x, w).to(x.dtype), [x, w])


@register_graph_pattern(CallFunction(aten.addmm.default, Arg(), Arg(), Arg()), pass_dict=_one_row_products)
def _one_row_addmm(match: Match, bias, x, w) -> None:
    if _is_one_row_on_cpu(x):
        x.meta["inductor_realize_to_strides"] = True
        match.replace_by_example(lambda b, x, w: (b.float() + _matmul_of_one_row(x, w)).to(x.dtype), [bias, x, w])


@register_graph_pattern(
    CallFunction(aten._scaled_dot_product_flash_attention_for_cpu.default, Arg(), Arg(), Arg(), attn_mask=Arg()),
    pass_dict=_one_row_products,
)
@register_graph_pattern(  # the attention an H100 runs (query, key, value, mask, compute_log_sumexp)
    CallFunction(aten._scaled_dot_product_cudnn_attention.default, Arg(), Arg(), Arg(), Arg(), False),
    pass_dict=_one_row_products,
)
def _one_query_attention(match: Match, q, k, v, mask) -> None:
    if _is_one_row(q, dim=2) and mask.meta["val"].shape[1:3] == (1, 1):  # one mask row for all heads
        unused = (None,) * (len(match.output_node().meta["val"]) - 2)  # cuDNN's extra outputs, for training
        match.replace_by_example(lambda *qkvm: _attention_of_one_query(*qkvm) + unused, [q, k, v, mask])


def _attention_of_one_query(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d) + mask) v and its log-sum-exp, each group of query heads sharing a key head."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    q = q.float().view(B, kv_heads, H // kv_heads, 1, D)
    scores = (q * k.float()[:, :, None]).sum(-1) / D**0.5 + mask.float()  # [B, kv_heads, group, S]
    lse = scores.logsumexp(-1, keepdim=True)
    out = ((scores - lse).exp()[..., None] * v.float()[:, :, None]).sum(-2)
    return out.view(B, H, 1, D).to(v.dtype), lse.view(B, H, 1)


def own_copy(fn: Callable) -> Callable:
    """`fn` with a code object of its own: dynamo keeps compiled code per code object, at most 8 (its
    recompile limit), so a ninth model compiled through the shared function would silently stay eager."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor) -> Tensor:
    return model(token, input_pos)


def prefill_prompt(model: Transformer, tokens: Tensor, input_pos: Tensor) -> Tensor:
    return model(tokens, input_pos)


def compile(llm: LLM, prefill: bool = False) -> LLM:
    """Compile the decode step (and the prefill) of `llm` in place, warming both up.

    The first calls compile; their time is kept in `llm.compile_time` so generation statistics
    show steady-state speed. Where inductor or torchao can't compile the model (MX formats on
    the CPU, say), this warns in one line and keeps eager.
    """
    model, device = llm.model, llm.device
    options = {"post_grad_custom_pre_pass": OneRowProductsAsLoops()}
    if device.type == "cuda":  # coordinate descent tuning: one-row matmuls as reductions at memory bandwidth
        options["coordinate_descent_tuning"] = True
        # A kernel that writes into its input's buffer is timed by the tuner together with a copy of
        # that buffer, which hid the differences between configurations: on an H100 the same w1/w3
        # kernel took 58 us a layer in one compilation and 75-110 us in others. Fresh buffers: 60-62 us.
        options["inplace_buffers"] = False
    else:  # inductor's C++ path without Python between kernels
        options["cpp_wrapper"] = True
    decode_fn = torch.compile(own_copy(decode_one_token), fullgraph=True, options=options)
    prefill_fn = torch.compile(own_copy(prefill_prompt), fullgraph=True, dynamic=True, options=options)
    start = time.perf_counter()
    try:
        with torch.inference_mode(), _tuner_times_kernels_alone(device):
            if prefill:  # a length other than 1, so the graph stays dynamic in the sequence length
                prefill_fn(model, torch.zeros(1, 2, dtype=torch.long, device=device),
                           torch.arange(2, device=device))  # fmt: skip
            token = torch.zeros(1, 1, dtype=torch.long, device=device)
            input_pos = torch.zeros(1, dtype=torch.long, device=device)
            for _ in range(2):  # compile and tune, then run once more
                decode_fn(model, token, input_pos)
            decode = partial(decode_fn, model)
            if device.type == "cuda":
                decode = _record_cuda_graph(decode, token, input_pos)
    except Exception as e:  # inductor and torchao raise many types; eager still works
        warnings.warn(f"torch.compile can't compile this model here ({first_line(e)}); running eager", stacklevel=2)
        return llm  # the failed functions were private copies: nothing else to undo
    llm.compile_time = time.perf_counter() - start

    def step(tokens: Tensor, input_pos: Tensor) -> Tensor:
        if tokens.shape[1] == 1:
            return decode(tokens, input_pos)
        return prefill_fn(model, tokens, input_pos) if prefill else model(tokens, input_pos)

    llm.step = step
    return llm


@contextlib.contextmanager
def _tuner_times_kernels_alone(device: torch.device) -> Iterator[None]:
    """Have inductor's tuner time each candidate configuration by the GPU's own kernel time (profiler).

    By default the tuner records CUDA events around each launch, but Python takes longer to launch a
    kernel than the 8-20 us kernels of a decode step take to run: the GPU waits, the wait is timed,
    and the winner changed from one compilation to the next. Measured on an H100, int8wo, llama-2-7b
    shape: a kernel the model runs in 7.7 us was timed at 16-36 us, and six compilations decoded
    246-305 tok/s; timed by the profiler, two compilations chose the same kernels and decoded 320.0
    and 320.2 tok/s.
    """
    if device.type != "cuda":
        yield
        return
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    bench = CachingAutotuner.bench

    def bench_with_profiler(self, launcher, *args, **kwargs):
        return bench(self, launcher, *args, **{**kwargs, "with_profiler": True})

    CachingAutotuner.bench = bench_with_profiler
    try:
        with warnings.catch_warnings():  # the profiler warns, once, that each of its runs starts empty
            warnings.filterwarnings("ignore", ".*Profiler clears events", UserWarning)
            yield
    finally:
        CachingAutotuner.bench = bench


def _record_cuda_graph(decode: Callable, token: Tensor, input_pos: Tensor) -> Callable:
    """Record one compiled decode step as a CUDA graph: a step is then one replay, whatever the model.

    Why not inductor's own CUDA graphs (mode="reduce-overhead"): each call first checks dynamo's guards and
    unwraps torchao's quantized weights in Python, about 15 us a weight, and the GPU waits for that.
    Measured on an H100, llama-2-7b shape: int4wo-128 decoded 232 tok/s that way, 329 replaying this
    graph; int8wo 236 and 250; bfloat16, with plain weights, 187 both ways. The graph keeps the
    addresses of the weights and KV cache it saw: compile again after changing them.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = decode(token, input_pos)

    def replay(tokens: Tensor, positions: Tensor) -> Tensor:
        token.copy_(tokens)
        input_pos.copy_(positions)
        graph.replay()
        return logits.clone()  # the graph writes every step's logits into the same buffer

    return replay
