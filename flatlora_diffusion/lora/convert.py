"""Convert an SDXL LoRA between the diffusers/PEFT and kohya formats, keeping every alpha.

    python -m flatlora_diffusion.lora.convert IN.safetensors OUT.safetensors --to kohya|diffusers [--base DIR]

kohya UNet keys use SGM naming, derived from the UNet config of the diffusers folder `--base`,
or of real SDXL base 1.0 when it is not given. Every module is checked against that model's
names and shapes (on the meta device: no weights are loaded), so a file for another model is
refused rather than half converted. alpha goes to `.alpha` keys (kohya) or to the adapter
metadata (diffusers). The input's metadata is kept. The output is written atomically and an
existing output is never overwritten. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flatlora_diffusion.atomic import OutputError
from flatlora_diffusion.sdxl.published_configs import BaseModelError, meta_sdxl_models

from .formats import load_lora_set, read_lora_metadata, to_diffusers, to_kohya, write_safetensors
from .kohya_names import LoraNameError, UnetLayout
from .lora_set import LoraFileError
from .save import RESERVED_METADATA, standard_metadata

FORMATS = ("kohya", "diffusers")


def convert_lora_file(source: str | Path, target: str | Path, to: str, base: str | Path | None = None) -> Path:
    """Write `source` (either format) to `target` in format `to`; returns the target path.

    Raises LoraFileError if `target` exists or `source` is not an SDXL LoRA of the base.
    """
    if to not in FORMATS:
        raise LoraFileError(f"--to must be one of {FORMATS}, got {to!r}")
    target = Path(target)
    if target.exists():
        raise LoraFileError(f"{target}: already exists; choose another output path or remove it")
    unet, text_encoder, text_encoder_2 = meta_sdxl_models(base)
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    lora_set, _ = load_lora_set(source, models)
    kept = {k: v for k, v in read_lora_metadata(source).items() if k not in RESERVED_METADATA}
    metadata = {**standard_metadata(lora_set), **kept}
    if to == "kohya":
        return write_safetensors(target, to_kohya(lora_set, UnetLayout.from_config(unet.config)), metadata)
    tensors, adapter_metadata = to_diffusers(lora_set)
    return write_safetensors(target, tensors, {**metadata, **adapter_metadata})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flatlora_diffusion.lora.convert",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("source", help="input LoRA .safetensors (diffusers or kohya format)")
    parser.add_argument("target", help="output .safetensors path (must not exist)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--base", default=None,
                        help="diffusers SDXL folder whose configs name the modules (default: SDXL base 1.0 layout)")
    args = parser.parse_args(argv)
    try:
        path = convert_lora_file(args.source, args.target, args.to, args.base)
    except (LoraFileError, LoraNameError, BaseModelError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
