"""Hostile and malformed LoRA files, as users download them from anywhere (issue 14)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from flatlora_diffusion.lora.formats import read_safetensors

PICKLE_MARKER = "unpickled.marker"  # created (beside the file) if anything ever unpickles it


class _Trap:
    """Unpickling this writes PICKLE_MARKER: proof that a reader executed the pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "a reader unpickled this file"))


def _header_file(path: Path, header: bytes, length: int | None = None, body: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + body)
    return path


def _changed(good: Path, path: Path, change) -> Path:
    tensors, metadata = read_safetensors(good)
    save_file(change(dict(tensors)), str(path), metadata=metadata)
    return path


def _wrong_shape(tensors):
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    return tensors


def _nan_weights(tensors):
    key = sorted(k for k in tensors if k.startswith("unet.") and k.endswith("lora_B.weight"))[3]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    return tensors


def _loha(_):
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    return {f"{stem}.hada_w1_a": torch.ones(64, 4), f"{stem}.hada_w1_b": torch.ones(4, 64),
            f"{stem}.hada_w2_a": torch.ones(64, 4), f"{stem}.hada_w2_b": torch.ones(4, 64),
            f"{stem}.alpha": torch.tensor(4.0)}


def _lokr(_):
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    return {f"{stem}.lokr_w1": torch.ones(8, 8), f"{stem}.lokr_w2": torch.ones(8, 8),
            f"{stem}.alpha": torch.tensor(1.0)}


def _sd15(_):
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return {f"{stem}.lora_down.weight": torch.ones(4, 768), f"{stem}.lora_up.weight": torch.ones(768, 4)}


def lora_of_random_weights(model_dir, folder: Path, text_encoders: bool = True):
    """(pipe, {"diffusers", "kohya"} paths): the test LoRA (random B, alpha != rank) on a fresh tiny pipe."""
    from flatlora_diffusion.lora.save import save_lora_files
    from tests.helpers import TEST_LORA, add_test_loras
    from tests.lora_helpers import fresh_pipe

    pipe = fresh_pipe(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_test_loras(pipe, text_encoders=text_encoders)
    models = [pipe.unet] + ([pipe.text_encoder, pipe.text_encoder_2] if text_encoders else [])
    return pipe, save_lora_files(folder, *models, lora=TEST_LORA)


def make_hostile_files(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """{kind: (file, what the one-line refusal says)}; `good` is a valid diffusers-format LoRA of the model."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    pickled = folder / "pickle.safetensors"
    with pickled.open("wb") as f:
        pickle.dump({"state_dict": _Trap(str(folder / PICKLE_MARKER))}, f)
    torch_zip = folder / "torch_save.safetensors"
    torch.save({"trap": _Trap(str(folder / PICKLE_MARKER))}, torch_zip)
    huge = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    files = {
        "truncated": (truncated, "not a readable safetensors file"),
        "garbage header": (_header_file(folder / "garbage.safetensors", b"{this is not json at all}"),
                           "not a readable safetensors file"),
        "header length 10^12": (_header_file(folder / "huge_header.safetensors", huge, length=10**12),
                                "not a readable safetensors file"),
        "pickle renamed": (pickled, "this is a pickle"),
        "torch.save renamed": (torch_zip, "this is a pickle"),
        "wrong tensor shapes": (_changed(good, folder / "shapes.safetensors", _wrong_shape), "is this a LoRA for"),
        "SD 1.5 keys": (_changed(good, folder / "sd15.safetensors", _sd15), "SD 1.x/2.x LoRA"),
        "LoHa": (_changed(good, folder / "loha.safetensors", _loha), "LyCORIS LoHa file"),
        "LoKr": (_changed(good, folder / "lokr.safetensors", _lokr), "LyCORIS LoKr file"),
        "NaN weights": (_changed(good, folder / "nan.safetensors", _nan_weights), "non-finite (NaN/inf) LoRA weights"),
    }
    return files
