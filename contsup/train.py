"""Training: the local-learning step, the paper's schedule, checkpoint/resume, metrics.

One run = one `TrainConfig`. Its folder holds `config.json`, `metrics.jsonl` (one line per
epoch), `ckpt.pt` (everything resume needs, written atomically every epoch) and, once
finished, `result.json`; a run stopped by a non-finite loss leaves `error.json` instead.
All JSON is strict (jsonio): no NaN/Infinity literals.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import time
import types
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import jsonio, tables
from .data import DeviceLoader, denormalize, load_dataset
from .errors import DivergedError, UsageError, check_bool, check_float, check_int, check_str, check_writable_folder
from .model import ContSupNet, ModelConfig, check_model_fields
from .speed.encoders import AUTO, CONTEXT_IMPLS, resolve_context_impl, set_context_impl
from .speed.memory import measure_step_memory, reuse_freed_cpu_memory
from .step import autocast, local_learning_step


@dataclass
class TrainConfig(ModelConfig):
    """One run: the model's fields (`ModelConfig`: arch, k, mode, loss, head, reconstruct,
    loss_scales, balanced, dataset, widen), then how it is trained."""
    dataset: str = "digits"         # the embedded data, so a config trains offline (the model's default: CIFAR-10)
    context_impl: str = "auto"      # auto | lean | fused | plain: the same function (speed/encoders.py);
                                    # auto: resolve_context_impl's choice for the device, recorded in config.json
    # speed: none of these changes the function computed, except bf16's rounding
    channels_last: bool = True      # NHWC activations: faster convolutions on CPU and GPU alike
    bf16: bool = False              # bfloat16 autocast for the forward passes (weights stay fp32)
    cudnn_benchmark: bool = True    # let cuDNN time and pick its fastest algorithms (CUDA only)
    torch_compile: bool = False     # torch.compile every module, head, encoder and decoder
    reuse_cpu_memory: bool = True   # CPU: keep glibc from unmapping freed activations (memory.reuse_freed_cpu_memory)
    # optimisation; None = the paper's value for the dataset (tables.DATA_RECIPES)
    epochs: int = 160
    batch_size: int | None = None
    lr: float | None = None
    warmup_epochs: int = tables.PAPER_SCHEDULE.warmup_epochs
    # data and bookkeeping
    data_root: str = "data"
    download: bool = False
    train_subset: int | None = None
    out_dir: str = "runs/default"
    device: str = "auto"
    seed: int = 0

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
        for name in ("data_root", "out_dir", "device"):
            setattr(self, name, check_str(name, getattr(self, name)))
        for name in ("download", "channels_last", "bf16", "cudnn_benchmark", "torch_compile", "reuse_cpu_memory"):
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

    SPEC §5's lr_e = lr*(1+cos(pi*e/E))/2 counts epochs from 1: the authors call their
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


def resolved_for(cfg: TrainConfig, device) -> TrainConfig:
    """`cfg` with context_impl "auto" replaced by the implementation that runs on `device`
    (speed/encoders.resolve_context_impl), so that config.json, the checkpoint and result.json
    name it. context_impl may change on resume (MAY_CHANGE_ON_RESUME)."""
    return replace(cfg, context_impl=resolve_context_impl(cfg.context_impl, device, cfg.torch_compile))


def prepare_model(net: ContSupNet, cfg: TrainConfig, device) -> ContSupNet:
    """Move `net` to the device in the memory format `cfg` asks for, with the context
    encoders run the way `cfg.context_impl` says (the same function each way)."""
    net = set_context_impl(net.to(device), resolve_context_impl(cfg.context_impl, device, cfg.torch_compile))
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
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


# --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(net: ContSupNet, loader, channels_last: bool = False, bf16: bool = False) -> float:
    """Test error in %, BN in eval mode, context included."""
    net.eval()
    wrong = total = 0
    for x, y in loader:
        x = to_format(x, channels_last)
        with autocast(x, bf16):
            logits = net(x)
        wrong += (logits.argmax(1) != y).sum().item()
        total += len(y)
    return 100.0 * wrong / total


def _module_name(module: int, k: int) -> str:
    return f"the final classifier (module {module} of {k})" if module == k else f"local module {module} of {k}"


def stop_diverged(out: Path, losses, epoch: int, step: int, lr: float, k: int, first: int = 1):
    """Write `error.json` for a step whose loss is not finite and raise DivergedError.
    Called before optimizer.step(): the weights, the checkpoint and metrics.jsonl stay as
    the last good epoch left them. `losses` are those of modules first, first+1, ... (from 1)."""
    values = [float(v) for v in losses.float().cpu()]
    index = next(i for i, v in enumerate(values) if not math.isfinite(v))  # the first: later ones follow it
    module = first + index
    message = (f"the loss of {_module_name(module, k)} is {values[index]} at epoch {epoch}, step {step} "
               f"(lr {lr:.3g}); stopped before applying it. Lower --lr or warm up (--warmup-epochs)"
               + (" in a new --out" if (out / "ckpt.pt").exists() else ""))  # a checkpoint holds the config
    error = DivergedError(message, epoch, step, module, jsonio.finite_or_none(values))
    _atomic_save(error.as_dict() | {"lr": lr, "module_name": _module_name(module, k)}, out / "error.json",
                 as_json=True)
    raise error


# --------------------------------------------------------------------------------------
def _atomic_save(obj, path: Path, as_json: bool = False):
    tmp = path.with_name(path.name + ".tmp")
    if as_json:
        tmp.write_text(jsonio.dumps(obj, indent=2))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "config", "data_rng", "torch_rng", "best", "memory")


def load_checkpoint(path: Path, keys=("model", "config")) -> dict:
    """The checkpoint, which must hold `keys` (resuming needs all of CHECKPOINT_KEYS)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        error = None if isinstance(ckpt, dict) and all(k in ckpt for k in keys) \
            and isinstance(ckpt["config"], dict) else "not a checkpoint of this trainer"
    except Exception as e:  # any unreadable file: name it and the way out
        error = type(e).__name__
    if error:
        raise UsageError(f"checkpoint {path} is unreadable ({error}); move it away to start the run over")
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
        raise UsageError(f"{path} is unreadable ({error}); move it (or its whole run folder) away, "
                         f"or use another --out")
    return value


# Where a run lives and how fast it runs may change between its start and its resume;
# nothing else may (bf16 changes the rounding, so it stays).
MAY_CHANGE_ON_RESUME = {"out_dir", "device", "data_root", "download", "channels_last", "cudnn_benchmark",
                        "torch_compile", "reuse_cpu_memory", "context_impl"}


def _config_json(cfg: TrainConfig) -> dict:
    return json.loads(jsonio.dumps(asdict(cfg)))  # tuples -> lists, as they come back from disk


def _epoch_of(line: str) -> float:
    """The epoch of a metrics line; a line cut short by a kill while it was written counts as
    after the checkpoint (it is written before the checkpoint of its epoch), so it is dropped."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def config_diff(cfg: TrainConfig, stored: dict) -> list[str]:
    """The config keys in which a stored run config differs from `cfg`, apart from where and
    how fast it runs (MAY_CHANGE_ON_RESUME); a key newer than the stored run counts with its
    default."""
    now = _config_json(cfg)
    then = _config_json(TrainConfig(dataset=cfg.dataset)) | stored
    return sorted(k for k in set(now) | set(then) if k not in MAY_CHANGE_ON_RESUME and then.get(k) != now.get(k))


def check_same_config(cfg: TrainConfig, stored: dict, path: Path) -> None:
    """Refuse to continue (or to report) a run that `path` says was another config."""
    if not isinstance(stored, dict):
        raise UsageError(f"{path} holds no config; move the run folder {path.parent} away or use another --out")
    diff = config_diff(cfg, stored)
    if diff:
        raise UsageError(f"{path} was written by a different config (differs in {diff}); "
                         f"use another --out or the same settings")


def open_run(cfg: TrainConfig, resume: bool) -> tuple[dict | None, dict | None]:
    """What `train` checks before it touches a file: the model's combinations (cut tables,
    mode vs K), the device, --out, and what the run folder holds. Returns (checkpoint,
    result): the checkpoint of an unfinished run to resume, the result of a finished run
    of this very config, or (None, None) for a fresh start. Refuses a folder that holds a
    run without `resume`, and a run (finished or not) of other settings."""
    cfg.model_config()
    pick_device(cfg.device)
    out = Path(cfg.out_dir)
    check_writable_folder(out, "--out")
    ckpt_path, result_path, config_path = out / "ckpt.pt", out / "result.json", out / "config.json"
    if ckpt_path.exists() or result_path.exists():
        if not resume:
            raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        ckpt = result = None
        if result_path.exists():
            result = read_run_json(result_path)
            if "config" in result:  # (result files of the first versions have none)
                check_same_config(cfg, result["config"], result_path)
        else:
            ckpt = load_checkpoint(ckpt_path, CHECKPOINT_KEYS)
            check_same_config(cfg, ckpt["config"], ckpt_path)
        if config_path.exists():
            check_same_config(cfg, read_run_json(config_path), config_path)
        return ckpt, result
    if config_path.exists() or (out / "metrics.jsonl").exists():  # started, killed before its first checkpoint
        if not resume:
            raise UsageError(f"{out} holds a run that stopped before its first checkpoint; pass --resume to "
                             f"start it over or choose another --out")
        if config_path.exists():  # starting over rewrites it: only if it is this run's own
            check_same_config(cfg, read_run_json(config_path), config_path)
    return None, None


def prepare_run_folder(cfg: TrainConfig, ckpt: dict | None, measure_memory) -> tuple[int, tuple, dict]:
    """(first epoch, (best error, its epoch), memory) of the run. Resuming: from the checkpoint,
    dropping metric lines of an epoch that finished after it (or was cut short by a kill).
    New: config.json, an empty metrics.jsonl and `measure_memory()`."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        start_epoch = ckpt["epoch"] + 1
        if metrics_path.exists():
            lines = [l for l in metrics_path.read_text().splitlines() if _epoch_of(l) < start_epoch]
            metrics_path.write_text("".join(l + "\n" for l in lines))
        return start_epoch, tuple(ckpt["best"]), ckpt["memory"]
    _atomic_save(_config_json(cfg), out / "config.json", as_json=True)
    metrics_path.write_text("")
    return 0, (math.inf, -1), measure_memory()


def first_step_memory(net: ContSupNet, data, cfg: TrainConfig, device) -> dict:
    """measure_step_memory on the first (unshuffled) training batch."""
    recipe = tables.DATA_RECIPES[cfg.dataset]
    x, y = next(iter(DeviceLoader(data.train_x, data.train_y, recipe, cfg.batch_size, False, device)))
    image = denormalize(x, recipe) if cfg.reconstruct else None
    return measure_step_memory(net, to_format(x, cfg.channels_last), y, image, cfg.bf16)


def checkpoint(model_state: dict, optimizer_state: dict, epoch: int, cfg: TrainConfig, data_rng, best,
               memory: dict) -> dict:
    """ckpt.pt: everything resume needs, after `epoch`."""
    return {"model": model_state, "optimizer": optimizer_state, "epoch": epoch, "config": _config_json(cfg),
            "data_rng": data_rng.get_state(), "torch_rng": torch.get_rng_state(), "best": list(best),
            "memory": memory}


def metrics_row(epoch: int, lr: float, train_error: float, test_error: float, local_losses: list,
                seconds: float, seen: int) -> dict:
    """One line of metrics.jsonl."""
    return {"epoch": epoch, "lr": lr, "train_error": train_error, "test_error": test_error,
            "local_losses": local_losses, "epoch_seconds": seconds, "images_per_s": seen / seconds}


def append_metrics(cfg: TrainConfig, row: dict) -> None:
    with (Path(cfg.out_dir) / "metrics.jsonl").open("a") as f:
        f.write(jsonio.dumps(row) + "\n")


def finish_run(cfg: TrainConfig, net: ContSupNet, best: tuple, memory: dict, device, **extra) -> dict:
    """Write result.json from the run's metrics and return it."""
    out = Path(cfg.out_dir)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"final_error": rows[-1]["test_error"], "best_error": best[0], "best_epoch": best[1],
              "epochs": cfg.epochs, **memory, "params": net.parts(), "cuts": net.cuts,
              "train_seconds": sum(r["epoch_seconds"] for r in rows), "device": str(device),
              "config": _config_json(cfg), **extra}
    _atomic_save(result, out / "result.json", as_json=True)
    return json.loads((out / "result.json").read_text())  # the same types as a skipped rerun returns


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train one configuration; returns (and writes) its result. With `resume`, continue from
    the run folder's checkpoint (or return the result of a finished run of the same config);
    without, refuse to touch a folder that already holds a run (see `open_run`)."""
    ckpt, result = open_run(cfg, resume)
    if result is not None:
        return result
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt.pt"

    device = pick_device(cfg.device)
    cfg = resolved_for(cfg, device)
    if device.type == "cpu" and cfg.reuse_cpu_memory:
        reuse_freed_cpu_memory()   # process-wide, for the rest of the process
    torch.manual_seed(cfg.seed)
    net = prepare_model(ContSupNet(cfg.model_config()), cfg, device)  # validates the model choices first
    recipe = tables.DATA_RECIPES[cfg.dataset]
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.train_subset)
    gen = torch.Generator().manual_seed(cfg.seed)   # data order and augmentation
    train_loader = DeviceLoader(data.train_x, data.train_y, recipe, cfg.batch_size, True, device, gen)
    test_loader = DeviceLoader(data.test_x, data.test_y, recipe, max(cfg.batch_size, 256), False, device)
    optimizer = make_optimizer(net, cfg)

    if ckpt is not None:
        try:  # a checkpoint of this config whose tensors do not fit (damaged, or from other code)
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            gen.set_state(ckpt["data_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise UsageError(f"checkpoint {ckpt_path} does not fit this network ({type(e).__name__}); "
                             f"move it away to start the run over") from None
    start_epoch, best, memory = prepare_run_folder(cfg, ckpt, lambda: first_step_memory(net, data, cfg, device))
    if cfg.torch_compile:  # after the memory measurement, which runs eagerly on a copy
        compile_model(net)

    (out / "error.json").unlink(missing_ok=True)  # this attempt replaces an earlier failed one
    epochs = tqdm(range(start_epoch, cfg.epochs), desc=Path(cfg.out_dir).name, disable=not progress,
                  initial=start_epoch, total=cfg.epochs)
    for epoch in epochs:
        lr = learning_rate(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        t0, seen, wrong, loss_sum = time.perf_counter(), 0, 0, 0.0
        shown = t0  # when the step bar's running losses were last shown
        with tqdm(train_loader, desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress) as steps:
            for step, (x, y) in enumerate(steps):
                image = denormalize(x, recipe) if cfg.reconstruct else None
                logits, losses = local_learning_step(net, to_format(x, cfg.channels_last), y, image, cfg.bf16)
                # A non-finite loss has non-finite gradients: stop before they reach the weights.
                # The one device sync per step; which module it was is found only on failure.
                if not torch.isfinite(losses).all():
                    stop_diverged(out, losses, epoch, step, lr, net.k)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seen += len(y)
                wrong += (logits.argmax(1) != y).sum()
                loss_sum = loss_sum + losses * len(y)
                if progress and time.perf_counter() - shown > 0.5:  # reading the losses syncs: not every step
                    steps.set_postfix(loss=" ".join(f"{v:.3f}" for v in (loss_sum / seen).tolist()), refresh=False)
                    shown = time.perf_counter()
        train_time = time.perf_counter() - t0
        test_error = evaluate(net, test_loader, cfg.channels_last, cfg.bf16)
        if test_error < best[0]:
            best = (test_error, epoch)
        append_metrics(cfg, metrics_row(epoch, lr, 100.0 * float(wrong) / seen, test_error,
                                        (loss_sum / seen).tolist(), train_time, seen))
        _atomic_save(checkpoint(net.state_dict(), optimizer.state_dict(), epoch, cfg, gen, best, memory), ckpt_path)
        epochs.set_postfix(test_error=f"{test_error:.2f}%")

    return finish_run(cfg, net, best, memory, device)
