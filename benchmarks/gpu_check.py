"""What this code does on a CUDA GPU, in one run of at most about five minutes.

    python benchmarks/gpu_check.py                  # measure; writes results/gpu_<device>.json and .md
    python benchmarks/gpu_check.py --markdown PATH  # print the table of a written JSON again

On a machine without a CUDA GPU it says so in one line and exits 2. Sections, in this
order, each with its own time budget (BUDGET_S; a section out of time skips its remaining
items and says which; the calibration and the two-rank run are subprocesses, killed at
their budget):

1. `steps`: images/s and torch.cuda.max_memory_allocated of one training step (the
   trainer's: local-learning step + SGD update, ResNet-32, batch 128, random CIFAR-10-shaped
   data already on the device) per mode -- E2E (K=1), and R0, E, R1E, R16 at K=16 -- for
   each encoder implementation (lean, fused, plain; E2E and R0 have no encoders: one row),
   timed with CUDA events after warm-up steps; beside it our tracker's peak activation bytes
   and `cuda_peak_bytes` (contsup.speed.memory.measure_step_memory, on copies, eager).
2. `syncs`: the trainer's real epoch loop (train.train_epoch) over a DeviceLoader on the
   device, under
   torch.cuda.set_sync_debug_mode("warn"): the synchronising calls it makes, counted.
3. `calibrate`: `python -m contsup estimate --profile paper --calibrate --json`: each
   architecture's measured FLOP/s and the paper grid's GPU-hours at that rate.
4. `nccl` (two or more GPUs): `torchrun --standalone --nproc-per-node 2 -m contsup train ...
   --deterministic` against the same run in one process: are the checkpoints' tensors
   torch.equal?
5. `compiled`: the steps of section 1 through train.compile_model (plain encoders, inductor),
   as many modes as the budget allows (E2E first: fewest parts to compile): images/s,
   max_memory_allocated, the first step's time (the compile), dynamo's graphs and graph
   breaks, and the frames it compiled again during the timed steps (recompiles).
6. `ops`: aten ops per step per encoder implementation, and compiled vs eager at K=4 when
   30 s are left, from the benchmarks' own functions (bench_encoders.aten_ops_per_step,
   bench_step.compiled_vs_eager).
"""
from __future__ import annotations

import argparse
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
RESULTS = Path(__file__).resolve().parent / "results"

ARCH, BATCH, K = "resnet32", 128, 16
MODES = ["E2E", "R0", "E", "R1E", "R16"]           # E2E: K=1; the others at K=16
IMPLS = ["lean", "fused", "plain"]
WARMUP, TIMED = 3, 15                              # steps per row: untimed, timed
BUDGET_S = {"steps": 70, "syncs": 20, "calibrate": 100, "nccl": 60, "compiled": 60, "ops": 40}
TOTAL_S = 290                                      # every section also stops at this deadline


def no_gpu_exit() -> None:
    print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a machine with one",
          file=sys.stderr)
    raise SystemExit(2)


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results file's name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# --------------------------------------------------------------------------------------
# Time budgets
class Budget:
    """A section's time: `left()` seconds until its own budget or the run's deadline."""

    def __init__(self, seconds: float, deadline: float):
        self.end = min(time.monotonic() + seconds, deadline)

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, expected_s: float) -> bool:
        return self.left() > expected_s


def progress(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Sections 1 and 5: the trainer's step per mode, implementation, compiled or not
def step_config(mode: str, impl: str, compiled: bool = False):
    from contsup.train import TrainConfig
    k = 1 if mode == "E2E" else K
    return TrainConfig(arch=ARCH, k=k, mode="R0" if mode == "E2E" else mode, dataset="cifar10",
                       batch_size=BATCH, context_impl=impl, torch_compile=compiled, device="cuda")


def measure_row(mode: str, impl: str, compiled: bool, device) -> dict:
    import torch
    from torch._dynamo.utils import counters
    from contsup.data import random_batch
    from contsup.model import ContSupNet
    from contsup.speed.memory import measure_step_memory
    from contsup.step import local_learning_step
    from contsup.study.estimate import cuda_step_seconds
    from contsup.speed.setup import compile_model, prepare_model
    from contsup.train import make_optimizer

    cfg = step_config(mode, impl, compiled)
    torch.manual_seed(0)
    net = prepare_model(ContSupNet(cfg.model_config()), cfg, device)
    x, y, _ = random_batch(cfg.dataset, cfg.batch_size)
    x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    label = "compiled" if compiled else ("-" if mode in ("E2E", "R0") else impl)  # E2E, R0: no encoders
    row = {"mode": mode, "k": cfg.k, "impl": label, "batch": cfg.batch_size}
    if not compiled:  # the tracker runs eagerly, on copies (compiled rows: the plain rows' numbers)
        memory = measure_step_memory(net, x, y)
        row["tracker_peak_bytes"] = memory["peak_activation_bytes"]
        row["cuda_peak_bytes"] = memory["cuda_peak_bytes"]
    optimizer = make_optimizer(net, cfg)
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        compile_model(net)

    def one_step():
        local_learning_step(net.train(), x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    one_step()
    torch.cuda.synchronize(device)
    row["first_step_s"] = time.perf_counter() - t0   # compiled: tracing and compiling every part
    for _ in range(WARMUP - 1):
        one_step()
    if compiled:
        row["graphs"] = counters["stats"]["unique_graphs"]
        row["graph_breaks"] = sum(counters["graph_break"].values())
        frames = counters["frames"]["total"]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    row["step_s"] = statistics.median(cuda_step_seconds(one_step, TIMED, device))
    row["images_per_s"] = cfg.batch_size / row["step_s"]
    row["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    if compiled:
        row["recompiles"] = counters["frames"]["total"] - frames
    return row   # the network and its optimizer go with this frame


def section_rows(items, device, budget: Budget, compiled: bool) -> dict:
    import torch
    rows, skipped, last = [], [], 0.0
    for mode, impl in items:
        label = f"{mode} {'compiled' if compiled else impl}"
        if not budget.allows(last):
            skipped.append(label)
            continue
        progress(f"step {label} ...")
        t0 = time.monotonic()
        try:
            rows.append(measure_row(mode, impl, compiled, device))
            torch.cuda.empty_cache()
            r = rows[-1]
            progress(f"  {r['images_per_s']:.0f} images/s, max_memory_allocated "
                     f"{r['max_memory_allocated'] / 2**20:.0f} MB")
        except Exception as e:  # one row failing is a finding; the others still run
            rows.append({"mode": mode, "impl": "compiled" if compiled else impl, "error": f"{type(e).__name__}: {e}"})
            progress(f"  failed: {rows[-1]['error']}")
        last = time.monotonic() - t0
    return {"rows": rows, "skipped_for_time": skipped}


def step_items():
    """(mode, impl) of section 1: E2E and R0 have no encoders, so one row each."""
    return [(m, impl) for m in MODES for impl in (IMPLS if m not in ("E2E", "R0") else ["plain"])]


# --------------------------------------------------------------------------------------
# Section 2: host syncs of the trainer's own loop
def section_syncs(device, budget: Budget) -> dict:
    import torch
    from contsup import tables, train
    from contsup.data import DeviceLoader
    from contsup.model import ContSupNet

    steps = 8
    with tempfile.TemporaryDirectory() as tmp:
        cfg = step_config("R1E", "lean")
        cfg.out_dir = tmp
        torch.manual_seed(0)
        net = train.prepare_model(ContSupNet(cfg.model_config()), cfg, device)
        optimizer = train.make_optimizer(net, cfg)
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (steps * cfg.batch_size, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (steps * cfg.batch_size,), generator=g)
        loader = DeviceLoader(images, labels, tables.DATA_RECIPES["cifar10"], cfg.batch_size, True, device, g)

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
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    progress(f"syncs: {len(syncs)} in an epoch of {steps} steps (train.train_epoch)")
    return {"steps": steps, "syncs": len(syncs), "syncs_per_step": len(syncs) / steps, "where": where,
            "messages": sorted({str(w.message).splitlines()[0][:160] for w in syncs})[:5]}


# --------------------------------------------------------------------------------------
# Sections 3 and 4: subprocesses with a hard timeout
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
    progress("calibrate: estimate --profile paper --calibrate (counts the grid's FLOPs on the CPU) ...")
    r = run_bounded([sys.executable, "-m", "contsup", "estimate", "--profile", "paper", "--calibrate", "--json",
                     "--no-progress"], budget.left())
    if r.get("rc") != 0:
        return {"error": r.get("stderr") or f"timed out after {r.get('timed_out_after_s')} s"}
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


def section_nccl(budget: Budget) -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: needs two"}
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
            out["error"] = (r1.get("stderr") or "") + (r2.get("stderr") or "") or "timed out"
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


# --------------------------------------------------------------------------------------
# Section 6: the other benchmarks' functions
def section_ops(device, budget: Budget) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_encoders import aten_ops_per_step
    from bench_step import compiled_vs_eager

    out = {"aten_ops_per_step": {}}
    for mode in ("R1E", "R16"):
        if not budget.allows(5):
            break
        out["aten_ops_per_step"][mode] = {impl: aten_ops_per_step(impl, mode, K, BATCH, device, ARCH)
                                          for impl in ("auto", *IMPLS)}
        progress(f"ops {mode}: {out['aten_ops_per_step'][mode]}")
    if budget.allows(30):   # it compiles a K=4 network: the slowest item here
        out["compiled_vs_eager"] = compiled_vs_eager("R1E", 4, BATCH, 5, device, "cifar10", ARCH)
    return out


# --------------------------------------------------------------------------------------
# Output
def _mb(v):
    return "-" if v is None else f"{v / 2**20:.0f}"


def markdown(result: dict) -> str:
    """The results table (and one line per other section) of a gpu_check result."""
    lines = [f"### {result['device']}", "",
             f"ResNet-32, batch {BATCH}, random CIFAR-10-shaped data on the device; E2E is K=1, the other modes "
             f"K={K}. images/s: median of {TIMED} CUDA-event-timed steps after {WARMUP} warm-up steps.", "",
             "| mode | impl | images/s | max_memory_allocated MB | step's CUDA peak MB | tracker peak MB "
             "| tracker / CUDA peak | first step s | recompiles |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["steps"].get("rows", []) + result.get("compiled", {}).get("rows", []):
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['impl']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        tracker, cuda = r.get("tracker_peak_bytes"), r.get("cuda_peak_bytes")
        ratio = f"{tracker / cuda:.2f}" if tracker and cuda else "-"
        lines.append(f"| {r['mode']} | {r['impl']} | {r['images_per_s']:.0f} | {_mb(r['max_memory_allocated'])} | "
                     f"{_mb(cuda)} | {_mb(tracker)} | {ratio} | {r['first_step_s']:.2f} | "
                     f"{r.get('recompiles', '-')} |")
    skipped = result["steps"].get("skipped_for_time", []) + result.get("compiled", {}).get("skipped_for_time", [])
    failed = [f"{name}: {result[name]['error'][:200]}" for name in BUDGET_S if "error" in result.get(name, {})]
    if skipped:
        lines += ["", "Not measured (time budget): " + ", ".join(skipped) + "."]
    s = result.get("syncs", {})
    lines += [""]
    if "syncs" in s:
        lines.append(f"- syncs: {s['syncs']} in an epoch of {s['steps']} steps of train.train_epoch under "
                     f"set_sync_debug_mode('warn')" + (f" ({', '.join(s['where'])})" if s["where"] else ""))
    c = result.get("calibrate", {})
    if "gpu_hours" in c:
        rates = ", ".join(f"{a} {v['tflops']:.1f} TFLOP/s" for a, v in c["archs"].items())
        lines.append(f"- paper grid: {c['gpu_hours']:.2f} GPU-hours for {c['runs']} runs at the measured rates "
                     f"({rates})")
    n = result.get("nccl", {})
    if "equal" in n:
        lines.append(f"- 2 NCCL ranks vs one process{' (--deterministic)' if n['deterministic'] else ''}: "
                     + ("weights and optimizer state torch.equal" if n["equal"] else "weights or optimizer state differ")
                     + f" ({n['differ']} of {n['tensors']} checkpoint tensors differ)")
    elif "skipped" in n:
        lines.append(f"- 2 NCCL ranks: {n['skipped']}")
    if failed:
        lines.append("- sections failed: " + "; ".join(failed))
    return "\n".join(lines)


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
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", metavar="JSON", default=None, help="print the table of a written result, measure nothing")
    p.add_argument("--out-dir", default=str(RESULTS), help="where gpu_<device>.json and .md go")
    a = p.parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(Path(a.markdown).read_text())))
        return 0

    import torch
    if not torch.cuda.is_available():
        no_gpu_exit()
    deadline = time.monotonic() + TOTAL_S
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    result = {"device": torch.cuda.get_device_name(device), "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "platform": platform.platform(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    progress(f"{result['device']} x{result['gpus']}, torch {torch.__version__}")

    def section(name, fn, *args):
        """A section's result; one that fails is recorded as its error and the others still run."""
        progress(f"section {name} (budget {BUDGET_S[name]} s, {deadline - time.monotonic():.0f} s left in all)")
        try:
            result[name] = fn(*args, Budget(BUDGET_S[name], deadline))
        except Exception as e:
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            progress(f"  {name} failed: {result[name]['error']}")

    section("steps", lambda b: section_rows(step_items(), device, b, compiled=False))
    section("syncs", section_syncs, device)
    section("calibrate", section_calibrate)
    section("nccl", section_nccl)
    section("compiled", lambda b: section_rows([(m, "plain") for m in ["E2E", "R0", "R1E", "E", "R16"]], device,
                                               b, compiled=True))
    section("ops", section_ops, device)
    json_path, md_path = write_results(result, Path(a.out_dir))
    print(markdown(result))
    progress(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
