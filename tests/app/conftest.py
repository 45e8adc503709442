"""Fixtures of the app's tests: a runs folder with one image folder; no trainer outlives its test."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from app.launcher import command_line, is_trainer
from tests.app.train_helpers import png


@pytest.fixture(autouse=True)
def no_stray_trainers(tmp_path):
    """A failing test must not leave its trainer running: kill those working under its tmp_path."""
    yield
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_trainer(int(entry.name)) and \
                any(str(tmp_path) in part for part in command_line(int(entry.name))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    png(root / "photos" / "cat.png")
    return root
