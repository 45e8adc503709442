"""metrics.jsonl: one JSON line per optimizer step (step, loss, lr, sigma_t, seconds; val_loss when evaluated)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self._keep_until(resume_step)

    def _keep_until(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint so the file has each step once."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **values) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(values) + "\n")


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
