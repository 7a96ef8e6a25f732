"""Datasets: loading, validation, train/val/test splits and binarization.

Everything a model is trained and evaluated on comes out of
:func:`load_dataset` as a :class:`Dataset`: three :class:`Split` s of float32
tensors, already checked and prepared for one observation likelihood.

Options
-------
``load_dataset(name, options=None, *, seed=0, **fields)`` takes the dataset
name, one :class:`DataOptions` (a frozen dataclass holding every other data
option: ``data_dir``, ``likelihood``, ``binarize``, ``condition``,
``visible_quadrants``, ``val_fraction``, ``test_fraction``, ``n_samples``,
``noise``, ``max_examples``) and the seed. DataOptions fields may also be given
as keywords, alone (``load_dataset("digits", likelihood="gaussian")``) or
overriding the matching fields of ``options``. Each field carries a one-line
``metadata["help"]`` (and ``metadata["choices"]`` where the values form a fixed
list), from which a command line can be generated.

Sources
-------
``digits``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, grey levels
    0..16, labels 0..9). Needs no download.
``mnist``
    The four standard IDX files (``train-images-idx3-ubyte`` ...) in
    ``data_dir``, gzipped or raw. The test split is the t10k file, the
    validation split a seeded random ``val_fraction`` of the training file.
``circle``, ``moons``, ``swiss-roll``
    Seeded synthetic 2-D point clouds around a 1-D manifold; the noiseless
    curve is kept in ``meta["true_manifold"]`` for plots.
a path ending in ``.npy``, ``.npz`` or ``.csv``
    The user's own array ``x [n, D]`` (``.npz`` may add integer labels ``y [n]``).

Likelihoods and binarization
----------------------------
``x`` is prepared for the likelihood the model will put on it:

* ``"bernoulli"``: values in {0, 1}. Grey-level images (intensities scaled
  into [0, 1]) are binarized by ``binarize``:

  - ``"dynamic"`` (the default for digits and mnist): the training split keeps
    its grey levels and :meth:`Dataset.batches` draws a fresh
    ``x ~ Bernoulli(intensity)`` for every training minibatch, while the
    validation and test splits are binarized once, with a seeded draw, at load
    time. This is the protocol of Burda, Grosse & Salakhutdinov (2016),
    "Importance Weighted Autoencoders", and it acts as a regulariser.
  - ``"fixed"``: one seeded Bernoulli draw for every split at load time.
  - ``"threshold"``: ``x = 1[intensity > 0.5]``.

* ``"gaussian"``: real values (images scaled into [0, 1]).
* ``"categorical"``: non-negative integer levels stored as floats, with
  ``n_levels`` categories per coordinate (17 for digits: 0..16).

Conditioning
------------
``condition="label"`` puts the one-hot class in ``y [n, n_classes]``.
``condition="quadrants"`` is the structured-output task of Sohn, Lee & Yan
(2015), "Learning Structured Output Representation using Deep Conditional
Generative Models": each image is cut into quadrants (top-left, top-right,
bottom-left, bottom-right), the first ``visible_quadrants`` of them are the
input and the rest the output to predict. Sohn et al. call the input ``x`` and
the output ``y``; here the names follow the model contract instead, where ``x``
is what the model generates and ``y`` what it is conditioned on: ``y`` holds the
visible pixels and ``x`` the hidden ones. ``meta["y_pixels"]`` and
``meta["x_pixels"]`` give the flat (row-major) positions of those pixels in the
full image, so plots can reassemble whole images
(:func:`ppl_genmodels.plots.assemble_quadrant_images`).

Every problem with the input (missing or corrupt files, NaNs, wrong shapes,
values that do not fit the likelihood, inconsistent options) raises
:class:`DataError` with a one-line message before anything is returned.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

__all__ = [
    "DataError",
    "Split",
    "Dataset",
    "DataOptions",
    "DATASETS",
    "LIKELIHOODS",
    "BINARIZE_MODES",
    "CONDITIONS",
    "SPLIT_NAMES",
    "load_dataset",
    "read_idx",
    "default_likelihood",
    "quadrant_pixels",
]

LIKELIHOODS = ("bernoulli", "gaussian", "categorical")
BINARIZE_MODES = ("dynamic", "fixed", "threshold")
CONDITIONS = ("label", "quadrants")
SPLIT_NAMES = ("train", "val", "test")
USER_SUFFIXES = (".npy", ".npz", ".csv")

_IMAGE_DATASETS = ("digits", "mnist")
_SYNTHETIC = ("circle", "moons", "swiss-roll")
_ALIASES = {"swissroll": "swiss-roll", "swiss_roll": "swiss-roll", "two-moons": "moons"}

# Default noise (standard deviation, in the units of the returned points).
_DEFAULT_NOISE = {"circle": 0.05, "moons": 0.05, "swiss-roll": 0.05}
_DEFAULT_N_SAMPLES = 2000
_N_MANIFOLD_POINTS = 400
_SWISS_SCALE = 10.0

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16",
              0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}

DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 8x8 handwritten digits: 1797 images, grey levels 0..16, "
              "labels 0..9 (bundled, no download)",
    "mnist": "MNIST 28x28 digits from the four IDX files (.gz or raw) in data_dir; "
             "test = t10k file, val = seeded part of the training file",
    "circle": "2-D points uniformly on the unit circle plus Gaussian noise (default 0.05)",
    "moons": "2-D two interleaving half circles (scikit-learn make_moons, default noise 0.05)",
    "swiss-roll": "2-D spiral: scikit-learn make_swiss_roll, columns 0 and 2, divided by 10 "
                  "(default noise 0.05 after scaling)",
    "<path>.npy/.npz/.csv": "your own data x [n, D]: .npy array, .npz with key 'x' and optional "
                            "integer labels 'y' [n], or a numeric .csv (optional header row)",
}


class DataError(ValueError):
    """Bad input data.

    ``str(err)`` is one line naming the problem: which file or array, what is
    wrong, and what was expected.
    """

    def __init__(self, message: object):
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- #
# Options
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class DataOptions:
    """Every data option of :func:`load_dataset` except the dataset name and the seed.

    Values are not checked here but by :func:`load_dataset`, which raises
    :class:`DataError` for a bad one. Each field's ``metadata["help"]`` is a
    one-line command-line help text (without the default, which a generator
    appends); ``metadata["choices"]`` is the tuple of allowed values for
    ``likelihood``, ``binarize`` and ``condition``. ``data_dir`` may also be a
    :class:`os.PathLike`.
    """

    data_dir: str | None = field(default=None, metadata={
        "help": "folder with the MNIST IDX files (for --data mnist)"})
    likelihood: str | None = field(default=None, metadata={
        "help": "observation model (default: the dataset's)", "choices": LIKELIHOODS})
    binarize: str | None = field(default=None, metadata={
        "help": "binarization for a Bernoulli likelihood (default: dynamic for digits and mnist)",
        "choices": BINARIZE_MODES})
    condition: str | None = field(default=None, metadata={
        "help": "conditioning information y for a conditional model", "choices": CONDITIONS})
    visible_quadrants: int = field(default=1, metadata={
        "help": "visible quadrants for --condition quadrants (1-3)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "fraction of the examples held out for validation (mnist: of the training file)"})
    test_fraction: float = field(default=0.1, metadata={
        "help": "fraction of the examples held out for testing "
                "(not mnist: its test split is the t10k file)"})
    n_samples: int | None = field(default=None, metadata={
        "help": "number of points for synthetic 2-D data (default 2000)"})
    noise: float | None = field(default=None, metadata={
        "help": "noise level for synthetic 2-D data (default 0.05)"})
    max_examples: int | None = field(default=None, metadata={
        "help": "cap every split at this many examples (quick runs)"})


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(DataOptions))


# --------------------------------------------------------------------------- #
# Containers
# --------------------------------------------------------------------------- #


@dataclass(eq=False)
class Split:
    """One split of a dataset.

    ``x``: ``[n, x_dim]`` float32, what the model generates.
    ``y``: ``[n, y_dim]`` float32 conditioning input, or None.
    ``index``: ``[n]`` long, the row of each example in the original source
    array (e.g. the row in the MNIST t10k file), for reporting.
    ``labels``: ``[n]`` long class labels when the source has them (whatever
    ``condition`` is), else None; handy for colouring latent-space plots.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    index: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device) -> "Split":
        return Split(
            x=self.x.to(device),
            y=None if self.y is None else self.y.to(device),
            index=self.index.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )


@dataclass(eq=False)
class Dataset:
    """Three splits of validated data plus what they were prepared for.

    ``likelihood``: "bernoulli" | "gaussian" | "categorical".
    ``binarize``: None, "dynamic", "fixed" or "threshold" (bernoulli only).
    ``n_levels``: categories per coordinate for "categorical", else None.
    ``image_shape``: ``(rows, cols)`` of the full image for image data, else None.
    ``condition``: None, "label" or "quadrants" (see the module docstring).
    ``n_classes``: number of classes when the source has labels, else None.
    ``meta``: free-form extras: ``source`` (where the data came from; digits,
    mnist and user files), ``true_manifold``, ``noise`` and ``n_samples``
    (synthetic data), ``x_pixels``, ``y_pixels`` and ``visible_quadrants``
    (quadrants).
    """

    name: str
    train: Split
    val: Split
    test: Split
    likelihood: str
    binarize: str | None = None
    n_levels: int | None = None
    image_shape: tuple[int, int] | None = None
    condition: str | None = None
    n_classes: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def x_dim(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def y_dim(self) -> int:
        return 0 if self.train.y is None else int(self.train.y.shape[1])

    def split(self, name: str) -> Split:
        """The split called ``name`` ("train", "val" or "test")."""
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; expected one of train, val, test")
        return getattr(self, name)

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(x, y)`` minibatches of one split (``y`` None when unconditioned).

        ``shuffle`` orders the examples by ``torch.randperm`` drawn with
        ``generator`` (a CPU generator; None uses the global torch RNG). The last
        partial batch is kept. With ``binarize == "dynamic"`` every training
        batch is a fresh ``torch.bernoulli`` draw (global torch RNG, on the data's
        device) of the stored grey levels -- of ``x``, and of ``y`` too when
        ``condition == "quadrants"``; validation and test batches are yielded
        as stored (binarized once at load time).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        part = self.split(split)
        n = len(part)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(part.x.device)
        else:
            order = None
        fresh = split == "train" and self.binarize == "dynamic"
        for start in range(0, n, batch_size):
            if order is None:
                sl = slice(start, start + batch_size)
                xb = part.x[sl]
                yb = None if part.y is None else part.y[sl]
            else:
                rows = order[start:start + batch_size]
                xb = part.x[rows]
                yb = None if part.y is None else part.y[rows]
            if fresh:
                xb = torch.bernoulli(xb)
                if yb is not None and self.condition == "quadrants":
                    yb = torch.bernoulli(yb)
            yield xb, yb

    def to(self, device) -> "Dataset":
        """A new Dataset with every tensor on ``device`` (``meta`` is copied shallowly)."""
        return dataclasses.replace(
            self,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
            meta=dict(self.meta),
        )

    def describe(self) -> dict:
        """JSON-serialisable summary of the dataset."""
        out = {
            "name": self.name,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "x_dim": self.x_dim,
            "y_dim": self.y_dim,
            "likelihood": self.likelihood,
            "binarize": self.binarize,
            "n_levels": self.n_levels,
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "condition": self.condition,
            "n_classes": self.n_classes,
        }
        if self.condition == "quadrants":
            out["visible_quadrants"] = self.meta.get("visible_quadrants")
        return out


# --------------------------------------------------------------------------- #
# Names and defaults
# --------------------------------------------------------------------------- #


def _canonical(name) -> str | None:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in _IMAGE_DATASETS + _SYNTHETIC else None


def _unknown(name) -> DataError:
    return DataError(
        f"unknown dataset {str(name)!r}; known: {', '.join(_IMAGE_DATASETS + _SYNTHETIC)}, "
        "or a path to a .npy/.npz/.csv file"
    )


def default_likelihood(name: str) -> str:
    """"bernoulli" for digits and mnist, "gaussian" for synthetic data and user files."""
    key = _canonical(name)
    if key in _IMAGE_DATASETS:
        return "bernoulli"
    if key in _SYNTHETIC:
        return "gaussian"
    if Path(str(name)).suffix.lower() in USER_SUFFIXES:
        return "gaussian"
    raise _unknown(name)


def quadrant_pixels(image_shape: tuple[int, int], visible_quadrants: int
                    ) -> tuple[list[int], list[int]]:
    """Flat pixel indices ``(x_pixels, y_pixels)`` of the quadrant task.

    Quadrants are taken in the order top-left, top-right, bottom-left,
    bottom-right (split at ``rows // 2`` and ``cols // 2``), row-major within
    each; ``y_pixels`` are the first ``visible_quadrants`` of them, ``x_pixels``
    the rest. Indices are row-major positions in the full image.
    """
    _check_visible(visible_quadrants)
    rows, cols = image_shape
    h, w = rows // 2, cols // 2
    boxes = [(0, h, 0, w), (0, h, w, cols), (h, rows, 0, w), (h, rows, w, cols)]
    quads = [[r * cols + c for r in range(r0, r1) for c in range(c0, c1)]
             for r0, r1, c0, c1 in boxes]
    y_pixels = [p for q in quads[:visible_quadrants] for p in q]
    x_pixels = [p for q in quads[visible_quadrants:] for p in q]
    return x_pixels, y_pixels


def _check_visible(visible_quadrants) -> int:
    if isinstance(visible_quadrants, bool) or not isinstance(visible_quadrants, (int, np.integer)) \
            or visible_quadrants not in (1, 2, 3):
        raise DataError(f"visible_quadrants must be 1, 2 or 3, got {visible_quadrants!r}")
    return int(visible_quadrants)


def _derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for one purpose (split, binarization, ...)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


_PURPOSE_SPLIT, _PURPOSE_BINARIZE, _PURPOSE_GENERATE = 0, 1, 2


# --------------------------------------------------------------------------- #
# IDX files
# --------------------------------------------------------------------------- #


def _dims_str(dims) -> str:
    return "x".join(str(d) for d in dims)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format) of unsigned bytes into a uint8 array.

    The file may be gzipped or raw; gzip is detected from its magic bytes
    (0x1f 0x8b), not from its name. Layout: two zero bytes, a data-type code
    (0x08 = unsigned byte, the only one accepted), the number of dimensions,
    one big-endian uint32 per dimension, then exactly prod(dims) bytes.
    Anything else raises :class:`DataError` naming the file.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except OSError as err:
        raise DataError(f"{p}: cannot read file ({err})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{p}: corrupt gzip stream ({err})") from None
    if len(raw) < 4:
        raise DataError(f"{p}: truncated: {len(raw)} bytes, an IDX header needs at least 4")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{p}: bad magic number 0x{raw[:4].hex()}: an IDX file starts with "
                        "two zero bytes, a type code and the number of dimensions")
    code, ndim = raw[2], raw[3]
    if code != 0x08:
        kind = _IDX_TYPES.get(code, "unknown")
        raise DataError(f"{p}: unsupported IDX data type code 0x{code:02x} ({kind}); "
                        "expected 0x08 (unsigned byte)")
    if ndim == 0:
        raise DataError(f"{p}: bad magic number 0x{raw[:4].hex()}: zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated: header declares {ndim} dimensions "
                        f"({header} header bytes) but the file has only {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    body = len(raw) - header
    if body < expected:
        raise DataError(f"{p}: truncated: header says {_dims_str(dims)} ({expected} bytes) "
                        f"but only {body} bytes follow")
    if body > expected:
        raise DataError(f"{p}: {body - expected} extra bytes after the {expected} bytes "
                        f"the header declares ({_dims_str(dims)})")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims).copy()


def _find_mnist_file(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_images(path: Path) -> np.ndarray:
    arr = read_idx(path)
    if arr.ndim != 3:
        hint = " (looks like a labels file)" if arr.ndim == 1 else ""
        raise DataError(f"{path}: mislabelled: expected an images file with 3 dimensions "
                        f"(count x rows x cols) but the header has {arr.ndim} "
                        f"({_dims_str(arr.shape)}){hint}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(f"{path}: empty: header says {_dims_str(arr.shape)}")
    return arr


def _read_idx_labels(path: Path, images_path: Path, n_images: int) -> np.ndarray:
    arr = read_idx(path)
    if arr.ndim != 1:
        hint = " (looks like an images file)" if arr.ndim == 3 else ""
        raise DataError(f"{path}: mislabelled: expected a labels file with 1 dimension "
                        f"but the header has {arr.ndim} ({_dims_str(arr.shape)}){hint}")
    if arr.shape[0] != n_images:
        raise DataError(f"{path}: has {arr.shape[0]} labels but {images_path} has "
                        f"{n_images} images; the counts must match")
    if arr.size and int(arr.max()) > 9:
        bad = int((arr > 9).sum())
        raise DataError(f"{path}: labels out of range: {bad} labels above 9 "
                        f"(max {int(arr.max())}); expected digits 0..9")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------- #
# Sources: raw arrays before splitting
# --------------------------------------------------------------------------- #


@dataclass
class _Source:
    x: np.ndarray                 # [N, D] raw values (uint8 / float)
    labels: np.ndarray | None     # [N] int64
    where: str                    # for messages


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.array(bunch.data, dtype=np.float64)
    labels = np.array(bunch.target, dtype=np.int64)
    x.setflags(write=False)       # shared by every load; rows are copied out
    labels.setflags(write=False)
    return x, labels


def _load_digits() -> _Source:
    x, labels = _digits_arrays()
    return _Source(x=x, labels=labels, where="digits")


def _load_mnist(data_dir) -> tuple[_Source, _Source, tuple[int, int]]:
    stems = ", ".join(f"{s}[.gz]" for s in _MNIST_FILES.values())
    if data_dir is None:
        raise DataError(f"mnist needs data_dir: a folder holding {stems}")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"mnist: data_dir {folder} is not a folder; expected one holding {stems}")
    paths = {k: _find_mnist_file(folder, s) for k, s in _MNIST_FILES.items()}
    missing = [_MNIST_FILES[k] for k, v in paths.items() if v is None]
    if missing:
        raise DataError(f"mnist: data_dir {folder} lacks {', '.join(missing)} "
                        "(raw or .gz); expected the four standard IDX files")
    tr_img = _read_idx_images(paths["train_images"])
    tr_lab = _read_idx_labels(paths["train_labels"], paths["train_images"], tr_img.shape[0])
    te_img = _read_idx_images(paths["test_images"])
    te_lab = _read_idx_labels(paths["test_labels"], paths["test_images"], te_img.shape[0])
    if tr_img.shape[1:] != te_img.shape[1:]:
        raise DataError(f"{paths['test_images']}: images are {_dims_str(te_img.shape[1:])} but "
                        f"{paths['train_images']} has {_dims_str(tr_img.shape[1:])}; "
                        "expected the same size")
    shape = (int(tr_img.shape[1]), int(tr_img.shape[2]))
    train = _Source(tr_img.reshape(tr_img.shape[0], -1), tr_lab, str(paths["train_images"]))
    test = _Source(te_img.reshape(te_img.shape[0], -1), te_lab, str(paths["test_images"]))
    return train, test, shape


def _make_synthetic(name: str, n: int, noise: float, seed: int) -> tuple[_Source, np.ndarray]:
    """Noisy points [n, 2] and the noiseless manifold [m, 2]."""
    gen_seed = _derive_seed(seed, _PURPOSE_GENERATE)
    m = _N_MANIFOLD_POINTS
    if name == "circle":
        rng = np.random.default_rng(gen_seed)
        theta = rng.uniform(0.0, 2.0 * np.pi, size=n)
        x = np.stack([np.cos(theta), np.sin(theta)], axis=1)
        x = x + noise * rng.standard_normal(size=(n, 2))
        grid = np.linspace(0.0, 2.0 * np.pi, m)
        manifold = np.stack([np.cos(grid), np.sin(grid)], axis=1)
    elif name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n_samples=n, noise=noise, random_state=gen_seed % (2**32))
        # Rows 0..m/2-1 trace the outer (upper) moon, the rest the inner one.
        manifold, _ = make_moons(n_samples=m, noise=None, shuffle=False)
    elif name == "swiss-roll":
        from sklearn.datasets import make_swiss_roll

        x3, _ = make_swiss_roll(n_samples=n, noise=noise * _SWISS_SCALE,
                                random_state=gen_seed % (2**32))
        x = x3[:, [0, 2]] / _SWISS_SCALE
        t = 1.5 * np.pi * (1.0 + 2.0 * np.linspace(0.0, 1.0, m))
        manifold = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / _SWISS_SCALE
    else:  # pragma: no cover - guarded by the caller
        raise _unknown(name)
    return _Source(np.asarray(x, dtype=np.float64), None, name), np.asarray(manifold, dtype=np.float64)


def _as_numeric(arr: np.ndarray, where: str, what: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{where}: {what} has dtype {arr.dtype}; expected real numbers")
    return arr.astype(np.float64)


def _check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{where}: y has shape {tuple(y.shape)}; expected integer labels [n]")
    if y.shape[0] != n:
        raise DataError(f"{where}: y has {y.shape[0]} labels but x has {n} rows; counts must match")
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer)
                               or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: labels out of range: y has dtype {y.dtype}; "
                        "expected integers >= 0")
    yf = y.astype(np.float64)
    bad = ~np.isfinite(yf) | (yf != np.round(yf)) | (yf < 0)
    if bad.any():
        first = y[np.flatnonzero(bad)[0]]
        raise DataError(f"{where}: labels out of range: {int(bad.sum())} labels are not "
                        f"integers >= 0 (e.g. {first!r}); expected integers 0..n_classes-1")
    return yf.astype(np.int64)


def _read_csv(path: Path) -> np.ndarray:
    """A comma-separated numeric table [n, D]; empty cells become NaN.

    The first row is taken as a header (and skipped) when any of its cells is
    not a number; a header made only of numbers is read as data.
    """
    import pandas as pd

    try:
        table = pd.read_csv(path, header=None, dtype=str, keep_default_na=False,
                            skipinitialspace=True, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty data: the file has no rows; expected a numeric table") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: cannot parse as CSV ({err})") from None
    cells = table.to_numpy(dtype=object)

    def parse(cell) -> float | None:
        text = str(cell).strip()
        if text == "":
            return math.nan
        try:
            return float(text)
        except ValueError:
            return None

    if cells.shape[0] and any(parse(c) is None for c in cells[0]):
        cells = cells[1:]          # a header row
    out = np.empty(cells.shape, dtype=np.float64)
    for (r, c), cell in np.ndenumerate(cells):
        value = parse(cell)
        if value is None:
            raise DataError(f"{path}: non-numeric value {str(cell)!r} in data row {r + 1}, "
                            f"column {c + 1}; expected a numeric table (one header row allowed)")
        out[r, c] = value
    return out


def _load_user_file(path: Path) -> _Source:
    where = str(path)
    suffix = path.suffix.lower()
    labels = None
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{where}: cannot read as .npy ({err})") from None
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                if "x" not in keys:
                    raise DataError(f"{where}: no array named 'x' (found: {', '.join(keys) or 'none'}); "
                                    "expected x [n, D] and optional integer labels y [n]")
                x = archive["x"]
                labels = archive["y"] if "y" in keys else None
        except DataError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"{where}: cannot read as .npz ({err})") from None
    else:
        x = _read_csv(path)
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{where}: x has shape {tuple(x.shape)} ({x.ndim}-D); expected a 2-D "
                        "array [n, D] (flatten images to [n, rows*cols])")
    x = _as_numeric(x, where, "x")
    if labels is not None:
        labels = _check_labels(np.asarray(labels), x.shape[0], where)
    return _Source(x, labels, where)


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _check_finite(x: np.ndarray, where: str) -> None:
    if x.shape[0] == 0:
        raise DataError(f"{where}: empty data: x has 0 rows; expected at least one example")
    if x.shape[1] == 0:
        raise DataError(f"{where}: x has 0 columns; expected [n, D] with D >= 1")
    n_nan = int(np.isnan(x).sum())
    if n_nan:
        raise DataError(f"{where}: x contains {n_nan} NaN values; expected finite numbers")
    n_inf = int(np.isinf(x).sum())
    if n_inf:
        raise DataError(f"{where}: x contains {n_inf} inf values; expected finite numbers")
    if np.abs(x).max() > np.finfo(np.float32).max:
        raise DataError(f"{where}: x has values beyond the float32 range; expected finite float32")


def _check_user_values(x: np.ndarray, where: str, likelihood: str, binarize: str | None) -> int | None:
    """Check user values fit the likelihood; returns n_levels for categorical."""
    lo, hi = float(x.min()), float(x.max())
    rng = f"[{lo:.4g}, {hi:.4g}]"
    if likelihood == "bernoulli":
        if binarize is None:
            if not np.isin(x, (0.0, 1.0)).all():
                if lo >= 0.0 and hi <= 1.0:
                    raise DataError(
                        f"{where}: data for a Bernoulli likelihood must be 0/1; found values in "
                        f"{rng}; pass binarize='dynamic'|'fixed'|'threshold' to binarize "
                        "intensities in [0, 1]")
                raise DataError(
                    f"{where}: data for a Bernoulli likelihood must be 0/1; found values in "
                    f"{rng}; rescale intensities into [0, 1] and pass binarize=..., "
                    "or use likelihood='gaussian'")
        elif lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: binarize={binarize!r} needs intensities in [0, 1]; "
                            f"found values in {rng}; rescale first or use likelihood='gaussian'")
        return None
    if likelihood == "categorical":
        if lo < 0.0 or not (x == np.round(x)).all():
            raise DataError(f"{where}: data for a categorical likelihood must be non-negative "
                            f"integer levels; found values in {rng}"
                            + ("" if lo < 0 else " that are not all integers"))
        return int(hi) + 1
    return None


def _check_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (0.0 <= float(value) < 1.0):
        raise DataError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_int(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DataError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- #
# Building splits
# --------------------------------------------------------------------------- #


def _split_sizes(n: int, fractions: dict[str, float], where: str) -> dict[str, int]:
    sizes = {k: int(round(n * f)) for k, f in fractions.items()}
    sizes["train"] = n - sum(sizes.values())
    for k in SPLIT_NAMES:
        if k in sizes and (sizes[k] < 1 or (k == "train" and sum(fractions.values()) >= 1.0)):
            if k == "train":
                desc = ", ".join(f"{name}_fraction={fractions[name]}" for name in fractions)
                raise DataError(f"{where}: {desc} leave the train split empty (n={n}); "
                                "expected fractions summing to well below 1")
            raise DataError(f"{where}: {k}_fraction={fractions[k]} leaves the {k} split empty "
                            f"(n={n}); expected a fraction giving at least one example")
    return sizes


def _cap(idx: np.ndarray, max_examples: int | None) -> np.ndarray:
    if max_examples is not None:
        idx = idx[:max_examples]
    return np.sort(idx)


def _build_split(source: _Source, idx: np.ndarray, *, split: str, scale: float,
                 binarize: str | None, seed: int, condition: str | None,
                 pixels: tuple[list[int], list[int]] | None, n_classes: int | None) -> Split:
    """The ``split`` made of rows ``idx`` of ``source``: float32, divided by ``scale``,
    binarized as ``binarize`` asks (seeded per split), conditioned as ``condition`` asks."""
    x = torch.from_numpy(np.ascontiguousarray(source.x[idx], dtype=np.float32))
    if scale != 1.0:
        x = x / scale
    if binarize == "threshold":
        x = (x > 0.5).to(torch.float32)
    elif binarize == "fixed" or (binarize == "dynamic" and split != "train"):
        gen = torch.Generator().manual_seed(_derive_seed(seed, _PURPOSE_BINARIZE,
                                                         SPLIT_NAMES.index(split)))
        x = torch.bernoulli(x, generator=gen)
    labels = None
    if source.labels is not None:
        labels = torch.from_numpy(source.labels[idx].astype(np.int64))
    y = None
    if condition == "quadrants":
        x_pix, y_pix = pixels
        y = x[:, y_pix].contiguous()
        x = x[:, x_pix].contiguous()
    elif condition == "label":
        y = torch.nn.functional.one_hot(labels, n_classes).to(torch.float32)
    return Split(x=x, y=y, index=torch.from_numpy(idx.astype(np.int64)), labels=labels)


# --------------------------------------------------------------------------- #
# Loading, step by step
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Resolved:
    """A checked request: which dataset, its seed, and every option with its default filled in."""

    key: str | None                  # canonical dataset key; None for a user file
    user_path: Path | None           # the user's file; None for a named dataset
    label: str                       # the dataset's name in messages and Dataset.name
    seed: int
    options: DataOptions             # checked; n_samples and noise set for synthetic data only


@dataclass(frozen=True)
class _Loaded:
    """The raw sources of a dataset and what is known about them before splitting."""

    sources: tuple[_Source, ...]     # (all rows,) or, for mnist, (training file, t10k file)
    image_shape: tuple[int, int] | None = None
    n_classes: int | None = None
    n_levels: int | None = None
    scale: float = 1.0               # raw values are divided by this
    meta: dict = field(default_factory=dict)


def _options_from(options, fields: dict) -> DataOptions:
    """``options`` (a DataOptions, or None for the defaults) with ``fields`` replaced."""
    if options is not None and not isinstance(options, DataOptions):
        raise DataError(f"options must be a DataOptions or None, got {type(options).__name__}; "
                        "give single options as keywords instead, e.g. likelihood='gaussian'")
    unknown = [k for k in fields if k not in _OPTION_NAMES]
    if unknown:
        raise DataError(f"unknown data option{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)}; known: {', '.join(_OPTION_NAMES)}")
    base = DataOptions() if options is None else options
    return dataclasses.replace(base, **fields) if fields else base


def _resolve_name(name) -> tuple[str | None, Path | None]:
    """``(key, None)`` for a known dataset name, ``(None, path)`` for an existing user file."""
    if not isinstance(name, (str, os.PathLike)):
        raise DataError(f"dataset name must be a string or path, got {name!r}")
    key = _canonical(name)
    if key is not None:
        return key, None
    path = Path(os.fspath(name)).expanduser()
    if path.suffix.lower() in USER_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{path}: file not found; expected a .npy, .npz or .csv data file")
        return None, path
    if path.exists() and path.is_file():
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
                        "expected .npy, .npz or .csv")
    raise _unknown(name)


def _resolve_choices(key: str | None, user_path: Path | None, options: DataOptions
                     ) -> tuple[str, str | None, str | None]:
    """Check ``likelihood``, ``binarize`` and ``condition``; fill the first two's defaults."""
    likelihood, binarize, condition = options.likelihood, options.binarize, options.condition
    if likelihood is None:
        likelihood = default_likelihood(key or str(user_path))
    if likelihood not in LIKELIHOODS:
        raise DataError(f"unknown likelihood {likelihood!r}; expected one of {', '.join(LIKELIHOODS)}")
    if binarize is not None and binarize not in BINARIZE_MODES:
        raise DataError(f"unknown binarize {binarize!r}; expected None or one of "
                        f"{', '.join(BINARIZE_MODES)}")
    if binarize is not None and likelihood != "bernoulli":
        raise DataError(f"binarize={binarize!r} applies only to likelihood='bernoulli' "
                        f"(got likelihood={likelihood!r})")
    if condition is not None and condition not in CONDITIONS:
        raise DataError(f"unknown condition {condition!r}; expected None or one of "
                        f"{', '.join(CONDITIONS)}")
    if key in _IMAGE_DATASETS and likelihood == "bernoulli" and binarize is None:
        binarize = "dynamic"
    return likelihood, binarize, condition


def _resolve_synthetic(key: str | None, label: str, likelihood: str, condition: str | None,
                       n_samples, noise) -> tuple[int | None, float | None]:
    """Checked ``(n_samples, noise)`` with defaults for synthetic data, else ``(None, None)``."""
    if key not in _SYNTHETIC:
        if n_samples is not None:
            raise DataError(f"{label}: n_samples applies only to synthetic datasets "
                            f"({', '.join(_SYNTHETIC)})")
        if noise is not None:
            raise DataError(f"{label}: noise applies only to synthetic datasets "
                            f"({', '.join(_SYNTHETIC)})")
        return None, None
    if likelihood != "gaussian":
        raise DataError(f"{key}: synthetic data supports only likelihood='gaussian' "
                        f"(got {likelihood!r})")
    if condition == "label":
        raise DataError(f"{key}: condition='label' needs labels but {key} has none")
    n_samples = _DEFAULT_N_SAMPLES if n_samples is None else _check_int(n_samples, "n_samples", 1)
    if noise is None:
        noise = _DEFAULT_NOISE[key]
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) \
            or not math.isfinite(noise) or noise < 0:
        raise DataError(f"{key}: noise must be a finite number >= 0, got {noise!r}")
    return n_samples, float(noise)


def _check_dataset_fit(key: str | None, label: str, likelihood: str,
                       condition: str | None) -> None:
    """Reject likelihood/condition pairs the dataset cannot serve (mnist, quadrants)."""
    if key == "mnist" and likelihood == "categorical":
        raise DataError("mnist: likelihood='categorical' is not supported; "
                        "expected 'bernoulli' or 'gaussian'")
    if condition == "quadrants":
        if key not in _IMAGE_DATASETS:
            raise DataError(f"{label}: condition='quadrants' needs image data "
                            f"({', '.join(_IMAGE_DATASETS)})")
        if likelihood != "bernoulli":
            raise DataError(f"{label}: condition='quadrants' needs likelihood='bernoulli' "
                            f"(got {likelihood!r})")


def _resolve(name, options, fields: dict, seed) -> _Resolved:
    """Step 1: merge and check every option and fill the defaults (no data is read)."""
    opts = _options_from(options, fields)
    key, user_path = _resolve_name(name)
    label = key or user_path.name
    likelihood, binarize, condition = _resolve_choices(key, user_path, opts)
    visible_quadrants = _check_visible(opts.visible_quadrants)
    seed = _check_int(seed, "seed", 0)
    val_fraction = _check_fraction(opts.val_fraction, "val_fraction")
    test_fraction = _check_fraction(opts.test_fraction, "test_fraction")
    max_examples = opts.max_examples
    if max_examples is not None:
        max_examples = _check_int(max_examples, "max_examples", 1)
    n_samples, noise = _resolve_synthetic(key, label, likelihood, condition,
                                          opts.n_samples, opts.noise)
    _check_dataset_fit(key, label, likelihood, condition)
    options = dataclasses.replace(
        opts, likelihood=likelihood, binarize=binarize, condition=condition, visible_quadrants=visible_quadrants,
        val_fraction=val_fraction, test_fraction=test_fraction, max_examples=max_examples, n_samples=n_samples,
        noise=noise)
    return _Resolved(key=key, user_path=user_path, label=label, seed=seed, options=options)


def _read_digits(r: _Resolved) -> _Loaded:
    """scikit-learn's digits: grey levels 0..16, kept as levels for "categorical"."""
    categorical = r.options.likelihood == "categorical"
    return _Loaded(sources=(_load_digits(),), image_shape=(8, 8), n_classes=10,
                   n_levels=17 if categorical else None, scale=1.0 if categorical else 16.0,
                   meta={"source": "sklearn.datasets.load_digits"})


def _read_mnist(r: _Resolved) -> _Loaded:
    """The MNIST training and t10k files in ``data_dir``, bytes scaled by 255."""
    train_src, test_src, image_shape = _load_mnist(r.options.data_dir)
    return _Loaded(sources=(train_src, test_src), image_shape=image_shape, n_classes=10,
                   scale=255.0, meta={"source": {"train": train_src.where, "test": test_src.where}})


def _read_synthetic(r: _Resolved) -> _Loaded:
    """Seeded synthetic points; the noiseless curve goes into ``meta["true_manifold"]``."""
    src, manifold = _make_synthetic(r.key, r.options.n_samples, r.options.noise, r.seed)
    _check_finite(src.x, r.key)
    return _Loaded(sources=(src,),
                   meta={"true_manifold": manifold, "noise": r.options.noise, "n_samples": r.options.n_samples})


def _read_user(r: _Resolved) -> _Loaded:
    """The user's file, checked to be finite and to fit the likelihood."""
    src = _load_user_file(r.user_path)
    _check_finite(src.x, src.where)
    n_levels = _check_user_values(src.x, src.where, r.options.likelihood, r.options.binarize)
    n_classes = None if src.labels is None else int(src.labels.max()) + 1
    return _Loaded(sources=(src,), n_classes=n_classes, n_levels=n_levels,
                   meta={"source": src.where})


def _read_sources(r: _Resolved) -> _Loaded:
    """Step 2: read (or generate) and validate the raw data of the resolved dataset."""
    if r.key == "digits":
        loaded = _read_digits(r)
    elif r.key == "mnist":
        loaded = _read_mnist(r)
    elif r.key in _SYNTHETIC:
        loaded = _read_synthetic(r)
    else:
        loaded = _read_user(r)
    if r.options.condition == "label" and loaded.sources[0].labels is None:
        raise DataError(f"{r.label}: condition='label' needs labels but the data has none "
                        "(an .npz file with integer labels 'y' has them)")
    return loaded


def _split_indices(r: _Resolved, sources: tuple[_Source, ...]
                   ) -> dict[str, tuple[int, np.ndarray]]:
    """``{split: (source number, rows)}`` from one seeded permutation of the first source.

    mnist: val and train partition the training file, test is the whole t10k
    file in order. Otherwise test, val and train are consecutive slices of the
    permutation, in that order.
    """
    perm_rng = np.random.default_rng(_derive_seed(r.seed, _PURPOSE_SPLIT))
    n = sources[0].x.shape[0]
    if r.key == "mnist":
        sizes = _split_sizes(n, {"val": r.options.val_fraction}, sources[0].where)
        perm = perm_rng.permutation(n)
        return {
            "train": (0, perm[sizes["val"]:]),
            "val": (0, perm[:sizes["val"]]),
            "test": (1, np.arange(sources[1].x.shape[0])),
        }
    sizes = _split_sizes(n, {"val": r.options.val_fraction, "test": r.options.test_fraction}, r.label)
    perm = perm_rng.permutation(n)
    n_test, n_val = sizes["test"], sizes["val"]
    return {
        "train": (0, perm[n_test + n_val:]),
        "val": (0, perm[n_test:n_test + n_val]),
        "test": (0, perm[:n_test]),
    }


def _prepare_splits(r: _Resolved, loaded: _Loaded) -> tuple[dict[str, Split], dict]:
    """Step 3: split, cap, scale, binarize and condition; returns the splits and the meta.

    The meta is ``loaded.meta`` plus, for quadrants, ``x_pixels``, ``y_pixels``
    and ``visible_quadrants``.
    """
    parts = _split_indices(r, loaded.sources)
    meta = dict(loaded.meta)
    pixels = None
    if r.options.condition == "quadrants":
        pixels = quadrant_pixels(loaded.image_shape, r.options.visible_quadrants)
        meta["x_pixels"], meta["y_pixels"] = pixels
        meta["visible_quadrants"] = r.options.visible_quadrants
    splits = {
        split: _build_split(loaded.sources[src_id], _cap(idx, r.options.max_examples), split=split,
                            scale=loaded.scale, binarize=r.options.binarize, seed=r.seed,
                            condition=r.options.condition, pixels=pixels, n_classes=loaded.n_classes)
        for split, (src_id, idx) in parts.items()
    }
    return splits, meta


def load_dataset(name: str | os.PathLike, options: DataOptions | None = None, *,
                 seed: int = 0, **fields) -> Dataset:
    """Load, validate, split and prepare a dataset.

    ``name``: "digits", "mnist", "circle", "moons", "swiss-roll", or a path to a
    ``.npy``/``.npz``/``.csv`` file. ``options``: a :class:`DataOptions` (None:
    all defaults). ``fields``: DataOptions field names as keywords, a shorthand
    that overrides the matching fields of ``options``
    (``load_dataset("digits", likelihood="gaussian")``). ``seed`` fixes the
    split, the synthetic draws and the load-time binarization.

    The options: ``likelihood`` defaults to :func:`default_likelihood`;
    ``binarize`` defaults to "dynamic" for digits and mnist under "bernoulli"
    (None otherwise). ``data_dir`` is the MNIST folder (ignored by other
    datasets). ``val_fraction``/``test_fraction`` are fractions of the examples
    (for mnist only ``val_fraction`` is used, of the training file; the test
    split is the t10k file). ``n_samples`` and ``noise`` (standard deviation in
    the units of the returned points) apply to the synthetic datasets only.
    ``max_examples`` caps every split (a seeded random subset of train/val; the
    first rows of the mnist t10k file for test).

    Raises :class:`DataError` (one line) for an unknown keyword, an ``options``
    that is not a DataOptions, or any bad option or bad data.
    """
    resolved = _resolve(name, options, fields, seed)
    loaded = _read_sources(resolved)
    splits, meta = _prepare_splits(resolved, loaded)
    return Dataset(
        name=resolved.label,
        train=splits["train"], val=splits["val"], test=splits["test"],
        likelihood=resolved.options.likelihood, binarize=resolved.options.binarize, n_levels=loaded.n_levels,
        image_shape=loaded.image_shape, condition=resolved.options.condition,
        n_classes=loaded.n_classes, meta=meta,
    )
