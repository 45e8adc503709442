"""Start, stop and find training processes: the app trains through the command line only.

    launcher = Launcher(runs_root)
    launcher.start(folder)                 # python train_dreambooth_flat.py --config folder/run.toml
    launcher.stop(folder)                  # SIGTERM: the trainer checkpoints and exits 130
    launcher.start(folder, resume=True)    # ... --resume_from_checkpoint latest

The trainer runs in its own session (closing the app, or Ctrl-C in its terminal, leaves it
training), writes its output to `train.log` and is recorded in `train.pid` with its start time,
so a restarted app finds it again and never takes a reused pid for it. Runs started on the
command line are found through /proc too. One run at a time.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

from flatlora_diffusion.atomic import atomic_file

from .runs import AppError

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINER = "train_dreambooth_flat.py"
RUN_TOML, TRAIN_LOG, TRAIN_PID = "run.toml", "train.log", "train.pid"
LOG_MARK = "# flatlora app: "  # starts the log's section of each start or resume
DEFAULT_OUTPUT_DIR = "outputs/flatlora-run"  # TrainConfig's default, for a command line without one


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rfind(")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):  # exited, waiting to be reaped: not training
        return None
    return int(fields[19])  # field 22 of stat; 3 is the state


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_trainer(pid: int, ticks: int | None = None) -> bool:
    """True while `pid` is a live train_dreambooth_flat.py (started at `ticks`, when given)."""
    now = start_ticks(pid)
    if now is None or (ticks is not None and now != ticks):
        return False
    return any(Path(part).name == TRAINER for part in command_line(pid)[:3])


def trainer_output_dir(pid: int) -> Path | None:
    """The --output_dir of a command-line trainer (from its flags or its --config), resolved."""
    args = command_line(pid)
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
    flags = dict(zip(args, args[1:]))
    output = flags.get("--output_dir")
    if output is None and "--config" in flags:
        try:
            output = tomllib.loads((cwd / flags["--config"]).read_text()).get("output_dir")
        except (OSError, ValueError):
            return None
    return (cwd / (output or DEFAULT_OUTPUT_DIR)).resolve()


def command_line_trainers() -> dict[Path, int]:
    """{output folder: pid} of every train_dreambooth_flat.py running on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_trainer(int(entry.name)):
            folder = trainer_output_dir(int(entry.name))
            if folder is not None:
                found[folder] = int(entry.name)
    return found


class Launcher:
    """The training processes of one runs root."""

    def __init__(self, runs_root: Path | None, trainer: Path = REPO_ROOT / TRAINER):
        self.root = Path(runs_root) if runs_root is not None else None
        self.trainer = Path(trainer)  # the script (tests put a stand-in of the same name here)
        self._children: dict[Path, subprocess.Popen] = {}  # started by this app: reaped, exit codes known
        self._starting = threading.Lock()  # two Start clicks at once must not both pass the busy check

    def start(self, folder: Path, resume: bool = False) -> int:
        """Start the trainer on `folder`/run.toml (resuming from its latest checkpoint); its pid."""
        folder = Path(folder).resolve()
        if not (folder / RUN_TOML).is_file():
            raise AppError(f"{folder.name} has no {RUN_TOML}: it was not started from the app; "
                           "resume it with its own command line plus --resume_from_checkpoint latest")
        with self._starting:
            self.check_idle()
            return self._spawn(folder, resume)

    def check_idle(self) -> None:
        """AppError while a run under the runs root is training: one run at a time."""
        busy = self.active()
        if busy is not None:
            raise AppError(f"run {busy.name} is training; stop it or wait for it to finish (one run at a time)")

    def _spawn(self, folder: Path, resume: bool) -> int:
        command = [sys.executable, str(self.trainer), "--config", str(folder / RUN_TOML)]
        if resume:
            command += ["--resume_from_checkpoint", "latest"]
        with (folder / TRAIN_LOG).open("a") as log:
            log.write(f"{LOG_MARK}{time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            log.flush()
            # stdin closed, own session: the child outlives the app and ignores its terminal's Ctrl-C
            child = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._children[folder] = child
        record = {"pid": child.pid, "start_ticks": start_ticks(child.pid), "command": command,
                  "started_at": time.time()}
        with atomic_file(folder / TRAIN_PID) as tmp:
            tmp.write_text(json.dumps(record))
        return child.pid

    def running_pid(self, folder: Path, elsewhere: dict[Path, int] | None = None) -> int | None:
        """The pid training `folder` now (started by any app or on the command line), or None.

        `elsewhere`: command_line_trainers(), when the caller has it already.
        """
        folder = Path(folder).resolve()
        child = self._children.get(folder)
        if child is not None:
            child.poll()  # reaps an exited child, so its pid no longer reads as alive
        record = read_pid_file(folder)
        # Without its start time a pid could be anyone's by now: such a record proves nothing.
        if record is not None and isinstance(record.get("start_ticks"), int) and \
                is_trainer(record["pid"], record["start_ticks"]):
            return record["pid"]
        return (command_line_trainers() if elsewhere is None else elsewhere).get(folder)

    def exit_code(self, folder: Path) -> int | None:
        """The exit code of the trainer this app started on `folder`, once it has ended."""
        child = self._children.get(Path(folder).resolve())
        return None if child is None else child.poll()

    def active(self) -> Path | None:
        """The run folder being trained under the runs root, if any."""
        if self.root is None or not self.root.is_dir():
            return None
        elsewhere = command_line_trainers()
        for folder in sorted(p for p in self.root.resolve().iterdir() if p.is_dir()):
            if self.running_pid(folder, elsewhere) is not None:
                return folder
        return None

    def stop(self, folder: Path) -> int:
        """SIGTERM to the trainer of `folder`; it checkpoints after the current step and exits 130."""
        pid = self.running_pid(folder)
        if pid is None:
            raise AppError(f"{Path(folder).name} is not training")
        os.kill(pid, signal.SIGTERM)
        return pid

    def wait(self, folder: Path, timeout: float) -> int | None:
        """Wait for the trainer this app started on `folder` to end; its exit code (None: still running)."""
        child = self._children.get(Path(folder).resolve())
        if child is None:
            return None
        try:
            return child.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def read_pid_file(folder: Path) -> dict | None:
    """train.pid's record, or None when it is missing or unreadable."""
    try:
        record = json.loads((Path(folder) / TRAIN_PID).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def log_lines(text: str) -> list[str]:
    """Non-empty lines as a terminal shows them: of a progress bar's \r-updates only the last."""
    lines = (line.rsplit("\r", 1)[-1].strip() for line in text.split("\n"))
    return [line for line in lines if line]


def latest_log(folder: Path, max_chars: int = 200_000) -> str:
    """The part of train.log written since the last start or resume (its tail if huge)."""
    try:
        text = (Path(folder) / TRAIN_LOG).read_text(errors="replace")[-max_chars:]
    except OSError:
        return ""
    mark = text.rfind(LOG_MARK)
    return text if mark < 0 else text[text.find("\n", mark) + 1:]
