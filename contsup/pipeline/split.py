"""The stage split: which contiguous modules each rank gets, by measured per-module step time
(`profile_modules`, the trainer's choice) or counted FLOPs (`count_module_flops`, for
`describe --stages`), and what a split promises (`predicted_speedup`).
"""
from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import UsageError
from ..model import ContSupNet
from .stages import Batch, stage_step

PROFILE_STEPS = 3    # timed steps (after one warm-up) for the stage split


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
        stage_step(net, range(net.k), None, Batch(x, y, image, []), True, bf16=bf16, seconds=times)
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
                    h, _ = stage_step(net, range(k, k + 1), h, Batch(x, y, image, inputs), True)
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
