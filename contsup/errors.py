"""The errors users see, and the checks that raise them.

A bad input (a wrong name, a number out of range, a file where a folder should be) becomes
a `UsageError` whose one-line message names the fix; the CLI prints it and exits 2. The
checks below are shared by the configs (so the Python API and the notebooks get them too)
and by the command line. A run that goes wrong on valid input (a non-finite loss) raises
`DivergedError`; the CLI prints its one line and exits 1.
"""
from __future__ import annotations

import math
import numbers
import os
import signal
import threading
from pathlib import Path


class UsageError(ValueError):
    """A bad input (unknown name, impossible combination, missing file...).

    The CLI prints its message on one line and exits with status 2.
    """


class DivergedError(RuntimeError):
    """A training step produced a non-finite loss; training stopped before applying it.

    The message is one line naming the epoch, step and module and the likely fix; the
    attributes say the same for code (epoch and step count from 0, as in metrics.jsonl;
    `module` from 1, K = the final classifier;
    `losses` holds the step's K losses, None where non-finite). The CLI prints the message
    and exits with status 1: the input was valid, the run was not.
    """

    def __init__(self, message: str, epoch: int, step: int, module: int, losses: list):
        super().__init__(message)
        self.epoch, self.step, self.module, self.losses = epoch, step, module, losses

    def as_dict(self) -> dict:
        return {"error": str(self), "epoch": self.epoch, "step": self.step, "module": self.module,
                "losses": self.losses}


FLAGS = {"out_dir": "--out", "k": "-k"}  # where a field's flag is not its name


def flag(name: str) -> str:
    """The command-line spelling of a config field: batch_size -> --batch-size."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """An integer in low..high (high None: no upper end). Not a bool, not a float: epochs=2.5
    or k="4" from a notebook parameter would otherwise fail deep inside training."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or value < low or (high is not None and value > high):
        what = ("a positive integer" if low == 1 else f"an integer >= {low}") if high is None \
            else f"an integer in {low}..{high}"
        raise UsageError(f"{flag(name)} must be {what}, got {value!r}")
    return int(value)


def check_float(name: str, value, low: float, high: float = math.inf, low_open: bool = True) -> float:
    """A finite real number in (low, high] ([low, high] with low_open=False). NaN and
    infinity are refused: `--lr nan` would otherwise train for hours on nothing."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        what = f"a finite number {lo}" + (f" and <= {high:g}" if high != math.inf else "")
        raise UsageError(f"{flag(name)} must be {what}, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):  # "false" is a true string
        raise UsageError(f"{name} must be True or False, got {value!r}")
    return value


def check_str(name: str, value) -> str:
    """A non-empty string; a path-like object becomes its string (config files are JSON)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{flag(name)} must be a non-empty string, got {value!r}")
    return value


def check_writable_folder(path, option: str) -> None:
    """`path` is a folder, or can become one: its nearest existing ancestor is a folder we
    may write in. Checked before anything is written, so that a bad --out or --data-root
    ends in one line instead of a FileExistsError or PermissionError halfway through."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder; choose another {option}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: no permission to write in {existing}; choose another {option}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm():
    """SIGTERM (torchrun stopping its ranks, a scheduler's preemption) raises KeyboardInterrupt
    in the main thread, as Ctrl-C does, so that a run stops the same way: one line, the last
    checkpoint kept. Returns the handler it replaced (None off the main thread, where Python
    cannot set one, and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)
