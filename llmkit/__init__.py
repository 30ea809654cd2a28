"""llmkit: one Llama-family model, from a server GPU down to a phone-sized CPU, measured at every step."""

__version__ = "0.1.0"  # first, so modules can read it while the package initialises

from llmkit.compile import compile
from llmkit.errors import LLMKitError
from llmkit.evaluate import Perplexity, perplexity
from llmkit.generate import LLM, Generation, load
from llmkit.quantize import load_quantized, model_size, parse_scheme, quantize, save

__all__ = [
    "LLM", "Generation", "LLMKitError", "Perplexity", "compile", "load", "load_quantized", "model_size",
    "parse_scheme", "perplexity", "quantize", "save",
]  # fmt: skip
