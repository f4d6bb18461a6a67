"""An epoch's training steps, written once: the trainer (train.train_epoch) and each
pipeline stage (pipeline.stages.Stage) run their batches through `EpochSteps`, and supply
only the batch itself (the trainer: the local-learning step; a stage: receive, its modules'
steps, send).

After a batch's backward, `EpochSteps.step` keeps the epoch's books: the divergence watch
records the losses on the device (read every `check_every` steps, before that step is
applied: `DivergenceWatch`), the optimizer steps, and the images seen, the wrong predictions
and the loss sums grow, on the device too. `end` reads the watch once more after the epoch's
last step, `numbers` gives the metrics line's training part (rundir.metrics_row). A loss
that is not finite stops the run: error.json and a one-line DivergedError (`stop_diverged`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from . import jsonio
from .errors import DivergedError
from .rundir import write_error


def _module_name(module: int, k: int) -> str:
    return f"the final classifier (module {module} of {k})" if module == k else f"local module {module} of {k}"


def stop_diverged(out: Path, losses, epoch: int, step: int, lr: float, k: int, *, first: int = 1,
                  applied: bool = False):
    """Write `error.json` for a step whose loss is not finite and raise DivergedError.
    `applied`: whether optimizer.step() already took that step (it was found by a later
    check, see DivergenceWatch); either way the checkpoint and metrics.jsonl stay as the
    last good epoch left them. `losses` are those of modules first, first+1, ... (from 1)."""
    values = [float(v) for v in losses.float().cpu()]
    index = next(i for i, v in enumerate(values) if not math.isfinite(v))  # the first: later ones follow it
    module = first + index
    stopped = "at the next check (--check-every), before saving it" if applied else "before applying it"
    message = (f"the loss of {_module_name(module, k)} is {values[index]} at epoch {epoch}, step {step} "
               f"(lr {lr:.3g}); stopped {stopped}. Lower --lr or warm up (--warmup-epochs)"
               + (" in a new --out" if (out / "ckpt.pt").exists() else ""))  # a checkpoint holds the config
    error = DivergedError(message, epoch, step, module, jsonio.finite_or_none(values))
    write_error(out, error.as_dict() | {"lr": lr, "module_name": _module_name(module, k)})
    raise error


class DivergenceWatch:
    """The divergence check of one epoch, kept on the device: `record(losses)` after each
    step notes, without reading anything back to the host, whether every step so far had
    finite losses, how many steps came before the first that did not (its index), and that
    step's losses. `check` reads one flag, which waits for the device (call it every
    `check_every` steps and at the epoch's end); if a step went bad it writes error.json and
    raises DivergedError naming that first step, its epoch and module (`stop_diverged`).
    Steps after the first bad one may have reached the weights (NaN by then): the run stops
    before its next checkpoint, so ckpt.pt and metrics.jsonl keep the last good epoch."""

    def __init__(self, n_losses: int, device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.good_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.zeros(n_losses, device=device)

    def record(self, losses: torch.Tensor) -> None:
        finite = torch.isfinite(losses).all()
        self.first_bad = torch.where(self.ok & ~finite, losses.float(), self.first_bad)
        self.ok &= finite
        self.good_steps += self.ok

    def check(self, out: Path, epoch: int, lr: float, k: int, step: int | None = None, first: int = 1) -> None:
        """Raise if a recorded step went bad. `step`: the step about to be applied by the
        optimizer (None: after the epoch's last); `first`: the module of losses[0] (from 1)."""
        if bool(self.ok):
            return
        bad = int(self.good_steps)
        stop_diverged(out, self.first_bad, epoch, bad, lr, k, first=first, applied=bad != step)


class EpochSteps:
    """The books of one epoch's training steps at `lr` (see the module's docstring), for a
    model of `k` modules whose losses, in this process, are those of modules first, first+1,
    ... (from 1): all K in the trainer, a stage's own in the pipeline; the watch lives on
    `device`. The optimizer's learning rate is set to `lr` here, once per epoch."""

    def __init__(self, optimizer, cfg, epoch: int, lr: float, *, k: int, losses: int, device, first: int = 1):
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.optimizer, self.cfg, self.epoch, self.lr, self.k, self.first = optimizer, cfg, epoch, lr, k, first
        self.out = Path(cfg.out_dir)
        self.watch = DivergenceWatch(losses, device)
        self.seen, self.wrong, self.loss_sum = 0, 0, 0.0

    def step(self, step: int, losses: torch.Tensor, y, logits=None) -> None:
        """After batch `step`'s backward: watch its `losses` (a non-finite one is caught before
        it is applied where the check is read), step the optimizer, add up the images seen,
        the losses and, given the `logits`, the wrong predictions."""
        self.watch.record(losses)
        if (step + 1) % self.cfg.check_every == 0:
            self.watch.check(self.out, self.epoch, self.lr, self.k, step=step, first=self.first)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seen += len(y)
        if logits is not None:
            self.wrong = self.wrong + (logits.argmax(1) != y).sum()
        self.loss_sum = self.loss_sum + losses * len(y)

    def end(self) -> None:
        """After the epoch's last step, before its numbers and checkpoint: the last read of the
        watch (it waits for the device: the caller's clock is then honest)."""
        self.watch.check(self.out, self.epoch, self.lr, self.k, first=self.first)

    def mean_losses(self) -> list[float]:
        """The epoch's mean loss of each module (a read from the device)."""
        return mean_losses(self.loss_sum, self.seen)

    def train_error(self) -> float:
        """Wrong training predictions in % (the logits given to `step`)."""
        return train_error(self.wrong, self.seen)


def mean_losses(loss_sum, seen: int) -> list[float]:
    """The metrics line's `local_losses`: each module's loss summed over `seen` images, averaged."""
    return (loss_sum / seen).tolist() if seen else []


def train_error(wrong, seen: int) -> float:
    """The metrics line's `train_error`: `wrong` predictions of `seen`, in %."""
    return 100.0 * float(wrong) / seen
