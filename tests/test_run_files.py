"""The files of a run directory: atomic writes (ppl_genmodels.runs), safe weights-only loads, and the RNG state
that makes a resumed run continue exactly (ppl_genmodels.train)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from ppl_genmodels.runs import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
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
