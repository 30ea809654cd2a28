"""llmkit: one Llama-family model, from a server GPU down to a phone-sized CPU, measured at every step."""

from llmkit.compile import compile
from llmkit.errors import LLMKitError
from llmkit.evaluate import Perplexity, perplexity
from llmkit.generate import LLM, Generation
from llmkit.loading import load
from llmkit.quantize import model_size, parse_scheme, quantize
from llmkit.quantized_files import load_quantized, save
from llmkit.speculative import SpeculativeLLM, speculate
from llmkit.version import __version__

__all__ = [
    "LLM", "Generation", "LLMKitError", "Perplexity", "compile", "load", "load_quantized", "model_size",
    "parse_scheme", "perplexity", "quantize", "save", "SpeculativeLLM", "speculate", "__version__",
]  # fmt: skip
