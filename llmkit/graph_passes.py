"""Inductor graph passes: a decode step's one-row products and one-query attention written as loops.

`torch.compile` (llmkit.compile) and AOTInductor (llmkit.aoti) both run `OneRowProductsAsLoops` after
inductor's own passes, so the same fused loops serve the compiled step and the exported package. On the CPU
a one-row product by int8 or float32 weights, and float32 attention of a few query rows, go to llmkit's C++
kernels (`llmkit.cpu_kernels`) instead, where they build.
"""

import torch
from torch import Tensor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import (
    Arg,
    CallFunction,
    KeywordArg,
    Match,
    PatternMatcherPass,
    register_graph_pattern,
)
from torch.fx.experimental.symbolic_shapes import statically_known_true

from llmkit import cpu_codegen, cpu_kernels

aten = torch.ops.aten
prims = torch.ops.prims
_int8_products = PatternMatcherPass()  # runs first: its products would otherwise become loops
_one_row_products = PatternMatcherPass()
MAX_KERNEL_ROWS = 16  # query rows per head up to which attention goes to the C++ kernel: a decode step's (a token's)


class OneRowProductsAsLoops(CustomGraphPass):
    """Write a decode step's one-row products, its linear layers and its attention of one query, as
    multiplies and sums, so that inductor makes them loops fused with their neighbours.

    Left alone, inductor on a CPU calls a BLAS matmul for one row, which streams weights well below the
    memory bandwidth (and for int8 weights first widens the whole matrix), and ATen's attention kernels,
    built for long queries, spend most of a decode step's attention time on setup. On a GPU inductor
    writes a one-row matmul as a reduction itself; the pass has its input computed once, in its own
    16-bit dtype, rather than inside every output row's program, and leaves attention to cuDNN.
    Notebook 08 measures each effect.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        # torch.export checks each cast's input dtype with a node that uses it: a second user, which keeps the
        # pattern matcher from replacing the cast (the dtypes are the graph's own, fixed when it was traced)
        for node in [n for n in graph.nodes if n.target == aten._assert_tensor_metadata.default]:
            graph.erase_node(node)
        _int8_products.apply(graph)
        _one_row_products.apply(graph)

    def uuid(self) -> bytes:
        # inductor's cache key: a changed pass, code generation or kernel recompiles, and so does a graph compiled
        # with the kernel in a process that can't build it
        files = get_hash_for_files((__file__, cpu_codegen.__file__, str(cpu_kernels.SOURCE)))
        return files + (b"C++ kernels" if cpu_kernels.available() else b"loops")


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


def _is_int8_product(match: Match) -> bool:
    x, q, scale = (match.kwargs[k].meta.get("val") for k in ("x", "q", "scale"))
    return (_is_one_row_on_cpu(match.kwargs["x"]) and x.dtype == torch.float32 and q.dtype == torch.int8
            and q.dim() == 2 and scale.dtype == torch.float32 and scale.numel() == q.shape[0]
            and cpu_kernels.available())  # fmt: skip


def _int8_product(widen_then_transpose: bool) -> CallFunction:
    """x (q^T widened to float32) * scale, as torchao's int8 layer writes it, or with q widened first (F.linear)."""
    convert, permute = prims.convert_element_type.default, aten.permute.default
    if widen_then_transpose:
        w = CallFunction(permute, CallFunction(convert, KeywordArg("q"), torch.float32), [1, 0])
    else:
        w = CallFunction(convert, CallFunction(permute, KeywordArg("q"), [1, 0]), torch.float32)
    return CallFunction(aten.mul.Tensor, CallFunction(aten.mm.default, KeywordArg("x"), w), KeywordArg("scale"))


@register_graph_pattern(_int8_product(False), pass_dict=_int8_products, extra_check=_is_int8_product)
@register_graph_pattern(_int8_product(True), pass_dict=_int8_products, extra_check=_is_int8_product)
def _one_row_int8_product(match: Match, x, q, scale) -> None:
    """x (q * scale)^T as torchao's int8 weight-only layer writes it: llmkit's C++ kernel sums in integers,
    where inductor's loop widens each weight to float first."""
    match.replace_by_example(lambda x, q, s: torch.ops.llmkit_cpu.int8_weight_mm(x, q, s.reshape(-1)), [x, q, scale])


def _matmul_of_one_row(x: Tensor, w: Tensor) -> Tensor:
    return (x.float()[:, :, None] * w.float()[None]).sum(1)


def _float_weight(x, w) -> torch.fx.Node | None:
    """The float32 weight [N, K] of x w^T where llmkit's C++ kernel can take the product, else None."""
    if not (w.target == aten.permute.default and w.args[1] == [1, 0] and w.args[0].op in ("placeholder", "get_attr")
            and cpu_kernels.available()):  # fmt: skip
        return None
    weight, row = w.args[0].meta["val"], x.meta["val"]
    return w.args[0] if row.dtype == weight.dtype == torch.float32 and weight.is_contiguous() else None


@register_graph_pattern(CallFunction(aten.mm.default, Arg(), Arg()), pass_dict=_one_row_products)
def _one_row_mm(match: Match, x, w) -> None:
    if not _is_one_row_on_cpu(x):
        return
    if (weight := _float_weight(x, w)) is not None:
        # four rows at a time, where inductor's loop sums one at a time (llmkit.cpu_kernels)
        match.replace_by_example(lambda x, w: torch.ops.llmkit_cpu.float_weight_mm(x, w), [x, weight])
    else:
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
def _one_query_attention(match: Match, q, k, v, mask) -> None:
    # the CPU's only: on an H200 the loops were no faster than cuDNN's kernel at any batch size and cache window
    # measured, and twice as slow over 1024 positions (data/benchmarks/gpu/h200-decode-attention.jsonl)
    rows, mask_shape = q.meta["val"].shape[2], mask.meta["val"].shape
    if (isinstance(rows, int) and rows <= MAX_KERNEL_ROWS and mask_shape[1] == 1 and mask_shape[2] in (1, rows)
            and all(n.meta["val"].dtype == torch.float32 for n in (q, k, v, mask)) and cpu_kernels.available()):
        # a token's queries (its grouped heads stacked as rows of their key head: llmkit.model.grouped_attention)
        width = mask_shape[-1]
        match.replace_by_example(lambda q, k, v, mask: torch.ops.llmkit_cpu.decode_attention(q, k, v, mask),
                                 [q, _cache_of(k, width), _cache_of(v, width), mask])  # fmt: skip
    elif _is_one_row(q, dim=2) and mask_shape[1:3] == (1, 1):  # one mask row for all heads
        match.replace_by_example(_attention_of_one_query, [q, k, v, mask])


def _cache_of(x: torch.fx.Node, width) -> torch.fx.Node:
    """The whole cache where x is its first `width` positions (dim 2), gathered (AOTI's window: an index by an
    iota) or sliced: the kernel reads them in place, where taking x would have inductor copy them every step."""
    start, end = None, None
    if x.target == aten.index.Tensor and len(x.args[1]) == 3 and x.args[1][:2] == [None, None]:
        index = x.args[1][2]
        if index.target == prims.iota.default and (index.kwargs.get("start"), index.kwargs.get("step")) == (0, 1):
            start, end = 0, index.args[0]
    elif x.target == aten.slice.Tensor and x.args[1:2] == (2,):
        _, _, start, end, step = [*x.args, None, None, None][:5]
        start, end = (start or 0, end) if step in (None, 1) else (None, None)
    end = end.meta.get("val") if isinstance(end, torch.fx.Node) else end
    if start == 0 and end is not None and statically_known_true(end == width):
        return x.args[0]
    return x


def _attention_of_one_query(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d) + mask) v and its log-sum-exp, each group of query heads sharing a key head."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    q = q.float().view(B, kv_heads, H // kv_heads, 1, D)
    scores = (q * k.float()[:, :, None]).sum(-1) / D**0.5 + mask.float()  # [B, kv_heads, group, S]
    lse = scores.logsumexp(-1, keepdim=True)
    out = ((scores - lse).exp()[..., None] * v.float()[:, :, None]).sum(-2)
    return out.view(B, H, 1, D).to(v.dtype), lse.view(B, H, 1)
