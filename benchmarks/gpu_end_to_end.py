"""The command line end to end on a real-size SDXL (random weights, no download), as a GPU user runs it.

    python -m benchmarks.gpu_end_to_end --out DIR              # one CUDA GPU: ~5 minutes, ~40 GB
    python -m benchmarks.gpu_end_to_end --out DIR --cpu-smoke  # the same steps on the tiny model (a test runs it)

1. Build an SDXL diffusers folder from the published configs (sdxl/published_configs.py, random
   bf16 weights, tokenizers from our own vocabulary) and a few instance images.
2. `train_dreambooth_flat.py` at 1024 px, bf16, both text encoders, gradient checkpointing,
   8-bit Adam (when bitsandbytes and CUDA are there), Flat-LoRA sigma 0.1, 20 steps with a
   checkpoint at step 10.
3. Resume a copy of checkpoint-10 to step 20 with `--resume_from_checkpoint latest` and compare its
   LoRA file with the uninterrupted run's (bit-exact on the CPU; on a GPU the largest difference is
   reported: cuDNN/cuBLAS kernels need not be deterministic).
4. Load both files into a fresh pipeline with diffusers' own `load_lora_weights` (the diffusers
   file and the kohya file), check the UNet and text-encoder outputs agree between the two files
   and differ from the base, and draw one image.
Everything measured goes to DIR/end_to_end.json; the log is printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .machine import print_machine
from .models import build_parts

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # what each mode runs; cpu-smoke keeps every step but at the tiny model's size
    "gpu": dict(model="sdxl", resolution=1024, steps=20, precision="bf16", dtype=torch.bfloat16, device="cuda"),
    "cpu-smoke": dict(model="tiny", resolution=64, steps=4, precision="no", dtype=torch.float32, device="cpu"),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_model_folder(folder: Path, setting: dict) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from flatlora_diffusion.sdxl.default_model import scheduler_config

    parts = build_parts(setting["model"], setting["dtype"], device=setting["device"])
    pipe = StableDiffusionXLPipeline(parts.vae, parts.text_encoder, parts.text_encoder_2, parts.tokenizer,
                                     parts.tokenizer_2, parts.unet, EulerDiscreteScheduler(**scheduler_config()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, parts
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def write_instance_images(folder: Path, resolution: int, count: int = 4) -> Path:
    """Flat-coloured squares on a contrasting ground: any picture does, the weights are random."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = np.full((resolution, resolution, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        lo, hi = resolution // 4, 3 * resolution // 4
        image[lo:hi, lo:hi] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(folder / f"subject_{i}.png")
    return folder


def train_command(model: Path, images: Path, out: Path, setting: dict, eight_bit: bool, *extra: str) -> list[str]:
    flags = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
             "--instance_prompt", "a photo of sks object", "--output_dir", str(out),
             "--resolution", str(setting["resolution"]), "--mixed_precision", setting["precision"],
             "--train_text_encoder", "--gradient_checkpointing", "--rank", "4", "--lora_alpha", "8",
             "--flat_sigma", "0.1", "--learning_rate", "1e-4", "--train_batch_size", "1",
             "--max_train_steps", str(setting["steps"]), "--checkpointing_steps", str(setting["steps"] // 2),
             "--center_crop", "--seed", "0"]
    return [sys.executable, str(REPO / "train_dreambooth_flat.py"), *flags,
            *(["--use_8bit_adam"] if eight_bit else []), *extra]


def run_trainer(command: list[str], label: str) -> float:
    log(f"{label}: {' '.join(command[1:])}")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"{label} failed with exit code {done.returncode}")
    log(f"{label}: done in {seconds:.1f} s")
    return seconds


def step_seconds(run: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def resume_difference(straight: Path, resumed: Path) -> float:
    from safetensors.torch import load_file

    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    if a.keys() != b.keys():
        raise SystemExit("the resumed run's LoRA file has other keys than the uninterrupted run's")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def fixed_outputs(pipe, setting: dict) -> dict[str, torch.Tensor]:
    """UNet noise prediction and both text encoders' outputs for fixed inputs."""
    g = torch.Generator().manual_seed(0)
    size = setting["resolution"] // 8
    device, dtype = pipe.unet.device, pipe.unet.dtype
    ids = pipe.tokenizer(["a photo of sks object"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        hidden_1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out_2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        embeds = torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1)
        latents = torch.randn((1, 4, size, size), generator=g).to(device, dtype)
        time_ids = torch.tensor([[setting["resolution"]] * 2 + [0, 0] + [setting["resolution"]] * 2],
                                device=device, dtype=dtype)
        unet = pipe.unet(latents, torch.tensor([500], device=device), embeds,
                         added_cond_kwargs={"text_embeds": out_2[0], "time_ids": time_ids}).sample
    return {"unet": unet.float().cpu(), "text_encoder": hidden_1.float().cpu(),
            "text_encoder_2": out_2[0].float().cpu()}


def reload_and_compare(model: Path, run: Path, setting: dict, out: Path) -> dict:
    from diffusers import StableDiffusionXLPipeline

    outputs = {}
    for name in ("base", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=setting["dtype"]).to(setting["device"])
        if name != "base":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pipe.load_lora_weights(run, weight_name=name)
            if any("not loaded" in str(w.message) or "unexpected" in str(w.message).lower() for w in caught):
                raise SystemExit(f"{name}: diffusers warned while loading: {[str(w.message) for w in caught]}")
        outputs[name] = fixed_outputs(pipe, setting)
        if name == "pytorch_lora_weights_kohya.safetensors":
            image = pipe("a photo of sks object", num_inference_steps=4, height=setting["resolution"],
                         width=setting["resolution"], generator=torch.Generator().manual_seed(0)).images[0]
            image.save(out / "kohya_file_sample.png")
        del pipe
    diffusers_file = outputs["pytorch_lora_weights.safetensors"]
    kohya_file = outputs["pytorch_lora_weights_kohya.safetensors"]
    return {part: {"lora_minus_base": _max_difference(diffusers_file[part], base),
                   "diffusers_file_minus_kohya_file": _max_difference(diffusers_file[part], kohya_file[part]),
                   "finite": bool(diffusers_file[part].isfinite().all() and kohya_file[part].isfinite().all())}
            for part, base in outputs["base"].items()}


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "end_to_end")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps on the tiny model, on the CPU")
    args = parser.parse_args(argv)
    setting = SETTINGS["cpu-smoke" if args.cpu_smoke else "gpu"]
    if setting["device"] == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --cpu-smoke on a CPU", file=sys.stderr)
        return 2
    print_machine(setting["device"])
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    eight_bit = setting["device"] == "cuda" and _has_bitsandbytes()
    result = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "eight_bit_adam": eight_bit, **{
        k: v for k, v in setting.items() if k not in ("dtype",)}}
    started = time.perf_counter()
    model = write_model_folder(args.out / "model", setting)
    result["build_model_s"] = time.perf_counter() - started
    log(f"model folder written: {model} ({result['build_model_s']:.0f} s)")
    images = write_instance_images(args.out / "images", setting["resolution"])
    straight, resumed = args.out / "straight", args.out / "resumed"
    result["train_s"] = run_trainer(train_command(model, images, straight, setting, eight_bit), "train")
    half = setting["steps"] // 2
    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{half}", resumed / f"checkpoint-{half}")
    result["resume_s"] = run_trainer(train_command(model, images, resumed, setting, eight_bit,
                                                   "--resume_from_checkpoint", "latest"), "resume")
    result["seconds_per_step"] = step_seconds(straight)
    result["resume_max_abs_difference"] = resume_difference(straight, resumed)
    result["reload"] = reload_and_compare(model, straight, setting, args.out)
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    (args.out / "end_to_end.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    shutil.rmtree(model)  # gigabytes of random weights; everything measured is in the JSON
    return 0


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        log("bitsandbytes is not installed: training without --use_8bit_adam")
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
