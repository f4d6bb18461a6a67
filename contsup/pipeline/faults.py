"""Fault injection for the tests, the one seam: `at_epoch_start(rank, epoch)`, which the run
calls as each epoch starts, makes a rank die or hang there when the environment asks for it.
Nothing else in the pipeline knows about injected faults.

    CONTSUP_PIPELINE_DIE=1:1        rank 1 exits (os._exit(1)) as epoch 1 starts
    CONTSUP_PIPELINE_HANG=1:1       rank 1 stops (sleeps) as epoch 1 starts
    CONTSUP_PIPELINE_HOOK_FILE=f    the hook that fires writes "rank:epoch" to f first (the
                                    event a test waits for)

Under torchrun a hook fires only in the first attempt, so that a restart gets through.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

DIE_ENV = "CONTSUP_PIPELINE_DIE"
HANG_ENV = "CONTSUP_PIPELINE_HANG"
HOOK_FILE_ENV = "CONTSUP_PIPELINE_HOOK_FILE"


def at_epoch_start(rank: int, epoch: int) -> None:
    """Die or hang here if DIE_ENV or HANG_ENV names this rank and epoch (see above)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    for env in (DIE_ENV, HANG_ENV):
        if os.environ.get(env) == f"{rank}:{epoch}":
            if os.environ.get(HOOK_FILE_ENV):
                Path(os.environ[HOOK_FILE_ENV]).write_text(f"{rank}:{epoch}")
            if env == DIE_ENV:
                os._exit(1)
            time.sleep(10 ** 6)
