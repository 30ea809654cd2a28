"""Models by name: aliases for Hugging Face Hub repositories, downloaded into huggingface_hub's own cache.

`llmkit download stories15M` fetches the files with `snapshot_download` (progress bars, resumable, HF_TOKEN for
gated repositories); `resolve("stories15M")` then finds them in the cache without the network. An entry of
models.json (or of the JSON file that $LLMKIT_MODELS names, for your own aliases) says:

    repo            the Hub repository of the checkpoint
    files           the files fetched from it (exact names: each must exist after a download, and before use)
    format          llama2c, hf, meta or gguf: what `llmkit.load` will read
    checkpoint      the file or folder ("." for the repository itself) passed to `load`
    tokenizer       the tokenizer file: in `files`, or in `tokenizer_repo` when the repository lacks one (a .gguf
                    file holds its own: name the checkpoint)
    tokenizer_repo  (optional) a second repository that holds the tokenizer
    revision        (optional) branch, tag or commit of `repo`; default main
    size_mb         approximate download size
    gated           whether the Hub asks you to accept a licence first
"""

import difflib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from llmkit.errors import LLMKitError

BUILTIN_MODELS = Path(__file__).with_name("models.json")
FORMATS = ("llama2c", "hf", "meta", "gguf")


class Source(NamedTuple):
    repo: str
    revision: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    alias: str
    repo: str
    files: tuple[str, ...]
    format: str
    checkpoint: str
    tokenizer: str
    size_mb: int
    gated: bool
    tokenizer_repo: str | None = None
    revision: str = "main"

    @property
    def sources(self) -> list[Source]:
        """Where the files come from: the checkpoint's repository first, then the tokenizer's if separate."""
        main = Source(self.repo, self.revision, self.files)
        return [main, Source(self.tokenizer_repo, "main", (self.tokenizer,))] if self.tokenizer_repo else [main]

    @property
    def size(self) -> str:
        return f"{self.size_mb} MB" if self.size_mb < 1000 else f"{self.size_mb / 1000:.1f} GB"


class ModelFiles(NamedTuple):
    """What `llmkit.load` takes: `load(*hub.resolve("stories15M"))`."""

    checkpoint: Path
    tokenizer: Path


class Row(NamedTuple):
    alias: str
    repo: str
    size: str
    downloaded: bool
    gated: bool


FIELD_TYPES = {"repo": str, "format": str, "checkpoint": str, "tokenizer": str, "size_mb": int, "gated": bool,
               "tokenizer_repo": str, "revision": str}  # fmt: skip


def _model_info(alias: str, entry: dict, path: Path) -> ModelInfo:
    if not isinstance(entry, dict):
        raise LLMKitError(f"{path}: the entry for {alias} is a {type(entry).__name__}, not an object of fields")
    for field, kind in FIELD_TYPES.items():
        if field in entry and type(entry[field]) is not kind:  # JSON's true is no size, nor 1 a flag
            raise LLMKitError(f"{path}: {alias}'s {field} is {entry[field]!r}; it must be a {kind.__name__}")
    files = entry.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise LLMKitError(f"{path}: {alias}'s files is {files!r}; it must be a list of file names")
    try:
        model = ModelInfo(alias=alias, **{**entry, "files": tuple(files)})
    except TypeError as e:
        raise LLMKitError(f"{path}: the entry for {alias} is malformed ({e})") from None
    if model.format not in FORMATS:
        raise LLMKitError(f"{path}: {alias} has format {model.format!r}; use one of {', '.join(FORMATS)}")
    if model.checkpoint != "." and not any(
        f == model.checkpoint or f.startswith(model.checkpoint + "/") for f in model.files
    ):
        raise LLMKitError(f"{path}: {alias}'s checkpoint {model.checkpoint} is not among its files")
    if not model.tokenizer_repo and model.tokenizer not in model.files:
        raise LLMKitError(f"{path}: {alias}'s tokenizer {model.tokenizer} is not among its files (or a tokenizer_repo)")
    return model


def registry() -> dict[str, ModelInfo]:
    """The aliases of models.json, plus (overriding) those of the JSON file that $LLMKIT_MODELS names."""
    paths = [BUILTIN_MODELS]
    if os.environ.get("LLMKIT_MODELS"):
        paths.append(Path(os.environ["LLMKIT_MODELS"]).expanduser())
    models = {}
    for path in paths:
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LLMKitError(f"cannot read the model list {path} ({e})") from None
        if not isinstance(entries, dict):
            raise LLMKitError(f"{path} holds a JSON {type(entries).__name__}; it must be an object of alias: entry")
        models.update({alias: _model_info(alias, entry, path) for alias, entry in entries.items()})
    return models


def model_info(alias: str) -> ModelInfo:
    """The registry entry for an alias (case does not matter), or an error that suggests the closest ones."""
    models = registry()
    by_folded = {name.casefold(): model for name, model in models.items()}
    if alias.casefold() in by_folded:
        return by_folded[alias.casefold()]
    close = difflib.get_close_matches(alias.casefold(), by_folded, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(by_folded[c].alias for c in close)}?" if close else ""
    raise LLMKitError(f"unknown model {alias!r}{hint} (`llmkit list` shows the models known by name)")


# ---- the cache ------------------------------------------------------------------------------


def _cached(source: Source, cache_dir: str | Path | None) -> tuple[Path | None, list[str]]:
    """The source's snapshot folder in the cache (None if there is none) and the files missing from it.

    A file counts only if its snapshot link leads to a whole blob: huggingface_hub links a file into the
    snapshot after its download completes, and a deleted blob leaves a dangling link, which is_file() rejects.
    """
    try:
        folder = Path(
            snapshot_download(
                source.repo,
                revision=source.revision,
                allow_patterns=list(source.files),
                cache_dir=cache_dir,
                local_files_only=True,
            )
        )
    except IncompleteSnapshotError as e:  # the cached file list knows some files are missing: check them below
        folder = Path(e.snapshot_path)
    except LocalEntryNotFoundError:
        return None, list(source.files)
    return folder, [f for f in source.files if not (folder / f).is_file()]


def resolve(alias: str, cache_dir: str | Path | None = None) -> ModelFiles:
    """The checkpoint and tokenizer of a downloaded model, from the cache alone: works offline."""
    model = model_info(alias)
    located = [_cached(source, cache_dir) for source in model.sources]
    if located[0][0] is None or len(located[0][1]) == len(model.files):
        gated = "; it is gated: accept its licence on the Hub and set HF_TOKEN first" if model.gated else ""
        raise LLMKitError(
            f"{model.alias} is not downloaded; run `llmkit download {model.alias}` ({model.size} from "
            f"https://huggingface.co/{model.repo}){gated}"
        )
    missing = [f"{source.repo}/{f}" for source, (_, files) in zip(model.sources, located, strict=True) for f in files]
    if missing:
        raise LLMKitError(
            f"the cached copy of {model.alias} lacks {', '.join(missing)} (an interrupted download or a deleted "
            f"file); run `llmkit download {model.alias}` again"
        )
    return ModelFiles(located[0][0] / model.checkpoint, located[-1][0] / model.tokenizer)  # [-1]: tokenizer's source


def where(alias: str, cache_dir: str | Path | None = None) -> Path:
    """The folder in the cache that holds the model's checkpoint."""
    checkpoint = resolve(alias, cache_dir).checkpoint
    return checkpoint if checkpoint.is_dir() else checkpoint.parent


def list_models(cache_dir: str | Path | None = None) -> list[Row]:
    """Every alias with its repository, size and whether all its files are in the cache."""
    rows = []
    for m in registry().values():
        complete = all(not missing for _, missing in (_cached(source, cache_dir) for source in m.sources))
        rows.append(Row(m.alias, m.repo, m.size, complete, m.gated))
    return rows


# ---- download and remove --------------------------------------------------------------------


def _offline_error(model: ModelInfo) -> LLMKitError:
    return LLMKitError(
        f"cannot download {model.alias}: HF_HUB_OFFLINE is set and the cache does not hold it; "
        "unset HF_HUB_OFFLINE on a machine with network access"
    )


def _download_error(model: ModelInfo, source: Source, e: Exception) -> LLMKitError:
    url = f"https://huggingface.co/{source.repo}"
    if isinstance(e, GatedRepoError):
        return LLMKitError(
            f"{source.repo} is gated and this account has no access: accept its licence at {url}, then set "
            "HF_TOKEN to a token of that account (or run `hf auth login`) and run "
            f"`llmkit download {model.alias}` again"
        )
    if isinstance(e, RepositoryNotFoundError):
        return LLMKitError(f"{url} does not exist or is private (set HF_TOKEN if private); check {model.alias}'s entry")
    if isinstance(e, RevisionNotFoundError):
        return LLMKitError(f"{source.repo} has no revision {source.revision!r}; check {model.alias}'s entry")
    if isinstance(e, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
        return _offline_error(model)
    cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) and e.__cause__ else e
    reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else 'no message'}"
    return LLMKitError(
        f"the download of {model.alias} from {url} failed ({reason}); nothing half-written was kept. "
        f"Check the network and run `llmkit download {model.alias}` again"
    )


def download(alias: str, cache_dir: str | Path | None = None) -> ModelFiles:
    """Fetch the model's files into the Hugging Face cache (files already there are not fetched again), then
    check that every one of them is there."""
    model = model_info(alias)
    for source in model.sources:
        try:
            folder = Path(
                snapshot_download(
                    source.repo, revision=source.revision, allow_patterns=list(source.files), cache_dir=cache_dir
                )
            )
        # huggingface_hub writes each file to a name of its own (<etag>.<random>.incomplete) and deletes it when
        # the transfer fails or is interrupted, so nothing is left to clean, and another download's file is left be
        except Exception as e:  # httpx, hf_xet and the file system each raise their own types mid-transfer
            raise _download_error(model, source, e) from None
        # Offline, or when the Hub cannot be reached, snapshot_download returns the cached snapshot as it is.
        if absent := [f for f in source.files if not (folder / f).is_file()]:
            if constants.HF_HUB_OFFLINE:
                raise _offline_error(model)
            raise LLMKitError(
                f"{', '.join(absent)} did not arrive from https://huggingface.co/{source.repo}: the Hub could not be "
                f"reached, or the repository has no such file (check {model.alias}'s entry); {model.alias} is not "
                "downloaded"
            )
    return resolve(model.alias, cache_dir)


def remove(alias: str, cache_dir: str | Path | None = None) -> list[Path]:
    """Delete the model's files from the cache, except those that another downloaded model uses (stories15M and
    stories42M share a tokenizer); returns the deleted snapshot paths."""
    model = model_info(alias)
    keep = {
        (source.repo, f)
        for row in list_models(cache_dir)
        if row.downloaded and row.alias != model.alias
        for source in model_info(row.alias).sources
        for f in source.files
    }
    deleted = []
    for source in model.sources:
        folder, _ = _cached(source, cache_dir)
        if folder is None:
            continue
        root = folder.parents[1]  # models--owner--name, holding blobs/, refs/ and snapshots/
        for f in source.files:
            link = folder / f
            if (source.repo, f) in keep or not (link.is_symlink() or link.exists()):
                continue
            blob = link.resolve()
            link.unlink()
            deleted.append(link)
            if blob.parent == root / "blobs" and not any(p.resolve() == blob for p in root.glob("snapshots/**/*")):
                blob.unlink(missing_ok=True)
        if not any(p.is_file() for p in root.glob("snapshots/**/*")):
            shutil.rmtree(root)
        else:
            for empty in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
                if not any(empty.iterdir()):
                    empty.rmdir()
    if not deleted:
        raise LLMKitError(f"{model.alias} is not downloaded; there is nothing to remove")
    return deleted
