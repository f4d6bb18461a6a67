"""What this code does on a CUDA GPU, in one run of at most five minutes.

    python benchmarks/gpu_check.py                  # measure; writes results/gpu_<device>.json and .md
    python benchmarks/gpu_check.py --markdown PATH  # print the table of a written JSON again

On a machine without a CUDA GPU it says so in one line and exits 2. ResNet-32 at batch
BATCH (the batch benchmarks/README.md's CPU numbers are at), random CIFAR-10-shaped data
already on the device. Sections, in this order:

1. `steps`: images/s and torch.cuda.max_memory_allocated of one training step (the
   trainer's: local-learning step + SGD update) per mode -- E2E (K=1), and R0, E, R1E, R16
   at K=16 -- for each encoder implementation (lean, fused, plain; E2E and R0 have no
   encoders: one row), in float32 and under bfloat16 autocast (the trainer's --bf16), timed
   with CUDA events after warm-up steps; beside it our tracker's peak activation bytes and
   `cuda_peak_bytes` (contsup.speed.memory.measure_step_memory, on copies, eager).
2. `wrap`: models this code did not build, cut by contsup.wrap (gpu_check_wrap.py), the
   CIFAR-stem ResNet-18 and the small ViT (contsup.backbones), same batch and data: R0 at
   K=4 in eval mode against the model itself on the device (torch.equal and the largest
   difference, reported: cuDNN may pick other algorithms per piece), then the trainer's
   step as in section 1, float32, E2E (K=1) and R1E at K=4 with the encoders a CUDA run
   gets by default: images/s, max_memory_allocated, R1E/E2E of both beside the CPU's
   (benchmarks/results/wrap_cpu.json). Its 25 s came from `calibrate` (10: its estimate
   is 30 s) and `compiled` (15: the compiled rows after K=16 R1E did not fit anyway, and
   on one GPU `nccl`'s 40 s pass on to it).
3. `syncs`: the trainer's real epoch loop (train.train_epoch) over a DeviceLoader on the
   device, with the encoders a CUDA run gets by default (resolve_context_impl), under
   torch.cuda.set_sync_debug_mode("warn"): the synchronising calls it makes, counted.
4. `ops`: aten ops per step per encoder implementation (bench_encoders.aten_ops_per_step).
5. `calibrate`: `python -m contsup estimate --profile paper --calibrate --json`: each
   architecture's measured FLOP/s and the paper grid's GPU-hours at that rate.
6. `nccl` (two or more GPUs): `torchrun --standalone --nproc-per-node 2 -m contsup train ...
   --deterministic` against the same run in one process: are the checkpoints' tensors
   torch.equal?
7. `compiled`: the steps of section 1 through train.compile_model (plain encoders, inductor),
   each row in a process of its own: images/s, max_memory_allocated, the first step's time
   (the compile), dynamo's graphs and graph breaks, and the frames it compiled again during
   the timed steps (recompiles). E2E first (2 graphs: it measures the compile's seconds per
   graph), then R1E at K=16 (one graph per compiled part, 47).

Keeping the five minutes (`Schedule`): section i may run until the start plus the budgets
of sections 1..i (BUDGET_S; time one leaves unused goes to the next), never past TOTAL_S.
A row (or a section's one item) starts only if its estimate -- from the rows measured so
far, compile rows from their graph count times the seconds per graph measured -- fits in
what is left; otherwise it is listed as skipped with that estimate. A started row is
bounded: its timed steps stop when the next would pass the section's end (the clock is
read between steps, each step synchronised), and a subprocess (compiled rows, calibrate,
nccl) is killed at the section's end. tests/test_gpu_check.py runs the whole schedule on a
fake clock.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_wrap as gw  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

ARCH, K = "resnet32", 16
BATCH = 256   # every section's batch: the one benchmarks/README.md's step and op-count numbers are at
MODES = ["E2E", "R0", "E", "R1E", "R16"]           # E2E: K=1; the others at K=16
IMPLS = ["lean", "fused", "plain"]
DTYPES = ["float32", "bfloat16"]                   # bfloat16: autocast of the forward passes (train --bf16)
WARMUP, TIMED, MIN_TIMED = 3, 15, 3                # steps per row: untimed, timed (at most, at least planned)
BUDGET_S = {"steps": 90, "wrap": 25, "syncs": 15, "ops": 15, "calibrate": 50, "nccl": 40, "compiled": 55}
TOTAL_S = 290                                      # the run's deadline; BUDGET_S sums to it
# Estimates before anything is measured (seconds): a row's set-up (model, tracker, first step),
# a step, a fresh process's start (import torch, CUDA context), one graph's compile, a wrapped
# model's R0 check (trace, cut, two forwards).
PRIOR_S = {"setup": 10.0, "step": 0.5, "process": 15.0, "graph": 3.0, "syncs_setup": 5.0, "calibrate": 30.0,
           "wrap_check": 5.0}
COMPILED_ITEMS = [("E2E", "float32"), ("R1E", "float32"), ("R1E", "bfloat16"), ("R0", "float32"),
                  ("E", "float32"), ("R16", "float32")]


def no_gpu_exit() -> None:
    print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a machine with one",
          file=sys.stderr)
    raise SystemExit(2)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def progress(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Time: the run's schedule, a section's budget, rows that start only when they fit
class Budget:
    """A section's time: `left()` seconds until `end` on `clock`."""

    def __init__(self, end: float, clock=time.monotonic):
        self.end, self.clock = end, clock

    def left(self) -> float:
        return self.end - self.clock()

    def allows(self, expected_s: float) -> bool:
        return expected_s <= self.left()


class Schedule:
    """The run's sections on one clock: section i ends at the start plus the budgets of
    sections 0..i, never after the start plus `total`. `run` records each section's
    seconds and what it was allowed."""

    def __init__(self, budgets: dict = BUDGET_S, total: float = TOTAL_S, clock=time.monotonic):
        self.budgets, self.total, self.clock = dict(budgets), total, clock
        self.start = clock()
        self.times: dict[str, dict] = {}

    def budget(self, name: str) -> Budget:
        names = list(self.budgets)
        planned = sum(self.budgets[n] for n in names[:names.index(name) + 1])
        return Budget(self.start + min(planned, self.total), self.clock)

    def run(self, name: str, fn) -> dict:
        """fn(budget)'s result; a section that fails is recorded as its error, the others still run."""
        budget = self.budget(name)
        t0 = self.clock()
        progress(f"section {name} ({budget.left():.0f} s for it, {self.start + self.total - t0:.0f} s left in all)")
        try:
            out = fn(budget)
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
            progress(f"  {name} failed: {out['error']}")
        self.times[name] = {"s": self.clock() - t0, "allowed_s": budget.end - t0}
        return out

    def summary(self) -> dict:
        return {"sections": self.times, "total_s": self.clock() - self.start, "deadline_s": self.total}


def run_rows(items, budget: Budget, estimate, measure, label) -> dict:
    """measure(item, budget) for each item whose estimate(item, rows so far) fits in what is
    left of `budget`; the others are listed as skipped with their estimate. A row that fails
    is a finding (recorded as its error); the others still run."""
    rows, skipped = [], []
    for item in items:
        expected = estimate(item, rows)
        if not budget.allows(expected):
            skipped.append(f"{label(item)} (needs ~{expected:.0f} s, {max(budget.left(), 0):.0f} s left)")
            progress(f"skipped {skipped[-1]}")
            continue
        progress(f"{label(item)} (~{expected:.0f} s) ...")
        t0 = budget.clock()
        try:
            row = measure(item, budget)
        except Exception as e:
            row = {"error": f"{type(e).__name__}: {e}"}
        row.update(name=label(item), expected_s=expected, s=budget.clock() - t0)
        rows.append(row)
        progress("  " + (f"failed: {row['error']}" if "error" in row else row["said"] if "said" in row else
                         f"{row.get('images_per_s', 0):.0f} images/s over {row.get('timed_steps', 0)} steps"))
    return {"rows": rows, "skipped_for_time": skipped}


def timed_steps(one_step, budget: Budget, device_seconds, on_warm=None) -> dict:
    """The first step, then up to WARMUP - 1 + TIMED more, each started only while one more
    step fits before the budget's end (a step taken as long as the longest after the first,
    host clock, synchronised; before that PRIOR_S's step at most: the first one may have
    compiled). Returns the device seconds (device_seconds(one_step)) of the steps after the
    warm-up, and on_warm() is called when the warm-up is over."""
    clock = budget.clock
    t0 = clock()
    device_seconds(one_step)
    first = clock() - t0
    longest, times = min(first, PRIOR_S["step"]), []
    for i in range(WARMUP - 1 + TIMED):
        if not budget.allows(longest):
            break
        if i == WARMUP - 1 and on_warm:
            on_warm()
        t0 = clock()
        seconds = device_seconds(one_step)
        longest = max(longest if i else 0.0, clock() - t0)
        if i >= WARMUP - 1:
            times.append(seconds)
    out = {"first_step_s": first, "step_wall_s": longest, "timed_steps": len(times)}
    if times:
        out["step_s"] = statistics.median(times)
    else:
        out["stopped"] = "the section's end came before a timed step"
    return out


def planned_s(setup_s: float, step_s: float) -> float:
    """A row's time as planned: its set-up, then the warm-up and the fewest timed steps."""
    return setup_s + (WARMUP - 1 + MIN_TIMED) * step_s


def like(rows, keys: dict) -> list:
    """The measured rows matching the most of `keys` (in order: all of them, then fewer)."""
    ok = [r for r in rows if "setup_s" in r]
    for n in range(len(keys), -1, -1):
        same = [r for r in ok if all(r.get(k) == v for k, v in list(keys.items())[:n])]
        if same:
            return same
    return []


# --------------------------------------------------------------------------------------
# Section 1 (and 7, in its own process): the trainer's step
def step_config(mode: str, impl: str, dtype: str = "float32", compiled: bool = False):
    from contsup.train import TrainConfig
    k = 1 if mode == "E2E" else K
    return TrainConfig(arch=ARCH, k=k, mode="R0" if mode == "E2E" else mode, dataset="cifar10",
                       batch_size=BATCH, context_impl=impl, torch_compile=compiled, device="cuda",
                       bf16=dtype == "bfloat16")


def build_step(mode: str, impl: str, dtype: str, compiled: bool, device) -> tuple:
    """(one training step of the trainer on the device, the tracker's memory fields)."""
    import torch
    from contsup.data import random_batch
    from contsup.model import ContSupNet
    from contsup.speed.memory import measure_step_memory
    from contsup.speed.setup import compile_model, prepare_model
    from contsup.train import make_optimizer

    cfg = step_config(mode, impl, dtype, compiled)
    torch.manual_seed(0)
    net = prepare_model(ContSupNet(cfg.model_config()), cfg, device)
    x, y, _ = random_batch(cfg.dataset, cfg.batch_size)
    x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    memory = {}
    if not compiled:  # the tracker runs eagerly, on copies (compiled rows: the plain rows' numbers)
        m = measure_step_memory(net, x, y, None, cfg.bf16)
        memory = {"tracker_peak_bytes": m["peak_activation_bytes"], "cuda_peak_bytes": m["cuda_peak_bytes"]}
    optimizer = make_optimizer(net, cfg)
    if compiled:
        compile_model(net)
    return gw.trainer_step(net, optimizer, x, y, cfg.bf16), memory


def step_seconds(one_step, device) -> float:
    """One step's device seconds (CUDA events), synchronised."""
    from contsup.study.estimate import cuda_step_seconds
    return cuda_step_seconds(one_step, 1, device)[0]


def reset_peak(device) -> None:
    import torch
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    import torch
    return torch.cuda.max_memory_allocated(device)


def free_cached(device) -> None:
    import torch
    torch.cuda.empty_cache()


def time_row(one_step, budget: Budget, device, setup_s: float, on_warm=None) -> dict:
    """A row's timed steps within `budget` (timed_steps), its images/s and the
    max_memory_allocated of the timed steps (the peak is reset when the warm-up ends, then
    on_warm() is called)."""
    def warm():
        reset_peak(device)
        if on_warm:
            on_warm()
    row = timed_steps(one_step, budget, lambda step: step_seconds(step, device), warm)
    row["setup_s"] = setup_s + row["first_step_s"]   # the part of a row no clock check can cut short
    if "step_s" in row:
        row["images_per_s"] = BATCH / row["step_s"]
        row["max_memory_allocated"] = peak_bytes(device)
    return row


def measure_row(item: tuple, budget: Budget, device, compiled: bool = False) -> dict:
    """One (mode, impl, dtype) row: set-up (model, tracker) and timed steps within `budget`."""
    mode, impl, dtype = item
    t0 = budget.clock()
    one_step, row = build_step(mode, impl, dtype, compiled, device)
    row.update(mode=mode, k=1 if mode == "E2E" else K, batch=BATCH, dtype=dtype,
               impl="compiled" if compiled else ("-" if mode in ("E2E", "R0") else impl))  # E2E, R0: no encoders
    from torch._dynamo.utils import counters
    counters.clear()
    warm = {}

    def on_warm():   # frames compiled after here are recompiles
        warm.update(frames=counters["frames"]["total"])
    row.update(time_row(one_step, budget, device, budget.clock() - t0, on_warm))
    if compiled:
        row.update(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
        if warm:
            row["recompiles"] = counters["frames"]["total"] - warm["frames"]
    del one_step
    free_cached(device)
    return row


def step_items():
    """(mode, impl, dtype) of section 1: E2E and R0 have no encoders, so one row each; each
    float32 row is followed by its bfloat16 one."""
    return [(m, impl, dtype) for m in MODES for impl in (IMPLS if m not in ("E2E", "R0") else ["plain"])
            for dtype in DTYPES]


def step_estimate(item, rows) -> float:
    """A row's planned time from the measured rows most like it (same mode and impl, then
    same mode, then any); PRIOR_S before any."""
    mode, impl, dtype = item
    near = like(rows, {"mode": mode, "impl": impl if mode not in ("E2E", "R0") else "-"})
    if not near:
        return planned_s(PRIOR_S["setup"], PRIOR_S["step"])
    return max(planned_s(r["setup_s"], r["step_wall_s"]) for r in near)


def section_steps(device, budget: Budget) -> dict:
    return run_rows(step_items(), budget, step_estimate, lambda item, b: measure_row(item, b, device),
                    lambda item: f"{item[0]} {item[1]} {item[2]}")


# --------------------------------------------------------------------------------------
# Section 2: wrapped models (gpu_check_wrap), the trainer's step timed as in section 1
def wrap_estimate(item, rows) -> float:
    """An R0 check: the slowest check so far (PRIOR_S before any); a step row: as
    step_estimate, from the rows of the same model and mode, then of the same model, then any."""
    model, what = item
    if what == "R0 eval":
        return max((r["s"] for r in rows if r.get("check") == "R0 eval"), default=PRIOR_S["wrap_check"])
    near = like(rows, {"model": model, "mode": what})
    if not near:
        return planned_s(PRIOR_S["setup"], PRIOR_S["step"])
    return max(planned_s(r["setup_s"], r["step_wall_s"]) for r in near)


def measure_wrap(item, budget: Budget, device) -> dict:
    """A wrapped model's R0 check, or its training step timed within `budget`."""
    model, what = item
    if what == "R0 eval":
        row = gw.r0_equality(model, device, BATCH)
        free_cached(device)
        row["said"] = gw.equality_text(row)
        return row
    t0 = budget.clock()
    one_step, row = gw.build_wrap_step(model, what, device, BATCH)
    row.update(time_row(one_step, budget, device, budget.clock() - t0))
    del one_step
    free_cached(device)
    return row


def section_wrap(device, budget: Budget) -> dict:
    from contsup.speed.encoders import AUTO, resolve_context_impl
    out = run_rows(gw.WRAP_ITEMS, budget, wrap_estimate, lambda item, b: measure_wrap(item, b, device), gw.wrap_label)
    out.update(batch=BATCH, k=gw.WRAP_K, context_impl=resolve_context_impl(AUTO, device),
               ratios=gw.wrap_ratios(out["rows"]))
    return out


# --------------------------------------------------------------------------------------
# Section 3: host syncs of the trainer's own loop, with a CUDA run's default encoders
SYNC_STEPS = 8   # steps per epoch; one epoch warms up, the next is counted


def count_syncs(device, impl: str, steps: int) -> dict:
    """The synchronising calls of one epoch of train.train_epoch (after one warm-up epoch)."""
    import torch
    from contsup import tables, train
    from contsup.data import DeviceLoader
    from contsup.model import ContSupNet

    with tempfile.TemporaryDirectory() as tmp:
        cfg = step_config("R1E", impl)
        cfg.out_dir = tmp
        torch.manual_seed(0)
        net = train.prepare_model(ContSupNet(cfg.model_config()), cfg, device)
        optimizer = train.make_optimizer(net, cfg)
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (steps * cfg.batch_size, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (steps * cfg.batch_size,), generator=g)
        loader = DeviceLoader(images, labels, tables.DATA_RECIPES["cifar10"], cfg.batch_size, train=True, device=device,
                              generator=g)

        def epoch(e):
            train.train_epoch(net, loader, optimizer, cfg, e, cfg.lr, progress=False)

        epoch(0)                                 # warm-up: cuDNN's search, the allocator
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                epoch(1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncs": len(syncs), "where": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs}),
            "messages": sorted({str(w.message).splitlines()[0][:160] for w in syncs})[:5]}


def section_syncs(device, budget: Budget, step_rows: list) -> dict:
    """count_syncs with the encoders resolve_context_impl gives a CUDA run by default, if its
    two epochs (at the steps section's time of that step) fit."""
    from contsup.speed.encoders import AUTO, resolve_context_impl
    impl = resolve_context_impl(AUTO, device)
    near = like(step_rows, {"mode": "R1E", "impl": impl, "dtype": "float32"})
    step = max((r["step_wall_s"] for r in near), default=PRIOR_S["step"])
    expected = PRIOR_S["syncs_setup"] + 2 * SYNC_STEPS * step
    if not budget.allows(expected):
        return {"skipped": f"needs ~{expected:.0f} s, {max(budget.left(), 0):.0f} s left", "impl": impl}
    out = {"steps": SYNC_STEPS, "impl": impl, "expected_s": expected, **count_syncs(device, impl, SYNC_STEPS)}
    out["syncs_per_step"] = out["syncs"] / SYNC_STEPS
    progress(f"syncs: {out['syncs']} in an epoch of {SYNC_STEPS} steps (train.train_epoch, {impl} encoders)")
    return out


# --------------------------------------------------------------------------------------
# Section 4: aten ops per step (bench_encoders' own function)
def count_ops(impl: str, mode: str, device) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_encoders import aten_ops_per_step
    return aten_ops_per_step(impl, mode, K, BATCH, device, ARCH)


def section_ops(device, budget: Budget) -> dict:
    """Ops per step of R1E and R16 per implementation, each count started only if it fits
    (its estimate: the slowest count so far, doubled for a new mode)."""
    from contsup.speed.encoders import AUTO, resolve_context_impl
    out, spent, skipped = {"batch": BATCH, "k": K, "auto": resolve_context_impl(AUTO, device)}, {}, []
    for mode in ("R1E", "R16"):
        counts = {}
        for impl in IMPLS:
            same = [s for (m, _), s in spent.items() if m == mode]
            expected = max(same) if same else 2 * max(spent.values(), default=PRIOR_S["step"])
            if not budget.allows(expected):
                skipped.append(f"{mode} {impl} (needs ~{expected:.0f} s, {max(budget.left(), 0):.0f} s left)")
                continue
            t0 = budget.clock()
            counts[impl] = count_ops(impl, mode, device)
            spent[mode, impl] = budget.clock() - t0
        out.setdefault("aten_ops_per_step", {})[mode] = counts
        progress(f"ops {mode}: {counts}")
    out["skipped_for_time"] = skipped
    return out


# --------------------------------------------------------------------------------------
# Sections 5, 6 and 7: subprocesses killed at the section's end
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_bounded(cmd, timeout: float, cwd=None) -> dict:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), cwd=cwd, env=_env())
        return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr[-2000:], "s": time.monotonic() - t0}
    except subprocess.TimeoutExpired:
        return {"rc": None, "timed_out_after_s": round(timeout), "s": time.monotonic() - t0}


def section_calibrate(budget: Budget) -> dict:
    if not budget.allows(PRIOR_S["calibrate"]):
        return {"skipped": f"needs ~{PRIOR_S['calibrate']:.0f} s, {max(budget.left(), 0):.0f} s left"}
    progress("calibrate: estimate --profile paper --calibrate (counts the grid's FLOPs on the CPU) ...")
    r = run_bounded([sys.executable, "-m", "contsup", "estimate", "--profile", "paper", "--calibrate", "--json",
                     "--no-progress"], budget.left())
    if r.get("rc") != 0:
        return {"error": r.get("stderr") or f"stopped at the section's end after {r.get('timed_out_after_s')} s"}
    est = json.loads(r["stdout"])
    cal = est["assumptions"].get("calibration")
    if cal is None:
        return {"error": "estimate --calibrate returned no calibration"}
    out = {"s": r["s"], "gpu_hours": est["total"]["gpu_hours"], "runs": est["total"]["runs"],
           "pflops": est["total"]["pflops"],
           "archs": {a: {"tflops": v["flops_per_s"] / 1e12, "images_per_s": v["images_per_s"], "config": v["config"]}
                     for a, v in cal["archs"].items()}}
    progress(f"calibrate: paper grid {out['gpu_hours']:.2f} GPU-hours at the measured rates")
    return out


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


def section_nccl(budget: Budget) -> dict:
    import torch

    if gpu_count() < 2:
        return {"skipped": f"{gpu_count()} GPU: needs two"}
    args = ["train", "--dataset", "digits8", "-k", "4", "--mode", "R1E", "--context-impl", "lean", "--epochs", "2",
            "--warmup-epochs", "1", "--batch-size", "64", "--train-subset", "512", "--device", "cuda",
            "--no-progress", "--deterministic"]
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        progress("nccl: one process ...")
        r1 = run_bounded([sys.executable, "-m", "contsup", *args, "--out", str(one)], budget.left() / 2, cwd=tmp)
        progress("nccl: torchrun, 2 ranks ...")
        r2 = run_bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "contsup", *args, "--out", str(two)], budget.left(), cwd=tmp)
        out = {"deterministic": True, "single_rc": r1.get("rc"), "ranks2_rc": r2.get("rc"),
               "single_s": r1["s"], "ranks2_s": r2["s"]}
        if r1.get("rc") != 0 or r2.get("rc") != 0:
            out["error"] = (r1.get("stderr") or "") + (r2.get("stderr") or "") or "stopped at the section's end"
            return out
        a = tensors(torch.load(one / "ckpt.pt", map_location="cpu", weights_only=True))
        b = tensors(torch.load(two / "ckpt.pt", map_location="cpu", weights_only=True))
    differ = sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))
    weights = [k for k in differ if k.startswith(("model/", "optimizer/"))]
    out.update({"tensors": len(a), "differ": len(differ), "differ_first": differ[:5],
                "equal": not weights, "all_tensors_equal": not differ})
    progress(f"nccl: checkpoints' weights and optimizer state {'equal' if not weights else 'differ'}; "
             f"{len(differ)} of {len(a)} tensors differ")
    return out


def tensors(obj, prefix: str = "") -> dict:
    """Every tensor of a checkpoint by its path ('model/blocks.0.0.weight', 'optimizer/state/3/momentum_buffer')."""
    import torch
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("/"): obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}{key}/").items()}


@functools.lru_cache
def graph_count(mode: str) -> int:
    """Graphs a compiled step of `mode` makes, as planned: train.compile_model compiles each
    part of the network through a function of its own, one graph per part
    (tests/test_compile.py), and a part without parameters (R0's context supply: it adds
    nothing) makes none. Counted on a CPU copy wrapped with the eager backend (nothing is
    compiled here): E2E 2, R0 32, R1E 47 at K=16."""
    from contsup.model import ContSupNet
    from contsup.speed.setup import compile_model
    net = compile_model(ContSupNet(step_config(mode, "plain").model_config()), backend="eager")
    return sum(getattr(m, "_compiled_call_impl", None) is not None and any(True for _ in m.parameters())
               for m in net.modules())


def compiled_estimate(item, rows) -> float:
    """A compiled row's planned time: a process's start, its graphs at the seconds per graph
    the compiled rows so far took (PRIOR_S before), and its steps."""
    mode, dtype = item
    done = [r for r in rows if "setup_s" in r and r.get("graphs")]
    per_graph = max((r["first_step_s"] / r["graphs"] for r in done), default=PRIOR_S["graph"])
    start = max((r["s"] - r["first_step_s"] - r["timed_steps"] * r["step_wall_s"] for r in done),
                default=PRIOR_S["process"])
    step = max((r["step_wall_s"] for r in like(rows, {"mode": mode})), default=PRIOR_S["step"])
    return planned_s(start + graph_count(mode) * per_graph, step)


def measure_compiled(item, budget: Budget) -> dict:
    """A compiled row in a process of its own (dynamo's caches and counters fresh), killed at
    the section's end; within it, its timed steps stop at that end too."""
    mode, dtype = item
    r = run_bounded([sys.executable, str(Path(__file__).resolve()), "--compiled-row", f"{mode},{dtype}",
                     "--until", f"{budget.end - 1:.3f}"], budget.left())
    if r.get("rc") is None:
        return {"mode": mode, "dtype": dtype, "impl": "compiled", "graphs_expected": graph_count(mode),
                "error": f"stopped at the section's end after {r['timed_out_after_s']} s (compile not finished)"}
    if r["rc"] != 0:
        return {"mode": mode, "dtype": dtype, "impl": "compiled", "error": r["stderr"][-300:]}
    return json.loads(r["stdout"].strip().splitlines()[-1])


def section_compiled(budget: Budget) -> dict:
    return run_rows(COMPILED_ITEMS, budget, compiled_estimate, measure_compiled,
                    lambda item: f"{item[0]} compiled {item[1]}")


def compiled_row_main(spec: str, until: float) -> int:
    """--compiled-row MODE,DTYPE: measure it here, its steps stopping at `until` (the parent's
    time.monotonic: one clock for every process of the machine); print the row as JSON."""
    import torch
    mode, dtype = spec.split(",")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    from contsup import jsonio
    row = measure_row((mode, "plain", dtype), Budget(until), device, compiled=True)
    print(jsonio.dumps(row))
    return 0


# --------------------------------------------------------------------------------------
# Output
def _mb(v):
    return "-" if v is None else f"{v / 2**20:.0f}"


def row_line(r: dict) -> str:
    """A row of the table; a failed row (which may hold nothing but its name) in its first cells."""
    if "error" in r or "step_s" not in r:
        cells = [r["mode"], r["impl"], r["dtype"]] if "dtype" in r else (r["name"].split() + ["", "", ""])[:3]
        why = f"failed: {r['error'][:80]}" if "error" in r else f"stopped: {r['stopped']}"
        return "| " + " | ".join(cells) + f" | {why} | | | | | | |"
    tracker, cuda = r.get("tracker_peak_bytes"), r.get("cuda_peak_bytes")
    ratio = f"{tracker / cuda:.2f}" if tracker and cuda else "-"
    return (f"| {r['mode']} | {r['impl']} | {r['dtype']} | {r['images_per_s']:.0f} | {_mb(r['max_memory_allocated'])} | "
            f"{_mb(cuda)} | {_mb(tracker)} | {ratio} | {r['first_step_s']:.2f} | {r.get('recompiles', '-')} |")


def markdown(result: dict) -> str:
    """The results table (and one line per other section) of a gpu_check result."""
    lines = [f"### {result['device']}", "",
             f"ResNet-32, batch {BATCH}, random CIFAR-10-shaped data on the device; E2E is K=1, the other modes "
             f"K={K}. images/s: median of up to {TIMED} CUDA-event-timed steps after {WARMUP} warm-up steps.", "",
             "| mode | impl | dtype | images/s | max_memory_allocated MB | step's CUDA peak MB | tracker peak MB "
             "| tracker / CUDA peak | first step s | recompiles |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    tables = [result.get(name, {}) for name in ("steps", "compiled")]
    lines += [row_line(r) for t in tables for r in t.get("rows", [])]
    skipped = [s for t in (tables[0], result.get("wrap", {}), tables[1]) for s in t.get("skipped_for_time", [])]
    if skipped:
        lines += ["", "Not measured (time budget): " + ", ".join(skipped) + "."]
    lines += [""] + [line for line in (gw.wrap_line(result.get("wrap", {})), syncs_line(result.get("syncs", {})),
                                       ops_line(result.get("ops", {})),
                                       calibrate_line(result.get("calibrate", {})), nccl_line(result.get("nccl", {})))
                     if line]
    failed = [f"{name}: {result[name]['error'][:200]}" for name in BUDGET_S if "error" in result.get(name, {})]
    if failed:
        lines.append("- sections failed: " + "; ".join(failed))
    t = result.get("time")
    if t:
        lines.append(f"- time: {t['total_s']:.0f} s of {t['deadline_s']:.0f} (" + ", ".join(
            f"{n} {v['s']:.0f}/{v['allowed_s']:.0f} s" for n, v in t["sections"].items()) + ")")
    return "\n".join(lines)


def syncs_line(s: dict) -> str | None:
    if "syncs" in s:
        return (f"- syncs: {s['syncs']} in an epoch of {s['steps']} steps of train.train_epoch ({s['impl']} encoders) "
                f"under set_sync_debug_mode('warn')" + (f" ({', '.join(s['where'])})" if s["where"] else ""))
    return f"- syncs: not measured, {s['skipped']}" if "skipped" in s else None


def ops_line(o: dict) -> str | None:
    counts = "; ".join(f"{mode} " + ", ".join(f"{impl} {n}" for impl, n in c.items())
                       for mode, c in o.get("aten_ops_per_step", {}).items() if c)
    return f"- aten ops per step, K={o['k']} batch {o['batch']}: {counts}" if counts else None


def calibrate_line(c: dict) -> str | None:
    if "gpu_hours" in c:
        rates = ", ".join(f"{a} {v['tflops']:.1f} TFLOP/s" for a, v in c["archs"].items())
        return f"- paper grid: {c['gpu_hours']:.2f} GPU-hours for {c['runs']} runs at the measured rates ({rates})"
    return f"- calibrate: not measured, {c['skipped']}" if "skipped" in c else None


def nccl_line(n: dict) -> str | None:
    if "equal" in n:
        return (f"- 2 NCCL ranks vs one process{' (--deterministic)' if n['deterministic'] else ''}: "
                + ("weights and optimizer state torch.equal" if n["equal"] else "weights or optimizer state differ")
                + f" ({n['differ']} of {n['tensors']} checkpoint tensors differ)")
    return f"- 2 NCCL ranks: {n['skipped']}" if "skipped" in n else None


def write_results(result: dict, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """results/gpu_<device slug>.json (through contsup.jsonio) and .md."""
    from contsup import jsonio
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"gpu_{slug(result['device'])}"
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(jsonio.dumps(result, indent=1))
    md_path.write_text(markdown(result) + "\n")
    return json_path, md_path


# --------------------------------------------------------------------------------------
def run_sections(schedule: Schedule, device, result: dict) -> dict:
    """Every section in order on `schedule`; `result` gains each one's output and the times."""
    result["steps"] = schedule.run("steps", lambda b: section_steps(device, b))
    result["wrap"] = schedule.run("wrap", lambda b: section_wrap(device, b))
    result["syncs"] = schedule.run("syncs", lambda b: section_syncs(device, b, result["steps"].get("rows", [])))
    result["ops"] = schedule.run("ops", lambda b: section_ops(device, b))
    result["calibrate"] = schedule.run("calibrate", section_calibrate)
    result["nccl"] = schedule.run("nccl", section_nccl)
    result["compiled"] = schedule.run("compiled", section_compiled)
    result["time"] = schedule.summary()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", metavar="JSON", default=None, help="print the table of a written result, measure nothing")
    p.add_argument("--out-dir", default=str(RESULTS), help="where gpu_<device>.json and .md go")
    p.add_argument("--compiled-row", metavar="MODE,DTYPE", default=None, help=argparse.SUPPRESS)  # section 7's rows
    p.add_argument("--until", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(Path(a.markdown).read_text())))
        return 0

    import torch
    if not torch.cuda.is_available():
        no_gpu_exit()
    if a.compiled_row:
        return compiled_row_main(a.compiled_row, a.until)
    schedule = Schedule()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    result = {"device": torch.cuda.get_device_name(device), "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "platform": platform.platform(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    progress(f"{result['device']} x{result['gpus']}, torch {torch.__version__}")
    run_sections(schedule, device, result)
    json_path, md_path = write_results(result, Path(a.out_dir))
    print(markdown(result))
    progress(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
