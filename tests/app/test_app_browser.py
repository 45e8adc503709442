"""Issue 6 end to end: a real headless Chromium types a prompt, clicks Generate, sees both images.

Uses Debian's chromium (.ci/install_browser.sh installs it) driven by Playwright for Python;
skips, saying why, where either is missing. Set APP_SCREENSHOT=docs/app_screenshot.png to keep
the page's screenshot (the README's picture).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from tests.app.test_app import launched, make_runs_folder

CHROMIUM = Path("/usr/bin/chromium")
# Quiet, isolated, offline: no GPU, no sandbox (root in CI), no background calls home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000  # a loaded 2-core CI machine; generation itself takes seconds


def _require_browser():
    if not CHROMIUM.is_file() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(f"no {CHROMIUM}: run .ci/install_browser.sh (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")


@pytest.fixture(scope="module")
def studio(default_model_dir, tmp_path_factory):
    from app.callbacks import Studio

    return Studio(default_model_dir, make_runs_folder(default_model_dir, tmp_path_factory.getbasetemp()),
                  device="cpu")


@contextlib.contextmanager
def browser_page(url: str, profile: Path, height: int = 900):
    """A headless Chromium page on `url` (the system browser; skips where there is none)."""
    sync_api = _require_browser()
    with sync_api.sync_playwright() as playwright:
        # Playwright refuses --user-data-dir in args: a persistent context is how it takes one.
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": height})
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            yield page
        finally:
            context.close()


def test_prompt_generate_shows_base_and_lora_images(studio, tmp_path):
    _require_browser()
    with launched(studio) as url, browser_page(url, tmp_path / "profile") as page:
        page.locator("#prompt textarea").fill("a photo of sks cat on a sofa")
        page.locator("#generate").click()
        for elem_id in ("base-image", "lora-image"):
            image = page.locator(f"#{elem_id} img")
            image.wait_for(state="visible")
            assert image.evaluate("img => img.complete && img.naturalWidth") == 64
        assert "seed 0" in page.locator("#status").inner_text()
        _screenshot(page, tmp_path / "app.png")


def _screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("APP_SCREENSHOT")
    if keep:
        shutil.copy(path, keep)
