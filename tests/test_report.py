"""Tables, figures and the information study, on realistic fake run folders and on one tiny
really trained run."""
import json
import math
import os
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch

from contsup import provenance, tables
from contsup.study import experiments, figures, information, report, runs
from contsup.errors import UsageError
from contsup.train import TrainConfig


FACTS_OF_RUN = {"torch_version": "2.14.1", "device_name": "Some CPU", "threads": 2, "commit": "abc1234"}


def write_run(root, name=None, finished=True, final_error=20.0, peak_mb=100.0, paper_mb=None, **cfg_kw):
    """A run folder as `train` leaves it: config.json, metrics.jsonl, result.json (with the
    paper-counted memory only when `paper_mb` is given, as a run recorded before it)."""
    cfg = TrainConfig(epochs=3, **cfg_kw)
    name = name or f"{cfg.dataset}-{cfg.arch}-K{cfg.k}-{cfg.mode}-{cfg.loss}" + \
        ("-recon" if cfg.reconstruct else "") + ("-balanced" if cfg.balanced else "") + f"-seed{cfg.seed}"
    d = root / "runs" / name
    d.mkdir(parents=True)
    config = json.loads(json.dumps(asdict(cfg) | {"out_dir": str(d)}))
    (d / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": e, "lr": 0.1, "train_error": 30.0, "test_error": final_error + 2 - e, "local_losses": [1.0],
             "epoch_seconds": 2.0, "images_per_s": 500.0 + e} for e in range(3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        result = {"final_error": final_error, "best_error": final_error - 0.5, "best_epoch": 2, "epochs": 3,
                  "peak_activation_bytes": int(peak_mb * 2 ** 20), "cuda_peak_bytes": None,
                  "params": {"backbone": 466906, "local_heads": 80000 if cfg.k > 1 else 0,
                             "context_encoders": 0 if cfg.mode == "R0" or cfg.k == 1 else 13364, "decoders": 0},
                  "cuts": tables.cut_points(cfg.arch, cfg.k, cfg.balanced, cfg.dataset), "train_seconds": 6.0,
                  "device": "cpu", "config": config, **FACTS_OF_RUN}
        if paper_mb is not None:
            result["paper_memory_bytes"] = int(paper_mb * 2 ** 20)
        (d / "result.json").write_text(json.dumps(result))
    return d


@pytest.fixture
def results(tmp_path):
    return _partial_results(tmp_path)


def _partial_results(tmp_path):
    """A quick-profile-like folder on digits: E2E, Table 1 modes at K=16, Table 2 at K=4,
    a Table 3 reconstruction run with STL-10's scales, a balanced run, one unfinished run."""
    write_run(tmp_path, k=1, mode="R0", final_error=10.0, peak_mb=150.0)
    for i, mode in enumerate(("R0", "E", "R1E")):
        write_run(tmp_path, k=16, mode=mode, final_error=30.0 - 5 * i, peak_mb=20.0 + i)
    write_run(tmp_path, k=4, mode="E", loss="contrast", final_error=14.0, peak_mb=60.0)
    write_run(tmp_path, k=4, mode="E", loss="contrast", final_error=16.0, peak_mb=60.0, seed=1)
    write_run(tmp_path, k=4, mode="E", loss="contrast", balanced=True, final_error=15.0, peak_mb=40.0, paper_mb=90.0)
    write_run(tmp_path, arch="resnet110", k=4, mode="R1E", reconstruct=True,
              loss_scales=tables.LOSS_SCALES[("resnet110", "stl10")][4], final_error=12.5)
    write_run(tmp_path, k=8, mode="R1", finished=False)
    return tmp_path


# --------------------------------------------------------------------------------------
def test_collect_has_one_row_per_finished_run(results):
    df = runs.collect(results)
    assert len(df) == 8  # the unfinished K=8 R1 run is left out
    assert set(runs.COLUMNS) <= set(df.columns)
    e2e = df[df["k"] == 1].iloc[0]
    assert e2e["method"] == "E2E" and e2e["final_error"] == 10.0
    assert e2e["peak_activation_MiB"] == pytest.approx(150.0)
    assert e2e["images_per_s"] == pytest.approx(501.0)
    assert e2e["params_backbone"] == 466906 and e2e["n_cuts"] == 0
    assert {f: e2e[f] for f in provenance.FACTS} == FACTS_OF_RUN and not e2e["mixed_facts"]
    assert set(df[df["k"] == 16]["n_cuts"]) == {15}
    # digits stands in for CIFAR-10; the reconstruction run's scales name STL-10
    assert set(df[~df["reconstruct"].astype(bool)]["paper_dataset"]) == {"cifar10"}
    assert df[df["reconstruct"].astype(bool)]["paper_dataset"].item() == "stl10"
    assert set(df["method"]) == {"E2E", "R0", "E", "R1E", "E*", "R1E +recon"}


def test_collect_empty_folder_gives_empty_tables(tmp_path):
    df = runs.collect(tmp_path / "nothing-here")
    assert df.empty and set(runs.COLUMNS) <= set(df.columns)
    for name, t in report.all_tables(df).items():
        ours = t[[c for c in t.columns if c[0].startswith("ours")]]
        assert ours.isna().all().all(), name


def test_table1_layout_and_references(results):
    t = report.table1(runs.collect(results))
    assert list(t.index) == ["E2E", "R0", "E", "R1", "R1E"]
    sources = list(dict.fromkeys(t.columns.get_level_values(0)))
    assert sources == ["ours (digits)", "paper setting (CIFAR-10 ResNet-32), not comparable", report.CONTSUP_SLOT]
    ours, ref = t[sources[0]], t[sources[1]]
    assert ours.loc["R0", "test error (%)"] == 30.0 and ours.loc["R1E", "test error (%)"] == 20.0
    assert ours.loc["R1E", "peak activation (MiB)"] == pytest.approx(22.0)
    assert math.isnan(ours.loc["R1", "test error (%)"])  # not trained
    assert ref.loc["R0", "test error (%)"] == 24.59 and ref.loc["E2E", "test error (%)"] == 7.37
    assert math.isnan(ref.loc["E", "test error (%)"])  # InfoPro has no context supply
    shown = report.format_table(t)
    assert (shown[report.CONTSUP_SLOT] == report.MISSING).all().all()
    assert shown.loc["R1", (sources[0], "test error (%)")] == report.MISSING


def test_table2_layout_mean_over_seeds(results):
    t = report.table2(runs.collect(results))
    assert list(t.index) == [("E", "contrast"), ("E", "softmax"), ("R1E", "contrast"), ("R1E", "softmax")]
    assert list(dict.fromkeys(t.columns.get_level_values(1))) == ["E2E", "K=2", "K=4", "K=8", "K=16"]
    assert t.shape == (4, 15)
    assert t.loc[("E", "contrast"), ("ours (digits)", "K=4")] == 15.0  # seeds 0 and 1, balanced excluded
    assert t.loc[("E", "softmax"), ("ours (digits)", "K=16")] == 25.0
    assert (t[("ours (digits)", "E2E")] == 10.0).all()
    ref = "paper setting (CIFAR-10 ResNet-32), not comparable"
    assert t.loc[("R1E", "contrast"), (ref, "K=16")] == 12.75  # InfoPro contrast
    assert t.loc[("E", "softmax"), (ref, "K=8")] == 11.40      # InfoPro softmax


def test_table3_rows_per_paper_dataset(results):
    t = report.table3(runs.collect(results))
    assert list(t.index) == [(d, l) for d in ("CIFAR-10", "STL-10", "SVHN") for l in ("contrast", "softmax")]
    ours = [c for c in dict.fromkeys(t.columns.get_level_values(0)) if c.startswith("ours")][0]
    assert t.loc[("STL-10", "softmax"), (ours, "K=4")] == 12.5
    assert np.isnan(t.loc[("CIFAR-10", "softmax"), (ours, "K=4")])
    ref = [c for c in dict.fromkeys(t.columns.get_level_values(0)) if "not comparable" in c][0]
    assert t.loc[("STL-10", "softmax"), (ref, "K=4")] == 21.28 and t.loc[("SVHN", "contrast"), (ref, "E2E")] == 3.07


def test_table4_layout(results):
    t = report.table4(runs.collect(results))
    assert list(t.index) == ["E2E", *tables.RESIDUAL_MODES]
    ours = t["ours (digits)"]
    assert list(ours.columns) == ["K=8 error (%)", "K=8 peak activation (MiB)", "K=8 paper-counted memory (MiB)",
                                  "K=16 error (%)", "K=16 peak activation (MiB)", "K=16 paper-counted memory (MiB)"]
    assert ours.loc["E", "K=16 error (%)"] == 25.0 and math.isnan(ours.loc["E", "K=8 error (%)"])
    assert ours.loc["E2E", "K=8 error (%)"] == ours.loc["E2E", "K=16 error (%)"] == 10.0


def test_paper_counted_memory_beside_ours_and_missing_in_old_results(results):
    """Runs recorded before the paper-counted memory load and show it as '—'; newer ones
    show it beside our peak activations."""
    write_run(results, k=16, mode="R1", final_error=18.0, peak_mb=21.0, paper_mb=55.0)
    df = runs.collect(results)
    assert df.set_index("run").loc["digits-resnet32-K16-R1-softmax-seed0", "paper_memory_MiB"] == pytest.approx(55.0)
    t = report.table4(df)["ours (digits)"]
    assert t.loc["R1", "K=16 paper-counted memory (MiB)"] == pytest.approx(55.0)
    assert t.loc["R1", "K=16 peak activation (MiB)"] == pytest.approx(21.0)
    shown = report.format_table(report.table4(df))["ours (digits)"]
    assert shown.loc["E", "K=16 paper-counted memory (MiB)"] == report.MISSING  # an old result.json
    assert shown.loc["R1", "K=16 paper-counted memory (MiB)"] == "55.00"


def test_real_cifar_runs_are_labelled_comparable(tmp_path):
    write_run(tmp_path, dataset="cifar10", k=16, mode="R0", final_error=25.0)
    t = report.table1(runs.collect(tmp_path))
    assert "InfoPro paper (CIFAR-10 ResNet-32)" in t.columns.get_level_values(0)


def test_reference_table_is_the_published_one():
    t = report.reference_table()
    assert t.loc[("CIFAR-10", "ResNet-32", "InfoPro contrast"), "K=16"] == 12.75
    assert t.loc[("STL-10", "ResNet-110", "E2E"), "K=1"] == 22.27
    assert len(t) == len(tables.INFOPRO_REFERENCE) + len(tables.E2E_REFERENCE)


def _check_written(paths, names):
    assert [p.name for p in paths] == [f"{n}.{ext}" for n in names for ext in ("png", "pdf")]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000, p


def test_figures_are_written_with_partial_and_no_results(results, tmp_path):
    df = runs.collect(results)
    for data, out in ((df, tmp_path / "fig"), (runs.collect(tmp_path / "empty"), tmp_path / "fig-empty")):
        _check_written(figures.figure4(data, out), ["figure4_memory_vs_error"])
        _check_written(figures.figure4(data, out, authors=True), ["figure4_authors_memory_vs_error"])
        _check_written(figures.figure5(data, out), ["figure5_ablation"])
        _check_written(figures.table4_chart(data, out), ["table4_modes"])
    info = pd.DataFrame({"method": ["E2E"] * 3 + ["GLL (R0)"] * 3, "depth_fraction": [0, .5, 1] * 2,
                         "psnr_db": [30, 20, 15, 30, 18, 12], "probe_accuracy": [10, 60, 90, 10, 70, 85],
                         "is_cut": [False, False, False, False, True, False], "dataset": "digits",
                         "arch": "resnet32", "k": [1] * 3 + [2] * 3})
    _check_written(figures.motivation_figure(info, tmp_path / "fig"), ["motivation_information"])
    _check_written(figures.motivation_figure(pd.DataFrame(), tmp_path / "fig-empty"), ["motivation_information"])


# --------------------------------------------------------------------------------------
# The information study on one tiny, really trained run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder holding a ResNet-32 (K=4, R1E) after a few real local-learning steps on
    digits, saved as `train` saves it (config.json + ckpt.pt['model']); `train` itself would
    spend most of this test's budget evaluating the whole test set."""
    import torch
    from contsup.data import DeviceLoader, load_dataset
    from contsup.model import ContSupNet
    from contsup.step import local_learning_step
    from contsup.rundir import config_json
    from contsup.train import make_optimizer

    root = tmp_path_factory.mktemp("info")
    out = root / "runs" / "tiny-K4-R1E"
    cfg = TrainConfig(dataset=experiments.stand_in_dataset(), arch="resnet32", k=4, mode="R1E", epochs=1,
                      batch_size=32, lr=0.05, train_subset=128, device="cpu", out_dir=str(out))
    torch.manual_seed(0)
    net = ContSupNet(cfg.model_config())
    data = load_dataset(cfg.dataset, train_subset=cfg.train_subset)
    opt = make_optimizer(net, cfg)
    loader = DeviceLoader(data.train_x, data.train_y, tables.DATA_RECIPES[cfg.dataset], 32, train=True, device="cpu",
                          generator=torch.Generator().manual_seed(0))
    net.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: more threads only cost time on a busy CPU
    try:
        for x, y in loader:
            local_learning_step(net, x, y)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config_json(cfg)))
    torch.save({"model": net.state_dict(), "config": config_json(cfg)}, out / "ckpt.pt")
    return root, cfg


def test_load_run_gives_the_trained_net_and_its_layers(tiny_run):
    _, cfg = tiny_run
    net, stored = information.load_run(cfg.out_dir)
    assert not net.training and stored["k"] == cfg.k
    saved = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    layers = information.layer_table(net)
    assert len(layers) == 1 + 3 * tables.BLOCKS_PER_STAGE["resnet32"]  # stem + residual blocks
    assert layers[0]["name"] == "stem" and layers[-1]["name"] == "s3b4"
    assert [r["module"] for r in layers if r["is_cut"]] == list(range(cfg.k - 1))


def test_load_run_names_a_missing_run(tmp_path):
    with pytest.raises(UsageError, match="no trained run"):
        information.load_run(tmp_path)


def test_demo_runs_are_never_trained_beside_real_runs(tmp_path, capsys):
    write_run(tmp_path, k=8, mode="R1", finished=False)  # a failed or running registry run
    df = runs.collect_or_demo(tmp_path)
    assert df.empty and "no finished runs" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["digits-resnet32-K8-R1-softmax-seed0"]


def test_headline_mean_sd_and_what_is_beyond_seed_noise(tmp_path):
    """Three seeds each: R1E is far better than R0 (beyond noise), E barely differs from R0
    (within noise); the numbers are the plain mean and sample sd of the seeds."""
    errors = {"R0": (60.0, 62.0, 64.0), "E": (59.0, 63.0, 61.5), "R1E": (40.0, 41.0, 42.0)}
    for mode, values in errors.items():
        for seed, err in enumerate(values):
            write_run(tmp_path, k=16, mode=mode, final_error=err, seed=seed)
    for seed, err in enumerate((30.0, 31.0, 29.0)):
        write_run(tmp_path, k=1, mode="R0", final_error=err, seed=seed)
    df = runs.collect(tmp_path)
    h = report.headline(df)
    assert list(h.index) == ["E2E", "R0", "E", "R1E"]          # R1 was not trained
    assert h.loc["R1E", "mean (%)"] == pytest.approx(41.0) and h.loc["R1E", "sd (%)"] == pytest.approx(1.0)
    assert (h["seeds"] == 3).all()
    noise = report.seed_noise(df).set_index("comparison")
    assert bool(noise.loc["R1E - R0", "beyond noise"]) and noise.loc["R1E - R0", "difference (points)"] < -15
    assert not bool(noise.loc["E - R0", "beyond noise"])
    assert bool(noise.loc["R0 - E2E", "beyond noise"])
    paths = figures.headline_figure(df, tmp_path / "fig")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    # drawn again, the same picture: the seeds' dots are not jittered at random
    again = figures.headline_figure(df, tmp_path / "fig2")
    assert paths[0].suffix == ".png" and paths[0].read_bytes() == again[0].read_bytes()
    # The same verdicts in words, every number from the runs (notebook 04 prints this)
    text = report.headline_text(df).splitlines()
    assert text[0] == ("At K=16, plain greedy learning (R0) ends at 62.0 ± 2.0 % test error against "
                       "30.0 ± 1.0 % end-to-end (mean ± sd over seeds).")
    assert text[1].startswith("E against R0: +0.8 points") and text[1].endswith("within seed noise.")
    assert text[2].startswith("R1E against R0: +21.0 points") and text[2].endswith("beyond seed noise.")
    assert text[3].startswith("Closest to E2E: R1E, 11.0 points above it") and text[3].endswith("beyond seed noise.")
    assert text[4].startswith("E against R1E: R1E is 20.2 points lower") and text[4].endswith("beyond seed noise.")


def test_seed_noise_needs_two_seeds_a_side(results):
    assert report.seed_noise(runs.collect(results)).empty  # one seed per config: no verdict
    assert report.headline_text(runs.collect(results)).startswith("The headline needs E2E and R0 trained on two")


def _noisy_results(root, e2e_110=75.6):
    """A quick-profile-like set: ResNet-32 E2E and R0 over three seeds (seed sd 1), a table-2
    run that beats E2E by far more than that, ResNet-110 whose E2E did not train."""
    for seed, (e2e, r0) in enumerate(((15.0, 69.0), (16.0, 70.0), (17.0, 71.0))):
        write_run(root, dataset="digits8", k=1, mode="R0", final_error=e2e, seed=seed)
        write_run(root, dataset="digits8", k=16, mode="R0", final_error=r0, seed=seed)
    write_run(root, dataset="digits8", k=16, mode="E", final_error=30.0)
    write_run(root, dataset="digits8", k=8, mode="E", loss="contrast", final_error=9.0, peak_mb=3.0, paper_mb=11.0)
    write_run(root, dataset="digits8", k=4, mode="E", loss="contrast", final_error=17.0, peak_mb=4.0, paper_mb=12.0)
    write_run(root, dataset="digits8", arch="resnet110", k=1, mode="R0", final_error=e2e_110, peak_mb=32.0,
              paper_mb=52.0)
    for k, err in ((2, 84.0), (4, 61.0)):
        write_run(root, dataset="digits8", arch="resnet110", k=k, mode="R1E", loss="contrast", reconstruct=True,
                  loss_scales=tables.LOSS_SCALES[("resnet110", "cifar10")][k], final_error=err)
        write_run(root, dataset="digits8", arch="resnet110", k=k, mode="E", loss="contrast", final_error=err,
                  peak_mb=20.0 - k, paper_mb=40.0 - k)
    return runs.collect(root)


def test_seed_sd_pools_the_configs_trained_on_several_seeds(tmp_path):
    df = _noisy_results(tmp_path)
    sd, n = report.seed_sd(df)
    assert (round(sd, 6), n) == (1.0, 2)          # E2E 15/16/17 and R0 69/70/71: sd 1 each
    assert report.noise_margin(df) == pytest.approx(2 * math.sqrt(2))
    assert report.seed_sd(df[df["seed"] == 0]) == (pytest.approx(np.nan, nan_ok=True), 0)


def test_table_notes_name_the_noise_in_words(tmp_path):
    df = _noisy_results(tmp_path)
    t = report.all_tables(df)
    notes3 = report.table_notes(t["table3"], df)
    assert notes3.startswith("Noise: end-to-end reaches only 75.6 % error here (chance: 90 %)")
    assert "CIFAR-10/contrast K=2 84.0 %" in notes3            # at or above 67.5 %: learned little
    assert "CIFAR-10/contrast K=4 61.0 % against 75.6 %" in notes3   # beats E2E by 14.6 > 2.8 points
    notes2 = report.table_notes(t["table2"], df)
    assert "E/contrast K=8 9.0 % against 16.0 %" in notes2 and "2.8 points" in notes2
    assert "K=4 17.0" not in notes2                               # worse than E2E: nothing to say
    notes1 = report.table_notes(t["table1"], df)
    assert "learned little: R0 70.0 %" in notes1 and "beat" not in notes1
    # a table whose every entry learned and none beats E2E says so
    clean = df[(df["arch"] == "resnet32") & ~((df["k"] == 8) | (df["mode"] == "R0") & (df["k"] == 16))]
    assert report.table_notes(report.table1(clean), df).startswith("Every entry learned (all below 67.5 %")
    assert report.table_notes(report.table1(df.iloc[0:0]), df) == ""


def _crowded_results(root):
    """Figure 4's ResNet-32 panel as the quick profile drew it: K=16, K=8 and K=4 of both
    series within 0.2 MiB of each other, every point within seed noise (E2E over three seeds,
    sd 3: margin 2·√2·3 = 8.5 points); softmax runs of Figure 5 / Table 4 within noise at
    K=16, beyond it at K=8."""
    for seed, e2e in enumerate((12.0, 15.0, 18.0)):
        write_run(root, dataset="digits8", k=1, mode="R0", final_error=e2e, peak_mb=9.7, paper_mb=15.0, seed=seed)
    for k, err, mb in ((8, 17.0, 4.0), (4, 14.2, 4.1), (2, 12.4, 5.6)):
        write_run(root, dataset="digits8", k=k, mode="E", loss="contrast", balanced=True, final_error=err,
                  peak_mb=mb, paper_mb=mb + 9)
    for k, err, mb in ((16, 18.0, 4.1), (4, 17.6, 3.9), (8, 10.2, 3.9), (2, 13.0, 7.0)):
        write_run(root, dataset="digits8", k=k, mode="E", loss="contrast", final_error=err, peak_mb=mb,
                  paper_mb=mb + 8)
    for k, r0, e in ((16, 20.0, 18.0), (8, 19.0, 35.0)):
        write_run(root, dataset="digits8", k=k, mode="R0", final_error=r0, peak_mb=3.0)
        write_run(root, dataset="digits8", k=k, mode="E", final_error=e, peak_mb=3.5)
    return runs.collect(root)


def _area(a, b) -> float:
    return max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _drawn_labels(fig, renderer) -> list[tuple]:
    """(name, box) of every piece of text of `fig` as drawn: titles, notes and point labels,
    axis labels, the tick labels inside the view, legends."""
    from matplotlib.transforms import Bbox
    out = [("suptitle", fig._suptitle)] if fig._suptitle is not None else []
    out += [("legend", legend) for legend in fig.legends]
    for i, ax in enumerate(fig.axes):
        out += [(f"panel {i}: {t.get_text()!r}", t) for t in (ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts)]
        out += [(f"panel {i}: legend", ax.get_legend())] if ax.get_legend() else []
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            ticks = zip(axis.get_ticklocs(), axis.get_ticklabels())
            out += [(f"panel {i}: tick {t.get_text()!r}", t) for loc, t in ticks
                    if t.get_visible() and lo - 1e-6 * (hi - lo) <= loc <= hi + 1e-6 * (hi - lo)]
    return [(name, Bbox(artist.get_window_extent(renderer))) for name, artist in out
            if not hasattr(artist, "get_text") or artist.get_text()]


def _drawn_markers(fig) -> list[tuple]:
    """(panel, box) of every marker of every line and every dot of a scatter/strip plot."""
    from matplotlib.collections import PathCollection
    from matplotlib.transforms import Bbox
    out, px = [], fig.dpi / 72
    for i, ax in enumerate(fig.axes):
        for line in ax.get_lines():
            if line.get_marker() not in (None, "None", "", " "):
                half = line.get_markersize() / 2 * px
                out += [(i, Bbox([[x - half, y - half], [x + half, y + half]]))
                        for x, y in ax.transData.transform(line.get_xydata())]
        for dots in (c for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())):
            half = math.sqrt(max(dots.get_sizes())) / 2 * px
            out += [(i, Bbox([[x - half, y - half], [x + half, y + half]]))
                    for x, y in ax.transData.transform(dots.get_offsets())]
    return out


def assert_labels_clear(fig):
    """No label covers another label, a marker or a tick label (as drawn, in pixels); legends
    sit below the panels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels, markers = _drawn_labels(fig, renderer), _drawn_markers(fig)
    clashes = [(a, b) for i, (a, box) in enumerate(labels) for b, other in labels[i + 1:] if _area(box, other) > 0.5]
    clashes += [(a, f"a marker of panel {p}") for a, box in labels for p, m in markers if _area(box, m) > 0.5]
    assert not clashes, clashes
    assert all(ax.get_legend() is None for ax in fig.axes)
    for legend in fig.legends:
        assert all(legend.get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0 + 1 for ax in fig.axes)


FIGURES = {
    "figure4": lambda df, out: figures.figure4(df, out, show=True),
    "figure4-authors": lambda df, out: figures.figure4(df, out, show=True, authors=True),
    "figure5": lambda df, out: figures.figure5(df, out, show=True),
    "table4": lambda df, out: figures.table4_chart(df, out, show=True),
    "headline": lambda df, out: figures.headline_figure(df, out, show=True),
}


@pytest.mark.parametrize("name", FIGURES)
def test_no_label_covers_a_label_a_marker_or_a_tick(tmp_path, name):
    """Issue 22: Figure 4's ResNet-32 labels K=16 and K=4 collided and hid a marker. Every
    figure, on crowded, noisy, partial and no results."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for i, df in enumerate((_crowded_results(tmp_path / "crowded"), _noisy_results(tmp_path / "noisy"),
                            runs.collect(_partial_results(tmp_path / "partial")), runs.collect(tmp_path / "empty"))):
        FIGURES[name](df, tmp_path / f"fig{i}")
        assert_labels_clear(plt.gcf())
        plt.close("all")


def test_motivation_figure_labels_clear(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    info = pd.DataFrame({"method": ["E2E"] * 3 + ["GLL (R0)"] * 3, "depth_fraction": [0, .5, 1] * 2,
                         "psnr_db": [30, 20, 15, 30, 18, 12], "probe_accuracy": [10, 60, 90, 10, 70, 85],
                         "is_cut": [False, False, False, False, True, False], "dataset": "digits",
                         "arch": "resnet32", "k": [1] * 3 + [2] * 3})
    figures.motivation_figure(info, tmp_path, show=True)
    assert_labels_clear(plt.gcf())
    plt.close("all")


def test_figure_panels_carry_their_computed_noise_note(tmp_path):
    """Issue 22: a panel within seed noise says so, with the margin computed from the runs'
    seeds (`noise_margin`); Figure 5 and the Table 4 chart name the K where the modes are
    within it. Figure 4's ResNet-110 panel keeps its E2E-did-not-train flag."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    df = _crowded_results(tmp_path / "r")
    margin = report.noise_margin(df)
    assert margin == pytest.approx(2 * math.sqrt(2) * 3)
    figures.figure4(df, tmp_path / "fig", show=True)
    title = " ".join(plt.gcf().axes[0].get_title().split())
    assert f"noise: points within seed noise ({margin:.1f} points) of each other" in title
    figures.figure5(df, tmp_path / "fig", show=True)
    softmax = " ".join(plt.gcf().axes[0].get_title().split())
    assert softmax == f"softmax noise: modes within seed noise ({margin:.1f} points) of each other at K=16"
    figures.table4_chart(df, tmp_path / "fig", show=True)
    assert " ".join(plt.gcf().axes[0].get_title().split()) == \
        f"noise: modes within seed noise ({margin:.1f} points) of each other at K=16"
    plt.close("all")
    noisy = _noisy_results(tmp_path / "n")
    figures.figure4(noisy, tmp_path / "fig", show=True)
    assert "noise: E2E did not train" in plt.gcf().axes[1].get_title()
    figures.figure5(noisy, tmp_path / "fig", show=True)   # R0 70 against E 30 at K=16: far apart
    assert "modes apart by more than seed noise (2.8 points)" in " ".join(plt.gcf().axes[0].get_title().split())
    plt.close("all")
    one_seed = noisy[noisy["seed"] == 0]
    assert report.spread_note({16: [70.0, 30.0]}, one_seed).startswith("noise unknown")
    assert report.spread_note({16: [70.0]}, noisy) == ""


def test_figure4_notes_in_words(tmp_path):
    df = _noisy_results(tmp_path / "r")
    notes = figures.figure4_notes(df)
    assert notes.splitlines()[1].startswith("ResNet-110: Noise: end-to-end reaches only 75.6 %")


def test_notebook_02_default_folder_is_named_after_the_run():
    import shutil
    from pathlib import Path
    jobs = runs.notebook_jobs(dict(dataset="digits8", arch="resnet32", k=4, mode="R1E", epochs=1), None)
    try:
        assert Path(jobs[0].out_dir).name == "digits8-resnet32-K4-R1E-softmax-seed0"
    finally:
        shutil.rmtree(Path(jobs[0].out_dir).parent)


def test_table_notes_call_nothing_beyond_an_unknown_seed_noise(tmp_path):
    write_run(tmp_path, dataset="digits8", k=1, mode="R0", final_error=35.4)
    write_run(tmp_path, dataset="digits8", k=4, mode="R1E", final_error=35.2)
    df = runs.collect(tmp_path)
    notes = report.table_notes(report.table2(df), df)
    assert notes.splitlines() == ["Every entry learned (all below 67.5 % error, chance 90 %).",
                                  "Seed noise is unknown (no config was trained on several seeds): no difference "
                                  "from end-to-end can be called beyond it."]
