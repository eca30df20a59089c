"""A headless Chromium driven by Playwright, for tests that use the Airflow UI as a person does.

Playwright's own browser download is not reachable from the machines this project is tested on, so
Playwright launches the distribution's Chromium (Debian's package ``chromium``, ``/usr/bin/chromium``;
``BLUESHIFT_TEST_CHROMIUM`` names another binary). Selectors of the Airflow 3.3 UI it relies on:
roles, names, placeholders and ``data-testid``; never Chakra's generated ids or classes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from playwright.sync_api import Locator, Page, ViewportSize, expect, sync_playwright

CHROMIUM = Path(os.environ.get("BLUESHIFT_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000
"""Per action and per expectation: the UI on a busy 2-core machine takes seconds to render a page."""
VIEWPORT: ViewportSize = {"width": 1400, "height": 900}


class ChromiumMissingError(RuntimeError):
    """The browser the UI tests drive is not installed."""


def check_chromium() -> Path:
    """Return the Chromium binary, or raise naming the package that provides it."""
    if not os.access(CHROMIUM, os.X_OK):
        raise ChromiumMissingError(
            f"{CHROMIUM} is missing: the UI tests drive Debian's Chromium (Playwright's browser download "
            "is not reachable here). Install it with `apt-get install -y chromium` (as root; .ci/run "
            "does), or point BLUESHIFT_TEST_CHROMIUM at another Chromium binary."
        )
    return CHROMIUM


@contextlib.contextmanager
def chromium_page(base_url: str, artifacts: Path) -> Iterator[Page]:
    """Yield a page of a fresh headless Chromium at ``base_url``; on failure save ``failure.png``."""
    executable = check_chromium()
    expect.set_options(timeout=TIMEOUT_MS)  # expect() has its own default timeout (5 s)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=base_url, viewport=VIEWPORT, timezone_id="UTC")
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            try:
                yield page
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(artifacts / "failure.png"))
                raise
        finally:
            browser.close()


def log_in(page: Page, username: str, password: str) -> None:
    """Log in through the simple auth manager's login page."""
    page.goto("/")
    page.locator("input[name=username]").fill(username)
    page.locator("input[name=password]").fill(password)
    page.locator("input[name=password]").press("Enter")
    page.get_by_role("link", name="Dags").first.wait_for()


def pick_datetime(page: Page, field: Locator, when: datetime, *, close_on: Locator) -> None:
    """Set one of the UI's date-time fields (a popover, not an ``<input>``) to ``when`` (UTC)."""
    field.click()
    popover = page.get_by_role("dialog").filter(has=page.get_by_placeholder("YYYY/MM/DD"))
    popover.get_by_placeholder("YYYY/MM/DD").fill(when.strftime("%Y/%m/%d"))
    popover.get_by_placeholder("HH:mm").fill(when.strftime("%H:%M"))
    # A click elsewhere closes the popover and keeps the value; at the corner of ``close_on``, which
    # the popover may cover in part.
    close_on.click(position={"x": 2, "y": 2})
    expect(popover).to_be_hidden()


class Screenshots:
    """Save each step of a UI test; copy the chosen ones, under stable names, to a published folder."""

    def __init__(self, artifacts: Path, published: Path | None) -> None:
        self.artifacts = artifacts
        self.published = published
        self.saved: list[Path] = []
        artifacts.mkdir(parents=True, exist_ok=True)
        if published is not None:
            published.mkdir(parents=True, exist_ok=True)

    def take(self, page: Page, name: str, *, publish_as: str | None = None, full_page: bool = False) -> Path:
        """Save ``<n>-<name>.png`` in the artifacts; also ``publish_as`` in the published folder."""
        path = self.artifacts / f"{len(self.saved) + 1:02d}-{name}.png"
        # No tooltip in the picture: they open on hover and on focus.
        page.mouse.move(page.viewport_size["width"] / 2 if page.viewport_size else 700, 2)
        page.evaluate("document.activeElement instanceof HTMLElement && document.activeElement.blur()")
        page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        self.saved.append(path)
        if publish_as is not None and self.published is not None:
            shutil.copyfile(path, self.published / publish_as)
        return path
