"""Tests for ppl_genmodels.runs: loading runs, model resolution (registry, files, classes), build errors."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_genmodels import ConfigError, TraceError, fit, load_run
from ppl_genmodels.models import CVAE, REGISTRY, VAE
from ppl_genmodels.runs import load_checkpoint

TINY = dict(hidden=[32], z_dim=2, eval_k=10, progress=False, plots=False)

USER_MODEL = '''
"""A small user model following the contract, for tests."""
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn


class TinyVAE(PyroModule):
    def __init__(self, x_dim, z_dim, hidden=(16,)):
        super().__init__()
        width = hidden[0]
        self.z_dim = z_dim
        self.hidden = tuple(hidden)
        self.enc = nn.Sequential(nn.Linear(x_dim, width), nn.Tanh(), nn.Linear(width, 2 * z_dim))
        self.dec = nn.Sequential(nn.Linear(z_dim, width), nn.Tanh(), nn.Linear(width, x_dim))
        self.log_scale = nn.Parameter(torch.zeros(x_dim))

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), self.log_scale.exp()).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


class NoGuide(PyroModule):
    def __init__(self, x_dim, z_dim):
        super().__init__()

    def model(self, x, y=None):
        pass


class NoXDim(TinyVAE):
    def __init__(self, z_dim, n_inputs=2):
        super().__init__(n_inputs, z_dim)


class Picky(TinyVAE):
    def __init__(self, x_dim, z_dim, hidden=(16,)):
        raise ValueError("hidden must have one layer")


class Lookup(TinyVAE):
    def __init__(self, x_dim, z_dim, hidden=(16,)):
        {}["missing"]


class NeedsWidth(TinyVAE):
    def __init__(self, x_dim, z_dim, width):
        super().__init__(x_dim, z_dim, (width,))


class NoY(TinyVAE):
    def model(self, x):
        super().model(x)

    def guide(self, x):
        super().guide(x)
'''


def _write_user_model(folder: Path, name: str = "user_models.py", text: str = USER_MODEL) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def _forget_user_modules(monkeypatch):
    """Drop cached imports of user model files, so the next load reads the file again."""
    for name in [n for n in sys.modules if n.startswith("ppl_genmodels_user_")]:
        monkeypatch.delitem(sys.modules, name)


def _assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def _assert_split_equal(a, b):
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.index, b.index)
    assert (a.y is None) == (b.y is None) and (a.y is None or torch.equal(a.y, b.y))
    assert (a.labels is None) == (b.labels is None) and (a.labels is None or torch.equal(a.labels, b.labels))


# --------------------------------------------------------------------------- #
# load_run on a trained run
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits-cvae"
    return fit("cvae", "digits", out, condition="label", epochs=3, seed=3, val_fraction=0.2, max_examples=64,
               batch_size=32, evaluate=False, **TINY)


def test_load_run_restores_best_weights_config_data_and_metrics(cvae_run):
    run = load_run(cvae_run.path)
    assert isinstance(run.model, CVAE)
    assert run.config == cvae_run.config
    best = load_checkpoint(cvae_run.path / "best.pt")
    _assert_state_equal(run.model.state_dict(), best["model"])
    _assert_state_equal(run.model.state_dict(), cvae_run.model.state_dict())
    assert run.epoch == best["epoch"] == cvae_run.epoch
    for split in ("train", "val", "test"):
        _assert_split_equal(getattr(run.data, split), getattr(cvae_run.data, split))
    assert run.data.y_dim == 10 and run.data.condition == "label"
    pd.testing.assert_frame_equal(run.metrics, pd.read_csv(cvae_run.path / "metrics.csv"))
    assert run.metrics["epoch"].tolist() == [1, 2, 3]
    assert run.device == torch.device("cpu")


def test_load_run_last(cvae_run):
    run = load_run(cvae_run.path, which="last")
    last = load_checkpoint(cvae_run.path / "checkpoint.pt")
    _assert_state_equal(run.model.state_dict(), last["model"])
    assert run.epoch == 3


def test_load_run_falls_back_to_last_without_best(cvae_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cvae_run.path, copy)
    (copy / "best.pt").unlink()
    run = load_run(copy)
    _assert_state_equal(run.model.state_dict(), load_checkpoint(copy / "checkpoint.pt")["model"])
    assert run.epoch == 3


def test_load_run_with_model_class_override(cvae_run):
    run = load_run(cvae_run.path, model_class=CVAE)
    _assert_state_equal(run.model.state_dict(), cvae_run.model.state_dict())


def test_load_run_errors(cvae_run, tmp_path):
    with pytest.raises(ConfigError, match="which must be"):
        load_run(cvae_run.path, which="first")
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_run(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_run(cvae_run.path, device="cuda")


# --------------------------------------------------------------------------- #
# a user model from a file
# --------------------------------------------------------------------------- #


def test_user_model_file_trains_and_reloads(tmp_path, monkeypatch):
    path = _write_user_model(tmp_path)
    spec = f"{path}:TinyVAE"
    out = tmp_path / "run"
    run = fit(spec, "moons", out, epochs=2, n_samples=200, hidden=[16], z_dim=2, eval_k=5, progress=False, plots=False)
    assert type(run.model).__name__ == "TinyVAE" and run.model.hidden == (16,)
    assert run.config.model == spec
    assert pd.read_csv(out / "evaluation" / "fit" / "summary.csv")["estimator"].tolist() == ["elbo", "iwae5"]

    _forget_user_modules(monkeypatch)  # load_run imports the file afresh
    loaded = load_run(out)
    assert type(loaded.model).__name__ == "TinyVAE"
    assert type(loaded.model) is not type(run.model)
    _assert_state_equal(loaded.model.state_dict(), load_checkpoint(out / "best.pt")["model"])
    _assert_state_equal(loaded.model.state_dict(), run.model.state_dict())
    _assert_split_equal(loaded.data.test, run.data.test)


def test_run_with_relative_model_path_loads_from_another_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    _write_user_model(project)
    monkeypatch.chdir(project)
    fit("user_models.py:TinyVAE", "moons", project / "run", epochs=1, n_samples=100, hidden=[16], z_dim=2,
        evaluate=False, progress=False, plots=False)
    _forget_user_modules(monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = load_run(project / "run")
    assert type(run.model).__name__ == "TinyVAE"


def test_run_with_relative_data_path_loads_from_another_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    rng = np.random.default_rng(0)
    np.save(project / "points.npy", rng.normal(size=(60, 2)).astype(np.float32))
    monkeypatch.chdir(project)
    fit("vae", "points.npy", project / "run", epochs=1, hidden=[8], z_dim=2, evaluate=False, progress=False, plots=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = load_run(project / "run")
    assert len(run.data.train) + len(run.data.val) + len(run.data.test) == 60


# --------------------------------------------------------------------------- #
# errors in naming or building a model: one-line ConfigError, nothing written
# --------------------------------------------------------------------------- #


def _config_error(tmp_path, model, data="moons", **options):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        fit(model, data, out, epochs=1, n_samples=100 if data == "moons" else None, **{**TINY, **options})
    assert not out.exists()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_model_name(tmp_path):
    message = _config_error(tmp_path, "transformer")
    assert "unknown model 'transformer'" in message
    assert all(name in message for name in REGISTRY)


def test_model_file_missing(tmp_path):
    message = _config_error(tmp_path, f"{tmp_path}/absent.py:TinyVAE")
    assert "does not exist" in message and "absent.py" in message


def test_model_class_missing(tmp_path):
    path = _write_user_model(tmp_path)
    assert "no class 'Absent'" in _config_error(tmp_path, f"{path}:Absent")


def test_model_class_without_guide(tmp_path):
    path = _write_user_model(tmp_path)
    assert "has no guide(x) method" in _config_error(tmp_path, f"{path}:NoGuide")


def test_model_file_that_fails_to_import(tmp_path):
    path = _write_user_model(tmp_path, "broken.py", "import pyro\ndef oops(:\n")
    assert "failed to import" in _config_error(tmp_path, f"{path}:TinyVAE")
    assert not [n for n in sys.modules if n.startswith("ppl_genmodels_user_") and "broken" in str(sys.modules[n])]


def test_model_arg_not_accepted(tmp_path):
    path = _write_user_model(tmp_path)
    message = _config_error(tmp_path, f"{path}:TinyVAE", model_args={"depth": 3})
    assert "no constructor argument 'depth'" in message


def test_an_option_the_constructor_does_not_name_is_refused(tmp_path):
    path = _write_user_model(tmp_path)
    message = _config_error(tmp_path, f"{path}:NoXDim")  # TINY sets hidden, which NoXDim does not take
    assert "model NoXDim has no constructor argument 'hidden' (from --hidden); its arguments are z_dim, n_inputs" \
        in message


def test_a_required_argument_the_toolkit_cannot_supply(tmp_path):
    path = _write_user_model(tmp_path)
    message = _config_error(tmp_path, f"{path}:NeedsWidth", hidden=None)
    assert "needs the constructor argument 'width'; give it with --model-arg width=VALUE" in message


def test_constructor_that_raises(tmp_path):
    path = _write_user_model(tmp_path)
    assert "cannot build model Picky: ValueError: hidden must have one layer" in _config_error(tmp_path, f"{path}:Picky")
    assert "cannot build model Lookup: KeyError: 'missing'" in _config_error(tmp_path, f"{path}:Lookup")


def test_conditioned_data_needs_a_conditioning_argument(tmp_path):
    path = _write_user_model(tmp_path)
    message = _config_error(tmp_path, f"{path}:NoY", data="digits", condition="label", max_examples=16)
    assert "data is conditioned (label) but NoY.model takes no conditioning argument" in message


# --------------------------------------------------------------------------- #
# contract violations: TraceError before anything is written
# --------------------------------------------------------------------------- #


class GlobalSiteVAE(VAE):
    """Breaks the contract: a sample site outside the data plate."""

    def model(self, x, y=None):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))  # [] or [particles, 1]
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim) + shift.unsqueeze(-1), 1.0).to_event(1))
            pyro.sample("x", self.decode(z), obs=x)

    def guide(self, x, y=None):
        pyro.sample("shift", dist.Normal(0.0, 1.0))
        super().guide(x, y)


class UnguidedLatentVAE(VAE):
    """Breaks the contract: a latent the guide does not sample."""

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("extra", dist.Normal(x.new_zeros(()), 1.0))
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", self.decode(z), obs=x)


class ShapeBugVAE(VAE):
    """Crashes on the data: the decoder gets the wrong width."""

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", self.decode(torch.cat([z, z], -1)), obs=x)


@pytest.mark.parametrize(
    "cls, match",
    [
        (GlobalSiteVAE, "'shift' is outside pyro.plate('data')"),
        (UnguidedLatentVAE, "'extra' of the model is not sampled by the guide"),
        (ShapeBugVAE, "model ShapeBugVAE failed on the data"),
    ],
)
def test_contract_violations_raise_trace_error_before_writing(tmp_path, cls, match):
    out = tmp_path / "run"
    with pytest.raises(TraceError) as info:
        fit(cls, "digits", out, epochs=1, max_examples=16, **TINY)
    assert match in str(info.value)
    assert "\n" not in str(info.value)
    assert not out.exists()
