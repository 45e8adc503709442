"""Flat-LoRA's own work per optimizer step, isolated from the model's compute.

    python -m benchmarks.flat_overhead --model sdxl --precision bf16 --rank 4 --rounds 3

Every LoRA layer of the UNet (and with --text-encoders, of both text encoders) is called on a
single token, with its gradient, so the matmuls cost next to nothing and what is left is what
Flat-LoRA adds to a real step:

  entry     `perturb(step)` entered and left: the row norms ||W'_i|| of every layer (once per step)
  forward   building W + eps of every layer once (what each forward, and each recomputed forward
            under gradient checkpointing, pays)
  backward  building W + eps again in backward (regenerated from the seed, never stored)

The same single-token calls without Flat-LoRA are timed too and subtracted. --packages compares
implementations (e.g. a copy of an older `flatlora_diffusion` importable under another name),
interleaved round by round.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time

import torch

from flatlora_diffusion.lora.attach import LoraOptions, add_text_encoder_lora, add_unet_lora

from .machine import print_machine
from .models import MODELS, build_parts

PRECISIONS = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lora_models(args) -> dict[str, torch.nn.Module]:
    parts = build_parts(args.model, PRECISIONS[args.precision], device=args.device)
    options = LoraOptions(rank=args.rank, init="none")  # B != 0: the merged-norm terms do real work
    models = {"unet": add_unet_lora(parts.unet, options)}
    if args.text_encoders:
        models["text_encoder"] = add_text_encoder_lora(parts.text_encoder, options)
        models["text_encoder_2"] = add_text_encoder_lora(parts.text_encoder_2, options)
    return models


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_token_pass(layers, inputs, flat, step) -> tuple[float, float, float]:
    """(entry, forward, backward) seconds of one Flat-LoRA step over `layers` (flat=None: plain)."""
    device = inputs[0].device.type
    _sync(device)
    t0 = time.perf_counter()
    context = flat.perturb(step) if flat is not None else _null()
    with context:
        _sync(device)
        t1 = time.perf_counter()
        outputs = [layer.get_base_layer()(x) for layer, x in zip(layers, inputs)]
        _sync(device)
        t2 = time.perf_counter()
        torch.autograd.backward([o.float().sum() for o in outputs])
        _sync(device)
        t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _flat_lora_class(package: str):
    try:
        return importlib.import_module(f"{package}.flat.flat_lora").FlatLora
    except ModuleNotFoundError:
        return importlib.import_module(f"{package}.flat_lora").FlatLora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mid")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--text-encoders", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--packages", default="flatlora_diffusion",
                        help="comma-separated packages providing .flat.flat_lora.FlatLora (or, laid out before "
                             "the wings, .flat_lora.FlatLora), interleaved")
    args = parser.parse_args(argv)
    models = lora_models(args)
    flats = {}
    for package in args.packages.split(","):
        flat_cls = _flat_lora_class(package)
        flats[package] = flat_cls(models, sigma=0.1, schedule="constant")
    first = next(iter(flats.values()))
    layers = [t.layer for t in first._targets]
    dtype = PRECISIONS[args.precision]
    inputs = [torch.randn(1, layer.in_features, device=args.device, dtype=dtype, requires_grad=True)
              for layer in layers]
    variants = {"plain": None, **flats}
    times = {name: [] for name in variants}
    for r in range(args.warmup + args.rounds):
        for name, flat in variants.items():
            result = one_token_pass(layers, inputs, flat, r)
            if r >= args.warmup:
                times[name].append(result)
    print_machine(args.device)
    n_weights = sum(layer.get_base_layer().weight.numel() for layer in layers)
    print(f"# model {args.model} ({args.precision}, rank {args.rank}, text encoders {args.text_encoders}): "
          f"{len(layers)} LoRA layers, {n_weights / 1e6:.1f} M base weights; medians of {args.rounds} rounds")
    plain = [statistics.median(t[i] for t in times["plain"]) for i in range(3)]
    print(f"{'implementation':<22} {'entry s':>9} {'forward s':>10} {'backward s':>11} {'extra/step s':>13}"
          f" {'M weights/s per noise pass':>27}")
    for name in flats:
        med = [statistics.median(t[i] for t in times[name]) for i in range(3)]
        extra = [med[i] - plain[i] for i in range(3)]
        rate = n_weights / 1e6 / max(extra[1], 1e-9)
        print(f"{name:<22} {extra[0]:9.4f} {extra[1]:10.4f} {extra[2]:11.4f} {sum(extra):13.4f} {rate:27.1f}")
    print(f"# plain single-token calls (subtracted): forward {plain[1]:.4f} s, backward {plain[2]:.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
