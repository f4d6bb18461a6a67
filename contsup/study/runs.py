"""Run folders: train a list of them, find the finished ones, read them into one table.

A run lives in `<results_dir>/runs/<name>/` (config.json, metrics.jsonl, ckpt.pt,
result.json; error.json when it failed). This module sits below both the study notebooks
(information) and the report, so both find runs the same way and neither imports the other.

    notebook_jobs / train_jobs      what notebooks/02_train.ipynb trains, one run after another
    collect(results_dir)            one row per finished run: config + result fields
    collect_or_demo(results_dir)    the same, training a small demo set first when there is none
    motivation_runs(results_dir)    {method: folder} of the runs the information study compares
"""
from __future__ import annotations

import json
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import jsonio, tables
from ..errors import DivergedError, UsageError
from ..provenance import FACTS
from ..runlock import RunFolderBusy
from ..train import TrainConfig, train
from . import experiments

PAPER_DATASETS = ("cifar10", "stl10", "svhn")
MiB = 2 ** 20

# Columns every collect() frame has, even an empty one (what the tables select on).
CONFIG_COLUMNS = ["dataset", "arch", "k", "mode", "loss", "head", "reconstruct", "loss_scales", "balanced",
                  "widen", "epochs", "batch_size", "lr", "warmup_epochs", "train_subset", "seed"]
RESULT_COLUMNS = ["final_error", "best_error", "best_epoch", "peak_activation_bytes", "cuda_peak_bytes",
                  "paper_memory_bytes", "peak_activation_MiB", "cuda_peak_MiB", "paper_memory_MiB", "params_backbone", "params_local_heads",
                  "params_context_encoders", "params_decoders", "n_cuts", "train_seconds", "images_per_s",
                  "device", *FACTS, "mixed_facts"]
COLUMNS = ["run", "run_dir", "paper_dataset", "paper_arch", "groups", "method", *CONFIG_COLUMNS, *RESULT_COLUMNS]




# --------------------------------------------------------------------------------------
# Training a list of runs (notebooks/02_train.ipynb)
def notebook_jobs(config: dict, out_dir: str | None, runs: list | None = None) -> list[TrainConfig]:
    """The configs a 02_train execution trains: the `runs` handed in by `reproduce`, else
    the single `config` in `out_dir` (None: a folder named after the run, `run_name`, in a
    fresh temporary folder: what the notebook shows is the run's name, not a temporary path)."""
    if runs:
        if not isinstance(runs, (list, tuple)):
            raise UsageError(f"runs must be a list of config dicts, got {type(runs).__name__}")
        jobs = []
        for i, c in enumerate(runs):
            try:
                jobs.append(TrainConfig.from_dict(c))
            except UsageError as e:  # which run of the list, by its folder when it has one
                where = c.get("out_dir") if isinstance(c, dict) else None
                raise UsageError(f"runs[{i}]{f' ({where})' if where else ''}: {e}") from None
        return jobs
    cfg = TrainConfig.from_dict({**config, "out_dir": out_dir or "."})
    if out_dir is None:
        cfg = TrainConfig.from_dict({**config, "out_dir": str(Path(tempfile.mkdtemp(prefix="contsup-02_train-"))
                                                             / experiments.run_name(cfg))})
    return [cfg]


def train_jobs(cfgs, progress: bool = True) -> dict[str, dict]:
    """Train (or resume, or load) each config; a failure is recorded in `<run>/error.json`
    and in the returned dict ({'error': ...}) instead of stopping the others. A run folder
    another process holds (RunFolderBusy) is passed over and left alone -- {'error': ...,
    'busy': True}, not a failure: `reproduce` waits for that process and takes its result."""
    results = {}
    for cfg in cfgs:
        name = Path(cfg.out_dir).name
        try:
            results[name] = train(cfg, resume=True, progress=progress)
            (Path(cfg.out_dir) / "error.json").unlink(missing_ok=True)
        except RunFolderBusy as e:  # nothing is written into a folder another process writes
            results[name] = {"error": str(e), "busy": True}
            print(f"{name}: passed over: {e}")
        except Exception as e:
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            record = {"error": error}
            if isinstance(e, DivergedError):  # keep the trainer's error.json (epoch, step, module, losses)
                path = Path(cfg.out_dir) / "error.json"
                record |= jsonio.loads_strict(path.read_text()) if path.exists() else e.as_dict()
            jsonio.save(Path(cfg.out_dir) / "error.json", record | {"traceback": traceback.format_exc()})
            results[name] = {"error": error}
            print(f"{name}: FAILED: {error}")
    return results


def failures(results: dict) -> dict[str, str]:
    """{run: error} of the runs that failed (a run another process holds is no failure)."""
    return {name: r["error"] for name, r in results.items() if "error" in r and not r.get("busy")}


# --------------------------------------------------------------------------------------
# Finding and reading finished runs
def run_dirs(results_dir) -> list[Path]:
    """Run folders under `<results_dir>/runs/` (or directly under results_dir), finished or not."""
    root = Path(results_dir)
    base = root / "runs" if (root / "runs").is_dir() else root
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir()
                  if p.is_dir() and ((p / "config.json").exists() or (p / "result.json").exists()))


def _scales_key(scales):
    return None if scales is None else tuple(round(float(v), 6) for v in scales)


def infer_paper_dataset(cfg: dict) -> str:
    """Which dataset of the paper a run stands for, from its config alone.

    Real data sets stand for themselves. A stand-in (digits) stands for CIFAR-10, except a
    reconstruction run whose loss scales are those of another data set's table (Table 3
    trains STL-10's and SVHN's scales on digits under the quick profile).
    """
    dataset = cfg.get("dataset")
    if dataset in PAPER_DATASETS:
        return dataset
    scales = _scales_key(cfg.get("loss_scales"))
    if cfg.get("reconstruct") and scales is not None:
        tables_ = tables.BALANCED_LOSS_SCALES if cfg.get("balanced") else tables.LOSS_SCALES
        for data in PAPER_DATASETS:
            if _scales_key(tables_.get((cfg.get("arch"), data), {}).get(cfg.get("k"))) == scales:
                return data
    return "cifar10"


def method_label(cfg: dict) -> str:
    """E2E, R0, E, R1E ..., with '+recon' and '*' (memory-balanced cuts) where they apply."""
    if cfg.get("k") == 1:
        return "E2E"
    return cfg["mode"] + ("*" if cfg.get("balanced") else "") + (" +recon" if cfg.get("reconstruct") else "")


def _registry(results_dir, profile):
    """{run name: (groups, paper_dataset, paper_arch)} from the experiment registry, or {}
    (no profile, or one the registry does not know: the configs tell instead)."""
    if profile not in experiments.PROFILES:
        return {}
    by_group = experiments.runs_by_group(profile, results_dir)
    out: dict[str, tuple] = {}
    for group, runs in by_group.items():
        for r in runs:
            groups = out.get(r.name, ((), r.paper_dataset, r.paper_arch))[0]
            out[r.name] = (groups + (group,), r.paper_dataset, r.paper_arch)
    return out


def _mean_images_per_s(path: Path):
    if not path.exists():
        return np.nan
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return float(np.mean([r["images_per_s"] for r in rows])) if rows else np.nan


def collect(results_dir, profile: str | None = None) -> pd.DataFrame:
    """One row per finished run (a folder with result.json): every config field, every
    result field, peak memory in MiB, parameter counts per part, mean images/s, and the
    facts that made it (provenance.FACTS: torch, device, threads, commit; `mixed_facts`:
    a resume changed them, result.json's facts_by_part says from which epoch).

    Two memories per run: `peak_activation_MiB`, the activations of the path that ran (our
    lean encoders by default), and `paper_memory_MiB`, training memory as the paper counts it
    on a GPU (parameters + gradients + SGD momentum + the authors' plain encoders'
    activations; train.measure_step_memory). Only the second stands beside the paper's
    numbers; it is NaN (shown "—") for runs written before it was recorded.

    With `profile`, the experiment registry names each run's groups and the paper entry it
    stands for; without, those are inferred from the config (`infer_paper_dataset`).
    """
    registry = _registry(results_dir, profile)
    rows = []
    for d in run_dirs(results_dir):
        if not (d / "result.json").exists():
            continue
        try:
            result = json.loads((d / "result.json").read_text())
        except json.JSONDecodeError:  # being written right now: not finished for us
            continue
        cfg = result.get("config") or json.loads((d / "config.json").read_text())
        groups, paper_dataset, paper_arch = registry.get(d.name, ((), infer_paper_dataset(cfg), cfg.get("arch")))
        row = {"run": d.name, "run_dir": str(d), "paper_dataset": paper_dataset, "paper_arch": paper_arch,
               "groups": ",".join(groups), "method": method_label(cfg)}
        row.update(cfg)
        row["loss_scales"] = _scales_key(cfg.get("loss_scales"))
        for key in ("final_error", "best_error", "best_epoch", "peak_activation_bytes", "cuda_peak_bytes",
                    "paper_memory_bytes", "train_seconds", "device", *FACTS):  # a result.json older than a key: NaN
            row[key] = result.get(key)
        row["mixed_facts"] = "facts_by_part" in result   # its epochs ran under more than one set of facts
        for part, n in (result.get("params") or {}).items():
            row[f"params_{part}"] = n
        row["n_cuts"] = len(result.get("cuts") or [])
        row["images_per_s"] = _mean_images_per_s(d / "metrics.jsonl")
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=object if col in ("run", "run_dir", "dataset", "mode", "loss") else float)
    for col in ("peak_activation_bytes", "cuda_peak_bytes", "paper_memory_bytes", "final_error", "best_error"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["peak_activation_MiB"] = df["peak_activation_bytes"] / MiB
    df["cuda_peak_MiB"] = df["cuda_peak_bytes"] / MiB
    df["paper_memory_MiB"] = df["paper_memory_bytes"] / MiB
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extra].reset_index(drop=True)


def collect_or_demo(results_dir, profile: str | None = None, progress: bool = False) -> pd.DataFrame:
    """`collect`; when `<results_dir>/runs` holds no run at all, first train a small demo set
    there (E2E and K=4 R0/E/R1E on the embedded digits, seconds each, named `demo-...` so
    that they never pass for a registry run): what lets the notebooks run on their own."""
    df = collect(results_dir, profile)
    if df.empty and not has_runs(results_dir):
        print(f"note: no runs in {results_dir}; training a small demo set there "
              f"(E2E and K=4 R0/E/R1E on digits) so that there is something to show.")
        train_demo_runs(Path(results_dir) / "runs", progress=progress)
        df = collect(results_dir, profile)
    elif df.empty:
        print(f"note: no finished runs in {results_dir} yet; the tables and figures below are empty.")
    return df


def has_runs(results_dir) -> bool:
    """Whether `<results_dir>/runs` holds any run folder, finished or not."""
    runs = Path(results_dir) / "runs"
    return runs.is_dir() and any(p.is_dir() for p in runs.iterdir())


def pick_dataset(df: pd.DataFrame, paper_dataset: str = "cifar10", dataset: str | None = None) -> str | None:
    """The trained dataset standing for `paper_dataset`: the real one if present, else the
    stand-in with the most runs; `dataset` forces a choice."""
    if dataset is not None:
        return dataset
    rows = df[df["paper_dataset"] == paper_dataset]
    if rows.empty:
        return None
    if (rows["dataset"] == paper_dataset).any():
        return paper_dataset
    return rows["dataset"].value_counts().index[0]


# --------------------------------------------------------------------------------------
# The runs the information study compares (notebook 01)
def method_name(cfg: dict) -> str:
    """E2E, GLL (R0) or ContSup <mode> (the labels of the motivation figure)."""
    if cfg["k"] == 1:
        return "E2E"
    if cfg["mode"] == "R0":
        return "GLL (R0)"
    return f"ContSup {cfg['mode']}"


MOTIVATION_MODES = experiments.MOTIVATION_MODES


def find_motivation_runs(results_dir, k: int | None = None, dataset: str | None = None,
                         arch: str = "resnet32") -> dict[str, Path]:
    """{method: run folder} of finished softmax runs E2E, R0, E, R1E (equal-layer cuts, no
    reconstruction) of one arch/dataset in `<results_dir>/runs`. K: the given one, else the
    registry's MOTIVATION_K when R0/E/R1E are all finished there, else the K with most of
    them finished (ties: the larger K). Missing methods are left out."""
    df = collect(results_dir)
    dataset = pick_dataset(df, "cifar10", dataset)
    if dataset is None:
        return {}
    base = df[(df["dataset"] == dataset) & (df["arch"] == arch) & (df["loss"] == "softmax")
              & (df["reconstruct"] == False) & (df["balanced"] == False)]  # noqa: E712
    local = base[(base["k"] > 1) & base["mode"].isin(MOTIVATION_MODES)]
    if k is None and not local.empty:
        counts = local.groupby("k")["mode"].nunique()
        if counts.get(experiments.MOTIVATION_K, 0) == len(MOTIVATION_MODES):  # the registry's K, when complete
            k = experiments.MOTIVATION_K
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


def train_demo_runs(out_dir, *, k: int = 4, modes=("E2E", *MOTIVATION_MODES), dataset: str | None = None,
                    arch: str = "resnet32", epochs: int | None = None, train_subset: int | None = None,
                    batch_size: int = 32, lr: float = 0.05, threads: int | None = 1,
                    progress: bool = False) -> dict[str, Path]:
    """Train (or load, when finished) small softmax runs into `<out_dir>/demo-<...>`: what the
    notebooks use when run on their own.
    Sized to take seconds per run on a CPU: 3 epochs of 512 images at 8x8, 1 epoch of 64
    at 32x32 (unless given). Returns {method: run folder}."""
    dataset = dataset or experiments.stand_in_dataset()
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
    found = find_motivation_runs(results_dir, k)
    wanted = ["E2E"] + [method_name({"k": 2, "mode": m}) for m in MOTIVATION_MODES]
    if all(m in found for m in wanted) or not train_missing:
        return found
    target = Path(results_dir) / ("motivation/demo-runs" if has_runs(results_dir) else "runs")
    print(f"note: {results_dir} lacks finished runs for {[m for m in wanted if m not in found]}; "
          f"using small demo runs in {target} instead (trained now if missing).")
    return train_demo_runs(target, k=k or 4, progress=progress)


def dataset_of(runs: dict) -> str | None:
    """The trained dataset of the study's runs (from the first run's config)."""
    for run_dir in runs.values():
        return json.loads((Path(run_dir) / "config.json").read_text())["dataset"]
    return None


@contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
