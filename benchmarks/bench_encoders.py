"""Where the context encoders' time goes: each encoder of a network, alone, against its
convolutions alone (the floor any implementation of the same function pays on this device).

    python benchmarks/bench_encoders.py                  # ResNet-32, K=16, R1E, batch 256
    python benchmarks/bench_encoders.py --mode R16
    python benchmarks/bench_encoders.py --ops            # aten ops per training step, per impl and mode

Every encoder (image encoder and residual encoders of every module) gets the input it sees
in a training step; one unit is its forward + backward (gradient of its parameters; the input
of an encoder never needs one: the image, or an earlier module's detached input), timed for
each implementation (lean, fused, plain). "convs" is the same encoder's convolutions only,
once each: F.conv2d forward and aten.convolution_backward (weight gradient, and input
gradient where a conv follows another), what any implementation of the function must run;
BatchNorm, ReLU, pooling and lean's recomputation make up the rest. GFLOP is the function's
(counted on `fused`, no recomputation). Medians of interleaved repetitions. Writes
benchmarks/results/encoders_<device>.json.

--ops counts the aten ops one whole training step dispatches (`aten_ops_per_step`), for
each implementation and mode: on a GPU each is a kernel launch, so this is the count that
`speed.encoders.resolve_context_impl` weighs there. Views, detach and empty allocations
launch nothing and are not counted. The count does not depend on the device, but lean's
slices do depend on the batch. Writes benchmarks/results/encoder_ops_<device>.json; the
GPU's numbers (ops and time) come from benchmarks/gpu_check.py, which calls these functions.
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contsup import jsonio  # noqa: E402
from contsup.speed.memory import reuse_freed_cpu_memory  # noqa: E402
from contsup.model import ContSupNet, ImageEncoder, ModelConfig, ResidualEncoder  # noqa: E402
from contsup.speed.encoders import resolve_context_impl, set_context_impl  # noqa: E402
from contsup.step import local_learning_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("lean", "fused", "plain")
OPS_MODES = ("R0", "E", "R1", "R1E", "R16")


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that do work (launch a kernel on a GPU): views, detach and empty
    allocations are left out."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.__name__.startswith(("detach", "empty", "_unsafe_view", "lift_fresh"))):
            self.ops += 1
        return func(*args, **(kwargs or {}))


def aten_ops_per_step(impl: str, mode: str = "R1E", k: int = 16, batch: int = 256, device="cpu",
                      arch: str = "resnet32") -> int:
    """The aten ops (views, detach, empty left out) of one local-learning training step of
    `arch` (CIFAR-10 shapes, channels_last, as the trainer runs it) with the context encoders
    run by `impl` (lean | fused | plain, or auto: as resolve_context_impl picks for `device`),
    counted on the second step (the first warms up)."""
    device = torch.device(device)
    torch.manual_seed(0)
    net = ContSupNet(ModelConfig(arch=arch, k=k, mode=mode, dataset="cifar10"))
    net = set_context_impl(net, resolve_context_impl(impl, device)).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    local_learning_step(net.train(), x, y)
    net.zero_grad(set_to_none=True)
    with _OpCounter() as counter:
        local_learning_step(net, x, y)
    return counter.ops


def ops_table(modes=OPS_MODES, k: int = 16, batch: int = 256, device="cpu", arch: str = "resnet32") -> dict:
    """aten_ops_per_step for every mode and implementation (R0 has no encoders: one count),
    with each count's ratio to plain's in the same mode."""
    rows = []
    for mode in modes:
        impls = IMPLS if mode != "R0" else ("plain",)   # R0 has no encoders
        counts = {impl: aten_ops_per_step(impl, mode, k, batch, device, arch) for impl in impls}
        rows.append({"mode": mode, "ops": counts, "vs_plain": {i: n / counts["plain"] for i, n in counts.items()}})
        print(f"  {mode:5} " + "  ".join(f"{i} {n} ({n / counts['plain']:.2f}x plain)" for i, n in counts.items()),
              flush=True)
    return {"meta": {"arch": arch, "k": k, "batch": batch, "device": str(device), "torch": torch.__version__,
                     "auto": resolve_context_impl("auto", device),
                     "counted": "aten ops of one training step (views, detach, empty left out)"},
            "rows": rows}


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
    p.add_argument("--ops", action="store_true", help="count aten ops per step instead (results/encoder_ops_cpu.json)")
    p.add_argument("--device", default="cpu", help="--ops: the device to count on")
    p.add_argument("--ops-modes", default=",".join(OPS_MODES), help="--ops: the modes to count")
    a = p.parse_args(argv)
    if a.ops:
        device = torch.device(a.device)
        print(f"aten ops per training step, {a.arch} K={a.k} batch {a.batch} on {device}:", flush=True)
        out = Path(a.out) if a.out else RESULTS / f"encoder_ops_{device.type}.json"
        result = None
        for mode in a.ops_modes.split(","):  # saved after each mode (R16 at batch 256 is slow on a CPU)
            part = ops_table([mode], a.k, a.batch, device, a.arch)
            result = part if result is None else {**result, "rows": result["rows"] + part["rows"]}
            out.write_text(jsonio.dumps(result, indent=1))
        print(f"wrote {out}")
        return
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
