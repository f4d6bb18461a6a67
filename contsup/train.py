"""Training: the local-learning step, the paper's schedule, checkpoint/resume, metrics.

One run = one `TrainConfig`. Its folder holds `config.json`, `metrics.jsonl` (one line per
epoch), `ckpt.pt` (everything resume needs, written atomically every epoch) and, once
finished, `result.json`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import tables
from .data import DeviceLoader, denormalize, load_dataset
from .errors import UsageError
from .losses import head_loss, reconstruction_loss
from .memory import cuda_peak_bytes, peak_activation_bytes, reuse_freed_cpu_memory
from .model import ContSupNet, ModelConfig, set_context_impl


@dataclass
class TrainConfig:
    # model (see ModelConfig)
    dataset: str = "digits"
    arch: str = "resnet32"
    k: int = 4
    mode: str = "R1E"
    loss: str = "softmax"
    head: str = "1c2f"
    reconstruct: bool = False
    loss_scales: tuple | None = None
    balanced: bool = False
    widen: float = 1.0
    context_impl: str = "lean"      # lean | fused | plain: the same function (ModelConfig)
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
        recipe = tables.check_dataset(self.dataset)
        self.batch_size = recipe.batch_size if self.batch_size is None else self.batch_size
        self.lr = recipe.lr if self.lr is None else self.lr
        for name in ("epochs", "batch_size", "k"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.warmup_epochs < 0 or (self.train_subset is not None and self.train_subset < 1):
            raise UsageError("--warmup-epochs must be >= 0 and --train-subset >= 1")
        if self.loss_scales is not None:
            self.loss_scales = tuple(float(v) for v in self.loss_scales)
            if len(self.loss_scales) != 4:
                raise UsageError("--loss-scales takes four numbers: ixx_1,ixy_1,ixx_2,ixy_2")

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if "lean_context" in d:  # the key before context_impl (run folders written before it)
            d = {"context_impl": "lean" if d["lean_context"] else "fused"} | d
            del d["lean_context"]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(known))}")
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
        raise UsageError(f"unknown device '{name}'; choose auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return device


def learning_rate(epoch: int, base_lr: float, epochs: int, warmup_epochs: int = 10,
                  warmup_from: float = tables.PAPER_SCHEDULE.warmup_from) -> float:
    """lr_e = lr*(1+cos(pi*e/E))/2, reached by a linear warm-up from `warmup_from` over the
    first `warmup_epochs` epochs (SPEC §5). Set once per epoch."""
    cosine = lambda e: 0.5 * base_lr * (1 + math.cos(math.pi * e / epochs))  # noqa: E731
    if epoch < warmup_epochs:
        return warmup_from + (cosine(warmup_epochs) - warmup_from) * epoch / warmup_epochs
    return cosine(epoch)


def make_optimizer(net, cfg: TrainConfig):
    """The paper's SGD over `net`'s parameters (or over `net`, a list of parameters: a pipeline
    stage's own)."""
    s = tables.PAPER_SCHEDULE
    params = net.parameters() if isinstance(net, torch.nn.Module) else net
    return torch.optim.SGD(params, lr=cfg.lr, momentum=s.momentum, nesterov=True,
                           weight_decay=s.weight_decay)


def autocast(x, bf16: bool):
    """bfloat16 autocast on x's device when `bf16`, else a no-op context."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)


def prepare_model(net: ContSupNet, cfg: TrainConfig, device) -> ContSupNet:
    """Move `net` to the device in the memory format `cfg` asks for."""
    net = net.to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    return net


def compile_model(net: ContSupNet) -> ContSupNet:
    """torch.compile every part in place (state_dict keys stay the same). The encoders then
    run their plain autograd version: inductor fuses BN/ReLU/pool by itself."""
    set_context_impl(net, "plain")
    for part in [*net.blocks, *net.heads, net.classifier, *net.context, *net.decoders]:
        part.compile()
    return net


def to_format(x, channels_last: bool):
    """The input batch in the model's memory format."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --------------------------------------------------------------------------------------
def module_step(net: ContSupNet, k: int, h_in, x, y, image=None, bf16: bool = False):
    """Module k alone: forward, its local loss, backward (the gradient reaches module k and
    the context encoders that made `h_in`, nothing earlier). Returns the module's output (the
    class logits for the last module) and its loss, detached (0 where the loss is empty)."""
    with autocast(x, bf16):
        h = net.blocks[k](h_in)                                       # [B, C_k, H_k, W_k]
        if k == net.k - 1:
            h = net.classifier(h)                                     # [B, classes]
            loss = F.cross_entropy(h, y)
        else:
            a, b = net.loss_weights[k]
            loss = b * head_loss(net.heads[k](h), y, net.cfg.loss) if b else 0.0
            if a:
                loss = loss + a * reconstruction_loss(net.decoders[k](h), image)
    if not torch.is_tensor(loss):
        return h, torch.zeros((), device=x.device)
    loss.backward()  # frees module k's graph before module k+1 starts
    return h, loss.detach()


def local_learning_step(net: ContSupNet, x, y, image=None, bf16: bool = False):
    """Forward and backward through the K modules, one at a time (SPEC §1-§2).

    For module k: forward, its own local loss, backward (`module_step`), then the detached
    output plus context becomes the next input. K=1 is end-to-end. `image` ([B,3,S,S] in
    [0,1]) is the reconstruction target. Returns the final logits (detached) and the K losses.
    Gradients accumulate into .grad; the caller zeroes and steps the optimizer.
    `bf16` runs the forward passes under bfloat16 autocast.
    """
    module_inputs, h_in, losses = [], x, []
    for k in range(net.k):
        module_inputs.append(h_in.detach())
        h, loss = module_step(net, k, h_in, x, y, image, bf16)
        losses.append(loss)
        if k < net.k - 1:
            with autocast(x, bf16):
                h_in = net.supply(k, h, x, module_inputs)             # h.detach() + context
            h = None  # module k's output is not needed any more (frees it where h_in is a new tensor)
    return h.detach(), torch.stack(losses)


def measure_step_memory(net: ContSupNet, x, y, image=None, bf16: bool = False) -> dict:
    """Peak activation bytes of one training step (device-independent; see memory.py),
    plus torch.cuda.max_memory_allocated on CUDA. Runs on a copy: the model is untouched."""
    net = copy.deepcopy(net).train()
    step = lambda: local_learning_step(net, x, y, image, bf16)  # noqa: E731
    peak = peak_activation_bytes(step, exclude=[net], inputs=[x, y] + ([image] if image is not None else []))
    net.zero_grad(set_to_none=True)
    return {"peak_activation_bytes": peak, "cuda_peak_bytes": cuda_peak_bytes(step, x.device)}


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


# --------------------------------------------------------------------------------------
def _atomic_save(obj, path: Path, as_json: bool = False):
    tmp = path.with_name(path.name + ".tmp")
    if as_json:
        tmp.write_text(json.dumps(obj, indent=2))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: name it and the way out
        raise UsageError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                         f"move it away to start the run over") from None


# Where a run lives and how fast it runs may change between its start and its resume;
# nothing else may (bf16 changes the rounding, so it stays). lean_context: context_impl's
# earlier name.
MAY_CHANGE_ON_RESUME = {"out_dir", "device", "data_root", "download", "channels_last", "cudnn_benchmark",
                        "torch_compile", "reuse_cpu_memory", "context_impl", "lean_context"}


def _config_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as they come back from disk


def open_run(cfg: TrainConfig, resume: bool) -> tuple[dict | None, dict | None]:
    """(checkpoint, result) found in the run folder: (None, None) for a new run, the result of
    a finished one, or the checkpoint to resume (refused without `resume`, or when written by
    a different config)."""
    out = Path(cfg.out_dir)
    ckpt_path, result_path = out / "ckpt.pt", out / "result.json"
    if not (ckpt_path.exists() or result_path.exists()):
        return None, None
    if not resume:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if result_path.exists():
        return None, json.loads(result_path.read_text())
    ckpt = load_checkpoint(ckpt_path)
    now = _config_json(cfg)
    then = _config_json(TrainConfig(dataset=cfg.dataset)) | ckpt["config"]  # keys added since: defaults
    diff = sorted(k for k in set(now) | set(then)
                  if k not in MAY_CHANGE_ON_RESUME and then.get(k) != now.get(k))
    if diff:
        raise UsageError(f"{ckpt_path} was written by a different config (differs in {diff}); "
                         f"use another --out or the same settings")
    return ckpt, None


def prepare_run_folder(cfg: TrainConfig, ckpt: dict | None, measure_memory) -> tuple[int, tuple, dict]:
    """(first epoch, (best error, its epoch), memory) of the run. Resuming: from the checkpoint,
    dropping metric lines of an epoch that finished after it. New: config.json, an empty
    metrics.jsonl and `measure_memory()`."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        start_epoch = ckpt["epoch"] + 1
        if metrics_path.exists():
            lines = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["epoch"] < start_epoch]
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
    the run folder's checkpoint; without, refuse to touch a folder that already holds a run."""
    out = Path(cfg.out_dir)
    ckpt_path, metrics_path = out / "ckpt.pt", out / "metrics.jsonl"
    ckpt, result = open_run(cfg, resume)
    if result is not None:
        return result

    device = pick_device(cfg.device)
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
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
    start_epoch, best, memory = prepare_run_folder(cfg, ckpt, lambda: first_step_memory(net, data, cfg, device))
    if cfg.torch_compile:  # after the memory measurement, which runs eagerly on a copy
        compile_model(net)

    epochs = tqdm(range(start_epoch, cfg.epochs), desc=Path(cfg.out_dir).name, disable=not progress,
                  initial=start_epoch, total=cfg.epochs)
    for epoch in epochs:
        lr = learning_rate(epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        t0, seen, wrong, loss_sum = time.perf_counter(), 0, 0, 0.0
        for x, y in train_loader:
            image = denormalize(x, recipe) if cfg.reconstruct else None
            logits, losses = local_learning_step(net, to_format(x, cfg.channels_last), y, image, cfg.bf16)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(y)
            wrong += (logits.argmax(1) != y).sum()
            loss_sum = loss_sum + losses * len(y)
        train_time = time.perf_counter() - t0
        test_error = evaluate(net, test_loader, cfg.channels_last, cfg.bf16)
        if test_error < best[0]:
            best = (test_error, epoch)
        row = metrics_row(epoch, lr, 100.0 * float(wrong) / seen, test_error, (loss_sum / seen).tolist(),
                          train_time, seen)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        _atomic_save(checkpoint(net.state_dict(), optimizer.state_dict(), epoch, cfg, gen, best, memory), ckpt_path)
        epochs.set_postfix(test_error=f"{test_error:.2f}%")

    return finish_run(cfg, net, best, memory, device)
