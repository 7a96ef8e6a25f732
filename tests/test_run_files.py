"""The files of a run directory: atomic writes (ppl_genmodels.runs), safe weights-only loads, and the RNG state
that makes a resumed run continue exactly (ppl_genmodels.train)."""

from __future__ import annotations

import os
import random

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ppl_genmodels.runs import CheckpointError, Run, atomic_write, load_checkpoint, save_checkpoint
from ppl_genmodels.train import rng_state, set_rng_state


class Payload:
    """An arbitrary picklable object: a weights-only load must refuse to build it."""

    def __init__(self):
        self.value = 42


def _payload() -> dict:
    torch.manual_seed(0)
    return {
        "model": {"encoder.weight": torch.randn(3, 4), "encoder.bias": torch.zeros(3, dtype=torch.float64)},
        "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(3, 4)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}]},
        "epoch": 7,
        "best_val": -12.5,
        "stopped_early": False,
        "config": {"model": "vae", "hidden": [32, 16], "scale": None, "model_args": {}},
        "labels": torch.arange(10),
    }


def _assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a == b


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------- #
# save / load
# --------------------------------------------------------------------------- #


def test_round_trip_of_tensors_and_nested_dicts(tmp_path):
    payload = _payload()
    path = tmp_path / "sub" / "ck.pt"  # the folder is created
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path)
    _assert_same(payload, loaded)
    assert _leftovers(path.parent, {"ck.pt"}) == []


def test_load_with_map_location(tmp_path):
    save_checkpoint(tmp_path / "ck.pt", _payload())
    loaded = load_checkpoint(tmp_path / "ck.pt", map_location="cpu")
    assert loaded["model"]["encoder.weight"].device.type == "cpu"
    assert torch.equal(loaded["model"]["encoder.weight"], _payload()["model"]["encoder.weight"])


def test_save_overwrites_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "epoch": 1})
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 2})
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.ones(2))
    assert _leftovers(tmp_path, {"ck.pt"}) == []


def test_arbitrary_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, path)
    assert torch.load(path, weights_only=False)["x"].value == 42  # the file itself is intact
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint


@pytest.mark.parametrize("cut", [0, 1, 10, 0.5, -20])
def test_truncated_file_is_refused(tmp_path, cut):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _payload())
    data = good.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert "\n" not in str(info.value)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint\x00\x01\x02" * 50)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"epoch": 3}, torch.zeros(3)])
def test_file_without_model_state_is_refused(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="no model state"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- #
# atomic writes
# --------------------------------------------------------------------------- #


def _failing_save(exc):
    def save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PARTIAL-WRITE" * 100)  # some bytes reach the file first
        raise exc

    return save


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, exc):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(4.0)}, "epoch": 1})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save(exc))
    with pytest.raises(type(exc)):
        save_checkpoint(path, {"model": {"w": torch.zeros(4)}, "epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert _leftovers(tmp_path, {"checkpoint.pt"}) == []


def test_failed_first_save_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _failing_save(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"model": {}})
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    before = path.read_bytes()

    def replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, {"checkpoint.pt"}) == []


def test_atomic_write(tmp_path):
    path = tmp_path / "deeper" / "metrics.csv"
    atomic_write(path, "epoch,x\n1,2\n")
    atomic_write(path, "épоch,x\n1,3\n")  # overwrite, non-ASCII survives as UTF-8
    assert path.read_text(encoding="utf-8") == "épоch,x\n1,3\n"
    assert _leftovers(path.parent, {"metrics.csv"}) == []


# --------------------------------------------------------------------------- #
# random-number state
# --------------------------------------------------------------------------- #


def _draws():
    return (
        torch.rand(5),
        torch.randn(3),
        np.random.rand(4),
        np.random.randn(3),  # odd count: numpy caches a Gaussian for the next call
        random.random(),
        random.gauss(0.0, 1.0),
        random.getrandbits(64),
    )


def _assert_draws_equal(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3])
    assert a[4:] == b[4:]


def _seed_and_warm():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    # Leave cached Gaussians in numpy and in Python's random so those parts of the state matter.
    np.random.randn(1)
    random.gauss(0.0, 1.0)


def test_rng_state_round_trip_restores_every_stream():
    _seed_and_warm()
    state = rng_state()
    expected = _draws()
    _draws()  # move every stream on
    set_rng_state(state)
    _assert_draws_equal(_draws(), expected)


def test_rng_state_round_trip_through_a_checkpoint_file(tmp_path):
    _seed_and_warm()
    save_checkpoint(tmp_path / "ck.pt", {"model": {}, "rng": rng_state()})
    expected = _draws()
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)
    set_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"])  # weights-only load of the state
    _assert_draws_equal(_draws(), expected)


def test_rng_states_differ_after_draws():
    _seed_and_warm()
    first = rng_state()
    _draws()
    second = rng_state()
    assert not torch.equal(first["torch"], second["torch"])
    assert first["python"] != second["python"]
    assert not torch.equal(first["numpy_keys"], second["numpy_keys"]) or first["numpy_pos"] != second["numpy_pos"]


# --------------------------------------------------------------------------- #
# result sets and their index (Run)
# --------------------------------------------------------------------------- #


def _bare_run(path) -> Run:
    """A Run with only its directory: the result-set methods need nothing else."""
    return Run(path, None, None, None, pd.DataFrame())


def test_a_run_without_an_index_has_an_empty_one(tmp_path):
    run = _bare_run(tmp_path)
    assert run.results().empty and run.results().columns.tolist() == list(Run.RESULT_COLUMNS)
    assert run.summary() is None
    assert run.result_set("bdmc", "x") == tmp_path / "bdmc" / "x"
    with pytest.raises(ValueError, match="unknown kind of result set 'plots'"):
        run.result_set("plots", "x")


def test_write_result_set_writes_its_folder_then_its_index_row(tmp_path):
    run = _bare_run(tmp_path)
    table = pd.DataFrame({"a": [1, 2]})
    written = []
    folder = run.write_result_set("compare", "one", {"summary.csv": table}, seconds=1.5,
                                  options={"n": 2, "seed": None}, write=lambda f: written.append(sorted(f.iterdir())))
    assert folder == tmp_path / "compare" / "one" and written == [[folder / "summary.csv"]]
    pd.testing.assert_frame_equal(pd.read_csv(folder / "summary.csv"), table)
    run.write_result_set("compare", "1", {"summary.csv": table}, seconds=2.0, options={})
    run.write_result_set("evaluation", "NA", {"summary.csv": table}, seconds=3.0, options={})
    index = run.results()
    assert index["name"].tolist() == ["one", "1", "NA"]  # names stay strings
    assert index["path"].tolist() == ["compare/one", "compare/1", "evaluation/NA"]
    assert index["seconds"].tolist() == [1.5, 2.0, 3.0]
    assert json.loads(index["options"].iloc[0]) == {"n": 2, "seed": None} and '"n":2' in index["options"].iloc[0]
    assert pd.to_datetime(index["created"]).dt.tz is not None
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_result_set_is_never_overwritten(tmp_path):
    run = _bare_run(tmp_path)
    run.write_result_set("bdmc", "x", {"summary.csv": pd.DataFrame({"a": [1]})}, seconds=1.0, options={})
    kept = (tmp_path / "bdmc" / "x" / "summary.csv").read_bytes()
    index = (tmp_path / "results.csv").read_bytes()
    with pytest.raises(ValueError, match="'x' already exists"):
        run.write_result_set("bdmc", "x", {"summary.csv": pd.DataFrame({"a": [2]})}, seconds=1.0, options={})
    assert (tmp_path / "bdmc" / "x" / "summary.csv").read_bytes() == kept
    assert (tmp_path / "results.csv").read_bytes() == index


@pytest.mark.parametrize("name", ["", ".x", "..", "a/b", "a\\b", "a b", "a:b", "tab\t", "new\nline", "é", "x" * 101])
def test_invalid_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="invalid result set name") as info:
        Run.check_result_name(tmp_path, "evaluation", name)
    assert "\n" not in str(info.value)


def test_names_are_checked_against_folders_and_index_rows(tmp_path):
    run = _bare_run(tmp_path)
    assert Run.check_result_name(tmp_path, "evaluation", "my-set_1.0") == "my-set_1.0"
    (tmp_path / "evaluation" / "on-disk").mkdir(parents=True)  # a folder without an index row still counts
    run.write_result_set("evaluation", "listed", {}, seconds=0.0, options={})
    (tmp_path / "evaluation" / "listed").rmdir()  # an index row without its folder still counts
    for name in ("on-disk", "listed"):
        with pytest.raises(ValueError, match=f"result set '{name}' already exists in .*; choose another --name"):
            Run.check_result_name(tmp_path, "evaluation", name)
    assert Run.check_result_name(tmp_path, "bdmc", "listed") == "listed"  # names are per kind
    assert run.unused_result_name("evaluation", "fresh") == "fresh"
    assert run.unused_result_name("evaluation", "on-disk") == "on-disk-2"
    (tmp_path / "evaluation" / "on-disk-2").mkdir()
    assert run.new_result_name("evaluation", None, default="on-disk") == "on-disk-3"
    assert run.new_result_name("evaluation", "mine", default="on-disk") == "mine"


def test_summary_prefers_the_most_recent_evaluation(tmp_path):
    run = _bare_run(tmp_path)
    atomic_write(tmp_path / "evaluation" / "summary.csv", "estimator,mean\nold,1\n")  # the layout before sets
    assert run.summary()["estimator"].tolist() == ["old"]
    atomic_write(tmp_path / "evaluation" / "fit" / "summary.csv", "estimator,mean\nfit,2\n")  # no index yet
    assert run.summary()["estimator"].tolist() == ["fit"]
    for name in ("first", "second"):
        run.write_result_set("evaluation", name, {"summary.csv": pd.DataFrame({"estimator": [name]})},
                             seconds=0.0, options={})
    run.write_result_set("bdmc", "later", {"summary.csv": pd.DataFrame({"estimator": ["bdmc"]})},
                         seconds=0.0, options={})
    assert run.summary()["estimator"].tolist() == ["second"]  # bdmc sets are not evaluations
