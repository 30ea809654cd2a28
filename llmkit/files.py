"""The user's files: JSON configs read with one clear error, target checks, and atomic writes that never lose
what was there."""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmkit.errors import LLMKitError, first_line


def read_json_object(path: Path, what: str, optional: bool = False) -> dict:
    """A JSON file that must hold an object (config.json, params.json, tokenizer_config.json...), or one clear
    error naming it. An `optional` file that is missing reads as {}; one that is there but broken is an error,
    not silently ignored (it would change the model's template or special tokens without a word)."""
    if not path.is_file():
        if optional:
            return {}
        raise LLMKitError(f"{path} is missing: a {what} needs it beside its weights")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LLMKitError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise LLMKitError(f"{path} is not valid JSON ({first_line(e)}); fix it or download the {what} again") from None
    if not isinstance(value, dict):
        raise LLMKitError(f"{path} holds a JSON {type(value).__name__}, not an object; it is not a {what}'s file")
    return value


def check_output_path(path: str | Path, force: bool = False, folder: bool = False) -> Path:
    """Refuse a target that can't be written, before any slow work: its folder missing or read-only, a
    folder where a file goes (or a file where a folder goes), or something already there without `force`."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        want = "folder" if folder else "file"
        raise LLMKitError(f"{path} is a {'folder' if path.is_dir() else 'file'}; give the path of a {want} to write")
    if not path.parent.is_dir():
        raise LLMKitError(f"folder {path.parent} does not exist; create it or choose another output path")
    if not os.access(path.parent, os.W_OK):
        raise LLMKitError(f"folder {path.parent} is not writable; choose another output path")
    if path.exists() and not force:
        raise LLMKitError(f"{path} already exists; choose another name or pass --force (force=True) to replace it")
    return path


def write_file_atomically(path: Path, write: Callable[[str], object]) -> Path:
    """Let `write` fill a temporary file beside `path`, then rename it into place: an interrupted write
    never leaves a half-written file under the final name."""
    if path.is_dir():
        raise LLMKitError(f"{path} is a folder; give the path of a file to write")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _with_umask(0o666))  # mkstemp makes it private; the user's umask decides
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a folder made read-only meanwhile
        raise _cannot_write(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_folder_atomically(out_dir: Path, fill: Callable[[Path], object]) -> Path:
    """Let `fill` write a temporary folder beside `out_dir`, then rename it into place (replacing what was
    there): an interrupted save never leaves a half-written folder under the final name."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        try:
            fill(tmp)
        except OSError as e:
            raise _cannot_write(out_dir, e) from None
        tmp.chmod(_with_umask(0o777))  # mkdtemp makes it private; the user's umask decides
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _cannot_write(path: Path, e: OSError) -> LLMKitError:
    return LLMKitError(f"cannot write {path} ({e.strerror or e}); free some space or choose another place")


def _with_umask(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
