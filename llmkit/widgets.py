"""What the notebooks show: a chat box, tokens as coloured pieces, sampling distributions, the numerics explorer.

Each widget's behaviour is a plain method (`ChatBox.send`, `ChatBox.reset`, `NumericsExplorer.redraw`) that its
buttons and sliders call, so nbval and pytest drive it exactly as a click does, without a browser.
"""

import abc
import base64
import io
import time
from collections.abc import Sequence
from html import escape

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from torch import Tensor

from llmkit import numerics as nm
from llmkit import scaled_formats as sf
from llmkit.errors import LLMKitError
from llmkit.generate import LLM, Generation
from llmkit.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------
# Tokens as coloured pieces

PALETTE = ("#ffd6a5", "#caffbf", "#9bf6ff", "#bdb2ff", "#ffc6ff", "#fdffb6")
VISIBLE = {"\n": "\u21b5", "\t": "\u21e5"}  # ↵ and ⇥: a newline or tab token would otherwise be invisible


def tokens_html(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The ids as boxes of their pieces in turn-taking colours (hover shows the id), so a reader sees where
    words split, that a space belongs to the token after it, and which characters fell back to bytes."""
    spans = []
    for i, id in enumerate(ids):
        piece = "".join(VISIBLE.get(c, c) for c in tokenizer.piece(id))
        spans.append(
            f'<span class="llmkit-token" title="id {id}" style="background:{PALETTE[i % len(PALETTE)]};'
            f'color:#000;white-space:pre;padding:1px 0;border-radius:3px">{escape(piece)}</span>'
        )
    return f'<div class="llmkit-tokens" style="font-family:monospace;line-height:1.9">{"".join(spans)}</div>'


# ----------------------------------------------------------------------------------------------------------
# The next-token distribution, for the plots


@torch.inference_mode()
def prompt_logits(llm: LLM, prompt: str) -> Tensor:
    """The model's logits after each prefix of the prompt, [tokens, vocab]: row i scores the token that follows
    the first i + 1, so the last row is the next-token distribution that every sampling setting reshapes
    (`llmkit.sampling.probabilities`)."""
    ids = llm.encode_prompt(prompt)
    logits = llm.step(torch.tensor([ids], device=llm.device), torch.arange(len(ids), device=llm.device))
    return logits[0].float().cpu()


# ----------------------------------------------------------------------------------------------------------
# Widgets


class Panel(abc.ABC):
    """A plain object holding a widget. Where a kernel runs it (JupyterLab), it shows as the live widget; where
    none does (a page of the book), as a static HTML snapshot of what it showed when displayed."""

    widget: widgets.Widget

    @abc.abstractmethod
    def snapshot_html(self) -> str:
        """The widget's current look in plain HTML."""

    def _repr_mimebundle_(self, **kwargs) -> dict:
        return {**self.widget._repr_mimebundle_(**kwargs), "text/html": self.snapshot_html()}


# ----------------------------------------------------------------------------------------------------------
# Chat box

REDRAW_INTERVAL = 0.1  # seconds between redraws of a streaming reply: each sends the whole transcript to the browser


def _error_html(text: str) -> str:
    return f'<span style="color:#b42318">{escape(text)}</span>'


class ChatBox(Panel):
    """A conversation with a base model: each prompt is appended to the transcript and the model continues
    the whole of it, so replies follow from what came before and Reset starts over with an empty context."""

    def __init__(
        self, llm: LLM, temperature: float = 0.8, top_p: float = 0.9, max_new_tokens: int = 64, seed: int | None = None
    ):
        self.llm, self.seed = llm, seed
        self.turns: list[tuple[str, str]] = []  # (prompt, reply) pairs; their text is what the model continues
        self.prompt = widgets.Textarea(placeholder="Type a prompt, then Send", layout=widgets.Layout(width="100%"))
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.reset_button = widgets.Button(description="Reset", icon="undo", tooltip="start a new conversation")
        longest = max(1, min(512, llm.max_seq_len - 1))
        slider = {"continuous_update": False, "style": {"description_width": "initial"}}
        self.temperature = widgets.FloatSlider(
            temperature, min=0, max=2, step=0.05, description="temperature", **slider
        )
        self.top_p = widgets.FloatSlider(top_p, min=0.05, max=1, step=0.05, description="top-p", **slider)
        self.max_new_tokens = widgets.IntSlider(
            min(max_new_tokens, longest), min=1, max=longest, description="max new tokens", **slider
        )
        self.conversation = widgets.HTML()
        self.message = widgets.HTML()
        self.stats = widgets.HTML()
        for name in ("prompt", "send_button", "reset_button", "conversation", "message", "stats"):
            getattr(self, name).add_class(f"llmkit-chat-{name.replace('_', '-')}")  # for the browser test
        self.send_button.on_click(lambda _: self.send())
        self.reset_button.on_click(lambda _: self.reset())
        self.widget = widgets.VBox([
            self.conversation,
            self.prompt,
            widgets.HBox([self.send_button, self.reset_button]),
            widgets.HBox([self.temperature, self.top_p, self.max_new_tokens]),
            self.message,
            self.stats,
        ])  # fmt: skip

    def snapshot_html(self) -> str:
        settings = (
            f"temperature {self.temperature.value:.2f}, top-p {self.top_p.value:.2f}, "
            f"max new tokens {self.max_new_tokens.value}"
        )
        return (
            f'<div class="llmkit-chat-snapshot">{self.conversation.value}{self.message.value}'
            f"<p><small>chat box ({settings}): live in JupyterLab</small></p>{self.stats.value}</div>"
        )

    @property
    def transcript(self) -> str:
        """The text the next prompt continues: every prompt and reply so far, each prompt on a new line."""
        return "\n".join(prompt + reply for prompt, reply in self.turns)

    def _show(self, streaming: tuple[str, str] | None = None) -> None:
        """Draw the turns so far, and the (prompt, partial reply) being streamed if any."""
        turns = [*self.turns, streaming] if streaming else self.turns
        html = "\n".join(f'<b style="color:#1f5fbf">{escape(prompt)}</b>{escape(reply)}' for prompt, reply in turns)
        style = "white-space:pre-wrap;font-family:monospace"
        self.conversation.value = f'<div style="{style}">{html}</div>' if turns else ""

    def send(self) -> Generation | None:
        """Continue the transcript with the prompt field's text, streaming the reply into the box. A problem
        the user can fix (an empty prompt, a conversation longer than the context) is a message, not a traceback."""
        prompt = self.prompt.value
        if not prompt.strip():
            self.message.value = _error_html("Type a prompt first: the model needs some text to continue.")
            return None
        text = f"{self.transcript}\n{prompt}" if self.turns else prompt
        streamed: list[str] = []
        shown = time.perf_counter()

        def on_text(piece: str) -> None:
            nonlocal shown
            streamed.append(piece)
            if time.perf_counter() - shown >= REDRAW_INTERVAL:
                self._show((prompt, "".join(streamed)))
                shown = time.perf_counter()

        self.message.value, self.stats.value = "", ""
        self.send_button.disabled = True
        try:
            out = self.llm.generate(
                text,
                max_new_tokens=self.max_new_tokens.value,
                temperature=self.temperature.value,
                top_k=None,  # top-p alone trims the tail, so the slider's effect is the one you see
                top_p=self.top_p.value,
                seed=self.seed,
                on_text=on_text,
            )
        except LLMKitError as e:
            self._show()
            again = " (or press Reset to start a new conversation)" if self.turns else ""
            self.message.value = _error_html(f"{e}{again}.")
            return None
        finally:
            self.send_button.disabled = False
        self.turns.append((prompt, out.text))
        self.prompt.value = ""
        self._show()
        self.stats.value = f"<code>{escape(str(out.stats))}</code>"
        return out

    def reset(self) -> None:
        """Forget the conversation: the next prompt starts from an empty context."""
        self.turns.clear()
        self.prompt.value = self.message.value = self.stats.value = ""
        self._show()


def chat_box(
    llm: LLM, temperature: float = 0.8, top_p: float = 0.9, max_new_tokens: int = 64, seed: int | None = None
) -> ChatBox:
    """A chat box for JupyterLab, starting with these slider settings; a seed makes its replies repeatable."""
    return ChatBox(llm, temperature, top_p, max_new_tokens, seed)


# ----------------------------------------------------------------------------------------------------------
# Numerics explorer

EXPLORER_FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1",
                    "mxfp8_e4m3", "mxfp6_e2m3", "mxfp4", "nvfp4")  # fmt: skip


def _first_group(format: str, group_size: int | None, n: int) -> int:
    """How many values share the first scale: MX and NVFP4 blocks are fixed, others take the group size."""
    kind, _ = nm.parse_format(format)
    return {"mx": sf.MX_BLOCK, "nvfp4": sf.NVFP4_BLOCK}.get(kind, group_size or n)


def explore_figure(row: Tensor, out: dict, group_size: int | None) -> Figure:
    """`numerics.explore`'s result drawn: the first group's grid against its weights, and the error along the row."""
    fig = Figure(figsize=(13, 3.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 2])
    first = row[: _first_group(out["format"], group_size, row.numel())]
    ax1.scatter(out["grid"], [0] * len(out["grid"]), marker="|", s=200, color="0.4", label="grid (group 0)")
    ax1.scatter(first, [0.3] * len(first), s=8, label="weights")
    span = 1.3 * float(first.abs().max())
    ax1.set(xlim=(-span, span), ylim=(-0.5, 0.8), yticks=[])
    ax1.legend(fontsize=7)
    ax1.set_title(f"{len(out['grid'])} levels in group 0", fontsize=9)
    ax2.plot(out["error"], lw=0.7)
    ax2.set_xlabel("column")
    ax2.set_title(
        f"{out['format']} {out['params']}: {out['bits_per_weight']:.3f} bits/weight, SQNR {out['sqnr_db']:.1f} dB, "
        f"max |err| {out['max_abs_error']:.4f}",
        fontsize=9,
    )
    return fig


class NumericsExplorer(Panel):
    """Format, bits and group size -> `numerics.explore` on one weight row, redrawn as a PNG on every change."""

    def __init__(
        self, row: Tensor, formats: Sequence[str] = EXPLORER_FORMATS, group_sizes: Sequence[int] = (32, 64, 128, 256)
    ):
        self.row = row
        sizes = [g for g in group_sizes if row.numel() % g == 0]
        self.format = widgets.Dropdown(options=list(formats), value=formats[0], description="format")
        self.bits = widgets.IntSlider(4, min=2, max=8, description="bits (int)", continuous_update=False)
        self.group_size = widgets.Dropdown(
            options=[("per row", None)] + [(str(g), g) for g in sizes], value=sizes[0] if sizes else None,
            description="group size",
        )  # fmt: skip
        self.summary = widgets.HTML()
        self.plot = widgets.Image(format="png")
        for control in (self.format, self.bits, self.group_size):
            control.observe(lambda _: self.redraw(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.format, self.bits, self.group_size]), self.summary, self.plot])
        self.result: dict | None = None
        self.redraw()

    def snapshot_html(self) -> str:
        png = base64.b64encode(self.plot.value).decode()
        return f'<div>{self.summary.value}<br><img alt="explorer plot" src="data:image/png;base64,{png}"></div>'

    def redraw(self) -> dict | None:
        """Quantize the row with the current settings and redraw; returns explore's dict (None on a bad setting)."""
        format, group_size = self.format.value, self.group_size.value
        self.bits.disabled = format != "int"
        try:
            out = nm.explore(self.row, format, self.bits.value, group_size)
        except LLMKitError as e:
            self.summary.value, self.result = _error_html(str(e)), None
            return None
        buffer = io.BytesIO()
        explore_figure(self.row, out, group_size).savefig(buffer, format="png", dpi=80)
        self.plot.value = buffer.getvalue()
        self.summary.value = (
            f"{format}: {out['bits_per_weight']:.3f} bits/weight, SQNR {out['sqnr_db']:.1f} dB, "
            f"MSE {out['mse']:.3g}, max |err| {out['max_abs_error']:.4f}"
        )
        self.result = out
        return out


def numerics_explorer(
    row: Tensor, formats: Sequence[str] = EXPLORER_FORMATS, group_sizes: Sequence[int] = (32, 64, 128, 256)
) -> NumericsExplorer:
    """The numerics lab's explorer on one weight row (group sizes that do not divide the row are left out)."""
    return NumericsExplorer(row, formats, group_sizes)
