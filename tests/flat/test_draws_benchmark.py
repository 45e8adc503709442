"""benchmarks.flat_draws: the trainer's draws per layer per step, with and without the buffer."""

from __future__ import annotations

from benchmarks import flat_draws


def test_draw_counts_of_the_trainer_step(capsys):
    assert flat_draws.main(["--resolution", "32", "--steps", "1", "--train-text-encoder"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert len(rows) == 4
    for accumulation, checkpointing, layers, mean, most, mean_buffered, most_buffered in rows:
        passes = 3 if checkpointing == "True" else 2  # forward (+ recompute) + backward per micro-batch
        assert int(layers) == 56 + 4 + 8  # the UNet's, te1's trained layers, te2's (te1's last layer is frozen)
        assert float(most) == passes * int(accumulation) and float(mean) <= float(most)
        assert float(mean_buffered) == float(most_buffered) == 1
