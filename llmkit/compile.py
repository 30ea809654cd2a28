"""torch.compile for generation: a compiled one-token decode step, and optionally the prefill.

Decode runs the same shapes every step, so it compiles once into a static graph: inductor's C++
path on the CPU, with the step's one-row products written as loops (`OneRowProductsAsLoops`);
on a GPU, Triton kernels recorded once as a CUDA graph that each step replays. The prefill's
length varies with the prompt, so it is compiled with a dynamic sequence length, only when asked.
"""

import contextlib
import functools
import time
import types
import warnings
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llmkit.cpu_codegen import short_loads_in_one_instruction
from llmkit.distributed import split_over_devices
from llmkit.errors import first_line
from llmkit.generate import LLM
from llmkit.graph_passes import OneRowProductsAsLoops
from llmkit.model import Transformer, TransformerBlock
from llmkit.sampling import distributions, sampling_options
from llmkit.speculative import Sampling, SpeculativeLLM, chain, checked, race


def own_copy(fn: Callable) -> Callable:
    """`fn` with a code object of its own: dynamo keeps compiled code per code object, at most 8 (its
    recompile limit), so a ninth model compiled through the shared function would silently stay eager."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor) -> Tensor:
    return model(token, input_pos)


def prefill_prompt(model: Transformer, tokens: Tensor, input_pos: Tensor) -> Tensor:
    return model(tokens, input_pos)


def guess_step(model: Transformer, token: Tensor, input_pos: Tensor, noise: Tensor,
               options: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    logits = model(token, input_pos)[0, -1, : noise.numel()]
    q = checked(distributions(logits, options), logits)
    return race(q, noise), q


def verify_step(model: Transformer, tokens: Tensor, input_pos: Tensor, options: Tensor, vocab: int) -> Tensor:
    logits = model(tokens, input_pos)[0, :, :vocab]
    return checked(distributions(logits, options), logits)


def compile(llm: LLM, prefill: bool = False) -> LLM:
    """Compile the decode step (and the prefill) of `llm` in place, warming both up.

    The first calls compile; their time is kept in `llm.compile_time` so generation statistics
    show steady-state speed. Where inductor or torchao can't compile the model (MX formats on
    the CPU, say), this warns in one line, keeps eager and says why in `llm.compile_fallback`. A
    `SpeculativeLLM` has both models compiled so, and its round (`compile_round`).
    """
    if isinstance(llm, SpeculativeLLM):
        compile(llm.target, prefill)
        compile(llm.draft, prefill)
        llm.step, llm.compile_time = llm.target.step, llm.target.compile_time + llm.draft.compile_time
        llm.compile_fallback = llm.target.compile_fallback or llm.draft.compile_fallback
        if llm.compile_fallback is None:
            start = time.perf_counter()
            try:
                llm.propose, llm.score = compile_round(llm)
            except Exception as e:  # as below: the models' steps stay compiled, the round's sampling eager
                llm.compile_fallback = f"the speculative round: {first_line(e)}"
                warnings.warn(f"torch.compile can't compile {llm.compile_fallback}; running it eager", stacklevel=2)
            llm.compile_time += time.perf_counter() - start
        return llm
    model, device = llm.model, llm.device
    options = _options(model, device)
    decode_fn = torch.compile(own_copy(decode_one_token), fullgraph=True, options=options)
    prefill_fn = torch.compile(own_copy(prefill_prompt), fullgraph=True, dynamic=True, options=options)
    start = time.perf_counter()
    try:
        with torch.inference_mode(), _tuner_times_kernels_alone(device), short_loads_in_one_instruction():
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
        llm.compile_fallback = first_line(e)  # benchmarks record it: their "compile" figure is eager's
        warnings.warn(f"torch.compile can't compile this model here ({llm.compile_fallback}); running eager",
                      stacklevel=2)  # fmt: skip
        return llm  # the failed functions were private copies: nothing else to undo
    llm.compile_time = time.perf_counter() - start

    def step(tokens: Tensor, input_pos: Tensor) -> Tensor:
        if tokens.shape[1] == 1:
            return decode(tokens, input_pos)
        return prefill_fn(model, tokens, input_pos) if prefill else model(tokens, input_pos)

    llm.step = step
    return llm


def compile_round(spec: SpeculativeLLM) -> tuple[Callable, Callable]:
    """A speculative round's two halves (`SpeculativeLLM.propose` and `.score`) compiled with their distributions
    and draws inside: eager, each was ~20 small operations per token around the model's step, and on a GPU the
    host took longer to launch them than the GPU to run them. On a GPU each half is one CUDA graph: the k draft
    steps chained, and the verify of k + 1 positions. Call after compiling both models.
    """
    draft, target, k, vocab = spec.draft, spec.target, spec.k, spec.tokenizer.vocab_size
    device = draft.device
    guess_fn = torch.compile(own_copy(guess_step), fullgraph=True, dynamic=False, options=_options(draft.model, device))
    verify_fn = torch.compile(own_copy(verify_step), fullgraph=True, dynamic=False,  # k + 1 rows: not tuned
                              options=_options(target.model, device, tune=False))  # fmt: skip

    def guesses(token: Tensor, start: Tensor, noise: Tensor, options: Tensor) -> tuple[Tensor, Tensor]:
        return chain(lambda t, position, row: guess_fn(draft.model, t.view(1, 1), position, row, options), token,
                     start, noise)  # fmt: skip

    def verify(tokens: Tensor, start: Tensor, options: Tensor) -> Tensor:
        return verify_fn(target.model, tokens[None], start + torch.arange(k + 1, device=device), options, vocab)

    def tokens(n: int) -> Tensor:
        return torch.zeros(n, dtype=torch.long, device=device)

    with torch.inference_mode(), _tuner_times_kernels_alone(device), short_loads_in_one_instruction():
        # inference tensors, as in generation: dynamo guards on the difference and would compile each graph twice
        inputs = (tokens(1), tokens(1), torch.ones(k, vocab, device=device), sampling_options(1.0, None, None, device))
        verify_inputs = (tokens(k + 1), tokens(1), sampling_options(1.0, None, None, device))
        for _ in range(2):  # compile and tune, then run once more
            guesses(*inputs)
            verify(*verify_inputs)
        if device.type == "cuda":
            guesses, verify = _record_cuda_graph(guesses, *inputs), _record_cuda_graph(verify, *verify_inputs)

    @functools.cache
    def on_device(sampling: Sampling) -> Tensor:  # once per choice of options, not a copy per round
        return sampling_options(*sampling, device)

    def propose(token: Tensor, start: int, noise: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor]:
        return guesses(token, torch.full((1,), start, device=device), noise, on_device(sampling))

    def score(tokens: Tensor, start: int, sampling: Sampling) -> Tensor:
        return verify(tokens, torch.full((1,), start, device=device), on_device(sampling))

    return propose, score


def batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a serving engine compiles its decode step for: the powers of two below the largest, and it."""
    return [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size] + [max_batch_size]


def decode_windows(max_seq_len: int) -> list[int]:
    """The cache windows a GPU's batched decode graphs attend to: 256 positions, doubling (seven at most), then
    the whole cache. Each is a compilation of its own, and dynamo keeps at most 8 per function."""
    return [w for w in (256 << i for i in range(7)) if w < max_seq_len] + [max_seq_len]


def compile_batched_decode(llm: LLM, max_batch_size: int) -> Callable[[Tensor, Tensor, int | None], Tensor]:
    """A serving engine's decode step (tokens and positions [B, 1], and the cache positions in use): one row
    compiled as `compile`'s decode step (tuned, one-row products as loops). On a GPU more rows run one layer's
    graph per cache window (`decode_windows`), whose batch size is dynamic, in every layer (a 32-layer model
    compiles as one layer, as in `compile_batched_prefill`); each of `batch_sizes` is recorded as a CUDA graph of
    the whole step, as vLLM captures them, B rows padded to the next size and the positions in use rounded up to
    the next window: a graph's shapes are fixed, and a step over the whole cache reads every row's keys and values
    at every position. On a CPU more rows run eager, attending to the cache in use only: measured faster there than
    a compiled batch over the whole cache (notebook 09). Call after the engine has set up the model's cache of
    max_batch_size rows.

    A padding row decodes token 0 at position 0 of a cache row no request holds; a request that takes that row
    later writes its prompt there before reading it.
    """
    model, device = llm.model, llm.device
    sizes, windows, graphs = batch_sizes(max_batch_size), decode_windows(model.args.max_seq_len), {}
    # tuning is per graph and takes minutes on a GPU: it pays for the one-row step, whose products inductor
    # writes itself; a batch's products are cuBLAS matmuls in a dynamic graph
    one = torch.compile(own_copy(decode_one_token), fullgraph=True, dynamic=False, options=_options(model, device))
    layer_rows = compile_layer_rows(model, device, max_batch_size)
    with torch.inference_mode(), _tuner_times_kernels_alone(device), short_loads_in_one_instruction():
        for size in tqdm(sizes if device.type == "cuda" else [1], desc="compiling the decode step", unit="batch size"):
            tokens = torch.zeros(size, 1, dtype=torch.long, device=device)
            positions = torch.zeros(size, 1, dtype=torch.long, device=device)
            # one row attends to the whole cache: its tuned graph is compiled once, and its reads are the weights'
            for window in windows if size > 1 else [None]:
                fn = partial(one, model) if size == 1 else partial(model, cache_len=window, layer_step=layer_rows)
                for _ in range(2):  # compile and tune, then run once more
                    fn(tokens, positions)
                if device.type == "cuda":
                    graphs[size, window] = _record_cuda_graph(fn, tokens, positions)

    def decode(tokens: Tensor, positions: Tensor, cache_len: int | None = None) -> Tensor:
        rows = tokens.shape[0]
        if device.type != "cuda":
            return one(model, tokens, positions) if rows == 1 else model(tokens, positions, cache_len=cache_len)
        size = next(s for s in sizes if s >= rows)
        window = None if size == 1 else next(w for w in windows if w >= (cache_len or model.args.max_seq_len))
        if size > rows:
            tokens = torch.cat([tokens, tokens.new_zeros(size - rows, 1)])
            positions = torch.cat([positions, positions.new_zeros(size - rows, 1)])
        return graphs[size, window](tokens, positions)[:rows]

    return decode


def compile_layer_rows(model: Transformer, device: torch.device, max_batch_size: int) -> Callable[..., Tensor]:
    """`Transformer.forward`'s layer_step for a batch of 2 to max_batch_size one-token rows: one layer compiled
    with the batch size dynamic (a graph per cache window), which every layer runs, its weights as inputs."""
    layer = torch.compile(own_copy(TransformerBlock.forward), fullgraph=True, dynamic=False,
                          options=_options(model, device, tune=False))  # fmt: skip

    def layer_rows(block: TransformerBlock, *inputs: Tensor) -> Tensor:  # x, cos, sin, mask, positions: [B, ...]
        for t in inputs:  # dynamo would otherwise compile a graph per size
            torch._dynamo.mark_dynamic(t, 0, min=2, max=max_batch_size)
        return layer(block, *inputs)

    return layer_rows


def compile_batched_prefill(llm: LLM) -> Callable[[list[tuple[Tensor, Tensor]], int], list[Tensor]]:
    """A serving engine's step that prefills arriving prompts (`Transformer.forward_blocks`: the running rows'
    tokens [B, 1], if any, then the prompts' [n, T], with their positions; the cache positions in use) on a GPU:
    graphs dynamic in B, n, T and the cache positions, where eager pays a kernel launch per operation whatever the
    prompts' size. One layer is compiled and every layer runs its graph, the weights being its inputs: a 32-layer
    model compiles as fast as a one-layer one, for some microseconds of Python per layer. Attention leaves out
    cuDNN's kernel, which builds a plan for each new shape. Call after the engine has set up the cache (chapter 9
    has the figures).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, device = llm.model, llm.device
    layer_step = torch.compile(own_copy(TransformerBlock.forward_blocks), fullgraph=True, dynamic=True,
                               options=_options(model, device, tune=False))  # fmt: skip
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def prefill(blocks: list[tuple[Tensor, Tensor]], cache_len: int) -> list[Tensor]:
        if cache_len >= model.args.max_seq_len:  # the whole cache (long contexts only): as graphs of their own, the
            return model.forward_blocks(blocks, cache_len)  # mixes would pass dynamo's limit of 8; eager
        tokens, positions = blocks[-1]
        T = tokens.shape[1]
        if T == 1:  # a length of 1 would be a graph of its own: pad, writing the cache past the prompt's end
            blocks = [*blocks[:-1], (tokens.repeat(1, 2), torch.cat([positions, positions + 1], dim=1))]
        blocks = [(t.contiguous(), p.contiguous()) for t, p in blocks]  # an expanded tensor's strides: more graphs
        # no duck sizing: sizes equal when compiled (2 running rows and 2 prompts; a window equal to the model's
        # width) would share a symbol, and a graph would be compiled when they next differ
        with sdpa_kernel(backends), torch.fx.experimental._config.patch(use_duck_shape=False):
            logits = model.forward_blocks(blocks, cache_len, layer_step)
        return [*logits[:-1], logits[-1][:, :T]]

    def zeros(rows: int, length: int) -> tuple[Tensor, Tensor]:
        return (torch.zeros(rows, length, dtype=torch.long, device=device),
                torch.arange(length, device=device).expand(rows, length))  # fmt: skip

    # dynamo specializes sizes of 1: none, one or several running rows, with one or several prompts, so that no
    # graph compiles while requests wait
    mixes = [(running, rows) for running in (0, 1, 2) for rows in (1, 2)]
    with torch.inference_mode():
        for running, rows in tqdm(mixes, desc="compiling the prefill", unit="graph"):
            prefill([zeros(running, 1)] * bool(running) + [zeros(rows, 3)], min(256, model.args.max_seq_len // 2))
    return prefill


def _options(model: Transformer, device: torch.device, tune: bool = True) -> dict:
    """Inductor's options; `tune=False` leaves out the GPU's coordinate-descent tuning (minutes per graph), which
    pays only for one-row steps."""
    options = {"post_grad_custom_pre_pass": OneRowProductsAsLoops()}
    if device.type == "cuda":  # coordinate descent tuning: one-row matmuls as reductions at memory bandwidth
        options["coordinate_descent_tuning"] = tune
        # the tuner times a kernel that writes into its input together with a copy of that input,
        # which hides the differences between configurations: fresh output buffers
        options["inplace_buffers"] = False
    elif not split_over_devices(model):  # inductor's C++ path without Python between kernels
        options["cpp_wrapper"] = True  # (its wrapper cannot call a collective's custom op: "arg type Any")
    return options


@contextlib.contextmanager
def _tuner_times_kernels_alone(device: torch.device) -> Iterator[None]:
    """Have inductor's tuner time each candidate configuration by the GPU's own kernel time (profiler):
    by default it times CUDA events around each launch, and a decode step's kernels run for less time than
    Python takes to launch one, so the tuner timed the launch and its choice varied between compilations."""
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


def _record_cuda_graph(fn: Callable, *inputs: Tensor) -> Callable:
    """Record a compiled step as a CUDA graph on these input buffers: a step is then one replay, whatever the
    model; a call copies its arguments into the buffers and returns copies of the outputs (a tensor or a tuple).

    Not inductor's own CUDA graphs (mode="reduce-overhead"): each of its calls first checks dynamo's guards and
    unwraps torchao's quantized weights in Python, and the GPU waits for that. The graph keeps the addresses
    of the weights and KV cache it saw: compile again after changing them.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*inputs)

    def replay(*args: Tensor) -> Tensor | tuple[Tensor, ...]:
        for buffer, arg in zip(inputs, args, strict=True):
            buffer.copy_(arg)
        graph.replay()
        # the graph writes every step's outputs into the same buffers
        return tuple(t.clone() for t in outputs) if isinstance(outputs, tuple) else outputs.clone()

    return replay
