"""Where the context encoders' time goes: each encoder of a network, alone, against its
convolutions alone (the floor any implementation of the same function pays on this device).

    python benchmarks/bench_encoders.py                  # ResNet-32, K=16, R1E, batch 256
    python benchmarks/bench_encoders.py --mode R16

Every encoder (image encoder and residual encoders of every module) gets the input it sees
in a training step; one unit is its forward + backward (gradient of its parameters; the input
of an encoder never needs one: the image, or an earlier module's detached input), timed for
each implementation (lean, fused, plain). "convs" is the same encoder's convolutions only,
once each: F.conv2d forward and aten.convolution_backward (weight gradient, and input
gradient where a conv follows another), what any implementation of the function must run;
BatchNorm, ReLU, pooling and lean's recomputation make up the rest. GFLOP is the function's
(counted on `fused`, no recomputation). Medians of interleaved repetitions. Writes
benchmarks/results/encoders_<device>.json.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contsup import jsonio  # noqa: E402
from contsup.speed.memory import reuse_freed_cpu_memory  # noqa: E402
from contsup.model import ContSupNet, ImageEncoder, ModelConfig, ResidualEncoder  # noqa: E402
from contsup.speed.encoders import set_context_impl  # noqa: E402
from contsup.step import local_learning_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("lean", "fused", "plain")


def encoder_inputs(net, x, y):
    """[(encoder, the input it gets in a training step)] for every encoder of `net`."""
    seen, hooks = [], []
    for m in net.modules():
        if isinstance(m, (ImageEncoder, ResidualEncoder)):
            hooks.append(m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach()))))
    local_learning_step(net, x, y)
    for h in hooks:
        h.remove()
    net.zero_grad(set_to_none=True)
    return seen


def run_encoder(enc, x, g):
    out = enc(x)
    out.backward(g)
    enc.zero_grad(set_to_none=True)


def run_convs(enc, x):
    """The encoder's convolutions only: forward, weight (and input) gradient."""
    convs = [block[0] for block in enc.net if isinstance(block, torch.nn.Sequential)]
    h = x
    for i, conv in enumerate(convs):
        z = F.conv2d(h, conv.weight, None, conv.stride, conv.padding)
        torch.ops.aten.convolution_backward(torch.ones_like(z), h, conv.weight, None, list(conv.stride),
                                            list(conv.padding), list(conv.dilation), False, [0, 0], 1,
                                            [i > 0, True, False])
        h = z


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet32")
    p.add_argument("-k", type=int, default=16)
    p.add_argument("--mode", default="R1E")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default: results/encoders_cpu.json)")
    a = p.parse_args(argv)
    reuse_freed_cpu_memory()  # as the trainer does on CPU
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.batch,))
    nets = {m: ContSupNet(ModelConfig(arch=a.arch, k=a.k, mode=m, dataset="cifar10"))
            .to(memory_format=torch.channels_last).train() for m in ("R0", a.mode)}
    backbone = {}  # the R0 step: the rate the backbone's own convolutions reach
    with FlopCounterMode(display=False) as fc:
        local_learning_step(nets["R0"], x, y)
    backbone["flops"] = fc.get_total_flops()
    backbone["seconds"] = []
    for _ in range(3):
        t = time.perf_counter()
        local_learning_step(nets["R0"], x, y)
        backbone["seconds"].append(time.perf_counter() - t)
    backbone["seconds"] = statistics.median(backbone["seconds"])
    encoders = encoder_inputs(nets[a.mode], x, y)

    units = []
    for enc, inp in encoders:
        set_context_impl(enc, "fused")
        g = torch.randn_like(enc(inp).detach())
        with FlopCounterMode(display=False) as fc:
            run_encoder(enc, inp, g)
        name = f"{type(enc).__name__}({tuple(inp.shape[1:])}->{enc.net[-2][0].out_channels}x{enc.net[-1].output_size}²)"
        units.append({"name": name, "enc": enc, "x": inp, "g": g, "flops": fc.get_total_flops(),
                      "times": {k: [] for k in (*IMPLS, "convs")}})
    for _ in range(a.reps):
        for u in units:
            for impl in IMPLS:
                set_context_impl(u["enc"], impl)
                t = time.perf_counter()
                run_encoder(u["enc"], u["x"], u["g"])
                u["times"][impl].append(time.perf_counter() - t)
            t = time.perf_counter()
            run_convs(u["enc"], u["x"])
            u["times"]["convs"].append(time.perf_counter() - t)
    rows = [{"name": u["name"], "flops": u["flops"],
             **{k: statistics.median(v) for k, v in u["times"].items()}} for u in units]
    total = {k: sum(r[k] for r in rows) for k in (*IMPLS, "convs")}
    flops = sum(r["flops"] for r in rows)
    result = {"meta": {"arch": a.arch, "k": a.k, "mode": a.mode, "batch": a.batch, "reps": a.reps,
                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "platform": platform.platform(), "channels_last": True},
              "R0_step": backbone, "encoder_flops": flops, "total_seconds": total, "rows": rows}
    out = Path(a.out) if a.out else RESULTS / "encoders_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(jsonio.dumps(result, indent=1))
    print(f"{a.arch} K={a.k} {a.mode} batch {a.batch}: {len(rows)} encoders, {flops / 1e9:.1f} GFLOP "
          f"(without recomputation); the R0 step: {backbone['flops'] / 1e9:.1f} GFLOP in "
          f"{backbone['seconds']:.2f} s = {backbone['flops'] / backbone['seconds'] / 1e9:.0f} GFLOP/s")
    print(f"{'encoder':44} {'GFLOP':>6} " + " ".join(f"{k:>7}" for k in (*IMPLS, "convs")))
    for r in rows + [{"name": "all", "flops": flops, **total}]:
        print(f"{r['name']:44} {r['flops'] / 1e9:6.1f} " + " ".join(f"{r[k]:7.3f}" for k in (*IMPLS, "convs")))
    print(f"the encoders' convolutions alone: {total['convs']:.2f} s ({flops / total['convs'] / 1e9:.0f} GFLOP/s); "
          + ", ".join(f"{k} {total[k]:.2f} s = {total[k] / total['convs']:.2f}x" for k in IMPLS))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
