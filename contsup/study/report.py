"""Tables and figures of the paper from finished run folders (SPEC §6, §7).

    collect(results_dir)           -> one row per finished run (config + result fields)
    table1..table4(df)             -> the paper's tables: ours | published reference | ContSup paper
    figure4 / figure5 / table4_chart / motivation_figure(..., figures_dir) -> written PNG+PDF paths

Everything is read from `<results_dir>/runs/<name>/{config.json, result.json}`; the config
says what was trained. Runs of the quick/smoke profiles train a stand-in data set (digits)
in place of CIFAR-10/SVHN/STL-10: `paper_dataset` says which entry of the paper a run
stands for (from the experiment registry when the profile is known, else inferred from the
config), and the published numbers beside such runs are labelled "not comparable".

Every function accepts partial results: a missing run is a NaN cell or a missing point,
an empty results folder gives empty tables and figures that say so. Errors are test
errors in %, the mean over seeds when a config was trained more than once.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import tables
from ..data import random_batch
from ..errors import UsageError
from ..model import ContSupNet, ModelConfig, parse_mode
from ..speed.memory import measure_step_memory
from ..speed.setup import pick_device
from ..train import TrainConfig
from .runs import CONFIG_COLUMNS, PAPER_DATASETS, pick_dataset

KS = tables.KS
DATASET_NAMES = {"cifar10": "CIFAR-10", "svhn": "SVHN", "stl10": "STL-10"}
ARCH_NAMES = {"resnet32": "ResNet-32", "resnet110": "ResNet-110"}
CONTSUP_SLOT = "ContSup paper"
MISSING = "—"

def inventory(df: pd.DataFrame) -> pd.DataFrame:
    """The finished runs at a glance."""
    cols = ["run", "method", "paper_dataset", "dataset", "arch", "k", "loss", "epochs", "final_error", "best_error",
            "peak_activation_MiB", "paper_memory_MiB", "train_seconds"]
    return (df[cols].sort_values(["paper_dataset", "arch", "k", "method"]).set_index("run")
            .rename(columns={"peak_activation_MiB": "peak_activation_MiB", "paper_memory_MiB": "paper_memory_MiB"}))


# --------------------------------------------------------------------------------------
# Selecting and aggregating
def _sel(df: pd.DataFrame, **where) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for key, value in where.items():
        if isinstance(value, (list, tuple, set)):
            mask &= df[key].isin(list(value))
        else:
            mask &= df[key] == value
    return df[mask]


def _mean(df: pd.DataFrame, metric: str) -> float:
    values = pd.to_numeric(df[metric], errors="coerce").dropna()
    return float(values.mean()) if len(values) else np.nan


def _pick_arch(df: pd.DataFrame, want: str, arch: str | None) -> str:
    if arch is not None:
        return arch
    if df.empty or (df["arch"] == want).any():
        return want
    return df["arch"].value_counts().index[0]


def reference_label(dataset: str | None, paper_dataset: str, arch: str) -> str:
    """Column label of the InfoPro numbers (SPEC §7): comparable only on the paper's data."""
    setting = f"{DATASET_NAMES[paper_dataset]} {ARCH_NAMES.get(arch, arch)}"
    if dataset == paper_dataset:
        return f"InfoPro paper ({setting})"
    return f"paper setting ({setting}), not comparable"


def ours_label(dataset: str | None) -> str:
    return f"ours ({dataset})" if dataset else "ours (no runs)"


def contsup_value(paper_dataset: str, arch: str, method: str, loss: str, k) -> float:
    """The ContSup paper's own number from `tables.CONTSUP_PAPER`, NaN while the slot is empty.
    Expected layout (as INFOPRO_REFERENCE): {(dataset, arch, method, loss): {K: error %}},
    method as `method_label` writes it (E2E, R0, E, R1E, R1E +recon, E* ...)."""
    entry = tables.CONTSUP_PAPER.get((paper_dataset, arch, method, loss), {})
    return float(entry.get(k, np.nan)) if isinstance(entry, dict) else np.nan


def infopro_value(paper_dataset: str, arch: str, method: str, k) -> float:
    if method == "E2E":
        return tables.E2E_REFERENCE.get((paper_dataset, arch), np.nan)
    return tables.INFOPRO_REFERENCE.get((paper_dataset, arch, method), {}).get(k, np.nan)


def format_table(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """For display: numbers with `digits` decimals (parameter counts as integers), every
    missing value as '—'."""
    def fmt(v, count=False):
        if isinstance(v, str):
            return v
        if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
            return MISSING
        if count:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)
    out = table.copy().astype(object)
    for col in table.columns:
        count = "params" in " ".join(map(str, col if isinstance(col, tuple) else (col,)))
        out[col] = [fmt(v, count) for v in table[col]]
    return out


def _frame(rows: dict, columns: list, index_names) -> pd.DataFrame:
    cols = pd.MultiIndex.from_tuples(columns, names=["source", ""])
    index = pd.MultiIndex.from_tuples(list(rows)) if isinstance(next(iter(rows)), tuple) else pd.Index(list(rows))
    index.names = index_names if isinstance(index_names, list) else [index_names]
    return pd.DataFrame([rows[r] for r in rows], index=index, columns=cols)


# --------------------------------------------------------------------------------------
# Tables
def table1(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Table 1: ResNet-32, K=16, softmax; rows E2E, R0, E, R1, R1E. Reference: InfoPro's
    end-to-end and greedy SL (= R0) numbers."""
    dataset = pick_dataset(df, "cifar10", dataset)
    arch, ref, ours = "resnet32", reference_label(dataset, "cifar10", "resnet32"), ours_label(dataset)
    base = _sel(df, dataset=dataset, arch=arch, reconstruct=False, balanced=False)
    columns = [(ours, "test error (%)"), (ours, "best error (%)"), (ours, "peak activation (MiB)"),
               (ours, "context params"), (ref, "test error (%)"), (CONTSUP_SLOT, "test error (%)")]
    rows = {}
    for mode in ("E2E", *tables.ABLATION_MODES):
        sel = _sel(base, k=1) if mode == "E2E" else _sel(base, k=16, mode=mode, loss="softmax")
        ref_method = {"E2E": "E2E", "R0": "Greedy SL"}.get(mode)
        rows[mode] = [_mean(sel, metric), _mean(sel, "best_error"), _mean(sel, "peak_activation_MiB"),
                      _mean(sel, "params_context_encoders"),
                      infopro_value("cifar10", arch, ref_method, 16) if ref_method else np.nan,
                      contsup_value("cifar10", arch, mode, "softmax", 16 if mode != "E2E" else 1)]
    return _frame(rows, columns, "mode")


def table2(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Table 2: ResNet-32, rows mode (E, R1E) x loss (contrast, softmax), columns K; the
    E2E column repeats the end-to-end baseline. Reference: InfoPro with the same loss."""
    dataset = pick_dataset(df, "cifar10", dataset)
    arch, ref, ours = "resnet32", reference_label(dataset, "cifar10", "resnet32"), ours_label(dataset)
    base = _sel(df, dataset=dataset, arch=arch, reconstruct=False, balanced=False)
    e2e = _mean(_sel(base, k=1), metric)
    kcols = ["E2E"] + [f"K={k}" for k in KS]
    columns = [(ours, c) for c in kcols] + [(ref, c) for c in kcols] + [(CONTSUP_SLOT, c) for c in kcols]
    rows = {}
    for mode in ("E", "R1E"):
        for loss in ("contrast", "softmax"):
            ours_vals = [e2e] + [_mean(_sel(base, k=k, mode=mode, loss=loss), metric) for k in KS]
            ref_vals = [infopro_value("cifar10", arch, "E2E", 1)] + \
                       [infopro_value("cifar10", arch, f"InfoPro {loss}", k) for k in KS]
            slot = [contsup_value("cifar10", arch, "E2E", "softmax", 1)] + \
                   [contsup_value("cifar10", arch, mode, loss, k) for k in KS]
            rows[(mode, loss)] = ours_vals + ref_vals + slot
    return _frame(rows, columns, ["mode", "loss"])


def table3(df: pd.DataFrame, arch: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Table 3: R1E + reconstruction (ResNet-110), rows dataset x loss, columns K; the E2E
    column is the end-to-end run on the same trained data. Reference: InfoPro, same loss."""
    recon = _sel(df, mode="R1E", reconstruct=True, balanced=False)
    arch = _pick_arch(recon, "resnet110", arch)
    kcols = ["E2E"] + [f"K={k}" for k in KS]
    trained = sorted(set(_sel(recon, arch=arch)["dataset"]))
    comparable = all(d in PAPER_DATASETS for d in (trained or set(df["dataset"].dropna())))
    ours = ours_label(", ".join(trained) if trained else None)
    ref = f"InfoPro paper ({ARCH_NAMES.get(arch, arch)})" if comparable else \
        f"paper setting ({ARCH_NAMES.get(arch, arch)}), not comparable"
    columns = [(ours, c) for c in kcols] + [(ref, c) for c in kcols] + [(CONTSUP_SLOT, c) for c in kcols]
    rows = {}
    for paper_dataset in PAPER_DATASETS:
        runs = _sel(recon, arch=arch, paper_dataset=paper_dataset)
        data_trained = pick_dataset(runs, paper_dataset)
        e2e = _mean(_sel(df, k=1, arch=arch, dataset=data_trained), metric) if data_trained else np.nan
        for loss in ("contrast", "softmax"):
            sel = _sel(runs, loss=loss, dataset=data_trained)
            ours_vals = [e2e] + [_mean(_sel(sel, k=k), metric) for k in KS]
            ref_vals = [infopro_value(paper_dataset, arch, "E2E", 1)] + \
                       [infopro_value(paper_dataset, arch, f"InfoPro {loss}", k) for k in KS]
            slot = [contsup_value(paper_dataset, arch, "E2E", "softmax", 1)] + \
                   [contsup_value(paper_dataset, arch, "R1E +recon", loss, k) for k in KS]
            rows[(DATASET_NAMES[paper_dataset], loss)] = ours_vals + ref_vals + slot
    return _frame(rows, columns, ["dataset", "loss"])


def table4(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Table 4: ResNet-32, softmax, K=8 and 16, rows mode: test error, peak activation
    memory of our (lean) step, and training memory as the paper counts it (parameters,
    gradients, momentum and the authors' plain encoders' activations: the one to set beside
    the paper's memory column; "—" for runs recorded before it). The E2E row repeats the
    end-to-end run under both K (E2E is K=1, not a mode); a mode that reaches further back
    than K modules (R16 at K=8) is empty. Rows: E2E, then `tables.RESIDUAL_MODES`.
    Reference: InfoPro's greedy SL (= R0) and E2E errors."""
    dataset = pick_dataset(df, "cifar10", dataset)
    arch, ref, ours = "resnet32", reference_label(dataset, "cifar10", "resnet32"), ours_label(dataset)
    base = _sel(df, dataset=dataset, arch=arch, reconstruct=False, balanced=False)
    gpu = base["cuda_peak_MiB"].notna().any()
    columns = []
    for k in (8, 16):
        columns += [(ours, f"K={k} error (%)"), (ours, f"K={k} peak activation (MiB)"),
                    (ours, f"K={k} paper-counted memory (MiB)")]
        if gpu:
            columns.append((ours, f"K={k} GPU peak (MiB)"))
    columns += [(ref, f"K={k} error (%)") for k in (8, 16)]
    columns += [(CONTSUP_SLOT, f"K={k} {q}") for k in (8, 16) for q in ("error (%)", "memory")]
    rows = {}
    for mode in ("E2E", *tables.RESIDUAL_MODES):
        vals, refs, slot = [], [], []
        for k in (8, 16):
            if mode == "E2E":
                sel = _sel(base, k=1)
            elif parse_mode(mode, None).fits(k):
                sel = _sel(base, k=k, mode=mode, loss="softmax")
            else:
                sel = base.iloc[0:0]
            vals += [_mean(sel, metric), _mean(sel, "peak_activation_MiB"), _mean(sel, "paper_memory_MiB")]
            vals += [_mean(sel, "cuda_peak_MiB")] if gpu else []
            ref_method = {"E2E": "E2E", "R0": "Greedy SL"}.get(mode)
            refs.append(infopro_value("cifar10", arch, ref_method, k) if ref_method else np.nan)
            slot += [contsup_value("cifar10", arch, mode, "softmax", k), np.nan]
        rows[mode] = vals + refs + slot
    return _frame(rows, columns, "mode")


# --------------------------------------------------------------------------------------
# The headline: Table 1 over seeds
HEADLINE_METHODS = ["E2E", *tables.ABLATION_MODES]


def headline_runs(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Every seed of Table 1's configurations (ResNet-32: E2E, and K=16 softmax R0/E/R1/R1E),
    long format: method, seed, test error (%)."""
    dataset = pick_dataset(df, "cifar10", dataset)
    base = _sel(df, dataset=dataset, arch="resnet32", reconstruct=False, balanced=False)
    rows = []
    for method in HEADLINE_METHODS:
        sel = _sel(base, k=1) if method == "E2E" else _sel(base, k=16, mode=method, loss="softmax")
        rows += [{"method": method, "seed": int(r["seed"]), "test error (%)": float(r[metric])}
                 for _, r in sel.iterrows() if pd.notna(r[metric])]
    return pd.DataFrame(rows, columns=["method", "seed", "test error (%)"])


def headline(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Per method: mean and standard deviation of the test error over seeds, and how many."""
    runs = headline_runs(df, dataset, metric)
    g = runs.groupby("method", sort=False)["test error (%)"]
    out = pd.DataFrame({"mean (%)": g.mean(), "sd (%)": g.std(ddof=1), "seeds": g.count()})
    return out.reindex([m for m in HEADLINE_METHODS if m in out.index]).rename_axis("method")


def _two_se(h: pd.DataFrame, a: str, b: str) -> float:
    """Twice the standard error of mean(a) - mean(b) over seeds, from `headline`'s table."""
    return 2 * math.sqrt(h.loc[a, "sd (%)"] ** 2 / h.loc[a, "seeds"] + h.loc[b, "sd (%)"] ** 2 / h.loc[b, "seeds"])


def seed_noise(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Which differences of the headline are beyond seed noise: for every context mode against
    plain greedy learning (R0) and every local method against E2E, the difference of the
    means and twice its standard error, sqrt(sd_a^2/n_a + sd_b^2/n_b) (about a 95 % interval
    for normal noise); `beyond noise` when |difference| exceeds it. Needs 2+ seeds a side."""
    h = headline(df, dataset, metric)
    pairs = [(m, "R0") for m in tables.ABLATION_MODES if m != "R0"] + [(m, "E2E") for m in tables.ABLATION_MODES]
    rows = []
    for a, b in pairs:
        if a not in h.index or b not in h.index or min(h.loc[a, "seeds"], h.loc[b, "seeds"]) < 2:
            continue
        diff = h.loc[a, "mean (%)"] - h.loc[b, "mean (%)"]
        two_se = _two_se(h, a, b)
        rows.append({"comparison": f"{a} - {b}", "difference (points)": diff, "2 SE (points)": two_se,
                     "beyond noise": bool(abs(diff) > two_se)})
    return pd.DataFrame(rows, columns=["comparison", "difference (points)", "2 SE (points)", "beyond noise"])


def headline_text(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error") -> str:
    """The headline in words, every number computed from the runs: R0 and E2E's mean ± sd,
    which context modes are beyond seed noise against R0 (seed_noise's rule), how far the
    closest local method stays from E2E, and E against R1E by the same rule."""
    h, noise = headline(df, dataset, metric), seed_noise(df, dataset, metric).set_index("comparison")
    if not {"E2E", "R0"} <= set(h.index) or noise.empty:
        return "The headline needs E2E and R0 trained on two or more seeds each; not all are finished yet."
    m, sd, n = h["mean (%)"], h["sd (%)"], h["seeds"]
    verdict = lambda beyond: "beyond seed noise" if beyond else "within seed noise"  # noqa: E731
    lines = [f"At K=16, plain greedy learning (R0) ends at {m['R0']:.1f} ± {sd['R0']:.1f} % test error against "
             f"{m['E2E']:.1f} ± {sd['E2E']:.1f} % end-to-end (mean ± sd over seeds)."]
    for mode in [x for x in tables.ABLATION_MODES if f"{x} - R0" in noise.index]:
        r = noise.loc[f"{mode} - R0"]
        lines.append(f"{mode} against R0: {-r['difference (points)']:+.1f} points of error removed, twice its "
                     f"standard error {r['2 SE (points)']:.1f}: {verdict(r['beyond noise'])}.")
    local = [x for x in tables.ABLATION_MODES if x != "R0" and f"{x} - E2E" in noise.index]
    if local:
        closest = min(local, key=lambda x: noise.loc[f"{x} - E2E", "difference (points)"])
        r = noise.loc[f"{closest} - E2E"]
        lines.append(f"Closest to E2E: {closest}, {r['difference (points)']:.1f} points above it (twice the "
                     f"standard error {r['2 SE (points)']:.1f}): {verdict(r['beyond noise'])}.")
    if {"E", "R1E"} <= set(h.index) and min(n["E"], n["R1E"]) >= 2:
        diff = m["R1E"] - m["E"]
        two_se = _two_se(h, "E", "R1E")
        lines.append(f"E against R1E: {('E' if diff > 0 else 'R1E')} is {abs(diff):.1f} points lower, twice the "
                     f"standard error {two_se:.1f}: {verdict(abs(diff) > two_se)}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Which entries are noise: a short profile (quick: three epochs on 8x8 digits) trains some
# networks too little for their numbers to mean anything, and nothing in a bare table says so.
LEARNED_LITTLE = 0.75   # an error at or above this fraction of chance's: the run learned little


def chance_error(dataset: str | None) -> float:
    """Test error (%) of guessing: 100 (1 - 1/classes) of the trained data set (10 classes
    when unknown)."""
    classes = tables.DATA_RECIPES[dataset].num_classes if dataset in tables.DATA_RECIPES else 10
    return 100.0 * (1 - 1 / classes)


def seed_sd(df: pd.DataFrame, metric: str = "final_error") -> tuple[float, int]:
    """Seed noise of one run's error: the pooled standard deviation over every config trained
    with several seeds (identical but for the seed), and how many such configs; (NaN, 0) when
    no config was trained twice."""
    keys = [c for c in CONFIG_COLUMNS if c != "seed" and c in df]
    runs = df.dropna(subset=[metric])
    if runs.empty:
        return np.nan, 0
    groups = runs.astype({k: str for k in keys}).groupby(keys, dropna=False)[metric]
    var, n = groups.var(ddof=1), groups.count()
    several = n >= 2
    if not several.any():
        return np.nan, 0
    pooled = float(((n[several] - 1) * var[several]).sum() / (n[several] - 1).sum())
    return math.sqrt(pooled), int(several.sum())


def noise_margin(df: pd.DataFrame, metric: str = "final_error") -> float:
    """How far two single runs' errors differ by seed noise alone: twice the standard error of
    a difference, 2·sqrt(2)·seed_sd (about a 95 % interval for normal noise); NaN when unknown."""
    return 2 * math.sqrt(2) * seed_sd(df, metric)[0]


def _noise(entries: list[tuple], chance: float, df: pd.DataFrame, metric: str) -> dict:
    """What is noise among `entries` [(label, error, error of its end-to-end run, is_e2e)]:
    end-to-end errors that learned little, local entries that learned little, and local
    entries that beat end-to-end by more than seed noise (none when it is unknown)."""
    entries = [e for e in entries if not math.isnan(e[1])]
    threshold = LEARNED_LITTLE * chance
    sd, n_configs = seed_sd(df, metric)
    margin = 2 * math.sqrt(2) * sd
    return {"entries": entries, "chance": chance, "threshold": threshold, "sd": sd, "n_configs": n_configs,
            "margin": margin,
            "e2e": sorted({round(v, 2) for _, v, _, is_e2e in entries if is_e2e and v >= threshold}),
            "little": [(lab, v) for lab, v, _, is_e2e in entries if v >= threshold and not is_e2e],
            "beats": [(lab, v, ref) for lab, v, ref, is_e2e in entries
                      if not is_e2e and not math.isnan(ref) and v < ref - margin]}  # none when noise is unknown


def _notes(n: dict) -> list[str]:
    """The sentences of a `_noise` verdict (none for no entries)."""
    if not n["entries"]:
        return []
    out = []
    if n["e2e"]:
        out.append(f"Noise: end-to-end reaches only {', '.join(f'{v:.1f}' for v in n['e2e'])} % error here "
                   f"(chance: {n['chance']:.0f} %): in this budget the network did not train, so no comparison "
                   f"with it says anything about the paper's trend.")
    if n["little"]:
        out.append(f"{len(n['little'])} of {sum(not e[3] for e in n['entries'])} local entries are at or above "
                   f"{n['threshold']:.1f} % error ({LEARNED_LITTLE:.0%} of chance) and learned little: "
                   + ", ".join(f"{lab} {v:.1f} %" for lab, v in n["little"]) + ".")
    if n["beats"]:
        noise = (f"seed noise, {n['margin']:.1f} points (2·√2 × the seed sd {n['sd']:.1f} of the "
                 f"{n['n_configs']} configs trained on several seeds)")
        out.append(f"{len(n['beats'])} local entries beat end-to-end by more than {noise}: "
                   + ", ".join(f"{lab} {v:.1f} % against {ref:.1f} %" for lab, v, ref in n["beats"])
                   + ". In the paper no local method beats end-to-end: here it means that a run is "
                     "under-trained (often end-to-end), not that local learning is better.")
    if not n["n_configs"]:
        out.append("Seed noise is unknown (no config was trained on several seeds): no difference from "
                   "end-to-end can be called beyond it.")
    if not (n["e2e"] or n["little"] or n["beats"]):
        out.insert(0, f"Every entry learned (all below {n['threshold']:.1f} % error, chance {n['chance']:.0f} %)"
                   + (f" and none beats end-to-end by more than seed noise ({n['margin']:.1f} points)."
                      if n["n_configs"] else "."))
    return out


def _flag(n: dict) -> str:
    """The verdict in a few words (a figure panel's subtitle); '' when nothing is noise."""
    if n["e2e"]:
        return f"noise: E2E did not train ({n['e2e'][0]:.1f} % error, chance {n['chance']:.0f} %)"
    parts = [f"{len(n['beats'])} beat E2E beyond seed noise"] if n["beats"] else []
    parts += [f"{len(n['little'])} learned little (≥ {n['threshold']:.1f} %)"] if n["little"] else []
    return ("noise: " + ", ".join(parts)) if parts else ""


def _ours_dataset(label: str) -> str | None:
    inside = label[label.find("(") + 1:label.rfind(")")] if "(" in label else ""
    return inside.split(",")[0].strip() or None


def table_notes(table: pd.DataFrame, df: pd.DataFrame, metric: str = "final_error") -> str:
    """In words, computed from the table's own numbers, which of our entries of `table` (one
    of table1..table4) are noise: the end-to-end run or local runs at an error within a
    quarter of chance's (`LEARNED_LITTLE`), and local runs that beat end-to-end by more than
    seed noise (`noise_margin`, from the configs of `df` trained on several seeds). Else one
    sentence saying that every entry learned."""
    import re
    ours = [c for c in table.columns if str(c[0]).startswith("ours")]
    if not ours or table.empty:
        return ""
    chance = chance_error(_ours_dataset(ours[0][0]))
    errors = [c for c in ours if c[1] in ("test error (%)", "E2E") or re.fullmatch(r"K=\d+( error \(%\))?", c[1])]
    e2e_col = next((c for c in ours if c[1] == "E2E"), None)
    entries = []
    for row in table.index:
        name = "/".join(map(str, row)) if isinstance(row, tuple) else str(row)
        for col in errors:
            k = "" if col[1] == "test error (%)" else col[1].split(" ")[0]
            is_e2e = name == "E2E" or col == e2e_col
            ref = table.loc["E2E", col] if "E2E" in table.index else \
                (table.loc[row, e2e_col] if e2e_col is not None else np.nan)
            entries.append(("E2E" if is_e2e else f"{name} {k}".strip(), float(table.loc[row, col]),
                            float(ref), is_e2e))
    return "\n".join(_notes(_noise(entries, chance, df, metric)))


def headline_figure(df: pd.DataFrame, figures_dir, dataset: str | None = None, metric: str = "final_error",
                    show: bool = False) -> list[Path]:
    """Table 1 as bars: mean test error over seeds with a one-standard-deviation error bar,
    every seed a dot; the InfoPro reference (E2E, greedy SL) as a dashed line where comparable."""
    plt, sns = _plt()
    dataset = pick_dataset(df, "cifar10", dataset)
    runs = headline_runs(df, dataset, metric)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if runs.empty:
        _note(ax, "no Table 1 runs yet")
    else:
        order = [m for m in HEADLINE_METHODS if (runs["method"] == m).any()]
        sns.barplot(runs, x="method", y="test error (%)", order=order, errorbar="sd", color="C0", alpha=0.6,
                    capsize=0.2, ax=ax)
        sns.stripplot(runs, x="method", y="test error (%)", order=order, color="k", size=4, ax=ax)
        seeds = runs.groupby("method")["seed"].nunique()
        ax.set_xticks(range(len(order)), [f"{m}\n({seeds[m]} seed{'s' if seeds[m] > 1 else ''})" for m in order])
        ax.set_xlabel("")
        ax.set_title(f"Table 1 over seeds: ResNet-32, K=16, softmax local heads; trained on {dataset}",
                     fontsize=10)
    return _save(fig, figures_dir, "headline_table1_seeds", show)


def all_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {"table1": table1(df), "table2": table2(df), "table3": table3(df), "table4": table4(df)}


def save_tables(tables_: dict[str, pd.DataFrame], out_dir) -> list[Path]:
    """Each table as CSV (numbers, NaN where missing) and as aligned text (as displayed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, t in tables_.items():
        t.to_csv(out / f"{name}.csv")
        (out / f"{name}.txt").write_text(format_table(t).to_string() + "\n")
        paths += [out / f"{name}.csv", out / f"{name}.txt"]
    return paths


# --------------------------------------------------------------------------------------
# Tables of a list of runs (notebooks/02_train.ipynb)
def learning_curves(cfgs):
    """Train and test error per epoch of every run, long format (run, epoch, split, error).
    Epochs count from 0, as in metrics.jsonl, result.json and what `train` prints."""
    import pandas as pd
    rows = []
    for cfg in cfgs:
        path = Path(cfg.out_dir) / "metrics.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            m = json.loads(line)
            for split in ("train", "test"):
                rows.append({"run": Path(cfg.out_dir).name, "epoch": m["epoch"], "split": split,
                             "error (%)": m[f"{split}_error"]})
    return pd.DataFrame(rows, columns=["run", "epoch", "split", "error (%)"])


def memory_table(cfgs, results: dict):
    """Peak activation memory of one training step of each finished run and of the same
    network trained end-to-end (K=1) at the same batch size."""
    rows, e2e = [], {}
    for cfg in cfgs:
        name = Path(cfg.out_dir).name
        if "error" in results.get(name, {"error": "missing"}):
            continue
        key = (cfg.arch, cfg.dataset, cfg.batch_size)
        if key not in e2e:
            if cfg.k == 1:
                e2e[key] = results[name]["peak_activation_bytes"]
            else:
                device = pick_device(cfg.device)
                x, y, _ = random_batch(cfg.dataset, cfg.batch_size)
                net = ContSupNet(ModelConfig(arch=cfg.arch, k=1, mode="R0", dataset=cfg.dataset)).to(device)
                e2e[key] = measure_step_memory(net, x.to(device), y.to(device))["peak_activation_bytes"]
        rows.append({"run": name, "training": "this run",
                     "peak activation (MiB)": results[name]["peak_activation_bytes"] / 2**20})
        if cfg.k > 1:
            rows.append({"run": name, "training": "end-to-end", "peak activation (MiB)": e2e[key] / 2**20})
    return pd.DataFrame(rows, columns=["run", "training", "peak activation (MiB)"])


def results_table(cfgs, results: dict):
    """One row per run: errors, memory, parameters, time (or the error)."""
    import pandas as pd
    rows = []
    for cfg in cfgs:
        name = Path(cfg.out_dir).name
        r = results.get(name, {"error": "not run"})
        if "error" in r:
            rows.append({"run": name, "error": r["error"]})
            continue
        rows.append({"run": name, "final test error (%)": r["final_error"], "best test error (%)": r["best_error"],
                     "best epoch": r["best_epoch"],
                     "peak activation (MiB)": round(r["peak_activation_bytes"] / 2**20, 1),
                     "parameters": sum(r["params"].values()), "train seconds": round(r["train_seconds"], 1)})
    return pd.DataFrame(rows).set_index("run")


def describe_config(cfg: TrainConfig) -> str:
    """Cut points and parameter counts of a config's network (deterministic)."""
    try:
        net = ContSupNet(cfg.model_config())
    except UsageError as e:  # shown, not raised: training reports it per run
        return f"{Path(cfg.out_dir).name}: cannot build the network: {e}"
    lines = [f"{cfg.arch} K={cfg.k} mode={cfg.mode} loss={cfg.loss} on {cfg.dataset}",
             f"cut points (stage, block): {net.cuts}"]
    lines += [f"{part:>17}: {n:,} parameters" for part, n in net.parts().items()]
    return "\n".join(lines)


def reference_table() -> pd.DataFrame:
    """The published anchors of SPEC §7 as one table: InfoPro Table 2 (test error %) with
    the E2E baselines; rows (dataset, arch, method), columns K."""
    rows = {}
    for (data, arch), err in tables.E2E_REFERENCE.items():
        rows[(DATASET_NAMES[data], ARCH_NAMES[arch], "E2E")] = [err] + [np.nan] * len(KS)
        for (d, a, method), by_k in tables.INFOPRO_REFERENCE.items():
            if (d, a) == (data, arch):
                rows[(DATASET_NAMES[d], ARCH_NAMES[a], method)] = [np.nan] + [by_k.get(k, np.nan) for k in KS]
    out = pd.DataFrame(list(rows.values()), columns=["K=1"] + [f"K={k}" for k in KS],
                       index=pd.MultiIndex.from_tuples(list(rows), names=["dataset", "arch", "method"]))
    return out


def memory_reference_table() -> pd.DataFrame:
    """InfoPro Table 3: peak GPU memory (GB) of ResNet-110 on CIFAR-10, batch 1024."""
    return pd.DataFrame({"peak GPU memory (GB)": tables.INFOPRO_MEMORY_GB}).rename_axis("method")


# --------------------------------------------------------------------------------------
# Figures
def _plt():
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _save(fig, figures_dir, name: str, show: bool = False) -> list[Path]:
    """Lay out, write `name`.png and .pdf, and close the figure unless it is to be shown."""
    fig.tight_layout()
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    if not show:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return paths


def _note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.4",
            wrap=True)


def _k_axis(ax, ks):
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlim(min(ks) / 1.25, max(ks) * 1.25)
    ax.minorticks_off()


def _figure4_series(base: pd.DataFrame, arch: str, authors: bool) -> tuple[dict, list]:
    """Figure 4's series of one arch panel ({label: runs}) and the (mode, loss) pairs of its E* runs."""
    runs = _sel(base, arch=arch)
    balanced = _sel(runs, balanced=True)
    modes = balanced[["mode", "loss"]].drop_duplicates().values.tolist() or [["E", "contrast"]]
    equal = pd.concat([_sel(runs, balanced=False, mode=m, loss=l) for m, l in modes]).query("k > 1")
    if authors and arch == "resnet32":
        return {"E* (equal cuts, authors' ResNet-32)": equal, "E2E": _sel(runs, k=1)}, modes
    return {"E* (memory-balanced)": balanced, "equal-layer cuts": equal, "E2E": _sel(runs, k=1)}, modes


def _figure4_noise(df: pd.DataFrame, dataset: str | None, metric: str, authors: bool) -> dict[str, dict]:
    """{arch: `_noise` verdict} of Figure 4's panels: every point against the panel's E2E."""
    dataset = pick_dataset(df, "cifar10", dataset)
    base = _sel(df, dataset=dataset, reconstruct=False) if dataset else df.iloc[0:0]
    out = {}
    for arch in ("resnet32", "resnet110"):
        series, _ = _figure4_series(base, arch, authors)
        e2e = _mean(series["E2E"], metric)
        entries = [("E2E", e2e, e2e, True)] if not math.isnan(e2e) else []
        for label, sel in series.items():
            if label != "E2E":
                entries += [(f"{label.split(' (')[0] if label.startswith('E*') else 'equal cuts'} K={int(k)}",
                             float(v), e2e, False) for k, v in sel.groupby("k")[metric].mean().items()]
        if entries:
            out[arch] = _noise(entries, chance_error(dataset), df, metric)
    return out


def figure4_notes(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error",
                  authors: bool = False) -> str:
    """Which points of Figure 4 are noise, per panel, in words (see `table_notes`)."""
    return "\n".join(f"{ARCH_NAMES.get(arch, arch)}: " + " ".join(_notes(n))
                     for arch, n in _figure4_noise(df, dataset, metric, authors).items())


def _label_points(ax, points: list[tuple], fontsize: float = 8):
    """Annotate [(x, y, text, color)] so that no label covers another label or a marker, nor
    leaves the axes (where it would cover the tick labels): each takes the first of a few
    offsets (right/left, above/below, then further out) whose box, estimated from the text's
    length, is free and inside; else the least covered one."""
    ax.autoscale_view()
    to_px = ax.transData.transform
    scale = ax.figure.dpi / 72                                   # points -> pixels
    w_char, h = 0.62 * fontsize * scale, 1.25 * fontsize * scale
    r = 4 * scale                                                # a marker's half size
    markers = [to_px((x, y)) for line in ax.get_lines() for x, y in line.get_xydata()]
    taken = [(mx - r, my - r, mx + r, my + r) for mx, my in markers]
    offsets = [(4, 3), (4, -3), (-4, 3), (-4, -3), (0, 9), (0, -9), (10, 12), (10, -12), (-10, 12), (-10, -12)]
    frame = ax.get_window_extent()
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)

    def overlap(a, b):
        return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))

    for x, y, text, color in sorted(points, key=lambda p: (p[0], p[1])):
        px, py = to_px((x, y))
        w, best = w_char * len(text), None
        for dx, dy in offsets:
            x0 = px + dx * scale - (w if dx < 0 else w / 2 if dx == 0 else 0)
            y0 = py + dy * scale - (h if dy < 0 else 0)
            box = (x0, y0, x0 + w, y0 + h)
            outside = (box[2] - box[0]) * (box[3] - box[1]) - overlap(box, frame)
            cost = sum(overlap(box, t) for t in taken) + outside
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        _, dx, dy, box = best
        taken.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, color=color,
                    ha="right" if dx < 0 else "center" if dx == 0 else "left", va="top" if dy < 0 else "bottom")


def figure4(df: pd.DataFrame, figures_dir, dataset: str | None = None, metric: str = "final_error",
            show: bool = False, authors: bool = False) -> list[Path]:
    """Figure 4: test error vs memory of one training step, one panel per arch:
    memory-balanced cuts (E*) against equal-layer cuts of the same mode/loss, and E2E.
    Points are labelled with K (placed where they cover no other label or point). Each series
    is drawn twice: filled at the peak activation memory of our (lean) step, hollow and dashed
    at the training memory as the paper counts it (parameters + gradients + momentum + the
    authors' plain encoders' activations), the one comparable with the paper's axis. The
    legend sits below the panels, off the data; a panel whose points are noise says so under
    its title (`figure4_notes` gives the sentences).

    E* follows the paper's text: memory-balanced cuts for both archs (group `figure4`).
    `authors=True` draws it as the authors' command.sh trains it (group `figure4-authors`):
    their ResNet-32 E* runs have no --balanced_memory, so its E* points are the equal-layer runs.
    """
    plt, sns = _plt()
    dataset = pick_dataset(df, "cifar10", dataset)
    base = _sel(df, dataset=dataset, reconstruct=False) if dataset else df.iloc[0:0]
    archs = [a for a in ("resnet32", "resnet110") if (base["arch"] == a).any()] or ["resnet32"]
    noise = _figure4_noise(df, dataset, metric, authors)
    fig, axes = plt.subplots(1, len(archs), figsize=(5.2 * len(archs), 4.4), squeeze=False)
    palette = {"E* (memory-balanced)": "C3", "E* (equal cuts, authors' ResNet-32)": "C3",
               "equal-layer cuts": "C0", "E2E": "k"}
    handles, to_label = {}, []
    for ax, arch in zip(axes[0], archs):
        series, modes = _figure4_series(base, arch, authors)
        labels = []
        for label, sel in series.items():
            if sel.empty:
                continue
            pts = sel.groupby("k")[[metric, "peak_activation_MiB", "paper_memory_MiB"]].mean().reset_index()
            pts = pts.sort_values("peak_activation_MiB")
            e2e = label == "E2E"
            ax.plot(pts["peak_activation_MiB"], pts[metric], "*" if e2e else "o-",
                    color=palette[label], label=f"{label}, our peak activations", markersize=14 if e2e else 7)
            paper = pts.dropna(subset=["paper_memory_MiB"]).sort_values("paper_memory_MiB")
            if not paper.empty:
                ax.plot(paper["paper_memory_MiB"], paper[metric], "*" if e2e else "o--", color=palette[label],
                        markerfacecolor="none", markersize=14 if e2e else 7,
                        label=f"{label}, paper-counted memory")
            labels += [(p["peak_activation_MiB"], p[metric], f"K={int(p['k'])}" if p["k"] > 1 else "E2E",
                        palette[label]) for _, p in pts.iterrows()]
        mode_text = ", ".join(f"{m}/{l}" for m, l in modes)
        flag = _flag(noise[arch]) if arch in noise else ""
        ax.set_title(f"{ARCH_NAMES.get(arch, arch)} on {dataset or '—'} ({mode_text})"
                     + (f"\n{flag}" if flag else ""), fontsize=10, color="C3" if flag else "k")
        ax.set_xlabel("memory of one training step (MiB)")
        ax.set_ylabel("test error (%)")
        if labels:
            to_label.append((ax, labels))
            handles.update(zip(*reversed(ax.get_legend_handles_labels())))
            if _sel(base, arch=arch, balanced=True).empty and not (authors and arch == "resnet32"):
                ax.text(0.5, 0.02, "no memory-balanced (E*) runs yet", ha="center", va="bottom",
                        transform=ax.transAxes, fontsize=9, color="0.4")
        else:
            _note(ax, "no finished runs for this panel yet")
    cuts = ("E*: ResNet-32 on equal cuts, ResNet-110 memory-balanced, as the authors' command.sh"
            if authors else "E*: memory-balanced cuts, as the paper's text (the authors' command.sh "
            "trains ResNet-32 E* on equal cuts: group figure4-authors)")
    fig.suptitle(f"Figure 4: error vs memory. {cuts}.\nFilled: our peak activations; hollow: training "
                 f"memory as the paper counts it", fontsize=10)
    fig.tight_layout()  # the panels' final size first: the labels are placed in pixels
    for ax, labels in to_label:
        _label_points(ax, labels)
    if handles:  # below the panels, off every point
        fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=2, fontsize=8, frameon=False)
    return _save(fig, figures_dir, "figure4_authors_memory_vs_error" if authors else "figure4_memory_vs_error",
                 show)


def _variant(row) -> str:
    return row["loss"] + (" + reconstruction" if row["reconstruct"] else "")


def figure5(df: pd.DataFrame, figures_dir, dataset: str | None = None, metric: str = "final_error",
            show: bool = False) -> list[Path]:
    """Figure 5 (ablation): test error vs K, ResNet-32, modes R0/E/R1/R1E, one panel per
    local-loss variant (softmax, softmax + reconstruction — R0 there is the GDL decoder
    baseline —, contrast). Dashed: E2E. Grey: InfoPro's published curve when comparable."""
    plt, sns = _plt()
    dataset = pick_dataset(df, "cifar10", dataset)
    base = _sel(df, dataset=dataset, arch="resnet32", balanced=False) if dataset else df.iloc[0:0]
    runs = _sel(base, mode=list(tables.ABLATION_MODES), k=list(KS))
    order = ["softmax", "softmax + reconstruction", "contrast", "contrast + reconstruction"]
    present = sorted({_variant(r) for _, r in runs.iterrows()}, key=lambda v: order.index(v) if v in order else 99)
    variants = [v for v in order[:3]] + [v for v in present if v not in order[:3]]
    e2e = _mean(_sel(base, k=1), metric)
    fig, axes = plt.subplots(1, len(variants), figsize=(4.3 * len(variants), 4), squeeze=False, sharey=True)
    colors = dict(zip(tables.ABLATION_MODES, sns.color_palette("deep", 4)))
    refs = {"softmax": "Greedy SL", "softmax + reconstruction": "InfoPro softmax", "contrast": "InfoPro contrast"}
    for ax, variant in zip(axes[0], variants):
        sel = runs[[(_variant(r) == variant) for _, r in runs.iterrows()]] if not runs.empty else runs
        for mode in tables.ABLATION_MODES:
            pts = _sel(sel, mode=mode).groupby("k")[metric].mean()
            if pts.empty:
                continue
            label = "R0 (GDL)" if mode == "R0" and "reconstruction" in variant else mode
            ax.plot(pts.index, pts.values, "o-", color=colors[mode], label=label)
        if not math.isnan(e2e):
            ax.axhline(e2e, color="k", ls="--", lw=1, label="E2E")
        if dataset == "cifar10" and variant in refs:
            ref = tables.INFOPRO_REFERENCE[("cifar10", "resnet32", refs[variant])]
            ax.plot(list(ref), list(ref.values()), "s:", color="0.6", label=f"{refs[variant]} (paper)")
        _k_axis(ax, KS)
        ax.set_title(variant, fontsize=10)
        ax.set_xlabel("K (local modules)")
        ax.set_ylabel("test error (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if sel.empty:
            _note(ax, "no finished runs yet")
    fig.suptitle(f"Figure 5: context-supply ablation, ResNet-32 on {dataset or '—'}", fontsize=11)
    return _save(fig, figures_dir, "figure5_ablation", show)


def table4_chart(df: pd.DataFrame, figures_dir, dataset: str | None = None, metric: str = "final_error",
                 show: bool = False) -> list[Path]:
    """Table 4 as bars: test error, peak activation memory of our (lean) step and training
    memory as the paper counts it, per context mode at K=8 and K=16 (ResNet-32, softmax);
    E2E as a dashed line. Runs recorded before the paper-counted memory leave that panel empty."""
    plt, sns = _plt()
    dataset = pick_dataset(df, "cifar10", dataset)
    base = _sel(df, dataset=dataset, arch="resnet32", reconstruct=False, balanced=False, loss="softmax") \
        if dataset else df.iloc[0:0]
    runs = _sel(base, k=[8, 16], mode=list(tables.RESIDUAL_MODES))
    agg = runs.groupby(["mode", "k"])[[metric, "peak_activation_MiB", "paper_memory_MiB"]].mean().reset_index()
    agg["K"] = "K=" + agg["k"].astype(int).astype(str) if not agg.empty else pd.Series(dtype=str)
    modes = [m for m in tables.RESIDUAL_MODES if (agg["mode"] == m).any()] if not agg.empty else []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    e2e = _sel(base, k=1)
    panels = [(metric, "test error (%)"), ("peak_activation_MiB", "our peak activations (MiB)"),
              ("paper_memory_MiB", "training memory, paper's count (MiB)")]
    for ax, (col, label) in zip(axes, panels):
        if agg.empty or agg[col].isna().all():
            _note(ax, "no finished runs for Table 4 yet" if agg.empty else "not recorded by these runs")
        else:
            sns.barplot(data=agg, x="mode", y=col, hue="K", order=modes, hue_order=["K=8", "K=16"], ax=ax,
                        palette="deep")
            if not e2e.empty:
                ax.axhline(_mean(e2e, col), color="k", ls="--", lw=1, label="E2E")
            ax.legend(fontsize=8)
        ax.set_ylabel(label)
        ax.set_xlabel("context mode")
    fig.suptitle(f"Table 4: context modes at K=8 and K=16, ResNet-32 on {dataset or '—'}", fontsize=11)
    return _save(fig, figures_dir, "table4_modes", show)


METHOD_ORDER = ["E2E", "GLL (R0)", "ContSup E", "ContSup R1E"]


def motivation_figure(info_df: pd.DataFrame, figures_dir, show: bool = False) -> list[Path]:
    """The motivation figure: along depth, the PSNR of a decoder trained on frozen h (a
    proxy of I(h,x)) and the accuracy of a linear probe on frozen h (a proxy of I(h,y)),
    one line per method; dotted verticals mark the cuts of the local-learning runs."""
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    info = info_df if info_df is not None else pd.DataFrame()
    if info.empty:
        for ax in axes:
            _note(ax, "no information study results yet")
    else:
        methods = [m for m in METHOD_ORDER if (info["method"] == m).any()] + \
                  sorted(set(info["method"]) - set(METHOD_ORDER))
        palette = dict(zip(methods, ["k"] + sns.color_palette("deep", len(methods))[:len(methods) - 1]
                           if methods and methods[0] == "E2E" else sns.color_palette("deep", len(methods))))
        cuts = info[(info["is_cut"] == True) & (info["method"] != "E2E")]["depth_fraction"].unique()  # noqa: E712
        for ax, (col, label) in zip(axes, [("psnr_db", "reconstruction PSNR (dB)  ~ I(h, x)"),
                                           ("probe_accuracy", "linear-probe accuracy (%)  ~ I(h, y)")]):
            for c in cuts:
                ax.axvline(c, color="0.85", ls=":", lw=1, zorder=0)
            sns.lineplot(data=info, x="depth_fraction", y=col, hue="method", hue_order=methods, palette=palette,
                         marker="o", markersize=4, ax=ax, errorbar=None)
            ax.set_xlabel("depth (fraction of layers; 0 = input image)")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
        settings = info[["dataset", "arch", "k"]].drop_duplicates() if {"dataset", "arch", "k"} <= set(info) else None
        if settings is not None and not settings.empty:
            ks = sorted(int(k) for k in settings["k"].unique() if k > 1)
            fig.suptitle(f"Layer-wise information, {ARCH_NAMES.get(settings['arch'].iloc[0], '')} on "
                         f"{settings['dataset'].iloc[0]} (local learning with K={', '.join(map(str, ks))}; "
                         f"dotted: cuts)", fontsize=11)
    return _save(fig, figures_dir, "motivation_information", show)
