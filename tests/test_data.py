"""Tests for ppl_genmodels.data: loading, splits, binarization, conditioning, validation."""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_genmodels.data import (
    BINARIZE_MODES,
    CONDITIONS,
    DATASETS,
    LIKELIHOODS,
    SPLIT_NAMES,
    DataError,
    DataOptions,
    Dataset,
    Split,
    default_likelihood,
    load_dataset,
    quadrant_pixels,
    read_idx,
)
from ppl_genmodels.plots import assemble_quadrant_images

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def raises_one_line(match: str, fn, *args, **kwargs) -> str:
    """Call fn, expect a DataError whose one-line message contains `match` (case-insensitive)."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert match.lower() in msg.lower(), msg
    return msg


def is_binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def idx_bytes(arr: np.ndarray, *, code: int = 0x08, magic: bytes | None = None) -> bytes:
    arr = np.asarray(arr)
    head = magic if magic is not None else bytes([0, 0, code, arr.ndim])
    return head + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def fake_mnist(folder: Path, *, n_train=60, n_test=20, shape=(4, 4), gz=True, seed=0,
               overrides: dict[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny MNIST-like set of IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, *shape)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, *shape)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        data = (overrides or {}).get(stem, idx_bytes(arr))
        write_idx(folder / stem, data, gz)
    return arrays


@pytest.fixture(scope="module")
def digits_raw():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


@pytest.fixture(scope="module")
def digits_dynamic():
    return load_dataset("digits")


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


def test_digits_default_is_bernoulli_dynamic(digits_dynamic):
    ds = digits_dynamic
    assert isinstance(ds, Dataset) and ds.name == "digits"
    assert ds.likelihood == "bernoulli" and ds.binarize == "dynamic"
    assert ds.image_shape == (8, 8) and ds.x_dim == 64 and ds.y_dim == 0
    assert ds.condition is None and ds.train.y is None
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert (len(ds.val), len(ds.test)) == (180, 180)
    for part in (ds.train, ds.val, ds.test):
        assert part.x.dtype == torch.float32 and part.index.dtype == torch.long
        assert part.x.device.type == "cpu"
        assert part.x.shape[1] == 64 and part.index.shape == (part.x.shape[0],)
    # train keeps grey levels in [0, 1]; val/test are binarized once at load
    assert 0 <= ds.train.x.min() and ds.train.x.max() <= 1
    assert not is_binary(ds.train.x)
    assert is_binary(ds.val.x) and is_binary(ds.test.x)


def test_dynamic_batches_are_fresh_draws_and_eval_splits_fixed(digits_dynamic):
    ds = digits_dynamic
    torch.manual_seed(0)
    first = torch.cat([x for x, _ in ds.batches("train", 500)])
    second = torch.cat([x for x, _ in ds.batches("train", 500)])
    assert first.shape == ds.train.x.shape
    assert is_binary(first) and is_binary(second)
    assert not torch.equal(first, second)
    # the draws follow the grey levels: mean of the draw ~ mean intensity
    assert abs(first.mean().item() - ds.train.x.mean().item()) < 0.01
    # val/test batches are the stored, already binary tensors
    for split in ("val", "test"):
        a = torch.cat([x for x, _ in ds.batches(split, 64)])
        b = torch.cat([x for x, _ in ds.batches(split, 64)])
        assert torch.equal(a, ds.split(split).x) and torch.equal(a, b)
    # reloading with the same seed reproduces the val/test binarization
    again = load_dataset("digits")
    assert torch.equal(again.val.x, ds.val.x) and torch.equal(again.test.x, ds.test.x)


def test_fixed_binarization_binary_and_repeatable():
    a = load_dataset("digits", binarize="fixed", seed=3)
    b = load_dataset("digits", binarize="fixed", seed=3)
    for split in ("train", "val", "test"):
        assert is_binary(a.split(split).x)
        assert torch.equal(a.split(split).x, b.split(split).x)
    passes = [torch.cat([x for x, _ in a.batches("train", 256)]) for _ in range(2)]
    assert torch.equal(passes[0], passes[1]) and torch.equal(passes[0], a.train.x)


def test_threshold_binarization_matches_grey_levels():
    grey = load_dataset("digits", likelihood="gaussian", seed=1)
    thr = load_dataset("digits", binarize="threshold", seed=1)
    for split in ("train", "val", "test"):
        assert torch.equal(thr.split(split).x, (grey.split(split).x > 0.5).float())


def test_digits_gaussian_and_categorical(digits_raw):
    raw, _ = digits_raw
    g = load_dataset("digits", likelihood="gaussian")
    assert g.binarize is None and g.n_levels is None
    assert torch.allclose(g.train.x, torch.from_numpy(raw[g.train.index.numpy()]) / 16)
    assert g.train.x.min() == 0 and g.train.x.max() == 1
    c = load_dataset("digits", likelihood="categorical")
    assert c.n_levels == 17 and c.binarize is None
    x = c.train.x
    assert x.dtype == torch.float32
    assert torch.equal(x, x.round()) and x.min() == 0 and x.max() == 16
    assert torch.equal(x, torch.from_numpy(raw[c.train.index.numpy()]))


def test_split_determinism_and_disjointness(digits_raw):
    a = load_dataset("digits", likelihood="gaussian", seed=5)
    b = load_dataset("digits", likelihood="gaussian", seed=5)
    c = load_dataset("digits", likelihood="gaussian", seed=6)
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split).x, b.split(split).x)
        assert torch.equal(a.split(split).index, b.split(split).index)
    assert not torch.equal(a.test.index, c.test.index)
    sets = [set(a.split(s).index.tolist()) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(range(1797))
    # index points at the original rows, labels follow
    _, target = digits_raw
    assert torch.equal(a.val.labels, torch.from_numpy(target[a.val.index.numpy()]))


def test_fractions_and_max_examples():
    ds = load_dataset("digits", val_fraction=0.2, test_fraction=0.3)
    assert (len(ds.val), len(ds.test)) == (round(1797 * 0.2), round(1797 * 0.3))
    small = load_dataset("digits", max_examples=25)
    assert (len(small.train), len(small.val), len(small.test)) == (25, 25, 25)
    again = load_dataset("digits", max_examples=25)
    assert torch.equal(small.train.index, again.train.index)
    full = load_dataset("digits")
    assert set(small.train.index.tolist()) <= set(full.train.index.tolist())


def test_label_condition_one_hot(digits_raw):
    _, target = digits_raw
    ds = load_dataset("digits", condition="label", binarize="fixed")
    assert ds.condition == "label" and ds.n_classes == 10 and ds.y_dim == 10
    for part in (ds.train, ds.val, ds.test):
        assert part.y.dtype == torch.float32 and part.y.shape == (len(part), 10)
        assert torch.equal(part.y.sum(1), torch.ones(len(part)))
        assert torch.equal(part.y.argmax(1), torch.from_numpy(target[part.index.numpy()]))
    x, y = next(ds.batches("train", 7))
    assert x.shape == (7, 64) and y.shape == (7, 10)


def test_quadrant_pixel_lists():
    x_pix, y_pix = quadrant_pixels((8, 8), 1)
    assert y_pix == [r * 8 + c for r in range(4) for c in range(4)]
    assert x_pix[:4] == [4, 5, 6, 7] and len(x_pix) == 48
    assert sorted(x_pix + y_pix) == list(range(64))
    x_pix, y_pix = quadrant_pixels((8, 8), 3)
    assert len(y_pix) == 48 and x_pix == [r * 8 + c for r in range(4, 8) for c in range(4, 8)]


@pytest.mark.parametrize("visible, y_dim", [(1, 16), (2, 32), (3, 48)])
def test_quadrants_reassemble_to_original(visible, y_dim):
    full = load_dataset("digits", binarize="threshold", seed=2)
    ds = load_dataset("digits", binarize="threshold", seed=2, condition="quadrants",
                      visible_quadrants=visible)
    assert ds.y_dim == y_dim and ds.x_dim == 64 - y_dim
    assert ds.meta["visible_quadrants"] == visible
    for split in ("train", "test"):
        part = ds.split(split)
        rebuilt = torch.zeros(len(part), 64)
        rebuilt[:, ds.meta["y_pixels"]] = part.y
        rebuilt[:, ds.meta["x_pixels"]] = part.x
        assert torch.equal(rebuilt, full.split(split).x)
        images = assemble_quadrant_images(part.x, part.y, ds.meta["x_pixels"],
                                          ds.meta["y_pixels"], ds.image_shape)
        assert isinstance(images, np.ndarray) and images.shape == (len(part), 8, 8)
        np.testing.assert_array_equal(images, rebuilt.reshape(-1, 8, 8).numpy())


def test_quadrants_dynamic_draws_x_and_y(digits_raw):
    ds = load_dataset("digits", condition="quadrants", visible_quadrants=2)
    assert ds.binarize == "dynamic"
    assert not is_binary(ds.train.y) and not is_binary(ds.train.x)
    assert is_binary(ds.test.x) and is_binary(ds.test.y)
    torch.manual_seed(1)
    x, y = next(ds.batches("train", 200))
    assert is_binary(x) and is_binary(y) and x.shape == (200, 32) and y.shape == (200, 32)


def test_batches_order_sizes_and_shuffle(digits_dynamic):
    ds = load_dataset("digits", binarize="fixed")
    sizes = [x.shape[0] for x, _ in ds.batches("val", 64)]
    assert sizes == [64, 64, 52]  # last partial batch kept
    assert torch.equal(torch.cat([x for x, _ in ds.batches("val", 64)]), ds.val.x)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1 = torch.cat([x for x, _ in ds.batches("val", 50, shuffle=True, generator=g1)])
    s2 = torch.cat([x for x, _ in ds.batches("val", 50, shuffle=True, generator=g2)])
    assert torch.equal(s1, s2) and not torch.equal(s1, ds.val.x)
    # a permutation of the rows
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(s1) == key(ds.val.x)
    assert all(y is None for _, y in ds.batches("val", 64))
    raises_one_line("batch_size", lambda: next(ds.batches("val", 0)))


def test_split_to_and_describe(digits_dynamic):
    ds = digits_dynamic
    assert ds.split("val") is ds.val
    raises_one_line("unknown split", ds.split, "valid")
    moved = ds.to("cpu")
    assert moved is not ds and isinstance(moved.train, Split)
    assert torch.equal(moved.train.x, ds.train.x)
    desc = ds.describe()
    json.dumps(desc)
    assert desc["name"] == "digits" and desc["x_dim"] == 64 and desc["y_dim"] == 0
    assert (desc["n_train"], desc["n_val"], desc["n_test"]) == (1437, 180, 180)
    assert desc["likelihood"] == "bernoulli" and desc["binarize"] == "dynamic"
    assert desc["image_shape"] == [8, 8] and desc["n_classes"] == 10
    for k in ("n_levels", "condition"):
        assert k in desc


def test_registry_and_default_likelihood():
    for name in ("digits", "mnist", "circle", "moons", "swiss-roll"):
        assert name in DATASETS and DATASETS[name]
    assert any(".npy" in k for k in DATASETS)
    assert default_likelihood("digits") == "bernoulli"
    assert default_likelihood("mnist") == "bernoulli"
    assert default_likelihood("moons") == "gaussian"
    assert default_likelihood("my/data.csv") == "gaussian"
    raises_one_line("unknown dataset", default_likelihood, "cifar")


# --------------------------------------------------------------------------- #
# synthetic manifolds
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["circle", "moons", "swiss-roll"])
def test_synthetic_shapes_and_determinism(name):
    ds = load_dataset(name, n_samples=500)
    assert ds.likelihood == "gaussian" and ds.x_dim == 2 and ds.y_dim == 0
    assert ds.image_shape is None and ds.n_classes is None
    assert len(ds.train) + len(ds.val) + len(ds.test) == 500
    assert ds.train.x.dtype == torch.float32 and torch.isfinite(ds.train.x).all()
    manifold = ds.meta["true_manifold"]
    assert isinstance(manifold, np.ndarray) and manifold.ndim == 2 and manifold.shape[1] == 2
    assert manifold.shape[0] >= 100
    same = load_dataset(name, n_samples=500)
    other = load_dataset(name, n_samples=500, seed=1)
    assert torch.equal(same.train.x, ds.train.x)
    assert not torch.equal(other.train.x, ds.train.x)
    # points lie near the true curve: mean distance to nearest manifold point ~ noise
    pts = torch.cat([ds.train.x, ds.val.x, ds.test.x]).double()
    dist = torch.cdist(pts, torch.from_numpy(manifold)).min(1).values
    assert dist.mean() < 0.1


def test_circle_noise_and_default_size():
    exact = load_dataset("circle", noise=0.0)
    assert len(exact.train) + len(exact.val) + len(exact.test) == 2000
    assert torch.allclose(exact.train.x.norm(dim=1), torch.ones(len(exact.train)), atol=1e-5)
    noisy = load_dataset("circle", noise=0.2)
    assert (noisy.train.x.norm(dim=1) - 1).std() > 0.1
    assert np.allclose(np.linalg.norm(exact.meta["true_manifold"], axis=1), 1.0)


def test_synthetic_option_errors(tmp_path):
    raises_one_line("gaussian", load_dataset, "moons", likelihood="bernoulli")
    raises_one_line("labels", load_dataset, "circle", condition="label")
    raises_one_line("quadrants", load_dataset, "swiss-roll", condition="quadrants")
    raises_one_line("noise", load_dataset, "circle", noise=-1.0)
    raises_one_line("n_samples", load_dataset, "circle", n_samples=0)
    raises_one_line("synthetic", load_dataset, "digits", n_samples=10)


# --------------------------------------------------------------------------- #
# IDX / MNIST format
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_valid(tmp_path, gz):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    path = write_idx(tmp_path / "valid-idx3-ubyte", idx_bytes(arr), gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert np.array_equal(out, arr)
    # gzip detected from content, not name
    renamed = tmp_path / "looks-raw"
    renamed.write_bytes(path.read_bytes())
    assert np.array_equal(read_idx(renamed), arr)


def test_read_idx_errors(tmp_path):
    arr = np.zeros((5, 4, 4))
    good = idx_bytes(arr)
    cases = {
        "truncated": (good[:-7], "truncated: header says 5x4x4 (80 bytes) but only 73 bytes follow"),
        "extra": (good + b"\x00\x01", "2 extra bytes"),
        "magic": (b"\x12\x34" + good[2:], "bad magic"),
        "dtype": (idx_bytes(arr, code=0x0D), "data type code 0x0d"),
        "header": (good[:10], "truncated"),
    }
    for stem, (data, match) in cases.items():
        path = tmp_path / stem
        path.write_bytes(data)
        msg = raises_one_line(match, read_idx, path)
        assert str(path) in msg
    # corrupt gzip stream
    blob = bytearray(gzip.compress(good))
    blob[12:20] = b"\xff" * 8
    bad = tmp_path / "corrupt.gz"
    bad.write_bytes(bytes(blob))
    raises_one_line("gzip", read_idx, bad)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(good)[:15])
    raises_one_line("gzip", read_idx, cut)
    raises_one_line("not found", read_idx, tmp_path / "nothing-here")


@pytest.mark.parametrize("gz", [True, False])
def test_fake_mnist_loads(tmp_path, gz):
    arrays = fake_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path, seed=0, val_fraction=0.25)
    assert ds.image_shape == (4, 4) and ds.x_dim == 16 and ds.n_classes == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (45, 15, 20)
    assert ds.binarize == "dynamic" and is_binary(ds.val.x) and is_binary(ds.test.x)
    # test = the t10k file in order; train/val partition the training file
    assert torch.equal(ds.test.index, torch.arange(20))
    assert set(ds.train.index.tolist()) | set(ds.val.index.tolist()) == set(range(60))
    assert not set(ds.train.index.tolist()) & set(ds.val.index.tolist())
    g = load_dataset("mnist", data_dir=tmp_path, likelihood="gaussian", condition="label")
    images = arrays["train-images-idx3-ubyte"].reshape(60, 16)
    expected = torch.from_numpy(images[g.train.index.numpy()].astype(np.float32)) / 255
    assert torch.allclose(g.train.x, expected)
    labels = torch.from_numpy(arrays["t10k-labels-idx1-ubyte"])
    assert torch.equal(g.test.y.argmax(1), labels) and g.y_dim == 10
    q = load_dataset("mnist", data_dir=tmp_path, condition="quadrants", visible_quadrants=3)
    assert (q.x_dim, q.y_dim) == (4, 12)
    capped = load_dataset("mnist", data_dir=tmp_path, max_examples=5)
    assert (len(capped.train), len(capped.val), len(capped.test)) == (5, 5, 5)


def test_mnist_prefers_whichever_file_exists(tmp_path):
    fake_mnist(tmp_path, gz=True)
    # replace one gz by a raw file: both kinds in the same folder
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    assert len(load_dataset("mnist", data_dir=tmp_path).test) == 20


def test_mnist_bad_files(tmp_path):
    def case(name, **overrides):
        folder = tmp_path / name
        fake_mnist(folder, overrides=overrides)
        return folder

    raises_one_line("needs data_dir", load_dataset, "mnist")
    raises_one_line("not a folder", load_dataset, "mnist", data_dir=tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    raises_one_line("lacks", load_dataset, "mnist", data_dir=empty)

    rng = np.random.default_rng(1)
    labels_as_images = case("swap", **{"train-images-idx3-ubyte": idx_bytes(rng.integers(0, 10, 60))})
    raises_one_line("mislabelled", load_dataset, "mnist", data_dir=labels_as_images)
    images_as_labels = case("swap2", **{"t10k-labels-idx1-ubyte": idx_bytes(rng.integers(0, 9, (20, 4, 4)))})
    raises_one_line("mislabelled", load_dataset, "mnist", data_dir=images_as_labels)
    mismatch = case("count", **{"train-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, 59))})
    msg = raises_one_line("counts must match", load_dataset, "mnist", data_dir=mismatch)
    assert "59" in msg and "60" in msg
    out_of_range = case("range", **{"t10k-labels-idx1-ubyte": idx_bytes(np.full(20, 12))})
    raises_one_line("labels out of range", load_dataset, "mnist", data_dir=out_of_range)
    truncated = case("trunc", **{"train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (60, 4, 4)))[:-100]})
    msg = raises_one_line("truncated", load_dataset, "mnist", data_dir=truncated)
    assert "train-images-idx3-ubyte" in msg
    folder = case("gzip")
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    raises_one_line("corrupt gzip", load_dataset, "mnist", data_dir=folder)
    shapes = case("shape", **{"t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (20, 5, 5)))})
    raises_one_line("same size", load_dataset, "mnist", data_dir=shapes)
    ok = case("ok")
    raises_one_line("categorical", load_dataset, "mnist", data_dir=ok, likelihood="categorical")
    raises_one_line("val_fraction", load_dataset, "mnist", data_dir=ok, val_fraction=0.001)


@pytest.mark.mnist
def test_real_mnist_files():
    if not MNIST_DIR.is_dir():
        pytest.skip(f"real MNIST IDX files not found at {MNIST_DIR}")
    ds = load_dataset("mnist", data_dir=MNIST_DIR, max_examples=200, condition="label")
    assert ds.image_shape == (28, 28) and ds.x_dim == 784 and ds.y_dim == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (200, 200, 200)
    assert torch.equal(ds.test.index, torch.arange(200))
    assert int(ds.train.index.max()) < 60000
    assert is_binary(ds.test.x) and not is_binary(ds.train.x)
    assert 0.05 < ds.train.x.mean() < 0.25  # MNIST mean intensity is ~0.13
    assert set(ds.train.labels.tolist()) == set(range(10))


# --------------------------------------------------------------------------- #
# user files
# --------------------------------------------------------------------------- #


def test_npy_gaussian(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3))
    path = tmp_path / "points.npy"
    np.save(path, x)
    ds = load_dataset(str(path))
    assert ds.name == "points.npy" and ds.likelihood == "gaussian" and ds.x_dim == 3
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 5, 5)
    assert torch.allclose(ds.val.x, torch.from_numpy(x[ds.val.index.numpy()]).float())
    assert ds.n_classes is None and ds.train.labels is None
    raises_one_line("labels", load_dataset, str(path), condition="label")
    raises_one_line("quadrants", load_dataset, str(path), condition="quadrants",
                    likelihood="bernoulli", binarize="threshold")


def test_npy_bad_values(tmp_path):
    x = np.random.default_rng(0).uniform(size=(20, 4))
    x[[1, 3, 5], [0, 1, 2]] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, x)
    msg = raises_one_line("x contains 3 NaN values", load_dataset, str(path))
    assert "nan.npy" in msg
    x = np.ones((20, 4))
    x[0, 0] = np.inf
    np.save(tmp_path / "inf.npy", x)
    raises_one_line("1 inf values", load_dataset, str(tmp_path / "inf.npy"))
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    raises_one_line("expected a 2-D array [n, D]", load_dataset, str(tmp_path / "flat.npy"))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    raises_one_line("empty", load_dataset, str(tmp_path / "empty.npy"))
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    raises_one_line("dtype", load_dataset, str(tmp_path / "text.npy"))


def test_user_bernoulli_checks(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.uniform(0.1, 0.9, size=(40, 6))
    np.save(tmp_path / "grey.npy", grey)
    msg = raises_one_line("data for a Bernoulli likelihood must be 0/1", load_dataset,
                          str(tmp_path / "grey.npy"), likelihood="bernoulli")
    assert "binarize='dynamic'|'fixed'|'threshold'" in msg and "[0.1" in msg
    ds = load_dataset(str(tmp_path / "grey.npy"), likelihood="bernoulli", binarize="fixed")
    assert is_binary(ds.train.x) and ds.binarize == "fixed"
    binary = (grey > 0.5).astype(np.float64)
    np.save(tmp_path / "binary.npy", binary)
    ds = load_dataset(str(tmp_path / "binary.npy"), likelihood="bernoulli")
    assert ds.binarize is None and is_binary(ds.train.x)
    np.save(tmp_path / "wide.npy", grey * 5)
    raises_one_line("[0, 1]", load_dataset, str(tmp_path / "wide.npy"),
                    likelihood="bernoulli", binarize="dynamic")
    raises_one_line("must be 0/1", load_dataset, str(tmp_path / "wide.npy"), likelihood="bernoulli")


def test_user_categorical(tmp_path):
    levels = np.random.default_rng(0).integers(0, 5, size=(30, 4))
    np.save(tmp_path / "levels.npy", levels)
    ds = load_dataset(str(tmp_path / "levels.npy"), likelihood="categorical")
    assert ds.n_levels == int(levels.max()) + 1
    np.save(tmp_path / "frac.npy", levels + 0.5)
    raises_one_line("non-negative integer", load_dataset, str(tmp_path / "frac.npy"),
                    likelihood="categorical")
    np.save(tmp_path / "neg.npy", levels - 3)
    raises_one_line("non-negative integer", load_dataset, str(tmp_path / "neg.npy"),
                    likelihood="categorical")


def test_npz_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), rng.integers(0, 4, size=40)
    y[0] = 4  # n_classes = max + 1 = 5
    np.savez(tmp_path / "lab.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "lab.npz"), condition="label")
    assert ds.n_classes == 5 and ds.y_dim == 5
    assert torch.equal(ds.train.y.argmax(1), torch.from_numpy(y[ds.train.index.numpy()]))
    np.savez(tmp_path / "neg.npz", x=x, y=y - 2)
    raises_one_line("is negative", load_dataset, str(tmp_path / "neg.npz"))
    np.savez(tmp_path / "float.npz", x=x, y=y + 0.5)
    raises_one_line("is not an integer", load_dataset, str(tmp_path / "float.npz"))
    np.savez(tmp_path / "short.npz", x=x, y=y[:-1])
    raises_one_line("counts must match", load_dataset, str(tmp_path / "short.npz"))
    np.savez(tmp_path / "nox.npz", data=x)
    raises_one_line("no array named 'x'", load_dataset, str(tmp_path / "nox.npz"))


def test_csv_with_and_without_header(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 3)).round(4)
    lines = [",".join(str(v) for v in row) for row in x]
    (tmp_path / "head.csv").write_text("a,b,c\n" + "\n".join(lines) + "\n")
    (tmp_path / "plain.csv").write_text("\n".join(lines) + "\n")
    h = load_dataset(str(tmp_path / "head.csv"))
    p = load_dataset(str(tmp_path / "plain.csv"))
    assert h.x_dim == 3 and len(h.train) + len(h.val) + len(h.test) == 30
    for split in ("train", "val", "test"):
        assert torch.equal(h.split(split).x, p.split(split).x)
        assert torch.allclose(h.split(split).x,
                              torch.from_numpy(x[h.split(split).index.numpy()]).float())
    (tmp_path / "word.csv").write_text("a,b\n1,2\n3,oops\n")
    raises_one_line("non-numeric value 'oops'", load_dataset, str(tmp_path / "word.csv"))
    (tmp_path / "hole.csv").write_text("1,2\n3,\n5,6\n7,8\n9,10\n")
    raises_one_line("hole.csv line 2, column 2 is empty", load_dataset, str(tmp_path / "hole.csv"))
    (tmp_path / "blank.csv").write_text("")
    raises_one_line("empty", load_dataset, str(tmp_path / "blank.csv"))
    (tmp_path / "onlyhead.csv").write_text("a,b\n")
    raises_one_line("empty", load_dataset, str(tmp_path / "onlyhead.csv"))


# --------------------------------------------------------------------------- #
# names and options
# --------------------------------------------------------------------------- #


def test_names_and_files(tmp_path):
    msg = raises_one_line("unknown dataset 'cifar10'", load_dataset, "cifar10")
    for known in ("digits", "mnist", "circle", "moons", "swiss-roll", ".npy"):
        assert known in msg
    raises_one_line("file not found", load_dataset, str(tmp_path / "missing.npy"))
    (tmp_path / "data.txt").write_text("1,2\n")
    raises_one_line("unsupported file type", load_dataset, str(tmp_path / "data.txt"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(likelihood="poisson"), "unknown likelihood"),
    (dict(binarize="sometimes"), "unknown binarize"),
    (dict(likelihood="gaussian", binarize="fixed"), "applies only to likelihood='bernoulli'"),
    (dict(condition="class"), "unknown condition"),
    (dict(condition="quadrants", visible_quadrants=0), "visible_quadrants"),
    (dict(condition="quadrants", visible_quadrants=4), "visible_quadrants"),
    (dict(condition="quadrants", likelihood="gaussian"), "needs likelihood='bernoulli'"),
    (dict(val_fraction=0.0), "leaves the val split empty"),
    (dict(test_fraction=0.0001), "leaves the test split empty"),
    (dict(val_fraction=0.5, test_fraction=0.5), "train split empty"),
    (dict(val_fraction=1.5), "val_fraction"),
    (dict(max_examples=0), "max_examples"),
    (dict(seed=-1), "seed"),
])
def test_option_errors(kwargs, match):
    raises_one_line(match, load_dataset, "digits", **kwargs)


# --------------------------------------------------------------------------- #
# DataOptions: one object for every data option
# --------------------------------------------------------------------------- #


def assert_same_dataset(a: Dataset, b: Dataset) -> None:
    assert (a.name, a.likelihood, a.binarize, a.condition) == (b.name, b.likelihood, b.binarize,
                                                               b.condition)
    assert a.describe() == b.describe()
    for split in SPLIT_NAMES:
        pa, pb = a.split(split), b.split(split)
        assert torch.equal(pa.x, pb.x) and torch.equal(pa.index, pb.index)
        assert (pa.y is None) == (pb.y is None)
        if pa.y is not None:
            assert torch.equal(pa.y, pb.y)


def test_data_options_defaults_and_frozen():
    opts = DataOptions()
    assert [f.name for f in dataclasses.fields(DataOptions)] == [
        "data_dir", "likelihood", "binarize", "condition", "visible_quadrants",
        "val_fraction", "test_fraction", "n_samples", "noise", "max_examples", "num_classes", "standardize"]
    assert (opts.visible_quadrants, opts.val_fraction, opts.test_fraction) == (1, 0.1, 0.1)
    assert opts.likelihood is None and opts.max_examples is None and opts.data_dir is None
    assert opts.num_classes is None and opts.standardize is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.likelihood = "gaussian"


def test_data_options_metadata():
    choices = {"likelihood": LIKELIHOODS, "binarize": BINARIZE_MODES, "condition": CONDITIONS}
    for f in dataclasses.fields(DataOptions):
        text = f.metadata.get("help")
        assert isinstance(text, str) and text.strip(), f.name
        assert "\n" not in text and text == text.strip(), f.name
        assert f.metadata.get("choices") is choices.get(f.name), f.name


@pytest.mark.parametrize("name, fields", [
    ("digits", dict(likelihood="gaussian", max_examples=50)),
    ("digits", dict(condition="quadrants", visible_quadrants=2, binarize="fixed")),
    ("digits", dict(condition="label", val_fraction=0.2, test_fraction=0.15)),
    ("moons", dict(n_samples=300, noise=0.1)),
])
def test_options_object_matches_keywords(name, fields):
    by_keywords = load_dataset(name, seed=4, **fields)
    by_options = load_dataset(name, DataOptions(**fields), seed=4)
    assert_same_dataset(by_options, by_keywords)


def test_options_object_for_mnist(tmp_path):
    fake_mnist(tmp_path)
    opts = DataOptions(data_dir=str(tmp_path), val_fraction=0.25, condition="label")
    assert_same_dataset(load_dataset("mnist", opts, seed=2),
                        load_dataset("mnist", seed=2, data_dir=str(tmp_path), val_fraction=0.25,
                                     condition="label"))


def test_keywords_override_options():
    opts = DataOptions(likelihood="gaussian", max_examples=40, val_fraction=0.2)
    ds = load_dataset("digits", opts, seed=1, max_examples=30, likelihood="bernoulli")
    assert ds.likelihood == "bernoulli" and ds.binarize == "dynamic"
    assert_same_dataset(ds, load_dataset("digits", seed=1, likelihood="bernoulli",
                                         max_examples=30, val_fraction=0.2))
    # the options object itself is left as it was
    assert opts.likelihood == "gaussian" and opts.max_examples == 40
    # options given by keyword, and the defaults when neither is given
    assert_same_dataset(load_dataset("digits", options=opts), load_dataset("digits", opts))
    assert_same_dataset(load_dataset("digits", None), load_dataset("digits", DataOptions()))


def test_options_are_still_checked():
    raises_one_line("unknown likelihood 'poisson'", load_dataset, "digits",
                    DataOptions(likelihood="poisson"))
    raises_one_line("visible_quadrants", load_dataset, "digits",
                    DataOptions(condition="quadrants"), visible_quadrants=5)


def test_unknown_keyword_is_a_data_error():
    msg = raises_one_line("unknown data option 'foo'", load_dataset, "digits", foo=1)
    assert "known: data_dir, likelihood, binarize" in msg and "max_examples" in msg
    msg = raises_one_line("unknown data options", load_dataset, "digits", DataOptions(),
                          likelyhood="gaussian", bar=2)
    assert "'likelyhood'" in msg and "'bar'" in msg


@pytest.mark.parametrize("bad", [{"likelihood": "gaussian"}, "gaussian", 3])
def test_wrong_options_type_is_a_data_error(bad):
    msg = raises_one_line("options must be a DataOptions", load_dataset, "digits", bad)
    assert type(bad).__name__ in msg


# --------------------------------------------------------------------------- #
# hardening: ragged CSV, labels, value scale, standardize
# --------------------------------------------------------------------------- #


def write_csv(path: Path, rows, header: str | None = None) -> Path:
    lines = ([header] if header else []) + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_ragged_line_is_named(tmp_path):
    rows = [[i, i + 1, i + 2, i + 3] for i in range(10)]
    longer = [list(r) for r in rows]
    longer[5].append(99)                                   # data row 6 = line 7 after the header
    path = write_csv(tmp_path / "data.csv", longer, header="a,b,c,d")
    msg = raises_one_line("data.csv line 7 has 5 fields, expected 4", load_dataset, str(path))
    assert "NaN" not in msg and "header" in msg
    shorter = [list(r) for r in rows]
    shorter[2] = shorter[2][:3]                            # no header: line 3
    raises_one_line("data.csv line 3 has 3 fields, expected 4", load_dataset,
                    str(write_csv(tmp_path / "data.csv", shorter)))
    # blank lines are skipped but still counted
    (tmp_path / "blank.csv").write_text("1,2\n\n3,4\n\n5\n")
    raises_one_line("blank.csv line 5 has 1 field, expected 2", load_dataset, str(tmp_path / "blank.csv"))


@pytest.mark.parametrize("cell, match", [
    ("oops", "line 4, column 2: non-numeric value 'oops'"),
    ("", "line 4, column 2 is empty"),
    ("inf", "line 4, column 2: value 'inf' is not finite"),
    ("nan", "line 4, column 2: value 'nan' is not finite"),
    ("1e999", "line 4, column 2: value '1e999' is not finite"),
])
def test_csv_bad_cell_is_named(tmp_path, cell, match):
    rows = [[f"{i}.5", f"{-i}", "7"] for i in range(10)]
    rows[2][1] = cell                                      # line 4 (after the header)
    path = write_csv(tmp_path / "cells.csv", rows, header="u,v,w")
    raises_one_line(match, load_dataset, str(path))


def test_csv_empty_and_header_only(tmp_path):
    (tmp_path / "none.csv").write_text("\n\n")
    raises_one_line("empty data", load_dataset, str(tmp_path / "none.csv"))
    (tmp_path / "head.csv").write_text("a,b\n\n")
    raises_one_line("only a header (line 1)", load_dataset, str(tmp_path / "head.csv"))
    (tmp_path / "two_heads.csv").write_text("a,b\nc,d\n1,2\n")
    raises_one_line("line 2, column 1: non-numeric value 'c'", load_dataset, str(tmp_path / "two_heads.csv"))


def test_nan_and_inf_locations_are_named(tmp_path):
    x = np.zeros((20, 3))
    x[4, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    raises_one_line("x contains 1 NaN values (first x[4, 2]", load_dataset, str(tmp_path / "nan.npy"))
    x[4, 2] = -np.inf
    np.savez(tmp_path / "inf.npz", x=x)
    raises_one_line("x contains 1 inf values (first x[4, 2] = -inf)", load_dataset, str(tmp_path / "inf.npz"))


def labelled(tmp_path: Path, y, name: str = "lab.npz", n_cols: int = 3) -> str:
    y = np.asarray(y)
    x = np.random.default_rng(0).normal(size=(len(y), n_cols))
    np.savez(tmp_path / name, x=x, y=y)
    return str(tmp_path / name)


def test_stray_label_57_is_refused(tmp_path):
    y = np.arange(100) % 10
    y[37] = 57
    path = labelled(tmp_path, y)
    msg = raises_one_line("label 57 is used", load_dataset, path)
    assert "every class present" in msg and "10..56" in msg and "num_classes >= 58" in msg
    raises_one_line("label 57 is used", load_dataset, path, condition="label")
    msg = raises_one_line("label 57 out of range for num_classes=10", load_dataset, path, num_classes=10)
    assert "y[37] = 57" in msg and "0..9" in msg
    ds = load_dataset(path, num_classes=58, condition="label")     # declared: 48 classes absent
    assert ds.n_classes == 58 and ds.y_dim == 58


def test_num_classes_allows_absent_classes(tmp_path):
    y = (np.arange(60) % 3) * 2                                    # 0, 2, 4
    path = labelled(tmp_path, y)
    msg = raises_one_line("classes 1, 3 have no examples", load_dataset, path)
    assert "labels 2, 4 are used" in msg
    ds = load_dataset(path, num_classes=6, condition="label")
    assert ds.n_classes == 6 and ds.y_dim == 6
    for part in (ds.train, ds.val, ds.test):
        assert torch.equal(part.y.argmax(1), part.labels)
        assert set(part.labels.tolist()) <= {0, 2, 4}
    raises_one_line("label 4 out of range for num_classes=4", load_dataset, path, num_classes=4)
    # labels numbered from 1 are named, with the fix
    one_based = labelled(tmp_path, np.arange(60) % 3 + 1, "one.npz")
    msg = raises_one_line("class 0 has no examples", load_dataset, one_based)
    assert "relabel the classes 0..2" in msg
    # the labels of a valid file are unchanged by num_classes
    full = labelled(tmp_path, np.arange(60) % 4, "full.npz")
    assert load_dataset(full).n_classes == 4 and load_dataset(full, num_classes=7).n_classes == 7


@pytest.mark.parametrize("bad, match", [
    (2.5, "y[5] = 2.5 is not an integer"),
    (-1, "y[5] = -1 is negative"),
    (np.nan, "y[5] = nan is NaN"),
    (np.inf, "y[5] = inf is infinite"),
])
def test_bad_label_values(tmp_path, bad, match):
    y = (np.arange(40) % 4).astype(np.float64)
    y[5] = bad
    raises_one_line(match, load_dataset, labelled(tmp_path, y))
    raises_one_line(match, load_dataset, labelled(tmp_path, y), num_classes=10)


def test_num_classes_option_errors(tmp_path):
    path = labelled(tmp_path, np.arange(40) % 4)
    raises_one_line("num_classes must be an integer in 1..", load_dataset, path, num_classes=0)
    raises_one_line("num_classes must be an integer", load_dataset, path, num_classes=2.0)
    np.save(tmp_path / "plain.npy", np.zeros((20, 2)))
    raises_one_line("num_classes=3 applies only to data with labels", load_dataset,
                    str(tmp_path / "plain.npy"), num_classes=3)
    raises_one_line("moons: num_classes=3 applies only to data with labels", load_dataset, "moons",
                    num_classes=3)
    msg = raises_one_line("labels 5, 6, 7, 8, 9 out of range for num_classes=5", load_dataset, "digits",
                          num_classes=5)
    assert msg.startswith("digits:")
    ds = load_dataset("digits", num_classes=12, condition="label", max_examples=20)
    assert ds.n_classes == 12 and ds.y_dim == 12


def test_mnist_labels_follow_num_classes(tmp_path):
    fake_mnist(tmp_path)
    assert load_dataset("mnist", data_dir=str(tmp_path)).n_classes == 10
    raises_one_line("out of range for num_classes=3", load_dataset, "mnist", data_dir=str(tmp_path), num_classes=3)


def test_huge_values_are_refused_with_a_standardize_hint(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 4))
    x[11, 3] = 1e30
    np.save(tmp_path / "big.npy", x)
    msg = raises_one_line("x[11, 3] = 1e+30 is too large for float32", load_dataset, str(tmp_path / "big.npy"))
    assert "--standardize" in msg and "standardize=True" in msg and "squares" in msg
    # the limit is sqrt(float32 max / D): 9.2e18 for D = 4
    x[11, 3] = 1e19
    np.save(tmp_path / "edge.npy", x)
    raises_one_line("too large for float32", load_dataset, str(tmp_path / "edge.npy"))
    x[11, 3] = -9e18
    np.save(tmp_path / "fits.npy", x)
    assert torch.isfinite(load_dataset(str(tmp_path / "fits.npy")).train.x.pow(2).sum(1)).all()
    # also in a csv, and beyond the float32 range altogether
    x[11, 3] = 1e300
    np.savetxt(tmp_path / "big.csv", x, delimiter=",")
    raises_one_line("x[11, 3] = 1e+300 is too large", load_dataset, str(tmp_path / "big.csv"))


def test_categorical_levels_beyond_float32_integers_are_refused(tmp_path):
    levels = np.random.default_rng(0).integers(0, 5, size=(30, 2)).astype(np.float64)
    levels[3, 1] = 1e30
    np.save(tmp_path / "levels.npy", levels)
    raises_one_line("float32 holds integers exactly only below 16777216", load_dataset,
                    str(tmp_path / "levels.npy"), likelihood="categorical")


def test_standardize_uses_the_training_split_only(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.normal(loc=[100.0, -3.0, 7.0], scale=[5.0, 0.01, 1.0], size=(200, 3))
    raw[:, 2] = 7.0                                               # a constant dimension
    np.save(tmp_path / "raw.npy", raw)
    path = str(tmp_path / "raw.npy")
    plain = load_dataset(path, seed=3)
    ds = load_dataset(path, seed=3, standardize=True)
    assert ds.describe()["standardize"] is True and "standardize" not in plain.describe()
    train = raw[ds.train.index.numpy()]
    mean, std = train.mean(0), train.std(0)
    std[2] = 1.0
    assert np.allclose(ds.meta["mean"], mean) and np.allclose(ds.meta["std"], std)
    assert isinstance(ds.meta["mean"], list) and isinstance(ds.meta["std"], list)
    # the whole dataset's statistics differ: the val and test rows take no part
    assert not np.allclose(ds.meta["mean"][:2], raw.mean(0)[:2], rtol=0, atol=1e-9)
    for split in SPLIT_NAMES:
        part, ref = ds.split(split), plain.split(split)
        assert torch.equal(part.index, ref.index)
        expected = (raw[part.index.numpy()] - mean) / std
        assert torch.allclose(part.x, torch.from_numpy(expected).float(), atol=1e-5)
        assert part.x.dtype == torch.float32
        # mapping back gives the raw data
        back = part.x.double() * torch.tensor(ds.meta["std"]) + torch.tensor(ds.meta["mean"])
        assert torch.allclose(back, torch.from_numpy(raw[part.index.numpy()]), rtol=1e-5)
    assert torch.allclose(ds.train.x.mean(0), torch.tensor([0.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(ds.train.x[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-5)
    assert torch.equal(ds.train.x[:, 2], torch.zeros(len(ds.train)))
    # with max_examples the statistics are those of the capped training split
    capped = load_dataset(path, seed=3, standardize=True, max_examples=30)
    assert np.allclose(capped.meta["mean"][:2], raw[capped.train.index.numpy()].mean(0)[:2])


def test_standardize_rescues_huge_values_with_spread(tmp_path):
    raw = np.random.default_rng(0).normal(size=(50, 2)) * 1e30
    np.save(tmp_path / "wide.npy", raw)
    path = str(tmp_path / "wide.npy")
    raises_one_line("too large for float32", load_dataset, path)
    ds = load_dataset(path, standardize=True)
    assert torch.isfinite(ds.train.x).all() and ds.train.x.abs().max() < 10
    # beyond float64's square range, the statistics themselves overflow float32: refused
    np.save(tmp_path / "wider.npy", raw * 1e200)
    raises_one_line("beyond the float32 range", load_dataset, str(tmp_path / "wider.npy"), standardize=True)


def test_standardize_refuses_an_outlier_outside_the_training_split(tmp_path):
    raw = np.random.default_rng(0).normal(size=(50, 2))
    np.save(tmp_path / "clean.npy", raw)
    split = load_dataset(str(tmp_path / "clean.npy"))              # the split depends on n and seed only
    test_row, train_row = int(split.test.index[0]), int(split.train.index[0])
    raw[test_row, 1] = 1e25
    np.save(tmp_path / "outlier.npy", raw)
    msg = raises_one_line(f"x[{test_row}, 1] = 1e+25 lies", load_dataset, str(tmp_path / "outlier.npy"),
                          standardize=True)
    assert "standard deviations" in msg and "training split" in msg
    raw[test_row, 1], raw[train_row, 1] = 0.0, 1e25                  # in the training split it sets the spread
    np.save(tmp_path / "spread.npy", raw)
    ds = load_dataset(str(tmp_path / "spread.npy"), standardize=True)
    assert torch.isfinite(ds.train.x).all() and ds.meta["std"][1] > 1e23


def test_standardize_synthetic_and_images():
    ds = load_dataset("moons", n_samples=300, standardize=True)
    raw = load_dataset("moons", n_samples=300)
    mean, std = np.array(ds.meta["mean"]), np.array(ds.meta["std"])
    assert np.allclose(ds.meta["true_manifold"] * std + mean, raw.meta["true_manifold"])
    assert torch.allclose(ds.val.x, ((raw.val.x.double() - torch.tensor(mean)) / torch.tensor(std)).float(),
                          atol=1e-5)
    digits = load_dataset("digits", likelihood="gaussian", standardize=True)
    assert len(digits.meta["std"]) == 64 and digits.meta["std"][0] == 1.0   # the blank corner pixel
    assert max(digits.meta["mean"]) <= 1.0                                  # in [0, 1] intensity units


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="digits"), "standardize=True applies only to real-valued data (likelihood='gaussian')"),
    (dict(name="digits", likelihood="categorical"), "likelihood='categorical'"),
    (dict(name="digits", likelihood="gaussian", standardize="yes"), "standardize must be True or False"),
])
def test_standardize_refused_where_it_does_not_apply(kwargs, match):
    kwargs = {"standardize": True, **kwargs}
    raises_one_line(match, load_dataset, kwargs.pop("name"), **kwargs)


def test_standardize_refused_for_bernoulli_user_data(tmp_path):
    np.save(tmp_path / "bits.npy", np.eye(10))
    raises_one_line("bits.npy: standardize=True applies only to real-valued data", load_dataset,
                    str(tmp_path / "bits.npy"), likelihood="bernoulli", standardize=True)


def test_new_options_reach_the_command_line():
    from ppl_genmodels import cli

    fit = cli.build_parser()._subparsers._group_actions[0].choices["fit"]
    assert fit.parse_args(["--standardize"]).standardize is True
    assert fit.parse_args(["--no-standardize"]).standardize is False
    assert not hasattr(fit.parse_args([]), "standardize")
    assert fit.parse_args(["--num-classes", "12"]).num_classes == 12
    opts = DataOptions(num_classes=12, standardize=True)
    assert dataclasses.asdict(opts)["num_classes"] == 12 and dataclasses.asdict(opts)["standardize"] is True
