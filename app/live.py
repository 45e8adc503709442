"""A run's live state, read from its folder only: metrics.jsonl, config.json, run.toml, train.log.

Works the same for a run the app started and one started on the command line: the trainer
writes a metrics line per step, config.json (with the resolved total_steps) when training
begins, samples as it goes, the LoRA files at the end, and its `error:` line to the log.
"""

from __future__ import annotations

import re
import statistics
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from flatlora_diffusion.lora.formats import DIFFUSERS_FILE

from .launcher import RUN_TOML, TRAIN_LOG, TRAIN_PID, Launcher, latest_log, log_lines
from .runs import list_samples, read_config, read_metrics

RUN_MARKERS = (RUN_TOML, "config.json", TRAIN_LOG, "metrics.jsonl")  # what makes a folder a training run
RECENT_STEPS = 20  # seconds per step: the median of the last steps (robust to a validation pause)
NEWEST_SAMPLES = 4
_ERROR_LINE = re.compile(r"^(?:\S+: )?error: .+")  # ours, or argparse's "train_dreambooth_flat.py: error: ..."


@dataclass
class Progress:
    """What the live view shows; `as_dict()` is the API's answer."""

    run: str
    state: str  # new | starting | training | stopped | finished | refused | failed
    step: int = 0
    total: int | None = None
    seconds_per_step: float | None = None
    seconds_left: float | None = None
    error: str | None = None  # the trainer's `error:` line when it refused the config
    pid: int | None = None
    exit_code: int | None = None  # known when this app started the run
    resumable: bool = False
    last_log_line: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One Markdown line for the page."""
        steps = f"step {self.step} / {self.total if self.total is not None else '?'}"
        parts = [f"**{self.run}**: {self.state}", steps]
        if self.seconds_per_step is not None:
            parts.append(f"{self.seconds_per_step:.2f} s/step")
        if self.state == "training" and self.seconds_left is not None:
            parts.append(f"about {format_duration(self.seconds_left)} left")
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        line = ", ".join(parts)
        if self.error:
            line += f"\n\n`{self.error}`"
        elif self.state == "stopped":
            line += "\n\nStopped with a checkpoint: **Resume** continues from it."
        elif self.state == "failed" and self.last_log_line:
            line += f"\n\nlast line of {TRAIN_LOG}: `{self.last_log_line}`"
        return line


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def run_folders(root: Path | None) -> list[Path]:
    """Training run folders under `root`, the most recently active first."""
    if root is None or not root.is_dir():
        return []
    found = [p for p in root.resolve().iterdir() if p.is_dir() and any((p / m).exists() for m in RUN_MARKERS)]
    return sorted(found, key=_last_activity, reverse=True)


def _last_activity(folder: Path) -> float:
    return max((folder / m).stat().st_mtime for m in (*RUN_MARKERS, TRAIN_PID) if (folder / m).exists())


def total_steps(folder: Path) -> int | None:
    """The run's step count: config.json's resolved total, else max_train_steps from it or run.toml."""
    config = read_config(folder)
    for key in ("total_steps", "max_train_steps"):
        if isinstance(config.get(key), int):
            return config[key]
    try:
        value = tomllib.loads((folder / RUN_TOML).read_text()).get("max_train_steps")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def read_progress(folder: Path, launcher: Launcher) -> Progress:
    """The run's state and numbers now."""
    folder = Path(folder)
    rows = [r for r in read_metrics(folder)[0] if isinstance(r.get("seconds"), (int, float))]
    progress = Progress(run=folder.name, state="new", step=int(rows[-1]["step"]) if rows else 0,
                        total=total_steps(folder), pid=launcher.running_pid(folder),
                        exit_code=launcher.exit_code(folder))
    if rows:
        progress.seconds_per_step = statistics.median(r["seconds"] for r in rows[-RECENT_STEPS:])
        if progress.total is not None:
            progress.seconds_left = max(progress.total - progress.step, 0) * progress.seconds_per_step
    lines = log_lines(latest_log(folder))
    progress.last_log_line = lines[-1][:300] if lines else ""
    progress.state = _state(folder, progress, lines)
    progress.resumable = progress.state in ("stopped", "failed") and any(folder.glob("checkpoint-*")) \
        and (folder / RUN_TOML).is_file()
    if progress.state == "refused":
        progress.error = next(line for line in reversed(lines) if _ERROR_LINE.match(line))
    return progress


def _state(folder: Path, progress: Progress, log_lines: list[str]) -> str:
    if progress.pid is not None:
        return "training" if (folder / "config.json").is_file() else "starting"
    if (folder / DIFFUSERS_FILE).is_file():
        return "finished"
    if any(_ERROR_LINE.match(line) for line in log_lines):
        return "refused"
    if any(folder.glob("checkpoint-*")):
        return "stopped"
    return "failed" if log_lines else "new"


def newest_samples(folder: Path, count: int = NEWEST_SAMPLES) -> list[tuple[Path, str]]:
    """The last `count` validation samples (the latest step's, or the final ones)."""
    return list_samples(folder)[-count:]
