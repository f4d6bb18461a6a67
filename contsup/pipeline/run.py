"""The pipelined run: the process group, then on every rank the set-up, the epochs and the
result; rank 0 also reads data, writes the run folder and assembles each epoch's metrics
line and checkpoint from the ranks' parts.
"""
from __future__ import annotations

import datetime
import itertools
import os
import socket
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import UsageError, stop_on_signals
from ..rundir import RunLog, checkpoint_fits, end_epoch, finish_run, metrics_row, open_run
from ..speed.setup import compile_model, pick_device, use_device
from ..train import RunSetup, TrainConfig, learning_rate, reconstruction_target, set_up_run
from . import faults
from .messages import EVAL, TRAIN
from .split import balanced_split, profile_modules, split_from_sizes
from .stages import Stage
from .watch import SETUP_TIMEOUT_S, TIMEOUT_S, RankFailure, Watch

DEPTH = 2            # in-flight messages per link (the ring)


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
    return use_device(rank_device(cfg.device))   # always indexed on CUDA


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
            return _run(cfg, watch, device, stack, resume=resume, progress=progress, split=split, depth=depth)
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


def _run(cfg: TrainConfig, watch: Watch, device, lock: ExitStack, *, resume: bool, progress: bool,
         split: list[int] | None, depth: int) -> dict:
    """The run on this rank, in a process group that `watch` watches. Every rank builds the
    whole model as train.train does (from the seed, so the same initial weights; the
    checkpoint's) and keeps training only its own parts. Rank 0 alone reads data; it opens
    the run folder, measures memory and finds the split, then everyone learns the split and
    the number of batches per epoch (the plan)."""
    first = watch.rank == 0
    ckpt, result = _open(cfg, resume, watch, lock)
    if result is not None:
        return result
    _check_ranks(cfg, split, watch.world)   # before any file is written
    run = set_up_run(cfg, device, ckpt, data=first)
    cfg, net = run.cfg, run.net   # 'auto' encoders named as they run (config.json, checkpoint, result)
    plan, best, memory, log = _plan(run, ckpt, split, watch.world) if first else (None, None, None, None)
    plan = _broadcast(watch, plan, SETUP_TIMEOUT_S)
    if cfg.torch_compile:
        compile_model(net)
    stage = Stage(net, cfg, plan["bounds"], watch, max_batch=plan["max_batch"], depth=depth)
    if ckpt is not None:
        with checkpoint_fits(cfg):
            stage.optimizer.load_state_dict(_local_optimizer_state(ckpt["optimizer"], stage.mine))

    epochs = range(plan["start_epoch"], cfg.epochs)
    if first:
        epochs = tqdm(epochs, desc=Path(cfg.out_dir).name, disable=not progress, initial=plan["start_epoch"],
                      total=cfg.epochs)
    for epoch in epochs:
        faults.at_epoch_start(watch.rank, epoch)
        lr = learning_rate(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        numbers = stage.run_epoch(epoch, lr, _batches(run) if first else None, *plan["batches"], plan["sizes"])
        parts = _gather(watch, numbers | stage.part())   # the pipe is drained
        if first:
            best = _end_epoch(run, stage, parts, (epoch, lr), best, (memory, log))
            epochs.set_postfix(test_error=f"{parts[-1]['test_error']:.2f}%")
    result = None
    if first:
        result = finish_run(cfg, net, best, memory, device, log=log, world_size=watch.world, stages=plan["bounds"])
    return _broadcast(watch, result)


def _open(cfg: TrainConfig, resume: bool, watch: Watch, lock: ExitStack) -> tuple[dict | None, dict | None]:
    """Rank 0 opens the run folder (rundir.open_run, its lock into `lock`); every rank learns
    the outcome: (checkpoint, result), or the one-line refusal, raised on every rank."""
    opened = None
    if watch.rank == 0:
        try:
            opened = open_run(cfg, resume, lock)
        except UsageError as e:
            opened = str(e)
    opened = _broadcast(watch, opened, SETUP_TIMEOUT_S)
    if isinstance(opened, str):
        raise UsageError(opened)
    return opened


def _check_ranks(cfg: TrainConfig, split: list[int] | None, world: int) -> None:
    """Refuse more ranks than modules, and a --split that is not one number per rank."""
    if world > cfg.k:
        raise UsageError(f"{world} ranks but only K={cfg.k} modules; use at most {cfg.k} ranks")
    if split is not None and len(split_from_sizes(list(split), cfg.k)) - 1 != world:
        raise UsageError(f"--split {','.join(map(str, split))} is for {len(split)} ranks, but there are {world}; "
                         f"give one number per rank")


def _plan(run: RunSetup, ckpt: dict | None, split: list[int] | None, world: int) -> tuple[dict, tuple, dict, RunLog]:
    """Rank 0: (the plan every rank learns, best (error, epoch), memory, the run's log). It
    opens the run folder (the first epoch, a new run's memory) and finds the split: as given,
    one stage alone, or balanced by each module's measured step time. The plan holds the
    batch schedule (`batch_sizes`), which the receiving ranks use to know each message's
    layout before it arrives."""
    cfg, net = run.cfg, run.net
    start_epoch, best, memory, log = run.open_folder(ckpt)
    if split is not None:
        bounds, seconds = split_from_sizes(list(split), net.k), None
    elif world == 1:
        bounds, seconds = [0, net.k], None
    else:
        seconds = profile_modules(net, *run.first_batch(), cfg.bf16)
        bounds = balanced_split(seconds, world)
    plan = {"bounds": bounds, "seconds": seconds, "batches": (len(run.train_loader), len(run.test_loader)),
            "sizes": batch_sizes(run.train_loader) + batch_sizes(run.test_loader),
            "max_batch": max(cfg.batch_size, 256), "start_epoch": start_epoch}
    return plan, best, memory, log


def batch_sizes(loader) -> list[int]:
    """The size of each batch `loader` (a DeviceLoader) gives in an epoch, in order: the same
    every epoch, so that the ranks behind rank 0, which read no data, know them in advance."""
    n, b = len(loader.images), loader.batch_size
    return [min(b, n - i) for i in range(0, len(loader) * b, b)]


def _batches(run: RunSetup):
    """Rank 0's batches of an epoch: (kind, x, y, reconstruction target) of every training
    batch, then of every test batch."""
    train = ((TRAIN, x, y, reconstruction_target(x, run.train_loader, run.cfg)) for x, y in run.train_loader)
    return itertools.chain(train, ((EVAL, x, y, None) for x, y in run.test_loader))


def _gather(watch: Watch, part: dict) -> list[dict] | None:
    """Every rank's `part` (its epoch's numbers and its part of the checkpoint), on rank 0,
    once every rank has reached the epoch's end; None on the other ranks."""
    parts = [None] * watch.world if watch.rank == 0 else None
    watch.barrier()
    watch.call(dist.gather_object, part, parts, dst=0, group=watch.control)
    return parts


def _end_epoch(run: RunSetup, stage: Stage, parts: list[dict], when: tuple[int, float], best: tuple,
               books: tuple[dict, RunLog]) -> tuple:
    """Rank 0: the epoch's metrics line and checkpoint from the ranks' `parts` (rundir.end_epoch),
    as train.train writes them; returns the best (error, epoch). `when`: (epoch, lr); `books`:
    (memory, the run's log)."""
    epoch, lr = when
    memory, log = books
    seconds = max(p["t1"] for p in parts) - min(p["t0"] for p in parts)
    row = metrics_row(epoch, lr, train_error=parts[-1]["train_error"], test_error=parts[-1]["test_error"],
                      local_losses=[v for p in parts for v in p["losses"]], seconds=seconds, seen=parts[0]["seen"])
    net = run.net
    whole = {n: next(p["model"][n] for p in parts if n in p["model"]) for n in net.state_dict()}
    optimizer = _whole_optimizer_state([p["optimizer"] for p in parts], len(stage.names))
    return end_epoch(run.cfg, row, (whole, optimizer), run.gen, best, memory, log=log)
