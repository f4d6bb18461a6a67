"""The watchdog: a deadline on every wait of a rank, and the one line that blames the failed rank.

Every wait on a peer has a deadline (--rank-timeout during the epochs), kept by
a watchdog thread of ours on every backend: a wait blocked in the backend cannot be
interrupted (an NCCL wait blocks the host in a CUDA synchronisation, and NCCL's own
watchdog speaks after 30 min), so when a deadline passes the watchdog prints the one line
naming the rank and its epoch and ends the process (os._exit(1)). During an epoch a rank is
always under a deadline: each batch and each message pushes it on, so a host blocked
anywhere in a step (CUDA work queued behind a message that never arrives) is caught too,
and blamed on a peer with a message not through, else on the rank itself. Between epochs
(checkpoint, the tests' fault injection: faults.py) nothing is watched but the waits. A dead rank's sockets close,
so on gloo its neighbours notice at once (an exception in the wait); a hung one when the
deadline passes, or at the epoch's end, when a monitored barrier names the ranks that did
not arrive. Which rank is to blame is agreed in the rendezvous store: the first rank to see
a failure records it (the ranks behind a dead rank's neighbours notice only when those
exit, and read the record); a rank stopped by Ctrl-C or SIGTERM records that, so that the
others say so. The setup (data, memory, profiling on rank 0) waits under SETUP_TIMEOUT_S.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
import threading
import time
from contextlib import contextmanager

import torch.distributed as dist

TIMEOUT_S = 300.0    # a peer silent for this long counts as hung
FAILED_KEY = "contsup/failed"
SETUP_TIMEOUT_S = 1800.0


class RankFailure(RuntimeError):
    """Another rank died or hung; the message names it and its epoch, on one line."""



class Watch:
    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.epoch = None   # the rank's latest epoch
        self.links = []   # this rank's links (Link adds itself), for the watchdog's blame
        # the epoch-end gather and barrier run on gloo, also when the links are NCCL
        self.control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # no store: blame the peer
            self.store = None
        # the watchdog: `armed` is (deadline, peer or None, what the rank is doing, seconds)
        self.armed, self.stopped = None, False
        self.cond = threading.Condition()
        if world > 1:
            threading.Thread(target=self._watchdog, name="contsup-watchdog", daemon=True).start()

    # the deadlines
    def arm(self, peer: int | None, doing: str, seconds: float | None = None):
        """From now on, `doing` (with `peer`, if known) must end within `seconds` (default:
        the rank timeout)."""
        with self.cond:
            seconds = self.timeout_s if seconds is None else seconds
            self.armed = (time.monotonic() + seconds, peer, doing, seconds)
            self.cond.notify()

    def disarm(self):
        with self.cond:
            self.armed = None

    @contextmanager
    def waiting(self, peer: int | None, doing: str, seconds: float | None = None):
        """A wait under its own deadline; afterwards the deadline it interrupted (the rank's
        step, or an enclosing wait) runs again, from now."""
        before = self.armed
        self.arm(peer, doing, seconds)
        try:
            yield
        finally:
            if before is None or self.stopped:
                self.disarm()
            else:
                self.arm(*before[1:])

    def step(self):
        """The rank made progress in its epoch: its own step has the timeout from now."""
        self.arm(None, f"its own step of epoch {self.epoch}")

    def stop(self):
        with self.cond:
            self.armed, self.stopped = None, True
            self.cond.notify()

    def _watchdog(self):
        with self.cond:
            while True:
                if self.stopped:
                    return
                if self.armed is None:
                    self.cond.wait()
                    continue
                left = self.armed[0] - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            _, peer, doing, seconds = self.armed
        try:
            if peer is None:   # blocked in its own step: blame a peer whose message is not through
                peer = next((p for p in (link.waiting_on() for link in self.links) if p is not None), self.rank)
            detail = f"{doing} rank {peer}" if doing.endswith((" to", " from")) else doing
            line = self.message(peer, f"{detail}: no progress for {seconds:.0f} s")
            print(f"contsup: error: {line}", file=sys.stderr, flush=True)   # as the CLI prints errors
        finally:
            os._exit(1)   # the main thread is blocked in the backend: only leaving ends the wait

    # the waits
    def barrier(self):
        """All ranks reached the epoch's end within the timeout, or the missing ones are named."""
        if self.world == 1:
            return
        try:   # the barrier names the missing ranks; the watchdog is the backstop
            with self.waiting(None, "waiting at the epoch's end", 2 * self.timeout_s):
                dist.monitored_barrier(group=self.control, timeout=self.timeout, wait_all_ranks=True)
        except Exception as e:
            missing = re.findall(r"[Rr]anks? (\d+)[\d, ]* failed", str(e)) if self.rank == 0 else ["0"]
            self.fail(int(missing[0]) if missing else None, f"barrier failed ({type(e).__name__})")

    def wait(self, work, peer: int, doing: str):
        """Wait for a send or receive; the watchdog bounds it (the backend's own timeout is
        the process group's, longer)."""
        try:
            with self.waiting(peer, doing):
                work.wait()
        except Exception as e:  # closed connection, timeout inside the backend...
            self.fail(peer, f"{doing} rank {peer} failed ({type(e).__name__})")

    def call(self, fn, *args, seconds: float | None = None, **kwargs):
        """fn(*args, **kwargs) under a deadline, a failure in it blamed on the peer (args[1]
        of isend/irecv)."""
        peer = args[1] if fn in (dist.isend, dist.irecv) else None
        try:
            with self.waiting(peer, f"in {fn.__name__}", seconds):
                return fn(*args, **kwargs)
        except Exception as e:
            self.fail(peer, f"{fn.__name__} failed ({type(e).__name__})")

    # the blame
    def message(self, peer: int | None, detail: str) -> str:
        """The one line naming the failed rank: the first one recorded in the store, else ours."""
        if peer is None and self.world == 2:
            peer = 1 - self.rank
        mine = f"{peer if peer is not None else '?'} {'setup' if self.epoch is None else self.epoch} failed"
        blamed = self._record(mine) or mine
        rank, epoch, what = blamed.split()
        when = "before the first epoch" if epoch == "setup" else f"during epoch {epoch}"
        happened = "was stopped (Ctrl-C or SIGTERM)" if what == "interrupted" else "died or hung"
        return (f"rank {rank} {happened} {when} (seen by rank {self.rank}: {detail}); "
                f"the last checkpoint is intact: rerun the same command to resume")

    def fail(self, peer: int | None, detail: str):
        raise RankFailure(self.message(peer, detail))

    def interrupted(self):
        """This rank stops on Ctrl-C or SIGTERM: tell the others, who will see it leave."""
        self._record(f"{self.rank} {'setup' if self.epoch is None else self.epoch} interrupted")

    def _record(self, what: str) -> str | None:
        """Record `what` unless another rank recorded first; the record, None without a store."""
        if self.store is None or self.world == 1:
            return None
        try:
            self.store.set_timeout(datetime.timedelta(seconds=5))
            return self.store.compare_set(FAILED_KEY, "", what).decode() or what
        except Exception:   # the store lives on a rank that is gone
            return None
