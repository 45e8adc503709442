"""train_dreambooth_flat.py under 2 processes (gloo on CPU), as `accelerate launch` runs it on GPUs (issue 8).

Without GPUs, `accelerate launch --num_processes 2` starts one process, so the tests start two
with `python -m torch.distributed.run` and ACCELERATE_USE_CPU=1, which accelerate joins into one
gloo run. FLATLORA_DEBUG_DUMP_DIR makes every rank write its final LoRA and its Flat-LoRA noise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from flatlora_diffusion.errors import UserError
from flatlora_diffusion.flat.flat_lora import layer_seed
from flatlora_diffusion.flat.gaussian import standard_normal
from flatlora_diffusion.training.config import parse_config
from flatlora_diffusion.training.metrics import read_metrics
from flatlora_diffusion.training.multiprocess import check_launch
from flatlora_diffusion.training.setup import count_total_steps

REPO = Path(__file__).resolve().parents[2]
SIGMA = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], dump_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="1")
    env.pop("FLATLORA_DEBUG_DUMP_DIR", None)
    if dump_dir is not None:
        env["FLATLORA_DEBUG_DUMP_DIR"] = str(dump_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "train_dreambooth_flat.py"), *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def train_args(model_dir, data: dict, out: Path, *extra) -> list[str]:
    """4 optimizer steps of 2 accumulated micro-batches on each of 2 processes, text encoders trained."""
    return ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(data["instance"]),
            "--instance_prompt", "a photo of sks cat", "--resolution", "64", "--output_dir", str(out),
            "--max_train_steps", "4", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
            "--train_text_encoder", "--lora_dropout", "0.1", "--random_flip", "--flat_sigma", str(SIGMA),
            "--with_prior_preservation", "--class_data_dir", str(data["class"]), "--class_prompt", "a photo of a cat",
            "--num_class_images", "3", "--learning_rate", "1e-3", *map(str, extra)]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from skimage import data as images

    folder = tmp_path_factory.mktemp("instance")
    for name in ("chelsea", "astronaut", "coffee"):
        Image.fromarray(getattr(images, name)()).resize((96, 72)).save(folder / f"{name}.png")
    return {"instance": folder, "class": tmp_path_factory.mktemp("class")}


@pytest.fixture(scope="module")
def straight(default_model_dir, data, tmp_path_factory):
    """One uninterrupted 2-process run; every rank dumps its final state."""
    root = tmp_path_factory.mktemp("straight")
    out, dump = root / "run", root / "dump"
    check(launch(train_args(default_model_dir, data, out), dump_dir=dump))
    return out, dump


def test_two_processes_ran_and_only_the_main_one_wrote(straight, data):
    out, dump = straight
    assert json.loads((out / "config.json").read_text())["num_processes"] == 2
    assert sorted(p.name for p in dump.iterdir()) == ["rank0.safetensors", "rank1.safetensors"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]  # written once, not per rank
    assert sorted(p.name for p in (out / "checkpoint-2").glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert json.loads((out / "checkpoint-2" / "state.json").read_text())["num_processes"] == 2
    # prior-class generation split across the processes leaves no hole in the numbering
    assert sorted(p.name for p in data["class"].glob("*.png")) == [f"class_{k:05d}.png" for k in range(3)]


def test_lora_is_identical_on_both_ranks_and_the_noise_is_not(straight, default_model_dir):
    out, dump = straight
    rank0, rank1 = (load_file(dump / f"rank{r}.safetensors") for r in (0, 1))
    noise = [k for k in rank0 if k.startswith("flat_noise.")]
    lora = [k for k in rank0 if k not in noise]
    assert any(k.startswith("text_encoder.") for k in lora) and any(k.startswith("text_encoder_2.") for k in lora)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in lora)
    eps0, eps1 = rank0[noise[0]], rank1[noise[0]]
    assert eps0.abs().max() > 0 and eps1.abs().max() > 0
    assert not torch.allclose(eps0, eps1)  # each rank its own draw at the same step and layer
    for rank, eps in enumerate((eps0.t(), eps1.t())):  # reproducible from (seed, step, rank, layer) alone
        name = noise[0].removeprefix("flat_noise.")
        z = standard_normal(tuple(eps.shape), layer_seed(0, 3, rank, name))
        row_scale = (eps * z).sum(1, keepdim=True) / z.square().sum(1, keepdim=True)  # sigma_t ||W'_i|| / sqrt(n)
        assert torch.allclose(eps, row_scale * z, rtol=1e-3, atol=1e-7)
    # the exported file still has text encoder 1's last layer (frozen: no gradient reaches it), like other tools
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    te1_layers = {k.split(".layers.")[1].split(".")[0] for k in exported if k.startswith("text_encoder.")}
    n_layers = json.loads((default_model_dir / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert te1_layers == {str(i) for i in range(n_layers)}


def test_sigma_ramp_reaches_sigma_at_the_last_step(straight):
    out, _ = straight
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["sigma_t"] == pytest.approx(SIGMA, abs=1e-12)
    expected = [SIGMA * 0.5 * (1 - math.cos(math.pi * t / 4)) for t in (1, 2, 3, 4)]
    assert [r["sigma_t"] for r in rows] == pytest.approx(expected)


def test_resume_under_two_processes_matches_the_uninterrupted_run(straight, default_model_dir, data, tmp_path):
    out, _ = straight
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    check(launch(train_args(default_model_dir, data, resumed, "--resume_from_checkpoint", "latest")))
    a, b = (load_file(o / "pytorch_lora_weights.safetensors") for o in (out, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical tensors
    # and metadata (the bytes may differ only in the order of the header's keys: safetensors writes a hash map)
    meta = [safe_open(o / "pytorch_lora_weights.safetensors", "pt").metadata() for o in (out, resumed)]
    assert [m.pop("modelspec.title") for m in meta] == [out.name, resumed.name]  # the run folder's name
    assert meta[0] == meta[1]
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [3, 4]


def test_processes_that_accelerate_does_not_join_are_refused(monkeypatch):
    """torchrun without ACCELERATE_USE_CPU on a machine without GPUs gives WORLD_SIZE=2 but two lone
    one-process accelerators (each its own 'main', all writing); checked in-process to save a launch."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="ACCELERATE_USE_CPU=1"):
        check_launch(SimpleNamespace(num_processes=1))
    check_launch(SimpleNamespace(num_processes=2))


def test_text_encoder_1_freezes_exactly_the_lora_no_gradient_reaches(default_model_dir):
    from transformers import CLIPTextModel

    from flatlora_diffusion.lora.attach import LoraOptions, add_text_encoder_lora, freeze_lora_after_hidden_state

    encoder = CLIPTextModel.from_pretrained(default_model_dir, subfolder="text_encoder")
    add_text_encoder_lora(encoder, LoraOptions(rank=2, init="none"))  # random B: every reachable LoRA gets a grad
    ids = torch.randint(0, encoder.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    encoder(ids, output_hidden_states=True).hidden_states[-2].square().mean().backward()  # what SDXL reads
    lora = {name: p for name, p in encoder.named_parameters() if "lora_" in name}
    unreached = {name for name, p in lora.items() if p.grad is None}
    assert unreached and all(f".layers.{encoder.config.num_hidden_layers - 1}." in name for name in unreached)
    assert set(freeze_lora_after_hidden_state(encoder, -2)) == unreached
    assert {name for name, p in lora.items() if not p.requires_grad} == unreached


def test_count_total_steps_divides_the_samples_by_every_process(tmp_path):
    config = parse_config(["--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks", "--num_train_epochs",
                           "2", "--train_batch_size", "2", "--gradient_accumulation_steps", "3"])
    # 2 samples x 3 micro-batches x 2 processes = 12 samples per optimizer step; 25 samples -> 3 steps per epoch
    assert count_total_steps(config, n_samples=25, world_size=2) == 2 * 3
    assert count_total_steps(config, n_samples=25, world_size=1) == 2 * 5
    assert count_total_steps(parse_config(["--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks",
                                           "--max_train_steps", "7"]), n_samples=25, world_size=4) == 7
