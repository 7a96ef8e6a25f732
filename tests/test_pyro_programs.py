"""Pyro programs as Pyro users write them go in unchanged.

The programs under ``tests/pyro_programs/`` are written in the shapes of Pyro's
own examples (the VAE tutorial; the CVAE example with a pre-trained baseline,
``model(xs, ys=None)`` whose second argument is the data; an SVI-tutorial model
with ``pyro.param`` only). The tests run them, unchanged, through ``fit``,
``evaluate``, ``bdmc`` and ``compare``, and check the calling conventions, the
constructor rules, the param store and the contract errors one by one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from conftest import pyro_program as _module
from ppl_genmodels import ConfigError, compare_run, evaluate_run, fit, load_run
from ppl_genmodels.config import RunConfig, build_model
from ppl_genmodels.evaluation import bdmc_run
from ppl_genmodels.programs import Program, convention
from ppl_genmodels.runs import load_checkpoint
from ppl_genmodels.traces import TraceError

PROGRAMS = Path(__file__).parent / "pyro_programs"
QUIET = dict(progress=False, plots=False)



@pytest.fixture(scope="module")
def digits784(tmp_path_factory) -> Path:
    """200 binary 28x28 images (sklearn's digits, enlarged 3x and padded): the tutorial's 784 pixels."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:200]
    big = np.pad(np.kron(images, np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))
    path = tmp_path_factory.mktemp("data") / "digits784.npy"
    np.save(path, (big.reshape(len(images), 784) > 8).astype(np.float32))
    return path


# --------------------------------------------------------------------------- #
# Pyro's tutorial VAE: model(x), guide(x), pyro.module, class defaults
# --------------------------------------------------------------------------- #


def test_tutorial_vae_keeps_its_own_defaults_and_config_records_them(digits784):
    config = RunConfig(model=f"{PROGRAMS / 'tutorial_vae.py'}:VAE", data=str(digits784))
    program = build_model(config, config.load_data())
    assert program.module.z_dim == 50 and program.module.encoder.fc1.out_features == 400
    assert (config.z_dim, config.model_args) == (50, {"hidden_dim": 400, "use_cuda": False})
    assert config.hidden is None  # the class names no `hidden`: nothing is invented for it


def test_tutorial_vae_refuses_an_option_it_does_not_name(digits784):
    config = RunConfig(model=f"{PROGRAMS / 'tutorial_vae.py'}:VAE", data=str(digits784), hidden=[32])
    with pytest.raises(ConfigError, match=r"no constructor argument 'hidden' \(from --hidden\); its arguments "
                                          r"are z_dim, hidden_dim, use_cuda"):
        build_model(config, config.load_data())


@pytest.fixture(scope="module")
def tutorial_run(digits784, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tutorial") / "run"
    command = [sys.executable, "-m", "ppl_genmodels", "fit", "--model", f"{PROGRAMS / 'tutorial_vae.py'}:VAE",
               "--data", str(digits784), "--epochs", "2", "--z-dim", "4", "--model-arg", "hidden_dim=32",
               "--eval-k", "20", "--out", str(out), "--quiet", "--no-plots"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ppl_genmodels", *map(str, args)], capture_output=True, text=True)


def test_tutorial_vae_trains_from_the_command_line(tutorial_run):
    config = json.loads((tutorial_run / "config.json").read_text())
    assert (config["z_dim"], config["model_args"]) == (4, {"hidden_dim": 32, "use_cuda": False})
    metrics = pd.read_csv(tutorial_run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2] and np.isfinite(metrics["val_elbo"]).all()
    run = load_run(tutorial_run)
    assert type(run.model).__name__ == "VAE" and run.model.decoder.fc21.out_features == 784
    state = load_checkpoint(tutorial_run / "best.pt")
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in state["model"].items())


def test_tutorial_vae_through_evaluate_bdmc_and_compare(tutorial_run):
    done = _cli("evaluate", tutorial_run, "--estimators", "elbo,iwae:50,ais:10", "--count", "4", "--chains", "2",
                "--quiet")
    assert done.returncode == 0, done.stderr
    per = pd.read_csv(tutorial_run / "evaluation" / "test-n4-elbo-iwae50-ais10" / "per_datapoint.csv")
    assert len(per) == 4 and (per["elbo"] <= per["iwae50"] + 1e-4).all()
    done = _cli("bdmc", tutorial_run, "--count", "3", "--steps", "10", "--chains", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    bounds = pd.read_csv(tutorial_run / "bdmc" / "n3-steps10-chains2" / "per_datapoint.csv")
    assert len(bounds) == 3 and np.isfinite(bounds[["lower", "upper"]].to_numpy()).all()
    done = _cli("compare", tutorial_run, "--count", "2", "--chains", "2", "--samples", "10", "--warmup", "10",
                "--local-steps", "3", "--logp-k", "20", "--quiet")
    assert done.returncode == 0, done.stderr
    gaps = pd.read_csv(tutorial_run / "compare" / "test-n2-hmc-c2-s10-w10" / "per_datapoint.csv")
    assert len(gaps) == 2 and (tutorial_run / "compare" / "test-n2-hmc-c2-s10-w10" / "posterior.nc").is_file()


@pytest.mark.slow
def test_tutorial_vae_fitted_compiled_runs_its_hmc_and_ais_transitions_as_one_graph_each(digits784, tmp_path):
    """``fit --compile on``: the run's later commands compile too, the HMC and AIS transitions each as one graph
    (the leapfrog loop inside it), reported apart, with no fallback warning."""
    out = tmp_path / "run"
    done = _cli("fit", "--model", f"{PROGRAMS / 'tutorial_vae.py'}:VAE", "--data", digits784, "--epochs", "1",
                "--z-dim", "4", "--model-arg", "hidden_dim=32", "--eval-k", "10", "--compile", "on", "--out", out,
                "--quiet", "--no-plots")
    assert done.returncode == 0, done.stderr
    done = _cli("bdmc", out, "--count", "3", "--steps", "6", "--chains", "2", "--quiet")
    assert done.returncode == 0 and "compiled path is off" not in done.stderr, done.stderr
    assert "AIS transition: 1 graph(s)" in done.stdout
    done = _cli("compare", out, "--count", "2", "--chains", "2", "--samples", "8", "--warmup", "8",
                "--local-steps", "3", "--logp-k", "20", "--quiet")
    assert done.returncode == 0 and "compiled path is off" not in done.stderr, done.stderr
    assert "HMC transition: 1 graph(s)" in done.stdout
    assert (out / "compare" / "test-n2-hmc-c2-s8-w8" / "posterior.nc").is_file()


# --------------------------------------------------------------------------- #
# Pyro's CVAE example shape: an instance around a pre-trained module, data in `ys`
# --------------------------------------------------------------------------- #


def _cvae(seed: int = 0):
    module = _module("structured_cvae")
    torch.manual_seed(seed)
    return module.CVAE(4, 32, 32, module.Baseline(16, 48, 16)), module


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    model, module = _cvae()
    out = tmp_path_factory.mktemp("cvae") / "run"
    run = fit(model, "digits", out, epochs=2, condition="quadrants", data_arg="ys", max_examples=200, eval_k=10,
              **QUIET)
    return out, run, module


def test_cvae_instance_trains_with_the_data_in_its_second_argument(cvae_run):
    out, run, _ = cvae_run
    config = json.loads((out / "config.json").read_text())
    assert config["model_instance"] is True and config["data_arg"] == "ys"
    assert config["model"].endswith("structured_cvae.py:CVAE")
    assert run.program.conventions["model"].data == "ys" and run.program.conventions["model"].condition == "xs"
    assert np.isfinite(pd.read_csv(out / "metrics.csv")["val_elbo"]).all()


def test_cvae_run_needs_its_instance_again_to_load(cvae_run):
    out, run, module = cvae_run
    with pytest.raises(ConfigError, match="trained on a model instance; pass it"):
        load_run(out)
    fresh, _ = _cvae(seed=1)
    loaded = load_run(out, model=fresh)
    assert loaded.model is fresh
    trained = run.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


def test_cvae_instance_through_evaluate_bdmc_and_compare(cvae_run):
    out, _, module = cvae_run
    fresh, _ = _cvae(seed=2)
    run = load_run(out, model=fresh)
    summary, per = evaluate_run(run, estimators="elbo,iwae:20,ais:10", n=4, chains=2, progress=False)
    assert (per["elbo"] <= per["iwae20"] + 1e-4).all() and np.isfinite(per["ais10"]).all()
    summary, per = bdmc_run(run, n=3, num_steps=10, chains=2, progress=False)
    assert np.isfinite(per[["lower", "upper"]].to_numpy()).all()
    result = compare_run(run, n=2, chains=2, samples=10, warmup=10, local_steps=3, logp_k=20, progress=False,
                         plots=False)
    assert result is not None and (out / "compare" / "test-n2-hmc-c2-s10-w10" / "per_datapoint.csv").is_file()


# --------------------------------------------------------------------------- #
# pyro.param only: trained, saved, restored, and kept apart from the global store
# --------------------------------------------------------------------------- #


def test_param_store_model_trains_saves_and_restores(tmp_path):
    spec = f"{PROGRAMS / 'param_store_model.py'}:LinearGaussian"
    pyro.clear_param_store()
    pyro.param("weight", torch.full((1, 2), 99.0))  # a user's own global value with the same name
    run = fit(spec, "moons", tmp_path / "run", epochs=3, n_samples=200, lr=0.05, eval_k=10, **QUIET)
    store = load_checkpoint(tmp_path / "run" / "best.pt")
    assert set(store["param_store"]) == {"weight", "noise", "encoder", "q_scale"}
    assert not torch.equal(store["param_store"]["weight"], torch.full((1, 2), 0.1))  # it trained
    assert not torch.equal(store["param_store"]["weight"], torch.full((1, 2), 99.0))  # from its own init
    assert torch.equal(pyro.param("weight").detach(), torch.full((1, 2), 99.0))  # the user's store is untouched
    assert set(pyro.get_param_store().keys()) == {"weight"}
    loaded = load_run(tmp_path / "run")
    for name, value in store["param_store"].items():
        key = loaded.program._keys[name]
        assert torch.equal(loaded.program.pyro_params[key].detach(), value)
    summary, per = evaluate_run(loaded, estimators="elbo,iwae:20", n=5, progress=False, save=False)
    assert (per["elbo"] <= per["iwae20"] + 1e-4).all()


def test_two_param_store_programs_in_one_process_do_not_share_values():
    module = _module("param_store_model")
    a, b = Program(module.LinearGaussian(2)), Program(module.LinearGaussian(2))
    x = torch.randn(5, 2)
    a.check(x), b.check(x)
    with torch.no_grad():
        a.pyro_params[a._keys["weight"]].fill_(3.0)
    trace = pyro.poutine.trace(b.model).get_trace(x)
    assert torch.equal(b.pyro_params[b._keys["weight"]].detach(), torch.full((1, 2), 0.1))
    assert torch.allclose(trace.nodes["obs"]["fn"].base_dist.loc, trace.nodes["z"]["value"] @ torch.full((1, 2), 0.1))


# --------------------------------------------------------------------------- #
# calling conventions
# --------------------------------------------------------------------------- #


class _Shapes:
    def data_only(self, x):
        return ("x", x)

    def keyword_condition(self, x, *, context=None):
        return ("x", x, "context", context)

    def data_second(self, xs, ys=None):
        return ("xs", xs, "ys", ys)

    def positional_only(self, x, y=None, /):
        return ("x", x, "y", y)

    def extra_required(self, x, y, scale):
        return None


@pytest.mark.parametrize("method, data_arg, expected", [
    ("data_only", None, ("x", "X")),
    ("keyword_condition", None, ("x", "X", "context", "Y")),
    ("data_second", "ys", ("xs", "Y", "ys", "X")),
    ("positional_only", None, ("x", "X", "y", "Y")),
])
def test_conventions_pass_the_data_and_the_conditioning_where_the_program_takes_them(method, data_arg, expected):
    fn = getattr(_Shapes(), method)
    assert convention(fn, method, data_arg).call(fn, "X", "Y") == expected


def test_conventions_refuse_what_cannot_be_supplied():
    shapes = _Shapes()
    with pytest.raises(TraceError, match="requires the argument 'scale'"):
        convention(shapes.extra_required, "model")
    with pytest.raises(TraceError, match=r"no argument 'data' to receive the data \(from --data-arg\)"):
        convention(shapes.data_second, "model", "data")


# --------------------------------------------------------------------------- #
# contract errors: one line, the site's name, what to change
# --------------------------------------------------------------------------- #


class _NoPlate(torch.nn.Module):
    def model(self, x):
        z = pyro.sample("code", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("obs", dist.Normal(z.sum(-1, keepdim=True).expand_as(x), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.sample("code", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))


class _OtherPlate(_NoPlate):
    def model(self, x):
        with pyro.plate("batch", x.shape[0]):
            super().model(x)

    def guide(self, x):
        with pyro.plate("batch", x.shape[0]):
            super().guide(x)


class _GuideMissesASite(torch.nn.Module):
    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("code", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z.sum(-1, keepdim=True).expand_as(x), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass


@pytest.mark.parametrize("program, message", [
    (_NoPlate(), "sample site 'code' is outside pyro.plate('data'): put it inside `with pyro.plate('data', "
                 "x.shape[0]):`"),
    (_OtherPlate(), "sample site 'code' is in pyro.plate('batch') but outside pyro.plate('data'): rename the plate"),
    (_GuideMissesASite(), "latent site 'code' of the model is not sampled by the guide: add pyro.sample('code', "
                          "...) to the guide"),
])
def test_contract_errors_name_the_site_and_the_change(program, message):
    with pytest.raises(TraceError) as info:
        Program(program).check(torch.randn(4, 3))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dreg_on_the_tutorial_vae_trains_without_warnings(digits784, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pyro.module's requires_grad warning would fail here
        run = fit(f"{PROGRAMS / 'tutorial_vae.py'}:VAE", str(digits784), tmp_path / "run", epochs=1, elbo="dreg",
                  particles=2, z_dim=2, model_args={"hidden_dim": 16}, evaluate=False, **QUIET)
    assert np.isfinite(run.metrics["val_elbo"]).all()
