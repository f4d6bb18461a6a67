"""Figures of the paper from finished runs, as PNG and PDF (METHOD §6, §7): each takes the
runs' table (`runs.collect`) and a folder and returns the written paths.

    figure4 / figure5 / table4_chart / headline_figure(df, figures_dir) -> written paths
    motivation_figure(info_df, figures_dir)                            -> written paths

The numbers, and what is noise among them, come from `report`; a panel whose entries are
noise says so under its title, computed from the runs' seeds. Labels are placed where they
cover no other label, marker or tick label; legends sit below the panels. Every function
accepts partial results: a panel without runs says so.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .. import tables
from .report import (ARCH_NAMES, HEADLINE_METHODS, KS, chance_error, headline_runs, mean_of, noise_flag,
                     noise_sentences, noise_verdict, select, spread_note)
from .runs import pick_dataset


def _theme() -> None:
    sns.set_theme(style="whitegrid", context="notebook")


def _save(fig, figures_dir, name: str, show: bool = False) -> list[Path]:
    """Lay out, write `name`.png and .pdf, and close the figure unless it is to be shown."""
    fig.tight_layout()
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    if not show:
        plt.close(fig)
    return paths


def _note(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.4",
            wrap=True)


def _note_color(note: str) -> str:
    """A panel's subtitle in red when it warns that its differences are noise."""
    return "C3" if note.startswith("noise") else "k"


def _titled(ax, title: str, note: str, width: int, fontsize: float = 10) -> None:
    """`title` above a panel, `note` under it wrapped to `width` characters (so that it stays
    over its own panel), in red when it warns of noise."""
    lines = [title] + (textwrap.wrap(note, width) if note else [])
    ax.set_title("\n".join(line for line in lines if line), fontsize=fontsize, color=_note_color(note))


def _legend_below(fig, axes, ncol: int) -> None:
    """One legend for all panels, below them: off every point, bar and label (each entry once)."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=ncol, fontsize=8, frameon=False)


def _k_axis(ax, ks):
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlim(min(ks) / 1.25, max(ks) * 1.25)
    ax.minorticks_off()


def _figure4_series(base: pd.DataFrame, arch: str, authors: bool) -> tuple[dict, list]:
    """Figure 4's series of one arch panel ({label: runs}) and the (mode, loss) pairs of its E* runs."""
    runs = select(base, arch=arch)
    balanced = select(runs, balanced=True)
    modes = balanced[["mode", "loss"]].drop_duplicates().values.tolist() or [["E", "contrast"]]
    equal = pd.concat([select(runs, balanced=False, mode=m, loss=l) for m, l in modes]).query("k > 1")
    if authors and arch == "resnet32":
        return {"E* (equal cuts, authors' ResNet-32)": equal, "E2E": select(runs, k=1)}, modes
    return {"E* (memory-balanced)": balanced, "equal-layer cuts": equal, "E2E": select(runs, k=1)}, modes


def _figure4_noise(df: pd.DataFrame, dataset: str | None, metric: str, authors: bool) -> dict[str, dict]:
    """{arch: `noise_verdict`} of Figure 4's panels: every point against the panel's E2E."""
    dataset = pick_dataset(df, "cifar10", dataset)
    base = select(df, dataset=dataset, reconstruct=False) if dataset else df.iloc[0:0]
    out = {}
    for arch in ("resnet32", "resnet110"):
        series, _ = _figure4_series(base, arch, authors)
        e2e = mean_of(series["E2E"], metric)
        entries = [("E2E", e2e, e2e, True)] if not math.isnan(e2e) else []
        for label, sel in series.items():
            if label != "E2E":
                entries += [(f"{label.split(' (')[0] if label.startswith('E*') else 'equal cuts'} K={int(k)}",
                             float(v), e2e, False) for k, v in sel.groupby("k")[metric].mean().items()]
        if entries:
            out[arch] = noise_verdict(entries, chance_error(dataset), df, metric)
    return out


def figure4_notes(df: pd.DataFrame, dataset: str | None = None, metric: str = "final_error",
                  authors: bool = False) -> str:
    """Which points of Figure 4 are noise, per panel, in words (see `table_notes`)."""
    return "\n".join(f"{ARCH_NAMES.get(arch, arch)}: " + " ".join(noise_sentences(n))
                     for arch, n in _figure4_noise(df, dataset, metric, authors).items())


def _overlap(a, b) -> float:
    """Area shared by two boxes (x0, y0, x1, y1)."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def marker_boxes(ax) -> list[tuple]:
    """The pixel box (x0, y0, x1, y1) of every marker the lines of `ax` draw, at its real size."""
    boxes = []
    for line in ax.get_lines():
        if line.get_marker() in (None, "None", "", " ") or not len(line.get_xydata()):
            continue
        half = line.get_markersize() / 2 * ax.figure.dpi / 72
        boxes += [(x - half, y - half, x + half, y + half) for x, y in ax.transData.transform(line.get_xydata())]
    return boxes


def _label_points(ax, points: list[tuple], fontsize: float = 8):
    """Annotate [(x, y, text, color)] so that no label covers another label or a marker (its
    own included), nor leaves the axes (where it would cover the tick labels): each takes the
    first of a few places -- right/left and above/below its marker, then further out -- whose
    box, measured as drawn, is free and inside; else the least covered one. Call it once the
    panel's size is final: the labels keep out of the layout, so a later `tight_layout`
    cannot move the markers under them."""
    ax.autoscale_view()
    renderer = ax.figure.canvas.get_renderer()
    taken = marker_boxes(ax)
    sizes = {(float(x), float(y)): line.get_markersize() / 2 for line in ax.get_lines()
             for x, y in line.get_xydata()}
    frame = ax.get_window_extent(renderer)
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)
    for x, y, text, color in sorted(points, key=lambda p: (p[0], p[1])):
        label = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize, color=color)
        label.set_in_layout(False)
        edge, best = sizes.get((float(x), float(y)), 3.5) + 1.5, None
        for far in (1, 2.5, 4):
            for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1)):
                label.xyann = (sx * edge * far, sy * (edge if sx == 0 else 1) * far)
                label.set_ha({1: "left", 0: "center", -1: "right"}[sx])
                label.set_va("bottom" if sy > 0 else "top")
                box = label.get_window_extent(renderer)
                box = (box.x0, box.y0, box.x1, box.y1)
                outside = (box[2] - box[0]) * (box[3] - box[1]) - _overlap(box, frame)
                cost = sum(_overlap(box, t) for t in taken) + outside
                if best is None or cost < best[0]:
                    best = (cost, label.xyann, label.get_ha(), label.get_va(), box)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, label.xyann, ha, va, box = best
        label.set_ha(ha)
        label.set_va(va)
        taken.append(box)


FIGURE4_COLORS = {"E* (memory-balanced)": "C3", "E* (equal cuts, authors' ResNet-32)": "C3",
                  "equal-layer cuts": "C0", "E2E": "k"}


def _figure4_panel(ax, series: dict, metric: str) -> list[tuple]:
    """Draw one arch panel of Figure 4 ({label: runs}): each series filled at our peak
    activations and hollow at the paper-counted memory; returns the points to label with K."""
    labels = []
    for label, sel in series.items():
        if sel.empty:
            continue
        pts = sel.groupby("k")[[metric, "peak_activation_MiB", "paper_memory_MiB"]].mean().reset_index()
        pts = pts.sort_values("peak_activation_MiB")
        e2e, color = label == "E2E", FIGURE4_COLORS[label]
        ax.plot(pts["peak_activation_MiB"], pts[metric], "*" if e2e else "o-",
                color=color, label=f"{label}, our peak activations", markersize=14 if e2e else 7)
        paper = pts.dropna(subset=["paper_memory_MiB"]).sort_values("paper_memory_MiB")
        if not paper.empty:
            ax.plot(paper["paper_memory_MiB"], paper[metric], "*" if e2e else "o--", color=color,
                    markerfacecolor="none", markersize=14 if e2e else 7, label=f"{label}, paper-counted memory")
        labels += [(p["peak_activation_MiB"], p[metric], f"K={int(p['k'])}" if p["k"] > 1 else "E2E", color)
                   for _, p in pts.iterrows()]
    ax.set_xlabel("memory of one training step (MiB)")
    ax.set_ylabel("test error (%)")
    return labels


def figure4(df: pd.DataFrame, figures_dir, dataset: str | None = None, metric: str = "final_error",
            show: bool = False, authors: bool = False) -> list[Path]:
    """Figure 4: test error vs memory of one training step, one panel per arch:
    memory-balanced cuts (E*) against equal-layer cuts of the same mode/loss, and E2E.
    Points are labelled with K (placed where they cover no other label or point). Each series
    is drawn twice: filled at the peak activation memory of our (lean) step, hollow and dashed
    at the training memory as the paper counts it (parameters + gradients + momentum + the
    authors' plain encoders' activations), the one comparable with the paper's axis. The
    legend sits below the panels, off the data; a panel whose points are noise -- E2E did not
    train, points beat E2E beyond seed noise or learned little, or all lie within seed noise of
    each other -- says so under its title (`figure4_notes` gives the sentences).

    E* follows the paper's text: memory-balanced cuts for both archs (group `figure4`).
    `authors=True` draws it as the authors' command.sh trains it (group `figure4-authors`):
    their ResNet-32 E* runs have no --balanced_memory, so its E* points are the equal-layer runs.
    """
    _theme()
    dataset = pick_dataset(df, "cifar10", dataset)
    base = select(df, dataset=dataset, reconstruct=False) if dataset else df.iloc[0:0]
    archs = [a for a in ("resnet32", "resnet110") if (base["arch"] == a).any()] or ["resnet32"]
    noise = _figure4_noise(df, dataset, metric, authors)
    fig, axes = plt.subplots(1, len(archs), figsize=(5.2 * len(archs), 4.4), squeeze=False)
    to_label = []
    for ax, arch in zip(axes[0], archs):
        series, modes = _figure4_series(base, arch, authors)
        labels = _figure4_panel(ax, series, metric)
        mode_text = ", ".join(f"{m}/{l}" for m, l in modes)
        flag = noise_flag(noise[arch]) or spread_note({None: [e[1] for e in noise[arch]["entries"]]}, df, metric) \
            if arch in noise else ""
        if labels and select(base, arch=arch, balanced=True).empty and not (authors and arch == "resnet32"):
            flag = "; ".join(filter(None, [flag, "no memory-balanced (E*) runs yet"]))  # over the panel, off its points
        _titled(ax, f"{ARCH_NAMES.get(arch, arch)} on {dataset or '—'} ({mode_text})", flag, 60)
        if labels:
            to_label.append((ax, labels))
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
    _legend_below(fig, axes[0], ncol=2)
    return _save(fig, figures_dir, "figure4_authors_memory_vs_error" if authors else "figure4_memory_vs_error",
                 show)


def _variant(row) -> str:
    return row["loss"] + (" + reconstruction" if row["reconstruct"] else "")


def figure5(df: pd.DataFrame, figures_dir, dataset: str | None = None, metric: str = "final_error",
            show: bool = False) -> list[Path]:
    """Figure 5 (ablation): test error vs K, ResNet-32, modes R0/E/R1/R1E, one panel per
    local-loss variant (softmax, softmax + reconstruction — R0 there is the GDL decoder
    baseline —, contrast). Dashed: E2E. Grey: InfoPro's published curve when comparable.
    Under each panel's title, its seed-noise note (`report.spread_note`): at which K the
    modes lie within seed noise of each other. One legend, below the panels."""
    _theme()
    dataset = pick_dataset(df, "cifar10", dataset)
    base = select(df, dataset=dataset, arch="resnet32", balanced=False) if dataset else df.iloc[0:0]
    runs = select(base, mode=list(tables.ABLATION_MODES), k=list(KS))
    order = ["softmax", "softmax + reconstruction", "contrast", "contrast + reconstruction"]
    present = sorted({_variant(r) for _, r in runs.iterrows()}, key=lambda v: order.index(v) if v in order else 99)
    variants = [v for v in order[:3]] + [v for v in present if v not in order[:3]]
    e2e = mean_of(select(base, k=1), metric)
    fig, axes = plt.subplots(1, len(variants), figsize=(4.3 * len(variants), 4), squeeze=False, sharey=True)
    colors = dict(zip(tables.ABLATION_MODES, sns.color_palette("deep", 4)))
    refs = {"softmax": "Greedy SL", "softmax + reconstruction": "InfoPro softmax", "contrast": "InfoPro contrast"}
    for ax, variant in zip(axes[0], variants):
        sel = runs[[(_variant(r) == variant) for _, r in runs.iterrows()]] if not runs.empty else runs
        by_k = {}  # K -> the modes' errors there
        for mode in tables.ABLATION_MODES:
            pts = select(sel, mode=mode).groupby("k")[metric].mean()
            if pts.empty:
                continue
            for k, v in pts.items():
                by_k.setdefault(int(k), []).append(v)
            label = "R0 (GDL)" if mode == "R0" and "reconstruction" in variant else mode
            ax.plot(pts.index, pts.values, "o-", color=colors[mode], label=label)
        if not math.isnan(e2e):
            ax.axhline(e2e, color="k", ls="--", lw=1, label="E2E")
        if dataset == "cifar10" and variant in refs:
            ref = tables.INFOPRO_REFERENCE[("cifar10", "resnet32", refs[variant])]
            ax.plot(list(ref), list(ref.values()), "s:", color="0.6", label=f"{refs[variant]} (paper)")
        _k_axis(ax, KS)
        note = spread_note(dict(sorted(by_k.items())), df, metric, "modes")
        _titled(ax, variant, note, 48)
        ax.set_xlabel("K (local modules)")
        ax.set_ylabel("test error (%)")
        if sel.empty:
            _note(ax, "no finished runs yet")
    fig.suptitle(f"Figure 5: context-supply ablation, ResNet-32 on {dataset or '—'}", fontsize=11)
    _legend_below(fig, axes[0], ncol=6)
    return _save(fig, figures_dir, "figure5_ablation", show)


def table4_chart(df: pd.DataFrame, figures_dir, dataset: str | None = None, metric: str = "final_error",
                 show: bool = False) -> list[Path]:
    """Table 4 as bars: test error, peak activation memory of our (lean) step and training
    memory as the paper counts it, per context mode at K=8 and K=16 (ResNet-32, softmax);
    E2E as a dashed line. Runs recorded before the paper-counted memory leave that panel empty.
    Over the error panel, its seed-noise note (`report.spread_note`); one legend, below."""
    _theme()
    dataset = pick_dataset(df, "cifar10", dataset)
    base = select(df, dataset=dataset, arch="resnet32", reconstruct=False, balanced=False, loss="softmax") \
        if dataset else df.iloc[0:0]
    runs = select(base, k=[8, 16], mode=list(tables.RESIDUAL_MODES))
    agg = runs.groupby(["mode", "k"])[[metric, "peak_activation_MiB", "paper_memory_MiB"]].mean().reset_index()
    agg["K"] = "K=" + agg["k"].astype(int).astype(str) if not agg.empty else pd.Series(dtype=str)
    modes = [m for m in tables.RESIDUAL_MODES if (agg["mode"] == m).any()] if not agg.empty else []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    e2e = select(base, k=1)
    panels = [(metric, "test error (%)"), ("peak_activation_MiB", "our peak activations (MiB)"),
              ("paper_memory_MiB", "training memory, paper's count (MiB)")]
    for ax, (col, label) in zip(axes, panels):
        if agg.empty or agg[col].isna().all():
            _note(ax, "no finished runs for Table 4 yet" if agg.empty else "not recorded by these runs")
        else:
            sns.barplot(data=agg, x="mode", y=col, hue="K", order=modes, hue_order=["K=8", "K=16"], ax=ax,
                        palette="deep")
            if not e2e.empty:
                ax.axhline(mean_of(e2e, col), color="k", ls="--", lw=1, label="E2E")
            if col == metric:
                note = spread_note({k: list(agg[agg["k"] == k][metric]) for k in (8, 16)}, df, metric, "modes")
                _titled(ax, "", note, 60, fontsize=9)
        ax.set_ylabel(label)
        ax.set_xlabel("context mode")
    fig.suptitle(f"Table 4: context modes at K=8 and K=16, ResNet-32 on {dataset or '—'}", fontsize=11)
    _legend_below(fig, axes, ncol=3)
    return _save(fig, figures_dir, "table4_modes", show)


METHOD_ORDER = ["E2E", "GLL (R0)", "ContSup E", "ContSup R1E"]


def motivation_figure(info_df: pd.DataFrame, figures_dir, show: bool = False) -> list[Path]:
    """The motivation figure: along depth, the PSNR of a decoder trained on frozen h (a
    proxy of I(h,x)) and the accuracy of a linear probe on frozen h (a proxy of I(h,y)),
    one line per method; dotted verticals mark the cuts of the local-learning runs."""
    _theme()
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
        settings = info[["dataset", "arch", "k"]].drop_duplicates() if {"dataset", "arch", "k"} <= set(info) else None
        if settings is not None and not settings.empty:
            ks = sorted(int(k) for k in settings["k"].unique() if k > 1)
            fig.suptitle(f"Layer-wise information, {ARCH_NAMES.get(settings['arch'].iloc[0], '')} on "
                         f"{settings['dataset'].iloc[0]} (local learning with K={', '.join(map(str, ks))}; "
                         f"dotted: cuts)", fontsize=11)
    _legend_below(fig, axes, ncol=4)
    return _save(fig, figures_dir, "motivation_information", show)


def headline_figure(df: pd.DataFrame, figures_dir, dataset: str | None = None, metric: str = "final_error",
                    show: bool = False) -> list[Path]:
    """Table 1 as bars: mean test error over seeds with a one-standard-deviation error bar,
    every seed a dot; the InfoPro reference (E2E, greedy SL) as a dashed line where comparable."""
    _theme()
    dataset = pick_dataset(df, "cifar10", dataset)
    runs = headline_runs(df, dataset, metric)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if runs.empty:
        _note(ax, "no Table 1 runs yet")
    else:
        order = [m for m in HEADLINE_METHODS if (runs["method"] == m).any()]
        sns.barplot(runs, x="method", y="test error (%)", order=order, errorbar="sd", color="C0", alpha=0.6,
                    capsize=0.2, ax=ax)
        # a swarm, not a strip: its dots are placed deterministically (a strip jitters them at random)
        sns.swarmplot(runs, x="method", y="test error (%)", order=order, color="k", size=4, ax=ax)
        seeds = runs.groupby("method")["seed"].nunique()
        ax.set_xticks(range(len(order)), [f"{m}\n({seeds[m]} seed{'s' if seeds[m] > 1 else ''})" for m in order])
        ax.set_xlabel("")
        ax.set_title(f"Table 1 over seeds: ResNet-32, K=16, softmax local heads; trained on {dataset}",
                     fontsize=10)
    return _save(fig, figures_dir, "headline_table1_seeds", show)
