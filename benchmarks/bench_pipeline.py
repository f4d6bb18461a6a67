"""Throughput of the pipelined trainer: G ranks x 1 thread against 1 process x 1 thread (CPU),
per-rank peak memory, and a model of the speed-up on G GPUs.

    python benchmarks/bench_pipeline.py                      # ResNet-32 K=16 R1E and ResNet-110 K=4 R1E, batch 256
    python benchmarks/bench_pipeline.py --steps 2 --batch 32 --configs resnet32:4   # smoke

For each configuration:
1. Per-module step times (context supply + forward + local loss + backward, one thread,
   `pipeline.split.profile_modules`) and the balanced split for G = 2, 4, 8, 16 with the bytes each
   link carries per batch (`messages.link_slots`, fp32).
   Each rank's peak activation bytes for one step (contsup.memory's tracker).
2. Measured: the ranks run `pipeline.stages.Stage.run_epoch`, the trainer's own loop, on a fixed
   random batch, G = 1 (the same code, one process) and G = 2, each rank one thread, gloo over
   loopback. Throughput at steady state (images per second between the last rank's first and
   last finished batch: the pipe's fill is left out) and over the whole timed span; each
   rank's peak resident memory. Also the loopback link's bandwidth and latency.
3. Modelled: a synchronous FIFO pipe with D >= 2 buffers per link runs at one batch per
   max over stages of max(compute, communication) (they overlap). GPU per-module times are
   the CPU-measured shares scaled to the step time the FLOP count gives (contsup.estimate's
   H100 peak and utilisation); a link costs LATENCY + bytes / BANDWIDTH (the constants below).
   Speed-up(G) = sum of module times / that period; G > K is impossible (a rank needs a module).

Writes benchmarks/results/pipeline_cpu.json and pipeline_cpu.png. The ranks share this
machine's cores with whatever else runs on it: compare within one run.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contsup import jsonio, pipeline  # noqa: E402
from contsup.pipeline import messages, split, stages, watch  # noqa: E402
from contsup.data import random_batch  # noqa: E402
from contsup.speed.memory import peak_activation_bytes, reuse_freed_cpu_memory  # noqa: E402
from contsup.study import estimate  # noqa: E402
from contsup.model import ContSupNet  # noqa: E402
from contsup.speed.setup import prepare_model  # noqa: E402
from contsup.train import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GPU_COUNTS = (2, 4, 8, 16)
# Assumed links between GPUs (one direction, achieved, not the datasheet's bidirectional peak).
NVLINK_BYTES_PER_S = 350e9     # H100 NVLink 4: 450 GB/s per direction on paper
NVLINK_LATENCY_S = 10e-6       # one NCCL send/recv, small message
PCIE_BYTES_PER_S = 22e9        # PCIe 4.0 x16: 32 GB/s per direction on paper
PCIE_LATENCY_S = 25e-6
LINKS = {"nvlink": (NVLINK_BYTES_PER_S, NVLINK_LATENCY_S), "pcie": (PCIE_BYTES_PER_S, PCIE_LATENCY_S)}


def config(arch: str, k: int, batch: int) -> TrainConfig:
    return TrainConfig(dataset="cifar10", arch=arch, k=k, mode="R1E", batch_size=batch, lr=0.01, epochs=1,
                       device="cpu")


def link_bytes(net: ContSupNet, bounds: list[int], batch: int) -> list[int]:
    """Bytes per batch on each link of the split (fp32 activations, int64 labels)."""
    return [sum(batch * messages.slot_sample_bytes(net, bounds, r, s) for s in messages.link_slots(net, bounds, r))
            for r in range(len(bounds) - 2)]


def stage_activation_bytes(net: ContSupNet, bounds: list[int], x, y) -> list[int]:
    """Peak activation bytes of each rank's part of one training step (memory.py's tracker,
    parameters excluded, the rank's incoming message counted), on a copy of `net`."""
    net = copy.deepcopy(net).train()
    peaks, h, module_inputs = [], None, []
    for a, b in zip(bounds, bounds[1:]):
        received = [x, y, h] + [m for m in module_inputs if m is not None]
        box = {}

        def step():
            box["h"], _ = stages.stage_step(net, range(a, b), h, stages.Batch(x, y, None, module_inputs), True)

        peaks.append(peak_activation_bytes(step, exclude=[net], inputs=[t for t in received if t is not None]))
        net.zero_grad(set_to_none=True)
        h = box["h"]
    return peaks


# --------------------------------------------------------------------------------------
# The ranks
def _rank(rank: int, world: int, port: int, spec: dict, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    reuse_freed_cpu_memory()
    cfg = config(spec["arch"], spec["k"], spec["batch"])
    torch.manual_seed(0)
    net = prepare_model(ContSupNet(cfg.model_config()), cfg, torch.device("cpu"))
    rank_watch = watch.Watch(rank, world, 1800)
    stage = stages.Stage(net, cfg, spec["bounds"], rank_watch, max_batch=spec["batch"], depth=pipeline.DEPTH)
    link = _loopback(rank, world, spec["link_bytes"])
    x, y, _ = random_batch("cifar10", spec["batch"])
    source = itertools.repeat((messages.TRAIN, x, y, None)) if rank == 0 else None
    setup_rss = _peak_rss()
    # the batch sizes known ahead, as the trainer knows its schedule (receivers then read no header)
    stage.run_epoch(0, cfg.lr, source, spec["warmup"], 0, sizes=[spec["batch"]] * spec["warmup"])
    dist.barrier()
    timed = stage.run_epoch(1, cfg.lr, source, spec["steps"], 0, sizes=[spec["batch"]] * spec["steps"])
    mine = {"t0": timed["t0"], "t1": timed["t1"], "ends": timed["ends"], "setup_rss": setup_rss,
            "peak_rss": _peak_rss()}
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank == 0:
        Path(out).write_text(jsonio.dumps({"ranks": parts, "link": link}))
    dist.destroy_process_group()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB


def _loopback(rank: int, world: int, nbytes: int, reps: int = 5) -> dict | None:
    """Bandwidth and latency of rank 0 -> rank 1 (gloo), with a message of the link's size."""
    if world < 2 or rank > 1:
        return None
    times = {}
    for n in (8, max(nbytes, 8)):
        buf = torch.zeros(n, dtype=torch.uint8)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            (dist.send if rank == 0 else dist.recv)(buf, 1 - rank)
            (dist.recv if rank == 0 else dist.send)(buf[:8], 1 - rank)   # the answer: an 8-byte round trip
        times[n] = (time.perf_counter() - t0) / reps
    latency = times[8] / 2
    return {"latency_s": latency, "bytes": nbytes, "bytes_per_s": nbytes / max(times[max(nbytes, 8)] - latency, 1e-9)}


def measure(spec: dict, world: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(_rank, args=(world, port, spec, out), nprocs=world, join=True)
        got = json.loads(Path(out).read_text())
    ranks, batch = got["ranks"], spec["batch"]
    ends = ranks[-1]["ends"]
    span = max(r["t1"] for r in ranks) - min(r["t0"] for r in ranks)
    return {"world_size": world, "bounds": spec["bounds"], "steps": spec["steps"],
            "images_per_s_steady": (len(ends) - 1) * batch / (ends[-1] - ends[0]) if len(ends) > 1 else None,
            "images_per_s_span": len(ends) * batch / span,
            "peak_rss_bytes": [r["peak_rss"] for r in ranks], "setup_rss_bytes": [r["setup_rss"] for r in ranks],
            "link": got["link"]}


# --------------------------------------------------------------------------------------
# The model
def predict(module_seconds: list[float], net: ContSupNet, batch: int, g: int, bytes_per_s: float,
            latency_s: float) -> dict:
    """Speed-up of G ranks over one: sum of the module times / the pipe's period, for the
    split that minimises that period given the links."""
    k = len(module_seconds)
    if g > k:
        return {"g": g, "speedup": None, "why": f"G > K={k}: a rank needs a module"}
    # each cut's cost as if it were the only one (exact for R1E: what crosses a cut depends on it alone)
    cut = [0.0] + [latency_s + link_bytes(net, [0, j, k], batch)[0] / bytes_per_s for j in range(1, k)]
    bounds = pipeline.balanced_split(module_seconds, g, cut)
    compute = [sum(module_seconds[a:b]) for a, b in zip(bounds, bounds[1:])]
    comm = [latency_s + n / bytes_per_s for n in link_bytes(net, bounds, batch)]
    period = max(compute + comm)
    bound = "communication" if max(comm, default=0) >= max(compute) else (
        "one module" if max(compute) == max(module_seconds) and g > 1 else "balance")
    return {"g": g, "bounds": bounds, "stage_seconds": compute, "link_seconds": comm,
            "speedup": sum(module_seconds) / period, "bound": bound}


def run_config(arch: str, k: int, batch: int, steps: int, warmup: int) -> dict:
    torch.set_num_threads(1)
    cfg = config(arch, k, batch)
    torch.manual_seed(0)
    net = prepare_model(ContSupNet(cfg.model_config()), cfg, torch.device("cpu"))
    x, y, _ = random_batch("cifar10", batch)
    x = x.contiguous(memory_format=torch.channels_last)
    seconds = split.profile_modules(net, x, y)
    bounds2 = pipeline.balanced_split(seconds, 2)
    activations = {"one_process": stage_activation_bytes(net, [0, k], x, y),
                   "two_ranks": stage_activation_bytes(net, bounds2, x, y)}
    spec = {"arch": arch, "k": k, "batch": batch, "steps": steps, "warmup": warmup,
            "link_bytes": link_bytes(net, bounds2, batch)[0]}
    one = measure(spec | {"bounds": [0, k]}, 1)
    two = measure(spec | {"bounds": bounds2}, 2)
    speedup = {key: two[key] / one[key] for key in ("images_per_s_steady", "images_per_s_span")
               if one[key] and two[key]}
    # CPU: the model with the measured module times and loopback link, against the measurement
    link = two["link"]
    cpu_model = predict(seconds, net, batch, 2, link["bytes_per_s"], link["latency_s"])
    # GPU: the module shares scaled to the FLOP-derived step time
    flops = estimate.step_flops(cfg)
    gpu_step = flops / (estimate.PEAK_TFLOPS["tf32"] * 1e12 * estimate.UTILISATION)
    gpu_seconds = [s * gpu_step / sum(seconds) for s in seconds]
    gpu = {name: [predict(gpu_seconds, net, batch, g, bw, lat) for g in GPU_COUNTS]
           for name, (bw, lat) in LINKS.items()}
    return {"arch": arch, "k": k, "mode": "R1E", "batch": batch, "module_seconds": seconds,
            "peak_activation_bytes": activations,
            "measured": {"one_process": one, "two_ranks": two, "speedup": speedup},
            "cpu_model_g2": cpu_model, "step_flops": flops, "gpu_step_seconds": gpu_step, "gpu_model": gpu,
            "gpu_ceiling": sum(seconds) / max(seconds)}


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["configs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"{r['arch']} K={r['k']}" for r in runs]
    measured = [r["measured"]["speedup"].get("images_per_s_steady", float("nan")) for r in runs]
    predicted = [r["cpu_model_g2"]["speedup"] for r in runs]
    pos = range(len(runs))
    a.bar([p - 0.2 for p in pos], measured, 0.4, label="measured (steady state)")
    a.bar([p + 0.2 for p in pos], predicted, 0.4, label="model (measured module times, loopback link)")
    a.axhline(2, color="gray", ls="--", lw=1, label="ideal")
    a.set_ylim(0, 2.4)
    a.set_xticks(list(pos), names)
    a.set_ylabel("speed-up, 2 ranks x 1 thread vs 1 x 1")
    a.set_title(f"CPU, batch {runs[0]['batch']}")
    a.legend(fontsize=8)
    for r, name in zip(runs, names):
        for link, ls in (("nvlink", "-"), ("pcie", "--")):
            pts = [(p["g"], p["speedup"]) for p in r["gpu_model"][link] if p["speedup"]]
            b.plot(*zip(*pts), ls, marker="o", label=f"{name}, {link}")
    b.plot(GPU_COUNTS, GPU_COUNTS, ":", color="gray", label="ideal")
    b.set_xscale("log", base=2)
    b.set_yscale("log", base=2)
    b.set_xlabel("GPUs (G)")
    b.set_ylabel("predicted speed-up")
    b.set_title("model: GPUs over NVLink / PCIe")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(results: dict) -> str:
    """The README's table from a results JSON."""
    lines = ["| network, batch | 1 process, img/s | 2 ranks, img/s (steady / whole span) | speed-up steady / span "
             "| model | peak activations: 1 process / ranks (MB) | peak RSS per rank (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["configs"]:
        m, mb = r["measured"], lambda b: f"{b / 2**20:.0f}"  # noqa: E731
        one, two, sp = m["one_process"], m["two_ranks"], m["speedup"]
        act = r["peak_activation_bytes"]
        lines.append(f"| {r['arch']} K={r['k']} {r['mode']}, {r['batch']} | {one['images_per_s_steady']:.1f} | "
                     f"{two['images_per_s_steady']:.1f} / {two['images_per_s_span']:.1f} | "
                     f"{sp['images_per_s_steady']:.2f}x / {sp['images_per_s_span']:.2f}x | "
                     f"{r['cpu_model_g2']['speedup']:.2f}x | {mb(act['one_process'][0])} / "
                     f"{' + '.join(mb(b) for b in act['two_ranks'])} | "
                     f"{' / '.join(mb(b) for b in two['peak_rss_bytes'])} |")
    lines += ["", "| network | link | " + " | ".join(f"G={g}" for g in GPU_COUNTS) + " |",
              "|---|---|" + "---:|" * len(GPU_COUNTS)]
    for r in results["configs"]:
        for link in LINKS:
            cells = [f"{p['speedup']:.2f}x ({p['bound']})" if p["speedup"] else "-" for p in r["gpu_model"][link]]
            lines.append(f"| {r['arch']} K={r['k']} | {link} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["resnet32:16", "resnet110:4"], help="arch:K")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "pipeline_cpu.json"))
    p.add_argument("--markdown", action="store_true", help="print the README's tables from --out and stop")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    runs = []
    for spec in args.configs:
        arch, k = spec.split(":")
        t0 = time.time()
        runs.append(run_config(arch, int(k), args.batch, args.steps, args.warmup))
        r = runs[-1]
        print(f"{arch} K={k}: measured speed-up {r['measured']['speedup']}, model {r['cpu_model_g2']['speedup']:.2f}, "
              f"GPU model nvlink {[round(q['speedup'], 2) if q['speedup'] else None for q in r['gpu_model']['nvlink']]} "
              f"pcie {[round(q['speedup'], 2) if q['speedup'] else None for q in r['gpu_model']['pcie']]} "
              f"({time.time() - t0:.0f} s)", flush=True)
    results = {"configs": runs, "constants": {"NVLINK_BYTES_PER_S": NVLINK_BYTES_PER_S,
                                              "NVLINK_LATENCY_S": NVLINK_LATENCY_S,
                                              "PCIE_BYTES_PER_S": PCIE_BYTES_PER_S, "PCIE_LATENCY_S": PCIE_LATENCY_S,
                                              "gpu": estimate.DEVICE, "utilisation": estimate.UTILISATION,
                                              "peak_tflops": estimate.PEAK_TFLOPS["tf32"]},
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "load_average": os.getloadavg()},
               "command": "python benchmarks/bench_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(jsonio.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
