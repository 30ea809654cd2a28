"""The text the kit's default model learns from: English prose that ships with every CPython.

Two sources, both present in any installation and under the PSF licence: the documentation
topics behind `help("assert")` (`pydoc_data.topics`) and the docstrings of the standard
library's public modules, classes and functions. The corpus is rebuilt at run time from the
running Python, so nothing extracted is committed; a different Python version gives a slightly
different corpus.

A document is one topic or one module (its docstring, then those of its public classes,
methods and functions), as paragraphs separated by blank lines, each paragraph on one line.
A fixed rule holds out about 3% of the documents, by name, for measuring perplexity.
"""

import contextlib
import functools
import importlib
import inspect
import io
import json
import pkgutil
import re
import subprocess
import sys
import sysconfig
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

HELDOUT_PERCENT = 3  # a document is held out when crc32(name) % 100 < HELDOUT_PERCENT

# Modules that act when imported (open a browser, print, need a display), or hold no prose
SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",  # side effects or GUI
    "test", "lib2to3", "ensurepip", "distutils",  # tests, pickled grammars, bundled wheels, setuptools shim
    "encodings",  # codec tables: a hundred near-identical docstrings
    "pydoc_data",  # already used as the topics
    "readline", "rlcompleter",  # change the interactive prompt of the importing process
}  # fmt: skip


@dataclass(frozen=True)
class Document:
    name: str  # "topics/assert" or a module name such as "json.decoder"
    text: str  # paragraphs separated by blank lines


@dataclass(frozen=True)
class CorpusSize:
    documents: int
    paragraphs: int
    chars: int
    tokens: int | None  # None when no tokenizer was given


DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")
UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")  # reST heading rules such as "*****"


def clean(text: str) -> str:
    """Drop doctest examples (a prompt line up to the next blank line) and heading rules; one
    paragraph per line, single spaces, paragraphs separated by one blank line."""
    paragraphs, lines, in_doctest = [], [], False
    for line in inspect.cleandoc(text).splitlines() + [""]:
        if not line.strip():
            if lines:
                paragraphs.append(" ".join(lines))
            lines, in_doctest = [], False
        elif DOCTEST.match(line):
            in_doctest = True
        elif not in_doctest and not UNDERLINE.match(line):
            lines.append(" ".join(line.split()))
    return "\n\n".join(paragraphs)


def topic_documents() -> list[Document]:
    """The language reference topics that `help()` shows: prose with a little grammar and code."""
    from pydoc_data.topics import topics

    return [Document(f"topics/{name}", clean(topics[name])) for name in sorted(topics)]


def is_public(name: str) -> bool:
    parts = name.split(".")
    return not any(p.startswith("_") or p in ("test", "tests") or p.startswith("test_") for p in parts)


def is_stdlib(module: ModuleType) -> bool:
    """Built in, or a file under the standard library's folder and not in site-packages."""
    file = getattr(module, "__file__", None)
    if file is None:
        return True
    path = Path(file).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return path.is_relative_to(stdlib) and "site-packages" not in path.parts


def quiet_import(name: str) -> ModuleType | None:
    """Import a module with its warnings and prints swallowed; None when it fails to import."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # missing C libraries, other platforms' modules, deprecated leftovers
            return None


def stdlib_modules() -> Iterator[ModuleType]:
    """Every importable public standard-library module and submodule, in sorted name order."""
    pending = sorted(n for n in sys.stdlib_module_names if is_public(n) and n not in SKIP_MODULES)
    while pending:
        name = pending.pop(0)
        module = quiet_import(name)
        if module is None or not is_stdlib(module):
            continue
        yield module
        if hasattr(module, "__path__"):
            subs = [f"{name}.{m.name}" for m in pkgutil.iter_modules(module.__path__)]
            pending = sorted(pending + [s for s in subs if is_public(s) and s not in SKIP_MODULES])


def docstrings(module: ModuleType) -> Iterator[str]:
    """The module's docstring, then each public class (its methods and properties too) and function
    it defines, or takes from a private module (`heapq.heappush` comes from `_heapq`)."""
    yield module.__doc__ or ""
    for name, obj in sorted(vars(module).items()):
        owner = getattr(obj, "__module__", None)
        if name.startswith("_") or not isinstance(owner, str):
            continue
        if owner != module.__name__ and not owner.startswith("_"):
            continue
        if inspect.isclass(obj):
            yield obj.__doc__ or ""
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    yield member.__doc__ or ""
        elif inspect.isroutine(obj):
            yield obj.__doc__ or ""


def module_documents() -> list[Document]:
    """One document per module; a docstring already seen elsewhere (inherited, copied) is skipped."""
    seen, docs = set(), []
    for module in stdlib_modules():
        texts = []
        for doc in docstrings(module):
            text = clean(doc) if isinstance(doc, str) else ""
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
        if texts:
            docs.append(Document(module.__name__, "\n\n".join(texts)))
    return docs


def extract() -> list[Document]:
    """All documents, topics first, then modules by name, from this process's standard library."""
    return topic_documents() + module_documents()


# Run this file on its own (not as part of llmkit, whose imports would come along) and save extract()
EXTRACT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("llmkit_corpus", sys.argv[1])
module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with open(sys.argv[2], "w") as f:
    json.dump([[d.name, d.text] for d in module.extract()], f)
"""


@functools.cache
def build_corpus() -> tuple[Document, ...]:
    """The corpus, extracted in a fresh interpreter so it never depends on what the caller imported
    (torch, for one, replaces `inspect.getfile`) and the standard library's imports stay out of
    the caller. Takes a second or two; cached for the life of the process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "corpus.json"
        cmd = [sys.executable, "-I", "-c", EXTRACT, __file__, str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"extracting the corpus failed:\n{done.stderr}")
        return tuple(Document(name, text) for name, text in json.loads(out.read_text()))


def is_heldout(name: str) -> bool:
    """The fixed split rule: a stable hash of the name, so the split never depends on order."""
    return zlib.crc32(name.encode()) % 100 < HELDOUT_PERCENT


def split(docs: tuple[Document, ...] | list[Document]) -> tuple[list[Document], list[Document]]:
    """(training documents, held-out documents)."""
    return [d for d in docs if not is_heldout(d.name)], [d for d in docs if is_heldout(d.name)]


def join(docs: list[Document]) -> str:
    return "\n\n".join(d.text for d in docs)


def paragraphs(text: str) -> list[str]:
    """The blank-line-separated paragraphs of a text, stripped, empty ones dropped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def train_text() -> str:
    return join(split(build_corpus())[0])


def heldout_text() -> str:
    """The evaluation text: what `llmkit eval` scores when given no --text."""
    return join(split(build_corpus())[1])


def corpus_size(docs: list[Document], tokenizer=None) -> CorpusSize:
    """Documents, paragraphs and characters, and tokens as the model sees them (BOS + each paragraph)."""
    paras = [p for d in docs for p in paragraphs(d.text)]
    tokens = None if tokenizer is None else sum(len(tokenizer.encode(p, bos=True)) for p in paras)
    return CorpusSize(len(docs), len(paras), sum(len(d.text) for d in docs), tokens)


def encode(text: str, tokenizer) -> np.ndarray:
    """Token ids of a text as the model trains and is scored on: each paragraph as BOS + its tokens."""
    ids = [i for p in paragraphs(text) for i in tokenizer.encode(p, bos=True)]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    return np.array(ids, dtype=dtype)
