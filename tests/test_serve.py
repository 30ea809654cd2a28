"""`llmkit serve` over loopback, checked with the official `openai` client and raw HTTP: replies equal the same
request run alone through `LLM.generate`, streams end in [DONE], and refusals are OpenAI's errors with their status."""

import asyncio
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import llmkit
from llmkit.chat import chat
from llmkit.cli import build_parser, main
from llmkit.serve import ServerProcess, listening_socket

KEY = "test-key-5e1f"
PROMPTS = ["the model reads", "the text number 12 and", "writes", "the model reads the text number 7",
           "words", "the text", "number 3 and writes 9", "the model"]  # fmt: skip
QUESTION = [{"role": "user", "content": "the model reads the text"}]


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    """The tests' tiny model served with an API key and 8 rows."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(["--checkpoint-path", tiny_folder, "--api-key", KEY, "--max-batch-size", 8], log=log) as s:
        yield s
        assert s.healthy(), log.read_text()  # it stayed up through every test


@pytest.fixture(scope="module")
def reference(tiny_folder) -> llmkit.LLM:
    return llmkit.load(tiny_folder)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_chat_equals_llmkit_chat(client, reference):
    reply = client.chat.completions.create(model="model", messages=QUESTION, max_tokens=12, temperature=0)
    alone = chat(reference, QUESTION, max_new_tokens=12, temperature=0)
    assert reply.choices[0].message.content == alone.text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("length" if len(alone.tokens) == 12 else "stop")
    assert reply.usage.completion_tokens == len(alone.tokens) and reply.usage.prompt_tokens == alone.stats.prompt_tokens
    assert reply.object == "chat.completion" and reply.model == "model" and reply.id.startswith("chatcmpl-")


def test_chat_streaming_gives_the_same_text_in_pieces(client):
    whole = client.chat.completions.create(model="model", messages=QUESTION, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="model", messages=QUESTION, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content and len([p for p in pieces if p]) > 1
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [whole.choices[0].finish_reason] and chunks[-2].choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_stop_strings_equal_llm_generate(client, reference):
    alone = reference.generate(PROMPTS[1], max_new_tokens=30, temperature=0)
    reply = client.completions.create(model="model", prompt=PROMPTS[1], max_tokens=30, temperature=0)
    assert reply.choices[0].text == alone.text and reply.usage.completion_tokens == len(alone.tokens)
    stop = alone.text[10:13]
    cut = client.completions.create(model="model", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == reference.generate(PROMPTS[1], 30, temperature=0, stop=[stop]).text
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_a_seeded_sample_repeats(client, reference):
    alone = reference.generate(PROMPTS[0], max_new_tokens=16, temperature=0.9, top_k=40, seed=11)
    replies = [client.completions.create(model="model", prompt=PROMPTS[0], max_tokens=16, temperature=0.9,
                                         seed=11, extra_body={"top_k": 40}) for _ in range(2)]  # fmt: skip
    assert [r.choices[0].text for r in replies] == [alone.text] * 2


def test_the_model_list(client):
    assert [m.id for m in client.models.list()] == ["model"]


def test_eight_concurrent_greedy_requests_equal_each_alone(server, reference):
    lengths = [30, 5, 17, 40, 1, 23, 12, 8]
    alone = [reference.generate(p, max_new_tokens=n, temperature=0) for p, n in zip(PROMPTS, lengths, strict=True)]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

    async def all_at_once():
        return await asyncio.gather(*(client.completions.create(model="model", prompt=p, max_tokens=n, temperature=0)
                                      for p, n in zip(PROMPTS, lengths, strict=True)))  # fmt: skip

    steps = server.health()["steps"]
    replies = asyncio.run(all_at_once())
    assert [r.choices[0].text for r in replies] == [a.text for a in alone]
    assert [r.usage.completion_tokens for r in replies] == [len(a.tokens) for a in alone]
    assert server.health()["steps"] - steps < sum(lengths)  # they shared decode steps


@pytest.mark.parametrize(("options", "says"), [
    ({"n": 2}, "n is 2"),
    ({"max_tokens": -1}, "max_tokens is -1"),
    ({"max_tokens": 10**6}, "max_tokens is 1000000"),
    ({"messages": []}, "messages is empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role is 'robot'"),
    ({"messages": [{"role": "user", "content": "the text " * 100}]}, "but the model's context holds 128"),
    ({"temperature": 3}, "temperature is 3"),
    ({"top_p": 0}, "top_p is 0"),
])  # fmt: skip
def test_bad_requests_are_the_clients_bad_request_error(client, options, says):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": "model", "messages": QUESTION, **options})
    assert caught.value.status_code == 400 and says in caught.value.message


def test_unknown_model_and_wrong_key_are_the_clients_errors(server, client):
    with pytest.raises(openai.NotFoundError, match="'gpt-9' does not exist here"):
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="the API key is wrong") as caught:
        wrong.models.list()
    assert caught.value.code == "invalid_api_key"


def post(server, path: str, content: bytes | str, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(("content", "status", "param", "says"), [
    (b'{"messages": [', 400, None, "not valid JSON"),
    (b"\xff\xfe", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object, not a JSON list"),
    (b'{"messages": "hi"}', 400, "messages", "messages: input should be a valid list"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 400, "max_tokens", "valid integer"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream", "valid boolean"),
    (b'{"messages": [{"role": "user", "content": "x"}], "pad": "' + b"x" * 1_100_000 + b'"}', 413, None, "limit"),
])  # fmt: skip
def test_malformed_bodies_get_openais_error_shape(server, content, status, param, says):
    response = post(server, "/v1/chat/completions", content)
    error = response.json()["error"]
    assert response.status_code == status and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and says in error["message"] and error["type"] == "invalid_request_error"


def test_a_missing_key_is_401_and_health_and_page_need_none(server):
    response = post(server, "/v1/completions", json.dumps({"prompt": "the", "max_tokens": 2}), key=None)
    assert response.status_code == 401 and "no API key was sent" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "http" not in page.text.lower()


def test_raw_server_sent_events_end_with_done(server):
    body = {"model": "model", "prompt": PROMPTS[2], "max_tokens": 10, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])
    data = [e.removeprefix("data: ") for e in events[:-1]]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def test_a_bounded_load_leaks_no_row_and_no_memory(server):
    """200 requests from 32 concurrent clients, twice: every one finishes properly, every row comes back free and
    the server's resident memory stays flat between the rounds."""

    async def round_of(n: int = 200, clients: int = 32) -> list:
        todo = iter(range(n))
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)  # one per event loop

        async def one_client() -> list:
            replies = []
            for i in todo:
                replies.append(await client.completions.create(
                    model="model", prompt=PROMPTS[i % 8], max_tokens=8, temperature=0.8, seed=i))
            return replies

        return [r for replies in await asyncio.gather(*(one_client() for _ in range(clients))) for r in replies]

    def resident_kb() -> int:
        status = open(f"/proc/{server.process.pid}/status").read()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))

    sizes = []
    for _ in range(2):
        replies = asyncio.run(round_of())
        assert len(replies) == 200
        for r in replies:
            reason, n = r.choices[0].finish_reason, r.usage.completion_tokens
            assert (reason == "length" and n == 8) or (reason == "stop" and n < 8), (reason, n)
        load = server.health()
        assert load["active"] == 0 and load["queued"] == 0, load
        sizes.append(resident_kb())
    assert sizes[1] - sizes[0] < 20_000, f"resident memory grew from {sizes[0]} kB to {sizes[1]} kB"


# ---- one row, one waiting place: a full queue, a client that leaves, SIGTERM with a request in flight ----------


@pytest.fixture
def narrow_server(tmp_path):
    """The kit's default model (slow enough to interrupt) with one row and one waiting place."""
    with ServerProcess(["--max-batch-size", 1, "--max-queue", 1], log=tmp_path / "server.log") as s:
        yield s


def long_stream(client: httpx.Client, server, max_tokens: int = 300) -> httpx.Response:
    """A streamed completion of `max_tokens` (the client must outlive it: closing the client closes the stream)."""
    body = {"prompt": "The built-in function", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    return client.send(httpx.Request("POST", f"{server.url}/v1/completions", json=body), stream=True)


def test_a_full_queue_is_503_and_a_client_that_leaves_frees_its_row(narrow_server):
    client, other = httpx.Client(timeout=60), httpx.Client(timeout=60)
    running = long_stream(client, narrow_server)
    lines = running.iter_lines()  # kept: dropping the iterator would close the stream
    next(lines)  # it has its row
    pool = ThreadPoolExecutor(1)
    waiting = pool.submit(lambda: long_stream(other, narrow_server, 5).read())  # it starts once it has a row
    deadline = time.monotonic() + 10
    while narrow_server.health()["queued"] < 1:
        assert time.monotonic() < deadline, "the second request never showed up in the queue"
        time.sleep(0.02)
    refused = post(narrow_server, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}), key=None)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.InternalServerError, match="the server is busy"):
        openai.OpenAI(base_url=f"{narrow_server.url}/v1", api_key="none", max_retries=0).completions.create(
            model="pydoc-lm", prompt="x", max_tokens=2)

    steps = narrow_server.health()["steps"]
    running.close()  # the client goes away mid-stream
    assert b"[DONE]" in waiting.result(timeout=60)  # the row it freed served the waiting request
    pool.shutdown()
    client.close()
    other.close()
    load = narrow_server.health()
    assert load["active"] == 0 and load["steps"] - steps < 300 - 10  # the left request did not run to its end


def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(narrow_server):
    with httpx.Client(timeout=60) as client:
        running = long_stream(client, narrow_server, 40)
        lines = running.iter_lines()
        next(lines)
        narrow_server.process.send_signal(signal.SIGTERM)
        assert [line for line in lines if line][-1] == "data: [DONE]"  # it ran to its end
    assert narrow_server.process.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{narrow_server.url}/health")


# ---- the command line -------------------------------------------------------------------------------------------


def test_the_servers_connections_send_each_event_at_once():
    """Connections accepted on the server's socket, by asyncio as uvicorn accepts them, have Nagle's algorithm off:
    with it on, a streamed event waits for the client's delayed acknowledgement of the one before."""

    async def accept_one() -> int:
        sock = listening_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        async with await asyncio.start_server(handle, sock=sock):
            _, writer = await asyncio.open_connection(*sock.getsockname())
            nodelay = await asyncio.wait_for(seen, 10)
            writer.close()
        return nodelay

    assert asyncio.run(accept_one()) == 1


def test_serve_listens_on_this_machine_only_by_default():
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--max-batch-size", "0"], ["--api-key", " "], "busy"])
def test_serve_refuses_bad_options_in_one_line(capsys, argv):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = ["--port", str(busy.getsockname()[1])] if argv == "busy" else argv
        assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmkit: error: ") and "Traceback" not in err


def test_bench_serve_measures_each_level_and_keeps_the_servers_log(tiny_folder, tmp_path):
    """`llmkit bench-serve` on the tiny model: one row per concurrency level, every request's tokens counted, the
    started server's output in --server-log; a server that can't start names its log in the one-line error."""
    from llmkit.errors import LLMKitError
    from llmkit.serve_bench import bench_serve

    log = tmp_path / "server.log"
    rows = bench_serve(["--checkpoint-path", tiny_folder, "--max-batch-size", 2], concurrencies=[1, 2],
                       max_tokens=4, requests=2, server_log=log)  # fmt: skip
    assert [(r["concurrency"], r["errors"], r["output_tokens"]) for r in rows] == [(1, 0, 8), (2, 0, 8)]
    assert "serving" in log.read_text()
    with pytest.raises(LLMKitError, match=f"did not start.*its output is in {tmp_path / 'bad.log'}"):
        bench_serve(["--checkpoint-path", tmp_path / "missing"], server_log=tmp_path / "bad.log")
    assert "missing" in (tmp_path / "bad.log").read_text()
