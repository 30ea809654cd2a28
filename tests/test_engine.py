"""Continuous batching against requests run alone: the same tokens, token for token, batched or not."""

import pytest
import torch
from torch._dynamo.utils import counters

import llmkit
from llmkit.engine import Engine, QueueFull, Request, held_back, run_to_completion
from llmkit.errors import LLMKitError

PROMPTS = ["the model reads", "the text number 12 and", "writes", "the model reads the text number 7",
           "words", "the text", "number 3 and writes 9", "the model"]  # fmt: skip


@pytest.fixture
def engine(tiny_folder) -> Engine:
    return Engine(llmkit.load(tiny_folder), max_batch_size=4, max_queue=16)


def test_a_batched_forward_with_its_own_positions_per_row_equals_each_row_alone(make_model):
    """Rows at different positions in one call give the logits each gets alone (the model's per-row path)."""
    model = make_model()
    a, b = torch.tensor([[5, 9, 11, 3]]), torch.tensor([[8, 2]])
    with torch.inference_mode():
        alone = [model(x, torch.arange(x.shape[1]))[0, -1].clone() for x in (a, b)]
        model.setup_buffers(max_batch_size=2)
        model(a[:, :2], torch.arange(2)[None])  # a one-row batch writes the cache's row 0 only
        logits = model(torch.tensor([[11, 3], [8, 2]]), torch.tensor([[2, 3], [0, 1]]))[:, -1]
        # attending to the cache's first 4 positions only (the rows use 0..3): the same logits
        window = model(torch.tensor([[11, 3], [8, 2]]), torch.tensor([[2, 3], [0, 1]]), cache_len=4)[:, -1]
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], alone[1], rtol=1e-5, atol=1e-5)
    assert model.args.max_seq_len > 4
    torch.testing.assert_close(window, logits, rtol=1e-5, atol=1e-5)


def test_running_rows_and_arriving_prompts_in_one_forward_equal_their_own_forwards(make_model):
    """`forward_blocks`: two running rows' next tokens and two arriving prompts (in the cache rows after them) in
    one pass give the logits and cache entries each block gets in a forward of its own."""
    import copy

    model = make_model()
    model.setup_buffers(max_batch_size=4)
    g = torch.Generator().manual_seed(0)
    running = (torch.randint(0, 300, (2, 1), generator=g), torch.tensor([[4], [2]]))
    arriving = (torch.randint(0, 300, (2, 6), generator=g), torch.arange(6).expand(2, 6))
    with torch.inference_mode():
        model(torch.randint(0, 300, (2, 5), generator=g), torch.arange(5).expand(2, 5))  # the running rows' past
        alone, prompts_alone = copy.deepcopy(model), copy.deepcopy(model)
        got = model.forward_blocks([running, arriving], cache_len=16)
        want = [alone(*running, cache_len=16), prompts_alone(*arriving, cache_len=16)]  # prompts in rows 0 and 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(model.layers, prompts_alone.layers, strict=True):
        assert torch.equal(ours.attention.kv_cache.k_cache[2:, :, :6], theirs.attention.kv_cache.k_cache[:2, :, :6])


def test_a_step_compiled_for_any_batch_size_writes_the_cache_in_place(make_model):
    """Compiled with the batch size dynamic (as the GPU's batched decode graph is), the step writes each row's new
    key and value into the cache itself. Writing through a view of the cache's first B rows made inductor copy
    those rows out and back at every step: on the GPU, a quarter of a 16-row llama-2-7b step
    (benchmarks/engine_steps.py --profile). Logits within float32 rounding of eager's."""
    from torch._inductor.utils import run_and_get_code

    model = make_model()
    model.setup_buffers(max_batch_size=4)
    tokens, positions = torch.tensor([[5], [9], [2]]), torch.tensor([[3], [0], [7]])
    with torch.inference_mode():
        expected = model(tokens, positions).clone()
        model.setup_buffers(max_batch_size=4)
        for t in (tokens, positions):
            torch._dynamo.mark_dynamic(t, 0, min=2, max=4)
        step = torch.compile(lambda t, p: model(t, p), fullgraph=True, dynamic=False)
        logits, (code,) = run_and_get_code(step, tokens, positions)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    a = model.args
    rows_of_cache = f"{a.n_kv_heads}, {a.max_seq_len}, {a.head_dim}), "
    assert not [line for line in code.splitlines() if "empty_strided" in line and rows_of_cache in line]


def test_eight_greedy_requests_batched_equal_each_alone(tiny_folder, engine, monkeypatch):
    monkeypatch.setattr("llmkit.engine.CACHE_BLOCK", 8)  # steps attend to windows of 8, 16, ... cache positions
    reference = llmkit.load(tiny_folder)
    lengths = [30, 5, 17, 40, 1, 23, 12, 8]
    alone = [reference.generate(p, max_new_tokens=n, temperature=0) for p, n in zip(PROMPTS, lengths, strict=True)]
    requests = [Request(reference.encode_prompt(p), n, temperature=0) for p, n in zip(PROMPTS, lengths, strict=True)]
    steps, prefill = [], engine.prefill_step

    def recorded(blocks, cache_len):
        steps.append([tokens.shape for tokens, _ in blocks])
        return prefill(blocks, cache_len)

    engine.prefill_step = recorded
    run_to_completion(engine, requests)  # 8 requests through 4 rows: they join and leave between steps
    assert steps[0] == [(4, max(len(r.prompt_ids) for r in requests[:4]))]  # the first four in one forward, padded
    # the others arrive as rows free up, each prefilled in the forward that decodes the rows still running
    assert len(steps) > 1 and all(len(s) == 2 and s[0][1] == 1 and s[0][0] + s[1][0] <= 4 for s in steps[1:])
    assert [r.tokens for r in requests] == [a.tokens for a in alone]
    assert [r.text for r in requests] == [a.text for a in alone]
    assert engine.load()["active"] == 0 and engine.steps < sum(lengths)  # batched: fewer steps than tokens


def test_the_compiled_step_gives_the_eager_tokens(tiny_folder, engine):
    """`serve --compile` on a CPU: batches of 3, then 2 (eager, over the cache in use), then 1 (compiled) as
    requests finish; every request gets the tokens it gets alone, eager (greedy over logits within float32 rounding
    of eager's). The GPU's padded CUDA graphs: tests/test_gpu.py."""
    from llmkit.compile import batch_sizes, compile_batched_decode

    assert batch_sizes(4) == [1, 2, 4] and batch_sizes(6) == [1, 2, 4, 6] and batch_sizes(1) == [1]
    reference = llmkit.load(tiny_folder)
    work = list(zip(PROMPTS[:3], [30, 12, 21], strict=True))
    alone = [reference.generate(p, max_new_tokens=n, temperature=0) for p, n in work]
    engine.decode_step = compile_batched_decode(engine.llm, engine.max_batch_size)
    requests = [Request(reference.encode_prompt(p), n, temperature=0) for p, n in work]
    run_to_completion(engine, requests, timeout=120)
    assert [r.tokens for r in requests] == [a.tokens for a in alone]


def test_the_gpus_batch_graphs_compile_one_layer_per_window(make_model):
    """The GPU's batched decode (`compile_layer_rows`), here on the CPU: one graph per cache window whatever the
    batch size and however many layers, each step's logits within float32 rounding of eager's."""
    from llmkit.compile import compile_layer_rows

    model = make_model()
    model.setup_buffers(4)
    layer_rows, g = compile_layer_rows(model, torch.device("cpu"), 4), torch.Generator().manual_seed(5)
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        model(torch.randint(0, model.args.vocab_size, (4, 10), generator=g), torch.arange(10))
        for rows, window, compiled in [(2, 16, 1), (4, 16, 1), (3, 16, 1), (4, 32, 2), (2, 32, 2)]:
            tokens = torch.randint(0, model.args.vocab_size, (rows, 1), generator=g)
            positions = torch.arange(10, 10 + rows)[:, None]
            got = model(tokens, positions, cache_len=window, layer_step=layer_rows)
            torch.testing.assert_close(got, model(tokens, positions, cache_len=window), rtol=1e-4, atol=1e-4)
            assert counters["stats"]["unique_graphs"] - graphs == compiled
    assert model.args.n_layers > 1


def test_the_compiled_prefill_gives_the_eager_logits_and_tokens(tiny_folder, engine, monkeypatch):
    """`serve --compile` on a GPU compiles the prefill too (dynamic in running rows, prompts, length and cache
    window); the same graphs on the CPU: logits within float32 rounding of eager's for one prompt and several, a
    one-token prompt (padded to two inside) and longer ones, alone or after running rows, then the engine's greedy
    tokens equal each request's alone."""
    from llmkit.compile import compile_batched_prefill

    model = engine.model
    prefill = compile_batched_prefill(engine.llm)
    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(3)

    def block(rows: int, length: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, model.args.vocab_size, (rows, length), generator=g)
        return tokens, torch.arange(start, start + length).expand(rows, length)

    with torch.inference_mode():
        for running, rows, length, start in [(0, 1, 1, 0), (0, 3, 7, 0), (1, 1, 6, 4), (1, 2, 1, 0), (2, 1, 5, 0),
                                              (2, 2, 2, 9)]:  # fmt: skip
            blocks = [block(running, 1, 12)] * bool(running) + [block(rows, length, start)]
            compiled = [t.clone() for t in prefill(blocks, 32)]
            for got, want in zip(compiled, model.forward_blocks(blocks, 32), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    reference = llmkit.load(tiny_folder)
    work = list(zip(PROMPTS[2:8], [9, 14, 3, 20, 6, 11], strict=True))  # the last two join running rows
    alone = [reference.generate(p, max_new_tokens=n, temperature=0) for p, n in work]
    engine.prefill_step = prefill
    monkeypatch.setattr("llmkit.engine.CACHE_BLOCK", 8)  # windows below the whole cache, which runs eager
    requests = [Request(reference.encode_prompt(p), n, temperature=0) for p, n in work]
    run_to_completion(engine, requests, timeout=120)
    assert [r.tokens for r in requests] == [a.tokens for a in alone]
    assert counters["stats"]["unique_graphs"] == graphs, "a mix of rows compiled a graph while serving"


def test_a_prefill_that_fails_ends_the_arriving_requests_only(tiny_folder, engine):
    """A forward that fails (out of memory, say) while prefilling an arriving prompt beside running rows ends the
    arriving request with the error; the running row takes its step alone and gets the tokens it gets alone."""
    reference = llmkit.load(tiny_folder)
    alone = reference.generate(PROMPTS[0], max_new_tokens=12, temperature=0)
    prefill = engine.prefill_step

    def failing(blocks, cache_len):
        if len(blocks) == 2:  # running rows and arriving prompts
            raise RuntimeError("out of memory (a test)")
        return prefill(blocks, cache_len)

    engine.prefill_step = failing
    running = Request(reference.encode_prompt(PROMPTS[0]), 12, temperature=0)
    engine.submit(running)
    engine.step()  # prefilled alone
    late = Request(reference.encode_prompt(PROMPTS[1]), 5, temperature=0)
    run_to_completion(engine, [late])
    assert late.finish_reason == "error" and running.finish_reason is None
    while running.finish_reason is None:
        engine.step()
    assert running.finish_reason == "length" and running.tokens == alone.tokens


def test_a_seeded_request_gets_the_same_tokens_alone_or_batched(tiny_folder, engine):
    reference = llmkit.load(tiny_folder)
    alone = reference.generate(PROMPTS[0], max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    seeded = Request(reference.encode_prompt(PROMPTS[0]), 30, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    others = [Request(reference.encode_prompt(p), 25, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS[1:4])]
    run_to_completion(engine, [others[0], seeded, *others[1:]])
    assert seeded.tokens == alone.tokens and seeded.text == alone.text


def test_stop_strings_cut_the_text_and_are_never_sent(tiny_folder, engine):
    reference = llmkit.load(tiny_folder)
    full = reference.generate(PROMPTS[1], max_new_tokens=40, temperature=0).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    sent = []
    request = Request(reference.encode_prompt(PROMPTS[1]), 40, temperature=0, stop=[stop], on_update=sent.append)
    run_to_completion(engine, [request])
    assert request.text == full[: full.find(stop)] == "".join(u.text for u in sent)
    assert sent[-1].finish_reason == "stop"
    assert held_back("abc</", ["</s>"]) == 2 and held_back("abc", ["</s>"]) == 0


def test_a_cancelled_request_frees_its_row_at_the_next_step(tiny_folder, engine):
    ids = llmkit.load(tiny_folder).encode_prompt(PROMPTS[0])
    requests = [Request(ids, 100, temperature=0, ignore_eos=True) for _ in range(3)]
    for r in requests:
        engine.submit(r)
    engine.step()
    engine.step()
    assert engine.load()["active"] == 3
    made = len(requests[1].tokens)
    requests[1].cancel()
    engine.step()
    assert engine.load()["active"] == 2 and requests[1].finish_reason == "cancelled"
    assert len(requests[1].tokens) == made  # it got no token after it was cancelled
    assert len(requests[0].tokens) == made + 1  # the others went on


def test_a_full_queue_refuses_and_bad_options_are_one_line(tiny_folder):
    llm = llmkit.load(tiny_folder)
    engine = Engine(llm, max_batch_size=1, max_queue=1)
    ids = llm.encode_prompt("the model")
    engine.submit(Request(ids, 5))
    engine.submit(Request(ids, 5))  # the free row's request, then one waiting
    with pytest.raises(QueueFull):
        engine.submit(Request(ids, 5))
    with pytest.raises(LLMKitError, match="top-p must be in"):
        engine.submit(Request(ids, 5, top_p=0))
    with pytest.raises(LLMKitError, match="the prompt is 128 tokens"):
        engine.submit(Request([1] * 128, 5))
