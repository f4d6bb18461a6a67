"""The errors users see, and the checks that raise them.

A bad input (a wrong name, a number out of range, a file where a folder should be) becomes
a `UsageError` whose one-line message names the fix; the CLI prints it and exits 2. The
checks below are shared by the configs (so the Python API and the notebooks get them too)
and by the command line. A run that goes wrong on valid input (a non-finite loss) raises
`DivergedError`; the CLI prints its one line and exits 1. A scheduler's SIGTERM (SLURM,
`timeout`, a preemption) or a closed terminal's SIGHUP becomes `Stopped` (`stop_on_signals`),
a KeyboardInterrupt: the run stops as after Ctrl-C, keeping its last checkpoint.
"""
from __future__ import annotations

import math
import numbers
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import field, fields
from pathlib import Path


class UsageError(ValueError):
    """A bad input (unknown name, impossible combination, missing file...).

    The CLI prints its message on one line and exits with status 2.
    """


class DivergedError(RuntimeError):
    """A training step produced a non-finite loss; training stopped before applying it, or
    at the next divergence check (--check-every), before the next checkpoint either way.

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


class Stopped(KeyboardInterrupt):
    """A signal asked the process to stop. A KeyboardInterrupt, so that everything that
    cleans up after Ctrl-C cleans up after it too; `signum` makes the exit status 128 + signum
    (143 for SIGTERM), as a shell reports a process the signal killed."""

    def __init__(self, signum: int):
        super().__init__(signum)   # (pickles as itself)
        self.signum = signum

    def __str__(self):
        return signal.Signals(self.signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_on_signals(signals=STOP_SIGNALS):
    """While the block runs, the first of `signals` to arrive raises `Stopped` in the main
    thread (where Python runs signal handlers), wherever it is: in a step, in a checkpoint
    write (which then removes its .tmp and leaves the previous file whole). Any later one
    is ignored while the process unwinds, so that cleanup is not cut short. The previous
    handlers come back at the end. Called outside the main thread: changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def stop(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the process: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


# --------------------------------------------------------------------------------------
# Config fields on the command line. A field of a config dataclass carries its flag's help
# (and spelling, where that is not --field-name) beside it, as metadata (`option`): cli.py
# builds the flags from the fields, and the checks below name the flag the user typed.
FLAGS: dict[str, str] = {}  # field -> its flag where that is not --field-name (`command_line` fills it)


def option(default, help: str, flag: str | None = None, **argparse):
    """A config field and its flag: `help`; `flag` where the spelling is not --field-name
    (a bool that defaults to True gets --no-field-name, which turns it off); `argparse`:
    more keywords for the flag (choices=...). The value is checked by the config's
    __post_init__, nowhere else."""
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse})


def command_line(cls):
    """Class decorator of a config dataclass: FLAGS learns the flags its fields spell their
    own way (out_dir -> --out), so that a check's message names the flag the user typed."""
    FLAGS.update({f.name: f.metadata["flag"] for f in fields(cls) if f.metadata.get("flag")})
    return cls


def flag(name: str) -> str:
    """The command-line spelling of a config field: batch_size -> --batch-size, out_dir -> --out."""
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
