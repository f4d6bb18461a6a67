"""Training: the run's config, the paper's schedule, the epoch loop, evaluation, `train`.

One run = one `TrainConfig`. `train` opens its folder (rundir: config.json, metrics.jsonl,
ckpt.pt, result.json, error.json; the folder's lock; the checks of every file read back),
sets the run up (`set_up_run`: model, data, loaders, from the seed or the checkpoint; the
device, deterministic kernels, memory format and compile are speed/setup's), then trains
epoch by epoch: `train_epoch` (its steps' books are epoch.EpochSteps, shared with each
pipeline stage), `evaluate`, and the epoch's metrics line and checkpoint (rundir.end_epoch).
"""
from __future__ import annotations

import difflib
import math
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import tables
from .data import DeviceLoader, ImageData, denormalize, load_dataset
from .epoch import EpochSteps, mean_losses, train_error
from .errors import UsageError, check_bool, check_float, check_int, check_str, command_line, option
from .model import ContSupNet, ModelConfig, check_model_fields
from .provenance import run_facts
from .rundir import RunLog, checkpoint_fits, end_epoch, finish_run, metrics_row, open_run, prepare_run_folder
from .speed.encoders import AUTO, CONTEXT_IMPLS
from .speed.memory import measure_step_memory, reuse_freed_cpu_memory
from .speed.setup import compile_model, pick_device, prepare_model, resolved_for, to_format, use_device
from .step import autocast, local_learning_step
from .wrap import build_net


@command_line
@dataclass
class TrainConfig(ModelConfig):
    """One run: the model's fields (`ModelConfig`: arch, k, mode, loss, head, reconstruct,
    loss_scales, balanced, dataset, widen), then how it is trained; each field with its
    command-line help (errors.option)."""
    dataset: str = "digits"         # the embedded data, so a config trains offline (the model's default: CIFAR-10)
    context_impl: str = option(AUTO, "how the context encoders run, the same function each way: lean "
                               "(recompute, least memory), fused (faster, more memory), plain (autograd "
                               "reference); auto: speed/encoders.resolve_context_impl's choice for the "
                               "device (lean on a CPU, plain on a GPU), recorded in config.json",
                               choices=(AUTO, *CONTEXT_IMPLS))
    # speed: none of these changes the function computed, except bf16's rounding
    channels_last: bool = option(True, "NHWC activations: faster convolutions on CPU and GPU alike")
    bf16: bool = option(False, "bfloat16 autocast for the forward passes (weights stay fp32)")
    cudnn_benchmark: bool = option(True, "CUDA: let cuDNN time and pick its fastest algorithms")
    deterministic: bool = option(False, "deterministic kernels (cuDNN, cuBLAS, torch): bit for bit on CUDA too "
                                        "(same GPU, threads, versions), slower (see use_deterministic)")
    torch_compile: bool = option(False, "torch.compile every module, head, encoder and decoder (slow first epoch)",
                                 flag="--compile")
    reuse_cpu_memory: bool = option(True, "CPU: freed activations are reused, not unmapped by glibc "
                                          "(memory.reuse_freed_cpu_memory)")
    # optimisation; None = the paper's value for the dataset (tables.DATA_RECIPES)
    epochs: int = option(160, "training epochs")
    batch_size: int | None = option(None, "batch size (default: the paper's for the dataset)")
    lr: float | None = option(None, "peak learning rate (default: the paper's for the dataset)")
    warmup_epochs: int = option(tables.PAPER_SCHEDULE.warmup_epochs, "epochs of learning-rate warm-up")
    # data and bookkeeping
    data_root: str = option("data", "folder of the datasets")
    download: bool = option(False, "fetch the dataset with torchvision if missing")
    train_subset: int | None = option(None, "train on the first N images only")
    out_dir: str = option("runs/default", "run folder (on the command line, default: runs/<dataset>-<arch>-K<k>-"
                                          "<mode>-<loss>, then every other setting that is not the default, e.g. "
                                          "-seed1)", flag="--out")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    seed: int = option(0, "random seed (initial weights, data order, augmentation)")
    # How often (in steps) the trainer reads the divergence check from the device; it also
    # reads it at every epoch's end, before the metrics line and the checkpoint. A read waits
    # for the device to catch up with the host, so on CUDA it ends the host's running ahead:
    # once every 50 steps that stall is spread over 50 steps, while a run that diverges
    # wastes at most 49 steps, which never reach a checkpoint. (CIFAR-10 at the paper's batch
    # of 1024 has 49 steps an epoch: one read per epoch.) 1 = before every optimizer step.
    check_every: int = option(50, "read the divergence check from the device every N steps (and at each "
                                  "epoch's end)")

    def __post_init__(self):
        """Every field's type and range, so that a bad value from the CLI, a notebook
        parameter or the Python API fails here in one line, not hours into training. The
        combinations (cut tables, mode vs K) are the model's: `model_config()` checks them."""
        check_model_fields(self)
        check_str("context_impl", self.context_impl)
        if self.context_impl not in (AUTO, *CONTEXT_IMPLS):
            raise UsageError(f"unknown context implementation '{self.context_impl}'; "
                             f"choose one of: {', '.join((AUTO, *CONTEXT_IMPLS))}")
        recipe = tables.check_dataset(self.dataset)
        self.batch_size = recipe.batch_size if self.batch_size is None else self.batch_size
        self.lr = recipe.lr if self.lr is None else self.lr
        self.epochs = check_int("epochs", self.epochs, 1)
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.lr = check_float("lr", self.lr, 0.0)
        self.warmup_epochs = check_int("warmup_epochs", self.warmup_epochs, 0)
        if self.train_subset is not None:
            self.train_subset = check_int("train_subset", self.train_subset, 1)
        self.seed = check_int("seed", self.seed, 0, 2**63 - 1)  # what torch.manual_seed takes
        self.check_every = check_int("check_every", self.check_every, 1)
        for name in ("data_root", "out_dir", "device"):
            setattr(self, name, check_str(name, getattr(self, name)))
        for name in ("download", "channels_last", "bf16", "cudnn_benchmark", "deterministic", "torch_compile",
                     "reuse_cpu_memory"):
            check_bool(name, getattr(self, name))

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise UsageError(f"a run config is a dict of TrainConfig fields, got {type(d).__name__} {d!r:.60}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            close = [m for k in unknown for m in difflib.get_close_matches(k, known, 1)]
            raise UsageError(f"unknown config keys {unknown}" + (f" (did you mean {close}?)" if close else "")
                             + "; the keys are the fields of contsup.train.TrainConfig")
        return cls(**d)



def learning_rate(epoch: int, base_lr: float, epochs: int, warmup_epochs: int = 10,
                  warmup_from: float = tables.PAPER_SCHEDULE.warmup_from) -> float:
    """The lr of 0-based epoch `epoch`, set once per epoch, as the authors' train.py sets it.

    METHOD §5's lr_e = lr*(1+cos(pi*e/E))/2 counts epochs from 1: the authors call their
    schedule with e = epoch + 1, so the first epoch (0-based 0) trains at cos(1), the last
    (E-1) at cos(E) = lr 0. The warm-up epochs e = 1..W blend from `warmup_from` towards
    that same epoch's cosine value:
        lr_e = cos(e) * (e-1)/W + warmup_from * (W+1-e)/W        (e <= W)
    which starts at exactly `warmup_from` (e = 1); epoch e = W+1 is the first plain cosine.
    Deliberate difference: a one-epoch run without warm-up (smoke tests) would train at
    lr 0 only; it trains at `base_lr` instead.
    """
    if epochs == 1 and warmup_epochs == 0:
        return base_lr
    cosine = lambda e: 0.5 * base_lr * (1 + math.cos(math.pi * e / epochs))  # noqa: E731
    e = epoch + 1
    if e <= warmup_epochs:
        return cosine(e) * (e - 1) / warmup_epochs + warmup_from * (warmup_epochs + 1 - e) / warmup_epochs
    return cosine(e)


def make_optimizer(net, cfg: TrainConfig):
    """The paper's SGD over `net`'s parameters (or over `net`, a list of parameters: a pipeline
    stage's own)."""
    s = tables.PAPER_SCHEDULE
    params = net.parameters() if isinstance(net, torch.nn.Module) else net
    return torch.optim.SGD(params, lr=cfg.lr, momentum=s.momentum, nesterov=True,
                           weight_decay=s.weight_decay)


def reconstruction_target(x, loader: DeviceLoader, cfg: TrainConfig):
    """The decoders' target for batch `x` of `loader`: the image in [0,1] (None without
    --reconstruct)."""
    return denormalize(x, loader.recipe, loader.stats) if cfg.reconstruct else None


# --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(net: ContSupNet, loader, channels_last: bool = False, bf16: bool = False) -> float:
    """Test error in %, BN in eval mode, context included. The count of errors stays on the
    device until the end: one read for the whole test set."""
    net.eval()
    wrong = total = 0
    for x, y in loader:
        x = to_format(x, channels_last)
        with autocast(x, bf16):
            logits = net(x)
        wrong = wrong + (logits.argmax(1) != y).sum()
        total += len(y)
    return 100.0 * int(wrong) / total


def train_epoch(net: ContSupNet, loader: DeviceLoader, optimizer, cfg: TrainConfig, epoch: int, lr: float, *,
                progress: bool = False) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One epoch of training steps at `lr`, as `train` runs it: batch -> local-learning step
    -> optimizer (epoch.EpochSteps keeps the books). Returns (images seen, wrong predictions,
    summed losses [K]), the last two on the device.

    Nothing in a step waits for the device: the loader's data and constants are on the
    device from the epoch's start (DeviceLoader), the divergence check stays there and is
    read every `cfg.check_every` steps and once after the last step (epoch.DivergenceWatch),
    and the step bar reads the running losses at most every half second. The read after the
    last step also makes the caller's clock honest: the device has finished the epoch when
    this returns.
    """
    books = EpochSteps(optimizer, cfg, epoch, lr, k=net.k, losses=net.k, device=loader.device)
    net.train()
    shown = time.perf_counter()  # when the step bar's running losses were last shown
    with tqdm(loader, desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress) as steps:
        for step, (x, y) in enumerate(steps):
            image = reconstruction_target(x, loader, cfg)
            logits, losses = local_learning_step(net, to_format(x, cfg.channels_last), y, image, cfg.bf16)
            books.step(step, losses, y, logits)
            if progress and time.perf_counter() - shown > 0.5:  # reading the losses syncs: not every step
                steps.set_postfix(loss=" ".join(f"{v:.3f}" for v in books.mean_losses()), refresh=False)
                shown = time.perf_counter()
    books.end()
    return books.seen, books.wrong, books.loss_sum


# --------------------------------------------------------------------------------------
def first_step_memory(run: "RunSetup") -> dict:
    """measure_step_memory on the first (unshuffled) training batch. It runs with
    torch.use_deterministic_algorithms off (restored after): it measures on copies, and its
    reference step runs the plain encoders, whose adaptive pool has no deterministic CUDA
    backward (speed/setup.check_deterministic)."""
    x, y, image = run.first_batch()
    strict, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        return measure_step_memory(run.net, x, y, image, run.cfg.bf16)
    finally:
        torch.use_deterministic_algorithms(strict, warn_only=warn_only)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, note_fresh_start: bool = False) -> dict:
    """Train one configuration; returns (and writes) its result. With `resume`, continue from
    the run folder's checkpoint (or return the result of a finished run of the same config);
    without, refuse to touch a folder that already holds a run (see rundir.open_run). The run
    folder's lock is held from before the folder is read until result.json is written.
    `note_fresh_start`: say on stderr when `resume` finds nothing to resume (the CLI's
    --resume; `reproduce` resumes whatever it finds and says nothing)."""
    with ExitStack() as lock:
        ckpt, result = open_run(cfg, resume, lock)
        if result is not None:
            return result
        if note_fresh_start and resume and ckpt is None:
            print(f"contsup: note: nothing to resume in {cfg.out_dir} (no ckpt.pt); starting a fresh run",
                  file=sys.stderr)
        return _train(cfg, ckpt, progress)


@dataclass
class RunSetup:
    """What a run trains with, set up one way (`set_up_run`) for `train` and for every rank
    of the pipeline. The optimizer is not part of it: `train` steps all the parameters, a
    pipeline rank only its stage's (pipeline.stages.Stage), each loading its part of the checkpoint."""
    cfg: TrainConfig                    # context_impl resolved for the device (resolved_for)
    device: torch.device
    net: ContSupNet                     # on the device (prepare_model), the checkpoint's weights loaded
    data: ImageData | None              # None where the run reads no data (pipeline ranks but 0)
    train_loader: DeviceLoader | None   # shuffled by `gen`
    test_loader: DeviceLoader | None
    gen: torch.Generator | None         # data order and augmentation, at the checkpoint's state

    def first_batch(self):
        """(x in the model's memory format, y, reconstruction target or None): the first
        training batch, unshuffled (memory measurement, the pipeline's profiling)."""
        loader = DeviceLoader(self.data.train_x, self.data.train_y, self.train_loader.recipe, self.cfg.batch_size,
                              train=False, device=self.device)
        x, y = next(iter(loader))
        return to_format(x, self.cfg.channels_last), y, reconstruction_target(x, loader, self.cfg)

    def open_folder(self, ckpt: dict | None) -> tuple[int, tuple, dict, RunLog]:
        """prepare_run_folder, measuring a new run's memory on its first batch; this process's
        facts (provenance.run_facts) are read here, once."""
        return prepare_run_folder(self.cfg, ckpt, lambda: first_step_memory(self), run_facts(self.device))


def set_up_run(cfg: TrainConfig, device, ckpt: dict | None, data: bool = True) -> RunSetup:
    """The run's model (from the seed, then the checkpoint's weights), data, loaders and data
    generator on `device`, and the torch RNG at the checkpoint's state. Writes nothing.
    `data` False: no data (a pipeline rank that receives its batches)."""
    cfg = resolved_for(cfg, device)
    if device.type == "cpu" and cfg.reuse_cpu_memory:
        reuse_freed_cpu_memory()   # process-wide, for the rest of the process
    torch.manual_seed(cfg.seed)
    net = prepare_model(build_net(cfg.model_config()), cfg, device)  # validates the model choices first
    images = gen = train_loader = test_loader = None
    if data:
        recipe = tables.DATA_RECIPES[cfg.dataset]
        images = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.train_subset)
        gen = torch.Generator().manual_seed(cfg.seed)
        train_loader = DeviceLoader(images.train_x, images.train_y, recipe, cfg.batch_size, train=True, device=device,
                                    generator=gen)
        test_loader = DeviceLoader(images.test_x, images.test_y, recipe, max(cfg.batch_size, 256), train=False,
                                   device=device)
    if ckpt is not None:
        with checkpoint_fits(cfg):
            net.load_state_dict(ckpt["model"])
            if gen is not None:
                gen.set_state(ckpt["data_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
    return RunSetup(cfg, device, net, images, train_loader, test_loader, gen)


def _train(cfg: TrainConfig, ckpt: dict | None, progress: bool) -> dict:
    """The run itself, from `ckpt` (None: from scratch), in a folder `open_run` has opened."""
    run = set_up_run(cfg, use_device(pick_device(cfg.device)), ckpt)
    cfg, net = run.cfg, run.net
    optimizer = make_optimizer(net, cfg)
    if ckpt is not None:
        with checkpoint_fits(cfg):
            optimizer.load_state_dict(ckpt["optimizer"])
    start_epoch, best, memory, log = run.open_folder(ckpt)
    if cfg.torch_compile:  # after the memory measurement, which runs eagerly on a copy
        compile_model(net)

    (Path(cfg.out_dir) / "error.json").unlink(missing_ok=True)  # this attempt replaces an earlier failed one
    epochs = tqdm(range(start_epoch, cfg.epochs), desc=Path(cfg.out_dir).name, disable=not progress,
                  initial=start_epoch, total=cfg.epochs)
    for epoch in epochs:
        lr = learning_rate(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        t0 = time.perf_counter()
        seen, wrong, loss_sum = train_epoch(net, run.train_loader, optimizer, cfg, epoch, lr, progress=progress)
        train_time = time.perf_counter() - t0
        test_error = evaluate(net, run.test_loader, cfg.channels_last, cfg.bf16)
        row = metrics_row(epoch, lr, train_error=train_error(wrong, seen), test_error=test_error,
                          local_losses=mean_losses(loss_sum, seen), seconds=train_time, seen=seen)
        best = end_epoch(cfg, row, (net.state_dict(), optimizer.state_dict()), run.gen, best, memory, log=log)
        epochs.set_postfix(test_error=f"{test_error:.2f}%")

    return finish_run(cfg, net, best, memory, run.device, log=log)
