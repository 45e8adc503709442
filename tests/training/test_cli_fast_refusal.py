"""A refused config answers before the heavy model libraries load (the app shows it in the page)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROGRAM = """
import sys
from flatlora_diffusion.training.cli import run_training
code = run_training(["--instance_data_dir", "x", "--instance_prompt", "p", "--resolution", "7"])
print(code, "diffusers" in sys.modules)
"""


def test_refused_config_exits_before_diffusers_is_imported():
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert done.stderr.strip() == "error: --resolution must be a multiple of 8 (the VAE downsamples by 8), got 7"
