"""Peak activation memory, FLOPs and step time of one local-learning training step.

    python benchmarks/bench_step.py                       # targets (ResNet-32 K=16 @256) + grid @32
    python benchmarks/bench_step.py --no-targets --grid-batch 256 --archs resnet32   # one grid, added
    python benchmarks/bench_step.py --device cuda         # + max_memory_allocated and images/s
    python benchmarks/bench_step.py --markdown            # the README's tables from the JSON
    python benchmarks/bench_step.py --compiled-vs-eager   # speed.setup.compile_model against eager, small

Every configuration is timed in the same process, and the repetitions are interleaved
(rep 1 of every config, then rep 2, ...), so ratios between rows are robust to a machine
whose load changes; compare ratios, not absolute seconds. Writes
benchmarks/results/step_<device>.json and step_<device>.png.

--compiled-vs-eager (`compiled_vs_eager`) times the trainer's `--compile` (speed.setup.compile_model,
inductor) against the eager step the trainer runs by default on the device, per mode: the
steady-state step time of each, the first compiled step (tracing and compiling every part),
the graphs dynamo made and any frame it compiled again after the first step. On a CPU it is
run small (digits8, K=4); the GPU's numbers come from benchmarks/gpu_check.py (its compiled
rows, beside its eager rows at the same batch). Writes benchmarks/results/compile_<device>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contsup import jsonio  # noqa: E402
from contsup.data import random_batch  # noqa: E402
from contsup.speed.memory import cuda_peak_bytes, peak_activation_bytes, reuse_freed_cpu_memory  # noqa: E402
from contsup.model import ContSupNet, ModelConfig  # noqa: E402
from contsup.speed.encoders import resolve_context_impl, set_context_impl  # noqa: E402
from contsup.step import local_learning_step  # noqa: E402
from contsup.speed.setup import compile_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ["R0", "E", "R1", "R1E", "R2", "R4", "R8", "R16"]
TARGET_MODES = ["R0", "E", "R1", "R1E", "R16"]


def valid_modes(k):
    return [m for m in MODES if not (m.startswith("R") and m not in ("R0", "R1E") and int(m[1:]) > k)]


CHANNELS_LAST = True  # the trainer's default (TrainConfig.channels_last); --nchw turns it off


def make_net(arch, k, mode, loss, impl, device):
    """impl: lean | fused | plain, or compiled (plain, torch.compile'd by `measure` after the
    eager measurements)."""
    torch.manual_seed(0)
    net = ContSupNet(ModelConfig(arch=arch, k=k, mode=mode, loss=loss, dataset="cifar10"))
    net = set_context_impl(net, "plain" if impl == "compiled" else impl)
    net = net.to(device).train()
    return net.to(memory_format=torch.channels_last) if CHANNELS_LAST else net


def batch(n, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST else x
    return x, torch.randint(0, 10, (n,), generator=g).to(device)


def step(net, x, y):
    local_learning_step(net, x, y)
    net.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(rows, batch_size, reps, device):
    """Fill each row with peak activation bytes, FLOPs and median step time (interleaved reps)."""
    x, y = batch(batch_size, device)
    nets = []
    for r in rows:
        net = make_net(r["arch"], r["k"], r["mode"], r["loss"], r["impl"], device)
        probe = copy.deepcopy(net)
        r["peak_activation_bytes"] = peak_activation_bytes(lambda: step(probe, x, y), exclude=[probe], inputs=[x, y])
        with FlopCounterMode(display=False) as fc:
            step(probe, x, y)
        r["flops"] = fc.get_total_flops()
        r["cuda_peak_bytes"] = cuda_peak_bytes(lambda: step(probe, x, y), device)
        del probe
        print(f"  {r['arch']} K={r['k']} {r['mode']} {r['loss']} {r['impl']}: "
              f"{r['peak_activation_bytes'] / 2**20:.1f} MB, {r['flops'] / 1e9:.1f} GFLOP", flush=True)
        if r["impl"] == "compiled":  # the FLOPs are the eager network's; its memory is not measured
            r["peak_activation_bytes"] = r["cuda_peak_bytes"] = None
            compile_model(net)
            t = time.perf_counter()
            step(net, x, y)
            r["compile_seconds"] = time.perf_counter() - t
        step(net, x, y)  # warm-up
        r["times"] = []
        nets.append(net)
    for rep in range(reps):
        for r, net in zip(rows, nets):
            sync(device)
            t = time.perf_counter()
            step(net, x, y)
            sync(device)
            r["times"].append(time.perf_counter() - t)
        print(f"  rep {rep + 1}/{reps} done", flush=True)
    for r in rows:
        r["step_seconds"] = statistics.median(r["times"])
        r["images_per_s"] = batch_size / r["step_seconds"]
        r["batch"] = batch_size
    return rows


def compiled_vs_eager(mode: str = "R1E", k: int = 4, batch: int = 32, reps: int = 5, device="cpu",
                      dataset: str = "digits8", arch: str = "resnet32", backend: str = "inductor") -> dict:
    """One network eager (its encoders as resolve_context_impl("auto") picks for `device`) and
    the same network through speed.setup.compile_model(backend=...): the first compiled step (its
    compile), then `reps` interleaved steady-state steps of each. Seconds are synchronised
    wall times; `graphs`: dynamo's graphs after the first step; `recompiled`: frames compiled
    in the timed steps (0: every part runs the graph of its first step)."""
    device = torch.device(device)
    x, y, _ = random_batch(dataset, batch)
    x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    torch.manual_seed(0)
    base = ContSupNet(ModelConfig(arch=arch, k=k, mode=mode, dataset=dataset))
    eager_impl = resolve_context_impl("auto", device)
    eager = set_context_impl(copy.deepcopy(base), eager_impl).to(device, memory_format=torch.channels_last).train()
    compiled = copy.deepcopy(base).to(device, memory_format=torch.channels_last).train()
    torch._dynamo.reset()
    counters.clear()
    compile_model(compiled, backend=backend)

    def timed(net):
        sync(device)
        t = time.perf_counter()
        step(net, x, y)
        sync(device)
        return time.perf_counter() - t

    first = timed(compiled)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    timed(eager)  # warm-up
    times = {"eager": [], "compiled": []}
    for _ in range(reps):
        times["eager"].append(timed(eager))
        times["compiled"].append(timed(compiled))
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    fallbacks = [r for r in counters["unimplemented"] if "recompile" in r.lower() or "cache_size" in r]
    return {"arch": arch, "k": k, "mode": mode, "dataset": dataset, "batch": batch, "device": str(device),
            "backend": backend, "eager_impl": eager_impl, "eager_step_s": eager_s, "compiled_step_s": compiled_s,
            "compiled_vs_eager": compiled_s / eager_s, "first_compiled_step_s": first,
            "compile_overhead_s": first - compiled_s, "graphs": graphs,
            "recompiled": counters["frames"]["total"] - frames, "recompile_limit_fallbacks": len(fallbacks)}


def row(arch, k, mode, loss="softmax", impl="lean"):
    return {"arch": arch, "k": k, "mode": mode, "loss": loss, "impl": impl}


def target_rows(compiled=False):
    rows = [row("resnet32", 1, "R0")]
    rows += [row("resnet32", 16, m) for m in TARGET_MODES]
    rows += [row("resnet32", 16, m, impl="fused") for m in ("E", "R1E", "R16")]
    rows += [row("resnet32", 16, m, impl="plain") for m in ("E", "R1E", "R16")]
    if compiled:  # --compile: the same function through inductor (minutes of compilation)
        rows += [row("resnet32", 16, m, impl="compiled") for m in TARGET_MODES]
    return rows


def grid_rows(archs, ks, losses):
    rows = []
    for arch in archs:
        for loss in losses:
            rows.append(row(arch, 1, "R0", loss))
            for k in ks:
                rows += [row(arch, k, m, loss) for m in valid_modes(k)]
                rows.append(row(arch, k, "R1E", loss, impl="fused"))
    return rows


def judge(rows):
    """The issue's targets on the ResNet-32 K=16 rows of one run."""
    def get(mode, impl="lean", k=16):
        return next(r for r in rows if r["arch"] == "resnet32" and r["k"] == k and r["mode"] == mode
                    and r["impl"] == impl and r["loss"] == "softmax")
    e2e, r0 = get("R0", k=1), get("R0")
    out = {"time_vs_flops": {}}
    for r in rows:
        if r["arch"] == "resnet32" and r["k"] == 16:
            t, f = r["step_seconds"] / r0["step_seconds"], r["flops"] / r0["flops"]
            if r["impl"] == "compiled":  # against the compiled R0
                r0c = get("R0", "compiled")
                t = r["step_seconds"] / r0c["step_seconds"]
            out["time_vs_flops"][f"{r['mode']}/{r['impl']}"] = {
                "time_ratio": t, "flop_ratio": f, "excess": t / f, "met": t <= 1.15 * f}
    mem = lambda r: r["peak_activation_bytes"]  # noqa: E731
    # the default path is lean; fused is the faster option that keeps more
    r1e, r16, fused = get("R1E"), get("R16"), get("R1E", "fused")
    out["R1E_mem_vs_E2E"] = {"ratio": mem(r1e) / mem(e2e), "target": 0.25, "met": mem(r1e) <= 0.25 * mem(e2e)}
    out["R16_mem_vs_E2E"] = {"ratio": mem(r16) / mem(e2e), "target": 0.5, "met": mem(r16) <= 0.5 * mem(e2e)}
    out["lean_R1E_mem_vs_R0"] = {"ratio": mem(r1e) / mem(r0), "target": 1.3, "met": mem(r1e) <= 1.3 * mem(r0)}
    tl = r1e["step_seconds"] / fused["step_seconds"]
    out["lean_R1E_time_vs_fused"] = {"ratio": tl, "target": 1.3, "met": tl <= 1.3}
    for m in ("R1E", "R16"):
        out[f"fused_{m}_mem_vs_E2E"] = {"ratio": mem(get(m, "fused")) / mem(e2e)}
    return out


def figure(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [r for r in rows if r["arch"] == "resnet32" and r["k"] in (1, 16) and r["loss"] == "softmax"
           and r["peak_activation_bytes"] is not None]
    e2e = next(r for r in sel if r["k"] == 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["E2E" if r["k"] == 1 else f"{r['mode']}\n{r['impl']}" for r in sel]
    axes[0].bar(labels, [r["peak_activation_bytes"] / e2e["peak_activation_bytes"] for r in sel], color="C0")
    axes[0].axhline(0.25, ls="--", c="k", lw=0.8)
    axes[0].set_ylabel("peak activation memory / E2E")
    axes[1].bar(labels, [r["step_seconds"] / e2e["step_seconds"] for r in sel], color="C1", label="time")
    axes[1].plot(labels, [r["flops"] / e2e["flops"] for r in sel], "ko", label="FLOPs")
    axes[1].set_ylabel("step time / E2E")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"ResNet-32, K=16, batch {e2e['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result) -> str:
    """The README's tables from a results JSON: the targets, then each grid per loss."""
    mb = lambda r: r["peak_activation_bytes"] / 2**20  # noqa: E731
    rows = result["targets"]["rows"]
    e2e = next(r for r in rows if r["k"] == 1)
    r0 = next(r for r in rows if r["k"] == 16 and r["mode"] == "R0" and r["impl"] == "lean")
    out = ["| mode | impl | peak act. MB | × E2E | GFLOPs | s/step | time / R0 | FLOPs / R0 | time÷FLOPs vs R0 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        compiled = r["impl"] == "compiled"  # its own R0 (compiled too); memory not measured
        base = next(b for b in rows if b["k"] == 16 and b["mode"] == "R0" and b["impl"] == r["impl"]) \
            if compiled else r0
        t, f = r["step_seconds"] / base["step_seconds"], r["flops"] / base["flops"]
        name, impl = ("E2E (K=1)", "—") if r["k"] == 1 else \
            (r["mode"], "—" if r["mode"] == "R0" and not compiled else r["impl"])
        memory = "— | —" if compiled else f"{mb(r):.0f} | {mb(r) / mb(e2e):.2f}"
        out.append(f"| {name} | {impl} | {memory} | {r['flops'] / 1e9:.1f} | "
                   f"{r['step_seconds']:.2f} | {t:.2f} | {f:.2f} | {t / f:.2f} |")
    for name, grid in result.get("grids", {}).items():
        for arch in dict.fromkeys(r["arch"] for r in grid["rows"]):
            for loss in dict.fromkeys(r["loss"] for r in grid["rows"]):
                sel = [r for r in grid["rows"] if r["arch"] == arch and r["loss"] == loss]
                e2e = next(r for r in sel if r["k"] == 1)
                out += ["", f"*{arch}, {loss}* (E2E: {mb(e2e):.0f} MB, {e2e['step_seconds']:.2f} s/step, "
                        f"batch {grid['batch']})", "",
                        "| K | " + " | ".join(MODES) + " | R1E/fused |", "|---" * (len(MODES) + 2) + "|"]
                for k in sorted({r["k"] for r in sel} - {1}):
                    base = next(r for r in sel if r["k"] == k and r["mode"] == "R0")
                    cells = []
                    for mode, impl in [(m, "lean") for m in MODES] + [("R1E", "fused")]:
                        r = next((r for r in sel if r["k"] == k and r["mode"] == mode and r["impl"] == impl), None)
                        cells.append("" if r is None else
                                     f"{mb(r) / mb(e2e):.2f} / {r['step_seconds'] / base['step_seconds']:.1f} "
                                     f"({r['flops'] / base['flops']:.2f})")
                    out.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--target-batch", type=int, default=256)
    p.add_argument("--grid-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--archs", default="resnet32,resnet110")
    p.add_argument("--ks", default="2,4,8,16")
    p.add_argument("--losses", default="softmax,contrast")
    p.add_argument("--no-grid", action="store_true", help="only the target rows")
    p.add_argument("--no-targets", action="store_true", help="only the grid (added to an existing JSON)")
    p.add_argument("--out", default=None, help="JSON path (default: results/step_<device>.json)")
    p.add_argument("--nchw", action="store_true", help="NCHW activations instead of the default channels_last")
    p.add_argument("--no-reuse-memory", action="store_true",
                   help="leave glibc's malloc as it is (the trainer's default is reuse_freed_cpu_memory)")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd target rows (slow to compile)")
    p.add_argument("--markdown", action="store_true", help="measure nothing; print the README tables of --out")
    p.add_argument("--compiled-vs-eager", action="store_true",
                   help="only compiled_vs_eager (results/compile_<device>.json), with --ce-* below")
    p.add_argument("--ce-modes", default="R0,R1E")
    p.add_argument("--ce-k", type=int, default=4)
    p.add_argument("--ce-batch", type=int, default=32)
    p.add_argument("--ce-dataset", default="digits8")
    a = p.parse_args(argv)
    if a.compiled_vs_eager:
        device = torch.device(a.device)
        load_before, rows = os.getloadavg(), []
        for mode in a.ce_modes.split(","):
            rows.append(compiled_vs_eager(mode, a.ce_k, a.ce_batch, a.reps, device, a.ce_dataset))
            r = rows[-1]
            print(f"  {a.ce_dataset} K={a.ce_k} {mode} batch {a.ce_batch}: eager ({r['eager_impl']}) "
                  f"{r['eager_step_s']:.3f} s, compiled {r['compiled_step_s']:.3f} s "
                  f"({r['compiled_vs_eager']:.2f}x), first compiled step {r['first_compiled_step_s']:.0f} s, "
                  f"{r['graphs']} graphs, {r['recompiled']} recompiled", flush=True)
        out = Path(a.out) if a.out else RESULTS / f"compile_{device.type}.json"
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
                "reps": a.reps, "load_before": load_before, "load_after": os.getloadavg(),
                "note": "medians of interleaved repetitions; the machine is shared: compare within a row"}
        out.write_text(jsonio.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {out}")
        return
    if a.markdown:
        print(markdown(json.loads(Path(a.out or RESULTS / f"step_{a.device.split(':')[0]}.json").read_text())))
        return
    reused = False if a.no_reuse_memory else reuse_freed_cpu_memory()
    global CHANNELS_LAST
    CHANNELS_LAST = not a.nchw
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(a.out) if a.out else RESULTS / f"step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "reps": a.reps, "channels_last": CHANNELS_LAST, "reuse_freed_cpu_memory": reused, "load_before": os.getloadavg(),
            "note": "medians of interleaved repetitions; compare ratios within one table of this file"}
    result = json.loads(out.read_text()) if out.exists() else {}  # a new run replaces only what it measures
    if not a.no_targets:
        print(f"targets: batch {a.target_batch}", flush=True)
        targets = measure(target_rows(a.compile), a.target_batch, a.reps, device)
        meta["load_after"] = os.getloadavg()
        result |= {"meta": meta, "targets": {"rows": targets, "judged": judge(targets)}}
        out.write_text(jsonio.dumps(result, indent=1))
        figure(targets, out.with_suffix(".png"))
        print(jsonio.dumps(result["targets"]["judged"], indent=1))
    if not a.no_grid:
        print(f"grid: batch {a.grid_batch}", flush=True)
        grid = measure(grid_rows(a.archs.split(","), [int(k) for k in a.ks.split(",")], a.losses.split(",")),
                       a.grid_batch, a.reps, device)
        meta["load_after"] = os.getloadavg()
        result.setdefault("grids", {})[f"{a.archs}@{a.grid_batch}"] = {"meta": meta, "batch": a.grid_batch,
                                                                      "rows": grid}
        out.write_text(jsonio.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
