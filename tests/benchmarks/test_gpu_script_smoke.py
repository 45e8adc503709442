"""benchmarks/gpu_sdxl.sh --cpu-smoke: every step of the one-shot GPU run, at the tiny model's size,
so the script works the first time it meets a GPU (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_script_cpu_smoke_trains_resumes_and_reloads_both_files(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "benchmarks/gpu_sdxl.sh", "--cpu-smoke", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "end_to_end" / "end_to_end.json").read_text())
    assert len(result["seconds_per_step"]) == result["steps"] == 4
    assert result["resume_max_abs_difference"] == 0.0  # exact on the CPU
    for part in ("unet", "text_encoder", "text_encoder_2"):
        reload = result["reload"][part]
        assert reload["finite"] and reload["lora_minus_base"] > 1e-4, part
        assert reload["diffusers_file_minus_kohya_file"] < 1e-5, part
    assert (tmp_path / "end_to_end" / "kohya_file_sample.png").is_file()
    assert not (tmp_path / "end_to_end" / "model").exists()  # the random weights are removed
    for name in ("text_encoders_no_checkpointing", "text_encoders_checkpointing"):
        assert "ratio flat/lora: step-time ratio" in (tmp_path / f"{name}.txt").read_text()
    assert (tmp_path / "flat_overhead.txt").read_text().strip()
