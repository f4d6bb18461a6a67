"""GPU-hours of a profile's runs, from FLOPs counted on the CPU.

    python -m contsup estimate [--profile paper|quick|smoke] [--only GROUP ...] [--utilisation U] [--json]

Method, top to bottom:

1. FLOPs of one training step (`count_step_flops`). Build the run's `ContSupNet` on the
   CPU and run one `step.local_learning_step` -- forward and backward through all K
   modules, every local head and context encoder, and the reconstruction decoders when the
   run has them -- under `torch.utils.flop_counter.FlopCounterMode`. The counter counts
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
   whatever the batch (W mu, W Sigma W^T). So the step is counted at B = 2 and 4, and where
   contrast heads exist also at B = 8, and f(B) = d + a*B + c*B^2 is solved through those
   points (c = 0 without contrast heads). tests/test_estimate.py checks both: f(8) as
   predicted for softmax heads, f(16) as predicted for contrast heads.
   At batch 1024 the quadratic term adds 1.3 % to a ResNet-32 K=16 contrast step (15
   heads), less elsewhere.
3. Evaluation (`eval_flops`). `train` runs the test set through the network after every
   epoch: one inference forward (`net.eval()`, `torch.no_grad()`), counted per image.
4. One run (`run_flops`): epochs x (training set + test set). The training set takes
   ceil(N/B) steps; the loader keeps the last, partial batch, and since FLOPs follow the
   batch size it is counted at its own size: (ceil(N/B) - 1) f(B) + f(N mod B). (Counting
   it as a full batch would add 0.3 % on CIFAR-10, 2.4 % on STL-10.) The two extra steps a
   run spends measuring its memory at the start are left out (< 0.03 % of 160 epochs).
5. GPU-hours = FLOPs / (peak x utilisation) / 3600, per run, summed per group and in total
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
- Utilisation 0.25 of that peak. The CIFAR ResNets are 16-64 channels wide on 32x32 (down to
  8x8) maps, their GEMMs are small, and a local-learning step adds many more small kernels
  (heads, encoders, K separate backward passes) plus the BN/ReLU traffic not counted above;
  such networks rarely sustain more than a quarter of an H100's peak. 0.25 is therefore the
  optimistic end, and the hours it gives a lower bound: eager-mode fp32 training of these
  narrow networks may well reach only 5-10 %, i.e. 2.5-5x the hours (they scale as
  1/utilisation). A step timed on the GPU (benchmarks/bench_step.py --device cuda) is what
  should replace the assumption. Data loading is assumed hidden (the device-resident loader
  of data.py augments on the GPU).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .. import tables
from ..data import random_batch
from ..errors import UsageError
from ..model import ContSupNet, ModelConfig
from ..step import local_learning_step
from ..speed.encoders import resolve_context_impl, set_context_impl
from ..train import TrainConfig
from . import experiments

# --------------------------------------------------------------------------------------
# Assumptions (see the module docstring)
DEVICE = "NVIDIA H100 SXM"
PEAK_TFLOPS = {"tf32": 494.7, "bf16": 989.4}   # dense tensor-core peak per precision
UTILISATION = 0.25                             # fraction of the peak a run sustains
COUNT_BATCHES = (2, 4, 8)                      # the tiny batches f(B) = d + a*B + c*B^2 is fitted to


# --------------------------------------------------------------------------------------
# Counting one step on the CPU
@contextmanager
def _counting():
    """FlopCounterMode on one thread with oneDNN off. The count is the same either way (it
    is taken from the aten ops and their shapes), but the time is not: oneDNN builds a
    kernel for every new shape, and on a shared CPU the OpenMP threads of a busy neighbour
    made counting many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mkldnn.flags() warns about TF32 on Intel GPUs
            with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
                yield counter
    finally:
        torch.set_num_threads(threads)


def _model(mc: ModelConfig, train: bool, context_impl: str = "lean") -> ContSupNet:
    """The network, built without moving the caller's random state (its weights don't matter)."""
    with torch.random.fork_rng(devices=[]):
        return set_context_impl(ContSupNet(mc), context_impl).train(train)


def count_step_flops(mc: ModelConfig, batch: int, context_impl: str = "lean") -> int:
    """Counted FLOPs of one local-learning training step at `batch` (forward + backward), with
    the context encoders run as the trainer runs them (`context_impl`)."""
    net = _model(mc, train=True, context_impl=context_impl)
    x, y, image = random_batch(mc.dataset, batch, mc.reconstruct)
    with _counting() as counter:
        local_learning_step(net, x, y, image)
    return counter.get_total_flops()


def count_eval_flops(mc: ModelConfig, batch: int) -> int:
    """Counted FLOPs of one inference forward of `batch` test images."""
    net = _model(mc, train=False)
    x, _, _ = random_batch(mc.dataset, batch)
    with torch.no_grad(), _counting() as counter:
        net(x)
    return counter.get_total_flops()


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
    """Counted once per distinct model: runs that differ only in training settings share it."""
    mc = ModelConfig(*model_key)
    (b1, b2, b3) = COUNT_BATCHES
    f1, f2 = count_step_flops(mc, b1, context_impl), count_step_flops(mc, b2, context_impl)
    slope12 = Fraction(f2 - f1, b2 - b1)
    if has_quadratic_term(mc):  # divided differences through the three points
        f3 = count_step_flops(mc, b3, context_impl)
        c = (Fraction(f3 - f2, b3 - b2) - slope12) / (b3 - b1)
    else:                       # a third count would only confirm what the tests check
        c = Fraction(0)
    a = slope12 - c * (b1 + b2)
    d = f1 - a * b1 - c * b1 * b1
    return StepCost(a, c, count_eval_flops(mc, b1) // b1, d)


def step_cost(cfg: TrainConfig) -> StepCost:
    """The run's `StepCost`, keyed (and cached) by its model config and the encoder
    implementation the trainer runs on the GPU (resolve_context_impl)."""
    return _cost(astuple(cfg.model_config()), resolve_context_impl(cfg.context_impl, "cuda", cfg.torch_compile))


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


def estimate(profile: str = "paper", only: list[str] | None = None, utilisation: float = UTILISATION,
             peak_tflops: float | None = None, precision: str | None = None, progress: bool = False) -> dict:
    """FLOPs and GPU-hours of the runs of `profile` (groups `only`, all by default).

    Returns {"profile", "assumptions", "groups": [one row per group], "total", "runs": [one
    row per distinct run, with the groups that use it]}. `peak_tflops` None: the H100's
    peak for each run's precision (`precision` None: from the run's bf16 flag).
    """
    check_assumptions(utilisation, peak_tflops, precision)
    out = Path("results") / profile      # only names the run folders; nothing is written
    runs = experiments.expand_all(profile, out, only)
    # A group may list one run twice (the smoke profile trains the CIFAR-10, SVHN and STL-10
    # E2E baselines all on digits8): it is trained, and counted, once.
    names = {g: list(dict.fromkeys(r.name for r in rs))
             for g, rs in experiments.runs_by_group(profile, out, only).items()}

    rows: dict[str, dict] = {}
    for run in tqdm(runs, desc="counting FLOPs", unit="run", disable=not progress):
        cfg = run.config
        prec = run_precision(cfg, precision)
        peak = peak_tflops or PEAK_TFLOPS[prec]
        flops = run_flops(cfg)
        n_train, n_test = dataset_sizes(cfg)
        rows[run.name] = {
            "name": run.name, "groups": [g for g, ns in names.items() if run.name in ns],
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "train_images": n_train, "test_images": n_test,
            "steps_per_epoch": math.ceil(n_train / cfg.batch_size),
            "step_gflops": step_flops(cfg) / 1e9, "eval_mflops_per_image": eval_flops(cfg) / 1e6,
            "precision": prec, "peak_tflops": peak, "flops": flops, "pflops": flops / 1e15,
            "gpu_hours": gpu_hours(flops, peak, utilisation),
        }

    def summary(run_names: list[str]) -> dict:
        flops = sum(rows[n]["flops"] for n in run_names)
        return {"runs": len(run_names), "flops": flops, "pflops": flops / 1e15,
                "gpu_hours": sum(rows[n]["gpu_hours"] for n in run_names)}

    groups = [{"group": g, "description": experiments.GROUPS[g], **summary(ns)} for g, ns in names.items()]
    precisions = sorted({r["precision"] for r in rows.values()})
    peaks = sorted({r["peak_tflops"] for r in rows.values()})
    assumptions = {
        "device": DEVICE,
        "precision": precisions[0] if len(precisions) == 1 else "per run",
        "peak_tflops": peaks[0] if len(peaks) == 1 else "per run",
        "utilisation": utilisation,
        "counted": "conv + matmul FLOPs (torch FlopCounterMode) of every training step (forward + backward, "
                   "all K modules, heads, context encoders, decoders) and one test-set forward per epoch",
    }
    return {"profile": profile, "assumptions": assumptions, "groups": groups, "total": summary(list(rows)),
            "runs": list(rows.values())}


# --------------------------------------------------------------------------------------
# Output
def assumptions_line(result: dict) -> str:
    a = result["assumptions"]
    peak = a["peak_tflops"]
    if isinstance(peak, (int, float)):
        rate = f"{a['precision'].upper()} dense peak {peak:g} TFLOP/s x utilisation {a['utilisation']:g} " \
               f"= {peak * a['utilisation']:.1f} TFLOP/s sustained"
    else:
        rate = f"each run's own precision peak x utilisation {a['utilisation']:g}"
    return f"assumptions: one {a['device']}, {rate}; FLOPs = {a['counted']}"


def _group_rows(result: dict):
    for g in result["groups"]:
        yield g["group"], g["runs"], g["pflops"], g["gpu_hours"]


def format_table(result: dict) -> str:
    """The plain-text table `python -m contsup estimate` prints."""
    total = result["total"]
    lines = [f"profile {result['profile']}: GPU-hours of every run, FLOPs counted on the CPU",
             f"{'group':<12}{'runs':>6}{'PFLOPs':>12}{'GPU-hours':>12}"]
    lines += [f"{g:<12}{n:>6}{p:>12.2f}{h:>12.3f}" for g, n, p, h in _group_rows(result)]
    lines.append("-" * 42)
    lines.append(f"{'total':<12}{total['runs']:>6}{total['pflops']:>12.2f}{total['gpu_hours']:>12.3f}")
    lines.append("(a run two groups share is in both groups' rows and once in the total)")
    lines.append(assumptions_line(result))
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The same table in markdown, for the README."""
    total = result["total"]
    lines = [f"| group | runs | PFLOPs | GPU-hours |", "|---|---:|---:|---:|"]
    lines += [f"| `{g}` | {n} | {p:.2f} | {h:.3f} |" for g, n, p, h in _group_rows(result)]
    lines.append(f"| **total** (distinct runs) | **{total['runs']}** | **{total['pflops']:.2f}** | "
                 f"**{total['gpu_hours']:.3f}** |")
    lines += ["", "A run two groups share is in both groups' rows and once in the total.", "",
              assumptions_line(result) + "."]
    u = result["assumptions"]["utilisation"]
    lower = [v for v in (0.1, 0.05) if v < u]
    if lower:
        lines += ["", "GPU-hours scale as 1/utilisation: the total is "
                  + ", ".join(f"{total['gpu_hours'] * u / v:.1f} GPU-hours at {v:g}" for v in lower) + "."]
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
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON (groups, total, every run)")
    fmt.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
