"""GPU-hours of a profile's runs, from FLOPs counted on the CPU.

    python -m contsup estimate [--profile paper|quick|smoke] [--only GROUP ...] [--utilisation U] [--json]
    python -m contsup estimate --profile paper --calibrate    # on a CUDA GPU: its measured rate

Method, top to bottom:

1. FLOPs of one training step (`count_step_flops`). Build the run's `ContSupNet` on the
   CPU and run one `step.local_learning_step` -- forward and backward through all K
   modules, every local head and context encoder, and the reconstruction decoders when the
   run has them -- under a FLOP counter (`_FlopTotal`: torch.utils.flop_counter's formulas
   and decompositions, op for op as `FlopCounterMode` applies them, without its per-module
   bookkeeping, which cost more than the tiny step; a test checks the totals equal). It counts
   what tensor cores do: convolutions and matrix products, forward and backward, 2 FLOPs
   per multiply-add. BatchNorm, ReLU, pooling, interpolation, the elementwise parts of the
   losses and the SGD update are memory-bound and not counted; the utilisation (step 5)
   pays for them. The input values do not matter, only the shapes. The network runs the
   run's context path (`lean` by default), so its recomputation is counted: one more
   forward of each encoder's last conv. (Where the pool keeps the resolution and a large
   batch is cut into slices, lean runs that conv once more, which step 2's tiny batch does
   not see: 2.4 % of a ResNet-32 K=16 R1E step at batch 256 is left out.)
2. From a tiny batch to the run's batch (`StepCost`). Convolutions and linear layers cost
   the same per image, so their FLOPs are linear in the batch. Two exceptions: the
   supervised contrastive loss, whose B x B similarity matrix z @ z.T costs O(B^2 D), and
   lean's 1x1 encoders, whose BN statistics cost a few small matrix products per step
   whatever the batch (W mu, W Sigma W^T). So the step is counted at B = 1 and 2, and where
   contrast heads exist also at B = 3, and f(B) = d + a*B + c*B^2 is solved through those
   points (c = 0 without contrast heads). tests/test_estimate.py checks both: f(8) as
   predicted for softmax heads, f(16) as predicted for contrast heads, and whole runs
   against FlopCounterMode counting every step at its own batch.
   One network per distinct model (`_cost`, cached): runs that differ in epochs, batch,
   seed or speed flags share its counts, so the paper's 99 runs cost 89 models x 2-3 tiny
   steps.
   At batch 1024 the quadratic term adds 1.3 % to a ResNet-32 K=16 contrast step (15
   heads), less elsewhere.
3. Evaluation (`eval_flops`). `train` runs the test set through the network after every
   epoch: one inference forward (`net.eval()`, `torch.no_grad()`), counted per image.
4. One run (`run_flops`): epochs x (training set + test set). The training set takes
   ceil(N/B) steps; the loader keeps the last, partial batch, and since FLOPs follow the
   batch size it is counted at its own size: (ceil(N/B) - 1) f(B) + f(N mod B). (Counting
   it as a full batch would add 0.3 % on CIFAR-10, 2.4 % on STL-10.) The two extra steps a
   run spends measuring its memory at the start are left out (< 0.03 % of 160 epochs).
5. GPU-hours = FLOPs / (peak x utilisation) / 3600 -- or, with `--calibrate`, FLOPs / the
   FLOP/s measured for the run's architecture on the GPU present (`calibrate_rates`) -- per
   run, summed per group and in total
   (`estimate`). A run two groups share appears in both groups' rows and once in the total
   (`experiments.expand_all` dedups by run name), so total <= sum of the group rows.

Assumptions (the constants below; `estimate()` and the CLI override each of them):

- Device: one NVIDIA H100 SXM. Its dense tensor-core peaks are TF32 494.7 TFLOP/s and
  BF16 989.4 TFLOP/s (the datasheet's 989 / 1979 are with 2:4 sparsity, which we don't use).
- Precision follows each run's flags. The trainer computes in fp32 by default, and PyTorch
  runs fp32 *convolutions* on cuDNN with TF32 tensor cores (`torch.backends.cudnn.allow_tf32`
  is True by default; only fp32 matmuls default to full fp32, and the linear layers here
  are a negligible share), so a default run is charged at the TF32 peak. A run with
  `bf16=True` (`train --bf16`: bfloat16 autocast of the forward passes) is charged at the
  BF16 peak. `precision="tf32"|"bf16"` forces one for all runs; `peak_tflops` sets the
  number directly. The FLOP count itself is the same under either precision.
- Utilisation 0.05 of that peak: an assumption, not a measurement (UTILISATION_BASIS; the
  output says so in one line). The CIFAR ResNets are 16-64 channels wide on 32x32 (down to
  8x8) maps: per convolution of a 16-channel stage the BN/ReLU passes over its activations
  move several times more bytes than the tensor cores need time for its FLOPs, the GEMMs
  are small, and a local-learning step adds many more small kernels (heads, encoders, K
  separate backward passes). The earlier 0.25 charged a 160-epoch ResNet-110 run a few
  minutes, which eager PyTorch does not reach on such networks. The hours scale as
  1/utilisation; `--calibrate` replaces the assumption with the rate measured on the GPU
  at hand (`calibrate_rates`: CALIBRATION's step per architecture, trainer defaults,
  synchronised CUDA-event timings after warm-up steps; one rate per architecture, so the
  other modes, K and STL-10's 96 px images are charged at that step's rate). Data loading
  is assumed hidden (the device-resident loader of data.py augments on the GPU).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from tqdm.auto import tqdm

from .. import tables
from ..data import random_batch
from ..errors import UsageError
from ..model import ContSupNet, ModelConfig
from ..step import local_learning_step
from ..speed.encoders import resolve_context_impl, set_context_impl
from ..speed.setup import pick_device, prepare_model
from ..train import TrainConfig, make_optimizer
from . import experiments

# --------------------------------------------------------------------------------------
# Assumptions (see the module docstring)
DEVICE = "NVIDIA H100 SXM"
PEAK_TFLOPS = {"tf32": 494.7, "bf16": 989.4}   # dense tensor-core peak per precision
UTILISATION = 0.05                             # fraction of the peak a run sustains: assumed, see below
UTILISATION_BASIS = ("an assumption, not a measurement: small-image ResNets (16-64 channels, 32x32 to 8x8 maps) in "
                     "eager PyTorch are bound by BN/ReLU/pooling passes over memory and by kernel launches, not by "
                     "tensor cores; `estimate --calibrate` on the GPU replaces it with a measured rate")
CALIBRATION = {"k": 4, "mode": "R1E", "loss": "softmax", "dataset": "cifar10"}  # the step --calibrate times
CALIBRATE_STEPS = (3, 10)                      # warm-up steps (untimed), timed steps
COUNT_BATCHES = (1, 2, 3)                      # the tiny batches f(B) = d + a*B + c*B^2 is fitted to


# --------------------------------------------------------------------------------------
# Counting one step on the CPU
class _FlopTotal(TorchDispatchMode):
    """The total of `FlopCounterMode`, without its per-module bookkeeping.

    Each aten op that reaches it is first offered its decomposition, else run and charged by
    torch's own formula (`flop_counter.flop_registry`, from the shapes): FlopCounterMode's
    rule, op for op. What it leaves out is the module tracker, which hooks every module's
    forward and backward to attribute FLOPs per submodule; the estimate wants the total only,
    and those hooks cost more than the tiny step itself. tests/test_estimate.py checks the
    two totals equal for a set of configurations.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _decomposes(func):
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            raw = getattr(formula, "__wrapped__", None)   # the formula without shape_wrapper's tree_map
            if raw is None:
                self.total += formula(*args, **kwargs, out_val=out)
            else:
                self.total += raw(*map(_shape, args), **{k: _shape(v) for k, v in kwargs.items()},
                                  out_shape=_shape(out))
        return out


def _shape(value):
    """What flop_counter's shape_wrapper passes a formula: a tensor's shape, one level into
    tuples and lists (the registered ops take tensors at the top level; conv backward returns
    a tuple of them)."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)):
        return type(value)(v.shape if isinstance(v, torch.Tensor) else v for v in value)
    return value


@lru_cache(maxsize=None)
def _decomposes(func) -> bool:
    """Whether `func.decompose` would decompose (what OpOverload.decompose checks, once per op)."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return func is not torch.ops.prim.device.default and (
        key in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key))


@contextmanager
def _counting(counter_mode=_FlopTotal):
    """A FLOP counter on one thread: a busy neighbour's OpenMP threads on a shared CPU made
    counting many times slower. The count is taken from the aten ops and their shapes, so
    the CPU backend (oneDNN or not) does not change it. `counter_mode=FlopCounterMode` counts
    with torch's own counter (the tests' reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counter = counter_mode(display=False) if counter_mode is FlopCounterMode else counter_mode()
        with counter:
            yield counter
    finally:
        torch.set_num_threads(threads)


def _total(counter) -> int:
    return counter.get_total_flops() if isinstance(counter, FlopCounterMode) else counter.total


def _model(mc: ModelConfig, train: bool, context_impl: str = "lean") -> ContSupNet:
    """The network, built without moving the caller's random state (its weights don't matter)."""
    with torch.random.fork_rng(devices=[]):
        return set_context_impl(ContSupNet(mc), context_impl).train(train)


def _count_step(net: ContSupNet, batch: int, counter_mode=_FlopTotal) -> int:
    net.train(True).zero_grad(set_to_none=True)
    x, y, image = random_batch(net.cfg.dataset, batch, net.cfg.reconstruct)
    with _counting(counter_mode) as counter:
        local_learning_step(net, x, y, image)
    net.zero_grad(set_to_none=True)
    return _total(counter)


def _count_eval(net: ContSupNet, batch: int, counter_mode=_FlopTotal) -> int:
    net.train(False)
    x, _, _ = random_batch(net.cfg.dataset, batch)
    with torch.no_grad(), _counting(counter_mode) as counter:
        net(x)
    return _total(counter)


def count_step_flops(mc: ModelConfig, batch: int, context_impl: str = "lean", counter_mode=_FlopTotal) -> int:
    """Counted FLOPs of one local-learning training step at `batch` (forward + backward), with
    the context encoders run as the trainer runs them (`context_impl`)."""
    return _count_step(_model(mc, train=True, context_impl=context_impl), batch, counter_mode)


def count_eval_flops(mc: ModelConfig, batch: int, counter_mode=_FlopTotal) -> int:
    """Counted FLOPs of one inference forward of `batch` test images."""
    return _count_eval(_model(mc, train=False), batch, counter_mode)


def has_quadratic_term(mc: ModelConfig) -> bool:
    """Whether a step has the O(B^2) SupCon similarity matrix: contrast heads (K > 1)."""
    return mc.loss == "contrast" and mc.k > 1


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one model: training step f(B) = per_step + per_image*B + per_pair*B^2,
    inference per image."""
    per_image: Fraction
    per_pair: Fraction        # non-zero only with contrast heads (their B x B similarity matrix)
    eval_per_image: int
    per_step: Fraction = Fraction(0)  # batch-independent: lean's BN statistics of 1x1 encoders

    def step(self, batch: int) -> int:
        return round(self.per_step + self.per_image * batch + self.per_pair * batch * batch)


@lru_cache(maxsize=None)
def _cost(model_key: tuple, context_impl: str) -> StepCost:
    """Counted once per distinct model (one network, all its counts): runs that differ only
    in training settings (epochs, batch size, lr, seed, speed flags) share it."""
    net = _model(ModelConfig(*model_key), train=True, context_impl=context_impl)
    (b1, b2, b3) = COUNT_BATCHES
    f1, f2 = _count_step(net, b1), _count_step(net, b2)
    slope12 = Fraction(f2 - f1, b2 - b1)
    if has_quadratic_term(net.cfg):  # divided differences through the three points
        f3 = _count_step(net, b3)
        c = (Fraction(f3 - f2, b3 - b2) - slope12) / (b3 - b1)
    else:                            # a third count would only confirm what the tests check
        c = Fraction(0)
    a = slope12 - c * (b1 + b2)
    d = f1 - a * b1 - c * b1 * b1
    return StepCost(a, c, _count_eval(net, b1) // b1, d)


def step_cost(cfg: TrainConfig) -> StepCost:
    """The run's `StepCost`, keyed (and cached) by its model config and the encoder
    implementation the trainer runs on the GPU (resolve_context_impl)."""
    return _cost(astuple(cfg.model_config()),
                 resolve_context_impl(cfg.context_impl, "cuda", cfg.torch_compile, cfg.deterministic))


def step_flops(cfg: TrainConfig) -> int:
    """FLOPs of one training step of `cfg` at cfg.batch_size."""
    return step_cost(cfg).step(cfg.batch_size)


def eval_flops(cfg: TrainConfig) -> int:
    """FLOPs of one test image's inference forward pass."""
    return step_cost(cfg).eval_per_image


# --------------------------------------------------------------------------------------
# One run
def dataset_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """(train, test) images the run sees: tables.DATASET_SIZES, the training set cut to
    cfg.train_subset where set."""
    n_train, n_test = tables.DATASET_SIZES[cfg.dataset]
    if cfg.train_subset is not None:
        n_train = min(n_train, cfg.train_subset)
    return n_train, n_test


def run_flops(cfg: TrainConfig) -> int:
    """FLOPs of the whole run: epochs x (ceil(N/B) training steps + one test-set pass)."""
    n_train, n_test = dataset_sizes(cfg)
    cost = step_cost(cfg)
    full, last = divmod(n_train, cfg.batch_size)
    train_epoch = full * cost.step(cfg.batch_size) + (cost.step(last) if last else 0)
    return cfg.epochs * (train_epoch + n_test * cost.eval_per_image)


def run_precision(cfg: TrainConfig, precision: str | None = None) -> str:
    """'bf16' for a run trained under bfloat16 autocast, else 'tf32' (fp32 on cuDNN)."""
    return precision or ("bf16" if getattr(cfg, "bf16", False) else "tf32")


def gpu_hours(flops: float, peak_tflops: float, utilisation: float) -> float:
    return flops / (peak_tflops * 1e12 * utilisation) / 3600


# --------------------------------------------------------------------------------------
# A profile
def check_assumptions(utilisation: float, peak_tflops: float | None, precision: str | None) -> None:
    if not (isinstance(utilisation, (int, float)) and 0 < utilisation <= 1):
        raise UsageError(f"--utilisation must be a fraction in (0, 1], e.g. {UTILISATION}; got {utilisation}")
    if peak_tflops is not None and not (isinstance(peak_tflops, (int, float)) and peak_tflops > 0
                                        and math.isfinite(peak_tflops)):
        raise UsageError(f"--peak-tflops must be a positive number of TFLOP/s, e.g. {PEAK_TFLOPS['tf32']}; "
                         f"got {peak_tflops}")
    if precision is not None and precision not in PEAK_TFLOPS:
        raise UsageError(f"unknown precision '{precision}'; choose one of: {', '.join(PEAK_TFLOPS)}")


def estimate(profile: str = "paper", only: list[str] | None = None, *, utilisation: float = UTILISATION,
             peak_tflops: float | None = None, precision: str | None = None, progress: bool = False,
             calibrate: bool = False) -> dict:
    """FLOPs and GPU-hours of the runs of `profile` (groups `only`, all by default).

    Returns {"profile", "assumptions", "groups": [one row per group], "total", "runs": [one
    row per distinct run, with the groups that use it]}. `peak_tflops` None: the H100's
    peak for each run's precision (`precision` None: from the run's bf16 flag). `calibrate`:
    time each architecture's step on this machine's CUDA GPU (`calibrate_rates`) and divide
    by the measured FLOP/s instead of peak x utilisation (a UsageError without a GPU).
    """
    check_assumptions(utilisation, peak_tflops, precision)
    if calibrate and not torch.cuda.is_available():
        raise UsageError("estimate --calibrate times training steps on a CUDA GPU and none is visible; "
                         "drop --calibrate to use the assumed utilisation")
    out = Path("results") / profile      # only names the run folders; nothing is written
    runs = experiments.expand_all(profile, out, only)
    # A group may list one run twice (the smoke profile trains the CIFAR-10, SVHN and STL-10
    # E2E baselines all on digits8): it is trained, and counted, once.
    names = {g: list(dict.fromkeys(r.name for r in rs))
             for g, rs in experiments.runs_by_group(profile, out, only).items()}
    calibration = calibrate_rates(sorted({r.config.arch for r in runs})) if calibrate else None

    rows: dict[str, dict] = {}
    for run in tqdm(runs, desc="counting FLOPs", unit="run", disable=not progress):
        cfg = run.config
        flops = run_flops(cfg)
        n_train, n_test = dataset_sizes(cfg)
        rate = _rate(cfg, flops, calibration, utilisation, peak_tflops, precision)
        rows[run.name] = {
            "name": run.name, "groups": [g for g, ns in names.items() if run.name in ns],
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "train_images": n_train, "test_images": n_test,
            "steps_per_epoch": math.ceil(n_train / cfg.batch_size),
            "step_gflops": step_flops(cfg) / 1e9, "eval_mflops_per_image": eval_flops(cfg) / 1e6,
            "flops": flops, "pflops": flops / 1e15, **rate,
        }

    def summary(run_names: list[str]) -> dict:
        flops = sum(rows[n]["flops"] for n in run_names)
        return {"runs": len(run_names), "flops": flops, "pflops": flops / 1e15,
                "gpu_hours": sum(rows[n]["gpu_hours"] for n in run_names)}

    groups = [{"group": g, "description": experiments.GROUPS[g], **summary(ns)} for g, ns in names.items()]
    return {"profile": profile, "assumptions": _assumptions(rows, calibration, utilisation), "groups": groups,
            "total": summary(list(rows)), "runs": list(rows.values())}


def _rate(cfg, flops: float, calibration: dict | None, utilisation: float, peak_tflops: float | None,
          precision: str | None) -> dict:
    """How fast a run's FLOPs go, and its GPU-hours: peak x utilisation, or the rate
    `calibration` measured for its arch."""
    if calibration is None:
        prec = run_precision(cfg, precision)
        peak = peak_tflops or PEAK_TFLOPS[prec]
        return {"precision": prec, "peak_tflops": peak, "gpu_hours": gpu_hours(flops, peak, utilisation)}
    measured = calibration["archs"][cfg.arch]["flops_per_s"]
    return {"measured_tflops": measured / 1e12, "gpu_hours": flops / measured / 3600}


def _assumptions(rows: dict, calibration: dict | None, utilisation: float) -> dict:
    """What the estimate assumed: the device, precision, peak and utilisation (or the
    calibration), and what its FLOPs count."""
    counted = ("conv + matmul FLOPs (torch.utils.flop_counter's formulas) of every training step (forward + "
               "backward, all K modules, heads, context encoders, decoders) and one test-set forward per epoch")
    if calibration is not None:
        return {"device": calibration["device"], "calibration": calibration, "counted": counted}
    precisions = sorted({r["precision"] for r in rows.values()})
    peaks = sorted({r["peak_tflops"] for r in rows.values()})
    return {
        "device": DEVICE,
        "precision": precisions[0] if len(precisions) == 1 else "per run",
        "peak_tflops": peaks[0] if len(peaks) == 1 else "per run",
        "utilisation": utilisation,
        "utilisation_basis": UTILISATION_BASIS if utilisation == UTILISATION else "the caller's (--utilisation), not the default",
        "counted": counted,
    }


# --------------------------------------------------------------------------------------
# Calibration: the rate measured on the GPU present
def calibrate_rates(archs, device=None, warmup: int = CALIBRATE_STEPS[0], steps: int = CALIBRATE_STEPS[1]) -> dict:
    """FLOP/s of each architecture's training step on `device` (default: the current CUDA
    GPU), measured: the step of `calibration_config(arch)` as the trainer runs it (its model
    preparation, local-learning step and SGD update on a random batch already on the device),
    `warmup` untimed steps (cuDNN's algorithm search, the allocator), then `steps` steps
    timed with CUDA events, synchronised once at the end. Rate = counted FLOPs of one step /
    median step time. The FLOPs are this module's count, so rate x time reproduces them."""
    device = pick_device("cuda" if device is None else str(device))
    if device.type != "cuda":
        raise UsageError(f"estimate --calibrate times steps on a CUDA GPU; got device {device}")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "warmup_steps": warmup, "timed_steps": steps, "archs": {}}
    for arch in archs:
        cfg = calibration_config(arch)
        times = sorted(_timed_steps(cfg, device, warmup, steps))
        torch.cuda.empty_cache()
        step_s = times[len(times) // 2]
        flops = step_flops(cfg)
        result["archs"][arch] = {
            "config": {"arch": arch, "k": cfg.k, "mode": cfg.mode, "loss": cfg.loss, "dataset": cfg.dataset,
                       "batch_size": cfg.batch_size, "context_impl": cfg.context_impl, "bf16": cfg.bf16},
            "step_s": step_s, "step_s_min": times[0], "step_s_max": times[-1], "step_flops": flops,
            "flops_per_s": flops / step_s, "images_per_s": cfg.batch_size / step_s}
    return result


def _timed_steps(cfg: TrainConfig, device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` training steps of `cfg` on the CUDA `device`, after `warmup`."""
    with torch.random.fork_rng(devices=[device]):
        torch.manual_seed(0)
        net = prepare_model(ContSupNet(cfg.model_config()), cfg, device)
    optimizer = make_optimizer(net, cfg)
    x, y, image = (t.to(device) if t is not None else None
                   for t in random_batch(cfg.dataset, cfg.batch_size, cfg.reconstruct))
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def one_step():
        local_learning_step(net.train(), x, y, image, cfg.bf16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    return cuda_step_seconds(one_step, steps, device)


def cuda_step_seconds(one_step, steps: int, device) -> list[float]:
    """Seconds of each of `steps` calls of `one_step` on the CUDA `device`, from CUDA events
    recorded between them (what the device spent, not when the host queued it)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        one_step()
        events[i + 1].record()
    torch.cuda.synchronize(device)
    return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]


def calibration_config(arch: str) -> TrainConfig:
    """The step timed for `arch`: CALIBRATION's model on CIFAR-10 shapes at the paper's batch,
    with the trainer's defaults for everything else (encoders, channels_last, fp32/TF32)."""
    return TrainConfig(arch=arch, **CALIBRATION)


# --------------------------------------------------------------------------------------
# Output
def assumptions_line(result: dict) -> str:
    """What the hours rest on, in two lines: the rate (assumed or measured), then its basis."""
    a = result["assumptions"]
    if "calibration" in a:
        c = a["calibration"]
        rates = ", ".join(f"{arch} {r['flops_per_s'] / 1e12:.1f} TFLOP/s ({r['images_per_s']:.0f} images/s)"
                          for arch, r in c["archs"].items())
        cfg = next(iter(c["archs"].values()))["config"]
        return (f"rate: measured on this {c['device']}: {rates}; each the median of {c['timed_steps']} synchronised "
                f"steps after {c['warmup_steps']} warm-up steps of K={cfg['k']} {cfg['mode']} {cfg['loss']}, "
                f"{cfg['dataset']} shapes, batch {cfg['batch_size']}, encoders {cfg['context_impl']}\n"
                f"FLOPs = {a['counted']}")
    peak = a["peak_tflops"]
    if isinstance(peak, (int, float)):
        rate = f"{a['precision'].upper()} dense peak {peak:g} TFLOP/s x utilisation {a['utilisation']:g} " \
               f"= {peak * a['utilisation']:.1f} TFLOP/s sustained"
    else:
        rate = f"each run's own precision peak x utilisation {a['utilisation']:g}"
    return (f"assumptions: one {a['device']}, {rate}; FLOPs = {a['counted']}\n"
            f"utilisation {a['utilisation']:g} is {a['utilisation_basis']}")


def _group_rows(result: dict):
    for g in result["groups"]:
        yield g["group"], g["runs"], g["pflops"], g["gpu_hours"]


def format_table(result: dict) -> str:
    """The plain-text table `python -m contsup estimate` prints; every column as wide as its
    widest entry (a long group name keeps the columns aligned)."""
    total = result["total"]
    rows = [("group", "runs", "PFLOPs", "GPU-hours")]
    rows += [(g, str(n), f"{p:.2f}", f"{h:.3f}") for g, n, p, h in _group_rows(result)]
    rows.append(("total", str(total["runs"]), f"{total['pflops']:.2f}", f"{total['gpu_hours']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    line = lambda row: "  ".join([row[0].ljust(widths[0])]  # noqa: E731
                                 + [v.rjust(w) for v, w in zip(row[1:], widths[1:])])
    rule = "-" * (sum(widths) + 2 * 3)
    lines = [f"profile {result['profile']}: GPU-hours of every run, FLOPs counted on the CPU",
             *map(line, rows[:-1]), rule, line(rows[-1]),
             "(a run two groups share is in both groups' rows and once in the total)",
             assumptions_line(result)]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The same table in markdown, for the README."""
    total = result["total"]
    lines = ["| group | runs | PFLOPs | GPU-hours |", "|---|---:|---:|---:|"]
    lines += [f"| `{g}` | {n} | {p:.2f} | {h:.3f} |" for g, n, p, h in _group_rows(result)]
    lines.append(f"| **total** (distinct runs) | **{total['runs']}** | **{total['pflops']:.2f}** | "
                 f"**{total['gpu_hours']:.3f}** |")
    lines += ["", "A run two groups share is in both groups' rows and once in the total.", "",
              *(line + "." for line in assumptions_line(result).split("\n"))]
    u = result["assumptions"].get("utilisation")
    if u is not None:
        others = [v for v in (0.25, 0.1, 0.02) if v != u]
        lines += ["", "GPU-hours scale as 1/utilisation: the total is "
                  + ", ".join(f"{total['gpu_hours'] * u / v:.1f} GPU-hours at {v:g}" for v in others) + "."]
    return "\n".join(lines)


def add_arguments(p) -> None:
    """The options of `python -m contsup estimate`."""
    p.add_argument("--profile", default="paper", help=f"one of {', '.join(experiments.PROFILES)}")
    p.add_argument("--only", nargs="+", metavar="GROUP", default=None,
                   help=f"estimate only these groups: {', '.join(experiments.GROUPS)}")
    p.add_argument("--utilisation", type=float, default=UTILISATION,
                   help=f"fraction of the peak the runs sustain, in (0, 1] (default {UTILISATION})")
    p.add_argument("--precision", default=None,
                   help="tf32 or bf16 for every run (default: each run's flags; fp32 runs use TF32 convs)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of the GPU (default: the H100 SXM's dense "
                        + ", ".join(f"{v:g} for {k}" for k, v in PEAK_TFLOPS.items()) + ")")
    p.add_argument("--calibrate", action="store_true",
                   help="time each architecture's step on this machine's CUDA GPU and use the measured FLOP/s "
                        "instead of peak x utilisation (--utilisation, --peak-tflops and --precision then "
                        "do not apply; exit 2 without a GPU)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON (groups, total, every run)")
    fmt.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
