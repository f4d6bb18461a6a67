"""One rank's part of the run: its modules (`stage_step`: one batch through them), its
parameters and optimizer, its links, and one epoch of batches (`Stage.run_epoch`: receive,
step, send, with the epoch's books kept by epoch.EpochSteps, as the trainer keeps them).
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

from ..epoch import EpochSteps
from ..model import ContSupNet
from ..speed.setup import to_format
from ..step import autocast, module_step
from ..train import TrainConfig, make_optimizer
from .messages import EVAL, TRAIN, Link, link_slots, message_bytes, module_of
from .watch import Watch


class Batch(NamedTuple):
    """One batch as a stage sees it: the image `x` (None where no module of this rank reads
    it), the labels, the reconstruction target (or None) and `inputs`, the inputs of the
    modules before this stage's (None where not needed), which grows as the modules run."""
    x: torch.Tensor | None
    y: torch.Tensor
    image: torch.Tensor | None
    inputs: list


def stage_step(net: ContSupNet, modules: range, h, batch: Batch, train: bool, *, bf16: bool = False,
               seconds: list | None = None):
    """Modules `modules` of one batch, through the method's loop (ContSupNet.run_modules: the
    input of module k is the image for module 0, else supply(k-1)), each running forward +
    local loss + backward (train, step.module_step) or the forward alone (eval, no grad). `h`
    is the previous rank's output; `batch.inputs` holds the inputs of modules before
    `modules` (None where not needed) and grows. Returns the last output (detached) and the
    losses. As local_learning_step, cut by rank; `seconds[k]` accumulates each module's time
    (the supply feeding it, and its step), from the end of the previous module's."""
    x, y, image, module_inputs = batch
    losses = []
    like = x if x is not None else h   # x is None where no encoder of this rank reads the image
    last = [clock(like)] if seconds is not None else None

    def run(k, h_in):
        if train:
            h, loss = module_step(net, k, h_in, like, y, image=image, bf16=bf16)
            losses.append(loss)
        else:
            with autocast(like, bf16):
                h = net.module_forward(k, h_in)
        if seconds is not None:
            now = clock(like)
            seconds[k] += now - last[0]
            last[0] = now
        return h

    with torch.set_grad_enabled(train):
        h = net.run_modules(x, run, modules, h, module_inputs, precision=lambda: autocast(like, bf16))
    return h.detach(), losses


def clock(like: torch.Tensor) -> float:
    """perf_counter once the device is done with the work queued so far: on CUDA the kernels
    run after their launch returns, so an unsynchronised clock would time the launches."""
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


def to_cpu(obj):
    """`obj` (a tensor, or a dict of them, nested) detached on the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj


class Stage:
    """Rank `watch.rank` of `watch.world`: modules bounds[rank]..bounds[rank+1]-1 of `net`, their
    optimizer, and the links to the neighbours (`depth` buffers of `max_batch` images each)."""

    def __init__(self, net: ContSupNet, cfg: TrainConfig, bounds: list[int], watch: Watch, *, max_batch: int,
                 depth: int):
        rank, world = watch.rank, watch.world
        self.net, self.cfg, self.bounds, self.rank, self.watch = net, cfg, bounds, rank, watch
        self.first, self.last = rank == 0, rank == world - 1
        self.modules = range(bounds[rank], bounds[rank + 1])
        # this rank's parameters (their indices in the whole model's order) and optimizer
        self.names = [n for n, _ in net.named_parameters()]
        self.mine = [i for i, n in enumerate(self.names) if module_of(n, net.k) in self.modules]
        params = list(net.parameters())
        self.optimizer = make_optimizer([params[i] for i in self.mine], cfg)
        self.state_keys = {n for n in net.state_dict() if module_of(n, net.k) in self.modules}
        self.device = device = next(net.parameters()).device
        self.inbound = self.outbound = None
        if not self.first:
            self.slots_in = link_slots(net, bounds, rank - 1)
            self.inbound = Link(rank - 1, message_bytes(net, bounds, rank - 1, max_batch), len(self.slots_in),
                                device, depth, watch)
        if not self.last:
            self.slots_out = link_slots(net, bounds, rank)
            self.outbound = Link(rank + 1, message_bytes(net, bounds, rank, max_batch), len(self.slots_out),
                                 device, depth, watch)

    def run_epoch(self, epoch: int, lr: float, source, n_train: int, n_eval: int,
                  sizes: list[int] | None = None) -> dict:
        """n_train training batches, then n_eval test batches, through this rank's modules.
        Rank 0 takes them from `source` ((kind, x, y, image) each), the others from the link.
        `sizes`: the batch size of each of them (the batch schedule, run.batch_sizes), so that
        a receiving rank knows each message's layout before it arrives (Link.recv); None: read
        from every message. Returns this rank's numbers: its modules' mean losses, the errors
        (last rank), the images seen and the wall-clock times: start, end of each training
        batch (`ends`), last end. The whole epoch is under the watchdog's deadline (watch.py)."""
        self.watch.epoch = epoch
        self.watch.step()
        try:
            return self._epoch(epoch, lr, source, (n_train, n_eval), sizes)
        finally:
            self.watch.disarm()

    def _epoch(self, epoch: int, lr: float, source, counts: tuple[int, int], sizes: list[int] | None) -> dict:
        net, cfg = self.net, self.cfg
        n_train, n_eval = counts
        books = EpochSteps(self.optimizer, cfg, epoch, lr, k=net.k, losses=len(self.modules), device=self.device,
                           first=self.bounds[self.rank] + 1)   # (from 1) the module of this stage's first loss
        if not self.first:
            self.inbound.expect(n_train + n_eval)
        test_wrong, test_total, ends = 0, 0, []
        t0 = t1 = time.time()
        for i in range(n_train + n_eval):
            self.watch.step()
            head, h, batch = self._receive(epoch, i, n_train, source, sizes)
            train = head[0] == TRAIN
            net.train(train)
            out, losses = stage_step(net, self.modules, h, batch, train, bf16=cfg.bf16)
            self._send(head, out, batch)   # before the optimizer step: the next rank starts sooner
            if train:
                books.step(head[2], torch.stack(losses), batch.y, out if self.last else None)
                t1 = time.time()
                ends.append(t1)
                if head[2] == n_train - 1:   # the epoch's last training step: before its numbers and checkpoint
                    books.end()
            elif self.last:
                test_wrong = test_wrong + (out.argmax(1) != batch.y).sum()   # as train.evaluate counts, on the device
                test_total += len(batch.y)
            out = h = batch = None
        if self.outbound is not None:
            self.outbound.flush()
        if self.inbound is not None:
            self.inbound.check_layouts()
        return {"losses": books.mean_losses(), "seen": books.seen, "t0": t0, "t1": t1, "ends": ends,
                "train_error": books.train_error() if self.last and books.seen else None,
                "test_error": 100.0 * int(test_wrong) / test_total if self.last and test_total else None}

    def _receive(self, epoch: int, i: int, n_train: int, source,
                 sizes: list[int] | None) -> tuple[tuple, torch.Tensor | None, Batch]:
        """(header, the previous rank's output, the batch) of the epoch's i-th batch: from
        `source` on rank 0, else from the inbound link (the header known from the batch
        schedule `sizes` where given, see run_epoch)."""
        if self.first:
            kind, x, y, image = next(source)
            head = (kind, epoch, i if kind == TRAIN else i - n_train, len(y))
            return head, None, Batch(to_format(x, self.cfg.channels_last), y, image, [])
        kind, step = (TRAIN, i) if i < n_train else (EVAL, i - n_train)
        head, tensors = self.inbound.recv((kind, epoch, step, sizes[i]) if sizes is not None else None)
        got = dict(zip(self.slots_in, tensors))
        x = got.get("x")
        inputs = [x] + [got.get(("in", m)) for m in range(1, self.bounds[self.rank])]
        assert head[1] == epoch, f"rank {self.rank} expected a batch of epoch {epoch}, got header {head}"
        return head, got.get("h"), Batch(x, got["y"], got.get("image"), inputs)

    def _send(self, head: tuple, out: torch.Tensor, batch: Batch) -> None:
        """What the next rank needs of this batch (link_slots), if there is a next rank."""
        if self.outbound is not None:
            have = {"h": out, "y": batch.y, "x": batch.x, "image": batch.image}
            self.outbound.send(head, [have[s] if isinstance(s, str) else batch.inputs[s[1]] for s in self.slots_out])

    def part(self) -> dict:
        """This rank's part of the checkpoint, on the CPU: its state_dict entries, and its
        optimizer state keyed by the parameters' indices in the whole model."""
        state = self.optimizer.state_dict()
        return {"model": to_cpu({n: v for n, v in self.net.state_dict().items() if n in self.state_keys}),
                "optimizer": to_cpu({"state": {self.mine[i]: s for i, s in state["state"].items()},
                                     "group": {k: v for k, v in state["param_groups"][0].items() if k != "params"}})}
