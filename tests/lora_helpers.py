"""Shared by the LoRA file tests: a briefly Flat-LoRA-trained tiny SDXL, its outputs, warning capture."""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from diffusers import StableDiffusionXLPipeline

from flatlora_diffusion import FlatLora
from flatlora_diffusion.lora.attach import lora_parameters
from flatlora_diffusion.lora.save import save_lora_files, training_metadata
from tests.helpers import TEST_LORA, add_test_loras, text_inputs, text_loss, unet_inputs, unet_loss

TRAIN_STEPS = 3
METADATA = training_metadata(steps=TRAIN_STEPS, learning_rate=1e-2, resolution=64, seed=0, sigma=0.1,
                             schedule="constant", flat_seed=0, started_at=1_700_000_000.0, title="test run")
_TRAINED: dict[str, tuple] = {}


def fresh_pipe(model_dir) -> StableDiffusionXLPipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_pipe(model_dir, steps: int = TRAIN_STEPS, seed: int = 0) -> StableDiffusionXLPipeline:
    """UNet and both text encoders with LoRA (rank 4, alpha 6, random B), trained with Flat-LoRA on."""
    pipe = fresh_pipe(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_test_loras(pipe)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    flat = FlatLora(models, sigma=0.1, schedule="constant", seed=seed)
    optimizer = torch.optim.AdamW(lora_parameters(*models.values()), lr=1e-2)
    for step in range(steps):
        with flat.perturb(step):
            loss = unet_loss(pipe.unet, unet_inputs(pipe.unet, seed=step))
            ids = text_inputs(seed=step)
            loss = loss + text_loss(pipe.text_encoder, ids) + text_loss(pipe.text_encoder_2, ids)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return pipe


def trained_export(model_dir, tmp_path_factory) -> tuple:
    """(trained pipe, folder, {"diffusers", "kohya"} paths, its outputs), made once per test process.

    Shared by several test modules to keep the suite fast: tests must only read the pipe.
    """
    key = str(model_dir)
    if key not in _TRAINED:
        pipe = trained_pipe(model_dir)
        folder = tmp_path_factory.mktemp("trained_lora")
        paths = save_lora_files(folder, pipe.unet, pipe.text_encoder, pipe.text_encoder_2, lora=TEST_LORA,
                                metadata=METADATA)
        _TRAINED[key] = (pipe, folder, paths, outputs(pipe))
    return _TRAINED[key]


@torch.no_grad()
def outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet output, text encoder 1's penultimate hidden state and text encoder 2's pooled embedding."""
    ids = text_inputs(seed=7)
    return {
        "unet": pipe.unet(**unet_inputs(pipe.unet, seed=7)).sample,
        "text_encoder": pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],
        "text_encoder_2": pipe.text_encoder_2(ids).text_embeds,
    }


def assert_same_outputs(pipe, expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    got = outputs(pipe)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=atol, rtol=0), (name, (got[name] - value).abs().max())


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def no_warnings_allowed():
    """Fail if Python warnings or diffusers/transformers/peft log records >= WARNING are emitted.

    diffusers and transformers loggers do not propagate to the root logger (so caplog misses
    them): the handler is attached to each library's logger directly.
    """
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    # ResourceWarnings come from the garbage collector finalising other tests' objects (e.g. the
    # app tests' event loops) at a random moment; they say nothing about loading a LoRA.
    caught = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    messages = handler.messages + [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not messages, messages
