"""Run directories survive what was seen to go wrong: one writer at a time, lost rows, damaged files, foreign code.

The slow, process-killing versions of these checks are in ``tests/test_faults.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from ppl_genmodels import ConfigError, fit, load_run
from ppl_genmodels.runs import (LOCK_FILE, CheckpointError, RunLocked, load_checkpoint, locked, restartable,
                                save_checkpoint)
from ppl_genmodels.plots import sample_run

TINY = dict(epochs=2, max_examples=64, hidden=[8], z_dim=2, batch_size=32, eval_k=5, progress=False, plots=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    fit("vae", "digits", out, **TINY)
    return out


# --------------------------------------------------------------------------- #
# the lock
# --------------------------------------------------------------------------- #

HOLDER = textwrap.dedent("""
    import sys, time
    from ppl_genmodels.runs import locked
    with locked(sys.argv[1], "holder"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_process_is_refused_while_the_first_holds_the_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked) as info:
            with locked(tmp_path, "evaluate"):
                pass
        message = str(info.value)
        assert f"in use by process {holder.pid} (holder since" in message and "\n" not in message
        with pytest.raises(RunLocked):
            fit("vae", "digits", tmp_path / "sub" / "..", **TINY)  # the same directory, spelled otherwise
    finally:
        holder.kill()
        holder.wait()
    with locked(tmp_path, "evaluate"):  # the kernel dropped the dead holder's lock
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "evaluate"
    assert not (tmp_path / LOCK_FILE).exists()


def test_evaluate_bdmc_and_compare_wait_for_no_one(tiny_run):
    from ppl_genmodels import compare_run, evaluate_run
    from ppl_genmodels.evaluation import bdmc_run

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tiny_run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(str(p) for p in tiny_run.rglob("*"))
        for call in (lambda: evaluate_run(tiny_run, n=2, progress=False), lambda: bdmc_run(tiny_run, n=2, progress=False),
                     lambda: compare_run(tiny_run, n=2, progress=False)):
            with pytest.raises(RunLocked, match="in use by process"):
                call()
        assert sorted(str(p) for p in tiny_run.rglob("*")) == before
        evaluate_run(tiny_run, n=2, progress=False, save=False)  # reading needs no lock
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_nests_in_one_process_and_ignores_a_stale_file(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999999, "command": "fit"}))  # left by a dead process
    with locked(tmp_path, "fit"):
        with locked(tmp_path, "evaluate"):
            pass
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_failed_new_run_leaves_no_directory(tmp_path):
    with pytest.raises(ConfigError):
        fit("vae", "digits", tmp_path / "run", lr=float("inf"), **TINY)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- #
# checkpoints carry the metrics; a run without one restarts
# --------------------------------------------------------------------------- #


def test_resume_rewrites_a_metrics_row_lost_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    reference = fit("vae", "digits", tmp_path / "reference", **{**TINY, "epochs": 3}).metrics
    fit("vae", "digits", out, **TINY)
    metrics = pd.read_csv(out / "metrics.csv")
    metrics.iloc[:1].to_csv(out / "metrics.csv", index=False)  # as if the crash came before epoch 2's row
    assert [row["epoch"] for row in load_checkpoint(out / "checkpoint.pt")["metrics"]] == [1, 2]
    run = fit(out=out, resume=True, epochs=3, progress=False, evaluate=False, plots=False)
    resumed = pd.read_csv(out / "metrics.csv")
    assert resumed["epoch"].tolist() == [1, 2, 3] == run.metrics["epoch"].tolist()
    pd.testing.assert_frame_equal(resumed[["epoch", "train_elbo", "val_elbo"]],
                                  reference[["epoch", "train_elbo", "val_elbo"]])


def test_divergence_in_the_first_epoch_leaves_a_restartable_run(tmp_path):
    from ppl_genmodels.train import TrainingDiverged

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        fit("vae", "digits", out, **{**TINY, "lr": 1e30})
    message = str(info.value)
    assert "epoch 0" not in message and "no checkpoint" in message and "started again in place" in message
    assert restartable(out) and sorted(p.name for p in out.iterdir()) == ["config.json"]
    run = fit("vae", "digits", out, **TINY)  # started again in place with sane options
    assert run.metrics["epoch"].tolist() == [1, 2]


# --------------------------------------------------------------------------- #
# damaged and foreign checkpoints
# --------------------------------------------------------------------------- #


def _message(error_type, fn, *args, **kwargs) -> str:
    with pytest.raises(error_type) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text and "weights_only" not in text
    return text


class _Foreign:
    pass


def test_damaged_checkpoints_are_reported_as_corrupt(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.ones(1000)}, "epoch": 1})
    data = good.read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("half", "flipped", "empty"):
        assert "is corrupt" in _message(CheckpointError, load_checkpoint, tmp_path / f"{name}.pt")
    torch.save({"model": _Foreign()}, tmp_path / "foreign.pt")
    assert "holds objects other than tensors" in _message(CheckpointError, load_checkpoint, tmp_path / "foreign.pt")


def test_load_run_reports_a_truncated_best_checkpoint(tiny_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in tiny_run.iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    (copy / "best.pt").write_bytes((copy / "best.pt").read_bytes()[:100])
    assert "best.pt is corrupt or truncated" in _message(CheckpointError, load_run, copy)


# --------------------------------------------------------------------------- #
# a run's model file runs code: it must be the file the run was trained with
# --------------------------------------------------------------------------- #

USER_MODEL = textwrap.dedent('''
    import pyro, pyro.distributions as dist, torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self, x_dim, z_dim=2):
            super().__init__()
            self.z_dim = z_dim
            self.enc = nn.Linear(x_dim, 2 * z_dim)
            self.dec = nn.Linear(z_dim, x_dim)

        def model(self, x):
            pyro.module("dec", self.dec)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.dec(z), validate_args=False).to_event(1), obs=x)

        def guide(self, x):
            pyro.module("enc", self.enc)
            with pyro.plate("data", x.shape[0]):
                loc, log_scale = self.enc(x).chunk(2, -1)
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
''')


def test_a_changed_model_file_is_not_imported_without_trust(tmp_path):
    file = tmp_path / "small.py"
    file.write_text(USER_MODEL)
    out = tmp_path / "run"
    fit(f"{file}:Small", "digits", out, **{**TINY, "hidden": None})
    assert len(json.loads((out / "config.json").read_text())["model_sha256"]) == 64
    load_run(out)
    file.write_text(USER_MODEL + "\nprint('this code would run')\n")
    message = _message(ConfigError, load_run, out)
    assert str(file) in message and "--trust-model-file" in message
    with pytest.raises(ConfigError, match="not the file this run was trained with"):
        fit(out=out, resume=True, epochs=3, progress=False)
    assert type(load_run(out, trust_model_file=True).model).__name__ == "Small"


# --------------------------------------------------------------------------- #
# options and commands that used to pass silently
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("options, match", [
    ({"lr": float("inf")}, "lr must be a finite number, got inf"),
    ({"lr": float("nan")}, "lr must be a finite number, got nan"),
    ({"scale": float("inf")}, "scale must be a finite number"),
])
def test_non_finite_options_are_refused_before_any_work(tmp_path, options, match):
    assert match in _message(ConfigError, fit, "vae", "digits", tmp_path / "run", **{**TINY, **options})
    assert not (tmp_path / "run").exists()


def test_sample_refuses_a_label_without_labels_and_a_non_png_path(tiny_run, tmp_path):
    before = sorted(p.name for p in tiny_run.rglob("*"))
    assert "needs a run conditioned on class labels" in _message(ValueError, sample_run, tiny_run, 4, label=3)
    assert "give an --out ending in .png, not x.txt" in _message(ValueError, sample_run, tiny_run, 4, tmp_path / "x.txt")
    assert sorted(p.name for p in tiny_run.rglob("*")) == before and not (tmp_path / "x.txt").exists()
