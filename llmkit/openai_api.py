"""OpenAI's chat and completions API, as data: requests checked into engine requests, and the response bodies.

Requests are checked strictly (a string where a number belongs is an error, not a conversion) and every problem is
an `ApiError`: the HTTP status and OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, with a
message that names the field and what to send instead. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

import re
import secrets
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from llmkit.chat import encode_chat
from llmkit.engine import Request
from llmkit.errors import LLMKitError
from llmkit.generate import LLM

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for "system"
TYPE_TAG = re.compile(r"str|int|float|bool|\w+\[.*\]|function-.*|[A-Z]\w*")
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 500: "server_error", 503: "server_error"}  # fmt: skip


class ApiError(Exception):
    """A request the server refuses: status, message, and the field (`param`) and `code` OpenAI's body carries."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}  # fmt: skip


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class Common(Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None  # an extension, as vLLM's: -1 or 0 for no cut
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False  # an extension, as vLLM's: run to max_tokens (benchmarks)


class ChatRequest(Common):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionRequest(Common):
    prompt: str | list[str]


def parse(kind: type[Common], data: object) -> Common:
    """The request body as `kind`, or a 400 naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, not a JSON {type(data).__name__}")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        # the location without the names pydantic gives the branches of a union ("str", "list[str]")
        parts = [p for p in first["loc"] if isinstance(p, int) or not TYPE_TAG.fullmatch(p)]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
        got = "" if first["type"] == "missing" else f" (got {first['input']!r:.60})"
        raise ApiError(400, f"{param}: {first['msg'].lower()}{got}", param=param or None) from None


def chat_prompt(llm: LLM, body: ChatRequest, template: str) -> list[int]:
    """The conversation's token ids, laid out in the model's chat template as `llmkit chat` lays it out."""
    if not body.messages:
        raise ApiError(400, "messages is empty; send at least one message, e.g. {\"role\": \"user\", ...}",
                       param="messages")  # fmt: skip
    messages = []
    for i, m in enumerate(body.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role is {m.role!r}; use system, user or assistant",
                           param=f"messages[{i}].role")  # fmt: skip
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    try:
        return encode_chat(llm.tokenizer, messages, template)
    except LLMKitError as e:
        raise ApiError(400, str(e), param="messages") from None


def completion_prompt(llm: LLM, body: CompletionRequest) -> list[int]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, f"prompt holds {len(prompts)} prompts; send one per request", param="prompt")
    try:
        return llm.tokenizer.encode(prompts[0], bos=True)
    except UnicodeEncodeError:
        raise ApiError(400, "prompt is not valid UTF-8 text", param="prompt") from None


def engine_request(body: Common, prompt_ids: list[int], max_seq_len: int) -> Request:
    """The engine request for a checked body, or a 400 for options out of range or a prompt too long."""
    which = "messages" if isinstance(body, ChatRequest) else "prompt"
    if len(prompt_ids) >= max_seq_len:
        raise ApiError(400, f"the {which} is {len(prompt_ids)} tokens but the model's context holds {max_seq_len}; "
                       "shorten it", param=which, code="context_length_exceeded")  # fmt: skip
    room = max_seq_len - len(prompt_ids)
    name, max_tokens = "max_tokens", body.max_tokens
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        name, max_tokens = "max_completion_tokens", body.max_completion_tokens
    if max_tokens is not None and not 1 <= max_tokens <= room:
        raise ApiError(400, f"{name} is {max_tokens}; with this {which} of {len(prompt_ids)} tokens the "
                       f"{max_seq_len}-token context leaves room for 1 to {room}", param=name,
                       code="context_length_exceeded" if max_tokens > room else None)  # fmt: skip
    if body.n != 1:
        raise ApiError(400, f"n is {body.n}; this server makes one choice per request (n=1)", param="n")
    if not 0 <= body.temperature <= 2:
        raise ApiError(400, f"temperature is {body.temperature}; use 0 (greedy) to 2", param="temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise ApiError(400, f"top_p is {body.top_p}; use a number in (0, 1]", param="top_p")
    if body.top_k is not None and body.top_k < -1:
        raise ApiError(400, f"top_k is {body.top_k}; use 1 or more, or -1 for no cut", param="top_k")
    if body.seed is not None and not -(2**63) <= body.seed < 2**64:
        raise ApiError(400, f"seed is {body.seed}; use a 64-bit integer", param="seed")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if any(not s for s in stop):
        raise ApiError(400, "stop holds an empty string; give the text to stop at", param="stop")
    return Request(prompt_ids, max_tokens or room, temperature=body.temperature, top_p=body.top_p,
                   top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                   seed=body.seed % 2**64 if body.seed is not None else None,  # a Generator takes 0 to 2**64 - 1
                   stop=stop, ignore_eos=body.ignore_eos)  # fmt: skip


# ---- responses --------------------------------------------------------------------------------------------------


class Reply:
    """The id, creation time and model that every body and chunk of one response carries."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice |= {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {**self._head(False), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False,
              with_usage: bool = False) -> dict:  # fmt: skip
        """A streamed piece: the first chat delta carries the role, the last the finish reason."""
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]} | ({"usage": None} if with_usage else {})

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def model_list(names: Sequence[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "llmkit"}
                                       for n in names]}  # fmt: skip
