"""The motivation study (SPEC §1, §6): how much a trained network's hidden features h still
know about the input x and the label y, layer by layer.

Greedy local learning is said to throw information about x away layer after layer faster
than end-to-end training, while pushing information about y up too early; context supply
should give later modules x-information back. Both mutual informations are estimated with
the usual proxies (InfoPro, Wang et al. 2021), on features taken from the frozen network
(eval mode, context composed exactly as in `ContSupNet.forward`):

- I(h, x): a small decoder of the paper's reconstruction shape (bilinear upsample to the
  image size, conv3x3(C->12)+BN+ReLU, conv3x3(12->3), BCE against the image in [0,1]) is
  trained on frozen h; its reconstruction PSNR (dB) on held-out test images is reported.
- I(h, y): a linear probe (global average pool, then a linear classifier, L-BFGS on the
  cross-entropy) is trained on frozen h; its test accuracy (%) is reported.

Layer 0 is the (normalised) input image itself, the reference both proxies start from;
layers 1..L are the outputs of the stem and of every residual block.

    layerwise_information(run_dir, data, budget)  -> one dict per layer
    study(results_dir, runs, budget)              -> DataFrame, cached in <results_dir>/motivation/information.csv
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import jsonio, tables
from .data import ImageData, denormalize, load_dataset, normalize
from .errors import UsageError
from .model import ContSupNet, Decoder, feature_shape


@dataclass(frozen=True)
class Budget:
    """How hard the two proxies are trained. The decoder dominates the cost: about
    decoder_steps x decoder_batch images through a conv3x3 at image resolution, per layer."""
    n_train: int = 512          # images the decoders and probes are fitted on
    n_test: int = 256           # held-out test images they are scored on
    decoder_steps: int = 150    # Adam steps per decoder
    decoder_batch: int = 32
    decoder_lr: float = 1e-2
    probe_steps: int = 100      # L-BFGS iterations per probe (full batch)
    probe_l2: float = 1e-3      # weight decay of the probe
    layer_stride: int = 1       # study every n-th layer (the input and the last layer always)
    threads: int | None = 1     # CPU threads while fitting (None: leave torch's setting). These
                                # convs are too small to gain from more, and oversubscribed
                                # threads on a shared CPU cost 10x or more.
    seed: int = 0


# Per profile, sized for a 2-core CPU and four ResNet-32 runs: 32x32 inputs (digits, CIFAR
# size) cost 16x more per decoder step than 8x8 ones (digits8), which get their own budgets.
# Measured (shared 2-core CPU, 8x8): smoke ~15 s, quick ~50 s for the four runs.
BUDGETS = {
    "smoke": Budget(n_train=96, n_test=64, decoder_steps=20, decoder_batch=16, probe_steps=50, layer_stride=3),
    "quick": Budget(n_train=256, n_test=200, decoder_steps=60, probe_steps=100),
    "paper": Budget(n_train=10_000, n_test=5_000, decoder_steps=2_000, decoder_batch=128, probe_steps=300,
                    threads=None),
}
SMALL_IMAGE_BUDGETS = {
    "smoke": Budget(n_train=128, n_test=100, decoder_steps=40, decoder_batch=16, probe_steps=50),
    "quick": Budget(n_train=256, n_test=200, decoder_steps=240, probe_steps=100),
}


def budget_for(profile: str | None, dataset: str | None = None, **overrides) -> Budget:
    """The budget of a profile (quick when unknown) for images of `dataset` (16x16 or less:
    SMALL_IMAGE_BUDGETS); fields given in `overrides` (not None) win."""
    profile = profile if profile in BUDGETS else "quick"
    small = dataset is not None and tables.DATA_RECIPES[dataset].image_size <= 16
    base = SMALL_IMAGE_BUDGETS.get(profile, BUDGETS[profile]) if small else BUDGETS[profile]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------
# Loading a trained network and naming its layers
def load_run(run_dir, device="cpu") -> tuple[ContSupNet, dict]:
    """The trained network of a run folder (ckpt.pt + config.json), in eval mode, and its config."""
    from .train import TrainConfig, load_checkpoint
    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "config.json", run_dir / "ckpt.pt"
    if not cfg_path.exists() or not ckpt_path.exists():
        raise UsageError(f"{run_dir} holds no trained run (config.json and ckpt.pt are needed)")
    cfg = json.loads(cfg_path.read_text())
    net = ContSupNet(TrainConfig.from_dict(cfg).model_config())
    net.load_state_dict(load_checkpoint(ckpt_path)["model"])
    return net.to(device).eval(), cfg


def layer_table(net: ContSupNet) -> list[dict]:
    """Every backbone layer in forward order: (stage, block), the module it belongs to, the
    layer object, and whether a cut follows it (the module's output feeds a context supply)."""
    rows = []
    for m, (labels, block) in enumerate(zip(net.module_labels, net.blocks)):
        for i, ((stage, b), layer) in enumerate(zip(labels, block)):
            rows.append({"stage": stage, "block": b, "module": m, "layer": layer,
                         "is_cut": i == len(block) - 1 and m < len(net.blocks) - 1,
                         "name": "stem" if stage == 0 else f"s{stage}b{b}"})
    return rows


@torch.no_grad()
def extract_features(net: ContSupNet, x: torch.Tensor, layers: list[nn.Module], batch_size: int = 256):
    """Outputs of `layers` for normalised images x [N,3,S,S], from the frozen net's own
    forward (eval mode, context included): a list of [N, C, H, W] tensors on the CPU."""
    net.eval()
    store: dict[int, list] = {i: [] for i in range(len(layers))}
    hooks = [layer.register_forward_hook(lambda _m, _in, out, i=i: store[i].append(out.detach().cpu()))
             for i, layer in enumerate(layers)]
    device = next(net.parameters()).device
    try:
        for i in range(0, len(x), batch_size):
            net(x[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(store[i]) for i in range(len(layers))]


# --------------------------------------------------------------------------------------
# The two proxies
def psnr_db(mse: float) -> float:
    """PSNR of images in [0,1]: 10 log10(1 / MSE)."""
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def decoder_psnr(h_train, img_train, h_test, img_test, budget: Budget, seed: int = 0, device="cpu") -> float:
    """I(h,x) proxy: fit the paper's reconstruction decoder on frozen h (BCE vs the image in
    [0,1]) and return its PSNR (dB) on the test images (from the mean squared error).
    Tensors may stay on the CPU; batches go to `device`."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dec = Decoder(h_train.shape[1], img_train.shape[-1]).to(device)
    opt = torch.optim.Adam(dec.parameters(), lr=budget.decoder_lr)
    dec.train()
    for _ in range(budget.decoder_steps):
        idx = torch.randint(0, len(h_train), (min(budget.decoder_batch, len(h_train)),), generator=gen)
        loss = F.binary_cross_entropy_with_logits(dec(h_train[idx].to(device)), img_train[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dec.eval()
    with torch.no_grad():
        sq = sum(((torch.sigmoid(dec(h_test[i:i + 256].to(device))) - img_test[i:i + 256].to(device)) ** 2)
                 .sum().item() for i in range(0, len(h_test), 256))
    return psnr_db(sq / img_test.numel())


def probe_accuracy(h_train, y_train, h_test, y_test, num_classes: int, budget: Budget, seed: int = 0) -> float:
    """I(h,y) proxy: global average pool, standardise, linear classifier fitted by L-BFGS
    (full batch, small L2); test accuracy in %."""
    z_train, z_test = h_train.mean((2, 3)).double(), h_test.mean((2, 3)).double()  # [N, C]
    mu, sd = z_train.mean(0), z_train.std(0).clamp_min(1e-6)
    z_train, z_test = (z_train - mu) / sd, (z_test - mu) / sd
    torch.manual_seed(seed)
    probe = nn.Linear(z_train.shape[1], num_classes).double()
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=budget.probe_steps,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(z_train), y_train) + budget.probe_l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * (probe(z_test).argmax(1) == y_test).double().mean().item()


def _fixed_subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:min(n, n_total)]


@contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layerwise_information(run_dir, data: ImageData | None = None, budget: Budget | None = None,
                          include_input: bool = True, device="auto", max_feature_bytes: float = 1.5e9,
                          progress: bool = False) -> list[dict]:
    """For the trained run in `run_dir`, one dict per layer (input image first, then the stem
    and every residual block): layer_index, depth_fraction, stage, block, module, name,
    is_cut, channels, side, psnr_db, probe_accuracy.

    `data` defaults to the run's own dataset; `device`: cpu, cuda, auto... Features are kept
    on the CPU, in chunks of layers whose stored features stay under `max_feature_bytes`
    (each chunk costs one forward pass); decoders train on `device`, probes on the CPU.
    """
    from .train import pick_device
    budget = budget or Budget()
    device = pick_device(str(device))
    with _threads(budget.threads if device.type == "cpu" else None):
        return _layerwise_information(run_dir, data, budget, include_input, device, max_feature_bytes, progress)


def _layerwise_information(run_dir, data, budget, include_input, device, max_feature_bytes, progress):
    net, cfg = load_run(run_dir, device)
    data = data or load_dataset(cfg["dataset"], _data_root(cfg.get("data_root", "data")))
    recipe = tables.DATA_RECIPES[cfg["dataset"]]
    tr = _fixed_subset(len(data.train_x), budget.n_train, budget.seed)
    te = _fixed_subset(len(data.test_x), budget.n_test, budget.seed)
    x_train, x_test = normalize(data.train_x[tr], recipe), normalize(data.test_x[te], recipe)
    y_train, y_test = data.train_y[tr], data.test_y[te]
    img_train, img_test = denormalize(x_train.clone(), recipe), denormalize(x_test.clone(), recipe)

    layers = layer_table(net)
    n_layers = len(layers)
    for i, r in enumerate(layers):
        r["index"] = i + 1
    layers_kept = [r for r in layers if r["index"] % budget.layer_stride == 0 or r["index"] == n_layers]
    todo = ([{"stage": -1, "block": -1, "module": -1, "layer": None, "is_cut": False, "name": "input", "index": 0}]
            if include_input else []) + layers_kept
    per_image = [4 * (3 * recipe.image_size ** 2 if r["layer"] is None else
                      math.prod(_shape(r["stage"], recipe.image_size))) for r in todo]
    rows, chunk, used = [], [], 0.0
    n_images = len(x_train) + len(x_test)

    def flush():
        feats = iter(extract_features(net, torch.cat([x_train, x_test]),
                                      [r["layer"] for r in chunk if r["layer"] is not None]))
        for r in chunk:
            h = torch.cat([x_train, x_test]) if r["layer"] is None else next(feats)
            index = r["index"]
            t0 = time.perf_counter()
            h_train, h_test = h[:len(x_train)], h[len(x_train):]
            row = {k: r[k] for k in ("stage", "block", "module", "name", "is_cut")}
            row.update(layer_index=index, depth_fraction=index / n_layers, channels=h.shape[1], side=h.shape[-1],
                       psnr_db=decoder_psnr(h_train, img_train, h_test, img_test, budget, budget.seed + index,
                                            device),
                       probe_accuracy=probe_accuracy(h_train, y_train, h_test, y_test, recipe.num_classes,
                                                     budget, budget.seed + index))
            rows.append(row)
            if progress:
                print(f"  layer {index:3d} {row['name']:>6}: PSNR {row['psnr_db']:5.2f} dB, probe "
                      f"{row['probe_accuracy']:5.1f}% ({time.perf_counter() - t0:.1f}s)", flush=True)
        chunk.clear()

    for r, b in zip(todo, per_image):
        if chunk and used + b * n_images > max_feature_bytes:
            flush()
            used = 0.0
        chunk.append(r)
        used += b * n_images
    if chunk:
        flush()
    columns = ["layer_index", "depth_fraction", "stage", "block", "module", "name", "is_cut", "channels", "side",
               "psnr_db", "probe_accuracy"]
    return [{c: row[c] for c in columns} for row in rows]


def _data_root(root: str) -> str:
    """A relative data root as the run saw it, or else relative to the repository (the
    notebooks run from notebooks/)."""
    if Path(root).is_dir() or Path(root).is_absolute():
        return root
    repo = Path(__file__).resolve().parents[1] / root
    return str(repo) if repo.is_dir() else root


def _shape(stage: int, image_size: int) -> tuple[int, int, int]:
    c, side = feature_shape(stage, image_size)
    return c, side, side


# --------------------------------------------------------------------------------------
# The study over several runs
def method_name(cfg: dict) -> str:
    """E2E, GLL (R0) or ContSup <mode> (the labels of the motivation figure)."""
    if cfg["k"] == 1:
        return "E2E"
    if cfg["mode"] == "R0":
        return "GLL (R0)"
    return f"ContSup {cfg['mode']}"


MOTIVATION_MODES = ("R0", "E", "R1E")


def find_motivation_runs(results_dir, k: int | None = None, dataset: str | None = None,
                         arch: str = "resnet32") -> dict[str, Path]:
    """{method: run folder} of finished softmax runs E2E, R0, E, R1E (equal-layer cuts, no
    reconstruction) of one arch/dataset in `<results_dir>/runs`. K: the given one, else the
    registry's MOTIVATION_K when R0/E/R1E are all finished there, else the K with most of
    them finished (ties: the larger K). Missing methods are left out."""
    from . import report
    df = report.collect(results_dir)
    dataset = report.pick_dataset(df, "cifar10", dataset)
    if dataset is None:
        return {}
    base = df[(df["dataset"] == dataset) & (df["arch"] == arch) & (df["loss"] == "softmax")
              & (df["reconstruct"] == False) & (df["balanced"] == False)]  # noqa: E712
    local = base[(base["k"] > 1) & base["mode"].isin(MOTIVATION_MODES)]
    if k is None and not local.empty:
        counts = local.groupby("k")["mode"].nunique()
        try:  # the registry's K for this study, when all its modes are there
            from .experiments import MOTIVATION_K
        except Exception:
            MOTIVATION_K = None
        if counts.get(MOTIVATION_K, 0) == len(MOTIVATION_MODES):
            k = MOTIVATION_K
        else:
            k = int(max(counts.index, key=lambda kk: (counts[kk], kk)))
    out = {}
    e2e = base[base["k"] == 1].sort_values("run")
    if not e2e.empty:
        out["E2E"] = Path(e2e["run_dir"].iloc[0])
    for mode in MOTIVATION_MODES:
        sel = local[(local["k"] == k) & (local["mode"] == mode)].sort_values("run")
        if not sel.empty:
            out[method_name({"k": k, "mode": mode})] = Path(sel["run_dir"].iloc[0])
    return out


def stand_in_dataset() -> str:
    """The embedded data set demo runs train on: 8x8 digits when available (16x cheaper)."""
    return "digits8" if "digits8" in tables.DATA_RECIPES else "digits"


def train_demo_runs(out_dir, k: int = 4, modes=("E2E", *MOTIVATION_MODES), dataset: str | None = None,
                    arch: str = "resnet32", epochs: int | None = None, train_subset: int | None = None,
                    batch_size: int = 32, lr: float = 0.05, threads: int | None = 1,
                    progress: bool = False) -> dict[str, Path]:
    """Train (or load, when finished) small softmax runs into `<out_dir>/demo-<...>`: what the
    notebooks use when run on their own.
    Sized to take seconds per run on a CPU: 3 epochs of 512 images at 8x8, 1 epoch of 64
    at 32x32 (unless given). Returns {method: run folder}."""
    from .train import TrainConfig, train
    dataset = dataset or stand_in_dataset()
    small = tables.DATA_RECIPES[dataset].image_size <= 16
    epochs = epochs or (3 if small else 1)
    train_subset = train_subset or (512 if small else 64)
    out = {}
    for mode in modes:
        kk = 1 if mode == "E2E" else k
        # "demo-": never the name of a registry run (whose folder `reproduce` would skip as done)
        name = f"demo-{dataset}-{arch}-" + ("K1-E2E" if kk == 1 else f"K{kk}-{mode}-softmax")
        cfg = TrainConfig(dataset=dataset, arch=arch, k=kk, mode="R0" if kk == 1 else mode, loss="softmax",
                          epochs=epochs, warmup_epochs=0, batch_size=batch_size, lr=lr, train_subset=train_subset,
                          out_dir=str(Path(out_dir) / name), device="cpu", seed=0)
        with _threads(threads):  # one thread: these nets are tiny, and a shared CPU punishes more
            train(cfg, resume=True, progress=progress)
        out[method_name({"k": kk, "mode": cfg.mode})] = Path(cfg.out_dir)
    return out


def motivation_runs(results_dir, k: int | None = None, train_missing: bool = True,
                    progress: bool = False) -> dict[str, Path]:
    """{method: run folder} for the study: E2E, GLL (R0), ContSup E and R1E from
    `<results_dir>/runs` (`find_motivation_runs`). When some are missing and
    `train_missing`, small demo runs are trained instead (`train_demo_runs`): into
    `<results_dir>/runs` when that holds no run at all (the tables and figures notebooks
    then use them too), else apart, into `<results_dir>/motivation/demo-runs`."""
    from . import report
    found = find_motivation_runs(results_dir, k)
    wanted = ["E2E"] + [method_name({"k": 2, "mode": m}) for m in MOTIVATION_MODES]
    if all(m in found for m in wanted) or not train_missing:
        return found
    target = Path(results_dir) / ("motivation/demo-runs" if report.has_runs(results_dir) else "runs")
    print(f"note: {results_dir} lacks finished runs for {[m for m in wanted if m not in found]}; "
          f"using small demo runs in {target} instead (trained now if missing).")
    return train_demo_runs(target, k=k or 4, progress=progress)


def dataset_of(runs: dict) -> str | None:
    """The trained dataset of the study's runs (from the first run's config)."""
    for run_dir in runs.values():
        return json.loads((Path(run_dir) / "config.json").read_text())["dataset"]
    return None


def _cache_valid(csv: Path, run_dirs: dict, budget: Budget) -> bool:
    if not csv.exists():
        return False
    newest = max((Path(d) / "ckpt.pt").stat().st_mtime for d in run_dirs.values())
    if csv.stat().st_mtime < newest:
        return False
    cached = pd.read_csv(csv)
    if set(zip(cached["method"], cached["run_dir"].astype(str))) != {(m, str(d)) for m, d in run_dirs.items()}:
        return False
    return "budget" in cached and (cached["budget"] == _budget_key(budget)).all()


def _budget_key(budget: Budget) -> str:
    return jsonio.dumps(asdict(budget), sort_keys=True)


def study(results_dir, runs=None, budget: Budget | None = None, data: ImageData | None = None,
          device="auto", force: bool = False, progress: bool = False) -> pd.DataFrame:
    """The information study over several runs, one row per (run, layer), written to (and,
    when newer than every checkpoint and made with the same runs and budget, read back
    from) `<results_dir>/motivation/information.csv`.

    runs: {method: run folder}, or a list of run names/folders (method from the config), or
    None = `find_motivation_runs(results_dir)`.
    """
    budget = budget or Budget()
    results_dir = Path(results_dir)
    if runs is None:
        runs = find_motivation_runs(results_dir)
    if not isinstance(runs, dict):
        folders = [Path(r) if Path(r).is_dir() else results_dir / "runs" / str(r) for r in runs]
        runs = {method_name(json.loads((f / "config.json").read_text())): f for f in folders}
    runs = {m: Path(d).resolve() for m, d in runs.items()}
    columns = ["method", "run", "run_dir", "dataset", "arch", "k", "mode", "test_error", "layer_index",
               "depth_fraction", "stage", "block", "module", "name", "is_cut", "channels", "side", "psnr_db",
               "probe_accuracy"]
    if not runs:
        return pd.DataFrame(columns=columns)
    csv = results_dir / "motivation" / "information.csv"
    if not force and _cache_valid(csv, runs, budget):
        return pd.read_csv(csv)[columns]
    frames = []
    for method, run_dir in runs.items():
        t0 = time.perf_counter()
        cfg = json.loads((run_dir / "config.json").read_text())
        result_path = run_dir / "result.json"
        test_error = json.loads(result_path.read_text())["final_error"] if result_path.exists() else np.nan
        if progress:
            print(f"{method}: {run_dir.name}", flush=True)
        rows = layerwise_information(run_dir, data if data is not None and data.name == cfg["dataset"] else None,
                                     budget, device=device, progress=progress)
        frame = pd.DataFrame(rows)
        meta = {"method": method, "run": run_dir.name, "run_dir": str(run_dir), "dataset": cfg["dataset"],
                "arch": cfg["arch"], "k": cfg["k"], "mode": cfg["mode"] if cfg["k"] > 1 else "E2E",
                "test_error": test_error}
        for key, value in meta.items():
            frame[key] = value
        frames.append(frame[columns])
        if progress:
            print(f"  {time.perf_counter() - t0:.1f}s", flush=True)
    df = pd.concat(frames, ignore_index=True)
    csv.parent.mkdir(parents=True, exist_ok=True)
    df.assign(budget=_budget_key(budget)).to_csv(csv, index=False)
    return df


def load_study(results_dir) -> pd.DataFrame:
    """The cached study of `<results_dir>/motivation/information.csv`, or an empty frame."""
    csv = Path(results_dir) / "motivation" / "information.csv"
    return pd.read_csv(csv) if csv.exists() else pd.DataFrame()


def summary(info: pd.DataFrame) -> pd.DataFrame:
    """Per method, the numbers the argument is about: test error; reconstruction PSNR at
    the input, averaged over the layers after the first cut, and at the last layer; probe
    accuracy averaged over the first half of the layers and at the last layer."""
    if info.empty:
        return pd.DataFrame()
    cut_depths = info.loc[(info["is_cut"] == True) & (info["k"] > 1), "depth_fraction"]  # noqa: E712
    first_cut = float(cut_depths.min()) if len(cut_depths) else 0.0
    rows = {}
    for method, g in info.groupby("method", sort=False):
        g = g.sort_values("layer_index")
        after = g[g["depth_fraction"] > first_cut]
        first_half = g[(g["depth_fraction"] > 0) & (g["depth_fraction"] <= 0.5)]
        rows[method] = {"K": int(g["k"].iloc[0]), "test error (%)": g["test_error"].iloc[0],
                        "PSNR input (dB)": g["psnr_db"].iloc[0],
                        "PSNR after 1st cut (dB)": after["psnr_db"].mean(),
                        "PSNR last layer (dB)": g["psnr_db"].iloc[-1],
                        "probe 1st half (%)": first_half["probe_accuracy"].mean(),
                        "probe last layer (%)": g["probe_accuracy"].iloc[-1]}
    out = pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")
    order = [m for m in ("E2E", "GLL (R0)", "ContSup E", "ContSup R1E") if m in out.index]
    return out.loc[order + [m for m in out.index if m not in order]]


def describe(info: pd.DataFrame) -> str:
    """The curves in words (markdown): each method against E2E and against GLL (R0), on the
    layers after the first cut (x-information) and the first half (y-information)."""
    s = summary(info)
    if s.empty:
        return "No information-study results."
    lines = []
    def diff(method, ref, col, unit):
        return f"{s.loc[method, col] - s.loc[ref, col]:+.1f} {unit}"
    for ref in ("E2E", "GLL (R0)"):
        if ref not in s.index:
            continue
        for m in s.index:
            if m == ref or (ref == "GLL (R0)" and m == "E2E"):
                continue
            lines.append(f"- **{m}** vs {ref}: reconstruction PSNR after the first cut "
                         f"{diff(m, ref, 'PSNR after 1st cut (dB)', 'dB')}, at the last layer "
                         f"{diff(m, ref, 'PSNR last layer (dB)', 'dB')}; probe accuracy over the first half "
                         f"{diff(m, ref, 'probe 1st half (%)', 'points')}, at the last layer "
                         f"{diff(m, ref, 'probe last layer (%)', 'points')}; test error "
                         f"{diff(m, ref, 'test error (%)', 'points')}.")
    return "\n".join(lines)
