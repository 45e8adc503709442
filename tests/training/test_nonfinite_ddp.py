"""Issue 14 under 2 processes: a NaN loss on one rank skips the step on every rank (ranks never diverge)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from flatlora_diffusion.training.metrics import read_metrics
from tests.training.test_multiprocess import REPO, free_port
from tests.training.test_nonfinite import photos  # noqa: F401  (a fixture)

# Rank 1 only: at step 2 its loss *value* is NaN while its gradients stay finite, so only the reduced
# flag (not the gradient all-reduce) can make rank 0 skip the step too.
WRAPPER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    import flatlora_diffusion.training.loop as training
    from flatlora_diffusion.training.cli import run_training

    original_batch, original_loss, current = training.micro_batch, training.compute_loss, {{}}

    def batch_and_step(run, step, micro):
        current["step"] = step + 1
        return original_batch(run, step, micro)

    def poisoned(*a, **kw):
        loss = original_loss(*a, **kw)
        if os.environ["RANK"] == "1" and current["step"] == 2:
            return loss + float("nan") * loss.detach()
        return loss

    training.micro_batch, training.compute_loss = batch_and_step, poisoned
    sys.exit(run_training(sys.argv[1:]))
""")


def test_a_nan_loss_on_one_rank_skips_the_step_on_all(default_model_dir, photos, tmp_path):  # noqa: F811
    wrapper = tmp_path / "train_poisoned.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="1", FLATLORA_DEBUG_DUMP_DIR=str(dumps))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(wrapper),
           "--pretrained_model_name_or_path", str(default_model_dir), "--instance_data_dir", str(photos),
           "--instance_prompt", "a photo of sks cat", "--resolution", "64", "--output_dir", str(out),
           "--max_train_steps", "3", "--learning_rate", "1e-3", "--rank", "4", "--lora_alpha", "6"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [r["skipped"] for r in read_metrics(out / "metrics.jsonl")] == [False, True, False]
    rank0, rank1 = load_file(dumps / "rank0.safetensors"), load_file(dumps / "rank1.safetensors")
    lora = [k for k in rank0 if not k.startswith("flat_noise.")]
    assert lora and all(torch.equal(rank0[k], rank1[k]) for k in lora)  # the ranks did not diverge
