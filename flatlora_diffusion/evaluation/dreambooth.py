"""DreamBooth benchmark on the toy world: does Flat-LoRA generalise better than plain LoRA? (issue 9)

    python -m flatlora_diffusion.evaluation.dreambooth [--quick] [--seeds 5] [--sigmas 0 0.05 0.1 0.15]
                                                 [--steps N] [--out docs/]

The subject is a shape the world model never saw in pretraining (a star), always yellow on purple
in its five instance images and bound to the rare token "sks": "a yellow sks on a purple
background". Every (seed, sigma) run trains a LoRA with the project's own training script, then
the world's ground truth scores what it draws:

- subject fidelity: held-out prompts "a {c} sks on a {b} background" (c != yellow, b != purple)
  drawn as a star, by the shape classifier;
- prompt fidelity: the asked colour and background obeyed (both), by the palette measurement;
- overfitting: the instance colour (yellow) or background (purple) appearing when not asked;
- prior preservation: pretraining prompts without the token (e.g. "a red circle on a blue
  background") still fully right, and how often they turn into stars (subject leakage);
- sharpness: the expected increase of the instance images' denoising loss (fixed noise and
  timesteps) when the merged weights of every LoRA-targeted layer get Flat-LoRA's filter-wise
  noise, std rho * ||W'_i|| / sqrt(n) per output row, averaged over a few draws.

Runs with the same seed share data order, diffusion noise and generation seeds, so each sigma is
compared with sigma = 0 by a paired t-test over seeds (eval_report.py writes the report).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flatlora_diffusion.flat.flat_lora import FlatLora
from flatlora_diffusion.sdxl.conditioning import encode_tokens, time_ids, tokenize
from flatlora_diffusion.toyworld import toy_world
from flatlora_diffusion.toyworld.evaluate_world import generate
from flatlora_diffusion.toyworld.world_metrics import Measurement, load_shape_classifier, measure

TOKEN = "sks"
SUBJECT_SHAPE = "star"  # in SUBJECT_SHAPES: never drawn in pretraining
INSTANCE_COLOUR, INSTANCE_BACKGROUND = "yellow", "purple"
INSTANCE_COUNT = 5
INSTANCE_SEED = 123
PROMPT_SEED = 7  # fixes which held-out and prior prompts are used
SHARPNESS_TIMESTEPS = (100, 300, 500, 700, 900)  # fixed, spread over the noise range


@dataclass(frozen=True)
class Protocol:
    """Everything that sizes one evaluation; `quick()` is the CI version."""

    steps: int = field(default=400, metadata={"help": "optimizer steps per run (same for every sigma)"})
    learning_rate: float = field(default=3e-3, metadata={"help": "UNet and text-encoder LoRA learning rate"})
    rank: int = field(default=4, metadata={"help": "LoRA rank (alpha = rank)"})
    batch: int = field(default=4, metadata={"help": "train batch size"})
    held_out_prompts: int = field(default=24, metadata={"help": "subject prompts in unseen colours/backgrounds"})
    prior_prompts: int = field(default=24, metadata={"help": "pretraining prompts without the token"})
    instance_prompts: int = field(default=4, metadata={"help": "generations of the instance prompt"})
    inference_steps: int = field(default=25, metadata={"help": "Euler steps when generating"})
    rhos: tuple[float, ...] = field(default=(0.05, 0.1, 0.2), metadata={"help": "sharpness radii"})
    draws: int = field(default=4, metadata={"help": "noise draws per sharpness radius"})

    def __post_init__(self):
        for name in ("steps", "rank", "batch", "held_out_prompts", "prior_prompts", "instance_prompts",
                     "inference_steps", "draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"Protocol.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick(cls, steps: int = 4) -> "Protocol":
        return cls(steps=steps, held_out_prompts=3, prior_prompts=3, instance_prompts=1, inference_steps=3,
                   rhos=(0.1,), draws=1)


# ---------------------------------------------------------------- the subject and the prompts

def subject_prompt(colour: str, background: str) -> str:
    """The world's caption with the rare token in the place of the shape word."""
    return f"a {colour} {TOKEN} on a {background} background"


INSTANCE_PROMPT = subject_prompt(INSTANCE_COLOUR, INSTANCE_BACKGROUND)


def instance_scenes() -> list[toy_world.Scene]:
    """The five training images of the subject: same colours, varied size and position."""
    combo = (INSTANCE_COLOUR, SUBJECT_SHAPE, INSTANCE_BACKGROUND)
    return toy_world.sample_scenes(INSTANCE_SEED, INSTANCE_COUNT, [combo])


def write_instance_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(instance_scenes()):
        Image.fromarray(toy_world.render(scene)).save(folder / f"instance_{i}.png")
    return folder


def held_out_pairs(n: int) -> list[tuple[str, str]]:
    """`n` (colour, background) pairs never seen with the subject: neither instance colour is used."""
    pairs = [(c, b) for c in toy_world.COLOURS for b in toy_world.COLOURS
             if c != b and c != INSTANCE_COLOUR and b != INSTANCE_BACKGROUND]
    order = np.random.default_rng(PROMPT_SEED).permutation(len(pairs))[:n]
    return [pairs[i] for i in sorted(order)]


def prior_combos(n: int) -> list[toy_world.Combo]:
    """`n` pretraining (colour, shape, background) combinations, prompted without the token."""
    combos = toy_world.train_combos()
    order = np.random.default_rng(PROMPT_SEED + 1).permutation(len(combos))[:n]
    return [combos[i] for i in sorted(order)]


# ---------------------------------------------------------------- metrics from ground truth

def score_subject(pairs: list[tuple[str, str]], measured: list[Measurement]) -> dict[str, float]:
    """Subject fidelity, prompt fidelity and instance-colour leakage on held-out subject prompts."""
    shape = [m.shape == SUBJECT_SHAPE for m in measured]
    colour = [m.colour == c for (c, _), m in zip(pairs, measured)]
    background = [m.background == b for (_, b), m in zip(pairs, measured)]
    leak = [m.colour == INSTANCE_COLOUR or m.background == INSTANCE_BACKGROUND for m in measured]
    return {"subject_fidelity": float(np.mean(shape)),
            "prompt_fidelity": float(np.mean([c and b for c, b in zip(colour, background)])),
            "subject_and_prompt": float(np.mean([s and c and b for s, c, b in zip(shape, colour, background)])),
            "instance_leak": float(np.mean(leak))}


def score_prior(combos: list[toy_world.Combo], measured: list[Measurement]) -> dict[str, float]:
    """Prior preservation (colour, shape and background all right) and subject leakage into class prompts."""
    right = [(m.colour, m.shape, m.background) == combo for combo, m in zip(combos, measured)]
    return {"prior_preservation": float(np.mean(right)),
            "prior_subject_leak": float(np.mean([m.shape == SUBJECT_SHAPE for m in measured]))}


def score_instance(measured: list[Measurement]) -> dict[str, float]:
    """Does the instance prompt itself give the subject (the subject was learnt at all)?"""
    return {"instance_fidelity": float(np.mean([m.shape == SUBJECT_SHAPE for m in measured]))}


# ---------------------------------------------------------------- sharpness in the full weight space

def _lora_models(pipe) -> dict[str, torch.nn.Module]:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


@torch.no_grad()
def instance_latents(pipe) -> torch.Tensor:
    """VAE latents of the instance images, scaled as the UNet sees them."""
    images = toy_world.render_many(instance_scenes())
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def fixed_loss(pipe, latents: torch.Tensor, noise: torch.Tensor) -> float:
    """Mean epsilon-prediction error of every instance latent at every SHARPNESS_TIMESTEPS, fixed noise.

    The text encoders run inside, so perturbations of their LoRA layers count too.
    """
    k = len(SHARPNESS_TIMESTEPS)
    x0 = latents.repeat_interleave(k, 0)
    t = torch.tensor(SHARPNESS_TIMESTEPS).repeat(len(latents))
    ab = pipe.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    ids = tokenize(pipe.tokenizer, [INSTANCE_PROMPT]), tokenize(pipe.tokenizer_2, [INSTANCE_PROMPT])
    embeds, pooled = encode_tokens(pipe.text_encoder, pipe.text_encoder_2, *ids)
    n = len(x0)
    pred = pipe.unet(noisy, t, encoder_hidden_states=embeds.expand(n, -1, -1),
                     added_cond_kwargs={"text_embeds": pooled.expand(n, -1), "time_ids": time_ids(n)}).sample
    return float((pred - noise).square().mean())


def sharpness(pipe, rhos: tuple[float, ...], draws: int, seed: int = 0) -> dict[str, float]:
    """E[L(W' + eps) - L(W')] per radius rho, eps filter-wise as in Flat-LoRA (paper Eq. 7).

    FlatLora with a constant schedule draws exactly the training noise, std rho * ||W'_i|| / sqrt(n)
    per output row of each LoRA-targeted Linear, without writing the weights.
    """
    latents = instance_latents(pipe)
    noise = torch.randn((len(latents) * len(SHARPNESS_TIMESTEPS), *latents.shape[1:]),
                        generator=torch.Generator().manual_seed(seed))
    base = fixed_loss(pipe, latents, noise)
    out = {"loss": base}
    for rho in rhos:
        flat = FlatLora(_lora_models(pipe), sigma=rho, schedule="constant", seed=seed + 1000)
        increases = []
        for draw in range(draws):
            with flat.perturb(draw):
                increases.append(fixed_loss(pipe, latents, noise) - base)
        out[f"sharpness_{rho:g}"] = float(np.mean(increases))
    return out


# ---------------------------------------------------------------- one run

def training_args(model_dir: Path, instance_dir: Path, out: Path, sigma: float, seed: int,
                  protocol: Protocol) -> list[str]:
    """The recipe, as flags of train_dreambooth_flat.py (see docs/EVALUATION.md for why these)."""
    return ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", INSTANCE_PROMPT, "--resolution", "64", "--output_dir", str(out),
            "--max_train_steps", str(protocol.steps), "--train_batch_size", str(protocol.batch),
            "--rank", str(protocol.rank), "--lora_alpha", str(protocol.rank),
            "--learning_rate", str(protocol.learning_rate), "--train_text_encoder",
            "--text_encoder_lr", str(protocol.learning_rate),
            # the world model was pretrained with these; keeping them keeps the LoRA's loss the same loss
            "--snr_gamma", "5", "--noise_offset", "0.1",
            "--flat_sigma", str(sigma), "--flat_schedule", "cosine", "--seed", str(seed),
            "--validation_inference_steps", "2", "--num_validation_images", "1"]


def train_run(model_dir: Path, instance_dir: Path, out: Path, sigma: float, seed: int, protocol: Protocol) -> Path:
    """Train one LoRA in-process (its progress bars go to `out`/train.log); returns the LoRA file."""
    from flatlora_diffusion.training.cli import run_training

    out.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        code = run_training(training_args(model_dir, instance_dir, out, sigma, seed, protocol))
    (out / "train.log").write_text(log.getvalue())
    if code != 0:
        raise RuntimeError(f"training sigma={sigma} seed={seed} failed ({code}); see {out / 'train.log'}")
    return out / "pytorch_lora_weights.safetensors"


def load_pipe(model_dir: Path, lora: Path | None = None):
    """A fresh pipeline, with `lora` attached when given (fresh, so no adapter of another run lingers)."""
    from diffusers import StableDiffusionXLPipeline

    from flatlora_diffusion.lora.load import load_lora_into_pipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora_into_pipeline(pipe, lora)
    return pipe


def prompts_of(protocol: Protocol) -> dict[str, list[str]]:
    return {"held_out": [subject_prompt(c, b) for c, b in held_out_pairs(protocol.held_out_prompts)],
            "prior": [toy_world.caption(*c) for c in prior_combos(protocol.prior_prompts)],
            "instance": [INSTANCE_PROMPT] * protocol.instance_prompts}


def generate_and_score(pipe, protocol: Protocol, classifier, gen_seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """All generation metrics of `pipe` and the images, one seeded generator per prompt set."""
    prompts = prompts_of(protocol)
    images = {name: generate(pipe, p, seed=gen_seed, steps=protocol.inference_steps) for name, p in prompts.items()}
    metrics = {**score_subject(held_out_pairs(protocol.held_out_prompts), measure(images["held_out"], classifier)),
               **score_prior(prior_combos(protocol.prior_prompts), measure(images["prior"], classifier)),
               **score_instance(measure(images["instance"], classifier))}
    return metrics, images


def evaluate_run(model_dir: Path, lora: Path | None, protocol: Protocol, classifier, gen_seed: int):
    """(metrics, images) of one trained LoRA (or of the base model when `lora` is None)."""
    pipe = load_pipe(model_dir, lora)
    metrics, images = generate_and_score(pipe, protocol, classifier, gen_seed)
    if lora is not None:
        metrics.update(sharpness(pipe, protocol.rhos, protocol.draws))
    return metrics, images


# ---------------------------------------------------------------- the whole comparison

def run_all(model_dir: Path, work: Path, seeds: list[int], sigmas: list[float], protocol: Protocol,
            progress=print) -> dict:
    """Train and score every (seed, sigma); returns the raw results (JSON-ready) and sample images."""
    classifier = load_shape_classifier()
    instance_dir = write_instance_images(work / "instance")
    base_metrics, base_images = evaluate_run(model_dir, None, protocol, classifier, gen_seed=0)
    runs, samples, started = [], {"base": base_images["held_out"]}, time.time()
    total = len(seeds) * len(sigmas)
    for i, seed in enumerate(seeds):
        for sigma in sigmas:
            t0 = time.time()
            lora = train_run(model_dir, instance_dir, work / f"seed{seed}_sigma{sigma:g}", sigma, seed, protocol)
            train_s = time.time() - t0
            metrics, images = evaluate_run(model_dir, lora, protocol, classifier, gen_seed=seed)
            runs.append({"seed": seed, "sigma": sigma, "train_s": train_s, "total_s": time.time() - t0, **metrics})
            if i == 0:
                samples[f"{sigma:g}"] = images["held_out"]
            done = len(runs)
            eta = (time.time() - started) / done * (total - done)
            progress(f"[{done}/{total}] seed {seed} sigma {sigma:g}: train {train_s:.0f}s, "
                     f"subject {metrics['subject_fidelity']:.2f}, prompt {metrics['prompt_fidelity']:.2f}, "
                     f"prior {metrics['prior_preservation']:.2f}, leak {metrics['instance_leak']:.2f}, "
                     f"sharpness@{protocol.rhos[-1]:g} {metrics[f'sharpness_{protocol.rhos[-1]:g}']:.4f} "
                     f"(eta {eta / 60:.1f} min)")
    return {"protocol": asdict(protocol), "seeds": seeds, "sigmas": sigmas, "base": base_metrics, "runs": runs,
            "prompts": prompts_of(protocol), "minutes": (time.time() - started) / 60,
            "torch": torch.__version__, "threads": torch.get_num_threads()}, samples


def parse_args(argv: list[str] | None):
    from flatlora_diffusion.toyworld.pretrain import WORLD_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: few steps, few prompts, one sharpness radius")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1) per sigma")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the protocol's)")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--work", type=Path, default=Path("outputs/dreambooth_eval"), help="LoRA runs go here")
    parser.add_argument("--model", type=Path, default=WORLD_MODEL_DIR)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if 0.0 not in args.sigmas:
        parser.error("--sigmas must include 0 (plain LoRA, the reference of every test)")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args


@contextlib.contextmanager
def quiet_progress_bars():
    """One progress line per run is ours; the libraries' per-load bars would bury it (restored after)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from .report import write_report

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        protocol = Protocol.quick(args.steps or 4)
    else:
        protocol = Protocol(steps=args.steps) if args.steps else Protocol()
    sigmas = sorted(args.sigmas)
    print(f"DreamBooth evaluation: {args.seeds} seeds x sigmas {sigmas}, {protocol.steps} steps", flush=True)
    with quiet_progress_bars():
        results, samples = run_all(args.model, args.work, list(range(args.seeds)), sigmas, protocol,
                                   progress=lambda line: print(line, flush=True))
    report = write_report(results, samples, args.out)
    print(f"wrote {report} ({results['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
