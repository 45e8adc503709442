"""--flat_noise_buffer in the trainer: printed cost, the same LoRA as without it, resume exact."""

from __future__ import annotations

from safetensors.torch import load_file

from flatlora_diffusion.training.cli import run_training
from tests.training.test_training_script import (  # noqa: F401
    args,
    assert_same_tensors,
    instance_dir,
    straight_and_resumed,
)

FLAGS = ("--gradient_accumulation_steps", "2", "--gradient_checkpointing", "--train_text_encoder",
         "--flat_schedule", "constant", "--flat_sigma", "0.2")


def test_buffer_run_equals_the_unbuffered_run_and_resumes_exactly(default_model_dir, instance_dir, tmp_path,  # noqa: F811
                                                                  capsys):
    straight, resumed = straight_and_resumed(default_model_dir, instance_dir, tmp_path, *FLAGS,
                                             "--flat_noise_buffer")
    printed = capsys.readouterr().out
    assert "Flat-LoRA noise buffer: " in printed and " GB (one W+eps per perturbed layer" in printed
    plain = tmp_path / "plain"
    assert run_training(args(default_model_dir, instance_dir, plain, "--max_train_steps", "4", *FLAGS)) == 0
    assert "Flat-LoRA noise buffer" not in capsys.readouterr().out
    lora = load_file(straight / "pytorch_lora_weights.safetensors")
    assert_same_tensors(lora, load_file(resumed / "pytorch_lora_weights.safetensors"))
    assert_same_tensors(lora, load_file(plain / "pytorch_lora_weights.safetensors"))
