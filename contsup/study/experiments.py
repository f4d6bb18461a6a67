"""The experiment registry: every run of METHOD §6 as named groups, under three profiles.

A *group* (`GROUPS`) lists the runs one table or figure of the paper needs, as the paper
states them (dataset, arch, K, context mode, local loss, reconstruction, balanced cuts).
A *profile* decides how each run is trained:

- `paper`: the recipe of METHOD §5 on the paper's datasets: 160 epochs (10 warm-up), SGD
  Nesterov, cosine schedule, the dataset's batch size and learning rate
  (`tables.DATA_RECIPES`: CIFAR-10/SVHN 1024 / 0.8, STL-10 128 / 0.1). Datasets are
  downloaded on first use.
- `quick`: the same grid on scikit-learn's digits at their native 8x8 resolution
  (`digits8`, standing in for CIFAR-10, SVHN and STL-10 alike), ResNet-32 and ResNet-110 as
  in the paper, QUICK_EPOCHS epochs of batch QUICK_BATCH, minutes on a CPU (`make demo`;
  `summary.json` records how long it took). The numbers show trends on a toy problem, not
  the paper's accuracies.
- `smoke`: seconds per run (64 images, one epoch), for tests of the plumbing.

Where a profile trains a stand-in (digits8 for CIFAR-10...), the run's config says what is
really trained and the `Run` keeps the paper's dataset/arch beside it (`paper_dataset`,
`paper_arch`); the table and figure notebooks label rows with those.

Run names are derived from the trained config alone:
`<dataset>-<arch>-K<k>-<mode>-<loss>[-recon[<scales>]][-balanced]-seed<n>` (`K1-E2E` for
end-to-end). The scales appear in the name only when they are not the ones `train` would
pick for that config by itself (e.g. the STL-10 scales of Table 3 trained on digits8).
Two groups that need the same config share one run folder: `expand_all` dedups by name.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .. import tables
from ..errors import UsageError
from ..model import parse_mode
from ..train import TrainConfig

# --------------------------------------------------------------------------------------
# Groups (METHOD §6)
GROUPS = {
    "e2e": "End-to-end (K=1) baselines: ResNet-32 CIFAR-10, ResNet-110 CIFAR-10/SVHN/STL-10",
    "table1": f"Table 1: ResNet-32 CIFAR-10 K=16 softmax, modes {'/'.join(tables.ABLATION_MODES)}",
    "table2": "Table 2: ResNet-32 CIFAR-10 K=2..16, modes E/R1E x contrast/softmax",
    "table3": "Table 3: ResNet-110 R1E + reconstruction, contrast/softmax x K=2..16 x CIFAR-10/STL-10/SVHN",
    "figure4": "Figure 4: memory-balanced E* (contrast) vs equal-layer cuts and E2E, ResNet-32/110 CIFAR-10",
    "figure4-authors": "Figure 4 as the authors' command.sh trains it: ResNet-32 E* with equal-layer cuts, "
                       "ResNet-110 E* memory-balanced (runs shared with figure4/table2)",
    "figure5": "Figure 5: ablation ResNet-32 CIFAR-10 K=2..16: softmax, +reconstruction (R0 = GDL), contrast",
    "table4": f"Table 4: ResNet-32 CIFAR-10 K=8/16, modes {'/'.join(tables.RESIDUAL_MODES)}",
    "motivation": "Runs the information study (notebook 01) probes: ResNet-32 CIFAR-10 K=8 softmax E2E/R0/E/R1E",
    "headline": f"Table 1 over seeds 0-2 with E2E: ResNet-32 CIFAR-10 K=16 softmax {'/'.join(tables.ABLATION_MODES)} "
                "(error bars)",
}
PROFILES = ("paper", "quick", "smoke")
MOTIVATION_K = 8   # the K at which the information study compares E2E, GLL and ContSup
MOTIVATION_MODES = ("R0", "E", "R1E")   # ... and the modes it compares there
HEADLINE_SEEDS = (0, 1, 2)  # the paper reports single runs; three seeds show what is beyond seed noise

KS = tables.KS


@dataclass(frozen=True)
class Spec:
    """One run as the paper states it, before a profile decides how it is trained."""
    dataset: str
    arch: str
    k: int
    mode: str = "R0"
    loss: str = "softmax"
    reconstruct: bool = False
    balanced: bool = False
    seed: int = 0


def _e2e(dataset: str, arch: str) -> Spec:
    return Spec(dataset, arch, 1)  # mode R0 / softmax: the canonical K=1 config


def _group_specs(group: str) -> list[Spec]:
    r32 = lambda k, mode, loss="softmax", **kw: Spec("cifar10", "resnet32", k, mode, loss, **kw)  # noqa: E731
    if group == "e2e":
        return [_e2e("cifar10", "resnet32"), _e2e("cifar10", "resnet110"),
                _e2e("svhn", "resnet110"), _e2e("stl10", "resnet110")]
    if group == "table1":
        return [r32(16, mode) for mode in tables.ABLATION_MODES]
    if group == "table2":
        return [r32(k, mode, loss) for mode in ("E", "R1E") for loss in ("contrast", "softmax") for k in KS]
    if group == "table3":
        return [Spec(data, "resnet110", k, "R1E", loss, reconstruct=True)
                for data in ("cifar10", "stl10", "svhn") for loss in ("contrast", "softmax") for k in KS]
    if group in ("figure4", "figure4-authors"):
        # The authors' command.sh trains E* with the contrast loss; the equal-layer E runs
        # (contrast) and E2E are the reference points of the memory/error plot. `figure4`
        # follows the paper's text: E* = memory-balanced cuts for both archs. The authors'
        # command.sh passes --balanced_memory only to ResNet-110, so their ResNet-32 "E*"
        # points are the equal-layer runs: `figure4-authors` lists those (every one of its
        # runs is also a figure4 run; the registry's dedup by name trains none twice).
        specs = []
        for arch, ks in (("resnet32", KS), ("resnet110", (2, 3, 4))):
            if group == "figure4" or arch == "resnet110":
                specs += [Spec("cifar10", arch, k, "E", "contrast", balanced=True) for k in ks]
            specs += [Spec("cifar10", arch, k, "E", "contrast") for k in ks]
            specs.append(_e2e("cifar10", arch))
        return specs
    if group == "figure5":
        # As in the authors' command.sh: the contrast variants are E/R1/R1E (R0's reference
        # lines are the softmax greedy baseline and GDL = R0 + reconstruction).
        modes = tables.ABLATION_MODES
        return ([r32(k, m) for m in modes for k in KS]
                + [r32(k, m, reconstruct=True) for m in modes for k in KS]
                + [r32(k, m, "contrast") for m in modes[1:] for k in KS])
    if group == "table4":
        modes = tables.RESIDUAL_MODES
        return [r32(k, m) for k in (8, 16) for m in modes if parse_mode(m, None).fits(k)]
    if group == "motivation":
        return [_e2e("cifar10", "resnet32")] + [r32(MOTIVATION_K, m) for m in MOTIVATION_MODES]
    if group == "headline":  # seed 0 of each is table1's (and e2e's) run: only seeds 1, 2 are new
        return [replace(spec, seed=seed) for seed in HEADLINE_SEEDS
                for spec in [_e2e("cifar10", "resnet32"), *_group_specs("table1")]]
    raise UsageError(f"unknown group '{group}'; choose one of: {', '.join(GROUPS)}")


# --------------------------------------------------------------------------------------
# Profiles
@dataclass(frozen=True)
class Profile:
    """How the runs of a profile are trained. `dataset` None = the paper's own dataset."""
    dataset: str | None
    epochs: int
    warmup_epochs: int
    batch_size: int | None = None   # None = the paper's for the dataset
    lr: float | None = None         # None = the paper's for the dataset
    train_subset: int | None = None
    download: bool = False


# Scaling of the quick profile.
# Three epochs: the authors' schedule trains the last epoch at lr 0, so two would leave one.
QUICK_EPOCHS, QUICK_BATCH, QUICK_LR = 3, 64, 0.05


def stand_in_dataset() -> str:
    """The embedded data set the quick and smoke profiles train on."""
    return "digits8" if "digits8" in tables.DATA_RECIPES else "digits"


def profile_settings(profile: str) -> Profile:
    if profile == "paper":
        return Profile(None, tables.PAPER_SCHEDULE.epochs, tables.PAPER_SCHEDULE.warmup_epochs, download=True)
    if profile == "quick":
        return Profile(stand_in_dataset(), QUICK_EPOCHS, 0, QUICK_BATCH, QUICK_LR)
    if profile == "smoke":
        return Profile(stand_in_dataset(), 1, 0, batch_size=32, lr=0.05, train_subset=64)
    raise UsageError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One training run: its group, its folder name and what is trained.

    `config` is what is really trained; `paper_dataset`/`paper_arch` say which entry of
    the paper it stands for (they differ from the config under the quick/smoke profiles).
    """
    group: str
    name: str
    config: TrainConfig
    paper_dataset: str
    paper_arch: str

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)


def paper_scales(arch: str, dataset: str, k: int, balanced: bool = False) -> tuple:
    """The paper's reconstruction scales for this entry; where the paper has none for the
    dataset, the ones of the same arch/K on CIFAR-10; else a UsageError."""
    try:
        return tables.loss_scales(arch, dataset, k, balanced)
    except UsageError:
        if dataset == "cifar10":
            raise
        return tables.loss_scales(arch, "cifar10", k, balanced)


def _fmt(v: float) -> str:
    return f"{v:g}"


def run_name(cfg: TrainConfig) -> str:
    """A unique, filesystem-safe name derived from the trained config (see module doc)."""
    if cfg.k == 1:
        parts = [cfg.dataset, cfg.arch, "K1", "E2E"]
    else:
        parts = [cfg.dataset, cfg.arch, f"K{cfg.k}", cfg.mode, cfg.loss]
    if cfg.head != "1c2f":
        parts.append(f"head{cfg.head}")
    if cfg.widen != 1.0:
        parts.append(f"widen{_fmt(cfg.widen)}")
    if cfg.reconstruct:
        try:
            own = tables.loss_scales(cfg.arch, cfg.dataset, cfg.k, cfg.balanced)
        except UsageError:
            own = None
        scales = cfg.loss_scales or own
        parts.append("recon" if tuple(scales) == own else "recon" + "_".join(_fmt(v) for v in scales))
    if cfg.balanced:
        parts.append("balanced")
    parts.append(f"seed{cfg.seed}")
    return "-".join(parts)


def _config(spec: Spec, prof: Profile, out: Path, group: str) -> TrainConfig:
    dataset = prof.dataset or spec.dataset
    scales = None
    if spec.reconstruct:
        try:
            scales = paper_scales(spec.arch, spec.dataset, spec.k, spec.balanced)
        except UsageError as e:
            raise UsageError(f"group {group}: {e}") from None
    cfg = TrainConfig(dataset=dataset, arch=spec.arch, k=spec.k, mode=spec.mode, loss=spec.loss,
                      reconstruct=spec.reconstruct, loss_scales=scales, balanced=spec.balanced,
                      epochs=prof.epochs, batch_size=prof.batch_size, lr=prof.lr,
                      warmup_epochs=prof.warmup_epochs, train_subset=prof.train_subset,
                      download=prof.download, seed=spec.seed)
    # Fail at expand time on anything the model would refuse (cut tables, modes vs K).
    tables.cut_points(cfg.arch, cfg.k, cfg.balanced, cfg.dataset)
    parse_mode(cfg.mode, cfg.k)
    return replace(cfg, out_dir=str(out / "runs" / run_name(cfg)))


def expand(group: str, profile: str, out) -> list[Run]:
    """The runs of one group under one profile, with their folders under `<out>/runs/`."""
    specs = _group_specs(group)
    prof = profile_settings(profile)
    out = Path(out)
    runs = []
    for spec in specs:
        cfg = _config(spec, prof, out, group)
        runs.append(Run(group, Path(cfg.out_dir).name, cfg, spec.dataset, spec.arch))
    return runs


def check_groups(only) -> list[str]:
    groups = list(GROUPS) if not only else list(dict.fromkeys(only))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UsageError(f"unknown group {', '.join(repr(g) for g in unknown)}; "
                         f"choose from: {', '.join(GROUPS)}")
    return groups


def expand_all(profile: str, out, only: list[str] | None = None) -> list[Run]:
    """The runs of the chosen groups (all by default), deduped by name: a config two
    groups share runs once, under the first group that needs it."""
    profile_settings(profile)  # a bad profile is named before a bad group
    seen: dict[str, Run] = {}
    for group in check_groups(only):
        for run in expand(group, profile, out):
            first = seen.setdefault(run.name, run)
            if first.config != run.config:  # a name must identify a config
                raise RuntimeError(f"run name {run.name} stands for two configs: {first.config} / {run.config}")
    return list(seen.values())


def runs_by_group(profile: str, out, only: list[str] | None = None) -> dict[str, list[Run]]:
    """Every group's own runs, before dedup (what the table/figure notebooks look up)."""
    return {group: expand(group, profile, out) for group in check_groups(only)}
