"""`llmkit serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of the continuous-batching engine.

GET /v1/models, POST /v1/chat/completions and /v1/completions (streamed as server-sent events ending in
`data: [DONE]`), GET /health, and GET / a one-page chat shipped in the package. Every refusal is OpenAI's error
body with its status. A client that goes away cancels its request, which frees its row before the next step.
SIGTERM stops accepting, lets what is in flight finish (cancelling it after a grace period) and exits 0.
"""

import asyncio
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llmkit import openai_api as api
from llmkit.chat import template_for
from llmkit.engine import Engine, QueueFull, Update
from llmkit.engine import Request as Job
from llmkit.errors import LLMKitError

MAX_BODY_BYTES = 1_000_000  # a request body larger than this is a 413: no prompt that fits a context is near it
GRACE_SECONDS = 10  # after SIGTERM, how long requests in flight may take to finish before they are cancelled


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app serving `engine`'s model under its name; starting the app starts the engine, stopping stops it."""
    llm, started = engine.llm, int(time.time())
    template = template_for(llm.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(api.ApiError)
    async def api_error(request: Request, e: api.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(api.ApiError(e.status_code, message).body(), status_code=e.status_code)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest takes as long whatever the token, so timing tells an attacker nothing about the key
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            what = "no API key was sent" if not given else "the API key is wrong"
            raise api.ApiError(401, f"{what}; send the server's --api-key as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")  # fmt: skip

    async def read_json(request: Request) -> object:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise api.ApiError(413, f"the body is {declared} bytes; the limit is {max_body_bytes}", code="too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise api.ApiError(413, f"the body is over the limit of {max_body_bytes} bytes", code="too_large")
        try:
            return json.loads(body)
        except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
            raise api.ApiError(400, f"the body is not valid JSON ({e}); send a JSON object") from None

    def check_model(body: api.Common) -> None:
        if body.model is not None and body.model != llm.name:
            raise api.ApiError(404, f"the model {body.model!r} does not exist here; this server serves {llm.name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    async def respond(request: Request, body: api.Common, prompt_ids: list[int], chat: bool):
        job = api.engine_request(body, prompt_ids, llm.max_seq_len)
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(update: Update) -> None:  # called in the engine's thread
            try:
                loop.call_soon_threadsafe(updates.put_nowait, update)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                job.cancel()

        job.on_update = deliver
        try:
            engine.submit(job)
        except QueueFull as e:
            raise api.ApiError(503, f"the server is busy ({e}); retry shortly", code="queue_full") from None
        except LLMKitError as e:
            raise api.ApiError(400, str(e)) from None
        reply = api.Reply(chat, llm.name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(job, updates, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        text = []
        try:
            while True:
                try:
                    update = await asyncio.wait_for(updates.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                text.append(update.text)
                if update.finish_reason:
                    break
        finally:
            if job.finish_reason is None:  # the client left (or the server stops): free the row
                job.cancel()
        check_finished(update)
        return reply.body("".join(text), update.finish_reason, api.usage(len(prompt_ids), update.completion_tokens))

    async def stream(job: Job, updates: asyncio.Queue, reply: api.Reply, include_usage: bool):
        def event(data: dict | str) -> str:
            return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

        try:
            if reply.chat:
                yield event(reply.chunk(None, first=True, with_usage=include_usage))
            while True:
                update = await updates.get()
                while not updates.empty() and not update.finish_reason:  # behind the engine: one event for all
                    later = updates.get_nowait()
                    update = replace(later, text=update.text + later.text)
                try:
                    check_finished(update)
                except api.ApiError as e:
                    yield event(e.body())
                    return
                if update.text:
                    yield event(reply.chunk(update.text, with_usage=include_usage))
                if update.finish_reason:
                    yield event(reply.chunk(None, update.finish_reason, with_usage=include_usage))
                    if include_usage:
                        yield event(reply.usage_chunk(api.usage(len(job.prompt_ids), update.completion_tokens)))
                    yield event("[DONE]")
                    return
        finally:  # the client disconnected (the response task is cancelled) or the stream ended
            if job.finish_reason is None:
                job.cancel()

    def check_finished(update: Update) -> None:
        if update.finish_reason == "error":
            raise api.ApiError(500, update.error or "the model failed")
        if update.finish_reason == "cancelled":
            raise api.ApiError(503, "the server is shutting down; retry on another", code="shutting_down")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": llm.name, **engine.load()}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return (files("llmkit") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return api.model_list([llm.name], started)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        body = api.parse(api.ChatRequest, await read_json(request))
        check_model(body)
        return await respond(request, body, api.chat_prompt(llm, body, template), chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        body = api.parse(api.CompletionRequest, await read_json(request))
        check_model(body)
        return await respond(request, body, api.completion_prompt(llm, body), chat=False)

    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """Serve until SIGINT or SIGTERM. The socket is bound here, so a port in use is one clear error."""
    if api_key is not None and not api_key.strip():
        raise LLMKitError("--api-key is empty; give the key clients must send, or leave the option out")
    sock = listening_socket(host, port)
    config = uvicorn.Config(create_app(engine, api_key), log_level="warning", timeout_graceful_shutdown=GRACE_SECONDS)
    server = uvicorn.Server(config)
    if on_ready:
        on_ready(f"http://{host if sock.family == socket.AF_INET else f'[{host}]'}:{sock.getsockname()[1]}")
    # uvicorn handles SIGTERM with a graceful shutdown, then raises the signal again for the handler it found:
    # with this one in place that does nothing, and the server exits 0 as a service manager expects
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound: a port in use is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # the protocol named: asyncio turns Nagle's algorithm off only on sockets that say TCP; with it on, a
    # keep-alive client's first tokens waited ~40 ms for a delayed acknowledgement
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LLMKitError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    return sock


# ---- the server as a child process: tests, benchmarks and notebooks talk to it over loopback ------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`llmkit serve ARGS` in a child process on a free loopback port; a context manager that stops it with SIGTERM.

    `url` is the server's base URL, once /health answers.
    """

    def __init__(self, args: Sequence[str] = (), timeout: float = 120, log: str | Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "llmkit", "serve", "--port", str(self.port), *map(str, args)]
        self.log = open(log or os.devnull, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                seen = f"; its output is in {log}" if log else ""
                raise LLMKitError(f"the server did not start in {timeout:.0f} s (status {self.process.returncode})"
                                  f"{seen}; command: {' '.join(command)}")  # fmt: skip
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
            return json.loads(r.read())

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; the exit status (a kill after `timeout` gives -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
