"""ContSup on models it did not build (`contsup.wrap`): activation memory and CPU step time
of a wrapped torchvision model against the same model trained end to end.

    python benchmarks/bench_wrap.py                   # targets + the per-K memory tables
    python benchmarks/bench_wrap.py --no-ks           # only the targets
    python benchmarks/bench_wrap.py --markdown        # the README's tables from the JSON

Models (contsup/backbones.py and torchvision): `cifar_resnet18` (torchvision's ResNet-18
with a 3x3 stride-1 first conv and no max-pool, as CIFAR users train it), the stock
`resnet18` (ImageNet stem: the 32x32 image is 8x8 before the first block) and `small_vit`
(torchvision's VisionTransformer, patch 4, 6 layers of width 128). Batch 64, 32x32 images,
10 classes.

Per model: E2E (K=1), R0, E and R1E at K=4 (cuts chosen by `wrap`, balanced by activation
memory). Memory is `speed.memory.measure_step_memory`, what `describe` reports: the peak
activation bytes of one training step with the encoders as the trainer runs them on a CPU
(`lean`; token encoders have no lean form and run plain), and beside it the peak with the
paper's plain encoders. Time, two clocks on the same steps: `step_seconds`, one
local-learning step (forward, local losses, backward of every module), and
`train_step_seconds`, that and the optimizer's step (the paper's SGD, train.make_optimizer),
the whole training step as the trainer runs it (epoch.EpochSteps); medians of interleaved
repetitions after a warm-up step, every row in one process with the same thread count;
compare the ratios, not the seconds. The targets are judged on both. The per-K tables:
K = 1..8, R0 and R1E, memory only.

`context` in each target row's notes: the context encoders' own cost, the R1E peak minus the
R0 peak at the same cuts, against the R0 peak (the backbone's own activations at those cuts).
Writes benchmarks/results/wrap_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import contsup  # noqa: E402
from contsup import jsonio  # noqa: E402
from contsup.backbones import cifar_resnet18, small_vit  # noqa: E402
from contsup.model import IMAGE_SIDE_RATIO  # noqa: E402
from contsup.speed.encoders import encoder_impls, set_context_impl  # noqa: E402
from contsup.speed.memory import measure_step_memory, reuse_freed_cpu_memory  # noqa: E402
from contsup.step import local_learning_step  # noqa: E402
from contsup.train import make_optimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"cifar_resnet18": cifar_resnet18, "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
          "small_vit": small_vit}
TARGET_ROWS = [(1, "R0"), (4, "R0"), (4, "E"), (4, "R1E")]
TARGETS = {"cifar_resnet18": {"memory": 0.6, "time": 1.5, "train_step_time": 1.5}}   # K=4 R1E against E2E
MiB = 2**20


CHANNELS_LAST = True  # the trainer's default (TrainConfig.channels_last); --nchw turns it off


def make_net(model, k, mode):
    torch.manual_seed(0)
    net = set_context_impl(contsup.wrap(model, cuts=k, mode=mode, image_size=32), "lean").train()  # the trainer's, on a CPU
    return net.to(memory_format=torch.channels_last) if CHANNELS_LAST else net


def batch(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST else x
    return x, torch.randint(0, 10, (n,), generator=g)


LR = 0.05   # the optimizer's learning rate in the timed steps (its cost does not depend on it)


def step(net, x, y, optimizer=None) -> tuple[float, float]:
    """One training step; returns the seconds of the local-learning step (forward and
    backward) and of the whole step (with the optimizer's, where one is given)."""
    t = time.perf_counter()
    local_learning_step(net, x, y)
    t_step = time.perf_counter() - t
    if optimizer is not None:
        optimizer.step()
    net.zero_grad(set_to_none=True)
    return t_step, time.perf_counter() - t


def memory_row(name, model, k, mode, x, y) -> tuple[dict, torch.nn.Module]:
    net = make_net(model, k, mode)
    mem = measure_step_memory(net, x, y)
    row = {"model": name, "k": k, "mode": mode, "cuts": list(net.cuts),
           "cut_shapes": [list(s) for s in net.shapes[1:]], "encoder_impls": encoder_impls(net),
           "peak_activation_bytes": mem["peak_activation_bytes"],
           "plain_peak_activation_bytes": mem["paper_memory_parts"]["plain_peak_activation_bytes"],
           "params": net.parts()}
    print(f"  {name} K={k} {mode}: {row['peak_activation_bytes'] / MiB:.1f} MiB "
          f"(plain encoders {row['plain_peak_activation_bytes'] / MiB:.1f}), cuts {row['cuts']}", flush=True)
    return row, net


def targets(names, batch_size, reps) -> list[dict]:
    """The target rows of every model: memory, then interleaved timed steps."""
    x, y = batch(batch_size)
    rows, nets = [], []
    for name in names:
        model = MODELS[name]()
        for k, mode in TARGET_ROWS:
            row, net = memory_row(name, model, k, mode, x, y)
            optimizer = make_optimizer(net, SimpleNamespace(lr=LR))
            step(net, x, y, optimizer)   # warm-up
            row["times"], row["train_step_times"] = [], []
            rows.append(row)
            nets.append((net, optimizer))
    for rep in range(reps):
        for row, (net, optimizer) in zip(rows, nets):
            t_step, t_train = step(net, x, y, optimizer)
            row["times"].append(t_step)
            row["train_step_times"].append(t_train)
        print(f"  rep {rep + 1}/{reps} done", flush=True)
    for row in rows:
        row["step_seconds"] = statistics.median(row["times"])
        row["train_step_seconds"] = statistics.median(row["train_step_times"])
    return rows


def judge(rows) -> dict:
    """Per model: K=4 R1E (and R0, E) against E2E, memory and time, the targets where set,
    and the context encoders' cost against the backbone's own activations (a note)."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        get = lambda k, mode: next(r for r in rows if r["model"] == name and r["k"] == k and r["mode"] == mode)  # noqa: E731,B023
        e2e, r0, r1e = get(1, "R0"), get(4, "R0"), get(4, "R1E")
        entry = {f"{mode}_K4_vs_E2E": {"memory": get(4, mode)["peak_activation_bytes"] / e2e["peak_activation_bytes"],
                                       "time": get(4, mode)["step_seconds"] / e2e["step_seconds"],
                                       "train_step_time": get(4, mode)["train_step_seconds"] / e2e["train_step_seconds"]}
                 for mode in ("R0", "E", "R1E")}
        entry["R1E_K4_plain_memory_vs_E2E"] = r1e["plain_peak_activation_bytes"] / e2e["peak_activation_bytes"]
        target = TARGETS.get(name)
        if target:
            ratio = entry["R1E_K4_vs_E2E"]
            entry["targets"] = {key: {"ratio": ratio[key], "target": t, "met": ratio[key] <= t}
                                for key, t in target.items()}
        context = r1e["peak_activation_bytes"] - r0["peak_activation_bytes"]
        plain_context = r1e["plain_peak_activation_bytes"] - r0["peak_activation_bytes"]
        entry["context_bytes"] = {"lean": context, "plain": plain_context, "backbone_R0_K4": r0["peak_activation_bytes"],
                                  "E2E": e2e["peak_activation_bytes"]}
        entry["note"] = context_note(name, r1e, context, plain_context, r0["peak_activation_bytes"])
        out[name] = entry
    return out


def context_note(name, r1e, context, plain_context, backbone) -> str:
    """In words, from the numbers: do the context encoders cost more than the backbone's own
    activations at the same cuts?"""
    sides = sorted({s[-1] for s in r1e["cut_shapes"] if len(s) == 3})
    at = [f"{min(32, IMAGE_SIDE_RATIO * side)} px for the {side} px cut" for side in sides]
    where = (f"the image encoders run their convolutions at the image's resolution, pooled first to at most "
             f"{IMAGE_SIDE_RATIO}x the cut's side (model.ImageEncoder): {', '.join(at)}"
             if sides else "the cuts are token sequences: the image encoders are patch convolutions straight to "
                           "the token grid (no full-resolution map), the residual encoders linear maps")
    verdict = "more" if context > backbone else "less"
    return (f"{name} K=4 R1E: the context encoders add {context / MiB:.1f} MiB (lean; {plain_context / MiB:.1f} MiB "
            f"with the paper's plain encoders) to the {backbone / MiB:.1f} MiB of the backbone's own activations "
            f"(R0 at the same cuts): {verdict} than the backbone's; {where}.")


def per_k(names, ks, batch_size) -> list[dict]:
    x, y = batch(batch_size)
    rows = []
    for name in names:
        model = MODELS[name]()
        for k in ks:
            for mode in ("R0", "R1E") if k > 1 else ("R0",):
                rows.append(memory_row(name, model, k, mode, x, y)[0])
    return rows


def markdown(result) -> str:
    rows, judged = result["targets"]["rows"], result["targets"]["judged"]
    out = ["| model | K | mode | cuts | peak act. MiB (lean) | × E2E | plain encoders MiB | s/step (fwd+bwd) | × E2E "
           "| s/step (with SGD) | × E2E |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e2e = next(e for e in rows if e["model"] == r["model"] and e["k"] == 1)
        clocks = [f"{r[key]:.2f} | {r[key] / e2e[key]:.2f}" if key in r else "— | —"   # an older JSON: no SGD clock
                  for key in ("step_seconds", "train_step_seconds")]
        out.append(f"| {r['model']} | {r['k']} | {'E2E' if r['k'] == 1 else r['mode']} | "
                   f"{', '.join(r['cuts']) or '—'} | {r['peak_activation_bytes'] / MiB:.1f} | "
                   f"{r['peak_activation_bytes'] / e2e['peak_activation_bytes']:.2f} | "
                   f"{r['plain_peak_activation_bytes'] / MiB:.1f} | {' | '.join(clocks)} |")
    out += [""] + [f"- {j['note']}" for j in judged.values()]
    if "per_k" in result:
        ks_rows = result["per_k"]["rows"]
        for name in dict.fromkeys(r["model"] for r in ks_rows):
            sel = [r for r in ks_rows if r["model"] == name]
            e2e = next(r for r in sel if r["k"] == 1)["peak_activation_bytes"]
            out += ["", f"*{name}, batch {result['per_k']['batch']}: peak activation MiB (× E2E)*", "",
                    "| K | R0 | R1E (lean) | R1E (plain encoders) | cuts |", "|---:|---:|---:|---:|---|"]
            for k in sorted({r["k"] for r in sel}):
                r0 = next(r for r in sel if r["k"] == k and r["mode"] == "R0")
                r1e = next((r for r in sel if r["k"] == k and r["mode"] == "R1E"), None)
                cell = lambda b: f"{b / MiB:.1f} ({b / e2e:.2f})"  # noqa: E731
                out.append(f"| {k} | {cell(r0['peak_activation_bytes'])} | "
                           f"{cell(r1e['peak_activation_bytes']) if r1e else '—'} | "
                           f"{cell(r1e['plain_peak_activation_bytes']) if r1e else '—'} | "
                           f"{', '.join(r0['cuts']) or '—'} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for every row")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--k-models", default="cifar_resnet18,small_vit", help="models of the per-K memory tables")
    p.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    p.add_argument("--no-ks", action="store_true", help="only the targets")
    p.add_argument("--no-targets", action="store_true", help="only the per-K tables (added to an existing JSON)")
    p.add_argument("--out", default=str(RESULTS / "wrap_cpu.json"))
    p.add_argument("--markdown", action="store_true", help="measure nothing; print the README tables of --out")
    p.add_argument("--nchw", action="store_true", help="NCHW activations instead of the trainer's channels_last")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    torch.set_num_threads(a.threads)
    global CHANNELS_LAST
    CHANNELS_LAST = not a.nchw
    reused = reuse_freed_cpu_memory()
    result = json.loads(out.read_text()) if out.exists() else {}
    meta = {"command": " ".join(["python", "benchmarks/bench_wrap.py", *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform(), "batch": a.batch, "image_size": 32, "reps": a.reps,
            "channels_last": CHANNELS_LAST,
            "reuse_freed_cpu_memory": reused, "load_before": os.getloadavg(),
            "note": "memory: speed.memory.measure_step_memory (describe's), lean encoders as the trainer runs them "
                    "on a CPU; time: medians of interleaved repetitions on a shared machine, compare ratios"}
    if not a.no_targets:
        print(f"targets: batch {a.batch}, {a.threads} threads", flush=True)
        rows = targets(a.models.split(","), a.batch, a.reps)
        judged = judge(rows)
        result |= {"meta": meta | {"load_after": os.getloadavg()}, "targets": {"rows": rows, "judged": judged}}
        out.write_text(jsonio.dumps(result, indent=1))
        print(jsonio.dumps(judged, indent=1), flush=True)
    if not a.no_ks:
        print(f"per K: batch {a.batch}", flush=True)
        rows = per_k(a.k_models.split(","), [int(k) for k in a.ks.split(",")], a.batch)
        result["per_k"] = {"batch": a.batch, "rows": rows, "meta": meta | {"load_after": os.getloadavg()}}
        out.write_text(jsonio.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
