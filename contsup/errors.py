"""The errors users see: a bad choice (UsageError) or a run that went wrong (DivergedError)."""


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
