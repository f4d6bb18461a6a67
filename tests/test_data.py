"""Data loading and the batched augmentation (contsup/data.py), all offline.

Tiny files in each dataset's real on-disk format go through torchvision's own readers,
and the device loader's random crop/flip is compared with the paper's PIL pipeline by
identifying which (dy, dx, flip) produced every sample.
"""
import dataclasses
import os
import pickle
import shutil

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.utils as tv_utils

from contsup import data as D
from contsup.errors import UsageError
from contsup.tables import DATA_RECIPES


# --------------------------------------------------------------------------------------
# Writers for the real formats.
@pytest.fixture
def skip_md5(monkeypatch):
    """Our tiny files cannot match the published md5 sums. torchvision's check_integrity
    is `isfile(path) and check_md5(...)`; replacing only check_md5 keeps the existence
    check (so missing files still fail as they would for a user) and every reader intact."""
    monkeypatch.setattr(tv_utils, "check_md5", lambda fpath, md5, **kw: True)


def rand_u8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_cifar(root, train_rows, train_y, test_rows, test_y):
    """rows: uint8 [n,3072] = the 1024 red, then green, then blue values, row-major.

    The real batches are Python 2 pickles whose str keys torchvision reads back with
    encoding="latin1", i.e. as Python 3 str: so we write str keys."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def dump(fname, rows, labels):
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump({"batch_label": fname, "labels": list(map(int, labels)), "data": rows,
                         "filenames": ["x.png"] * len(rows)}, f)

    for b, part in enumerate(np.array_split(np.arange(len(train_rows)), 5)):
        dump(f"data_batch_{b + 1}", train_rows[part], train_y[part])
    dump("test_batch", test_rows, test_y)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 2, "num_vis": 3072}, f)


def write_svhn(root, train_X, train_y, test_X, test_y):
    """X: uint8 [32,32,3,n] (height, width, channel, image); y: 1..10, where 10 is digit 0."""
    os.makedirs(root, exist_ok=True)
    for split, X, y in (("train", train_X, train_y), ("test", test_X, test_y)):
        scipy.io.savemat(os.path.join(root, f"{split}_32x32.mat"),
                         {"X": X, "y": np.asarray(y, dtype=np.uint8).reshape(-1, 1)})


def write_stl10(root, train_bytes, train_y, test_bytes, test_y):
    """bytes: flat uint8, each image 3 channels of 96x96 stored column-major; y: 1..10."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    for fname, arr in (("train_X.bin", train_bytes), ("test_X.bin", test_bytes),
                       ("train_y.bin", np.asarray(train_y, np.uint8)), ("test_y.bin", np.asarray(test_y, np.uint8))):
        arr.tofile(os.path.join(folder, fname))
    open(os.path.join(folder, "unlabeled_X.bin"), "wb").close()  # only checked for existence
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(f"c{i}" for i in range(10)))


# --------------------------------------------------------------------------------------
# Formats: shapes, dtypes, labels, and where each stored byte lands.
def check_split(x, y, n, size):
    assert x.shape == (n, 3, size, size) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) <= 9


def test_cifar10_format(tmp_path, skip_md5):
    tr, te = rand_u8(10, 3072, seed=1), rand_u8(3, 3072, seed=2)
    tr[4] = 0
    tr[4, 1 * 1024 + 5 * 32 + 7] = 200          # image 4, channel 1, row 5, column 7
    write_cifar(tmp_path, tr, np.arange(10), te, [3, 1, 9])
    d = D.load_dataset("cifar10", str(tmp_path))
    check_split(d.train_x, d.train_y, 10, 32)
    check_split(d.test_x, d.test_y, 3, 32)
    assert torch.nonzero(d.train_x[4]).tolist() == [[1, 5, 7]] and d.train_x[4, 1, 5, 7] == 200
    c, h, w = np.indices((3, 32, 32))
    assert np.array_equal(d.test_x.numpy(), te[:, c * 1024 + h * 32 + w])
    assert d.train_y.tolist() == list(range(10)) and d.test_y.tolist() == [3, 1, 9]
    assert d.recipe is DATA_RECIPES["cifar10"]


def test_svhn_format_and_label_10_is_digit_0(tmp_path, skip_md5):
    trX, teX = rand_u8(32, 32, 3, 5, seed=3), rand_u8(32, 32, 3, 4, seed=4)
    trX[..., 2] = 0
    trX[5, 7, 1, 2] = 200                       # row 5, column 7, channel 1 of image 2
    write_svhn(tmp_path, trX, [10, 1, 2, 3, 9], teX, [10, 10, 5, 4])
    d = D.load_dataset("svhn", str(tmp_path))
    check_split(d.train_x, d.train_y, 5, 32)
    check_split(d.test_x, d.test_y, 4, 32)
    assert torch.nonzero(d.train_x[2]).tolist() == [[1, 5, 7]]
    assert np.array_equal(d.test_x.numpy(), teX.transpose(3, 2, 0, 1))
    assert d.train_y.tolist() == [0, 1, 2, 3, 9] and d.test_y.tolist() == [0, 0, 5, 4]


def test_stl10_format(tmp_path, skip_md5):
    per = 3 * 96 * 96
    tr, te = rand_u8(4 * per, seed=5), rand_u8(3 * per, seed=6)
    tr[1 * per:2 * per] = 0
    tr[1 * per + 2 * 96 * 96 + 7 * 96 + 5] = 200    # image 1, channel 2, column 7, row 5 (column-major)
    write_stl10(tmp_path, tr, [1, 2, 10, 4], te, [10, 1, 3])
    d = D.load_dataset("stl10", str(tmp_path))
    check_split(d.train_x, d.train_y, 4, 96)
    check_split(d.test_x, d.test_y, 3, 96)
    assert torch.nonzero(d.train_x[1]).tolist() == [[2, 5, 7]]
    n, c, h, w = np.indices((3, 3, 96, 96))
    assert np.array_equal(d.test_x.numpy(), te[n * per + c * 96 * 96 + w * 96 + h])
    assert d.train_y.tolist() == [0, 1, 9, 3] and d.test_y.tolist() == [9, 0, 2]


@pytest.mark.parametrize("name", ["cifar10", "svhn", "stl10"])
def test_missing_files_give_one_line_usage_error(tmp_path, name):
    root = str(tmp_path / "nowhere")
    with pytest.raises(UsageError) as e:
        D.load_dataset(name, root)
    msg = str(e.value)
    assert "\n" not in msg and root in msg and "download" in msg and name in msg


def test_corrupt_files_give_usage_error(tmp_path):
    # real md5 check: our tiny files do not match the published sums
    write_cifar(tmp_path, rand_u8(5, 3072), np.zeros(5), rand_u8(1, 3072), [0])
    with pytest.raises(UsageError, match="download"):
        D.load_dataset("cifar10", str(tmp_path))
    assert not os.path.exists(tmp_path / "cifar10_uint8.pt")


def test_unknown_dataset_lists_choices():
    with pytest.raises(UsageError) as e:
        D.load_dataset("mnist")
    assert all(n in str(e.value) for n in DATA_RECIPES)


# --------------------------------------------------------------------------------------
# The uint8 cache.
def test_cache_round_trip_and_invalidation(tmp_path, skip_md5):
    write_cifar(tmp_path, rand_u8(10, 3072, seed=7), np.arange(10) % 10, rand_u8(2, 3072), [1, 2])
    first = D.load_dataset("cifar10", str(tmp_path))
    cache = tmp_path / "cifar10_uint8.pt"
    assert cache.is_file() and not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    raw = tmp_path / "cifar-10-batches-py"
    shutil.move(raw, tmp_path / "away")         # the second load can only come from the cache
    second = D.load_dataset("cifar10", str(tmp_path))
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, k), getattr(second, k))
    shutil.move(tmp_path / "away", raw)

    # a cache from another version, for another dataset, or unreadable, is rebuilt
    blob = torch.load(cache, weights_only=True)
    for bad in ({**blob, "version": D.CACHE_VERSION + 1}, {**blob, "name": "svhn"},
                {**blob, "train_x": blob["train_x"][:, :, :16]}):
        torch.save(bad, cache)
        third = D.load_dataset("cifar10", str(tmp_path))
        assert torch.equal(third.train_x, first.train_x)
        assert torch.load(cache, weights_only=True)["version"] == D.CACHE_VERSION
    cache.write_bytes(b"not a torch file")
    assert torch.equal(D.load_dataset("cifar10", str(tmp_path)).test_x, first.test_x)


# --------------------------------------------------------------------------------------
# digits and train_subset.
def test_digits_split():
    d = D.load_dataset("digits", root="/nonexistent")   # bundled: the root is never touched
    check_split(d.train_x, d.train_y, 1297, 32)
    check_split(d.test_x, d.test_y, 500, 32)
    assert torch.equal(d.train_x[:, 0], d.train_x[:, 2])             # grey, 3 channels
    assert int(d.train_x.max()) > 200 and int(d.train_x.min()) == 0  # scaled to 0..255
    for y, n in ((d.train_y, 1297), (d.test_y, 500)):
        counts = torch.bincount(y, minlength=10)
        assert (counts > 0).all() and counts.max() - counts.min() <= 0.05 * n
    torch.manual_seed(123)                                          # global RNG must not matter
    again = D.load_dataset("digits")
    assert torch.equal(again.test_x, d.test_x) and torch.equal(again.train_y, d.train_y)
    # no image is in both splits
    flat = lambda x: {bytes(r) for r in x[:, 0].reshape(len(x), -1).numpy()}
    assert len(flat(d.train_x) & flat(d.test_x)) < 5                 # (a few digits are exact duplicates)


def test_train_subset():
    full = D.load_dataset("digits")
    a = D.load_dataset("digits", train_subset=100)
    b = D.load_dataset("digits", train_subset=100)
    assert a.train_x.shape == (100, 3, 32, 32) and a.train_y.shape == (100,)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_x, full.test_x)                       # the test set is untouched
    assert torch.equal(D.load_dataset("digits", train_subset=200).train_x[:100], a.train_x)  # nested
    assert len(set(torch.bincount(a.train_y, minlength=10).tolist())) > 1  # shuffled, not the first 100
    assert D.load_dataset("digits", train_subset=1297).train_x.shape[0] == 1297
    for bad in (0, -3, 1298, 2.5):
        with pytest.raises(UsageError, match="1297"):
            D.load_dataset("digits", train_subset=bad)


# --------------------------------------------------------------------------------------
# DeviceLoader.
def test_eval_loader_normalises_in_order():
    d = D.load_dataset("digits")
    r = DATA_RECIPES["cifar10"]                       # non-trivial mean/std
    loader = D.DeviceLoader(d.test_x, d.test_y, r, 64, train=False, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 8 and len(batches[-1][0]) == 500 - 7 * 64
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    mean, std = torch.tensor(r.mean).view(1, 3, 1, 1), torch.tensor(r.std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.equal(x, (d.test_x.float() / 255 - mean) / std)
    assert torch.equal(y, d.test_y)
    assert torch.allclose(D.denormalize(x, r), d.test_x.float() / 255, atol=1e-6)
    dropped = D.DeviceLoader(d.test_x, d.test_y, r, 64, train=True, device="cpu",
                             generator=torch.Generator().manual_seed(0), drop_last=True)
    assert len(dropped) == len(list(dropped)) == 7
    with pytest.raises(UsageError, match="positive"):
        D.DeviceLoader(d.test_x, d.test_y, r, 0, train=False, device="cpu")


def candidates(img, recipe):
    """Every (dy, dx, flip) outcome of pad + crop + flip, normalised, computed with np.pad."""
    p, s = recipe.pad, recipe.image_size
    padded = np.pad(img, ((0, 0), (p, p), (p, p)), mode=recipe.pad_mode)
    keys, outs = [], []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            for flip in ((False, True) if recipe.flip else (False,)):
                crop = padded[:, dy:dy + s, dx:dx + s]
                outs.append(crop[:, :, ::-1] if flip else crop)
                keys.append((dy, dx, flip))
    x = np.stack(outs).astype(np.float32) / 255
    x = (x - np.float32(recipe.mean).reshape(1, 3, 1, 1)) / np.float32(recipe.std).reshape(1, 3, 1, 1)
    return keys, torch.from_numpy(x)


def identify(samples, cands):
    """Index of the candidate each sample equals; fails on a sample matching none."""
    # nearest by cdist (fast, but its matmul form is only accurate to ~1e-2 here), then
    # the exact check against that candidate
    best = torch.cdist(samples.flatten(1), cands.flatten(1)).argmin(1)
    err = (samples - cands[best]).abs().amax()
    assert err < 1e-5, "an augmented image is no valid pad/crop/flip of the input"
    return torch.bincount(best, minlength=len(cands))


@pytest.mark.parametrize("name,draws", [("cifar10", 5000), ("svhn", 3000)])
def test_train_augmentation_matches_torchvision(tmp_path, skip_md5, name, draws):
    recipe = DATA_RECIPES[name]
    img = rand_u8(3, 32, 32, seed=11)                # distinctive: every outcome differs
    # the paper's pipeline, reading the image from a real-format file
    if name == "cifar10":
        rows = rand_u8(5, 3072, seed=12)
        rows[0] = img.reshape(-1)
        write_cifar(tmp_path, rows, np.zeros(5), rows[:1], [0])
    else:
        X = rand_u8(32, 32, 3, 5, seed=12)
        X[..., 0] = img.transpose(1, 2, 0)
        write_svhn(tmp_path, X, np.ones(5), X[..., :1], [1])
    ref = D.torchvision_reference(name, str(tmp_path), train=True)
    torch.manual_seed(0)
    ref_x = torch.stack([ref[0][0] for _ in range(draws)])
    # ours: the same image `draws` times in one batch, every copy augmented independently
    ours = D.DeviceLoader(torch.from_numpy(img)[None].repeat(draws, 1, 1, 1), torch.zeros(draws, dtype=torch.long),
                          recipe, draws, train=True, device="cpu", generator=torch.Generator().manual_seed(0))
    our_x, _ = next(iter(ours))

    keys, cands = candidates(img, recipe)
    assert len(keys) == (2 * recipe.pad + 1) ** 2 * (2 if recipe.flip else 1)
    dof = len(keys) - 1
    for x in (ref_x, our_x):
        counts = identify(x, cands).double()        # (a) only valid outcomes
        assert (counts > 0).all()                    # (b) all of them
        expected = draws / len(keys)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < dof + 6 * (2 * dof) ** 0.5     # (c) uniform (mean dof, sd sqrt(2 dof))
    assert torch.allclose(ref_x.mean((0, 2, 3)), our_x.mean((0, 2, 3)), atol=0.02)


def test_zero_padding_is_zero_and_reflect_has_no_edge_repeat():
    # columns 0 and 1 hold 7 and 9, the rest 255; svhn pads by 2 and never flips
    img = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    img[..., 0], img[..., 1] = 7, 9
    for mode, outside in (("constant", 0), ("reflect", 9)):   # reflect: column -1 is column 1
        recipe = dataclasses.replace(DATA_RECIPES["svhn"], pad_mode=mode)
        loader = D.DeviceLoader(img.repeat(500, 1, 1, 1), torch.zeros(500, dtype=torch.long), recipe, 500,
                                train=True, device="cpu", generator=torch.Generator().manual_seed(1))
        x = loader.augment(loader.images)[:, 0, 5]            # row 5 of channel 0, uint8
        shifted_by_one = x[:, 1] == 7                         # crops starting at padded column -1
        assert shifted_by_one.any()
        assert x[shifted_by_one, 0].unique().tolist() == [outside]


def test_same_seed_same_batches_and_exact_resume():
    d = D.load_dataset("digits", train_subset=300)
    r = DATA_RECIPES["cifar10"]

    def epochs(gen, n):
        loader = D.DeviceLoader(d.train_x, d.train_y, r, 128, train=True, device="cpu", generator=gen)
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]

    def same(a, b):
        return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))

    a = epochs(torch.Generator().manual_seed(5), 2)
    b = epochs(torch.Generator().manual_seed(5), 2)
    c = epochs(torch.Generator().manual_seed(6), 1)
    assert same(a[0], b[0]) and same(a[1], b[1])
    assert not same(a[0], c[0]) and not same(a[0], a[1])    # new order and crops every epoch
    assert sorted(torch.cat([y for _, y in a[0]]).tolist()) == sorted(d.train_y.tolist())  # a permutation

    gen = torch.Generator().manual_seed(5)                  # resume: restore the state after epoch 1
    epochs(gen, 1)
    state = gen.get_state()
    resumed = torch.Generator()
    resumed.set_state(state)
    assert same(epochs(resumed, 1)[0], a[1])


@pytest.mark.parametrize("name, batch, drop_last", [("cifar10", 128, False), ("svhn", 100, True), ("cifar10", 500, True)])
def test_epoch_draws_are_those_of_drawing_batch_by_batch(name, batch, drop_last):
    """The loader draws an epoch's random numbers when it starts (one copy to the device),
    in the order drawing batch by batch takes them: the permutation, then per batch dy, dx
    and the flips. So the batches, and the generator's state after the epoch (what a
    checkpoint stores), are those of drawing per batch, as earlier versions of the loader
    did and as every stored result was made."""
    r = DATA_RECIPES[name]
    x, y = torch.from_numpy(rand_u8(300, 3, 32, 32, seed=3)), torch.arange(300)
    gen = torch.Generator().manual_seed(4)
    loader = D.DeviceLoader(x, y, r, batch, train=True, device="cpu", generator=gen, drop_last=drop_last)
    ours = list(loader)
    ref_gen = torch.Generator().manual_seed(4)
    order = torch.randperm(300, generator=ref_gen)
    expected = []
    for i in range(len(loader)):
        idx = order[i * batch:(i + 1) * batch]
        b, p = len(idx), r.pad
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=ref_gen)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=ref_gen)
        flip = torch.rand(b, 1, generator=ref_gen) < 0.5 if r.flip else torch.zeros(b, 1, dtype=torch.bool)
        expected.append((D.normalize(loader.augment(x[idx], dy, dx, flip), r), y[idx]))
    assert len(ours) == len(expected) == (300 // batch if drop_last else -(-300 // batch))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, expected))
    assert torch.equal(gen.get_state(), ref_gen.get_state())
