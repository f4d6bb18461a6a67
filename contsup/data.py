"""Datasets as uint8 tensors, and a device-resident loader that augments whole batches.

The paper trains with torchvision datasets and PIL transforms (METHOD §5). Decoding and
augmenting one PIL image at a time costs more than a ResNet-32 step at batch 1024, so, as
in airbench, we keep every image as a uint8 tensor on the training device and do the
random crop and flip for a whole batch with one gather. The PIL pipeline survives as
`torchvision_reference`, which the tests compare against.

Reading order: ImageData and load_dataset (files -> uint8 tensors, with a cache), the
digits stand-in, DeviceLoader (the training data path), then the torchvision reference
and `download`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import tables
from .errors import UsageError, check_writable_folder
from .tables import DataRecipe

# Bump when what goes into a cache file changes; older caches are then rebuilt.
CACHE_VERSION = 1
# torchvision is imported inside the functions that need it: digits runs (the default)
# and `python -m contsup --help` should not pay its import time.
TORCHVISION_DATASETS = ("cifar10", "svhn", "stl10")


@dataclass
class ImageData:
    """A dataset held in memory: images uint8 [N,3,H,W], labels int64 [N]."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    name: str

    @property
    def recipe(self) -> DataRecipe:
        return tables.DATA_RECIPES[self.name]


def load_dataset(name: str, root: str = "data", download: bool = False,
                 train_subset: int | None = None) -> ImageData:
    """Load `name` as uint8 tensors, from `<root>/<name>_uint8.pt` when that cache exists."""
    tables.check_dataset(name)
    if name in tables.EMBEDDED_DATASETS:
        tensors = _load_digits(tables.DATA_RECIPES[name].image_size)
    else:
        if download:
            check_writable_folder(root, "--data-root")
        elif os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(f"--data-root {root} is a file, not a folder; choose another --data-root")
        cache = cache_path(name, root)
        tensors = _read_cache(cache, name)
        if tensors is None:
            tensors = _read_torchvision(name, root, download)
            _write_cache(cache, name, tensors)
    data = ImageData(**tensors, name=name)
    if train_subset is not None:
        data.train_x, data.train_y = _subset(data.train_x, data.train_y, train_subset)
    return data


def _subset(x: torch.Tensor, y: torch.Tensor, n) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a permutation fixed by seed 0, so a subset is the same
    on every run and for every --seed (the seed then only varies the training)."""
    total = len(x)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= total:
        raise UsageError(f"--train-subset must be an integer in 1..{total} (the training set size); got {n!r}")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n]
    return x[idx], y[idx]


# --------------------------------------------------------------------------------------
# torchvision files -> uint8 tensors
# What to delete when a dataset's files are damaged (torchvision's own layout under root).
DATASET_FILES = {"cifar10": "cifar-10-batches-py/", "svhn": "train_32x32.mat and test_32x32.mat",
                 "stl10": "stl10_binary/"}


def _torchvision_dataset(name: str, root: str, train: bool, download: bool, transform=None):
    """The torchvision dataset object; a missing, half-downloaded or corrupt file, or a
    failed download, becomes a one-line UsageError that names the fix."""
    import torchvision.datasets as tvd

    fetch = f"`python -m contsup download --dataset {name} --data-root {root}`"
    try:
        if name == "cifar10":
            return tvd.CIFAR10(root, train=train, download=download, transform=transform)
        split = "train" if train else "test"  # SVHN: no "extra" split (METHOD §5)
        cls = tvd.SVHN if name == "svhn" else tvd.STL10
        return cls(root, split=split, download=download, transform=transform)
    except RuntimeError as e:
        # torchvision says "Dataset not found or corrupted. You can use download=True..."
        if "not found or corrupted" not in str(e):
            raise
        raise UsageError(f"{name} not found (or corrupt) under {root}: fetch it with {fetch} "
                         f"or add --download to the train command") from None
    except OSError as e:  # download=True without network, refused connection, disk full...
        if download:
            raise UsageError(f"could not download {name} into {root}: {e}") from None
        if isinstance(e, PermissionError):
            raise UsageError(f"could not read {name} under {root}: {e}") from None
        damaged = e
    except Exception as e:  # the files passed torchvision's check but do not parse: truncated, foreign
        damaged = e
    detail = f"{type(damaged).__name__}: {damaged}".splitlines()[0][:40]
    raise UsageError(f"{name} under {root} is damaged ({detail}); delete {DATASET_FILES[name]} there "
                     f"and rerun with --download")


def _read_torchvision(name: str, root: str, download: bool) -> dict[str, torch.Tensor]:
    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = _torchvision_dataset(name, root, train, download)
        if name == "cifar10":   # .data is [N,H,W,C] uint8, labels in .targets
            x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
            y = ds.targets
        else:                   # SVHN and STL-10: .data is already [N,C,H,W], labels in .labels
            x = torch.from_numpy(np.ascontiguousarray(ds.data))
            y = ds.labels
        out[f"{split}_x"] = x.contiguous()
        out[f"{split}_y"] = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return out


def cache_path(name: str, root) -> str:
    """Where a torchvision dataset's uint8 tensors are cached: `<root>/<name>_uint8.pt`,
    read first by `load_dataset`, written by it and by `download`."""
    return os.path.join(root, f"{name}_uint8.pt")


def _read_cache(path: str, name: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when there is no cache or it does not fit this code."""
    if not os.path.isfile(path):
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:   # truncated or foreign file: rebuild it from the dataset files
        return None
    keys = ("train_x", "train_y", "test_x", "test_y")
    if not isinstance(blob, dict) or blob.get("version") != CACHE_VERSION or blob.get("name") != name:
        return None
    if not all(isinstance(blob.get(k), torch.Tensor) for k in keys):
        return None
    s = tables.DATA_RECIPES[name].image_size
    for split in ("train", "test"):
        x, y = blob[f"{split}_x"], blob[f"{split}_y"]
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (3, s, s) or y.dtype != torch.int64 or y.shape != (len(x),):
            return None
    return {k: blob[k] for k in keys}


def _write_cache(path: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically (tmp file + rename) so an interrupted run never leaves half a cache."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save({"version": CACHE_VERSION, "name": name, **tensors}, tmp)
        os.replace(tmp, path)
    except OSError:     # read-only data folder: the cache is only a speed-up, carry on
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------
# The offline stand-in: scikit-learn's 8x8 digits brought to CIFAR's 3x32x32 shape.
DIGITS_TEST_SIZE = 500


def _load_digits(size: int = 32) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] * (255.0 / 16.0)  # values 0..16 -> 0..255
    if size != 8:  # upsample in float and round once, so no precision is lost between steps
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    train_idx, test_idx = _stratified_split(y, DIGITS_TEST_SIZE)
    return {"train_x": x[train_idx], "train_y": y[train_idx], "test_x": x[test_idx], "test_y": y[test_idx]}


def _stratified_split(y: torch.Tensor, n_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class random split with its own seeded generator (independent of global RNG).

    Each class gives the test set its share of n_test, rounded by largest remainder so
    the shares add up to exactly n_test.
    """
    classes, counts = torch.unique(y, return_counts=True)
    quota = counts.double() * n_test / len(y)
    take = quota.floor().long()
    short = n_test - int(take.sum())
    # stable sort: ties go to the lower class, so the split never depends on float noise
    order = torch.sort(quota - take, descending=True, stable=True).indices
    take[order[:short]] += 1
    gen = torch.Generator().manual_seed(0)
    test = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(y == c).flatten()
        test.append(members[torch.randperm(len(members), generator=gen)[:k]])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    # kept in the original order; the loader shuffles the training set anyway
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


# --------------------------------------------------------------------------------------
# Normalisation, shared by the loader and the reconstruction target.
def _stats(recipe: DataRecipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(recipe.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(x_uint8: torch.Tensor, recipe: DataRecipe, stats=None) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 (x/255 - mean)/std, what ToTensor+Normalize compute.
    `stats`: (mean, std) already on x's device (DeviceLoader.stats); else they are made here,
    which on CUDA is a host->device copy: a training loop passes them."""
    mean, std = stats if stats is not None else _stats(recipe, x_uint8.device)
    # in place on the one new float tensor: the same arithmetic, a third of the allocations
    return x_uint8.float().div_(255).sub_(mean).div_(std)


def random_batch(dataset: str, batch: int, reconstruct: bool = False, seed: int = 0):
    """A random batch of the dataset's shape, from its own seeded generator: normalised-like
    images [B,3,S,S], labels, and reconstruction targets in [0,1] (None unless asked).
    For measuring memory and FLOPs, where the values don't matter."""
    recipe = tables.check_dataset(dataset)
    gen = torch.Generator().manual_seed(seed)
    s = recipe.image_size
    x = torch.randn(batch, 3, s, s, generator=gen)
    y = torch.randint(0, recipe.num_classes, (batch,), generator=gen)
    image = torch.rand(batch, 3, s, s, generator=gen) if reconstruct else None
    return x, y, image


def denormalize(x: torch.Tensor, recipe: DataRecipe, stats=None) -> torch.Tensor:
    """Normalised floats back to images in [0,1] (the reconstruction target); `stats` as in
    `normalize`."""
    mean, std = stats if stats is not None else _stats(recipe, x.device)
    # clamp only removes float round-off: an augmented image is always inside [0,1]
    return (x * std + mean).clamp_(0, 1)


# --------------------------------------------------------------------------------------
# The training data path.
def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device` by a copy the host does not wait for: from pinned memory when the device
    is CUDA (pinning needs the CUDA runtime, absent under the tests' fake CUDA tensors)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class DeviceLoader:
    """Batches of (normalised float32 images, int64 labels) from uint8 data on `device`.

    train=True reshuffles every epoch and applies the recipe's random crop (after padding
    by recipe.pad, reflect or zero) and horizontal flip, as torchvision's RandomCrop and
    RandomHorizontalFlip do, but for the whole batch at once. Every random number comes
    from `generator`, a CPU torch.Generator, so the batches are the same on every device,
    and a run resumes exactly where it stopped when the caller restores the generator's
    state (the training itself repeats bit for bit on the same device, thread count and versions:
    on a CPU as it is, on CUDA with --deterministic: train.TrainConfig.deterministic).
    train=False yields the data in order, only normalised.

    No batch waits on the host: when an epoch starts, `draw_epoch` draws all its random
    numbers (the permutation, then per batch the offsets dy, dx and the flips: the order in
    which drawing batch by batch takes them, so the generator's stream and state are those
    of one draw per batch) and moves them to the device in one non-blocking copy; mean and
    std are on the device from the start (`stats`). A batch is then slices and gathers of
    device tensors.
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, recipe: DataRecipe,
                 batch_size: int, *, train: bool, device, generator: torch.Generator | None = None,
                 drop_last: bool = False):
        assert images_uint8.dtype == torch.uint8 and images_uint8.dim() == 4, "want uint8 [N,C,H,W]"
        assert recipe.pad < min(images_uint8.shape[2:]), "reflect padding needs pad < image size"
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
        if recipe.pad_mode not in ("reflect", "constant"):
            raise UsageError(f"unknown pad_mode '{recipe.pad_mode}'; choose reflect or constant")
        # Once, up front: uint8 is 4x smaller than float and every batch is then a gather.
        self.images = images_uint8.to(device)
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.recipe, self.batch_size, self.train = recipe, batch_size, train
        self.device, self.drop_last = torch.device(device), drop_last
        self.stats = _stats(recipe, self.device)   # (mean, std) on the device, for normalize/denormalize
        # None follows torch.manual_seed, like a plain DataLoader with shuffle=True.
        self.generator = generator if generator is not None else torch.default_generator

    def __len__(self) -> int:
        n, b = len(self.images), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        b = self.batch_size
        if not self.train:
            for i in range(0, len(self) * b, b):
                yield normalize(self.images[i:i + b], self.recipe, self.stats), self.labels[i:i + b]
            return
        order, dy, dx, flip = self.draw_epoch()
        for i in range(0, len(order), b):
            idx = order[i:i + b]
            x = self.augment(self.images[idx], dy[i:i + b], dx[i:i + b], flip[i:i + b])
            yield normalize(x, self.recipe, self.stats), self.labels[idx]

    def draw_epoch(self):
        """The epoch's training order [n] and, per image in that order, dy, dx [n,1] (int64)
        and flip [n,1] (bool), on the device: drawn on the CPU generator in the order batch
        by batch drawing takes them, then moved in one copy."""
        b, gen = self.batch_size, self.generator
        order = torch.randperm(len(self.images), generator=gen)[:len(self) * b]  # drop_last drops the tail
        draws = [self._draw(len(order[i:i + b])) for i in range(0, len(order), b)] or [self._draw(0)]
        dy, dx, flip = (torch.cat(d) for d in zip(*draws))
        packed = to_device(torch.stack([order[:, None], dy, dx, flip.long()]), self.device)  # [4,n,1]
        return packed[0, :, 0], packed[1], packed[2], packed[3].bool()

    def _draw(self, b: int):
        """One batch's crop offsets and flips [b,1] from the CPU generator, in this order."""
        p, gen = self.recipe.pad, self.generator
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=gen)
        flip = (torch.rand(b, 1, generator=gen) < 0.5) if self.recipe.flip else torch.zeros(b, 1, dtype=torch.bool)
        return dy, dx, flip

    def augment(self, x: torch.Tensor, dy=None, dx=None, flip=None) -> torch.Tensor:
        """Random crop of the padded image and random flip, per image, in one gather.

        dy, dx ([b,1] ints in 0..2*pad) and flip ([b,1] bool) on x's device, as `draw_epoch`
        gives them; without them they are drawn here for this batch.
        The batch is padded once (uint8; 'reflect' mirrors without repeating the edge, as
        np.pad/torchvision; 'constant' pads zeros); then, for every output pixel, we compute
        which padded pixel it shows: output row i of an image with vertical offset dy
        (uniform in 0..2*pad, as in RandomCrop) is padded row i+dy; columns likewise, read
        right to left when flipped.
        """
        b, c, h, w = x.shape
        p = self.recipe.pad
        if dy is None:
            dy, dx, flip = (to_device(t, self.device) for t in self._draw(b))
        # Pad the batch (uint8, one pass), then read each crop from it: padded row i+dy, and
        # padded column j+dx, read right to left when flipped.
        x = F.pad(x, (p, p, p, p), mode=self.recipe.pad_mode)
        H, W = h + 2 * p, w + 2 * p
        i = torch.arange(h, device=self.device)
        j = torch.arange(w, device=self.device)
        rows = i + dy                                           # [b,h]
        cols = torch.where(flip, w - 1 - j, j) + dx             # [b,w]
        src = (rows[:, :, None] * W + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return x.reshape(b, c, H * W).gather(2, src).view(b, c, h, w)


# --------------------------------------------------------------------------------------
# The paper's PIL pipeline, kept as the reference for tests and benchmarks.
def reference_transform(recipe: DataRecipe, train: bool):
    """torchvision transforms equal to the recipe: e.g. CIFAR-10 train is
    RandomCrop(32, padding=4, padding_mode='reflect') + RandomHorizontalFlip + ToTensor + Normalize."""
    import torchvision.transforms as T

    steps = []
    if train:
        steps.append(T.RandomCrop(recipe.image_size, padding=recipe.pad, padding_mode=recipe.pad_mode))
        if recipe.flip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]
    return T.Compose(steps)


class UInt8ImageDataset(torch.utils.data.Dataset):
    """uint8 [N,3,H,W] tensors served as PIL images through `transform` (used for digits)."""

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images_uint8, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.images[index].permute(1, 2, 0).numpy())
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


def torchvision_reference(name: str, root: str = "data", train: bool = True, download: bool = False):
    """A torch Dataset yielding what the paper's DataLoader sees: PIL transforms per image."""
    recipe = tables.check_dataset(name)
    transform = reference_transform(recipe, train)
    if name in tables.EMBEDDED_DATASETS:
        d = load_dataset(name)
        x, y = (d.train_x, d.train_y) if train else (d.test_x, d.test_y)
        return UInt8ImageDataset(x, y, transform)
    return _torchvision_dataset(name, root, train, download, transform=transform)


def download(name: str, root: str = "data") -> None:
    """Fetch both splits with torchvision (skipped when the files are already intact)
    and write the uint8 cache, so the first training run starts at once."""
    tables.check_dataset(name)
    if name not in TORCHVISION_DATASETS:
        raise UsageError(f"{name} is not downloaded; downloadable: {', '.join(TORCHVISION_DATASETS)}")
    check_writable_folder(root, "--data-root")
    os.makedirs(root, exist_ok=True)
    tensors = _read_torchvision(name, root, download=True)
    _write_cache(cache_path(name, root), name, tensors)
