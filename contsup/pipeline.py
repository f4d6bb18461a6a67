"""One run, module-parallel: the K local modules split into G stages, one per rank.

    rank 0 (reads data)            rank 1                         rank G-1
    [modules 0..a) ──message──> [cut a-1 encoders, modules a..b) ──> ... ──> [.., module K-1] -> logits

Local learning needs no gradient across a cut, so only activations flow: rank r owns its
modules, their heads and decoders, and the context encoders of the cuts that feed its
modules (`module_of`), runs forward + local loss + backward for them (step.module_step) and
steps its own optimizer. Processing the batches in order (a FIFO pipeline) gives exactly
the single-process result of train.train, bit for bit; world size 1 runs the same code.

Reading order: 1. the stage split (by measured per-module step time; `describe --stages`
by counted FLOPs), 2. what a rank owns and what each link carries, 3. links (a ring of D
in-flight flat buffers), 4. one batch through a rank's modules, 5. faults (our watchdog,
the one-line blame), 6. `Stage`: a rank's epoch, 7. `train_pipelined`: setup, the epochs,
metrics and checkpoint assembly on rank 0. Ctrl-C or SIGTERM (torchrun's stop) on any rank
stops every rank, each with at most one line; the last checkpoint stays.

Devices: gloo on CPU; NCCL on CUDA, rank r on cuda:LOCAL_RANK (`rank_device`).

    torchrun --nproc-per-node 2 -m contsup train --dataset digits8 -k 4 ...   # G = 2
    python -m contsup train --pipeline ...                                     # G = 1, same path
"""
from __future__ import annotations

import copy
import datetime
from contextlib import ExitStack
import itertools
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from . import tables
from .errors import UsageError, stop_on_signals
from .model import ContSupNet, feature_shape
from .step import autocast, module_step
from .epoch import DivergenceWatch
from .rundir import append_metrics, checkpoint_fits, finish_run, metrics_row, open_run, save_checkpoint
from .speed.setup import compile_model, pick_device, to_format
from .train import TrainConfig, learning_rate, make_optimizer, reconstruction_target, set_up_run

DEPTH = 2            # in-flight messages per link (the ring)
TIMEOUT_S = 300.0    # a peer silent for this long counts as hung
PROFILE_STEPS = 3    # timed steps (after one warm-up) for the stage split
DIE_ENV = "CONTSUP_PIPELINE_DIE"    # "rank:epoch": that rank exits (os._exit(1)) as the epoch starts (tests)
HANG_ENV = "CONTSUP_PIPELINE_HANG"  # "rank:epoch": that rank stops (sleeps) as the epoch starts (tests)
HOOK_FILE_ENV = "CONTSUP_PIPELINE_HOOK_FILE"   # a file the hooks above write as they fire (tests)


class RankFailure(RuntimeError):
    """Another rank died or hung; the message names it and its epoch, on one line."""


# --------------------------------------------------------------------------------------
# 1. The stage split
def balanced_split(seconds: list[float], stages: int, cut_seconds: list[float] | None = None) -> list[int]:
    """Bounds [0, b_1, ..., K] of the contiguous split of modules taking `seconds` each into
    `stages` non-empty stages whose slowest stage is fastest (dynamic programming). With
    `cut_seconds[j]`, the time of sending a batch across a cut before module j, a cut costs as
    much as a stage (sending overlaps computing, so the pipe runs at the slowest of both)."""
    k = len(seconds)
    if not 1 <= stages <= k:
        raise UsageError(f"cannot split K={k} modules over {stages} ranks; use 1 to {k} ranks")
    prefix = [0.0]
    for s in seconds:
        prefix.append(prefix[-1] + s)
    # slowest[g][j]: the best slowest-stage time of modules [0, j) in g stages; cut[g][j]: its last bound
    inf = float("inf")
    slowest = [[inf] * (k + 1) for _ in range(stages + 1)]
    cut = [[0] * (k + 1) for _ in range(stages + 1)]
    slowest[0][0] = 0.0
    for g in range(1, stages + 1):
        for j in range(g, k + 1):
            for i in range(g - 1, j):
                t = max(slowest[g - 1][i], prefix[j] - prefix[i], cut_seconds[i] if cut_seconds and i else 0.0)
                if t < slowest[g][j]:
                    slowest[g][j], cut[g][j] = t, i
    bounds, j = [k], k
    for g in range(stages, 0, -1):
        j = cut[g][j]
        bounds.append(j)
    return bounds[::-1]


def split_from_sizes(sizes: list[int], k: int) -> list[int]:
    """Bounds from modules per stage, e.g. [1, 3] -> [0, 1, 4]."""
    if any(s < 1 for s in sizes) or sum(sizes) != k:
        raise UsageError(f"--split {','.join(map(str, sizes))} must give every rank >= 1 module and "
                         f"add up to K={k}")
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return bounds


def predicted_speedup(costs: list[float], bounds: list[int], batches: int | None = None) -> dict:
    """What the split promises, communication not counted: each stage's cost (in the unit of
    `costs`: seconds measured, or FLOPs counted), the steady-state speed-up over one process
    (sum / costliest stage) and the idle share of the ranks (the bubble: imbalance, plus
    filling and draining the pipe once per `batches` when given)."""
    stage = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    total, slowest, g = sum(costs), max(stage), len(stage)
    n = batches or float("inf")
    pipelined = total + (n - 1) * slowest if batches else slowest   # per epoch, or per batch at steady state
    serial = n * total if batches else total
    return {"bounds": bounds, "stage_costs": stage, "speedup": serial / pipelined,
            "bubble": 1 - serial / (g * pipelined)}


def profile_modules(net: ContSupNet, x, y, image=None, bf16: bool = False, steps: int = PROFILE_STEPS) -> list[float]:
    """Seconds of each module's step (the supply feeding it, forward, local loss, backward),
    the median of `steps` timed steps after a warm-up, on a copy of `net`; on CUDA each
    module is timed from and to a synchronised device (stage_step)."""
    net = copy.deepcopy(net).train()
    runs = []
    for _ in range(steps + 1):
        times = [0.0] * net.k
        stage_step(net, range(net.k), None, x, y, image, [], True, bf16, times)
        net.zero_grad(set_to_none=True)
        runs.append(times)
    return [sorted(r[k] for r in runs[1:])[len(runs[1:]) // 2] for k in range(net.k)]


def count_module_flops(net: ContSupNet, batch: int, batch_of) -> list[int]:
    """Counted FLOPs (conv + matmul, forward + backward: torch's FlopCounterMode) of each
    module's training step at `batch`, without running it at that batch: counted at batches
    2, 4 and 8 from `batch_of(n)` -> (x, y, image), where a cost is a polynomial of degree <= 2
    in the batch (the contrast loss compares the samples pairwise), and extrapolated. Seconds
    of work on a CPU, for `describe --stages`; the trainer splits by measured time instead."""
    net = copy.deepcopy(net).train()
    sizes, counts = (2, 4, 8), []
    with torch.random.fork_rng(devices=[]):
        for n in sizes:
            x, y, image = batch_of(n)
            h, inputs, flops = None, [], []
            for k in range(net.k):
                with FlopCounterMode(display=False) as counter:
                    h, _ = stage_step(net, range(k, k + 1), h, x, y, image, inputs, True, False)
                flops.append(counter.get_total_flops())
            net.zero_grad(set_to_none=True)
            counts.append(flops)
    # Lagrange through the three counts, at `batch`: exact for polynomials of degree <= 2
    weights = [1.0] * 3
    for i, a in enumerate(sizes):
        for j, b in enumerate(sizes):
            if i != j:
                weights[i] *= (batch - b) / (a - b)
    return [round(sum(w * c[k] for w, c in zip(weights, counts))) for k in range(net.k)]


# --------------------------------------------------------------------------------------
# 2. Ownership and messages
def module_of(name: str, k: int) -> int:
    """The module a state_dict entry belongs to: its own block, head and decoder, the classifier
    (the last module), and the context encoders of cut c (trained by module c+1's loss)."""
    part, index = (name.split(".") + [""])[:2]
    if part in ("blocks", "heads", "decoders"):
        return int(index)
    if part == "classifier":
        return k - 1
    if part == "context":
        return int(index) + 1
    raise ValueError(f"no module owns '{name}'")


def stage_needs(net: ContSupNet, bounds: list[int], rank: int) -> set:
    """What stage `rank` needs from upstream: 'h' (the previous module's output), 'y', 'x'
    (the image encoders, or module 0's input as context), 'image' (a decoder's target) and
    ('in', m): the input of an earlier module m > 0 as residual context."""
    a, b = bounds[rank], bounds[rank + 1]
    needs = {"y"}
    if a > 0:
        needs.add("h")
    for k in range(max(a, 1), b):   # the cut k-1 feeds module k
        ctx = net.context[k - 1]
        if ctx.image is not None:
            needs.add("x")
        for m in ctx.sources:
            if m == 0:
                needs.add("x")
            elif m < a:
                needs.add(("in", m))
    if any(net.loss_weights[k][0] for k in range(a, min(b, net.k - 1))):
        needs.add("image")
    return needs


def link_slots(net: ContSupNet, bounds: list[int], rank: int) -> list:
    """The tensors rank sends to rank+1, in order: what rank+1 needs, and what ranks further
    down need from before rank+1's first module (relayed)."""
    first = bounds[rank + 1]
    wanted = set(stage_needs(net, bounds, rank + 1))
    for r in range(rank + 2, len(bounds) - 1):
        wanted |= {s for s in stage_needs(net, bounds, r) if s != "h" and (s[0] != "in" or s[1] < first)}
    named = [s for s in ("h", "y", "x", "image") if s in wanted]
    return named + sorted(s for s in wanted if isinstance(s, tuple))


def slot_sample_bytes(net: ContSupNet, bounds: list[int], rank: int, slot) -> int:
    """The most bytes one sample of `slot` takes on the link rank -> rank+1 (fp32 features)."""
    size = tables.DATA_RECIPES[net.cfg.dataset].image_size
    if slot == "y":
        return 8
    if slot in ("x", "image"):
        return 4 * 3 * size * size
    module = bounds[rank + 1] if slot == "h" else slot[1]   # h is the input of rank+1's first module
    c, side = feature_shape_at(net, module)
    return 4 * c * side * side


def feature_shape_at(net: ContSupNet, module: int) -> tuple[int, int]:
    """(channels, side) of the input of `module` (> 0), i.e. of module-1's output."""
    stage, _ = net.cuts[module - 1]
    return feature_shape(stage, tables.DATA_RECIPES[net.cfg.dataset].image_size)


# A message is one flat uint8 buffer: a header of int64s, then each tensor's bytes (64-byte
# aligned). Header: kind, epoch, step, batch size, then per slot: present, dtype, ndim,
# shape (4), strides (4). The receiver views its tensors in place, with the sender's strides
# (the memory format decides which kernels run, so it must match for bit-equality).
# The header is written on the buffer's device without a host->device copy: the layouts a
# link sends are few (train or eval, full or last batch), each is made once on the device
# (`layouts`) and copied device to device; epoch and step are written by two scalar fills.
TRAIN, EVAL = 0, 1
HEAD, PER_SLOT = 4, 11
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.float64]


def _align(n: int) -> int:
    return -(-n // 64) * 64


def message_bytes(net: ContSupNet, bounds: list[int], rank: int, max_batch: int) -> int:
    slots = link_slots(net, bounds, rank)
    return _align(8 * (HEAD + PER_SLOT * len(slots))) + sum(
        _align(max_batch * slot_sample_bytes(net, bounds, rank, s)) for s in slots)


def pack(buf: torch.Tensor, head: tuple, tensors: list, layouts: dict | None = None):
    """Write header `head` (kind, epoch, step, batch) and `tensors` into the flat buffer.
    `layouts` keeps the header layouts already made on the buffer's device (one per link)."""
    dense, entries = [], []
    for t in tensors:
        if t is not None and not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            t = t.contiguous()
        dense.append(t)
        entries += [0] * PER_SLOT if t is None else \
            [1, DTYPES.index(t.dtype), t.dim(), *t.shape, *[1] * (4 - t.dim()), *t.stride(), *[1] * (4 - t.dim())]
    kind, epoch, step, batch = head
    key = (kind, batch, *entries)
    layouts = {} if layouts is None else layouts
    if key not in layouts:   # once per layout: the only host->device copy
        layouts[key] = torch.tensor([kind, 0, 0, batch, *entries], dtype=torch.int64, device=buf.device)
    header = buf[:8 * len(layouts[key])].view(torch.int64)
    header.copy_(layouts[key])
    header[1].fill_(epoch)
    header[2].fill_(step)
    offset = _align(8 * len(header))
    for t in dense:
        if t is None:
            continue
        n = t.numel() * t.element_size()
        assert offset + n <= buf.numel(), "message larger than its buffer"
        # the storage behind a dense tensor, in memory order, whatever its strides
        buf[offset:offset + n].view(t.dtype).copy_(t.as_strided((t.numel(),), (1,)))
        offset += _align(n)


def unpack(buf: torch.Tensor, slots: int) -> tuple[tuple, list]:
    """(head, tensors) of a message: views into `buf`, valid until the buffer is reused. The
    header is read on the host (on CUDA the one device->host read of a message: the receiver
    needs the batch's shapes), which is where a receiving host waits for the message."""
    header = buf[:8 * (HEAD + PER_SLOT * slots)].view(torch.int64).tolist()
    offset, tensors = _align(8 * len(header)), []
    for i in range(slots):
        present, dtype, ndim, *rest = header[HEAD + PER_SLOT * i:HEAD + PER_SLOT * (i + 1)]
        if not present:
            tensors.append(None)
            continue
        dtype, shape, strides = DTYPES[dtype], rest[:ndim], rest[4:4 + ndim]
        numel = 1
        for s in shape:
            numel *= s
        n = numel * dtype.itemsize
        tensors.append(torch.as_strided(buf[offset:offset + n].view(dtype), shape, strides))
        offset += _align(n)
    return tuple(header[:HEAD]), tensors


# --------------------------------------------------------------------------------------
# 3. Links: a ring of D flat buffers per link, so that packing, sending and the receiver's
# compute overlap. The sender reuses a buffer once its previous send completed (at most D
# sends in flight); the receiver keeps D-1 receives posted ahead of the message it is
# working on, so the next batches arrive while it computes.
class Link:
    def __init__(self, peer: int, nbytes: int, slots: int, device, depth: int, watch: "Watch"):
        self.peer, self.slots, self.watch = peer, slots, watch
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(depth)]
        self.layouts = {}        # header layouts made on the device (pack)
        self.pending = deque()   # (buffer index, work) in message order
        self.count = 0           # messages sent or receives posted so far
        watch.links.append(self)

    # sending side
    def send(self, head: tuple, tensors: list):
        if len(self.pending) == len(self.buffers):
            self.watch.wait(self.pending.popleft()[1], self.peer, "sending to")
        i = self.count % len(self.buffers)
        pack(self.buffers[i], head, tensors, self.layouts)
        self.pending.append((i, self.watch.call(dist.isend, self.buffers[i], self.peer)))
        self.count += 1

    def flush(self):
        while self.pending:
            self.watch.wait(self.pending.popleft()[1], self.peer, "sending to")

    # receiving side: `expect(n)` announces n more messages; `recv` returns the next one,
    # viewed in its buffer, which is reused (for a receive posted ahead) at the next call
    def expect(self, n: int):
        self.expected = n

    def recv(self) -> tuple[tuple, list]:
        while self.expected and len(self.pending) < len(self.buffers):   # all buffers are free now
            i = self.count % len(self.buffers)
            self.pending.append((i, self.watch.call(dist.irecv, self.buffers[i], self.peer)))
            self.count += 1
            self.expected -= 1
        i, work = self.pending.popleft()
        with self.watch.waiting(self.peer, "receiving from"):   # on CUDA the host waits in unpack
            self.watch.wait(work, self.peer, "receiving from")
            return unpack(self.buffers[i], self.slots)

    def waiting_on(self) -> int | None:
        """The peer, if a message of this link is not through yet (for the watchdog)."""
        try:
            return self.peer if any(not work.is_completed() for _, work in list(self.pending)) else None
        except Exception:   # the main thread changed the queue meanwhile
            return None


# --------------------------------------------------------------------------------------
# 4. The stage's step: modules a..b of one batch
def stage_step(net: ContSupNet, modules: range, h, x, y, image, module_inputs: list, train: bool,
               bf16: bool, seconds: list | None = None):
    """Modules `modules` of one batch, through the method's loop (ContSupNet.run_modules: the
    input of module k is the image for module 0, else supply(k-1)), each running forward +
    local loss + backward (train, step.module_step) or the forward alone (eval, no grad). `h`
    is the previous rank's output; `module_inputs` holds the inputs of modules before
    `modules` (None where not needed) and grows. Returns the last output (detached) and the
    losses. As local_learning_step, cut by rank; `seconds[k]` accumulates each module's time
    (the supply feeding it, and its step), from the end of the previous module's."""
    losses = []
    like = x if x is not None else h   # x is None where no encoder of this rank reads the image
    last = [_clock(like)] if seconds is not None else None

    def run(k, h_in):
        if train:
            h, loss = module_step(net, k, h_in, like, y, image, bf16)
            losses.append(loss)
        else:
            with autocast(like, bf16):
                h = net.module_forward(k, h_in)
        if seconds is not None:
            now = _clock(like)
            seconds[k] += now - last[0]
            last[0] = now
        return h

    with torch.set_grad_enabled(train):
        h = net.run_modules(x, run, modules, h, module_inputs, precision=lambda: autocast(like, bf16))
    return h.detach(), losses


def _clock(like: torch.Tensor) -> float:
    """perf_counter once the device is done with the work queued so far: on CUDA the kernels
    run after their launch returns, so an unsynchronised clock would time the launches."""
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


# --------------------------------------------------------------------------------------
# 5. Faults. Every wait on a peer has a deadline (--rank-timeout during the epochs), kept by
# a watchdog thread of ours on every backend: a wait blocked in the backend cannot be
# interrupted (an NCCL wait blocks the host in a CUDA synchronisation, and NCCL's own
# watchdog speaks after 30 min), so when a deadline passes the watchdog prints the one line
# naming the rank and its epoch and ends the process (os._exit(1)). During an epoch a rank is
# always under a deadline: each batch and each message pushes it on, so a host blocked
# anywhere in a step (CUDA work queued behind a message that never arrives) is caught too,
# and blamed on a peer with a message not through, else on the rank itself. Between epochs
# (checkpoint, test hooks) nothing is watched but the waits. A dead rank's sockets close,
# so on gloo its neighbours notice at once (an exception in the wait); a hung one when the
# deadline passes, or at the epoch's end, when a monitored barrier names the ranks that did
# not arrive. Which rank is to blame is agreed in the rendezvous store: the first rank to see
# a failure records it (the ranks behind a dead rank's neighbours notice only when those
# exit, and read the record); a rank stopped by Ctrl-C or SIGTERM records that, so that the
# others say so. The setup (data, memory, profiling on rank 0) waits under SETUP_TIMEOUT_S.
FAILED_KEY = "contsup/failed"
SETUP_TIMEOUT_S = 1800.0


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


def _test_hooks(rank: int, epoch: int):
    """The fault hooks; under torchrun only in its first attempt, so that a restart gets through.
    A hook that fires first writes "rank:epoch" to the file HOOK_FILE_ENV names, if any (the
    event a test waits for)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    for env in (DIE_ENV, HANG_ENV):
        if os.environ.get(env) == f"{rank}:{epoch}":
            if os.environ.get(HOOK_FILE_ENV):
                Path(os.environ[HOOK_FILE_ENV]).write_text(f"{rank}:{epoch}")
            if env == DIE_ENV:
                os._exit(1)
            time.sleep(10 ** 6)


# --------------------------------------------------------------------------------------
# 6. One rank's part of the run: its modules, optimizer and links, and one epoch of batches
class Stage:
    def __init__(self, net: ContSupNet, cfg: TrainConfig, bounds: list[int], rank: int, world: int,
                 max_batch: int, depth: int, watch: Watch):
        self.net, self.cfg, self.bounds, self.rank, self.watch = net, cfg, bounds, rank, watch
        self.first, self.last = rank == 0, rank == world - 1
        self.modules = range(bounds[rank], bounds[rank + 1])
        # this rank's parameters (their indices in the whole model's order) and optimizer
        self.names = [n for n, _ in net.named_parameters()]
        self.mine = [i for i, n in enumerate(self.names) if module_of(n, net.k) in self.modules]
        params = list(net.parameters())
        self.optimizer = make_optimizer([params[i] for i in self.mine], cfg)
        self.state_keys = {n for n in net.state_dict() if module_of(n, net.k) in self.modules}
        device = next(net.parameters()).device
        self.inbound = self.outbound = None
        if not self.first:
            self.slots_in = link_slots(net, bounds, rank - 1)
            self.inbound = Link(rank - 1, message_bytes(net, bounds, rank - 1, max_batch), len(self.slots_in),
                                device, depth, watch)
        if not self.last:
            self.slots_out = link_slots(net, bounds, rank)
            self.outbound = Link(rank + 1, message_bytes(net, bounds, rank, max_batch), len(self.slots_out),
                                 device, depth, watch)

    def run_epoch(self, epoch: int, lr: float, source, n_train: int, n_eval: int) -> dict:
        """n_train training batches, then n_eval test batches, through this rank's modules.
        Rank 0 takes them from `source` ((kind, x, y, image) each), the others from the link.
        Returns this rank's numbers: its modules' mean losses, the errors (last rank), the
        images seen and the wall-clock times: start, end of each training batch (`ends`), last end.
        The whole epoch is under the watchdog's deadline (section 5)."""
        self.watch.epoch = epoch
        self.watch.step()
        try:
            return self._epoch(epoch, lr, source, n_train, n_eval)
        finally:
            self.watch.disarm()

    def _epoch(self, epoch: int, lr: float, source, n_train: int, n_eval: int) -> dict:
        net, cfg, watch = self.net, self.cfg, self.watch
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.first:
            self.inbound.expect(n_train + n_eval)
        seen, wrong, loss_sum, test_wrong, test_total, ends = 0, 0, 0.0, 0, 0, []
        first_module = self.bounds[self.rank] + 1   # (from 1) the module of this stage's first loss
        diverged = DivergenceWatch(len(self.modules), next(net.parameters()).device)   # as train.train_epoch
        t0 = t1 = time.time()
        for i in range(n_train + n_eval):
            watch.step()
            if self.first:
                kind, x, y, image = next(source)
                x, h, module_inputs = to_format(x, cfg.channels_last), None, []
                head = (kind, epoch, i if kind == TRAIN else i - n_train, len(y))
            else:
                head, tensors = self.inbound.recv()
                got = dict(zip(self.slots_in, tensors))
                kind, x, y, image, h = head[0], got.get("x"), got["y"], got.get("image"), got.get("h")
                a = self.bounds[self.rank]
                module_inputs = [x] + [got.get(("in", m)) for m in range(1, a)]
                assert head[1] == epoch, f"rank {self.rank} expected a batch of epoch {epoch}, got header {head}"
            train = kind == TRAIN
            net.train(train)
            out, losses = stage_step(net, self.modules, h, x, y, image, module_inputs, train, cfg.bf16)
            if self.outbound is not None:   # before the optimizer step: the next rank starts sooner
                have = {"h": out, "y": y, "x": x, "image": image}
                self.outbound.send(head, [have[s] if isinstance(s, str) else module_inputs[s[1]]
                                          for s in self.slots_out])
            if train:
                if losses:   # on the device; read every check_every steps, before that step is applied
                    diverged.record(torch.stack(losses))
                    if (head[2] + 1) % cfg.check_every == 0:
                        diverged.check(Path(cfg.out_dir), epoch, lr, net.k, step=head[2], first=first_module)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                seen += len(y)
                loss_sum = loss_sum + torch.stack(losses) * len(y)   # as train.train sums them
                if self.last:
                    wrong += (out.argmax(1) != y).sum()
                t1 = time.time()
                ends.append(t1)
            elif self.last:
                test_wrong = test_wrong + (out.argmax(1) != y).sum()   # as train.evaluate counts, on the device
                test_total += len(y)
            if i == n_train - 1 and losses:   # the epoch's last training step: before its numbers and checkpoint
                diverged.check(Path(cfg.out_dir), epoch, lr, net.k, first=first_module)
            out = h = x = image = module_inputs = None
        if self.outbound is not None:
            self.outbound.flush()
        return {"losses": (loss_sum / seen).tolist() if seen else [], "seen": seen, "t0": t0, "t1": t1, "ends": ends,
                "train_error": 100.0 * float(wrong) / seen if self.last and seen else None,
                "test_error": 100.0 * int(test_wrong) / test_total if self.last and test_total else None}

    def optimizer_part(self) -> dict:
        """This rank's optimizer state, keyed by the parameters' indices in the whole model."""
        state = self.optimizer.state_dict()
        return _to_cpu({"state": {self.mine[i]: s for i, s in state["state"].items()},
                        "group": {k: v for k, v in state["param_groups"][0].items() if k != "params"}})


# --------------------------------------------------------------------------------------
# 7. The run: setup, the epochs, metrics and checkpoint assembly on rank 0
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, timeout_s: float) -> bool:
    """Join the process group torchrun describes (env), or make a world of one; True if we
    made it (and so tear it down)."""
    if dist.is_initialized():
        return False
    timeout = datetime.timedelta(seconds=max(timeout_s, SETUP_TIMEOUT_S))   # our watchdog keeps timeout_s
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        # Keys of each torchrun attempt apart: a restart must not read the last one's addresses.
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"contsup/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout)
    return True


def rank_device(name: str, env=os.environ) -> torch.device:
    """The device of this rank. Under torchrun (WORLD_SIZE > 1) each rank takes the GPU of its
    LOCAL_RANK, so `--device cuda` (or auto) means cuda:LOCAL_RANK; an explicit `cuda:N` would
    put every rank of the node on one GPU, so it is refused (CUDA_VISIBLE_DEVICES chooses which
    GPUs the ranks get). Alone, `cuda` is cuda:LOCAL_RANK (0 without torchrun)."""
    device = pick_device(name)
    if device.type != "cuda":
        return device
    world, local = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
    if device.index is not None and world > 1:
        raise UsageError(f"--device {name} would put all {world} ranks on one GPU; use --device cuda (each rank "
                         f"takes cuda:LOCAL_RANK; CUDA_VISIBLE_DEVICES chooses the GPUs)")
    if device.index is None:
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but {torch.cuda.device_count()} CUDA GPUs are visible; "
                             f"start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
    return device


def _device(cfg: TrainConfig) -> torch.device:
    device = rank_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _broadcast(watch: Watch, obj=None, seconds: float | None = None):
    """rank 0's `obj` on every rank, within `seconds` (default: the rank timeout)."""
    box = [obj]
    watch.call(dist.broadcast_object_list, box, src=0, group=watch.control, seconds=seconds)
    return box[0]


def _local_optimizer_state(state: dict, indices: list[int]) -> dict:
    """The part of a whole-model optimizer state_dict for the parameters `indices` (global)."""
    group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    return {"state": {i: state["state"][g] for i, g in enumerate(indices) if g in state["state"]},
            "param_groups": [group | {"params": list(range(len(indices)))}]}


def _whole_optimizer_state(parts: list[dict], n_params: int) -> dict:
    """The single-process optimizer state_dict from the ranks' (state keyed by global index)."""
    state = {g: s for part in parts for g, s in part["state"].items()}
    return {"state": dict(sorted(state.items())), "param_groups": [parts[0]["group"] | {"params": list(range(n_params))}]}


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def train_pipelined(cfg: TrainConfig, resume: bool = False, progress: bool = True, split: list[int] | None = None,
                    depth: int = DEPTH, timeout_s: float = TIMEOUT_S) -> dict:
    """train.train, with the modules split over the ranks of the process group (torchrun's,
    or a world of one). Rank 0 reads data and writes the run folder; returns the result on
    every rank. `split`: modules per rank (default: balanced by measured step time).
    A lost peer raises RankFailure (its one line); a hung one makes the watchdog print that
    line and end the process. SIGTERM raises KeyboardInterrupt here, as Ctrl-C (the other
    ranks will name this one as stopped); the caller prints its one line."""
    if depth < 1 or timeout_s <= 0:
        raise UsageError("--pipeline-depth must be >= 1 and --rank-timeout > 0")
    device = _device(cfg)
    watch, made_group = None, False
    try:
        with ExitStack() as stack:
            stack.enter_context(stop_on_signals())   # torchrun stops its ranks with SIGTERM: as Ctrl-C
            made_group = init_distributed(device, timeout_s)
            watch = Watch(dist.get_rank(), dist.get_world_size(), timeout_s)
            # rank 0 holds the run folder's lock for the whole run (open_run takes it into `stack`)
            return _run(cfg, resume, progress, split, depth, watch, device, stack)
    except (RankFailure, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt) and watch is not None:
            watch.interrupted()   # the others will say so when this rank is gone
        if isinstance(e, RankFailure) or (dist.is_initialized() and dist.get_world_size() > 1):
            made_group = False   # tearing down a group with a lost peer may wait for it forever
        raise
    finally:
        if watch is not None:
            watch.stop()
        if made_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg, resume, progress, split, depth, watch, device, lock: ExitStack) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    first = rank == 0

    # Rank 0 opens the run folder; every rank learns the outcome (and the checkpoint).
    opened = None
    if first:
        try:
            opened = open_run(cfg, resume, lock)
        except UsageError as e:
            opened = str(e)
    opened = _broadcast(watch, opened, SETUP_TIMEOUT_S)
    if isinstance(opened, str):
        raise UsageError(opened)
    ckpt, result = opened
    if result is not None:
        return result

    if world > cfg.k:
        raise UsageError(f"{world} ranks but only K={cfg.k} modules; use at most {cfg.k} ranks")
    if split is not None and len(split_from_sizes(list(split), cfg.k)) - 1 != world:   # before any file is written
        raise UsageError(f"--split {','.join(map(str, split))} is for {len(split)} ranks, but there are {world}; "
                         f"give one number per rank")

    # Every rank builds the whole model as train.train does (from the seed, so the same
    # initial weights; the checkpoint's) and keeps training only its own parts. Rank 0
    # alone reads data; it opens the run folder, measures memory and finds the split, then
    # everyone learns the split and the number of batches per epoch.
    run = set_up_run(cfg, device, ckpt, data=first)
    cfg, net = run.cfg, run.net   # 'auto' encoders named as they run (config.json, checkpoint, result)
    plan = None
    if first:
        start_epoch, best, memory = run.open_folder(ckpt)
        if split is not None:
            bounds, seconds = split_from_sizes(list(split), net.k), None
        elif world == 1:
            bounds, seconds = [0, net.k], None
        else:
            seconds = profile_modules(net, *run.first_batch(), cfg.bf16)
            bounds = balanced_split(seconds, world)
        plan = {"bounds": bounds, "seconds": seconds, "batches": (len(run.train_loader), len(run.test_loader)),
                "max_batch": max(cfg.batch_size, 256), "start_epoch": start_epoch}
    plan = _broadcast(watch, plan, SETUP_TIMEOUT_S)
    bounds, (n_train, n_eval) = plan["bounds"], plan["batches"]
    if cfg.torch_compile:
        compile_model(net)

    stage = Stage(net, cfg, bounds, rank, world, plan["max_batch"], depth, watch)
    if ckpt is not None:
        with checkpoint_fits(cfg):
            stage.optimizer.load_state_dict(_local_optimizer_state(ckpt["optimizer"], stage.mine))

    epochs = range(plan["start_epoch"], cfg.epochs)
    if first:
        epochs = tqdm(epochs, desc=Path(cfg.out_dir).name, disable=not progress, initial=plan["start_epoch"],
                      total=cfg.epochs)
    for epoch in epochs:
        _test_hooks(rank, epoch)
        lr = learning_rate(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        source = None
        if first:
            source = itertools.chain(((TRAIN, x, y, reconstruction_target(x, run.train_loader, cfg))
                                      for x, y in run.train_loader), ((EVAL, x, y, None) for x, y in run.test_loader))
        numbers = stage.run_epoch(epoch, lr, source, n_train, n_eval)

        # The pipe is drained: rank 0 gathers the epoch's numbers and the ranks' parts.
        part = numbers | {"model": _to_cpu({n: v for n, v in net.state_dict().items() if n in stage.state_keys}),
                          "optimizer": stage.optimizer_part()}
        parts = [None] * world if first else None
        watch.barrier()
        watch.call(dist.gather_object, part, parts, dst=0, group=watch.control)
        if first:
            test_error = parts[-1]["test_error"]
            if test_error < best[0]:
                best = (test_error, epoch)
            seconds = max(p["t1"] for p in parts) - min(p["t0"] for p in parts)
            row = metrics_row(epoch, lr, train_error=parts[-1]["train_error"], test_error=test_error,
                              local_losses=[v for p in parts for v in p["losses"]], seconds=seconds,
                              seen=parts[0]["seen"])
            append_metrics(cfg, row)
            whole = {n: next(p["model"][n] for p in parts if n in p["model"]) for n in net.state_dict()}
            optimizer = _whole_optimizer_state([p["optimizer"] for p in parts], len(stage.names))
            save_checkpoint(cfg, epoch, (whole, optimizer), run.gen, best, memory)
            epochs.set_postfix(test_error=f"{test_error:.2f}%")

    result = None
    if first:
        result = finish_run(cfg, net, best, memory, device, world_size=world, stages=bounds)
    return _broadcast(watch, result)

