"""llmkit: one Llama-family model, from a server GPU down to a phone-sized CPU, measured at every step."""

from llmkit.compile import compile
from llmkit.errors import LLMKitError
from llmkit.evaluate import Perplexity, perplexity
from llmkit.generate import LLM, Generation, load

__all__ = ["LLM", "Generation", "LLMKitError", "Perplexity", "compile", "load", "perplexity"]
