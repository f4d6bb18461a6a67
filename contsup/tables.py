"""The paper's tables, as data, in one place (METHOD §3, §4, §5, §7, §8).

Everything the method needs to know about *where* a network is cut, *how strongly* the
reconstruction term is weighted and *which recipe* trains each dataset lives here. Code
elsewhere looks values up through the small functions at the bottom, which raise a
`UsageError` naming the valid choices when a combination is not in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

# --------------------------------------------------------------------------------------
# Networks (METHOD §3). Blocks per stage of the CIFAR ResNets; widths are 16/32/64.
KS = (2, 4, 8, 16)                  # the numbers of local modules the paper's tables compare
ABLATION_MODES = ("R0", "E", "R1", "R1E")                        # Table 1, Figure 5
RESIDUAL_MODES = ("R0", "E", "R1", "R2", "R4", "R8", "R16")       # Table 4: how far back the context reaches
BLOCKS_PER_STAGE = {"resnet32": 5, "resnet110": 18}
STAGE_WIDTHS = (16, 32, 64)
# Backbone parameter counts with 10 classes (METHOD §8), checked by a test.
BACKBONE_PARAMS = {"resnet32": 466_906, "resnet110": 1_730_714}

# --------------------------------------------------------------------------------------
# Cut points: the (stage, block) after which a local module ends; stage 0 is the stem.
# K modules need K-1 cuts; K=1 (end-to-end) has none.
_r32 = [(0, 0), *[(1, b) for b in range(5)], *[(2, b) for b in range(5)], *[(3, b) for b in range(4)]]
EQUAL_CUTS = {
    "resnet32": {
        2: [(2, 1)],
        3: [(1, 4), (2, 4)],
        4: [(1, 2), (2, 1), (3, 0)],
        8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
        16: _r32,
    },
    "resnet110": {
        2: [(2, 8)],
        3: [(1, 17), (2, 17)],
        4: [(1, 11), (2, 7), (3, 3)],
        8: [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
        16: [(1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7),
             (2, 11), (2, 15), (3, 1), (3, 5), (3, 9), (3, 13)],
    },
}
# Memory-balanced cuts (the paper's E*), keyed by (arch, table). The cuts only depend on
# the activation sizes, i.e. on the input resolution, so 32x32 datasets share the CIFAR-10
# table and 96x96 ones the STL-10 table (see `balanced_table_for`).
BALANCED_CUTS = {
    ("resnet32", "cifar10"): {
        2: [(1, 3)],
        4: [(1, 2), (1, 4), (2, 2)],
        8: [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1), (3, 2)],
        16: _r32,
    },
    ("resnet110", "cifar10"): {
        2: [(1, 14)],
        3: [(1, 9), (2, 2)],
        4: [(1, 6), (1, 14), (2, 8)],
    },
    ("resnet110", "stl10"): {
        2: [(1, 14)],
        3: [(1, 8), (2, 1)],
        4: [(1, 6), (1, 14), (2, 8)],
    },
}

# --------------------------------------------------------------------------------------
# Reconstruction loss scales (METHOD §4): (ixx_1, ixy_1, ixx_2, ixy_2); the local loss at
# cut k is a*L_recon + b*L_head with (a, b) interpolated from (ixx_1, ixy_1) at the first
# cut to (ixx_2, ixy_2) at cut K-2.
LOSS_SCALES = {
    ("resnet32", "cifar10"): {2: (5, 1, 0, 0), 4: (6, 0, 1, 2), 8: (5, 0, 0, 2), 16: (5, 0.05, 0.2, 0.5)},
    ("resnet110", "cifar10"): {2: (5, 0.5, 0, 0), 4: (1, 0, 0, 1), 8: (5, 0, 0, 1), 16: (5, 0, 0.5, 1)},
    ("resnet110", "stl10"): {2: (10, 1, 0, 0), 4: (20, 0.2, 5, 2), 8: (20, 0.2, 5, 1), 16: (20, 0.5, 10, 0.1)},
    ("resnet110", "svhn"): {2: (1, 0.1, 0, 0), 4: (5, 0, 0.5, 0), 8: (5, 0, 0.5, 2), 16: (5, 0.2, 0.5, 1)},
}
_balanced_scales = {2: (5, 0.1, 0, 0), 3: (5, 0, 5, 0.1), 4: (5, 0, 0, 0.1)}
BALANCED_LOSS_SCALES = {
    ("resnet32", "cifar10"): {**_balanced_scales, 8: (5, 0, 0, 2)},
    ("resnet110", "cifar10"): dict(_balanced_scales),
}
# scikit-learn's digits, at 32x32 and at their native 8x8: shipped with the package, never downloaded.
EMBEDDED_DATASETS = ("digits", "digits8")
# The embedded digits data stands in for CIFAR-10 in quick runs: it borrows its scales.
SCALES_STAND_IN = dict.fromkeys(EMBEDDED_DATASETS, "cifar10")


# --------------------------------------------------------------------------------------
# Data and training recipes (METHOD §5).
@dataclass(frozen=True)
class DataRecipe:
    """How a dataset is shaped, augmented and normalised, and the paper's batch/lr."""
    num_classes: int
    image_size: int
    pad: int                 # random-crop padding
    pad_mode: str            # 'reflect' (CIFAR-10) or 'constant' (zero, torchvision default)
    flip: bool               # random horizontal flip
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    batch_size: int
    lr: float


DATA_RECIPES = {
    "cifar10": DataRecipe(10, 32, 4, "reflect", True,
                          (125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255),
                          batch_size=1024, lr=0.8),
    "svhn": DataRecipe(10, 32, 2, "constant", False, (0.5,) * 3, (0.5,) * 3, batch_size=1024, lr=0.8),
    "stl10": DataRecipe(10, 96, 4, "constant", True, (0.5,) * 3, (0.5,) * 3, batch_size=128, lr=0.1),
    # scikit-learn's 8x8 digits brought to 3x32x32; no flip (a mirrored 3 is not a 3).
    "digits": DataRecipe(10, 32, 4, "constant", False, (0.5,) * 3, (0.5,) * 3, batch_size=128, lr=0.1),
    # The same digits at their native 8x8 (16x cheaper): the quick profile's stand-in.
    "digits8": DataRecipe(10, 8, 1, "constant", False, (0.5,) * 3, (0.5,) * 3, batch_size=128, lr=0.1),
}

# Images per split, (train, test), as `data.load_dataset` yields them (METHOD §5): SVHN's
# train split without "extra", STL-10's 5k labelled train images (no unlabelled split).
# digits: scikit-learn's 1,797 images, data.DIGITS_TEST_SIZE = 500 held out as the test set.
# Used by the GPU-hours estimate (estimate.py); a test checks the digits rows against the loader.
DATASET_SIZES = {
    "cifar10": (50_000, 10_000),
    "svhn": (73_257, 26_032),
    "stl10": (5_000, 8_000),
    "digits": (1_297, 500),
    "digits8": (1_297, 500),
}


@dataclass(frozen=True)
class Schedule:
    """SGD Nesterov with a cosine schedule and a linear warm-up from `warmup_from`."""
    epochs: int = 160
    warmup_epochs: int = 10
    warmup_from: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4


PAPER_SCHEDULE = Schedule()

# --------------------------------------------------------------------------------------
# Published anchors to show beside our numbers (METHOD §7): InfoPro (Wang et al., ICLR 2021)
# Table 2, test error %, mean of 5 runs. The ContSup paper's own values could not be
# retrieved: CONTSUP_PAPER stays empty until somebody fills it from the paper.
E2E_REFERENCE = {("cifar10", "resnet32"): 7.37, ("cifar10", "resnet110"): 6.50,
                 ("svhn", "resnet110"): 3.07, ("stl10", "resnet110"): 22.27}
INFOPRO_REFERENCE = {  # (dataset, arch, method) -> {K: error %}
    ("cifar10", "resnet32", "Greedy SL"): {2: 10.30, 4: 16.07, 8: 21.19, 16: 24.59},
    ("cifar10", "resnet32", "DGL"): {2: 8.69, 4: 11.48, 8: 14.17, 16: 16.21},
    ("cifar10", "resnet32", "InfoPro softmax"): {2: 8.13, 4: 8.64, 8: 11.40, 16: 14.23},
    ("cifar10", "resnet32", "InfoPro contrast"): {2: 7.76, 4: 8.58, 8: 11.13, 16: 12.75},
    ("cifar10", "resnet110", "Greedy SL"): {2: 8.21, 4: 13.16, 8: 15.61, 16: 18.92},
    ("cifar10", "resnet110", "DGL"): {2: 7.70, 4: 10.50, 8: 12.46, 16: 13.80},
    ("cifar10", "resnet110", "InfoPro softmax"): {2: 7.01, 4: 7.96, 8: 9.40, 16: 10.78},
    ("cifar10", "resnet110", "InfoPro contrast"): {2: 6.42, 4: 7.30, 8: 8.93, 16: 9.90},
    ("svhn", "resnet110", "Greedy SL"): {2: 3.71, 4: 5.39, 8: 5.75, 16: 6.37},
    ("svhn", "resnet110", "InfoPro contrast"): {2: 3.15, 4: 3.28, 8: 3.62, 16: 3.91},
    ("stl10", "resnet110", "Greedy SL"): {2: 25.56, 4: 27.97, 8: 29.07, 16: 30.38},
    ("stl10", "resnet110", "InfoPro softmax"): {2: 21.02, 4: 21.28, 8: 23.60, 16: 26.05},
    ("stl10", "resnet110", "InfoPro contrast"): {2: 20.99, 4: 22.73, 8: 25.15, 16: 26.27},
}
# InfoPro Table 3: ResNet-110, CIFAR-10, batch 1024, one GPU: peak GPU memory in GB.
INFOPRO_MEMORY_GB = {"E2E": 9.40, "InfoPro* K=2": 5.38, "InfoPro* K=3": 4.22, "InfoPro* K=4": 3.52}
CONTSUP_PAPER: dict = {}  # slot for the ContSup paper's own table values (not retrieved)


# --------------------------------------------------------------------------------------
# Look-ups with clear errors.
def _choices(xs) -> str:
    return ", ".join(str(x) for x in sorted(xs))


def check_arch(arch: str) -> None:
    if arch not in BLOCKS_PER_STAGE:
        raise UsageError(f"unknown arch '{arch}'; choose one of: {_choices(BLOCKS_PER_STAGE)}")


def check_dataset(dataset: str) -> DataRecipe:
    if dataset not in DATA_RECIPES:
        raise UsageError(f"unknown dataset '{dataset}'; choose one of: {_choices(DATA_RECIPES)}")
    return DATA_RECIPES[dataset]


def balanced_table_for(dataset: str) -> str:
    """Memory-balanced cuts depend on the input resolution only."""
    return "stl10" if check_dataset(dataset).image_size == 96 else "cifar10"


def cut_points(arch: str, k: int, balanced: bool = False, dataset: str = "cifar10") -> list[tuple[int, int]]:
    """The (stage, block) cuts for K=k modules; [] for end-to-end (K=1)."""
    check_arch(arch)
    if k == 1:
        return []
    if balanced:
        key = (arch, balanced_table_for(dataset))
        table = BALANCED_CUTS.get(key, {})
        if k not in table:
            have = _choices(table) if table else "none"
            raise UsageError(f"no memory-balanced cut table for {arch} on {dataset} with K={k}; "
                             f"K with a table: {have} (or drop --balanced)")
        return list(table[k])
    if k not in EQUAL_CUTS[arch]:
        raise UsageError(f"K={k} is not in the paper's cut table for {arch}; "
                         f"choose K from: 1, {_choices(EQUAL_CUTS[arch])}")
    return list(EQUAL_CUTS[arch][k])


def loss_scales(arch: str, dataset: str, k: int, balanced: bool = False) -> tuple[float, float, float, float]:
    """(ixx_1, ixy_1, ixx_2, ixy_2) of the reconstruction runs of METHOD §4."""
    table_data = SCALES_STAND_IN.get(dataset, dataset)
    tables = BALANCED_LOSS_SCALES if balanced else LOSS_SCALES
    table = tables.get((arch, table_data), {})
    if k not in table:
        known = "; ".join(f"{a}/{d}: K={_choices(t)}" for (a, d), t in tables.items())
        kind = "memory-balanced " if balanced else ""
        raise UsageError(f"no {kind}reconstruction loss scales for {arch} on {dataset} with K={k}; "
                         f"the paper gives: {known} (or pass --loss-scales A1,B1,A2,B2)")
    return tuple(float(v) for v in table[k])


def interpolate_scales(scales, cut: int, k: int) -> tuple[float, float]:
    """(a, b) at cut `cut` (0-based) of K=k modules: linear from the first cut to cut K-2."""
    ixx_1, ixy_1, ixx_2, ixy_2 = scales
    t = cut / (k - 2) if k > 2 else 0.0
    return ixx_1 * (1 - t) + ixx_2 * t, ixy_1 * (1 - t) + ixy_2 * t
