"""Training: the local-learning step, the paper's schedule, checkpoint/resume, metrics.

One run = one `TrainConfig`. Its folder holds `config.json`, `metrics.jsonl` (one line per
epoch), `ckpt.pt` (everything resume needs, written atomically every epoch) and, once
finished, `result.json`; a run stopped by a non-finite loss leaves `error.json` instead.
All JSON is strict (jsonio): no NaN/Infinity literals.

One writer per run folder: `train` holds the folder's lock (runlock.run_lock, taken by
`open_run`) from before it reads the folder until result.json is written, and any exit
releases it; a second writer is refused in one line naming the holder. A finished run
resumed is only read: no lock, nothing written (a read-only folder will do). Every file is
written whole (jsonio.write_atomic, jsonio.append_line): a full disk, a file-size limit or
a signal leaves the previous checkpoint and no .tmp. Every file read back is checked field
by field (`check_fields`): a damaged or hand-edited one is named in one line with its field.
"""
from __future__ import annotations

import difflib
import io
import json
import math
import numbers
import os
import sys
import time
import types
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import jsonio, tables
from .data import DeviceLoader, ImageData, denormalize, load_dataset
from .errors import (DivergedError, UsageError, check_bool, check_float, check_int, check_str, check_writable_folder,
                     command_line, option)
from .model import ContSupNet, ModelConfig, check_model_fields
from .runlock import run_lock
from .speed.encoders import AUTO, CONTEXT_IMPLS, resolve_context_impl, set_context_impl
from .speed.memory import measure_step_memory, reuse_freed_cpu_memory
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


# --------------------------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xla...: not training devices
        raise UsageError(f"unknown device '{name}'; choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...); "
                         f"use --device cuda or auto")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise UsageError("--device mps asked for, but this PyTorch has no Apple GPU; use --device cpu or auto")
    return device


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


# cuBLAS's deterministic workspace setting (see use_deterministic).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def use_deterministic(on: bool) -> None:
    """Deterministic kernels, process-wide (the run's config decides, on or off):
    torch.use_deterministic_algorithms, cudnn.deterministic, and cudnn.benchmark off (its
    timing picks algorithms by the clock). On a CPU the trainer is bit for bit without it (at
    the same thread count and versions); on CUDA, atomics-based kernels (convolution
    backward algorithms, index/scatter sums) make two runs, or a run and its resume, differ
    in the last bits unless it is on.

    cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before its first call in the process: the
    CLI (`cli.cmd_train`) sets it before anything touches CUDA, and this function sets it
    too (unless already set), which is in time when the process has not yet run a matmul
    on the GPU (a fresh process or notebook kernel: `train` calls this before the model is
    built on the device). Ops that have no deterministic CUDA kernel then raise instead of
    running: `check_deterministic` refuses the configurations that reach them."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False


def check_deterministic(net: ContSupNet, cfg: TrainConfig, device) -> None:
    """With `deterministic` on CUDA, refuse what PyTorch can only run nondeterministically
    (it raises there under torch.use_deterministic_algorithms): the backward of bilinear
    upsampling (the --reconstruct decoders) and of adaptive average pooling to a side > 1
    (the plain context encoders: --context-impl plain, and --compile, which runs them; the
    lean and fused encoders pool with avg_pool2d, whose backward is deterministic, and a
    1x1 adaptive pool is a mean)."""
    if not (cfg.deterministic and device.type == "cuda"):
        return
    if cfg.reconstruct:
        raise UsageError("--deterministic on CUDA cannot train --reconstruct: PyTorch's bilinear upsampling "
                         "has no deterministic CUDA backward; drop one of the two")
    pools = [m for m in net.context.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)
             and m.output_size not in (1, (1, 1))]
    if pools and (cfg.context_impl == "plain" or cfg.torch_compile):
        raise UsageError("--deterministic on CUDA needs the lean or fused context encoders: the plain ones "
                         "(--context-impl plain, --compile) pool adaptively, which has no deterministic CUDA "
                         "backward; use --context-impl lean without --compile")


def resolved_for(cfg: TrainConfig, device) -> TrainConfig:
    """`cfg` with context_impl "auto" replaced by the implementation that runs on `device`
    (speed/encoders.resolve_context_impl), so that config.json, the checkpoint and result.json
    name it. context_impl may change on resume (MAY_CHANGE_ON_RESUME)."""
    return replace(cfg, context_impl=resolve_context_impl(cfg.context_impl, device, cfg.torch_compile,
                                                          cfg.deterministic))


def prepare_model(net: ContSupNet, cfg: TrainConfig, device) -> ContSupNet:
    """Move `net` to the device in the memory format `cfg` asks for, with the context
    encoders run the way `cfg.context_impl` says (the same function each way), and the
    kernels deterministic or not as `cfg.deterministic` says (checked first, see there)."""
    check_deterministic(net, cfg, device)
    use_deterministic(cfg.deterministic)   # before the model reaches the device
    net = set_context_impl(net.to(device), resolve_context_impl(cfg.context_impl, device, cfg.torch_compile,
                                                                 cfg.deterministic))
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
    return net


def _own_caller(part, i: int):
    """A function calling `part` (uncompiled) with a code object of its own."""
    def call(*args, **kwargs):
        return part._call_impl(*args, **kwargs)
    code = call.__code__.replace(co_name=f"call_part{i}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


def compile_model(net: ContSupNet, **options) -> ContSupNet:
    """torch.compile every part in place (state_dict keys stay the same); `options` go to
    torch.compile (e.g. backend="eager" in tests). The encoders then run their plain autograd
    version (speed/encoders.resolve_context_impl: inductor fuses BN/ReLU/pool by itself).

    Each part is compiled through a function with a code object of its own (`_own_caller`):
    dynamo keeps one cache of graphs per code object and caps it (recompile_limit, 8);
    `Module.compile` would put all the K modules, heads and context supplies in the one cache of
    its shared wrapper, overflow it beyond 8 parts (K=4 R1E has 11) and run the rest eagerly
    without a word. With a cache per part, a part recompiles only for what changes its own
    graph (eval mode, a last smaller batch)."""
    set_context_impl(net, "plain")
    for i, part in enumerate([*net.blocks, *net.heads, net.classifier, *net.context, *net.decoders]):
        part._compiled_call_impl = torch.compile(_own_caller(part, i), **options)
    return net


def to_format(x, channels_last: bool):
    """The input batch in the model's memory format."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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


def _module_name(module: int, k: int) -> str:
    return f"the final classifier (module {module} of {k})" if module == k else f"local module {module} of {k}"


def stop_diverged(out: Path, losses, epoch: int, step: int, lr: float, k: int, first: int = 1,
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
    _atomic_save(error.as_dict() | {"lr": lr, "module_name": _module_name(module, k)}, out / "error.json",
                 as_json=True)
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
        stop_diverged(out, self.first_bad, epoch, bad, lr, k, first, applied=bad != step)


def train_epoch(net: ContSupNet, loader: DeviceLoader, optimizer, cfg: TrainConfig, epoch: int, lr: float,
                progress: bool = False) -> tuple[int, torch.Tensor, torch.Tensor]:
    """One epoch of training steps at `lr`, as `train` runs it: batch -> local-learning step
    -> optimizer. Returns (images seen, wrong predictions, summed losses [K]), the last two
    on the device.

    Nothing in a step waits for the device: the loader's data and constants are on the
    device from the epoch's start (DeviceLoader), the divergence check stays there and is
    read every `cfg.check_every` steps and once after the last step (DivergenceWatch), and
    the step bar reads the running losses at most every half second. The read after the
    last step also makes the caller's clock honest: the device has finished the epoch when
    this returns.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    net.train()
    out, watch = Path(cfg.out_dir), DivergenceWatch(net.k, loader.device)
    seen, wrong, loss_sum = 0, 0, 0.0
    shown = time.perf_counter()  # when the step bar's running losses were last shown
    with tqdm(loader, desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress) as steps:
        for step, (x, y) in enumerate(steps):
            image = reconstruction_target(x, loader, cfg)
            logits, losses = local_learning_step(net, to_format(x, cfg.channels_last), y, image, cfg.bf16)
            watch.record(losses)
            if (step + 1) % cfg.check_every == 0:   # a non-finite loss is caught before it is applied
                watch.check(out, epoch, lr, net.k, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(y)
            wrong = wrong + (logits.argmax(1) != y).sum()
            loss_sum = loss_sum + losses * len(y)
            if progress and time.perf_counter() - shown > 0.5:  # reading the losses syncs: not every step
                steps.set_postfix(loss=" ".join(f"{v:.3f}" for v in (loss_sum / seen).tolist()), refresh=False)
                shown = time.perf_counter()
    watch.check(out, epoch, lr, net.k)
    return seen, wrong, loss_sum


# --------------------------------------------------------------------------------------
def _atomic_save(obj, path: Path, as_json: bool = False):
    """`obj` into `path` whole or not at all (jsonio.write_atomic). A checkpoint is serialised
    in memory first: a full disk then fails as the OSError of a plain write, not as torch's
    RuntimeError from inside its zip writer, and leaves no .tmp."""
    if as_json:
        jsonio.save(path, obj)
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    jsonio.write_atomic(path, buffer.getbuffer())


# What the files of a run folder must hold: field -> (test, what it must be).
_NUMBER = (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number")
_COUNT = (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
_DICT = (lambda v: isinstance(v, dict), "a dict")
_TENSOR = (torch.is_tensor, "a tensor")
_BEST = (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and _NUMBER[0](v[0])
         and isinstance(v[1], numbers.Integral) and not isinstance(v[1], bool), "[error, epoch]")
CHECKPOINT_FIELDS = {"model": _DICT, "optimizer": _DICT, "epoch": _COUNT, "config": _DICT, "data_rng": _TENSOR,
                     "torch_rng": _TENSOR, "best": _BEST, "memory": _DICT}
CHECKPOINT_KEYS = tuple(CHECKPOINT_FIELDS)
RESULT_FIELDS = {"final_error": _NUMBER, "best_error": _NUMBER, "best_epoch": _COUNT, "epochs": _COUNT,
                 "peak_activation_bytes": _NUMBER, "train_seconds": _NUMBER, "config": _DICT}
RESULT_OPTIONAL = {"paper_memory_bytes": _NUMBER}   # null or missing in results of older versions
METRICS_FIELDS = {"epoch": _COUNT, "test_error": _NUMBER, "epoch_seconds": _NUMBER}
MOVE_AWAY = "move it (or its whole run folder) away, or use another --out"


def check_fields(what: str, record, spec: dict, fix: str = MOVE_AWAY, optional: dict | None = None) -> None:
    """Refuse `record` (read from the file `what`) in one line naming the first field of
    `spec` it lacks or holds with the wrong type (of `optional`: holds, if not None)."""
    if not isinstance(record, dict):
        raise UsageError(f"{what} holds a {type(record).__name__}, not a dict of fields; {fix}")
    for name, (ok, kind) in [*spec.items(), *(optional or {}).items()]:
        required = name in spec
        if required and name not in record:
            raise UsageError(f"{what} has no '{name}' ({kind}); {fix}")
        if (required or record.get(name) is not None) and not ok(record[name]):
            value = repr(record[name]) if not isinstance(record[name], dict) else "a dict"
            raise UsageError(f"{what}: '{name}' is {value[:40]}, not {kind}; {fix}")


def load_checkpoint(path: Path, keys=("model", "config")) -> dict:
    """The checkpoint, which must hold `keys` with the right types (resuming needs all of
    CHECKPOINT_KEYS)."""
    fix = "move it away to start the run over"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: name it and the way out
        raise UsageError(f"checkpoint {path} is unreadable ({type(e).__name__}); {fix}") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in ("model", "config")):
        raise UsageError(f"checkpoint {path} is unreadable (not a checkpoint of this trainer); {fix}")
    check_fields(f"checkpoint {path}", ckpt, {k: CHECKPOINT_FIELDS[k] for k in keys}, fix)
    return ckpt


def read_run_json(path: Path) -> dict:
    """config.json or result.json of a run folder; a truncated or foreign file is a
    UsageError naming it (a run folder is never rewritten to 'repair' it)."""
    try:
        value = json.loads(path.read_text())
        error = None if isinstance(value, dict) else f"holds a {type(value).__name__}, not an object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        error = type(e).__name__
    if error:
        raise UsageError(f"{path} is unreadable ({error}); {MOVE_AWAY}")
    return value


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's (line, row) pairs. A last line cut short by a kill while it was written
    is dropped (its epoch has no checkpoint yet: resume trains it again); any other line that
    is not a row is named in one line."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is unreadable (UnicodeDecodeError); {MOVE_AWAY}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise UsageError(f"{path} line {n} is not JSON; {MOVE_AWAY}") from None
        check_fields(f"{path} line {n}", row, METRICS_FIELDS)
        rows.append((line, row))
    return rows


# Where a run lives and how fast it runs may change between its start and its resume;
# nothing else may (bf16 changes the rounding, so it stays). `deterministic` may: like
# cudnn_benchmark it picks among kernels computing the same function, and a run moved to
# another GPU model is not bit for bit anyway; a bit-exact resume needs it on in both parts.
# `check_every` only decides when a divergence is noticed.
MAY_CHANGE_ON_RESUME = {"out_dir", "device", "data_root", "download", "channels_last", "cudnn_benchmark",
                        "deterministic", "torch_compile", "reuse_cpu_memory", "context_impl", "check_every"}


def _config_json(cfg: TrainConfig) -> dict:
    return json.loads(jsonio.dumps(asdict(cfg)))  # tuples -> lists, as they come back from disk


def _defaults(dataset: str) -> dict:
    """The config of a run that sets nothing but its dataset (whose recipe fills batch size and lr)."""
    return _config_json(TrainConfig(dataset=dataset))


def config_diff(cfg: TrainConfig, stored: dict) -> list[str]:
    """The config keys in which a stored run config differs from `cfg`, apart from where and
    how fast it runs (MAY_CHANGE_ON_RESUME); a key newer than the stored run counts with its
    default."""
    now = _config_json(cfg)
    then = _defaults(cfg.dataset) | stored
    return sorted(k for k in set(now) | set(then) if k not in MAY_CHANGE_ON_RESUME and then.get(k) != now.get(k))


def run_name(cfg: TrainConfig) -> str:
    """The default run folder name: `<dataset>-<arch>-K<k>-<mode>-<loss>`, then every other
    field that differs from its default (the seed included), as `<field><value>`, in the
    config's order: two configs that may not share a folder (config_diff) never share a name.
    The fields that may change on resume (where and how fast it runs) are left out.
        digits8-resnet32-K4-R1E-softmax-epochs2-batch_size64-train_subset128-seed1"""
    now, default = _config_json(cfg), _defaults(cfg.dataset)
    parts = [cfg.dataset, cfg.arch, f"K{cfg.k}", cfg.mode, cfg.loss]
    for name, value in now.items():
        if name in {"dataset", "arch", "k", "mode", "loss"} | MAY_CHANGE_ON_RESUME or value == default.get(name):
            continue
        if isinstance(value, bool):
            parts.append(name if value else f"no_{name}")
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{name}{text}".replace("/", "_").replace(" ", ""))
    return "-".join(parts)


def check_same_config(cfg: TrainConfig, stored: dict, path: Path) -> None:
    """Refuse to continue (or to report) a run that `path` says was another config."""
    if not isinstance(stored, dict):
        raise UsageError(f"{path} holds no config; move the run folder {path.parent} away or use another --out")
    diff = config_diff(cfg, stored)
    if diff:
        raise UsageError(f"{path} was written by a different config (differs in {diff}); "
                         f"use another --out or the same settings")


def finished_result(cfg: TrainConfig, path: Path) -> dict:
    """The result.json of a finished run of `cfg`, checked field by field; reads, never writes."""
    result = read_run_json(path)
    check_fields(str(path), result, RESULT_FIELDS, optional=RESULT_OPTIONAL)
    check_same_config(cfg, result["config"], path)
    _check_folder_config(cfg, path.parent / "config.json")
    return result


def open_run(cfg: TrainConfig, resume: bool, lock: ExitStack) -> tuple[dict | None, dict | None]:
    """What `train` checks before it touches a file: the model's combinations (cut tables,
    mode vs K), the device, --out, and what the run folder holds. Returns (checkpoint,
    result): the checkpoint of an unfinished run to resume, the result of a finished run
    of this very config, or (None, None) for a fresh start. Refuses a folder that holds a
    run without `resume`, and a run (finished or not) of other settings.

    Unless it only reads (`resume` of a finished run: nothing is written, nothing locked, so
    a read-only folder will do), it first takes the run folder's lock into `lock`, the
    caller's ExitStack, which holds it until the caller closes the stack: after result.json
    is written, or on any exit. Another live writer: RunFolderBusy, one line naming it,
    nothing touched. Refused after taking the lock: the lock file (and a new --out folder)
    is removed again; the stamp in an existing `.lock` says who took it last."""
    cfg.model_config()
    pick_device(cfg.device)
    out = Path(cfg.out_dir)
    ckpt_path, result_path, config_path = out / "ckpt.pt", out / "result.json", out / "config.json"
    if resume and result_path.is_file():   # finished: written once, for good; read without the lock
        return None, finished_result(cfg, result_path)
    check_writable_folder(out, "--out")
    lock.enter_context(run_lock(out))      # from here on, no one else writes the folder
    if ckpt_path.exists() or result_path.exists():
        if not resume:
            _check_folder_config(cfg, config_path)
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        if result_path.exists():   # finished while we waited for the lock
            return None, finished_result(cfg, result_path)
        ckpt = load_checkpoint(ckpt_path, CHECKPOINT_KEYS)
        check_same_config(cfg, ckpt["config"], ckpt_path)
        if ckpt["epoch"] >= cfg.epochs:
            raise UsageError(f"checkpoint {ckpt_path}: 'epoch' is {ckpt['epoch']}, past the run's last epoch "
                             f"{cfg.epochs - 1}; move it away to start the run over")
        _check_folder_config(cfg, config_path)
        return ckpt, None
    if config_path.exists() or (out / "metrics.jsonl").exists():  # started, killed before its first checkpoint
        if not resume:
            _check_folder_config(cfg, config_path)
            raise UsageError(f"{out} holds a run that stopped before its first checkpoint; pass --resume to "
                             f"start it over or choose another --out")
        _check_folder_config(cfg, config_path)   # starting over rewrites it: only if it is this run's own
    return None, None


def _check_folder_config(cfg: TrainConfig, config_path: Path) -> None:
    """Refuse a run folder whose config.json (where there is one) is of another config: to
    resume, to report, or to start over in it (and without --resume, say that --resume
    would not help)."""
    if config_path.exists():
        check_same_config(cfg, read_run_json(config_path), config_path)


RUN_FILES = ("config.json", "metrics.jsonl", "ckpt.pt", "result.json", "error.json")


def prepare_run_folder(cfg: TrainConfig, ckpt: dict | None, measure_memory) -> tuple[int, tuple, dict]:
    """(first epoch, (best error, its epoch), memory) of the run. Resuming: from the checkpoint,
    dropping metric lines of an epoch that finished after it (or was cut short by a kill).
    New: config.json, an empty metrics.jsonl and `measure_memory()`. Called with the run
    folder's lock held: a .tmp left by a writer killed mid-write (SIGKILL) is removed."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        for tmp in out.glob(f"{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        start_epoch = ckpt["epoch"] + 1
        if metrics_path.exists():
            lines = [line for line, row in read_metrics(metrics_path) if row["epoch"] < start_epoch]
            jsonio.write_atomic(metrics_path, "".join(line + "\n" for line in lines))
        return start_epoch, tuple(ckpt["best"]), ckpt["memory"]
    _atomic_save(_config_json(cfg), out / "config.json", as_json=True)
    jsonio.write_atomic(metrics_path, "")
    return 0, (math.inf, -1), measure_memory()


def first_step_memory(run: "RunSetup") -> dict:
    """measure_step_memory on the first (unshuffled) training batch. It runs with
    torch.use_deterministic_algorithms off (restored after): it measures on copies, and its
    reference step runs the plain encoders, whose adaptive pool has no deterministic CUDA
    backward (check_deterministic)."""
    x, y, image = run.first_batch()
    strict, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        return measure_step_memory(run.net, x, y, image, run.cfg.bf16)
    finally:
        torch.use_deterministic_algorithms(strict, warn_only=warn_only)


def checkpoint(model_state: dict, optimizer_state: dict, epoch: int, cfg: TrainConfig, data_rng, best,
               memory: dict) -> dict:
    """ckpt.pt: everything resume needs, after `epoch`."""
    return {"model": model_state, "optimizer": optimizer_state, "epoch": epoch, "config": _config_json(cfg),
            "data_rng": data_rng.get_state(), "torch_rng": torch.get_rng_state(), "best": list(best),
            "memory": memory}


def save_checkpoint(cfg: TrainConfig, model_state: dict, optimizer_state: dict, epoch: int, data_rng, best,
                    memory: dict) -> None:
    """Write the run's ckpt.pt (`checkpoint`), whole or not at all (_atomic_save)."""
    _atomic_save(checkpoint(model_state, optimizer_state, epoch, cfg, data_rng, best, memory),
                 Path(cfg.out_dir) / "ckpt.pt")


@contextmanager
def checkpoint_fits(cfg: TrainConfig):
    """Around loading a checkpoint's states: one whose tensors do not fit (damaged, or from
    other code) is a UsageError naming it."""
    try:
        yield
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {Path(cfg.out_dir) / 'ckpt.pt'} does not fit this network "
                         f"({type(e).__name__}); move it away to start the run over") from None


def metrics_row(epoch: int, lr: float, train_error: float, test_error: float, local_losses: list,
                seconds: float, seen: int) -> dict:
    """One line of metrics.jsonl."""
    return {"epoch": epoch, "lr": lr, "train_error": train_error, "test_error": test_error,
            "local_losses": local_losses, "epoch_seconds": seconds, "images_per_s": seen / seconds}


def append_metrics(cfg: TrainConfig, row: dict) -> None:
    """One line more in metrics.jsonl: the whole line or nothing (jsonio.append_line)."""
    jsonio.append_line(Path(cfg.out_dir) / "metrics.jsonl", row)


def finish_run(cfg: TrainConfig, net: ContSupNet, best: tuple, memory: dict, device, **extra) -> dict:
    """Write result.json from the run's metrics and return it."""
    out = Path(cfg.out_dir)
    rows = [row for _, row in read_metrics(out / "metrics.jsonl")]
    result = {"final_error": rows[-1]["test_error"], "best_error": best[0], "best_epoch": best[1],
              "epochs": cfg.epochs, **memory, "params": net.parts(), "cuts": net.cuts,
              "train_seconds": sum(r["epoch_seconds"] for r in rows), "device": str(device),
              "config": _config_json(cfg), **extra}
    _atomic_save(result, out / "result.json", as_json=True)
    return json.loads((out / "result.json").read_text())  # the same types as a skipped rerun returns


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, note_fresh_start: bool = False) -> dict:
    """Train one configuration; returns (and writes) its result. With `resume`, continue from
    the run folder's checkpoint (or return the result of a finished run of the same config);
    without, refuse to touch a folder that already holds a run (see `open_run`). The run
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
    pipeline rank only its stage's (pipeline.Stage), each loading its part of the checkpoint."""
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
                              False, self.device)
        x, y = next(iter(loader))
        return to_format(x, self.cfg.channels_last), y, reconstruction_target(x, loader, self.cfg)

    def open_folder(self, ckpt: dict | None) -> tuple[int, tuple, dict]:
        """prepare_run_folder, measuring a new run's memory on its first batch."""
        return prepare_run_folder(self.cfg, ckpt, lambda: first_step_memory(self))


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
        train_loader = DeviceLoader(images.train_x, images.train_y, recipe, cfg.batch_size, True, device, gen)
        test_loader = DeviceLoader(images.test_x, images.test_y, recipe, max(cfg.batch_size, 256), False, device)
    if ckpt is not None:
        with checkpoint_fits(cfg):
            net.load_state_dict(ckpt["model"])
            if gen is not None:
                gen.set_state(ckpt["data_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
    return RunSetup(cfg, device, net, images, train_loader, test_loader, gen)


def _train(cfg: TrainConfig, ckpt: dict | None, progress: bool) -> dict:
    """The run itself, from `ckpt` (None: from scratch), in a folder `open_run` has opened."""
    run = set_up_run(cfg, pick_device(cfg.device), ckpt)
    cfg, net = run.cfg, run.net
    optimizer = make_optimizer(net, cfg)
    if ckpt is not None:
        with checkpoint_fits(cfg):
            optimizer.load_state_dict(ckpt["optimizer"])
    start_epoch, best, memory = run.open_folder(ckpt)
    if cfg.torch_compile:  # after the memory measurement, which runs eagerly on a copy
        compile_model(net)

    (Path(cfg.out_dir) / "error.json").unlink(missing_ok=True)  # this attempt replaces an earlier failed one
    epochs = tqdm(range(start_epoch, cfg.epochs), desc=Path(cfg.out_dir).name, disable=not progress,
                  initial=start_epoch, total=cfg.epochs)
    for epoch in epochs:
        lr = learning_rate(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        t0 = time.perf_counter()
        seen, wrong, loss_sum = train_epoch(net, run.train_loader, optimizer, cfg, epoch, lr, progress)
        train_time = time.perf_counter() - t0
        test_error = evaluate(net, run.test_loader, cfg.channels_last, cfg.bf16)
        if test_error < best[0]:
            best = (test_error, epoch)
        append_metrics(cfg, metrics_row(epoch, lr, 100.0 * float(wrong) / seen, test_error,
                                        (loss_sum / seen).tolist(), train_time, seen))
        save_checkpoint(cfg, net.state_dict(), optimizer.state_dict(), epoch, run.gen, best, memory)
        epochs.set_postfix(test_error=f"{test_error:.2f}%")

    return finish_run(cfg, net, best, memory, run.device)
