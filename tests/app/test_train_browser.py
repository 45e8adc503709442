"""Issue 17 end to end in headless Chromium: upload images, start a short run on the embedded
model, watch its progress move, stop it, resume it, let it finish, preview it on the Generate tab.

Skips, saying why, where Chromium or Playwright is missing (see test_app_browser.py). Set
APP_SCREENSHOT_DIR=docs to keep the Train tab's screenshots (docs/app_train.png, docs/app_live.png).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from app.callbacks import Studio
from tests.app.test_app import launched
from tests.app.test_app_browser import _require_browser, browser_page
from tests.app.train_helpers import png

RUN = "browser-run"
PROMPT = "a sks cat on a red sofa"
STEPS = 80  # long enough to be stopped part-way at ~0.2 s a step
FINISH_MS = 600_000  # the rest of the run: measured 3.3 s a step (not 0.2) while two other trainings shared the cores


# One rerun: on a loaded 2-core machine the freshly mounted upload box has been seen to miss the file
# once in several CI runs (the assertion message shows what the page said); a second failure is real.
@pytest.mark.flaky(reruns=1)
def test_train_stop_resume_finish_and_preview_in_the_browser(default_model_dir, tmp_path):
    _require_browser()
    root = tmp_path / "runs"
    root.mkdir()
    studio = Studio(default_model_dir, root, device="cpu")
    with launched(studio) as url, browser_page(url, tmp_path / "profile", height=1000) as page:
        page.get_by_role("tab", name="Train").click()
        _fill_form(page, png(tmp_path / "upload" / "my cat.png"))
        _screenshot(page, tmp_path, "app_train.png")
        page.locator("#train-start").click()
        _wait_text(page, "#live-summary", rf"{RUN}: training, step [1-9]\d* / {STEPS}", log=root / RUN / "train.log")
        _screenshot(page, tmp_path, "app_live.png")
        page.locator("#train-stop").click()
        _wait_text(page, "#live-summary", rf"{RUN}: stopped, step \d+ / {STEPS}")
        assert "exit code 130" in page.locator("#live-summary").inner_text()  # the trainer's stop code
        assert "Resume" in page.locator("#live-summary").inner_text()
        assert any(root.joinpath(RUN).glob("checkpoint-*"))
        page.locator("#train-resume").click()
        _wait_text(page, "#live-summary", rf"{RUN}: finished, step {STEPS} / {STEPS}", timeout_ms=FINISH_MS,
                   log=root / RUN / "train.log")
        assert page.locator("#live-samples img").count() >= 1
        _preview(page)


def _fill_form(page, image: Path) -> None:
    page.locator("#train-run-name textarea, #train-run-name input").first.fill(RUN)
    page.locator("#train-instance-prompt textarea, #train-instance-prompt input").first.fill(PROMPT)
    page.locator("#train-steps input").fill(str(STEPS))
    page.locator("#train-resolution input").fill("64")
    page.get_by_text("Samples, checkpoints, precision").click()
    page.locator("#train-sample-steps input").fill("2")
    _upload(page, image)


def _upload(page, image: Path, tries: int = 3) -> None:
    """Choose the file in the upload box; again if the box (mounted when the tab first opened)
    was not listening yet on a loaded machine."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        page.locator("#train-images input[type=file]").set_input_files(str(image))
        try:
            page.locator("#train-images").get_by_text(image.name).wait_for(timeout=30_000)  # the upload arrived
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise


def _preview(page) -> None:
    """The finished run is offered on the Generate tab, with its prompt; base and LoRA draw."""
    picker = page.locator("#run-picker input")
    page.wait_for_function("() => document.querySelector('#run-picker input').value === 'browser-run'")
    assert picker.input_value() == RUN
    page.get_by_role("tab", name="Generate").click()
    prompt = page.locator("#prompt textarea")
    page.wait_for_function(f"() => document.querySelector('#prompt textarea').value === {PROMPT!r}")
    assert prompt.input_value() == PROMPT  # the run's sample prompt (here its instance prompt)
    page.locator("#generate").click()
    for elem_id in ("base-image", "lora-image"):
        image = page.locator(f"#{elem_id} img")
        image.wait_for(state="visible")
        assert image.evaluate("img => img.complete && img.naturalWidth") == 64


def _wait_text(page, selector: str, pattern: str, timeout_ms: float | None = None, log: Path | None = None) -> None:
    """Wait until the element's text matches `pattern` (the live view refreshes every 2 s)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("([sel, pat]) => new RegExp(pat).test(document.querySelector(sel)?.innerText ?? '')",
                               arg=[selector, pattern], polling=200, timeout=timeout_ms)
    except PlaywrightTimeout:  # say what the page showed instead, and what the trainer wrote, so a failure can be read
        tail = log.read_text(errors="replace")[-1500:] if log is not None and log.is_file() else "(no train.log)"
        raise AssertionError(f"{selector} never matched {pattern!r}; it shows: "
                             f"{page.locator(selector).inner_text()!r}; train.log ends:\n{tail}") from None
    assert re.search(pattern, page.locator(selector).inner_text())


def _screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("APP_SCREENSHOT_DIR")
    if keep:
        shutil.copy(path, Path(keep) / name)
