"""gpu_check.py's `wrap` section, the parts that run on any device: models it did not build,
cut by `contsup.wrap`, on the device it is given (tests/test_gpu_check.py runs them with
device "cpu"; gpu_check.py times them on CUDA).

- `r0_equality`: `wrap(model, cuts=K, mode="R0").eval()(x)` against `model.eval()(x)` on
  the device, the same weights: torch.equal and the largest absolute difference. On a CPU
  they are equal bit for bit (contsup.wrap's contract); on CUDA cuDNN may pick another
  algorithm for a piece than for the whole model, so it is reported, not asserted.
- `build_wrap_step`: the trainer's training step of a wrapped model (train.py's path:
  build_net from a TrainConfig naming `contsup.backbones:<model>`, prepare_model on the
  device with the encoders it resolves by default, local_learning_step + the paper's SGD).
- `wrap_ratios`: R1E at K against E2E, step time and max_memory_allocated, beside the CPU
  ratios of benchmarks/results/wrap_cpu.json and the CPU targets (bench_wrap.TARGETS).
- `wrap_line`: the section's lines of the markdown.

Nothing here imports gpu_check (it imports this module).
"""
from __future__ import annotations

import json
from pathlib import Path

WRAP_MODELS = ["cifar_resnet18", "small_vit"]   # contsup.backbones' factories
WRAP_K = 4
WRAP_ITEMS = [(m, what) for m in WRAP_MODELS for what in ("R0 eval", "E2E", "R1E")]   # a model's rows together
CPU_RESULTS = Path(__file__).resolve().parent / "results" / "wrap_cpu.json"


def wrap_label(item) -> str:
    model, what = item
    return f"{model} {what}" + (f" K={WRAP_K}" if what == "R1E" else "")


def wrap_config(model: str, mode: str, device, batch: int):
    """The TrainConfig of a wrapped model's row: E2E is K=1 (R0), R1E at WRAP_K; the
    encoders "auto" (what a run on `device` gets by default)."""
    import torch
    from contsup.train import TrainConfig
    return TrainConfig(arch=f"contsup.backbones:{model}", k=1 if mode == "E2E" else WRAP_K,
                       mode="R0" if mode == "E2E" else mode, dataset="cifar10", batch_size=batch,
                       device=torch.device(device).type)


def device_batch(batch: int, device, seed: int = 0):
    """Random CIFAR-shaped images [batch, 3, 32, 32] and labels on the device."""
    from contsup.data import random_batch
    x, y, _ = random_batch("cifar10", batch, seed=seed)
    return x.to(device), y.to(device)


def r0_equality(model: str, device, batch: int) -> dict:
    """The model and its R0 wrap at WRAP_K cuts, both in eval mode on `device`, on one batch."""
    import torch
    from contsup import backbones
    from contsup.wrap import wrap
    torch.manual_seed(0)
    plain = getattr(backbones, model)()
    zeros = [p for p in plain.parameters() if not p.any()]
    with torch.no_grad():   # a zero-initialised head (torchvision's ViT) would make every logit 0: equal by construction
        for p in zeros:
            p.normal_(0.0, 0.02)
    net = wrap(plain, cuts=WRAP_K, mode="R0", image_size=32)
    plain, net = plain.to(device).eval(), net.to(device).eval()
    x, _ = device_batch(batch, device)
    with torch.no_grad():
        ours, theirs = net(x), plain(x)
    diff = (ours.float() - theirs.float()).abs().max().item()
    return {"model": model, "check": "R0 eval", "k": WRAP_K, "cuts": list(net.cuts), "batch": batch,
            "equal": bool(torch.equal(ours, theirs)), "max_abs_diff": diff,
            "max_abs_logit": theirs.float().abs().max().item(), "zero_params_randomised": len(zeros),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_tf32": torch.backends.cudnn.allow_tf32}


def build_wrap_step(model: str, mode: str, device, batch: int) -> tuple:
    """(one training step of the trainer for the wrapped model on `device`, the row's facts)."""
    import torch
    from contsup.speed.encoders import encoder_impls
    from contsup.speed.setup import prepare_model, resolved_for, to_format
    from contsup.train import make_optimizer
    from contsup.wrap import build_net

    device = torch.device(device)
    cfg = resolved_for(wrap_config(model, mode, device, batch), device)
    torch.manual_seed(0)
    net = prepare_model(build_net(cfg.model_config()), cfg, device)
    x, y = device_batch(batch, device)
    x = to_format(x, cfg.channels_last)
    optimizer = make_optimizer(net, cfg)

    facts = {"model": model, "mode": mode, "k": cfg.k, "batch": batch, "dtype": "float32", "cuts": list(net.cuts),
             "context_impl": cfg.context_impl, "encoder_impls": encoder_impls(net),
             "params": sum(p.numel() for p in net.parameters())}
    return trainer_step(net, optimizer, x, y, cfg.bf16), facts


def trainer_step(net, optimizer, x, y, bf16: bool):
    """One training step as the trainer takes it (the local-learning step, then SGD's), as a
    function of nothing: what gpu_check times for every row."""
    from contsup.step import local_learning_step

    def one_step():
        local_learning_step(net.train(), x, y, None, bf16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return one_step


def cpu_ratios(model: str, path: Path = CPU_RESULTS) -> dict | None:
    """bench_wrap's R1E K=4 against E2E for `model` on the CPU (its JSON), if recorded."""
    try:
        judged = json.loads(path.read_text())["targets"]["judged"][model]
    except (OSError, KeyError, ValueError):
        return None
    return {"ratios": judged["R1E_K4_vs_E2E"], "targets": {k: v["target"] for k, v in judged.get("targets", {}).items()}}


def wrap_ratios(rows: list, cpu_path: Path = CPU_RESULTS) -> dict:
    """Per model: R1E at WRAP_K over E2E, step time and max_memory_allocated (None where
    either row has no timed steps), with the CPU's ratios and targets beside them."""
    out = {}
    for model in WRAP_MODELS:
        got = {r["mode"]: r for r in rows if r.get("model") == model and "step_s" in r and "mode" in r}
        e2e, r1e = got.get("E2E"), got.get("R1E")
        both = e2e is not None and r1e is not None
        out[model] = {"time": r1e["step_s"] / e2e["step_s"] if both else None,
                      "memory": r1e["max_memory_allocated"] / e2e["max_memory_allocated"] if both else None,
                      "cpu": cpu_ratios(model, cpu_path)}
    return out


def equality_text(r: dict) -> str:
    if "error" in r:
        return f"R0 eval failed: {r['error'][:80]}"
    return (f"R0 eval {'torch.equal' if r['equal'] else 'not equal'} to the model's "
            f"(max abs diff {r['max_abs_diff']:.2g}, logits up to {r['max_abs_logit']:.2g})")


def _step_text(r: dict) -> str:
    what = f"{r['mode']}" + (f" K={r['k']} ({r['context_impl']} encoders)" if r["mode"] != "E2E" else "")
    if "error" in r:
        return f"{what} failed: {r['error'][:80]}"
    if "step_s" not in r:
        return f"{what} stopped: {r.get('stopped', 'no timed step')}"
    return f"{what} {r['images_per_s']:.0f} images/s, {r['max_memory_allocated'] / 2**20:.0f} MB"


def _ratio_text(ratio: dict) -> str:
    if ratio["time"] is None:
        return "R1E/E2E: not both measured"
    text = f"R1E/E2E step time {ratio['time']:.2f}x, max_memory_allocated {ratio['memory']:.2f}x"
    cpu = ratio.get("cpu")
    if cpu:
        r, t = cpu["ratios"], cpu["targets"]
        clock = "train_step_time" if "train_step_time" in r else "time"   # an older JSON: fwd+bwd only
        text += (f" (CPU, bench_wrap: {'step' if clock == 'time' else 'training step'} time {r[clock]:.2f}x, "
                 f"activation memory {r['memory']:.2f}x"
                 + (f"; targets <= {t.get(clock, t.get('time'))}x, <= {t.get('memory')}x" if t else "") + ")")
    return text


def wrap_line(w: dict) -> str | None:
    """One line per wrapped model of a gpu_check result's `wrap` section."""
    if "rows" not in w:
        return None
    lines = []
    for model in WRAP_MODELS:
        rows = [r for r in w["rows"] if r.get("model") == model or r.get("name", "").startswith(model + " ")]
        if not rows:
            continue
        parts = [equality_text(r) if r.get("check") == "R0 eval" or r["name"].endswith("R0 eval") else
                 _step_text(r) if "mode" in r else f"{r['name']} failed: {r.get('error', '')[:80]}" for r in rows]
        if w.get("ratios", {}).get(model):
            parts.append(_ratio_text(w["ratios"][model]))
        lines.append(f"- wrap {model}, batch {w['batch']}, float32: " + "; ".join(parts))
    return "\n".join(lines) if lines else None
