"""The review page in a real headless browser (Debian's chromium driven by Playwright): answer
three pairs by keyboard (and undo one), reload and find the answers kept, calibrate and see the
chart. Skipped, never failed, where no browser can be started."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from prodsearch.index import Index
from prodsearch.review.app import create_review_app
from prodsearch.settings import Settings

from .reviewed import ingest_phash_catalog

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
sync_api = pytest.importorskip("playwright.sync_api", reason="pip package playwright missing")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason=f"no browser at {CHROMIUM}: scripts/setup.sh installs Debian's chromium with apt-get",
)


@pytest.fixture
def browser() -> Iterator[object]:
    """A headless chromium (skips the test when it cannot start here)."""
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except sync_api.Error as exc:
            pytest.skip(f"chromium at {CHROMIUM} does not start here: {exc}")
        yield launched
        launched.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def review_url(tmp_path, encoders) -> Iterator[str]:
    """The review page of a generated catalog the pair model decides, served on localhost."""
    store = str(tmp_path / "store")
    settings = Settings(store=store, state_dir=tmp_path / "state")
    with Index(store, "products", settings, encoders) as index:
        ingest_phash_catalog(index, tmp_path)
        app = create_review_app(settings, index, write_settings=tmp_path / "prodsearch.toml")
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.started, "the review server did not start"
        yield f"http://127.0.0.1:{port}/"
        server.should_exit = True
        thread.join(timeout=30)


def _answered(page: object, count: int) -> None:
    sync_api.expect(page.locator("#progress-text")).to_contain_text(f"{count} answered")


def test_label_by_keyboard_reload_and_calibrate(browser, review_url, tmp_path) -> None:
    page = browser.new_page()
    page.goto(review_url)
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    sync_api.expect(page.locator(".product")).to_have_count(2)
    shown = []
    for count, key in enumerate(["y", "n", "y"], start=1):
        shown.append((page.locator("#pair").get_attribute("data-id-a"), key))
        page.keyboard.press(key)
        _answered(page, count)
    page.keyboard.press("z")  # undo the third answer: its pair is asked again
    _answered(page, 2)
    assert page.locator("#pair").get_attribute("data-id-a") == shown[2][0]
    page.keyboard.press("y")
    _answered(page, 3)
    sync_api.expect(page.locator("#progress-text")).to_contain_text("2 same · 1 different")

    page.reload()
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    _answered(page, 3)
    sync_api.expect(page.locator("#answer-list li")).to_have_count(3)

    page.locator(".tab[data-view='calibrate']").click()
    page.locator("#calibrate").click()
    sync_api.expect(page.locator("#operating-point")).to_contain_text(
        "Operating point", timeout=60_000
    )
    # three answers teach no feature weights yet, and the page says what they would need
    sync_api.expect(page.locator("#taught")).to_contain_text("No feature weights yet")
    chart = page.locator("#chart")
    sync_api.expect(chart).to_be_visible()
    page.wait_for_function(
        "document.getElementById('chart').complete && "
        "document.getElementById('chart').naturalWidth > 0"
    )
    assert "min_probability" in (tmp_path / "prodsearch.toml").read_text()
