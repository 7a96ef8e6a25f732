"""Property tests of the command line's refusals: malformed input never writes and never dumps a traceback.

Hypothesis draws malformed option values for ``fit`` (and malformed data files for
``--data``) and for ``evaluate`` / ``bdmc`` / ``compare`` / ``sample`` on a tiny
pre-built run, and calls ``ppl_genmodels.cli.main`` in-process. Every call must end
with exit status 2 and either exactly one stderr line ``error: ...`` or argparse's
usage and its ``ppl-genmodels ...: error: ...`` last line, and must leave every file
as it was: nothing new under the example's folder, the run directory byte-identical
(files, their bytes and modification times, and the set of entries).

Each test prints (``-s``) and records (``record_property``) how many inputs it tried.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl_genmodels import cli
from ppl_genmodels.config import OPTIMIZERS
from ppl_genmodels.inference.objectives import OBJECTIVES
from ppl_genmodels.models import REGISTRY

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)
# a fit that would succeed: the malformed options are appended after these (argparse keeps the last value)
VALID_FIT = ["--max-examples", "50", "--epochs", "1", "--hidden", "8", "--z-dim", "2", "--batch-size", "25",
             "--eval-k", "2", "--no-plots", "--quiet", "--device", "cpu"]
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"


# --------------------------------------------------------------------------- #
# calling the CLI and judging what it did
# --------------------------------------------------------------------------- #


def _call(argv) -> tuple[object, str, bool]:
    """``cli.main(argv)`` in-process: (exit status, stderr, whether argparse exited)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return cli.main([str(a) for a in argv]), err.getvalue(), False
        except SystemExit as exit_:
            return exit_.code, err.getvalue(), True


def _assert_refused(argv, code, err: str, by_argparse: bool) -> None:
    lines = err.strip().splitlines()
    shown = f"argv {argv!r} -> exit {code}, stderr:\n{err}"
    assert code == 2, shown
    assert lines and "Traceback" not in err, shown
    if by_argparse:
        assert lines[-1].startswith("ppl-genmodels") and ": error: " in lines[-1], shown
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), shown


def _listing(folder: Path) -> dict:
    """Every entry under ``folder``: files with (bytes, mtime), folders as None (their mtimes left out:
    a lock file made and removed again touches a folder's mtime without writing anything)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(set(before) ^ set(after)) + sorted(k for k in before.keys() & after.keys() if before[k] != after[k])


class Tried:
    """Counts a property's inputs and reports the count at the end of the test."""

    def __init__(self, name: str, record_property, capsys):
        self.name, self.record, self.capsys, self.count = name, record_property, capsys, 0
        self.by_argparse = 0  # of them, refused by argparse itself (the rest by the toolkit's own checks)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.record(f"inputs_tried_{self.name}", self.count)
        with self.capsys.disabled():
            print(f"\nINPUTS: {self.name}={self.count} ({self.by_argparse} refused by argparse)",
                  file=sys.__stdout__, flush=True)
        return False


# --------------------------------------------------------------------------- #
# malformed values
# --------------------------------------------------------------------------- #


def _non_integer_text():
    """Text that ``int()`` refuses: float spellings, words, blanks."""
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),  # repr of a float never parses as an int
        st.text(LETTERS, min_size=1, max_size=8),
        st.sampled_from(["", " ", "0x10", "1e3", "2.", "1/2", "-"]),  # "--": see test_option_value_double_dash
    )


def _below(minimum: int):
    """Integers below ``minimum`` as text (two times in three: argparse lets them through to the
    toolkit's own checks), or text that is no integer at all."""
    return st.sampled_from(["integer", "integer", "text"]).flatmap(
        lambda kind: st.integers(-10**9, minimum - 1).map(str) if kind == "integer" else _non_integer_text())


def _bad_positive_real():
    """Text for a number that must be finite and > 0: zero, negatives, nan, inf, words."""
    return st.one_of(
        st.sampled_from(["nan", "inf", "-inf", "0", "-0", "-0.0", "-1", "", "abc", "1e400", "NaN", "Infinity"]),
        st.floats(max_value=0.0, allow_nan=False).map(repr),
        st.text(LETTERS, min_size=1, max_size=8),  # a word: not a float, or nan/inf
    )


def _bad_hidden():
    sizes = st.lists(st.integers(1, 64), max_size=3)
    return st.one_of(
        st.tuples(sizes, st.integers(-100, 0), sizes).map(lambda t: ",".join(map(str, [*t[0], t[1], *t[2]]))),
        st.text(LETTERS, min_size=1, max_size=6),
        st.tuples(st.integers(1, 64), st.text(LETTERS, min_size=1, max_size=3)).map(lambda t: f"{t[0]},{t[1]}"),
        st.sampled_from(["", ",", ",,", "1.5", "16;8", "16 8x", "[16]"]),
    )


def _bad_model():
    return st.one_of(
        st.text(LETTERS + "0123456789-", min_size=1, max_size=10).filter(lambda s: s not in REGISTRY),
        st.sampled_from(["missing.py:X", "vae:VAE", "x.py", "VAE", " vae", "models/vae.py"]),
    )


_BAD_CONSTRUCTOR_VALUES = {  # for the built-in VAE on digits (Bernoulli likelihood)
    "z_dim": ["0", "-1", "null", '"abc"', "1.5", "true", "[]", "NaN", "Infinity", "1e400"],
    "hidden": ["[0]", "[-1]", "[8,0]", '"abc"', "null", "{}", "[[8]]", "[1.5]", "[true]", "NaN"],
    "x_dim": ["0", "-1", "3", '"abc"', "null"],
    "y_dim": ["-1", '"abc"'],
    "likelihood": ['"foo"', "3", "null"],
}


def _bad_model_arg():
    known = st.sampled_from(sorted(_BAD_CONSTRUCTOR_VALUES)).flatmap(
        lambda key: st.sampled_from(_BAD_CONSTRUCTOR_VALUES[key]).map(lambda value: f"{key}={value}"))
    vae_args = {"x_dim", "z_dim", "y_dim", "hidden", "likelihood", "n_levels", "scale"}
    unknown = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
        lambda k: k not in vae_args).map(lambda k: f"{k}=1")
    malformed = st.sampled_from(["noequals", "=3", "", "=", "z_dim"])
    return st.one_of(known, unknown, malformed)


def _bad_fraction():
    return st.one_of(st.floats(min_value=1.0, allow_infinity=True).map(repr),
                     st.floats(max_value=-1e-9, allow_infinity=True).map(repr),
                     st.sampled_from(["nan", "abc", ""]))


def _not_a_dataset(name: str) -> bool:
    """Dataset names are matched ignoring case and surrounding blanks, with a few aliases."""
    known = ("digits", "mnist", "circle", "moons", "swiss-roll", "swissroll", "swiss_roll", "two-moons")
    return name.strip().lower() not in known


# one entry per option: a list of arguments carrying one malformed value
FIT_OPTIONS = {
    "lr": _bad_positive_real().map(lambda v: [f"--lr={v}"]),
    "scale": _bad_positive_real().map(lambda v: ["--likelihood=gaussian", f"--scale={v}"]),
    "epochs": _below(1).map(lambda v: [f"--epochs={v}"]),
    "batch-size": _below(1).map(lambda v: [f"--batch-size={v}"]),
    "z-dim": _below(1).map(lambda v: [f"--z-dim={v}"]),
    "particles": _below(1).map(lambda v: [f"--particles={v}"]),
    "eval-k": _below(1).map(lambda v: [f"--eval-k={v}"]),
    "max-examples": _below(1).map(lambda v: [f"--max-examples={v}"]),
    "patience": st.one_of(st.integers(-10**6, -1).map(str),
                          st.text(LETTERS, min_size=1, max_size=6).filter(lambda s: s.lower() not in ("none", "off"))
                          ).map(lambda v: [f"--patience={v}"]),
    "seed": _non_integer_text().map(lambda v: [f"--seed={v}"]),
    "hidden": _bad_hidden().map(lambda v: [f"--hidden={v}"]),
    "model": _bad_model().map(lambda v: [f"--model={v}"]),
    "model-arg": _bad_model_arg().map(lambda v: [f"--model-arg={v}"]),
    "elbo": st.text(LETTERS, min_size=1, max_size=8).filter(
        lambda s: s not in OBJECTIVES).map(lambda v: [f"--elbo={v}"]),
    "optimizer": st.text(LETTERS, min_size=1, max_size=8).filter(
        lambda s: s not in OPTIMIZERS).map(lambda v: [f"--optimizer={v}"]),
    "val-fraction": _bad_fraction().map(lambda v: [f"--val-fraction={v}"]),
    "test-fraction": _bad_fraction().map(lambda v: [f"--test-fraction={v}"]),
    "noise": st.one_of(st.floats(max_value=-1e-9).map(repr), st.sampled_from(["nan", "inf", "abc"])).map(
        lambda v: ["--data=moons", f"--noise={v}"]),
    "n-samples": _below(1).map(lambda v: ["--data=moons", f"--n-samples={v}"]),
    "visible-quadrants": st.one_of(st.integers(-5, 0), st.integers(4, 100)).map(
        lambda v: ["--condition=quadrants", f"--visible-quadrants={v}"]),
    "num-classes": st.integers(-100, 0).map(lambda v: ["--condition=label", "--model=cvae", f"--num-classes={v}"]),
    "data-name": st.text(LETTERS + "-", min_size=1, max_size=10).filter(_not_a_dataset).map(lambda v: [f"--data={v}"]),
}


# --------------------------------------------------------------------------- #
# malformed data files
# --------------------------------------------------------------------------- #


@st.composite
def _bad_csv(draw) -> str:
    """A CSV text that is not a finite numeric table: a NaN/inf or non-numeric cell, a ragged row, or no rows."""
    width = draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False).map(repr), min_size=width, max_size=width),
                         min_size=1, max_size=6))
    flaw = draw(st.sampled_from(["nan", "inf", "word", "empty cell", "ragged", "empty", "header only"]))
    if flaw == "empty":
        return draw(st.sampled_from(["", "\n", "\n\n  \n"]))
    header = ",".join(f"c{i}" for i in range(width))
    if flaw == "header only":
        return header + "\n"
    if flaw == "empty cell" and width == 1:
        flaw = "word"  # a one-column row with an empty cell is a blank line, which is skipped
    row, col = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, width - 1))
    if flaw == "ragged":
        rows[row] = rows[row] + [draw(st.floats(-1, 1).map(repr))] * draw(st.integers(1, 2)) if draw(st.booleans()) \
            else rows[row][: width - 1] if width > 1 else rows[row] + ["1.0"]
    else:
        rows[row][col] = {"nan": draw(st.sampled_from(["nan", "NaN", "-nan"])),
                          "inf": draw(st.sampled_from(["inf", "-inf", "1e400"])),
                          "word": draw(st.text(LETTERS, min_size=1, max_size=5)),
                          "empty cell": ""}[flaw]
        if flaw in ("word", "empty cell") and row == 0:
            rows.insert(0, [repr(1.0)] * width)  # a non-numeric first row would be a header
    body = "\n".join(",".join(r) for r in rows) + "\n"
    return (header + "\n" + body) if draw(st.booleans()) else body


@st.composite
def _bad_array(draw) -> np.ndarray:
    """An array that is no finite numeric [n, D] table: NaN/inf entries, wrong number of dimensions, no rows."""
    flaw = draw(st.sampled_from(["nan", "inf", "1-d", "3-d", "no rows", "strings"]))
    n, d = draw(st.integers(1, 20)), draw(st.integers(1, 5))
    if flaw == "1-d":
        return np.zeros(n)
    if flaw == "3-d":
        return np.zeros((n, d, 2))
    if flaw == "no rows":
        return np.zeros((0, d))
    if flaw == "strings":
        return np.array([["a"] * d] * n)
    x = np.zeros((n, d))
    x[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = math.nan if flaw == "nan" else -math.inf
    return x


@st.composite
def _bad_data_file(draw):
    """(file name, content) of a malformed data file (content None: the path does not exist).

    The content is text (CSV), bytes (written as they are), an array (``.npy``) or a dict of
    arrays (``.npz``), so that a failing example shows what was in the file.
    """
    kind = draw(st.sampled_from(["missing", "csv", "npy", "npz-no-x", "npz", "garbage"]))
    if kind == "missing":
        return draw(st.sampled_from(["missing.csv", "missing.npy", "missing.npz"])), None
    if kind == "csv":
        return "data.csv", draw(_bad_csv())
    if kind == "garbage":
        return draw(st.sampled_from(["data.npy", "data.npz"])), draw(st.binary(max_size=64))
    if kind == "npy":
        return "data.npy", draw(_bad_array())
    if kind == "npz":
        return "data.npz", {"x": draw(_bad_array())}
    return "data.npz", {"data": np.zeros((4, 2))}


def _write_data_file(path: Path, content) -> None:
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        np.save(path, content)


# --------------------------------------------------------------------------- #
# fit
# --------------------------------------------------------------------------- #


@pytest.fixture
def scratch(tmp_path):
    """A fresh empty folder per Hypothesis example (a function-scoped tmp_path is shared by all of them)."""
    return lambda: Path(tempfile.mkdtemp(dir=tmp_path))


def _fit_and_judge(folder: Path, extra: list[str], tried: Tried) -> None:
    before = _listing(folder)
    argv = ["fit", *VALID_FIT, "--out", folder / "run", *extra]
    code, err, by_argparse = _call(argv)
    tried.count += 1
    tried.by_argparse += by_argparse
    _assert_refused(argv, code, err, by_argparse)
    assert _changes(before, _listing(folder)) == [], f"{argv!r} wrote {_changes(before, _listing(folder))}"


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def _fit_options_property(data, scratch, tried):
    names = data.draw(st.lists(st.sampled_from(sorted(FIT_OPTIONS)), min_size=1, max_size=2, unique=True),
                      label="malformed options")
    extra = [arg for name in names for arg in data.draw(FIT_OPTIONS[name], label=name)]
    _fit_and_judge(scratch(), extra, tried)


def test_fit_refuses_malformed_options(scratch, record_property, capsys):
    with Tried("fit_options", record_property, capsys) as tried:
        _fit_options_property(scratch=scratch, tried=tried)


@settings(max_examples=150, **SETTINGS)
@given(bad=_bad_data_file())
def _fit_data_property(bad, scratch, tried):
    folder = scratch()
    name, content = bad
    if content is not None:
        _write_data_file(folder / name, content)
    _fit_and_judge(folder, [f"--data={folder / name}"], tried)


def test_fit_refuses_malformed_data_files(scratch, record_property, capsys):
    with Tried("fit_data_files", record_property, capsys) as tried:
        _fit_data_property(scratch=scratch, tried=tried)


# Bugs these two show are kept apart from the properties above, so that those keep guarding the rest.

BAD_DEVICES = ["tpu", "", "gpu", "cuda:abc", "cuda:-1", "mps", "xla", "hpu", "meta", "cpu:5"]


@settings(max_examples=len(BAD_DEVICES), **SETTINGS)
@given(device=st.sampled_from(BAD_DEVICES))
def _fit_device_property(device, scratch, tried):
    _fit_and_judge(scratch(), [f"--device={device}"], tried)


def test_fit_refuses_devices_other_than_auto_cpu_cuda(scratch, record_property, capsys):
    """``--device``: "auto, cpu, cuda, cuda:N" (RunConfig.device's help); anything else is bad input."""
    with Tried("fit_devices", record_property, capsys) as tried:
        _fit_device_property(scratch=scratch, tried=tried)


@settings(max_examples=25, **SETTINGS)
@given(name=st.sampled_from(sorted(FIT_OPTIONS)).flatmap(lambda n: FIT_OPTIONS[n].map(lambda a: (n, a))),
       depth=st.integers(1, 3))
def _fit_nested_out_property(name, depth, scratch, tried):
    folder = scratch()
    before = _listing(folder)
    out = folder.joinpath(*[f"d{i}" for i in range(depth)], "run")
    argv = ["fit", *VALID_FIT, "--out", out, *name[1]]
    code, err, by_argparse = _call(argv)
    tried.count += 1
    tried.by_argparse += by_argparse
    _assert_refused(argv, code, err, by_argparse)
    assert _changes(before, _listing(folder)) == [], f"{argv!r} left {_changes(before, _listing(folder))}"


def test_refused_fit_leaves_no_parent_folders_of_out(scratch, record_property, capsys):
    """A refused ``fit --out a/b/run`` must not leave ``a/`` and ``a/b/`` behind."""
    with Tried("fit_nested_out", record_property, capsys) as tried:
        _fit_nested_out_property(scratch=scratch, tried=tried)


# --------------------------------------------------------------------------- #
# evaluate, bdmc, compare, sample on a trained run
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained, unconditioned 1-epoch run (its evaluation set ``fit`` included)."""
    out = tmp_path_factory.mktemp("cli-properties") / "run"
    code, err, _ = _call(["fit", *VALID_FIT, "--out", out])
    assert code == 0, err
    return out


def _bad_name(taken: tuple[str, ...] = ()):
    """Invalid result-set names, and the names of sets the run already has (``taken``)."""
    return st.one_of(
        st.sampled_from(["", ".hidden", "a/b", "../x", "a b", "x" * 101, "é", "a:b", "-/", *taken]),
        st.text(min_size=1, max_size=12).filter(
            lambda s: s.startswith(".") or not set(s) <= set(LETTERS + "0123456789-.")),
    )


def _bad_estimators():
    number = st.one_of(st.integers(-1000, 0).map(str), st.sampled_from(["x", "1.5", "", " ", "1e3", "k"]))
    return st.one_of(
        st.tuples(st.sampled_from(["elbo", "iwae", "ais"]), number).map(lambda t: f"{t[0]}:{t[1]}"),
        st.text(LETTERS, min_size=1, max_size=8).filter(lambda s: s.lower() not in ("elbo", "iwae", "ais", "exact")),
        st.sampled_from(["", ",", "elbo,,iwae", "elbo,elbo", "iwae:5,iwae5", "exact", "exact:3", "ais:3,foo"]),
    )


def _option(flag, values):
    return values.map(lambda v: [f"--{flag}={v}"])


READER_OPTIONS = {
    "evaluate": {
        "n": _option("count", _below(1)), "chains": _option("chains", _below(1)),
        "batch-size": _option("batch-size", _below(1)), "k": _option("k", _below(1)),
        "estimators": _option("estimators", _bad_estimators()),
        "both": st.just(["--k=5", "--estimators=elbo"]),
        "split": _option("split", st.text(LETTERS, min_size=1, max_size=6).filter(
            lambda s: s not in ("train", "val", "test"))),
        "proposal": _option("proposal", st.text(LETTERS, min_size=1, max_size=6).filter(
            lambda s: s not in ("guide", "prior", "mixture"))),
        "name": _option("name", _bad_name(taken=("fit",))),
    },
    "bdmc": {
        "n": _option("count", _below(1)), "steps": _option("steps", _below(1)), "chains": _option("chains", _below(1)),
        "batch-size": _option("batch-size", _below(1)), "name": _option("name", _bad_name()),
    },
    "compare": {
        "n": _option("count", _below(1)), "chains": _option("chains", _below(1)),
        "samples": _option("samples", _below(1)), "warmup": _option("warmup", _below(0)),
        "local-steps": _option("local-steps", _below(0)), "logp-k": _option("logp-k", _below(1)),
        "mcmc": _option("mcmc", st.text(LETTERS, min_size=1, max_size=6).filter(lambda s: s not in ("hmc", "nuts"))),
        "seed": _option("seed", _non_integer_text()), "name": _option("name", _bad_name()),
    },
    "sample": {
        "n": _option("count", _below(1)),
        "out": st.tuples(st.text(LETTERS, min_size=1, max_size=6),
                         st.sampled_from(["", ".txt", ".jpg", ".PNG.bak", ".pdf", "."])).map(
            lambda t: ["--out={folder}/" + t[0] + t[1]]),
        "label": _option("label", st.integers(-3, 12)),  # the run is unconditioned: every label is refused
        "seed": _option("seed", _non_integer_text()),
    },
}


@st.composite
def _reader_call(draw):
    command = draw(st.sampled_from(sorted(READER_OPTIONS)))
    options = READER_OPTIONS[command]
    names = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=2, unique=True))
    return command, [arg for name in names for arg in draw(options[name], label=f"{command} {name}")]


def _reader_and_judge(run: Path, folder: Path, command: str, extra: list[str], tried: Tried) -> None:
    extra = [arg.replace("{folder}", str(folder)) for arg in extra]
    argv = [command, run, *extra, *(["--quiet"] if command != "sample" else [])]
    run_before, folder_before = _listing(run), _listing(folder)
    code, err, by_argparse = _call(argv)
    tried.count += 1
    tried.by_argparse += by_argparse
    _assert_refused(argv, code, err, by_argparse)
    assert _changes(run_before, _listing(run)) == [], f"{argv!r} changed the run: {_changes(run_before, _listing(run))}"
    assert _changes(folder_before, _listing(folder)) == [], f"{argv!r} wrote {_changes(folder_before, _listing(folder))}"


@settings(max_examples=400, **SETTINGS)
@given(call=_reader_call())
def _reader_property(call, tiny_run, scratch, tried):
    _reader_and_judge(tiny_run, scratch(), *call, tried)


def test_readers_refuse_malformed_options(tiny_run, scratch, record_property, capsys):
    with Tried("readers", record_property, capsys) as tried:
        _reader_property(tiny_run=tiny_run, scratch=scratch, tried=tried)


@settings(max_examples=12, **SETTINGS)
@given(command=st.sampled_from(["evaluate", "bdmc", "compare", "sample"]),
       where=st.sampled_from(["missing", "empty folder", "a file", "config.json"]))
def _not_a_run_property(command, where, tiny_run, scratch, tried):
    folder = scratch()
    target = {"missing": folder / "nothing", "empty folder": folder, "a file": folder / "file.txt",
              "config.json": tiny_run / "config.json"}[where]
    if where == "a file":
        target.write_text("not a run")
    argv = [command, target]
    before, run_before = _listing(folder), _listing(tiny_run)
    code, err, by_argparse = _call(argv)
    tried.count += 1
    tried.by_argparse += by_argparse
    _assert_refused(argv, code, err, by_argparse)
    assert _changes(before, _listing(folder)) == [] and _changes(run_before, _listing(tiny_run)) == []


def test_readers_refuse_what_is_not_a_run(tiny_run, scratch, record_property, capsys):
    with Tried("not_a_run", record_property, capsys) as tried:
        _not_a_run_property(tiny_run=tiny_run, scratch=scratch, tried=tried)


@settings(max_examples=len(BAD_DEVICES) * 2, **SETTINGS)
@given(command=st.sampled_from(["evaluate", "sample"]), device=st.sampled_from(BAD_DEVICES))
def _reader_device_property(command, device, tiny_run, scratch, tried):
    _reader_and_judge(tiny_run, scratch(), command, [f"--device={device}"], tried)


def test_readers_refuse_devices_other_than_auto_cpu_cuda(tiny_run, scratch, record_property, capsys):
    with Tried("reader_devices", record_property, capsys) as tried:
        _reader_device_property(tiny_run=tiny_run, scratch=scratch, tried=tried)


# --------------------------------------------------------------------------- #
# ``--option=--``
# --------------------------------------------------------------------------- #


DOUBLE_DASH = [["fit", "--epochs=--"], ["fit", "--lr=--"], ["fit", "--z-dim=--"], ["fit", "--seed=--"],
               ["fit", "--device=--"], ["fit", "--hidden=--"], ["fit", "--model-arg=--"],
               ["evaluate", "{run}", "--count=--"], ["sample", "{run}", "--count=--"]]


def test_option_value_double_dash_is_refused(tiny_run, tmp_path):
    """Python 3.11's argparse drops a value spelled ``--`` (``--epochs=--``) and stores ``[]``, skipping the
    option's type; that list must still be refused in one line, not reach the code as a list."""
    wrong = []
    for i, argv in enumerate(DOUBLE_DASH):
        argv = [str(tiny_run) if a == "{run}" else a for a in argv]
        if argv[0] == "fit":
            argv = ["fit", *VALID_FIT, "--out", str(tmp_path / f"run{i}"), *argv[1:]]
        before, run_before = _listing(tmp_path), _listing(tiny_run)
        try:
            code, err, by_argparse = _call(argv)
            _assert_refused(argv, code, err, by_argparse)
            assert _changes(before, _listing(tmp_path)) == [] and _changes(run_before, _listing(tiny_run)) == [], \
                f"{argv!r} wrote files"
        except Exception as err:  # noqa: BLE001 - every case is reported, not just the first
            last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            wrong.append(f"{argv[0]} {argv[-1]}: {type(err).__name__}: {last[:150]}")
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- #
# what fit accepts, fit --resume accepts
# --------------------------------------------------------------------------- #

MODEL_ARG_VALUES = {"scale": ["-1", "0", "0.5", '"abc"', "true"], "z_dim": ["1", "3", "0"],
                    "hidden": ["[4]", "[4,4]", "[]"], "n_levels": ["0", "5"], "likelihood": ['"gaussian"']}


@settings(max_examples=12, **SETTINGS)
@given(arg=st.sampled_from(sorted(MODEL_ARG_VALUES)).flatmap(
    lambda key: st.sampled_from(MODEL_ARG_VALUES[key]).map(lambda value: f"{key}={value}")))
def _accepted_then_resumed_property(arg, scratch, tried):
    out = scratch() / "run"
    code, err, _ = _call(["fit", *VALID_FIT, "--out", out, f"--model-arg={arg}"])
    tried.count += 1
    if code != 0:
        return  # refused: the properties above judge how
    code, err, by_argparse = _call(["fit", "--resume", "--out", out, "--epochs", "2", "--quiet", "--no-plots"])
    assert code == 0, f"fit --model-arg {arg} was accepted, but its resume is refused: {err.strip()}"


def test_a_run_fit_accepts_can_be_resumed(scratch, record_property, capsys):
    """``fit --model-arg KEY=VALUE``: whatever fit accepts and records in config.json, ``fit --resume``
    must accept too (its configuration is checked again on resume)."""
    with Tried("model_arg_resume", record_property, capsys) as tried:
        _accepted_then_resumed_property(scratch=scratch, tried=tried)
