"""metrics.jsonl: one JSON line per optimizer step (step, loss, lr, sigma_t, seconds; val_loss when evaluated)."""

from __future__ import annotations

import json
from pathlib import Path

from flatlora_diffusion.atomic import atomic_file, unwritable_as_output_error


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self._keep_until(resume_step)

    def _keep_until(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint so the file has each step once."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        with atomic_file(self.path) as tmp:  # a crash here must not lose the steps before the checkpoint
            tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, **values) -> None:
        with unwritable_as_output_error(self.path), self.path.open("a") as f:
            f.write(json.dumps(values) + "\n")


def _step_of(line: str) -> float:
    """The step of one metrics line; a blank or half-written one (a killed process) counts as never written."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
