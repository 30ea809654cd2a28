"""Chat: a conversation -> the prompt format the model was trained on -> its reply.

An instruction-tuned model saw its conversations laid out one exact way, which its tokenizer_config.json keeps as
a Jinja `chat_template`. `render` runs that template the way transformers' `apply_chat_template` does (same
sandbox, options and helpers), so the prompt is the one the model knows. A model without a template gets a
built-in one picked from its special tokens: Llama 3, ChatML, or Llama 2's [INST].
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.errors import LLMKitError
from llmkit.files import read_json_object
from llmkit.generate import LLM, Generation
from llmkit.gguf import GGUFTokenizer
from llmkit.tokenizer import Tokenizer, load_tokenizer

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

# Meta-Llama-3-8B-Instruct's template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama-2-7b-chat-hf's template: each user turn in [INST] ... [/INST], the system prompt inside the first one.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# ChatML, the <|im_start|>role ... <|im_end|> format of Qwen and SmolLM2.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: object, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: Jinja's own escapes <, > and & for HTML, which would change tool descriptions."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LLMKitError(f"the chat template is not valid Jinja ({e.message}, line {e.lineno})") from None


def render(
    messages: Sequence[Message],
    template: str,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text of a conversation, exactly as `apply_chat_template(..., tokenize=False)` renders it.

    A token given as None stays undefined in the template, as transformers leaves a missing one (Qwen has no BOS).
    """
    specials = {
        name: value for name, value in (("bos_token", bos_token), ("eos_token", eos_token)) if value is not None
    }
    try:
        return _compile(template).render(
            messages=list(messages), tools=None, documents=None, add_generation_prompt=add_generation_prompt, **specials
        )
    except jinja2.TemplateError as e:
        raise LLMKitError(f"the chat template refused this conversation: {e}") from None


def _tokenizer_config(folder: Path) -> dict:
    return read_json_object(folder / "tokenizer_config.json", "tokenizer", optional=True)


def _is_token(tokenizer: Tokenizer, text: str) -> bool:
    return len(tokenizer.encode(text, bos=False)) == 1


def template_for(source: Tokenizer | str | Path) -> str:
    """The model's own chat template (a GGUF file's tokenizer.chat_template; chat_template.jinja, or
    tokenizer_config.json's chat_template, beside the tokenizer or in the model folder), else the built-in template
    that its special tokens point to."""
    return chosen_template(source)[0]


def chosen_template(source: Tokenizer | str | Path) -> tuple[str, str]:
    """`template_for`'s template, and where it comes from in words, to tell the user (a base model has no template
    of its own, and a built-in one is a guess)."""
    if isinstance(source, GGUFTokenizer) and source.chat_template:
        return source.chat_template, f"the chat template in {source.path.name}"
    path = source.path if isinstance(source, Tokenizer) else Path(source)
    folder = path if path.is_dir() else path.parent
    if (folder / "chat_template.jinja").is_file():
        try:
            return (folder / "chat_template.jinja").read_text(encoding="utf-8"), "the model's chat_template.jinja"
        except (OSError, UnicodeDecodeError) as e:
            raise LLMKitError(f"cannot read {folder / 'chat_template.jinja'} as UTF-8 text ({e}); fix it") from None
    template = _tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):  # several named templates, e.g. "default" and "tool_use"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise LLMKitError(f"{folder / 'tokenizer_config.json'}: chat_template is not text; fix it")
    if template:
        return template, "the chat_template in the model's tokenizer_config.json"
    tokenizer = source if isinstance(source, Tokenizer) else load_tokenizer(source)
    none = "the model has no chat template of its own"
    if _is_token(tokenizer, "<|start_header_id|>"):
        return LLAMA3_TEMPLATE, f"Llama 3's, built in: {none}, and its tokenizer has Llama 3's header tokens"
    if _is_token(tokenizer, "<|im_start|>"):
        return CHATML_TEMPLATE, f"ChatML, built in: {none}, and its tokenizer has <|im_start|>"
    return LLAMA2_TEMPLATE, f"Llama 2's [INST], built in: {none} (a base model may follow no chat format well)"


def special_tokens(tokenizer: Tokenizer) -> tuple[str | None, str | None]:
    """The bos_token and eos_token texts a template writes: a GGUF file's, tokenizer_config.json's, else the
    tokenizer's own."""
    if isinstance(tokenizer, GGUFTokenizer):  # its bos_token is set even when it adds no BOS, as in transformers
        return tokenizer.bos_token, tokenizer.eos_token
    config = _tokenizer_config(tokenizer.path.parent)

    def text(name: str, id: int | None) -> str | None:
        if name in config:  # a string, an AddedToken dict, or null for "none"
            value = config[name]
            return value.get("content") if isinstance(value, dict) else value
        return tokenizer.piece(id) if id is not None else None

    return text("bos_token", tokenizer.bos_id), text("eos_token", tokenizer.eos_ids[0] if tokenizer.eos_ids else None)


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Message], template: str | None = None, add_generation_prompt: bool = True
) -> list[int]:
    """The token ids of the rendered conversation (BOS included, as the template writes it).

    Hugging Face and tiktoken tokenizers read special-token text such as "<|eot_id|>" as the token. SentencePiece
    and llama2.c read "<s>" as three characters, so for them BOS and EOS are cut out of the text and their ids put in.
    """
    bos, eos = special_tokens(tokenizer)
    text = render(messages, template or template_for(tokenizer), bos, eos, add_generation_prompt)
    if tokenizer.kind in ("huggingface", "tiktoken"):
        return tokenizer.encode(text, bos=False)
    ids_of = {bos: tokenizer.bos_id, eos: tokenizer.eos_ids[0] if tokenizer.eos_ids else None}
    ids_of = {marker: id for marker, id in ids_of.items() if marker and id is not None}
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, ids_of)) + ")", text) if ids_of else [text]:
        if part in ids_of:
            ids.append(ids_of[part])
        elif part:
            ids += tokenizer.encode(part, bos=False)
    return ids


def drop_oldest_turns(
    tokenizer: Tokenizer, messages: Sequence[Message], template: str, budget: int
) -> tuple[list[Message], list[int]]:
    """The conversation less its oldest turns, as many as must go for the prompt to fit in `budget` tokens, and
    the prompt's ids. A leading system message stays, and so does the last turn: it holds the question."""
    system = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(system) :])
    while True:
        ids = encode_chat(tokenizer, system + turns, template)
        next_turn = next((i for i, message in enumerate(turns) if i > 0 and message["role"] == "user"), None)
        if len(ids) <= budget or next_turn is None:
            return system + turns, ids
        turns = turns[next_turn:]  # a turn: a user message and the replies to it


def _notice(text: str) -> None:
    print(text, file=sys.stderr)


def _prompt(
    llm: LLM, messages: Sequence[Message], template: str | None, max_new_tokens: int, on_notice: Callable[[str], None]
) -> tuple[list[Message], list[int]]:
    """Fit the conversation in the context, leaving room for a reply of max_new_tokens (up to a quarter of it)."""
    budget = llm.max_seq_len - min(max_new_tokens, llm.max_seq_len // 4)
    kept, ids = drop_oldest_turns(llm.tokenizer, messages, template or template_for(llm.tokenizer), budget)
    if len(ids) > budget:  # the last message (with the system prompt) is too long on its own
        raise LLMKitError(
            f"the message is too long: its prompt is {len(ids)} tokens, and the {llm.max_seq_len}-token context "
            f"keeps {llm.max_seq_len - budget} of its tokens for the reply; shorten it"
        )
    if len(kept) < len(messages):
        on_notice(
            f"[the {len(messages) - len(kept)} oldest messages no longer fit in the {llm.max_seq_len}-token "
            "context and were left out]"
        )
    return kept, ids


def chat(
    llm: LLM,
    messages: Sequence[Message],
    *,
    template: str | None = None,
    max_new_tokens: int = 256,
    on_notice: Callable[[str], None] = _notice,
    **options,
) -> Generation:
    """Reply to a conversation, a list of {"role": ..., "content": ...} dicts, in the model's chat format.

    `options` are `LLM.generate`'s (temperature, top_k, top_p, seed, stop, on_text). When the conversation no
    longer fits in the context, its oldest turns are left out and `on_notice` is told.
    """
    _, ids = _prompt(llm, messages, template, max_new_tokens, on_notice)
    return llm.generate(ids, max_new_tokens=max_new_tokens, **options)


def chat_loop(
    llm: LLM,
    system: str | None = None,
    *,
    template: str | None = None,
    read: Callable[[str], str] = input,
    max_new_tokens: int = 256,
    **options,
) -> None:
    """The interactive `llmkit chat`: each reply streams, then its statistics line (on stderr).
    /reset starts the conversation over (the system prompt stays); /quit or the end of input leaves."""
    template, origin = (template, "the template given") if template else chosen_template(llm.tokenizer)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    print(f"chatting with {llm.name}; /reset starts over, /quit leaves\n[chat format: {origin}]", file=sys.stderr)
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            print()
            return
        except UnicodeDecodeError:  # the terminal sent bytes that are not UTF-8
            _notice("[that message is not valid UTF-8 text; type it again]")
            continue
        if line == "/quit":
            return
        if line == "/reset":
            history = list(start)
            print("[conversation reset]", file=sys.stderr)
            continue
        if not line:
            continue
        try:
            if not line.isascii():
                line.encode("utf-8")  # lone surrogates: bytes that were not UTF-8
            history, ids = _prompt(llm, [*history, {"role": "user", "content": line}], template, max_new_tokens,
                                   _notice)  # fmt: skip
        except UnicodeEncodeError:
            _notice("[that message is not valid UTF-8 text; type it again]")
            continue
        except LLMKitError as e:  # the message can't be sent; the conversation so far stays
            _notice(f"[{e}]")
            continue
        out = llm.generate(
            ids, max_new_tokens=max_new_tokens, on_text=lambda piece: print(piece, end="", flush=True), **options
        )
        print()
        print(out.stats, file=sys.stderr)
        history.append({"role": "assistant", "content": out.text})
