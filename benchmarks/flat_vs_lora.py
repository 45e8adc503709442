"""Flat-LoRA's cost side by side with plain LoRA and with a minimal reference step.

    python -m benchmarks.flat_vs_lora --model tiny --resolution 64 --steps 20
    python -m benchmarks.flat_vs_lora --model sdxl --resolution 256 --precision bf16 --steps 3 --warmup 1

Three variants of one optimizer step on the same model, data and settings:

  lora       our trainer's step, `training.optimizer_step(run, step)`, on a Run built by
             `training.setup(TrainConfig)`, with Flat-LoRA at sigma 0 (plain LoRA exactly).
  flat       the same call with Flat-LoRA at --sigma (constant schedule, so every step pays
             the full cost: one noise draw per LoRA layer in forward, one in backward, row norms).
  reference  a minimal step written here: the same PEFT-LoRA UNet, fixed latents and prompt
             embeddings, the standard SDXL epsilon loss, backward, grad-norm clip, AdamW. Nothing else.

Optional variants (--variants): flat_buffer = flat with the per-step noise buffer
(--flat_noise_buffer); flat_baseline = flat with the FlatLora of --baseline-package (e.g. a copy
of an older flatlora_diffusion.flat importable under another name), for before/after in one run.
--accumulation N runs N micro-batches per optimizer step in every variant.

What is timed: the whole optimizer step (data of the step from the caches, forward, backward,
clipping, optimizer, LR scheduler, zero_grad), wall clock, CUDA-synchronised on a GPU. The
variants are interleaved in one process (lora, flat, reference, then rotated each round), so
a change in machine load hits all of them alike; the first --warmup rounds are dropped; the
median is reported.

Peak memory: each variant is also run alone in a fresh subprocess. On a GPU:
torch.cuda.max_memory_allocated over the steps (weights included). On the CPU: the process's
peak resident set (VmHWM = getrusage ru_maxrss) over the steps, after resetting the high-water
mark to the current RSS just before the first step (/proc/self/clear_refs), so that model
construction cannot hide the training peak; "step +MiB" is that peak minus the RSS before the
first step. glibc keeps freed large buffers for reuse when they were allocated from its heap
(its mmap threshold adapts upwards), so on the CPU the peak RSS can include freed per-layer
buffers; --mmap-threshold 131072 fixes the threshold for the probes, and the peak is then that
of live memory (what max_memory_allocated reports on a GPU).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image

from flatlora_diffusion.flat.flat_lora import FlatLora
from flatlora_diffusion.training import loop as training
from flatlora_diffusion.training import setup as training_setup
from flatlora_diffusion.training.config import TrainConfig

from .machine import print_machine
from .models import MODELS, build_parts, parameter_count

VARIANTS = ("lora", "flat", "reference")
EXTRA_VARIANTS = ("flat_buffer", "flat_baseline")
ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS
PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------ the three steps

def make_run(args: argparse.Namespace, workdir: Path) -> training.Run:
    """A Run exactly as `training.setup` builds it, except that the SDXL parts come from memory."""
    images = workdir / "instance"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "0.png")
    config = TrainConfig(
        pretrained_model_name_or_path=f"benchmark:{args.model}", instance_data_dir=str(images),
        instance_prompt="a photo of sks dog", output_dir=str(workdir / "out"), resolution=args.resolution,
        center_crop=True, rank=args.rank, flat_sigma=args.sigma, flat_schedule="constant",
        max_train_steps=10**6, checkpointing_steps=10**9, mixed_precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, train_text_encoder=args.train_text_encoder,
        train_batch_size=args.batch, gradient_accumulation_steps=args.accumulation)
    parts = build_parts(args.model, PRECISIONS[args.precision])
    with mock.patch.object(training_setup, "load_sdxl", lambda *_: parts):
        return training.setup(config)


class Variants:
    """Our step with Flat-LoRA off and on, and the minimal reference step, on one model."""

    def __init__(self, run: training.Run, names: list[str], baseline_package: str | None = None):
        self.run = run
        models, sigma, seed = training.unwrapped(run), run.config.flat_sigma, run.config.noise_seed
        self.flats = {"flat": run.flat, "lora": FlatLora(models, sigma=0.0, schedule="constant")}
        if "flat_buffer" in names:
            self.flats["flat_buffer"] = FlatLora(models, sigma=sigma, schedule="constant", seed=seed,
                                                 noise_buffer=True)
        if "flat_baseline" in names:
            baseline = importlib.import_module(f"{baseline_package}.flat_lora").FlatLora
            self.flats["flat_baseline"] = baseline(models, sigma=sigma, schedule="constant", seed=seed)
        self.reference = ReferenceStep(run)
        self.steps = dict.fromkeys(ALL_VARIANTS, 0)

    def step(self, variant: str) -> None:
        index = self.steps[variant]
        self.steps[variant] += 1
        if variant == "reference":
            self.reference.step()
            return
        self.run.flat = self.flats[variant]
        training.optimizer_step(self.run, index)

    def draws_per_layer_step(self, variant: str) -> float | None:
        """Full-size noise draws per perturbed layer per optimizer step so far (None: not counted)."""
        flat = self.flats.get(variant)
        if flat is None or not hasattr(flat, "draw_counts") or not self.steps[variant] or flat.sigma == 0:
            return None
        perturbed = set(flat.layer_names)
        draws = sum(n for name, n in flat.draw_counts().items() if name in perturbed)
        return draws / len(perturbed) / self.steps[variant]


class ReferenceStep:
    """The textbook SDXL LoRA step (as the diffusers DreamBooth LoRA SDXL script's inner loop)."""

    def __init__(self, run: training.Run):
        models = training.unwrapped(run)
        cfg, device = run.config, run.accelerator.device
        self.unet = models["unet"]
        self.encoders = [models[k] for k in ("text_encoder", "text_encoder_2") if k in models]
        self.params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate)
        self.scheduler = run.parts.noise_scheduler
        self.dtype = PRECISIONS[cfg.mixed_precision]
        self.device = torch.device(device)
        self.accumulation = cfg.gradient_accumulation_steps
        size, batch = cfg.resolution // 8, cfg.train_batch_size
        self.latents = torch.randn(batch, 4, size, size, device=device, dtype=self.dtype)
        self.time_ids = torch.tensor([[cfg.resolution, cfg.resolution, 0, 0, cfg.resolution, cfg.resolution]] * batch,
                                     device=device, dtype=self.dtype)
        tokenizers = run.parts.tokenizers
        self.ids = [t([cfg.instance_prompt] * batch, padding="max_length", max_length=t.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device) for t in tokenizers]
        with torch.no_grad(), self._autocast():
            self.frozen_embeds = self._encode(run.parts.text_encoders)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _encode(self, encoders):
        out1 = encoders[0](self.ids[0], output_hidden_states=True)
        out2 = encoders[1](self.ids[1], output_hidden_states=True)
        return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1), out2[0]

    def step(self) -> None:
        for _ in range(self.accumulation):
            self.micro_batch()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def micro_batch(self) -> None:
        noise = torch.randn_like(self.latents)
        timesteps = torch.randint(0, 1000, (self.latents.shape[0],), device=self.latents.device)
        noisy = self.scheduler.add_noise(self.latents, noise, timesteps)
        with self._autocast():
            hidden, pooled = self._encode(self.encoders) if self.encoders else self.frozen_embeds
            prediction = self.unet(noisy, timesteps, hidden,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids}).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float()) / self.accumulation
        loss.backward()


# ------------------------------------------------------------------ measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants: Variants, names: list[str], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each variant; round r runs the variants rotated by r (ABC, BCA, ...)."""
    device = torch.device(variants.run.accelerator.device)
    times = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            started = time.perf_counter()
            variants.step(name)
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_memory_alone(variants: Variants, name: str, steps: int) -> dict[str, float]:
    """Peak memory (MiB) of `steps` steps of one variant, in this (fresh) process."""
    device = torch.device(variants.run.accelerator.device)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            variants.step(name)
        _sync(device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM (and ru_maxrss) := current RSS
    for _ in range(steps):
        variants.step(name)
    peak = _proc_status_kib("VmHWM")
    return {"peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}


def memory_in_subprocesses(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, float]]:
    result = {}
    for name in names:
        command = [sys.executable, "-m", "benchmarks.flat_vs_lora", *args.argv, "--memory-probe", name]
        env = dict(os.environ)
        if args.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                              env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe {name} failed:\n{done.stderr[-3000:]}")
        result[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------ report

def summarise(times: dict[str, list[float]], memory: dict[str, dict[str, float]]) -> dict:
    rows = {}
    for name, values in times.items():
        rows[name] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
                      "n": len(values), **memory.get(name, {})}
    ratios = {}
    for top, bottom in (("flat", "lora"), ("flat_buffer", "lora"), ("flat_baseline", "lora"), ("lora", "reference")):
        if top in rows and bottom in rows:
            ratio = {"time": rows[top]["median_s"] / rows[bottom]["median_s"]}
            if "peak_mib" in rows[top] and "peak_mib" in rows[bottom]:
                ratio["memory"] = rows[top]["peak_mib"] / rows[bottom]["peak_mib"]
            ratios[f"{top}/{bottom}"] = ratio
    return {"rows": rows, "ratios": ratios}


def print_report(args: argparse.Namespace, run: training.Run, summary: dict) -> None:
    print_machine(torch.device(run.accelerator.device).type)
    perturbed = set(run.flat.layer_names)
    flat_params = sum(t.layer.get_base_layer().weight.numel() for t in run.flat._targets if t.name in perturbed)
    print(f"# model {args.model}: UNet {parameter_count(run.parts.unet) / 1e6:.1f} M params, "
          f"{len(run.flat.layer_names)} LoRA layers over {flat_params / 1e6:.1f} M base weights "
          f"(the numbers Flat-LoRA draws per noise pass)")
    print(f"# settings: {args.resolution} px, batch {args.batch}, rank {args.rank}, precision {args.precision}, "
          f"sigma {args.sigma}, gradient checkpointing {args.gradient_checkpointing}, "
          f"text encoders trained {args.train_text_encoder}, accumulation {args.accumulation}, "
          f"{args.steps} timed rounds after {args.warmup} warm-up")
    print(f"{'variant':<13} {'median s/step':>14} {'min':>9} {'max':>9} {'peak MiB':>10} {'step +MiB':>10} "
          f"{'draws/layer/step':>17}")
    for name, row in summary["rows"].items():
        peak = f"{row['peak_mib']:10.1f} {row['step_mib']:10.1f}" if "peak_mib" in row else f"{'-':>10} {'-':>10}"
        draws = f"{row['draws']:17.2f}" if row.get("draws") is not None else f"{'-':>17}"
        print(f"{name:<13} {row['median_s']:14.4f} {row['min_s']:9.4f} {row['max_s']:9.4f} {peak} {draws}")
    for label, ratio in summary["ratios"].items():
        memory = f"  peak-memory ratio {ratio['memory']:.4f}" if "memory" in ratio else ""
        print(f"ratio {label}: step-time ratio {ratio['time']:.4f}{memory}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--sigma", type=float, default=0.1, help="Flat-LoRA sigma of the flat variant")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="no", help="frozen-weight precision")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(ALL_VARIANTS)}")
    parser.add_argument("--baseline-package", help="package holding the flat_lora.FlatLora of flat_baseline")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (each round runs every variant once)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first and not timed")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per memory subprocess (0: skip memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="CPU: run the memory probes with glibc MALLOC_MMAP_THRESHOLD_ fixed at this many bytes "
                             "(e.g. 131072), so freed large buffers go back to the OS: the peak RSS is then the "
                             "peak of live memory, not what the allocator keeps")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds, 1 warm-up, 1 memory step")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory-probe", choices=ALL_VARIANTS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv if a not in ("--quick",)]
    if args.quick:
        args.steps, args.warmup, args.memory_steps = 2, 1, 1
        args.argv += ["--memory-steps", "1"]
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.variants.split(",") if n]
    unknown = set(names) - set(ALL_VARIANTS)
    if unknown or not names:
        print(f"error: --variants must be a comma-separated subset of {','.join(ALL_VARIANTS)}", file=sys.stderr)
        return 2
    if "flat_baseline" in names + [args.memory_probe] and not args.baseline_package:
        print("error: the flat_baseline variant needs --baseline-package", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="flatlora-bench-") as tmp:
        variants = Variants(make_run(args, Path(tmp)), names + [args.memory_probe], args.baseline_package)
        if args.memory_probe:
            print(json.dumps(peak_memory_alone(variants, args.memory_probe, args.memory_steps)))
            return 0
        times = time_interleaved(variants, names, args.steps, args.warmup)
        memory = memory_in_subprocesses(args, names) if args.memory_steps > 0 else {}
        summary = summarise(times, memory)
        for name, row in summary["rows"].items():
            row["draws"] = variants.draws_per_layer_step(name)
        variants.run.flat = variants.flats["flat"]
        print_report(args, variants.run, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "argv"},
                                               **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
