"""The files every CLI command writes keep their exact columns: downstream scripts read them by name.

Each table's header is pinned literally, in order, for the smallest runs that
exercise every branch (an unconditional VAE with AIS, a PPCA with its exact
marginal and posterior, a conditional VAE). A renamed, added, dropped or
reordered column fails here.
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = ["epoch", "train_elbo", "val_elbo", "seconds"]
SUMMARY = ["estimator", "mean", "stderr", "n", "seconds"]
BDMC = ["index", "lower", "lower_se", "upper", "upper_se", "gap"]
RESULTS = ["name", "kind", "path", "created", "seconds", "options"]
COMPARE_SUMMARY = ["method", "quantity", "mean", "stderr", "gap_to_log_px", "amortization_gap",
                   "vs_mcmc_mean_sd", "vs_mcmc_sd_ratio", "vs_mcmc_energy",
                   "vs_exact_mean_sd", "vs_exact_sd_ratio", "vs_exact_energy",
                   "max_rhat", "min_ess_bulk", "min_ess_tail", "divergences", "not_converged", "n", "seconds"]
COMPARE_PER = ["index", "log_px", "log_px_se", "log_px_source", "elbo_local", "elbo_local_se",
               "elbo_amortized", "elbo_amortized_se", "approximation_gap", "amortization_gap",
               "rhat", "ess_bulk", "ess_tail", "accept_rate", "divergences",
               "guide_vs_mcmc_mean_sd", "guide_vs_mcmc_sd_ratio", "guide_vs_mcmc_energy",
               "local_vs_mcmc_mean_sd", "local_vs_mcmc_sd_ratio", "local_vs_mcmc_energy"]
COMPARE_PER_EXACT = COMPARE_PER + ["guide_vs_exact_mean_sd", "guide_vs_exact_sd_ratio", "guide_vs_exact_energy",
                                   "local_vs_exact_mean_sd", "local_vs_exact_sd_ratio", "local_vs_exact_energy",
                                   "mcmc_vs_exact_mean_sd", "mcmc_vs_exact_sd_ratio", "mcmc_vs_exact_energy"]
CONFIG_KEYS = {"model", "data", "data_dir", "likelihood", "binarize", "condition", "visible_quadrants", "z_dim",
               "hidden", "scale", "model_args", "elbo", "particles", "optimizer", "lr", "batch_size", "epochs",
               "patience", "seed", "device", "eval_k", "val_fraction", "test_fraction", "n_samples", "noise",
               "max_examples", "data_arg", "model_instance", "num_classes", "standardize", "model_sha256", "guide",
               "activation", "beta", "kl_warmup", "data_seed", "precision", "compile", "processes",
               "global_batch_size"}
COMPARE = ["--chains", 2, "--samples", 10, "--warmup", 10, "--local-steps", 2, "--logp-k", 10, "--seed", 0, "--quiet"]


def _columns(path) -> list[str]:
    return list(pd.read_csv(path).columns)


def _ok(argv) -> None:
    code, _, err = run_cli(argv)
    assert code == 0, err


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("columns") / "vae"
    _ok(["fit", "--data", "digits", "--epochs", 1, "--max-examples", 60, "--eval-k", 5, "--out", out, "--quiet"])
    return out


def test_fit_writes_config_metrics_and_evaluation(vae_run):
    assert set(json.loads((vae_run / "config.json").read_text())) == CONFIG_KEYS
    assert _columns(vae_run / "metrics.csv") == METRICS
    assert _columns(vae_run / "evaluation" / "fit" / "summary.csv") == SUMMARY
    assert _columns(vae_run / "evaluation" / "fit" / "per_datapoint.csv") == [
        "index", "elbo", "elbo_se", "iwae5", "iwae5_se", "iwae5_ess"]


def test_evaluate_with_every_estimator_kind(vae_run):
    _ok(["evaluate", vae_run, "--estimators", "elbo:3,iwae:4,ais:2", "--count", 3, "--chains", 2, "--quiet"])
    folder = vae_run / "evaluation" / "test-n3-elbo3-iwae4-ais2"
    assert _columns(folder / "summary.csv") == SUMMARY
    assert _columns(folder / "per_datapoint.csv") == [
        "index", "elbo", "elbo_se", "iwae4", "iwae4_se", "iwae4_ess", "ais2", "ais2_se", "ais2_ess", "ais2_accept"]


def test_bdmc(vae_run):
    _ok(["bdmc", vae_run, "--count", 3, "--steps", 2, "--chains", 2, "--quiet"])
    folder = vae_run / "bdmc" / "n3-steps2-chains2"
    assert _columns(folder / "summary.csv") == SUMMARY
    assert _columns(folder / "per_datapoint.csv") == BDMC
    assert pd.read_csv(folder / "summary.csv")["estimator"].tolist() == ["lower", "upper", "gap"]


def test_compare_without_a_closed_form(vae_run):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged chains: these runs are tiny
        _ok(["compare", vae_run, "--count", 2, *COMPARE])
    folder = vae_run / "compare" / "test-n2-hmc-c2-s10-w10"
    assert _columns(folder / "summary.csv") == COMPARE_SUMMARY
    assert _columns(folder / "per_datapoint.csv") == COMPARE_PER


def test_ppca_adds_the_exact_columns(tmp_path):
    out = tmp_path / "ppca"
    _ok(["fit", "--model", "ppca", "--data", "moons", "--z-dim", 1, "--epochs", 1, "--n-samples", 100,
         "--eval-k", 5, "--out", out, "--quiet", "--no-plots"])
    assert _columns(out / "evaluation" / "fit" / "per_datapoint.csv") == [
        "index", "elbo", "elbo_se", "iwae5", "iwae5_se", "iwae5_ess", "exact", "exact_se"]
    _ok(["evaluate", out, "--k", 3, "--count", 4, "--proposal", "mixture", "--quiet"])
    folder = out / "evaluation" / "test-n4-elbo-iwae3-mixture"
    assert _columns(folder / "per_datapoint.csv") == [
        "index", "elbo", "elbo_se", "iwae3", "iwae3_se", "iwae3_ess", "exact", "exact_se"]
    assert pd.read_csv(folder / "summary.csv")["estimator"].tolist() == ["elbo", "iwae3", "exact"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _ok(["compare", out, "--count", 2, *COMPARE])
    folder = out / "compare" / "test-n2-hmc-c2-s10-w10"
    assert _columns(folder / "summary.csv") == COMPARE_SUMMARY
    assert _columns(folder / "per_datapoint.csv") == COMPARE_PER_EXACT
    assert pd.read_csv(folder / "summary.csv")["method"].tolist() == ["exact", "hmc", "local", "amortized"]
    index = pd.read_csv(out / "results.csv")
    assert list(index.columns) == RESULTS
    assert index["path"].tolist() == ["evaluation/fit", "evaluation/test-n4-elbo-iwae3-mixture",
                                      "compare/test-n2-hmc-c2-s10-w10"]


def test_conditional_run(tmp_path):
    out = tmp_path / "cvae"
    _ok(["fit", "--model", "cvae", "--data", "digits", "--condition", "label", "--epochs", 1, "--max-examples", 60,
         "--eval-k", 4, "--out", out, "--quiet", "--no-plots"])
    assert _columns(out / "metrics.csv") == METRICS
    assert _columns(out / "evaluation" / "fit" / "per_datapoint.csv") == [
        "index", "elbo", "elbo_se", "iwae4", "iwae4_se", "iwae4_ess"]
    _ok(["bdmc", out, "--count", 2, "--steps", 2, "--chains", 2, "--quiet"])
    assert _columns(out / "bdmc" / "n2-steps2-chains2" / "per_datapoint.csv") == BDMC
    assert _columns(out / "results.csv") == RESULTS


SWEEP_HEAD = ["run_dir", "elbo", "particles", "epochs_run", "best_epoch", "train_seconds"]
SWEEP_TAIL = ["log_px", "log_px_se", "log_px_source", "gap", "active_units"]
ACTIVE_UNITS = ["site", "dim", "variance", "active"]


def test_sweep(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('model = "vae"\ndata = "digits"\nepochs = 1\nmax_examples = 60\nhidden = [8]\nz_dim = 2\n'
                    '[grid]\nelbo = ["iwae"]\nparticles = [1, 2]\n[evaluate]\nestimators = "elbo,iwae:5"\nn = 10\n')
    _ok(["sweep", spec, "--out", tmp_path / "sweep", "--quiet"])
    assert _columns(tmp_path / "sweep" / "sweep.csv") == SWEEP_HEAD + [
        "test_elbo", "test_elbo_se", "test_iwae5", "test_iwae5_se"] + SWEEP_TAIL
    cell = tmp_path / "sweep" / "elbo=iwae,particles=2"
    assert _columns(cell / "results.csv") == RESULTS
    assert _columns(cell / "metrics.csv") == METRICS
    assert _columns(cell / "evaluation" / "sweep" / "summary.csv") == SUMMARY
    assert _columns(cell / "evaluation" / "sweep" / "per_datapoint.csv") == [
        "index", "elbo", "elbo_se", "iwae5", "iwae5_se", "iwae5_ess"]
    assert _columns(cell / "evaluation" / "sweep" / "active_units.csv") == ACTIVE_UNITS


def test_a_sweep_of_ppca_adds_the_exact_columns(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": "ppca", "data": "moons", "n_samples": 100, "z_dim": 1, "epochs": 1,
                                "grid": {"elbo": ["trace"], "particles": [1]},
                                "evaluate": {"estimators": "elbo,iwae:3"}}))
    _ok(["sweep", spec, "--out", tmp_path / "sweep", "--quiet"])
    table = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert list(table.columns) == SWEEP_HEAD + ["test_elbo", "test_elbo_se", "test_iwae3", "test_iwae3_se",
                                                "test_exact", "test_exact_se"] + SWEEP_TAIL
    assert table["log_px_source"].tolist() == ["exact"]
