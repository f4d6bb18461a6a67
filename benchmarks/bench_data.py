"""Images/s of the training data path: our DeviceLoader against the paper's DataLoader + PIL.

    python benchmarks/bench_data.py                        # CIFAR-10 (N=10000) and STL-10 (N=2000) shapes
    python benchmarks/bench_data.py --n 50000 --n-stl 5000 # full training-set sizes (slow on CPU)
    python benchmarks/bench_data.py --threads 1            # pin torch's threads (steadier on a busy machine)
    python benchmarks/bench_data.py --device cuda          # DeviceLoader on the GPU; PIL batches copied there

Both pipelines read the same synthetic uint8 images (random pixels and labels, no download)
and apply the same recipe from tables.DATA_RECIPES: random crop after padding, horizontal
flip, normalisation. "ours" is contsup.data.DeviceLoader (whole-batch tensor ops);
"torchvision" is torch.utils.data.DataLoader over contsup.data.UInt8ImageDataset with
reference_transform (per-image PIL), with num_workers 0 and 2, pin_memory False and the
default persistent_workers=False (so every epoch starts its workers, as in the paper's code).
One timed unit is a full epoch, the iterator consumed to the end. Each configuration gets one
warm-up epoch, then the repetitions are interleaved (epoch 1 of every config, then epoch 2, ...)
and the median is kept, so the ratios are robust to a machine whose load changes.
Writes benchmarks/results/data_<device>.json and data_<device>.png.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contsup import jsonio, tables  # noqa: E402
from contsup.data import DeviceLoader, UInt8ImageDataset, reference_transform  # noqa: E402
from contsup.speed.memory import reuse_freed_cpu_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKERS = (0, 2)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(name, n):
    """Random uint8 images [n,3,S,S] and labels, S the recipe's image size."""
    recipe = tables.DATA_RECIPES[name]
    g = torch.Generator().manual_seed(0)
    s = recipe.image_size
    x = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, recipe.num_classes, (n,), generator=g), recipe


def loaders(name, n, batch, device):
    """(row, make_iterable) per pipeline; make_iterable() is called once per epoch."""
    x, y, recipe = synthetic(name, n)
    ours = DeviceLoader(x, y, recipe, batch, train=True, device=device, generator=torch.Generator().manual_seed(0))
    out = [({"dataset": name, "pipeline": "ours", "num_workers": 0}, lambda: ours)]
    ds = UInt8ImageDataset(x, y, reference_transform(recipe, train=True))
    for w in WORKERS:
        dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=w, pin_memory=False,
                                         generator=torch.Generator().manual_seed(0))
        out.append(({"dataset": name, "pipeline": "torchvision", "num_workers": w}, lambda dl=dl: dl))
    return out, (min(batch, n), 3, recipe.image_size, recipe.image_size)


def epoch(make, device, shape):
    """Seconds to consume one epoch; every batch ends up a float32 tensor on `device`."""
    sync(device)
    t = time.perf_counter()
    seen = 0
    for i, (xb, yb) in enumerate(make()):
        xb, yb = xb.to(device), yb.to(device)  # no-op for ours and for the CPU
        if i == 0:
            assert xb.dtype == torch.float32 and tuple(xb.shape) == shape and yb.dtype == torch.int64, xb.shape
        seen += len(xb)
    sync(device)
    return time.perf_counter() - t, seen


def measure(datasets, batch, reps, device):
    configs = []
    for name, n in datasets:
        rows, shape = loaders(name, n, batch, device)
        for r, make in rows:
            epoch(make, device, shape)  # warm-up (first worker start, allocator, caches)
            r["epoch_seconds"] = []
            configs.append((r, make, shape, n))
    for rep in range(reps):
        for r, make, shape, n in configs:
            sec, seen = epoch(make, device, shape)
            assert seen == n, (seen, n)
            r["epoch_seconds"].append(sec)
        print(f"  rep {rep + 1}/{reps} done", flush=True)
    rows = []
    for r, _, _, n in configs:
        r.update(n=n, batch=batch, images_per_s=n / statistics.median(r["epoch_seconds"]))
        rows.append(r)
    return rows


def key(r):
    return f"{r['dataset']}/workers={r['num_workers']}"


def speedups(rows):
    """ours / torchvision images/s, per dataset and torchvision num_workers."""
    out = {}
    for ours in (r for r in rows if r["pipeline"] == "ours"):
        for tv in (r for r in rows if r["pipeline"] == "torchvision" and r["dataset"] == ours["dataset"]):
            out[key(tv)] = ours["images_per_s"] / tv["images_per_s"]
    return out


def label(r):
    return "ours (DeviceLoader)" if r["pipeline"] == "ours" else f"torchvision+PIL, {r['num_workers']} workers"


def figure(rows, speedup, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    names = list(dict.fromkeys(r["dataset"] for r in rows))
    hues = list(dict.fromkeys(label(r) for r in rows))
    data = {"dataset": [r["dataset"] for r in rows], "pipeline": [label(r) for r in rows],
            "images/s": [r["images_per_s"] for r in rows]}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sns.barplot(data=data, x="dataset", y="images/s", hue="pipeline", order=names, hue_order=hues,
                ax=ax, palette="deep")
    ax.set_yscale("log")
    low = min(r["images_per_s"] for r in rows)
    ax.set_ylim(10 ** math.floor(math.log10(low / 2)), ax.get_ylim()[1] * 4)  # whole decades, room for labels
    for hue, bars in zip(hues, ax.containers):  # one container per hue, one bar per dataset
        for name, bar in zip(names, bars):
            r = next(r for r in rows if r["dataset"] == name and label(r) == hue)
            text = f"{r['images_per_s']:,.0f}"
            if r["pipeline"] != "ours":
                text += f"\n(ours {speedup[key(r)]:.1f}x)"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7.5, xytext=(0, 2), textcoords="offset points")
    first = {r["dataset"]: r for r in rows}
    ax.set_xticks(range(len(names)), [f"{d}\n({first[d]['n']} images, batch {first[d]['batch']})" for d in names])
    ax.set_xlabel("")
    ax.set_ylabel("training images/s (log)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Training data path, {meta['device']}, {meta['threads']} torch threads, torch {meta['torch']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=10000, help="CIFAR-10-shaped images (32px)")
    p.add_argument("--n-stl", type=int, default=2000, help="STL-10-shaped images (96px)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSON path (default: results/data_<device>.json)")
    p.add_argument("--no-reuse-memory", action="store_true",
                   help="leave glibc's malloc as it is (the trainer's CPU default is reuse_freed_cpu_memory)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    reused = False if a.no_reuse_memory or device.type != "cpu" else reuse_freed_cpu_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else RESULTS / f"data_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "batch": a.batch, "reps": a.reps, "pin_memory": False, "persistent_workers": False,
            "reuse_freed_cpu_memory": reused,
            "note": "synthetic uint8 data; median of interleaved full epochs after one warm-up epoch",
            "loadavg_before": os.getloadavg()}  # the machine's load, to judge how noisy the run was
    rows = measure([("cifar10", a.n), ("stl10", a.n_stl)], a.batch, a.reps, device)
    speedup = speedups(rows)
    meta["loadavg_after"] = os.getloadavg()
    out.write_text(jsonio.dumps({"meta": meta, "rows": rows, "speedup": speedup}, indent=1))
    figure(rows, speedup, meta, out.with_suffix(".png"))
    print(f"{'dataset':8} {'pipeline':12} {'workers':>7} {'images/s':>10} {'ours/this':>9}")
    for r in rows:
        s = speedup[key(r)] if r["pipeline"] != "ours" else None
        print(f"{r['dataset']:8} {r['pipeline']:12} {r['num_workers']:>7} {r['images_per_s']:>10,.0f} "
              f"{'' if s is None else f'{s:.1f}x':>9}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
