"""Property-based tests (hypothesis) of the input validation of ``load_dataset``.

Random malformed input -- arrays with NaN/inf sprinkled in, the wrong number of
dimensions, no rows or columns, huge values, object/string/complex dtypes,
saved as ``.npy`` or ``.npz``; CSV text with ragged lines, non-numeric, empty
or non-finite cells, blank lines, no rows or a header only; random text and
bytes as a CSV; bad label arrays with or without ``num_classes`` -- is written
to a fresh temporary folder and loaded. Every property asserts that the loader
either raises :class:`DataError` with a one-line message (no newline) or
returns a valid dataset (finite float32 splits whose squared rows fit float32,
labels inside their classes), never any other exception, and that it writes
no file into the folder. Where the strategy knows the input is valid (or which
flaw it has), the outcome itself is asserted too: a valid input loads, a
flawed one raises, naming the CSV line of the flaw.

Examples tried per property (``max_examples``; ``deadline=None``, no example
database, so nothing is written into the repository):

- ``test_arrays``: 60 arrays, each with one of 15 flaws or none, as .npy or .npz,
  with or without ``standardize``;
- ``test_any_likelihood``: 40 arrays under a random likelihood, binarize and
  standardize;
- ``test_labels``: 60 label arrays (.npz ``y``), with a random ``num_classes``
  and ``condition``;
- ``test_csv_tables``: 60 tables, each with one of 9 flaws or none, with or
  without a header, blank lines sprinkled in;
- ``test_csv_random_text``: 60 random texts from a CSV-ish alphabet;
- ``test_csv_random_bytes``: 30 random byte strings.

That is 310 examples in all; the file runs in a few seconds.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ppl_genmodels.data import SPLIT_NAMES, DataError, Dataset, load_dataset

def examples(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- #
# the outcome every property checks
# --------------------------------------------------------------------------- #


def assert_valid(ds: Dataset) -> None:
    assert isinstance(ds, Dataset)
    for name in SPLIT_NAMES:
        part = ds.split(name)
        assert len(part) >= 1 and part.x.dtype == torch.float32 and part.x.ndim == 2
        assert part.x.shape[1] == ds.x_dim >= 1
        assert torch.isfinite(part.x).all()
        assert torch.isfinite(part.x.pow(2).sum(1)).all()            # a Gaussian log-density fits float32
        assert part.index.dtype == torch.long and part.index.shape == (len(part),)
        if part.labels is not None:
            assert ds.n_classes is not None
            assert part.labels.dtype == torch.long
            assert ((part.labels >= 0) & (part.labels < ds.n_classes)).all()
        if ds.condition == "label":
            assert part.y.shape == (len(part), ds.n_classes)
            assert torch.equal(part.y.argmax(1), part.labels)
    if "std" in ds.meta:
        assert len(ds.meta["std"]) == ds.x_dim and all(s > 0 for s in ds.meta["std"])


def load(write, suffix: str, **options):
    """Write a file with ``write(path)`` into a fresh folder and load it.

    Returns the Dataset or the DataError; any other exception fails the test.
    Asserts that loading left the folder as it was.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        write(path)
        before = sorted(p.name for p in Path(folder).iterdir())
        try:
            result = load_dataset(str(path), **options)
        except DataError as err:
            message = str(err)
            assert message and "\n" not in message and "\r" not in message, repr(message)
            result = err
        else:
            assert_valid(result)
        assert sorted(p.name for p in Path(folder).iterdir()) == before
    return result


def refused(result, *fragments: str) -> str:
    assert isinstance(result, DataError), f"expected a DataError, got {result!r}"
    message = str(result)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------- #
# arrays (.npy / .npz)
# --------------------------------------------------------------------------- #

FLAWS = ("none", "int", "bool", "float32", "nan", "inf", "-inf", "huge", "ndim1", "ndim3", "ndim0",
         "no_rows", "no_columns", "object", "string", "complex")
VALID_FLAWS = {"none", "int", "bool", "float32"}
HUGE = (1e20, -1e25, 1e30, 3e38, 1e39, 1e300, -1.7e308)


@st.composite
def flawed_arrays(draw):
    n, d = draw(st.integers(6, 30)), draw(st.integers(1, 5))
    x = draw(hnp.arrays(np.float64, (n, d), elements=st.floats(-1e6, 1e6, allow_nan=False)))
    flaw = draw(st.sampled_from(FLAWS))
    row, col = draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))
    count = draw(st.integers(1, 3))
    if flaw in ("nan", "inf", "-inf", "huge"):
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}.get(flaw)
        for k in range(count):
            x[(row + k) % n, (col + k) % d] = draw(st.sampled_from(HUGE)) if value is None else value
    converted = {
        "int": lambda: np.round(x).astype(np.int64),
        "bool": lambda: x > 0,
        "float32": lambda: x.astype(np.float32),
        "ndim1": lambda: x.reshape(-1),
        "ndim3": lambda: x.reshape(n, d, 1),
        "ndim0": lambda: np.array(x[0, 0]),
        "no_rows": lambda: x[:0],
        "no_columns": lambda: x[:, :0],
        "object": lambda: x.astype(object),
        "string": lambda: x.astype(str),
        "complex": lambda: x.astype(np.complex128),
    }.get(flaw, lambda: x)()
    return converted, flaw


def saver(x, suffix: str):
    if suffix == ".npy":
        return lambda path: np.save(path, x)
    return lambda path: np.savez(path, x=x)


@examples(60)
@given(flawed_arrays(), st.sampled_from([".npy", ".npz"]), st.booleans())
def test_arrays(case, suffix, standardize):
    x, flaw = case
    result = load(saver(x, suffix), suffix, standardize=standardize)
    if flaw in VALID_FLAWS and standardize and isinstance(result, DataError):
        # a training split with (almost) no spread cannot standardize a far validation or test value
        refused(result, "too far even after standardize")
    elif flaw in VALID_FLAWS:
        assert isinstance(result, Dataset), (flaw, result)
        assert len(result.train) + len(result.val) + len(result.test) == x.shape[0]
        if not standardize:                                       # the values come through as float32
            for name in SPLIT_NAMES:
                part = result.split(name)
                assert torch.equal(part.x, torch.from_numpy(np.asarray(x, dtype=np.float32)[part.index.numpy()]))
    elif flaw == "huge" and standardize:
        pass                                                      # refused, or rescued by the training spread
    else:
        refused(result)
        if flaw in ("nan", "inf", "-inf"):
            refused(result, "x contains", "expected finite numbers")
        if flaw == "huge":
            refused(result, "too large for float32", "standardize=True")


@examples(40)
@given(flawed_arrays(), st.sampled_from(["gaussian", "bernoulli", "categorical", None]),
       st.sampled_from([None, "dynamic", "fixed", "threshold"]), st.booleans())
def test_any_likelihood(case, likelihood, binarize, standardize):
    x, _ = case
    result = load(saver(x, ".npy"), ".npy", likelihood=likelihood, binarize=binarize, standardize=standardize)
    if standardize and likelihood in ("bernoulli", "categorical"):
        message = refused(result)                                  # for this, or for an earlier-found problem
        assert "standardize" in message or binarize is not None, message


# --------------------------------------------------------------------------- #
# labels (.npz y)
# --------------------------------------------------------------------------- #

ODD_LABELS = (2.5, -1.0, -0.5, np.nan, np.inf, -np.inf, 57.0, 1e30, 10.0)


@st.composite
def label_arrays(draw):
    n = draw(st.integers(6, 30))
    classes = draw(st.integers(1, 6))
    y = [k % classes for k in range(n)]                            # every class present
    y = draw(st.permutations(y))
    for _ in range(draw(st.integers(0, 2))):                        # a few labels changed
        y[draw(st.integers(0, n - 1))] = draw(st.one_of(st.integers(-2, 12), st.sampled_from(ODD_LABELS)))
    y = np.array(y, dtype=np.float64 if any(isinstance(v, float) for v in y) else np.int64)
    shape_flaw = draw(st.sampled_from(["none"] * 6 + ["short", "long", "2d", "bool", "string", "object"]))
    y = {
        "short": lambda: y[:-1],
        "long": lambda: np.concatenate([y, y[:1]]),
        "2d": lambda: y.reshape(-1, 1),
        "bool": lambda: y > 0,
        "string": lambda: y.astype(str),
        "object": lambda: y.astype(object),
    }.get(shape_flaw, lambda: y)()
    return n, y


def expected_classes(y: np.ndarray, n: int, num_classes: int | None) -> int | None:
    """The number of classes the loader must find, or None where it must refuse (an independent oracle)."""
    if y.ndim != 1 or len(y) != n or y.dtype.kind not in "iuf":
        return None
    if num_classes is not None and num_classes < 1:
        return None
    v = y.astype(np.float64)
    if not np.isfinite(v).all() or (v != np.round(v)).any() or (v < 0).any():
        return None
    if num_classes is not None:
        return num_classes if (v < num_classes).all() else None
    present = np.unique(v)
    return len(present) if present.tolist() == list(range(len(present))) else None


@examples(60)
@given(label_arrays(), st.one_of(st.none(), st.integers(0, 14)), st.sampled_from([None, "label"]))
def test_labels(case, num_classes, condition):
    n, y = case
    x = np.random.default_rng(n).normal(size=(n, 3))
    result = load(lambda path: np.savez(path, x=x, y=y), ".npz", num_classes=num_classes, condition=condition)
    expected = expected_classes(y, n, num_classes)
    if expected is None:
        message = refused(result)
        assert "label" in message or "num_classes" in message, message
    else:
        assert isinstance(result, Dataset), (y, num_classes, result)
        assert result.n_classes == expected
        labels = np.asarray(y, dtype=np.float64).astype(np.int64)
        for name in SPLIT_NAMES:
            part = result.split(name)
            assert torch.equal(part.labels, torch.from_numpy(labels[part.index.numpy()]))


# --------------------------------------------------------------------------- #
# CSV
# --------------------------------------------------------------------------- #

CSV_FLAWS = ("none", "more_fields", "fewer_fields", "word", "empty_cell", "not_finite", "empty_file",
             "header_only", "spaces")
NOT_FINITE = ("nan", "NaN", "inf", "-inf", "Infinity", "1e999")
WORDS = st.text(alphabet=string.ascii_letters + "_?%", min_size=0, max_size=5).map(lambda w: "x" + w)


@st.composite
def csv_tables(draw):
    """``(text, flaw, expected line fragment or None, values [n, d])``."""
    n, d = draw(st.integers(6, 20)), draw(st.integers(1, 4))
    values = np.array(draw(st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=d, max_size=d),
                                    min_size=n, max_size=n)))
    flaw = draw(st.sampled_from(CSV_FLAWS))
    if d == 1 and flaw in ("fewer_fields", "empty_cell"):
        flaw = "more_fields"                                       # a 1-field line emptied is a blank line
    header = draw(st.booleans())
    cells = [[repr(float(v)) for v in row] for row in values]
    row, col = draw(st.integers(1, n - 1)), draw(st.integers(0, d - 1))
    expect = None
    if flaw == "more_fields":
        cells[row].append("1.0")
        expect = "has {} fields, expected {}".format(d + 1, d)
    elif flaw == "fewer_fields":
        cells[row].pop()
        expect = "has {} field{}, expected {}".format(d - 1, "s" if d - 1 != 1 else "", d)
    elif flaw == "word":
        word = draw(WORDS)
        cells[row][col] = word
        expect = f", column {col + 1}: non-numeric value {word!r}"
    elif flaw == "empty_cell":
        cells[row][col] = ""
        expect = f", column {col + 1} is empty"
    elif flaw == "not_finite":
        token = draw(st.sampled_from(NOT_FINITE))
        cells[row][col] = token
        expect = f", column {col + 1}: value {token!r} is not finite"
    sep = ", " if flaw == "spaces" else ","
    lines = ([sep.join(f"c{j}" for j in range(d))] if header or flaw == "header_only" else [])
    data_lines = [sep.join(r) for r in cells]
    if flaw == "header_only":
        data_lines = []
    elif flaw == "empty_file":
        lines, data_lines = [], []
    # blank lines sprinkled in; the flawed row's line number counts them
    out, flawed_line = [], None
    for k, text in enumerate(lines + data_lines):
        if draw(st.integers(0, 4)) == 0:
            out.extend([""] * draw(st.integers(1, 2)))
        out.append(text)
        if k == len(lines) + row and flaw in ("more_fields", "fewer_fields", "word", "empty_cell", "not_finite"):
            flawed_line = len(out)
    if expect is not None:
        expect = f"line {flawed_line}{'' if expect.startswith(',') else ' '}{expect}"
    text = "\n".join(out) + ("\n" if draw(st.booleans()) else "")
    return text, flaw, expect, values


@examples(60)
@given(csv_tables())
def test_csv_tables(case):
    text, flaw, expect, values = case
    result = load(lambda path: path.write_text(text), ".csv")
    if flaw in ("none", "spaces"):
        assert isinstance(result, Dataset), (text, result)
        for name in SPLIT_NAMES:
            part = result.split(name)
            assert torch.equal(part.x, torch.from_numpy(values[part.index.numpy()].astype(np.float32)))
    elif flaw in ("empty_file", "header_only"):
        refused(result, "empty data")
    else:
        refused(result, expect)


CSV_ALPHABET = st.sampled_from(list("0123456789.,-+eE \n\r\t\"'abxnNIf;\x00") + ["nan", "inf", "1e30", "\ufeff"])


@examples(60)
@given(st.lists(CSV_ALPHABET, max_size=120).map("".join))
def test_csv_random_text(text):
    load(lambda path: path.write_text(text, encoding="utf-8"), ".csv")


@examples(30)
@given(st.binary(max_size=200))
def test_csv_random_bytes(raw):
    load(lambda path: path.write_bytes(raw), ".csv")
