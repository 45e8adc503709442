"""The benchmark scripts run end to end on the tiny model (no timing is asserted: issue 7)."""

from __future__ import annotations

import re

from benchmarks import flat_vs_lora


def test_flat_vs_lora_quick_prints_machine_table_and_ratios(capsys):
    assert flat_vs_lora.main(["--model", "tiny", "--resolution", "32", "--quick", "--memory-steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "# versions: torch" in out and "# load average" in out
    for variant in flat_vs_lora.VARIANTS:
        assert re.search(rf"^{variant}\s+\d+\.\d+", out, re.M), variant
    assert re.search(r"^ratio flat/lora: step-time ratio \d+\.\d+", out, re.M)
    assert re.search(r"^ratio lora/reference: step-time ratio \d+\.\d+", out, re.M)
