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
``noise``, ``max_examples``, ``num_classes``, ``standardize``) and the seed.
DataOptions fields may also be given as keywords, alone (``load_dataset("digits", likelihood="gaussian")``) or
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
    A ``.csv`` is comma-separated numbers, every line with as many fields as
    the first (a first line that is not all numbers is a header); a ragged
    line, an empty or non-numeric cell is refused naming its line and column.

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

Labels
------
Class labels (digits, the MNIST label files, ``y`` of an ``.npz``) are used by
``condition="label"`` and kept in :attr:`Split.labels` for colouring plots.
They must be integers ``0..C-1`` with every class present (``C`` is then the
number of classes); labels 0..9 plus a stray 57 are refused, naming the 57,
rather than read as 58 classes. ``num_classes`` declares ``C`` instead: labels
may then be any integers ``0..num_classes-1``, some classes absent (digits and
mnist have ``num_classes=10`` by default). Negative, non-integer (2.5), NaN or
infinite labels are refused.

Value scale and standardization
-------------------------------
Models compute in float32, and a Gaussian log-density sums the squares of a
row's ``D`` values: every value must satisfy ``|x| <= sqrt(float32 max / D)``
(about ``1.8e19 / sqrt(D)``), or the data are refused with a hint to
standardize. ``standardize=True`` (real-valued data, likelihood "gaussian",
only) subtracts the training split's mean and divides by its standard
deviation, per dimension (a constant dimension keeps std 1), and applies the
same transform to the validation and test splits (and to
``meta["true_manifold"]``); ``meta["mean"]`` and ``meta["std"]`` hold the two
as lists, in the units the data had before (for digits and mnist: intensities
in [0, 1]), so ``x_raw = x * std + mean``. The scale rule is checked after
standardizing; a mean or std beyond the float32 range is refused. Log
densities of standardized data are in standardized units:
``log p(x_raw) = log p(x) - sum_d log std_d``.

Every problem with the input (missing or corrupt files, NaNs and infinities,
ragged or non-numeric CSV lines, wrong shapes, bad labels, values too large
for float32, values that do not fit the likelihood, inconsistent options)
raises :class:`DataError` with a one-line message naming the file, the line,
row or column, and the value, before anything is returned.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import io
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
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_LEVELS = 2 ** 24                 # float32 integers are exact below this
_MAX_CLASSES = 2 ** 31 - 1

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
    ``likelihood``, ``binarize`` and ``condition``. A ``bool`` field becomes a
    switch (``--standardize`` / ``--no-standardize``).
    ``data_dir`` may also be a :class:`os.PathLike`.

    ``num_classes``: the number of label classes (see "Labels" in the module
    docstring). ``standardize``: real-valued data only; the log densities of a
    model fitted to standardized data are in standardized units (see "Value
    scale and standardization").
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
    num_classes: int | None = field(default=None, metadata={
        "help": "number of classes: labels may be 0..num_classes-1 with some classes absent "
                "(default: labels must be 0..C-1 with every class present; 10 for digits and mnist)"})
    standardize: bool = field(default=False, metadata={
        "help": "for real-valued data: subtract the training split's mean and divide by its "
                "standard deviation, per dimension"})


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
    (quadrants), ``mean`` and ``std`` (lists of ``x_dim`` floats: the training
    split's statistics that ``standardize=True`` removed; ``x * std + mean``
    maps back, and log p(x) of the raw data is log p(x) here minus
    ``sum(log std)``).
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

    def probe(self, size: int = 8):
        """``(x, y)``: the first ``size`` training points, as a training batch yields them (to trace a model on)."""
        return next(iter(self.batches("train", min(size, len(self.train)))))

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
        if "std" in self.meta:
            out["standardize"] = True
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


def _value_text(v) -> str:
    """A label or value for a message: integers without a decimal point, floats short."""
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, float) and math.isfinite(v) and v == round(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _values_text(values, limit: int = 5) -> str:
    """Up to ``limit`` values, then how many there are in all."""
    values = list(values)
    shown = ", ".join(_value_text(v) for v in values[:limit])
    return shown if len(values) <= limit else f"{shown}, ... ({len(values)} distinct values)"


def _check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """Labels ``y [n]`` that are integers >= 0 (floats holding integers allowed), in their own dtype.

    Whether they number the classes 0..C-1 is :func:`_check_classes`' part.
    """
    if y.ndim != 1:
        raise DataError(f"{where}: y has shape {tuple(y.shape)}; expected integer labels [n]")
    if y.shape[0] != n:
        raise DataError(f"{where}: y has {y.shape[0]} labels but x has {n} rows; counts must match")
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer)
                               or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: labels y have dtype {y.dtype}; expected integer class labels 0..C-1")
    checks = [(np.isnan, "NaN"), (np.isinf, "infinite"),
              (lambda v: v != np.round(v), "not an integer"), (lambda v: v < 0, "negative")]
    if np.issubdtype(y.dtype, np.integer):
        checks = checks[3:]
    for test, what in checks:
        bad = test(y)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: label y[{i}] = {_value_text(y[i])} is {what} ({int(bad.sum())} "
                            f"such label{'s' if bad.sum() > 1 else ''}); expected integer class labels 0..C-1")
    return y


def _missing_classes(present: list[int], limit: int = 3) -> str:
    """The gaps in the sorted distinct labels ``present``, as ranges ("10..56")."""
    gaps, previous = [], -1
    for label in present:
        if label > previous + 1:
            gaps.append(str(previous + 1) if label == previous + 2 else f"{previous + 1}..{label - 1}")
            if len(gaps) > limit:
                break
        previous = label
    return ", ".join(gaps[:limit]) + (", ..." if len(gaps) > limit else "")


def _check_classes(y: np.ndarray, where: str, num_classes: int | None) -> tuple[np.ndarray, int]:
    """``(labels as int64, number of classes)`` for labels passed by :func:`_check_labels`.

    With ``num_classes`` the labels must lie in 0..num_classes-1; without it
    they must be exactly the integers 0..C-1, every class present.
    """
    if y.size == 0:
        return y.astype(np.int64), num_classes or 0
    if num_classes is not None:
        over = y >= num_classes
        if over.any():
            i, values, count = int(np.flatnonzero(over)[0]), np.unique(y[over]), int(over.sum())
            raise DataError(f"{where}: label{'s' if values.size > 1 else ''} {_values_text(values)} out of "
                            f"range for num_classes={num_classes} ({count} label{'s' if count > 1 else ''}, "
                            f"first y[{i}] = {_value_text(y[i])}); expected labels 0..{num_classes - 1}")
        return y.astype(np.int64), num_classes
    present = np.unique(y)
    if present[-1] != present.size - 1:          # distinct integers >= 0: contiguous from 0 iff this holds
        first_gap = int(np.flatnonzero(present != np.arange(present.size))[0])
        stray = present[first_gap:]
        labels = [int(v) for v in present]
        several = labels[-1] + 1 - len(labels) > 1
        raise DataError(f"{where}: labels must be the integers 0..C-1 with every class present, but "
                        f"class{'es' if several else ''} {_missing_classes(labels)} "
                        f"{'have' if several else 'has'} no examples while label"
                        f"{'s' if stray.size > 1 else ''} {_values_text(stray)} "
                        f"{'are' if stray.size > 1 else 'is'} used; relabel the classes 0..{present.size - 1}, "
                        f"or pass num_classes >= {_value_text(present[-1].item() + 1)} to allow absent classes")
    return y.astype(np.int64), int(present.size)


def _csv_number(text: str) -> float | None:
    """A cell's value: NaN for an empty cell, None when it is not a number."""
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def _csv_records(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank records of a CSV file: ``(line number, stripped cells)``, lines counted from 1."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err}); expected a comma-separated numeric table") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err})") from None
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    records, line = [], 0
    try:
        for record in reader:
            start, line = line + 1, reader.line_num
            cells = [cell.strip() for cell in record]
            if len(cells) > 1 or (cells and cells[0]):
                records.append((start, cells))
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: cannot parse as CSV ({err})") from None
    return records


def _csv_bad_cell(path: Path, rows: list[tuple[int, list[str]]]) -> DataError:
    """The error for the first cell of ``rows`` that is empty, not a number, or not finite."""
    for line, cells in rows:
        for column, cell in enumerate(cells, start=1):
            value = _csv_number(cell)
            if cell == "":
                return DataError(f"{path} line {line}, column {column} is empty (a missing value); "
                                 "expected a number in every cell")
            if value is None:
                return DataError(f"{path} line {line}, column {column}: non-numeric value {cell!r}; "
                                 "expected a numeric table (only the first line may be a header)")
            if not math.isfinite(value):
                return DataError(f"{path} line {line}, column {column}: value {cell!r} is not finite; "
                                 "expected finite numbers")
    return DataError(f"{path}: cannot read as a numeric table")  # pragma: no cover - callers checked


def _read_csv(path: Path) -> np.ndarray:
    """A comma-separated numeric table [n, D].

    The first non-blank line is a header (and skipped) when any of its cells is
    not a number; a header made only of numbers is read as data. Every line
    must have as many fields as the first; blank lines are skipped. A ragged
    line, an empty, non-numeric or non-finite cell raises :class:`DataError`
    naming its line (and column) in the file.
    """
    records = _csv_records(path)
    if not records:
        raise DataError(f"{path}: empty data: the file has no rows; expected a numeric table")
    first_line, first = records[0]
    header = any(_csv_number(cell) is None for cell in first)
    rows = records[1:] if header else records
    if not rows:
        raise DataError(f"{path}: empty data: only a header (line {first_line}) and no data rows; "
                        "expected a numeric table")
    for line, cells in rows:
        if len(cells) != len(first):
            raise DataError(f"{path} line {line} has {len(cells)} field{'s' if len(cells) != 1 else ''}, "
                            f"expected {len(first)} (as in the {'header' if header else 'first row'}, "
                            f"line {first_line})")
    try:
        out = np.array([cells for _, cells in rows], dtype=np.float64)
    except ValueError:
        raise _csv_bad_cell(path, rows) from None
    if not np.isfinite(out).all():
        raise _csv_bad_cell(path, rows)
    return out


def _npz_array(archive, key: str, where: str, what: str) -> np.ndarray:
    """One array of an open .npz archive; an unreadable one (e.g. pickled objects) is named."""
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{where}: cannot read {what} {key!r} ({err}); expected a numeric array") from None


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
                x = _npz_array(archive, "x", where, "the data")
                labels = _npz_array(archive, "y", where, "the labels") if "y" in keys else None
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
    for bad, what in ((np.isnan(x), "NaN"), (np.isinf(x), "inf")):
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{where}: x contains {int(bad.sum())} {what} values (first x[{row}, {col}] = "
                            f"{x[row, col]}); expected finite numbers")


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
        if hi >= _MAX_LEVELS:
            raise DataError(f"{where}: data for a categorical likelihood has levels up to {hi:.4g}; "
                            f"float32 holds integers exactly only below {_MAX_LEVELS}, and each level "
                            "is one category; expected a modest number of levels")
        return int(hi) + 1
    return None


def _check_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (0.0 <= float(value) < 1.0):
        raise DataError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_int(value, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        limits = f">= {low}" if high is None else f"in {low}..{high}"
        raise DataError(f"{what} must be an integer {limits}, got {value!r}")
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


def _standardization(r: "_Resolved", sources: tuple[_Source, ...], scale: float,
                     parts: dict[str, tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` per dimension of the training split (after ``scale``) when standardizing, else None.

    A constant dimension (std 0) keeps std 1; a mean or std beyond the float32 range is refused.
    """
    if not r.options.standardize:
        return None
    src_id, idx = parts["train"]
    x = sources[src_id].x[idx].astype(np.float64) / scale
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = x.mean(axis=0), x.std(axis=0)
    std[(x.max(axis=0) == x.min(axis=0)) | (std == 0.0)] = 1.0      # constant (or underflowing) dimensions
    for what, values in (("mean", mean), ("standard deviation", std)):
        bad = ~(np.abs(values) <= _FLOAT32_MAX)          # NaN and inf included
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise DataError(f"{sources[src_id].where}: standardize: the training split's {what} of column {j} "
                            f"is {values[j]:.3g}, beyond the float32 range (max {_FLOAT32_MAX:.3g}); "
                            "rescale the data (divide it by a large constant) first")
    return mean, std


def _check_scale(sources: tuple[_Source, ...], scale: float,
                 stats: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Refuse values (standardized, when ``stats`` are given) whose squares summed over a row overflow float32.

    A Gaussian log-density sums ``x_d ** 2`` over the ``D`` values of a row, so
    every value must satisfy ``|x| <= sqrt(float32 max / D)``.
    """
    dim = sources[0].x.shape[1]
    limit = math.sqrt(_FLOAT32_MAX / dim)
    mean, std = stats if stats is not None else (0.0, 1.0)
    for src in sources:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            hi = src.x.max(axis=0).astype(np.float64) / scale
            lo = src.x.min(axis=0).astype(np.float64) / scale
            far = np.maximum(np.abs(hi - mean), np.abs(lo - mean)) / std   # [D], in standardized units
        if not (far <= limit).all():
            j = int(np.flatnonzero(~(far <= limit))[0])
            raise _scale_error(src, scale, stats, j, limit)


def _scale_error(src: _Source, scale: float, stats: tuple[np.ndarray, np.ndarray] | None,
                 j: int, limit: float) -> DataError:
    """The one-line error for the most extreme value of column ``j`` of ``src``."""
    dim = src.x.shape[1]
    column = src.x[:, j].astype(np.float64) / scale
    center = 0.0 if stats is None else stats[0][j]
    with np.errstate(over="ignore", invalid="ignore"):
        row = int(np.argmax(np.abs(column - center)))
    overflow = (f"a Gaussian log-density sums the squares of a row's {dim} values, which overflows float32 "
                f"unless every |x| <= {limit:.3g}")
    if stats is None:
        return DataError(f"{src.where}: x[{row}, {j}] = {column[row]:.3g} is too large for float32: {overflow}; "
                         "pass standardize=True (--standardize) to subtract the training split's mean "
                         "and divide by its standard deviation, or rescale the data")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        far = abs(column[row] - center) / stats[1][j]
    return DataError(f"{src.where}: x[{row}, {j}] = {column[row]:.3g} lies {far:.3g} standard deviations "
                     f"(std {stats[1][j]:.3g}) from the training split's mean {center:.3g} of column {j}, "
                     f"too far even after standardize: {overflow}; rescale the data or drop the outlier")


def _build_split(source: _Source, idx: np.ndarray, *, split: str, scale: float,
                 binarize: str | None, seed: int, condition: str | None,
                 pixels: tuple[list[int], list[int]] | None, n_classes: int | None,
                 stats: tuple[np.ndarray, np.ndarray] | None = None) -> Split:
    """The ``split`` made of rows ``idx`` of ``source``: float32, divided by ``scale``,
    standardized with ``stats`` (mean, std) when given, binarized as ``binarize``
    asks (seeded per split), conditioned as ``condition`` asks."""
    if stats is None:
        x = torch.from_numpy(np.ascontiguousarray(source.x[idx], dtype=np.float32))
        if scale != 1.0:
            x = x / scale
    else:
        mean, std = stats
        x = torch.from_numpy(((source.x[idx].astype(np.float64) / scale - mean) / std).astype(np.float32))
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


def _check_standardize(standardize, label: str, likelihood: str) -> bool:
    """``standardize`` as a bool; only real-valued data (likelihood "gaussian") may be standardized."""
    if not isinstance(standardize, (bool, np.bool_)):
        raise DataError(f"standardize must be True or False, got {standardize!r}")
    if standardize and likelihood != "gaussian":
        kind = "0/1 values" if likelihood == "bernoulli" else "integer levels"
        raise DataError(f"{label}: standardize=True applies only to real-valued data (likelihood='gaussian'); "
                        f"likelihood={likelihood!r} needs its {kind} as they are")
    return bool(standardize)


def _check_dataset_fit(key: str | None, label: str, likelihood: str,
                       condition: str | None, num_classes: int | None) -> None:
    """Reject likelihood/condition pairs the dataset cannot serve (mnist, quadrants), and
    ``num_classes`` for synthetic data (which has no labels)."""
    if key in _SYNTHETIC and num_classes is not None:
        raise DataError(f"{key}: num_classes={num_classes} applies only to data with labels, "
                        f"and {key} has none")
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
    num_classes = opts.num_classes
    if num_classes is not None:
        num_classes = _check_int(num_classes, "num_classes", 1, _MAX_CLASSES)
    standardize = _check_standardize(opts.standardize, label, likelihood)
    _check_dataset_fit(key, label, likelihood, condition, num_classes)
    options = dataclasses.replace(
        opts, likelihood=likelihood, binarize=binarize, condition=condition, visible_quadrants=visible_quadrants,
        val_fraction=val_fraction, test_fraction=test_fraction, max_examples=max_examples, n_samples=n_samples,
        noise=noise, num_classes=num_classes, standardize=standardize)
    return _Resolved(key=key, user_path=user_path, label=label, seed=seed, options=options)


def _digit_classes(r: _Resolved, sources: tuple[_Source, ...]) -> int:
    """The number of classes of digit labels 0..9: ``num_classes`` (checked against them), else 10."""
    num_classes = 10 if r.options.num_classes is None else r.options.num_classes
    for src in sources:
        src.labels, _ = _check_classes(src.labels, src.where, num_classes)
    return num_classes


def _read_digits(r: _Resolved) -> _Loaded:
    """scikit-learn's digits: grey levels 0..16, kept as levels for "categorical"."""
    categorical = r.options.likelihood == "categorical"
    src = _load_digits()
    return _Loaded(sources=(src,), image_shape=(8, 8), n_classes=_digit_classes(r, (src,)),
                   n_levels=17 if categorical else None, scale=1.0 if categorical else 16.0,
                   meta={"source": "sklearn.datasets.load_digits"})


def _read_mnist(r: _Resolved) -> _Loaded:
    """The MNIST training and t10k files in ``data_dir``, bytes scaled by 255."""
    train_src, test_src, image_shape = _load_mnist(r.options.data_dir)
    return _Loaded(sources=(train_src, test_src), image_shape=image_shape,
                   n_classes=_digit_classes(r, (train_src, test_src)),
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
    n_classes = None
    if src.labels is not None:
        src.labels, n_classes = _check_classes(src.labels, src.where, r.options.num_classes)
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
    if r.options.num_classes is not None and loaded.sources[0].labels is None:
        raise DataError(f"{r.label}: num_classes={r.options.num_classes} applies only to data with labels, "
                        "but the data has none (an .npz file with integer labels 'y' has them)")
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
    and ``visible_quadrants``, and with ``standardize`` the training split's
    ``mean`` and ``std`` (``true_manifold`` standardized alike). The value
    scale is checked (after standardizing) before any split is built.
    """
    parts = {split: (src_id, _cap(idx, r.options.max_examples))
             for split, (src_id, idx) in _split_indices(r, loaded.sources).items()}
    stats = _standardization(r, loaded.sources, loaded.scale, parts)
    _check_scale(loaded.sources, loaded.scale, stats)
    meta = dict(loaded.meta)
    if stats is not None:
        meta["mean"], meta["std"] = stats[0].tolist(), stats[1].tolist()
        if "true_manifold" in meta:
            meta["true_manifold"] = (meta["true_manifold"] - stats[0]) / stats[1]
    pixels = None
    if r.options.condition == "quadrants":
        pixels = quadrant_pixels(loaded.image_shape, r.options.visible_quadrants)
        meta["x_pixels"], meta["y_pixels"] = pixels
        meta["visible_quadrants"] = r.options.visible_quadrants
    splits = {
        split: _build_split(loaded.sources[src_id], idx, split=split, scale=loaded.scale,
                            binarize=r.options.binarize, seed=r.seed, condition=r.options.condition,
                            pixels=pixels, n_classes=loaded.n_classes, stats=stats)
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
    first rows of the mnist t10k file for test). ``num_classes`` allows labels
    0..num_classes-1 with classes absent (without it, labels must be 0..C-1,
    every class present). ``standardize`` (likelihood "gaussian" only)
    subtracts the (capped) training split's per-dimension mean and divides by
    its std, in every split, and records both in ``meta["mean"]`` and
    ``meta["std"]``; log p(x) is then in standardized units, which differ from
    the raw data's log density by ``sum(log std)``. Values must stay within
    ``sqrt(float32 max / D)`` (after standardizing) so that squares summed over
    a row do not overflow float32.

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
