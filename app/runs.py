"""The LoRA sources the app may load, and the run-folder files it shows, read defensively.

A *source* is one selectable entry: a training run folder (`outputs/<run>/`, loaded through its
`pytorch_lora_weights.safetensors`), a loose `.safetensors` file in the runs folder, or a file
named on the command line. Only these are ever opened: a choice from the UI or the API is a
label looked up in a fresh `discover_sources`, never a path, so a client cannot make the
server read anything else. Files are read only with safetensors (no pickle anywhere).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from flatlora_diffusion.lora.formats import DIFFUSERS_FILE, KOHYA_FILE, read_lora_metadata

SUFFIX = ".safetensors"
FILE_LABEL = "file: "  # prefix that tells a loose file from a run folder in the run picker
_SAMPLE_NAME = re.compile(r"^(?:step(?P<step>\d+)|final)_(?P<index>\d+)_(?P<slug>.*)\.png$")


class AppError(ValueError):
    """A user-facing problem (unknown run, bad value); the UI shows its message."""


@dataclass(frozen=True)
class LoraSource:
    """One entry of the run picker: the LoRA file to load and, for a run, its folder."""

    label: str
    file: Path
    folder: Path | None = None  # the training run folder; None for a loose file

    def downloads(self) -> list[Path]:
        """The LoRA files a user may download for this entry (both formats for a run)."""
        if self.folder is None:
            return [self.file]
        return [p for p in (self.folder / DIFFUSERS_FILE, self.folder / KOHYA_FILE) if p.is_file()]


def check_lora_path(path: str | Path) -> Path:
    """A command-line LoRA file, resolved; anything but an existing .safetensors raises AppError."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise AppError(f"{path}: only {SUFFIX} LoRA files are loaded (never pickle files)")
    if not path.is_file():
        raise AppError(f"{path}: no such file")
    return path.resolve()


def discover_sources(runs_dir: Path | None, extra_files: tuple[Path, ...] = ()) -> dict[str, LoraSource]:
    """{label: source}: run folders (newest first), loose files in `runs_dir`, then `extra_files`."""
    sources: list[LoraSource] = []
    if runs_dir is not None and runs_dir.is_dir():
        root = runs_dir.resolve()
        sources += sorted(_run_folders(root), key=lambda s: s.file.stat().st_mtime, reverse=True)
        sources += [LoraSource(FILE_LABEL + p.name, p) for p in sorted(root.glob("*" + SUFFIX))
                    if _inside(p, root) and p.is_file()]
    sources += [LoraSource(FILE_LABEL + str(p), p) for p in extra_files]
    return {s.label: s for s in sources}


def _run_folders(root: Path) -> list[LoraSource]:
    runs = []
    for folder in (f for f in root.iterdir() if f.is_dir()):
        # The diffusers file first: its metadata carries each module's exact alpha.
        file = next((folder / n for n in (DIFFUSERS_FILE, KOHYA_FILE) if (folder / n).is_file()), None)
        # A symlink out of the runs folder is not part of it.
        if file is not None and _inside(file, root):
            runs.append(LoraSource(folder.name, file.resolve(), folder.resolve()))
    return runs


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def lookup(sources: dict[str, LoraSource], label: str | None, what: str = "run") -> LoraSource:
    """The source named `label`; an unknown or empty label raises AppError naming `what`."""
    if not label:
        raise AppError(f"choose a {what} first (train one with `make demo`, or pass --lora FILE)")
    if label not in sources:
        raise AppError(f"{what} {label!r} is not in the runs folder or the command line; press refresh")
    return sources[label]


def read_metrics(folder: Path | None) -> tuple[list[dict], int]:
    """(rows of metrics.jsonl with a numeric step, number of lines skipped as unreadable).

    Tolerant on purpose: a run that is still training may have a half-written last line.
    """
    path = None if folder is None else folder / "metrics.jsonl"
    if path is None or not path.is_file():
        return [], 0
    rows, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def read_config(folder: Path | None) -> dict:
    """The run's config.json, or {"error": ...} when it is missing or unreadable."""
    path = None if folder is None else folder / "config.json"
    if path is None or not path.is_file():
        return {"error": "no config.json (not a training run folder)"}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return {"error": f"config.json is not valid JSON ({error})"}
    return config if isinstance(config, dict) else {"error": "config.json is not a JSON object"}


def suggested_prompt(source: LoraSource) -> str | None:
    """The prompt a run was trained for: its first validation prompt, else its instance prompt.

    From config.json for a run folder, else the LoRA file's metadata (`instance_prompt`, written by the trainer).
    """
    config = read_config(source.folder) if source.folder is not None else {}
    validation = config.get("validation_prompt")
    candidates = [validation[0] if isinstance(validation, list) and validation else validation,
                  config.get("instance_prompt")]
    try:
        candidates.append(read_lora_metadata(source.file).get("instance_prompt"))
    except ValueError:  # not readable safetensors: no suggestion from it
        pass
    return next((c for c in candidates if isinstance(c, str) and c.strip()), None)


def read_metadata(file: Path) -> dict:
    """The LoRA file's safetensors metadata, JSON-valued entries expanded for reading.

    Raises LoraFileError (a ValueError) for a file that is not readable safetensors.
    """
    metadata: dict = dict(read_lora_metadata(file))
    for key, value in metadata.items():
        if value.startswith(("{", "[")):  # e.g. diffusers' lora_adapter_metadata holds a JSON LoraConfig
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                pass  # shown as the string it is
    return metadata


def list_samples(folder: Path | None) -> list[tuple[Path, str]]:
    """[(png, caption)] of the run's validation samples, by step, the final ones last."""
    samples_dir = None if folder is None else folder / "samples"
    if samples_dir is None or not samples_dir.is_dir():
        return []
    found = []
    for path in samples_dir.glob("*.png"):
        match = _SAMPLE_NAME.match(path.name)
        if match is None:
            continue
        step = match["step"]
        when = f"step {int(step)}" if step else "final"
        order = (int(step) if step else float("inf"), int(match["index"]), path.name)
        found.append((order, path, f"{when}: {match['slug'].replace('_', ' ')}"))
    return [(path, caption) for _, path, caption in sorted(found, key=lambda item: item[0])]
