#!/usr/bin/env python
"""DreamBooth LoRA for Stable Diffusion XL with Flat-LoRA.

    python train_dreambooth_flat.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir photos/ --instance_prompt "a photo of sks dog" --output_dir outputs/sks-dog

Run with --help for every flag; --config FILE.toml sets any of them (command line wins).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from flatlora_diffusion.training.cli import run_training

    return run_training(argv)


if __name__ == "__main__":
    sys.exit(main())
