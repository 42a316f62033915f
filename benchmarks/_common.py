"""What every benchmark records: the machine it ran on, synchronised timing, its JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from mriface._device import resolve_device
from mriface._io import write_text_atomic


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (``platform.processor()`` where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
                platform.processor())


def machine_info(device: "torch.device | str") -> dict:
    """CPU model, cores, torch threads, versions, device (and GPU name), and the load at the time.

    The 1-minute load average is recorded because the CPU figures of a
    2-core machine shared with other work are only comparable at equal load.
    """
    device = resolve_device(device)
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def sync(device: "torch.device | str") -> None:
    """Wait for queued CUDA work, so that a wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def write_json(result: dict, path: "str | os.PathLike[str]") -> Path:
    """Write a benchmark's result as indented JSON (atomically) and return the path."""
    return write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
