"""Headless Chromium for the dashboard's browser tests: Debian's `chromium` driven by
Playwright for Python (no browser download). Without either the tests skip with the
reason, unless CORRAL_REQUIRE_BROWSER=1 (CI), where they fail instead.

Also the page steps both browser tests share: signing in through the form, and checks on
what the page drew (the curve's points, a screenshot that is not blank)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REQUIRE_BROWSER = os.environ.get("CORRAL_REQUIRE_BROWSER") == "1"
CHROMIUM = Path(os.environ.get("CORRAL_CHROMIUM", "/usr/bin/chromium"))
TIMEOUT_MS = 30_000
# The curve's series colours (dashboard.css: --loss, --validation).
LOSS_RGB = (0x1F, 0x6F, 0xD1)
VALIDATION_RGB = (0xD9, 0x48, 0x0F)


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"CORRAL_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright `Browser`), closed afterwards."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageErrors:
    """Script errors and console errors (a CSP refusal is one) a page reported."""

    messages: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        page.on("pageerror", lambda error: self.messages.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                self.messages.append(f"console: {message.text}")
                if message.type == "error"
                else None
            ),
        )
        page.on("dialog", lambda dialog: (self.messages.append("dialog"), dialog.dismiss()))


def sign_in(page: Any, base_url: str, key: str) -> None:
    """Open the dashboard, get sent to the form, sign in, and wait for the first update."""
    page.goto(f"{base_url}/dashboard")
    page.wait_for_url(f"{base_url}/dashboard/login")
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base_url}/dashboard")
    page.wait_for_selector('body[data-loaded="true"]')


def curve_points(page: Any) -> dict[str, int]:
    """How many points each series of the drawn curve has (its marks and its count)."""
    svg = page.locator("#curve svg")
    counts = {}
    for series, attribute in (("loss", "loss"), ("validation_loss", "validation-loss")):
        declared = int(svg.get_attribute(f"data-{attribute}-points") or "-1")
        marked = page.locator(f"#curve circle.point.{series}").count()
        assert declared == marked, (series, declared, marked)
        counts[series] = marked
    return counts


def colour_pixels(png: bytes, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """Pixels of a screenshot within `tolerance` (per channel) of `rgb`."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(
        count
        for count, pixel in image.getcolors(maxcolors=1 << 24) or []
        if all(abs(channel - want) <= tolerance for channel, want in zip(pixel, rgb, strict=True))
    )


def assert_not_blank(png: bytes) -> None:
    """A screenshot of a drawn page: many colours, and a fair share not background."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 24) or []
    total = image.width * image.height
    background = max(count for count, _ in colours)
    assert len(colours) > 50, f"{len(colours)} colours: blank?"
    assert total - background > total // 50, "almost every pixel is the background"
