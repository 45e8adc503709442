"""What the app's buttons do, as plain functions of a `Studio` (no Gradio here, so tests call them).

    studio = Studio("models/tiny-sdxl", runs_dir=Path("outputs"))
    base, lora, _ = generate_images(studio, "demo-...", "a photo of sks cat", seed=0, lora_scale=1.0,
                                    settings=Settings(steps=20, width=64, height=64))

Generation goes through flatlora_diffusion.inference: the base pipeline is loaded once, each
LoRA file is attached once as its own adapter, and switching runs or scales only changes which
adapter is active at what scale. User mistakes raise AppError (or LoraFileError for a bad file),
both ValueErrors whose message the UI shows.
"""

from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from matplotlib.figure import Figure

from flatlora_diffusion.inference import apply_loras, generate, load_base, lora_disabled

from .deadline import GenerationClock
from .runs import AppError, LoraSource, discover_sources, list_samples, lookup, read_config, read_metadata, read_metrics

Progress = Callable[..., None]  # progress(fraction, desc=...), as gr.Progress is called
MAX_SEED = 2**32 - 1
MAX_SWEEP = 8  # images of one scale sweep: each costs a full generation


def _no_progress(fraction: float, desc: str = "") -> None:
    """Default progress reporter for callers without a UI."""


class Studio:
    """The app's state: one base pipeline (loaded on first use, never again) and the LoRA sources."""

    def __init__(self, base: str | Path, runs_dir: Path | None, lora_files: tuple[Path, ...] = (),
                 device: str | None = None):
        self.base = str(base)
        self.runs_dir = runs_dir
        self.lora_files = tuple(lora_files)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 halves SDXL's memory on a GPU; SDXL's VAE config asks diffusers to decode in fp32.
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.base_loads = 0  # how often the base was loaded: must stay 1
        self._pipe = None
        # One generation at a time: adapter switching changes the shared pipeline's state.
        self._lock = threading.RLock()
        self.clock = GenerationClock()  # cancels a generation that runs far past a base one's time

    def sources(self) -> dict[str, LoraSource]:
        """The selectable runs and files, found afresh (runs may finish while the app is open)."""
        return discover_sources(self.runs_dir, self.lora_files)

    def allowed_paths(self) -> list[str]:
        """Folders and files the web server may send to the browser (samples, downloads)."""
        folders = [str(self.runs_dir.resolve())] if self.runs_dir is not None else []
        return folders + [str(p) for p in self.lora_files]

    @contextlib.contextmanager
    def pipeline(self) -> Iterator:
        """The base pipeline, held exclusively inside the block; loads it the first time."""
        with self._lock:
            if self._pipe is None:
                self._pipe = load_base(self.base, dtype=self.dtype, device=self.device)
                self.base_loads += 1
            yield self._pipe

    def default_size(self) -> int:
        """The base model's native resolution (1024 for SDXL, 64 for the embedded tiny model)."""
        with self.pipeline() as pipe:
            return int(pipe.default_sample_size * pipe.vae_scale_factor)


@dataclass(frozen=True)
class Settings:
    """Sampling settings shared by every image of one comparison, so only the LoRA differs."""

    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024

    def __post_init__(self):
        if not 1 <= self.steps <= 200:
            raise AppError(f"steps must be between 1 and 200, got {self.steps}")
        if not 0 <= self.guidance <= 30:
            raise AppError(f"guidance must be between 0 and 30, got {self.guidance}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 64 or value > 4096 or value % 8:
                raise AppError(f"{name} must be a multiple of 8 between 64 and 4096, got {value}")

    def as_kwargs(self) -> dict:
        """The keyword arguments of inference.generate."""
        return dict(negative_prompt=self.negative_prompt, steps=self.steps, guidance=self.guidance,
                    width=self.width, height=self.height)


def check_seed(seed) -> int:
    """The seed as an int; Gradio's number boxes send floats."""
    try:
        whole = float(seed).is_integer() and 0 <= int(seed) <= MAX_SEED
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise AppError(f"seed must be a whole number between 0 and {MAX_SEED}, got {seed!r}")
    return int(seed)


def check_prompt(prompt: str | None) -> str:
    """The prompt, which must not be empty."""
    if not prompt or not prompt.strip():
        raise AppError("type a prompt first")
    return prompt


def random_seed(rng: random.Random | None = None) -> int:
    """A fresh seed for the randomise button; pass `rng` for a reproducible one."""
    # SystemRandom: never touches (or depends on) the global RNG that torch or a test may seed.
    return (rng or random.SystemRandom()).randint(0, MAX_SEED)


def generate_images(studio: Studio, run: str, prompt: str, seed, lora_scale: float, settings: Settings,
                    compare: str | None = None, progress: Progress = _no_progress):
    """(base, LoRA, comparison LoRA or None): the same prompt, seed and settings for each image."""
    sources = studio.sources()
    source = lookup(sources, run)
    other = lookup(sources, compare, "comparison run") if compare else None
    prompt, seed, scale = check_prompt(prompt), check_seed(seed), float(lora_scale)
    total = 3 if other else 2
    with studio.pipeline() as pipe:
        if other is not None:  # load it first, so a bad file fails before any image is drawn
            apply_loras(pipe, [(other.file, scale)])
        progress(0 / total, desc=f"base and LoRA {source.label}")
        apply_loras(pipe, [(source.file, scale)])
        with lora_disabled(pipe), studio.clock.measuring(settings):  # the base time sets the LoRA's limit
            base = generate(pipe, prompt, seed, **settings.as_kwargs(), time_limit_s=studio.clock.limit_s(settings))
        lora = generate(pipe, prompt, seed, **settings.as_kwargs(), time_limit_s=studio.clock.limit_s(settings))
        third = None
        if other is not None:
            progress(2 / total, desc=f"LoRA {other.label}")
            apply_loras(pipe, [(other.file, scale)])
            third = generate(pipe, prompt, seed, **settings.as_kwargs(), time_limit_s=studio.clock.limit_s(settings))
    progress(1.0, desc="done")
    return base, lora, third


def parse_scales(text: str) -> list[float]:
    """'0, 0.5, 1, 1.5' -> [0.0, 0.5, 1.0, 1.5]; junk or too many values raise AppError."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        scales = [float(p) for p in parts]
    except ValueError:
        raise AppError(f"scales must be numbers separated by commas, got {text!r}") from None
    if not 1 <= len(scales) <= MAX_SWEEP:
        raise AppError(f"give 1 to {MAX_SWEEP} scales, got {len(scales)}")
    return scales


def scale_sweep(studio: Studio, run: str, prompt: str, seed, scales_text: str, settings: Settings,
                progress: Progress = _no_progress) -> list[tuple[object, str]]:
    """[(image, 'scale s')] for each LoRA scale, same seed: how strongly the LoRA should be applied."""
    source = lookup(studio.sources(), run)
    prompt, seed, scales = check_prompt(prompt), check_seed(seed), parse_scales(scales_text)
    images = []
    with studio.pipeline() as pipe:
        for i, scale in enumerate(scales):
            progress(i / len(scales), desc=f"scale {scale:g}")
            apply_loras(pipe, [(source.file, scale)])
            image = generate(pipe, prompt, seed, **settings.as_kwargs(), time_limit_s=studio.clock.limit_s(settings))
            images.append((image, f"scale {scale:g}"))
    progress(1.0, desc="done")
    return images


@dataclass
class RunView:
    """Everything the run browser shows for one source."""

    samples: list[tuple[Path, str]]
    figure: Figure | None
    config: dict
    metadata: dict
    downloads: list[Path]
    message: str


def browse(studio: Studio, run: str | None) -> RunView:
    """The run browser's content for `run`; problems become the message, never an exception."""
    try:
        source = lookup(studio.sources(), run)
    except AppError as error:
        return RunView([], None, {}, {}, [], str(error))
    notes = []
    try:
        metadata = read_metadata(source.file)
    except ValueError as error:  # LoraFileError: not readable safetensors
        metadata, notes = {}, [f"cannot read the LoRA file: {error}"]
    rows, skipped = read_metrics(source.folder)
    if skipped:
        notes.append(f"metrics.jsonl: skipped {skipped} unreadable line(s)")
    config = read_config(source.folder) if source.folder is not None else {}
    message = "; ".join(notes) or f"{source.label}: {source.file.name}"
    return RunView(list_samples(source.folder), metrics_figure(rows), config, metadata, source.downloads(), message)


def metrics_figure(rows: list[dict]) -> Figure | None:
    """Loss (raw, smoothed and, when logged, the validation loss) and sigma_t against step, or None without metrics."""
    if not rows:
        return None
    figure = Figure(figsize=(9, 3.2), layout="constrained")  # no pyplot: thread-safe, no GUI backend
    loss_axes, sigma_axes = figure.subplots(1, 2)
    rows = [r for r in rows if not r.get("skipped")]  # a skipped step's loss is NaN (it changed nothing)
    steps = [r["step"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    loss_axes.plot(steps, losses, alpha=0.35, label="loss")
    loss_axes.plot(steps, _smooth(losses), label="smoothed")
    val_rows = [r for r in rows if "val_loss" in r]  # --validation_loss_every: fixed images, noise, timesteps
    if val_rows:
        loss_axes.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation loss")
    loss_axes.set(title="training loss", xlabel="step")
    loss_axes.legend()
    sigma_rows = [r for r in rows if "sigma_t" in r]
    sigma_axes.plot([r["step"] for r in sigma_rows], [r["sigma_t"] for r in sigma_rows], color="tab:green")
    sigma_axes.set(title="Flat-LoRA sigma_t", xlabel="step")
    return figure


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the curve starts at the first value."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out
