"""The training command line: parse, train, and turn user errors into one line and exit 2."""

from __future__ import annotations

import os
import sys

from flatlora_diffusion.atomic import UNWRITABLE
from flatlora_diffusion.errors import UserError


def run_training(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flatlora_diffusion.lora.lora_set import LoraFileError

    from .config import parse_config

    try:
        config = parse_config(argv)  # a refused config answers before diffusers and accelerate are imported
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .loop import Interrupted, train

    try:
        output_dir = train(config)
    except (UserError, LoraFileError) as err:  # LoraFileError: e.g. NaN weights refused at export
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output written outside atomic.py (e.g. a tracker's log) on a full disk
        if err.errno not in UNWRITABLE:
            raise
        print(f"error: cannot write {err.filename or 'an output'}: {err.strerror}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"{stop}; continue with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"done: LoRA files, samples and metrics are in {output_dir}")
    return 0
