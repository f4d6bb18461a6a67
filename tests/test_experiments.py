"""The experiment registry: every group of METHOD §6 expands, with the paper's recipe."""
from pathlib import Path

import pytest

from contsup import tables
from contsup.study import experiments
from contsup.errors import UsageError
from contsup.model import ContSupNet, parse_mode

COUNTS = {"e2e": 4, "table1": 4, "table2": 16, "table3": 24, "figure4": 16, "figure4-authors": 12, "figure5": 44,
          "table4": 13, "motivation": 4, "headline": 15}


def test_every_group_is_counted():
    assert set(COUNTS) == set(experiments.GROUPS)


@pytest.mark.parametrize("profile", experiments.PROFILES)
@pytest.mark.parametrize("group", list(experiments.GROUPS))
def test_group_expands(group, profile, tmp_path):
    runs = experiments.expand(group, profile, tmp_path)
    assert len(runs) == COUNTS[group]
    by_name = {}
    for r in runs:  # a name stands for one config; under a stand-in data set, the E2E
        # baselines of CIFAR-10, SVHN and STL-10 are one config (and one run)
        assert by_name.setdefault(r.name, r.config) == r.config
    if profile == "paper" or group != "e2e":
        assert len(by_name) == len(runs)
    for r in runs:
        assert r.group == group
        assert Path(r.config.out_dir) == tmp_path / "runs" / r.name
        assert r.name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        assert parse_mode(r.config.mode, r.config.k).n <= r.config.k  # R-modes never exceed K
        if profile == "paper":
            assert (r.config.dataset, r.config.arch) == (r.paper_dataset, r.paper_arch)


@pytest.mark.parametrize("profile", experiments.PROFILES)
def test_expand_all_dedups_by_name(profile, tmp_path):
    runs = experiments.expand_all(profile, tmp_path)
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    every = {r.name for g in experiments.GROUPS for r in experiments.expand(g, profile, tmp_path)}
    assert set(names) == every
    # a config two groups need is trained once: Table 1's R1E is also Figure 5's
    t1 = experiments.expand("table1", profile, tmp_path)[-1]
    assert names.count(t1.name) == 1 and t1.config.mode == "R1E"
    assert t1.name in {r.name for r in experiments.expand("figure5", profile, tmp_path)}


def test_paper_profile_uses_the_paper_recipe(tmp_path):
    runs = experiments.expand_all("paper", tmp_path)
    assert len(runs) == 99  # 89 distinct runs of the paper, + seeds 1 and 2 of the 5 headline configs
    recipe = {"cifar10": (1024, 0.8), "svhn": (1024, 0.8), "stl10": (128, 0.1)}
    for r in runs:
        c = r.config
        assert (c.epochs, c.warmup_epochs, c.train_subset) == (160, 10, None)
        assert (c.batch_size, c.lr) == recipe[c.dataset]
        assert c.head == "1c2f" and c.widen == 1.0
        assert c.seed == 0 or r.group == "headline"   # only the headline repeats seeds
    datasets = {(r.config.dataset, r.config.arch) for r in runs}
    assert datasets == {("cifar10", "resnet32"), ("cifar10", "resnet110"), ("svhn", "resnet110"),
                        ("stl10", "resnet110")}


def test_paper_configs_build(tmp_path):
    """Every paper config gives a network (cuts, modes, loss scales all resolve)."""
    for r in experiments.expand_all("paper", tmp_path):
        net = ContSupNet(r.config.model_config())
        assert net.k == r.config.k


def test_reconstruction_runs_carry_the_papers_scales(tmp_path):
    for profile in experiments.PROFILES:
        t3 = experiments.expand("table3", profile, tmp_path)
        for r in t3:
            assert r.config.reconstruct and r.config.mode == "R1E" and r.config.arch == "resnet110"
            assert r.config.loss_scales == tables.LOSS_SCALES[("resnet110", r.paper_dataset)][r.config.k]
        for r in experiments.expand("figure5", profile, tmp_path):
            if r.config.reconstruct:
                assert r.config.loss_scales == tables.LOSS_SCALES[("resnet32", "cifar10")][r.config.k]
    # GDL = R0 + reconstruction is in Figure 5
    figure5 = experiments.expand("figure5", "paper", tmp_path)
    assert any(r.config.mode == "R0" and r.config.reconstruct for r in figure5)


def test_missing_scales_fall_back_to_cifar10_or_fail():
    assert experiments.paper_scales("resnet32", "svhn", 4) == tables.loss_scales("resnet32", "cifar10", 4)
    with pytest.raises(UsageError, match="scales"):
        experiments.paper_scales("resnet32", "cifar10", 3)


def test_figure4_is_memory_balanced_E(tmp_path):
    runs = experiments.expand("figure4", "paper", tmp_path)
    balanced = [(r.config.arch, r.config.k) for r in runs if r.config.balanced]
    assert balanced == [("resnet32", k) for k in (2, 4, 8, 16)] + [("resnet110", k) for k in (2, 3, 4)]
    assert all(r.config.mode == "E" for r in runs if r.config.k > 1)
    assert sum(r.config.k == 1 for r in runs) == 2  # E2E references
    r = next(r for r in runs if r.config.balanced and r.config.arch == "resnet110" and r.config.k == 3)
    assert r.name == "cifar10-resnet110-K3-E-contrast-balanced-seed0"
    assert ContSupNet(r.config.model_config()).cuts == tables.BALANCED_CUTS[("resnet110", "cifar10")][3]


@pytest.mark.parametrize("profile", ["paper", "quick"])
def test_figure4_authors_variant_reuses_runs(profile, tmp_path):
    """The authors' command.sh: ResNet-32 E* without --balanced_memory (equal cuts, the
    runs Table 2 and figure4 already train), ResNet-110 E* with it. No new run."""
    runs = experiments.expand("figure4-authors", profile, tmp_path)
    assert [(r.config.arch, r.config.k) for r in runs if r.config.balanced] == [("resnet110", k) for k in (2, 3, 4)]
    r32 = {r.name for r in runs if r.config.arch == "resnet32" and r.config.k > 1}
    assert r32 == {r.name for r in experiments.expand("table2", profile, tmp_path)
                   if r.config.mode == "E" and r.config.loss == "contrast"}
    others = [g for g in experiments.GROUPS if g != "figure4-authors"]
    without = {r.name for r in experiments.expand_all(profile, tmp_path, others)}
    assert {r.name for r in experiments.expand_all(profile, tmp_path)} == without
    assert {r.name for r in runs} <= {r.name for r in experiments.expand("figure4", profile, tmp_path)}


def test_table4_modes_valid_for_K(tmp_path):
    runs = experiments.expand("table4", "paper", tmp_path)
    assert sorted((r.config.k, r.config.mode) for r in runs if r.config.k == 8) == \
        sorted((8, m) for m in ("R0", "E", "R1", "R2", "R4", "R8"))
    assert {r.config.mode for r in runs if r.config.k == 16} == {"R0", "E", "R1", "R2", "R4", "R8", "R16"}


def test_quick_and_smoke_stand_in_honestly(tmp_path):
    for profile in ("quick", "smoke"):
        runs = experiments.expand("table3", profile, tmp_path)
        stand_in = runs[0].config.dataset
        assert stand_in.startswith("digits")
        assert all(r.config.dataset == stand_in and r.name.startswith(stand_in) for r in runs)
        assert {r.paper_dataset for r in runs} == {"cifar10", "stl10", "svhn"}
        # same trained dataset, different paper scales: still 24 distinct runs
        assert len({r.name for r in runs}) == 24
    smoke = experiments.expand_all("smoke", tmp_path)
    assert all(r.config.epochs == 1 and r.config.train_subset <= 128 for r in smoke)


@pytest.mark.parametrize("call,hint", [
    (lambda out: experiments.expand("table9", "paper", out), "table1"),
    (lambda out: experiments.expand("table1", "fast", out), "quick"),
    (lambda out: experiments.expand_all("paper", out, ["table1", "tabel2"]), "figure4"),
])
def test_unknown_names_raise_usage_error(call, hint, tmp_path):
    with pytest.raises(UsageError, match=hint):
        call(tmp_path)


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_headline_adds_only_the_new_seeds(profile, tmp_path):
    """Seed 0 of every headline config is Table 1's (or the E2E baseline's) run; seeds 1 and 2
    are new runs, named apart by their seed."""
    without = {r.name for r in experiments.expand_all(profile, tmp_path, [g for g in experiments.GROUPS
                                                                        if g != "headline"])}
    headline = experiments.expand("headline", profile, tmp_path)
    assert {r.config.seed for r in headline} == set(experiments.HEADLINE_SEEDS)
    new = {r.name for r in headline} - without
    assert len(new) == 5 * (len(experiments.HEADLINE_SEEDS) - 1)
    assert all(not name.endswith("seed0") for name in new)
    seed0 = {r.name for r in headline if r.config.seed == 0}
    assert seed0 <= without and len(seed0) == 5

