"""llmkit: one Llama-family model, from a server GPU down to a phone-sized CPU, measured at every step."""

from llmkit.errors import LLMKitError
from llmkit.generate import LLM, Generation, load

__all__ = ["LLM", "Generation", "LLMKitError", "load"]
