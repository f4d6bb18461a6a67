"""Tables of the paper from finished run folders, and their notes in words (METHOD §6, §7).

    collect(results_dir)           -> one row per finished run (config + result fields)
    table1..table4(df)             -> the paper's tables: ours | published reference | ContSup paper
    table_notes, headline_text    -> which entries are noise, in words, from the runs' seeds
(the figures are drawn by `figures`)

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
import re
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
def select(df: pd.DataFrame, **where) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for key, value in where.items():
        if isinstance(value, (list, tuple, set)):
            mask &= df[key].isin(list(value))
        else:
            mask &= df[key] == value
    return df[mask]


def mean_of(df: pd.DataFrame, metric: str) -> float:
    values = pd.to_numeric(df[metric], errors="coerce").dropna()
    return float(values.mean()) if len(values) else np.nan


def _pick_arch(df: pd.DataFrame, want: str, arch: str | None) -> str:
    if arch is not None:
        return arch
    if df.empty or (df["arch"] == want).any():
        return want
    return df["arch"].value_counts().index[0]


def reference_label(dataset: str | None, paper_dataset: str, arch: str) -> str:
    """Column label of the InfoPro numbers (METHOD §7): comparable only on the paper's data."""
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
    base = select(df, dataset=dataset, arch=arch, reconstruct=False, balanced=False)
    columns = [(ours, "test error (%)"), (ours, "best error (%)"), (ours, "peak activation (MiB)"),
               (ours, "context params"), (ref, "test error (%)"), (CONTSUP_SLOT, "test error (%)")]
    rows = {}
    for mode in ("E2E", *tables.ABLATION_MODES):
        sel = select(base, k=1) if mode == "E2E" else select(base, k=16, mode=mode, loss="softmax")
        ref_method = {"E2E": "E2E", "R0": "Greedy SL"}.get(mode)
        rows[mode] = [mean_of(sel, metric), mean_of(sel, "best_error"), mean_of(sel, "peak_activation_MiB"),
                      mean_of(sel, "params_context_encoders"),
                      infopro_value("cifar10", arch, ref_method, 16) if ref_method else np.nan,
                      contsup_value("cifar10", arch, mode, "softmax", 16 if mode != "E2E" else 1)]
    return _frame(rows, columns, "mode")


def table2(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Table 2: ResNet-32, rows mode (E, R1E) x loss (contrast, softmax), columns K; the
    E2E column repeats the end-to-end baseline. Reference: InfoPro with the same loss."""
    dataset = pick_dataset(df, "cifar10", dataset)
    arch, ref, ours = "resnet32", reference_label(dataset, "cifar10", "resnet32"), ours_label(dataset)
    base = select(df, dataset=dataset, arch=arch, reconstruct=False, balanced=False)
    e2e = mean_of(select(base, k=1), metric)
    kcols = ["E2E"] + [f"K={k}" for k in KS]
    columns = [(ours, c) for c in kcols] + [(ref, c) for c in kcols] + [(CONTSUP_SLOT, c) for c in kcols]
    rows = {}
    for mode in ("E", "R1E"):
        for loss in ("contrast", "softmax"):
            ours_vals = [e2e] + [mean_of(select(base, k=k, mode=mode, loss=loss), metric) for k in KS]
            ref_vals = [infopro_value("cifar10", arch, "E2E", 1)] + \
                       [infopro_value("cifar10", arch, f"InfoPro {loss}", k) for k in KS]
            slot = [contsup_value("cifar10", arch, "E2E", "softmax", 1)] + \
                   [contsup_value("cifar10", arch, mode, loss, k) for k in KS]
            rows[(mode, loss)] = ours_vals + ref_vals + slot
    return _frame(rows, columns, ["mode", "loss"])


def table3(df: pd.DataFrame, arch: str | None = None, metric: str = "final_error") -> pd.DataFrame:
    """Table 3: R1E + reconstruction (ResNet-110), rows dataset x loss, columns K; the E2E
    column is the end-to-end run on the same trained data. Reference: InfoPro, same loss."""
    recon = select(df, mode="R1E", reconstruct=True, balanced=False)
    arch = _pick_arch(recon, "resnet110", arch)
    kcols = ["E2E"] + [f"K={k}" for k in KS]
    trained = sorted(set(select(recon, arch=arch)["dataset"]))
    comparable = all(d in PAPER_DATASETS for d in (trained or set(df["dataset"].dropna())))
    ours = ours_label(", ".join(trained) if trained else None)
    ref = f"InfoPro paper ({ARCH_NAMES.get(arch, arch)})" if comparable else \
        f"paper setting ({ARCH_NAMES.get(arch, arch)}), not comparable"
    columns = [(ours, c) for c in kcols] + [(ref, c) for c in kcols] + [(CONTSUP_SLOT, c) for c in kcols]
    rows = {}
    for paper_dataset in PAPER_DATASETS:
        runs = select(recon, arch=arch, paper_dataset=paper_dataset)
        data_trained = pick_dataset(runs, paper_dataset)
        e2e = mean_of(select(df, k=1, arch=arch, dataset=data_trained), metric) if data_trained else np.nan
        for loss in ("contrast", "softmax"):
            sel = select(runs, loss=loss, dataset=data_trained)
            ours_vals = [e2e] + [mean_of(select(sel, k=k), metric) for k in KS]
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
    base = select(df, dataset=dataset, arch=arch, reconstruct=False, balanced=False)
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
                sel = select(base, k=1)
            elif parse_mode(mode, None).fits(k):
                sel = select(base, k=k, mode=mode, loss="softmax")
            else:
                sel = base.iloc[0:0]
            vals += [mean_of(sel, metric), mean_of(sel, "peak_activation_MiB"), mean_of(sel, "paper_memory_MiB")]
            vals += [mean_of(sel, "cuda_peak_MiB")] if gpu else []
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
    base = select(df, dataset=dataset, arch="resnet32", reconstruct=False, balanced=False)
    rows = []
    for method in HEADLINE_METHODS:
        sel = select(base, k=1) if method == "E2E" else select(base, k=16, mode=method, loss="softmax")
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


def noise_verdict(entries: list[tuple], chance: float, df: pd.DataFrame, metric: str) -> dict:
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


def noise_sentences(n: dict) -> list[str]:
    """The sentences of a `noise_verdict` (none for no entries)."""
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


def noise_flag(n: dict) -> str:
    """The verdict in a few words (a figure panel's subtitle); '' when nothing is noise."""
    if n["e2e"]:
        return f"noise: E2E did not train ({n['e2e'][0]:.1f} % error, chance {n['chance']:.0f} %)"
    parts = [f"{len(n['beats'])} beat E2E beyond seed noise"] if n["beats"] else []
    parts += [f"{len(n['little'])} learned little (≥ {n['threshold']:.1f} %)"] if n["little"] else []
    return ("noise: " + ", ".join(parts)) if parts else ""


def spread_note(errors: dict, df: pd.DataFrame, metric: str = "final_error", what: str = "points") -> str:
    """A figure panel's seed-noise note, computed from the runs' seeds (`noise_margin`, as the
    tables' notes): `errors` maps a K (or None: the whole panel) to the errors compared there;
    are they within seed noise of each other (largest minus smallest at most the margin)? A
    note starting with 'noise' warns that differences in the panel are not to be read. ''
    when nothing has two errors to compare."""
    spreads = {}
    for key, values in errors.items():
        values = [float(v) for v in values if not math.isnan(v)]
        if len(values) >= 2:
            spreads[key] = max(values) - min(values)
    if not spreads:
        return ""
    margin = noise_margin(df, metric)
    if math.isnan(margin):
        return "noise unknown: no config was trained on several seeds"
    within = [key for key, spread in spreads.items() if spread <= margin]
    if not within:
        return f"{what} apart by more than seed noise ({margin:.1f} points)"
    where = "" if len(within) == len(spreads) else " at K=" + ", ".join(str(k) for k in within)
    return f"noise: {what} within seed noise ({margin:.1f} points) of each other{where}"


def _ours_dataset(label: str) -> str | None:
    inside = label[label.find("(") + 1:label.rfind(")")] if "(" in label else ""
    return inside.split(",")[0].strip() or None


def table_notes(table: pd.DataFrame, df: pd.DataFrame, metric: str = "final_error") -> str:
    """In words, computed from the table's own numbers, which of our entries of `table` (one
    of table1..table4) are noise: the end-to-end run or local runs at an error within a
    quarter of chance's (`LEARNED_LITTLE`), and local runs that beat end-to-end by more than
    seed noise (`noise_margin`, from the configs of `df` trained on several seeds). Else one
    sentence saying that every entry learned."""
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
    return "\n".join(noise_sentences(noise_verdict(entries, chance, df, metric)))


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
    """The published anchors of METHOD §7 as one table: InfoPro Table 2 (test error %) with
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
