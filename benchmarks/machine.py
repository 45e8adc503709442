"""What ran a benchmark: machine, load and library versions, printed with every result."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else "unknown CPU"


def load_average() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def machine_info(device: str) -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    info = {
        "cpu": f"{cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "none (CPU run)",
        "python": platform.python_version(),
        "versions": (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
                     f"{transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}"),
        "load average (1/5/15 min)": load_average(),
    }
    if device == "cuda":
        info["cuda"] = f"{torch.version.cuda}, cudnn {torch.backends.cudnn.version()}"
    return info


def print_machine(device: str) -> None:
    for key, value in machine_info(device).items():
        print(f"# {key}: {value}")
