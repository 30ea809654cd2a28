"""Chat prompts rendered exactly as transformers renders them, history trimming, and the interactive loop."""

# ruff: noqa: E501 (the models' chat templates are copied verbatim, long lines included)

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmkit.chat import (
    CHATML_TEMPLATE,
    LLAMA2_TEMPLATE,
    LLAMA3_TEMPLATE,
    chat,
    chat_loop,
    drop_oldest_turns,
    encode_chat,
    render,
    special_tokens,
    template_for,
)
from llmkit.errors import LLMKitError
from llmkit.generate import Generation, Stats
from llmkit.tokenizer import load_tokenizer

# meta-llama/Llama-3.2-1B-Instruct's chat_template (tokenizer_config.json), verbatim.
LLAMA32_INSTRUCT = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-0.5B-Instruct's chat_template (tokenizer_config.json), verbatim.
QWEN25_INSTRUCT = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

SYSTEM = {"role": "system", "content": "  You are terse.  "}
TURNS = [
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "  What is the cat doing?\n"},
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_bpe(specials: list[str]) -> Tokenizer:
    """A tiny byte-level BPE (the kind Llama 3 and Qwen use) with the given special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(
        ["Hello there! Hi. How can I help? What is the cat doing? The cat sat on the mat."], trainer
    )
    return tok


def transformers_tokenizer(specials: list[str], template: str, bos: str | None, eos: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(specials), bos_token=bos, eos_token=eos, chat_template=template
    )


CASES = {
    "llama3.2-instruct": (LLAMA32_INSTRUCT, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5-instruct": (QWEN25_INSTRUCT, CHATML_SPECIALS, None, "<|im_end|>"),
    "builtin-llama3": (LLAMA3_TEMPLATE, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>"),
    "builtin-chatml": (CHATML_TEMPLATE, CHATML_SPECIALS, None, "<|im_end|>"),
    "builtin-llama2": (LLAMA2_TEMPLATE, ["<unk>", "<s>", "</s>"], "<s>", "</s>"),
}


@pytest.mark.parametrize("with_system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("case", CASES)
def test_render_equals_transformers_apply_chat_template(case, with_system):
    template, specials, bos, eos = CASES[case]
    messages = [SYSTEM, *TURNS] if with_system else TURNS
    expected = transformers_tokenizer(specials, template, bos, eos).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert render(messages, template, bos, eos, add_generation_prompt=True) == expected


def test_model_template_and_prompt_ids_equal_transformers(tmp_path):
    hf = transformers_tokenizer(CHATML_SPECIALS, QWEN25_INSTRUCT, None, "<|im_end|>")
    hf.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert template_for(tok) == template_for(tmp_path) == QWEN25_INSTRUCT
    assert special_tokens(tok) == (None, "<|im_end|>")
    text = hf.apply_chat_template([SYSTEM, *TURNS], tokenize=False, add_generation_prompt=True)
    assert encode_chat(tok, [SYSTEM, *TURNS]) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("specials, builtin", [(LLAMA3_SPECIALS, LLAMA3_TEMPLATE), (CHATML_SPECIALS, CHATML_TEMPLATE)])
def test_model_without_template_gets_the_builtin_its_tokens_point_to(tmp_path, specials, builtin):
    byte_level_bpe(specials).save(str(tmp_path / "tokenizer.json"))
    assert template_for(tmp_path / "tokenizer.json") == builtin


def test_llama2c_tokenizer_gets_inst_prompt_with_bos_and_eos_ids(shared_data):
    tok = load_tokenizer(shared_data / "stories260K" / "tok512.bin")
    assert template_for(tok) == LLAMA2_TEMPLATE
    ids = encode_chat(tok, TURNS)
    first_turn = tok.encode("[INST] Hello there! [/INST] Hi. How can I help? ", bos=False)
    assert ids[: len(first_turn) + 3] == [tok.bos_id, *first_turn, 2, tok.bos_id]
    assert tok.decode(ids).endswith("[INST] What is the cat doing? [/INST]")


def test_template_errors_are_one_line():
    with pytest.raises(LLMKitError, match="must alternate"):
        render([TURNS[1]], LLAMA2_TEMPLATE, "<s>", "</s>")
    with pytest.raises(LLMKitError, match="not valid Jinja"):
        render(TURNS, "{% for m in messages %}", None, None)


@pytest.fixture
def chatml(tmp_path):
    transformers_tokenizer(CHATML_SPECIALS, CHATML_TEMPLATE, None, "<|im_end|>").save_pretrained(tmp_path)
    return load_tokenizer(tmp_path / "tokenizer.json")


def test_fit_drops_oldest_turns_and_keeps_the_system_prompt(chatml):
    history = [SYSTEM, *TURNS, {"role": "assistant", "content": "Sitting."}, {"role": "user", "content": "Why?"}]
    everything = len(encode_chat(chatml, history, CHATML_TEMPLATE))
    assert drop_oldest_turns(chatml, history, CHATML_TEMPLATE, everything)[0] == history
    kept, ids = drop_oldest_turns(chatml, history, CHATML_TEMPLATE, everything - 1)
    assert kept == [SYSTEM, *history[3:]]  # the first user/assistant turn went
    assert ids == encode_chat(chatml, kept, CHATML_TEMPLATE)
    assert drop_oldest_turns(chatml, history, CHATML_TEMPLATE, 1)[0] == [SYSTEM, history[-1]]  # never the question itself


class ScriptedLLM:
    """Stands in for LLM: records each prompt and streams a fixed reply."""

    name = "scripted"

    def __init__(self, tokenizer, max_seq_len=2048):
        self.tokenizer, self.max_seq_len, self.prompts = tokenizer, max_seq_len, []

    def generate(self, prompt, max_new_tokens=256, on_text=None, **options):
        self.prompts.append(self.tokenizer.decode(prompt))
        if on_text:
            on_text("Fine.")
        return Generation(text="Fine.", tokens=[0], stats=Stats(prompt_tokens=len(prompt), new_tokens=1))


def test_chat_leaves_out_old_turns_with_a_notice(chatml):
    history = [SYSTEM, *TURNS]
    llm = ScriptedLLM(chatml, max_seq_len=len(encode_chat(chatml, history)) + 20)
    notices = []
    out = chat(llm, history, max_new_tokens=100, on_notice=notices.append)
    assert out.text == "Fine."
    assert notices == [
        f"[the 2 oldest messages no longer fit in the {llm.max_seq_len}-token context and were left out]"
    ]
    assert "Hello there" not in llm.prompts[0] and "terse" in llm.prompts[0] and "cat doing" in llm.prompts[0]


def test_loop_keeps_history_resets_and_quits(chatml, capsys):
    lines = iter(["Hello there!", "", "What is the cat doing?", "/reset", "Hi.", "/quit", "never read"])
    llm = ScriptedLLM(chatml)
    chat_loop(llm, "You are terse.", read=lambda prompt: next(lines))
    first, second, after_reset = llm.prompts
    assert "You are terse." in first and "Hello there!" in first
    assert "Hello there!" in second and "Fine." in second and "cat doing" in second
    assert "You are terse." in after_reset and "Hello" not in after_reset and "cat" not in after_reset
    assert next(lines) == "never read"
    out, err = capsys.readouterr()
    assert out.count("Fine.") == 3
    assert "[conversation reset]" in err and err.count("prompt +") == 3


def test_loop_ends_at_end_of_input(chatml):
    def read(prompt: str) -> str:
        raise EOFError

    chat_loop(ScriptedLLM(chatml), read=read)


def test_template_for_reads_tokenizer_config_of_a_model_folder(tmp_path: Path):
    hf = transformers_tokenizer(LLAMA3_SPECIALS, LLAMA32_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>")
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()  # Hub repos saved before 2025 keep it in tokenizer_config.json
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA32_INSTRUCT}))
    assert template_for(tmp_path) == LLAMA32_INSTRUCT
