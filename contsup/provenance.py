"""What made a result: torch's version, the device's name, the thread count and the code's commit.

Two runs of one config are bit for bit the same only on the same device, thread count and
versions (on CUDA, with --deterministic): result.json records these facts (`run_facts`),
read once per run (and once per resume of it), never per epoch. None of them can fail a
run: a fact that cannot be read is recorded as null.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).resolve().parent.parent   # the checkout holding contsup/, if it is one
GIT_TIMEOUT_S = 10.0


FACTS = ("torch_version", "device_name", "threads", "commit")   # run_facts' keys, as result.json holds them


def run_facts(device: torch.device) -> dict:
    """The facts result.json records about the process that trains on `device` (FACTS)."""
    return {"torch_version": str(torch.__version__), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "commit": code_commit()}


def device_name(device: torch.device) -> str:
    """The GPU's model on CUDA, "Apple GPU (mps)" on MPS, else the CPU's model (or "cpu")."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        if device.type == "mps":
            return "Apple GPU (mps)"
        return cpu_model() or "cpu"
    except Exception:   # a fact, never a reason to fail a run
        return device.type


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform.processor()` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip() or None
    except (OSError, UnicodeDecodeError):
        pass
    return platform.processor() or None


def _git(root: Path, *args: str) -> str | None:
    """`git -C root args` on stdout, or None (no git, not a checkout, an error, too slow)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}   # this checkout, not one named elsewhere
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, env=env,
                           timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def code_commit(root: Path = PACKAGE_ROOT, package: str = "contsup") -> str | None:
    """The commit of the checkout the package runs from, with "-dirty" when its tracked
    files (or untracked files in the package itself) differ from it; None when the package
    is not in a git checkout of its own (an installed copy, no git)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(root).resolve():   # not inside some unrelated repository
        return None
    head = _git(root, "rev-parse", "HEAD")
    changed = _git(root, "status", "--porcelain", "--untracked-files=no")
    new_in_package = _git(root, "status", "--porcelain", "--", package)
    if not head or changed is None or new_in_package is None:
        return None
    return head + ("-dirty" if changed or new_in_package else "")


def facts_by_part(earlier: list | None, start_epoch: int, now: dict) -> list[dict]:
    """The facts each part of a run trained under, in order, each with its first epoch:
    `earlier` (from the checkpoint; None when it keeps none) and this part, from
    `start_epoch`; a part under the same facts as the one before it is not a new part."""
    parts = list(earlier or [])
    if not parts or {k: v for k, v in parts[-1].items() if k != "from_epoch"} != now:
        parts.append({"from_epoch": start_epoch, **now})
    return parts


def result_facts(parts: list[dict]) -> dict:
    """result.json's facts: those of the part that finished the run; and `facts_by_part`
    when its epochs did not all run under them (a resume under another thread count,
    device, torch or commit, or from a checkpoint that kept no facts)."""
    last = {k: v for k, v in parts[-1].items() if k != "from_epoch"}
    mixed = len(parts) > 1 or parts[0]["from_epoch"] != 0
    return last | ({"facts_by_part": parts} if mixed else {})
