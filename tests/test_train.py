"""Tests for ppl_genmodels.train: fit(), the run directory it writes, resume, NaN guard, early stopping."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_genmodels import ConfigError, RunConfig, TrainingDiverged, fit
from ppl_genmodels import train as train_module
from ppl_genmodels.models import VAE
from ppl_genmodels.runs import load_checkpoint, read_config

TINY = dict(hidden=[32], z_dim=2, eval_k=10, progress=False, plots=False)


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


# --------------------------------------------------------------------------- #
# one small run, inspected by several tests
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "digits-vae"
    run = fit("vae", "digits", out, epochs=3, max_examples=96, batch_size=32, device="cpu", **TINY)
    return run


def test_fit_writes_the_run_directory(digits_run):
    out = digits_run.path
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "best.pt",
                 "evaluation/fit/summary.csv", "evaluation/fit/per_datapoint.csv"):
        assert (out / name).is_file(), name
    assert not (out / "plots").exists()  # plots=False
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_config_json_round_trips(digits_run):
    config = read_config(digits_run.path)
    assert config == digits_run.config
    assert RunConfig.from_dict(json.loads((digits_run.path / "config.json").read_text())) == digits_run.config
    assert (config.model, config.data, config.epochs, config.hidden, config.z_dim) == ("vae", "digits", 3, [32], 2)
    assert (config.data_options.max_examples, config.batch_size, config.eval_k, config.device) == (96, 32, 10, "cpu")


def test_metrics_csv(digits_run):
    metrics = pd.read_csv(digits_run.path / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_elbo", "val_elbo", "seconds"]
    assert metrics["epoch"].tolist() == [1, 2, 3]
    assert np.isfinite(metrics[["train_elbo", "val_elbo"]].to_numpy()).all()
    assert (metrics["train_elbo"] < 0).all() and (metrics["val_elbo"] < 0).all()  # log-probabilities of binary images
    assert (metrics["seconds"] > 0).all()
    pd.testing.assert_frame_equal(digits_run.metrics.reset_index(drop=True), metrics, check_dtype=False)


def test_checkpoints(digits_run):
    out = digits_run.path
    metrics = digits_run.metrics
    last = load_checkpoint(out / "checkpoint.pt")
    best = load_checkpoint(out / "best.pt")
    assert last["epoch"] == 3
    assert last["config"] == digits_run.config.to_dict()
    assert {"optimizer", "rng", "shuffle_rng", "best_val", "bad_epochs", "stopped_early"} <= set(last)
    best_epoch = int(metrics["epoch"][metrics["val_elbo"].idxmax()])
    assert best["epoch"] == best_epoch == digits_run.epoch
    assert best["val_elbo"] == pytest.approx(metrics["val_elbo"].max(), rel=1e-12)
    assert last["best_val"] == pytest.approx(metrics["val_elbo"].max(), rel=1e-12)
    # the returned model carries the best weights
    _assert_state_equal(digits_run.model.state_dict(), best["model"])


def test_evaluation_files(digits_run):
    out = digits_run.path
    test = digits_run.data.test
    summary = pd.read_csv(out / "evaluation" / "fit" / "summary.csv")
    per = pd.read_csv(out / "evaluation" / "fit" / "per_datapoint.csv")
    assert list(summary.columns) == ["estimator", "mean", "stderr", "n", "seconds"]
    assert summary["estimator"].tolist() == ["elbo", "iwae10"]
    assert (summary["n"] == len(test)).all()
    assert len(per) == len(test)
    np.testing.assert_array_equal(per["index"].to_numpy(), test.index.numpy())
    for col in ("elbo", "elbo_se", "iwae10", "iwae10_se", "iwae10_ess"):
        assert col in per.columns and np.isfinite(per[col]).all(), col
    # IWAE-k >= mean of the same k log weights (Jensen), per datapoint
    assert (per["iwae10"] >= per["elbo"] - 1e-4).all()
    assert ((per["iwae10_ess"] >= 1 - 1e-6) & (per["iwae10_ess"] <= 10 + 1e-6)).all()
    means = summary.set_index("estimator")["mean"]
    assert means["iwae10"] >= means["elbo"] - 1e-4
    assert means["elbo"] == pytest.approx(per["elbo"].mean(), rel=1e-9)
    assert means["iwae10"] == pytest.approx(per["iwae10"].mean(), rel=1e-9)
    pd.testing.assert_frame_equal(digits_run.summary(), summary)


def test_max_examples_caps_every_split(digits_run):
    data = digits_run.data
    assert (len(data.train), len(data.val), len(data.test)) == (96, 96, 96)
    assert data.x_dim == 64


def test_device_follows_option(digits_run):
    assert digits_run.device == torch.device("cpu")
    assert {p.device.type for p in digits_run.model.parameters()} == {"cpu"}
    assert digits_run.data.train.x.device.type == "cpu"


def test_fit_writes_plots_when_asked(tmp_path):
    run = fit("vae", "digits", tmp_path / "run", epochs=1, max_examples=32, evaluate=False,
              **{**TINY, "plots": True})
    names = sorted(p.name for p in (run.path / "plots").iterdir())
    assert names == ["elbo.png", "reconstructions.png", "samples.png"]
    for name in names:
        assert (run.path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- #
# options refused before anything is written
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_loads_on_cpu(tmp_path):
    from ppl_genmodels import load_run

    run = fit("vae", "digits", tmp_path / "run", epochs=1, device="cuda", max_examples=32, evaluate=False, **TINY)
    assert run.device.type == "cuda"
    assert {p.device.type for p in run.model.parameters()} == {"cuda"}
    assert run.data.train.x.device.type == "cuda"
    loaded = load_run(tmp_path / "run", device="cpu")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    _assert_state_equal(loaded.model.state_dict(), run.model.state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        fit("vae", "digits", out, epochs=1, device="cuda", **TINY)
    assert not out.exists()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"device": "tpu-ish"}, "unknown device"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size"),
        ({"elbo": "renyi"}, "unknown objective"),
        ({"optimizer": "lbfgs"}, "unknown optimizer"),
        ({"particles": 0}, "particles"),
        ({"patience": -1}, "patience"),
        ({"bogus_option": 3}, "unknown option"),
    ],
)
def test_bad_options_are_config_errors(tmp_path, options, match):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match) as info:
        fit("vae", "digits", out, **{**TINY, **options})
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_existing_run_directory_is_refused_and_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"model": "vae"}\n')
    (out / "notes.txt").write_text("important\n")
    before = _files(out)
    with pytest.raises(ConfigError, match="already exists"):
        fit("vae", "digits", out, epochs=1, max_examples=32, **TINY)
    assert _files(out) == before


def test_existing_file_as_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    out.write_bytes(b"a file, not a folder")
    with pytest.raises(ConfigError, match="already exists"):
        fit("vae", "digits", out, epochs=1, **TINY)
    assert out.read_bytes() == b"a file, not a folder"


def test_default_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit("vae", "moons", epochs=1, n_samples=200, evaluate=False, **TINY)
    assert run.path == Path("runs") / "moons-vae"
    assert (tmp_path / "runs" / "moons-vae" / "checkpoint.pt").is_file()


# --------------------------------------------------------------------------- #
# resume
# --------------------------------------------------------------------------- #

RESUME = dict(max_examples=64, batch_size=32, evaluate=False, **TINY)


def test_resume_matches_a_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()  # an existing but empty folder is accepted
    run_a = fit("vae", "digits", straight, epochs=4, **RESUME)
    fit("vae", "digits", split, epochs=2, **RESUME)
    assert pd.read_csv(split / "metrics.csv")["epoch"].tolist() == [1, 2]
    run_b = fit(out=split, resume=True, epochs=4, progress=False, plots=False, evaluate=False)

    metrics_a = pd.read_csv(straight / "metrics.csv")
    metrics_b = pd.read_csv(split / "metrics.csv")
    assert metrics_b["epoch"].tolist() == [1, 2, 3, 4]
    # bit-for-bit on the CPU: same shuffles, same dynamic binarization, same particles
    np.testing.assert_array_equal(metrics_a["train_elbo"].to_numpy(), metrics_b["train_elbo"].to_numpy())
    np.testing.assert_array_equal(metrics_a["val_elbo"].to_numpy(), metrics_b["val_elbo"].to_numpy())
    np.testing.assert_array_equal(run_a.metrics["val_elbo"].to_numpy(), run_b.metrics["val_elbo"].to_numpy())

    last_a, last_b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert last_a["epoch"] == last_b["epoch"] == 4
    _assert_state_equal(last_a["model"], last_b["model"])
    for pa, pb in zip(last_a["optimizer"]["state"].values(), last_b["optimizer"]["state"].values()):
        _assert_state_equal(pa, pb)
    best_a, best_b = load_checkpoint(straight / "best.pt"), load_checkpoint(split / "best.pt")
    assert best_a["epoch"] == best_b["epoch"]
    _assert_state_equal(best_a["model"], best_b["model"])
    _assert_state_equal(run_a.model.state_dict(), run_b.model.state_dict())
    assert read_config(split).epochs == 4


def test_resume_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs the run directory"):
        fit(resume=True)
    with pytest.raises(ConfigError, match="not a run directory"):
        fit(out=tmp_path / "nothing", resume=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(RunConfig(epochs=1).to_dict()))
    with pytest.raises(ConfigError, match="cannot change lr"):
        fit(out=out, resume=True, lr=0.1)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_run_without_a_checkpoint_is_resumed_from_epoch_1_or_started_again(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(RunConfig.from_dict({"epochs": 1, "max_examples": 64, "hidden": [8], "z_dim": 2}).to_dict()))
    (out / ".metrics.csv.abc123.tmp").write_text("half a file")  # an interrupted write
    run = fit(out=out, resume=True, progress=False, evaluate=False, plots=False)
    assert run.metrics["epoch"].tolist() == [1]
    assert not (out / ".metrics.csv.abc123.tmp").exists()
    again = tmp_path / "again"
    again.mkdir()
    (again / "config.json").write_text("{}")  # what a killed first epoch leaves
    run = fit("vae", "digits", again, epochs=2, max_examples=64, hidden=[8], z_dim=2, progress=False,
              evaluate=False, plots=False)
    assert run.metrics["epoch"].tolist() == [1, 2] and json.loads((again / "config.json").read_text())["epochs"] == 2
    with pytest.raises(ConfigError, match="already exists; use --resume"):
        fit("vae", "digits", again, epochs=1, max_examples=64, progress=False)


# --------------------------------------------------------------------------- #
# objectives
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("elbo, particles", [("trace", 1), ("meanfield", 1), ("iwae", 3)])
def test_each_objective_improves_the_bound(tmp_path, elbo, particles):
    run = fit("vae", "digits", tmp_path / elbo, epochs=3, elbo=elbo, particles=particles, lr=1e-2, batch_size=32,
              max_examples=128, evaluate=False, **{k: v for k, v in TINY.items()})
    m = run.metrics
    assert len(m) == 3 and np.isfinite(m[["train_elbo", "val_elbo"]].to_numpy()).all()
    assert m["val_elbo"].iloc[-1] > m["val_elbo"].iloc[0] + 2.0
    assert m["train_elbo"].iloc[-1] > m["train_elbo"].iloc[0] + 2.0
    assert read_config(run.path).elbo == elbo and read_config(run.path).particles == particles


# --------------------------------------------------------------------------- #
# the NaN guard
# --------------------------------------------------------------------------- #


class PoisonableVAE(VAE):
    """A VAE whose likelihood turns NaN once ``poison`` is set."""

    poison = False

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            logits = self.decoder(z)
            if self.poison:
                logits = logits * float("nan")
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_loss_stops_training_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_validation = train_module.validation_elbo
    real_save = train_module.save_checkpoint
    epochs_seen, snapshots, saved = [], {}, {}

    def validation(model, dataset, *args, **kwargs):
        value = real_validation(model, dataset, *args, **kwargs)
        epochs_seen.append(value)
        snapshots[len(epochs_seen)] = copy.deepcopy(model.module.state_dict())
        if len(epochs_seen) == 2:
            model.module.poison = True  # the first step of epoch 3 gives a NaN loss
        return value

    def save(path, payload):
        real_save(path, payload)
        saved[Path(path).name] = Path(path).read_bytes()

    monkeypatch.setattr(train_module, "validation_elbo", validation)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    with pytest.raises(TrainingDiverged) as info:
        fit(PoisonableVAE, "digits", out, epochs=5, max_examples=64, batch_size=32, **TINY)
    message = str(info.value)
    assert "\n" not in message
    assert "at epoch 3, step 1" in message
    assert "last good checkpoint (epoch 2) is kept" in message and str(out) in message
    assert len(epochs_seen) == 2

    # checkpoint.pt is the one written after epoch 2, byte for byte, and loads
    assert (out / "checkpoint.pt").read_bytes() == saved["checkpoint.pt"]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2
    _assert_state_equal(state["model"], snapshots[2])
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert not (out / "evaluation").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    # the kept checkpoint resumes (a fresh model is not poisoned)
    monkeypatch.undo()
    run = fit(PoisonableVAE, out=out, resume=True, epochs=3, progress=False, plots=False, evaluate=False)
    assert run.metrics["epoch"].tolist() == [1, 2, 3]


def test_huge_learning_rate_diverges(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        fit("vae", "digits", out, epochs=4, optimizer="sgd", lr=1e8, max_examples=64, **TINY)
    message = str(info.value)
    assert "\n" not in message
    found = re.search(r"at epoch (\d+)", message)
    assert found, message
    epoch = int(found.group(1))
    if epoch == 1:
        assert "no epoch had completed" in message
    else:
        assert f"last good checkpoint (epoch {epoch - 1}) is kept" in message
        state = load_checkpoint(out / "checkpoint.pt")
        assert state["epoch"] == epoch - 1
        assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == list(range(1, epoch))
        assert np.isfinite(pd.read_csv(out / "metrics.csv")["val_elbo"]).all()
    assert not (out / "evaluation").exists()


# --------------------------------------------------------------------------- #
# early stopping (validation values scripted, so the schedule is deterministic)
# --------------------------------------------------------------------------- #


def _scripted_validation(monkeypatch, values):
    values = iter(values)
    monkeypatch.setattr(train_module, "validation_elbo", lambda *args, **kwargs: next(values))


DECREASING = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]


@pytest.mark.parametrize(
    "patience, epochs, values, rows, best_epoch, stopped",
    [
        (1, 4, DECREASING, 2, 1, True),
        (2, 4, DECREASING, 3, 1, True),
        (2, 6, [-5.0, -3.0, -4.0, -2.0, -6.0, -7.0], 6, 4, True),  # the improvement at epoch 4 resets the count
        (2, 4, [-5.0, -6.0, -4.0, -7.0], 4, 3, False),
        (0, 3, DECREASING, 3, 1, False),  # 0 never stops early
        (None, 3, DECREASING, 3, 1, False),
    ],
)
def test_early_stopping(tmp_path, monkeypatch, patience, epochs, values, rows, best_epoch, stopped):
    _scripted_validation(monkeypatch, values)
    out = tmp_path / "run"
    run = fit("vae", "digits", out, epochs=epochs, patience=patience, max_examples=32, evaluate=False, **TINY)
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["epoch"].tolist() == list(range(1, rows + 1))
    assert metrics["val_elbo"].tolist() == values[:rows]
    assert run.epoch == best_epoch == load_checkpoint(out / "best.pt")["epoch"]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == rows
    assert state["stopped_early"] is stopped
    assert state["best_val"] == max(values[:rows])


def test_resuming_an_early_stopped_run_trains_no_more(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [-1.0, -2.0, -3.0, -4.0])
    out = tmp_path / "run"
    fit("vae", "digits", out, epochs=6, patience=1, max_examples=32, evaluate=False, **TINY)
    before = (out / "checkpoint.pt").read_bytes()
    run = fit(out=out, resume=True, epochs=8, progress=False, plots=False, evaluate=False)
    assert run.metrics["epoch"].tolist() == [1, 2]
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_with_raised_patience_continues_an_early_stopped_run(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, DECREASING)
    out = tmp_path / "run"
    fit("vae", "digits", out, epochs=6, patience=1, max_examples=32, evaluate=False, **TINY)
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]
    # bad_epochs is 1 of a new patience of 3: two more epochs without improvement are allowed
    run = fit(out=out, resume=True, patience=3, progress=False, plots=False, evaluate=False)
    assert run.metrics["epoch"].tolist() == [1, 2, 3, 4]


# --------------------------------------------------------------------------- #
# Trainer.step: the guard against a non-finite loss, and clearing the gradients
# --------------------------------------------------------------------------- #


class _Scalar(torch.nn.Module):
    """A program with one parameter whose loss is ``factor * w.sum()`` (``factor`` set by the test)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def model(self, x, y=None):
        pass

    guide = model


class _Objective:
    def __init__(self, program):
        self.program, self.factor = program, 1.0

    def loss(self, model, guide, x, y=None):
        return self.factor * self.program.w.sum()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("factor, skipped", [(1.0, 0.0), (float("inf"), 1.0), (float("-inf"), 1.0),
                                             (float("nan"), 1.0)])
def test_a_step_with_a_non_finite_loss_changes_no_parameter(fused, factor, skipped):
    program = _Scalar()
    objective = _Objective(program)
    trainer = train_module.Trainer(program, objective, torch.optim.Adam(program.parameters(), lr=0.1, fused=fused))
    objective.factor = factor
    loss = trainer.step(torch.zeros(2, 1))
    assert float(trainer.skipped) == skipped
    assert torch.equal(loss, torch.tensor(factor * 3.0)) or (loss.isnan() and np.isnan(factor))
    moved = not torch.equal(program.w.detach(), torch.ones(3))
    assert moved == (skipped == 0.0)
    objective.factor = 1.0  # the next finite step moves the parameter, from fresh gradients
    trainer.step(torch.zeros(2, 1))
    assert float(trainer.skipped) == 0.0 and not torch.equal(program.w.detach(), torch.ones(3))


def test_each_step_starts_from_cleared_gradients_and_an_optimizers_own_zero_grad_is_called():
    program = _Scalar()
    objective = _Objective(program)
    sgd = torch.optim.SGD(program.parameters(), lr=1.0)
    trainer = train_module.Trainer(program, objective, sgd)
    for _ in range(2):  # the gradient of w.sum() / 2 is 1/2 each step, not accumulated
        trainer.step(torch.zeros(2, 1))
        assert torch.equal(program.w.grad, torch.full((3,), 0.5))
    assert torch.equal(program.w.detach(), torch.zeros(3))

    calls = []

    class Counting(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    trainer = train_module.Trainer(program, objective, Counting(program.parameters(), lr=1.0))
    trainer.step(torch.zeros(2, 1))
    assert calls == [True] and torch.equal(program.w.grad, torch.full((3,), 0.5))
