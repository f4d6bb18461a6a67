"""The motivation study (METHOD §1, §6): how much a trained network's hidden features h still
know about the input x and the label y, layer by layer.

Greedy local learning is said to throw information about x away layer after layer faster
than end-to-end training, while pushing information about y up too early; context supply
should give later modules x-information back. Both mutual informations are estimated with
the usual proxies (InfoPro, Wang et al. 2021), on features taken from the frozen network
(eval mode, context composed exactly as in `ContSupNet.forward`):

- I(h, x): a small decoder of the paper's reconstruction shape is trained on frozen h; its
  reconstruction PSNR (dB) on held-out test images is reported.
- I(h, y): a linear probe on frozen h; its test accuracy (%) is reported.

Both proxies are computed in notebooks/01_information_motivation.ipynb, in cells a reader
can follow. This module holds what that notebook and notebook 04 share: the probes'
budgets, loading a trained run and naming its layers, and the per-method summary of the
study's table (`<results_dir>/motivation/information.csv`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from .. import tables
from ..errors import UsageError
from ..model import ContSupNet
from ..rundir import load_checkpoint
from ..train import TrainConfig


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
                                # threads on a shared CPU cost many times more.
    seed: int = 0


# Per profile, sized for a 2-core CPU and four ResNet-32 runs: 32x32 inputs (digits, CIFAR
# size) cost 16x more per decoder step than 8x8 ones (digits8), which get their own budgets.
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


def data_root(root: str) -> str:
    """A relative data root as the run saw it, or else relative to the repository (the
    notebooks run from notebooks/)."""
    if Path(root).is_dir() or Path(root).is_absolute():
        return root
    repo = Path(__file__).resolve().parents[1] / root
    return str(repo) if repo.is_dir() else root


def load_study(results_dir) -> pd.DataFrame:
    """The cached study of `<results_dir>/motivation/information.csv`, or an empty frame."""
    csv = Path(results_dir) / "motivation" / "information.csv"
    return pd.read_csv(csv) if csv.exists() else pd.DataFrame()


def summary(info: pd.DataFrame) -> pd.DataFrame:
    """Per method, the numbers the argument is about: test error; reconstruction PSNR at
    the input, averaged over the layers after the first cut (the column says "mean"), and at
    the last layer; probe accuracy averaged over the first half of the layers ("mean") and at
    the last layer."""
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
                        "mean PSNR after 1st cut (dB)": after["psnr_db"].mean(),
                        "PSNR last layer (dB)": g["psnr_db"].iloc[-1],
                        "mean probe, 1st half (%)": first_half["probe_accuracy"].mean(),
                        "probe last layer (%)": g["probe_accuracy"].iloc[-1]}
    out = pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")
    order = [m for m in ("E2E", "GLL (R0)", "ContSup E", "ContSup R1E") if m in out.index]
    return out.loc[order + [m for m in out.index if m not in order]]
