"""evaluate_run with a list of estimators, bdmc_run, and their CLI subcommands, on tiny trained runs."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd

import pytest
import torch

from conftest import run_cli as _main
from conftest import table_rows as _table_rows
from ppl_genmodels import bdmc_run, cli, evaluate_run, fit, traces
from ppl_genmodels.comparison import compare_name
from ppl_genmodels.inference import importance
from ppl_genmodels.evaluation import EstimatorSpec, bdmc_name, evaluation_name, parse_estimators
from ppl_genmodels.runs import load_run


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("evaluate") / "vae"
    return fit("vae", "moons", out, epochs=2, n_samples=200, hidden=[16], z_dim=2, eval_k=10, progress=False,
               plots=False)


@pytest.fixture(scope="module")
def ppca_run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("evaluate") / "ppca"
    return fit("ppca", "moons", out, epochs=30, n_samples=300, z_dim=1, eval_k=10, progress=False, plots=False)


def _files(folder) -> dict:
    """Every entry under ``folder``: a file's bytes and mtime, a folder as ``"dir"``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _assert_error(code, out, err, *words):
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]


class _NoWork:
    """Stands in for traces.log_weights where nothing may be estimated."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("an estimate was started")


# --------------------------------------------------------------------------- #
# the estimator spec
# --------------------------------------------------------------------------- #


def test_parse_estimators_canonical_names_and_defaults():
    specs = parse_estimators("elbo, iwae:5000,ais:1000 ,exact")
    assert [s.name for s in specs] == ["elbo", "iwae5000", "ais1000", "exact"]
    assert specs[0] == EstimatorSpec("elbo", 5000)  # an elbo without K shares the first iwae's particles
    assert [s.name for s in parse_estimators("iwae,ais")] == ["iwae100", "ais1000"]
    assert parse_estimators("elbo")[0].size == 100
    assert parse_estimators("elbo:7,iwae:9")[0].size == 7
    assert [s.name for s in parse_estimators(["iwae20", "AIS50"])] == ["iwae20", "ais50"]


@pytest.mark.parametrize("spec, words", [
    ("", "no estimators"),
    ("foo", "unknown estimator 'foo'"),
    ("elbo,hmc:3", "unknown estimator 'hmc'"),
    ("iwae:x", "expected an integer"),
    ("iwae:2.5", "expected an integer"),
    ("iwae:0", "k must be >= 1"),
    ("ais:-1", "annealing steps must be >= 1"),
    ("exact:3", "exact takes no number"),
    ("elbo,elbo:10", "given twice"),
    ("iwae,iwae:100", "given twice"),
    ("elbo,,iwae", "empty estimator"),
])
def test_parse_estimators_rejects_bad_specs(spec, words):
    with pytest.raises(ValueError, match=words) as info:
        parse_estimators(spec)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- #
# evaluate_run
# --------------------------------------------------------------------------- #


def test_evaluate_with_several_estimators(vae_run, capsys):
    capsys.readouterr()
    torch.manual_seed(1)
    summary, per = evaluate_run(vae_run, estimators="elbo,iwae:30,ais:10", n=12, chains=4, progress=False)
    assert capsys.readouterr() == ("", "")  # estimators print nothing
    assert summary.columns.tolist() == ["estimator", "mean", "stderr", "n", "seconds"]
    assert summary["estimator"].tolist() == ["elbo", "iwae30", "ais10"]  # no exact: a VAE has no closed form
    assert (summary["n"] == 12).all() and (summary["seconds"] > 0).all()
    assert per.columns.tolist() == ["index", "elbo", "elbo_se", "iwae30", "iwae30_se", "iwae30_ess",
                                    "ais10", "ais10_se", "ais10_ess", "ais10_accept"]
    np.testing.assert_array_equal(per["index"].to_numpy(), vae_run.data.test.index[:12].numpy())
    assert np.isfinite(per.drop(columns="index").to_numpy()).all()
    assert (per["iwae30"] >= per["elbo"] - 1e-6).all()  # Jensen on the same particles
    assert ((per["iwae30_ess"] >= 1 - 1e-6) & (per["iwae30_ess"] <= 30 + 1e-6)).all()
    assert ((per["ais10_ess"] >= 1 - 1e-6) & (per["ais10_ess"] <= 4 + 1e-6)).all()
    assert ((per["ais10_accept"] >= 0) & (per["ais10_accept"] <= 1)).all()
    assert (per[["elbo_se", "iwae30_se", "ais10_se"]] >= 0).all().all()
    for name in ("elbo", "iwae30", "ais10"):
        row = summary.set_index("estimator").loc[name]
        assert row["mean"] == pytest.approx(per[name].mean(), rel=1e-12)
        assert row["stderr"] == pytest.approx(per[name].std(ddof=1) / np.sqrt(12), rel=1e-9)
    folder = vae_run.path / "evaluation" / "test-n12-elbo-iwae30-ais10"
    pd.testing.assert_frame_equal(pd.read_csv(folder / "summary.csv"), summary, check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(pd.read_csv(folder / "per_datapoint.csv"), per, check_exact=False, rtol=1e-12)


def test_exact_is_added_for_ppca_and_the_bounds_bracket_it(ppca_run):
    torch.manual_seed(2)
    summary, per = evaluate_run(ppca_run, estimators="elbo,iwae:1000,ais:100", chains=8, progress=False, save=False)
    assert summary["estimator"].tolist() == ["elbo", "iwae1000", "ais100", "exact"]
    assert per.columns[-2:].tolist() == ["exact", "exact_se"] and (per["exact_se"] == 0).all()
    exact = torch.tensor(per["exact"].to_numpy())
    test = ppca_run.data.test
    torch.testing.assert_close(exact, ppca_run.model.exact_log_marginal(test.x.double()).detach(), atol=1e-4, rtol=0)
    assert (per["elbo"] <= per["iwae1000"] + 1e-6).all()
    assert (per["elbo"] <= per["exact"] + 4 * per["elbo_se"] + 1e-4).all()  # a lower bound, up to its noise
    assert ((per["iwae1000"] - per["exact"]).abs() <= 4 * per["iwae1000_se"] + 0.02).all()
    assert abs(summary.set_index("estimator").loc["ais100", "mean"] - per["exact"].mean()) < 0.1


@pytest.mark.parametrize("proposal", ["prior", "mixture"])
def test_other_proposals_estimate_the_same_marginal(ppca_run, proposal):
    torch.manual_seed(3)
    _, per = evaluate_run(ppca_run, estimators="iwae:2000", proposal=proposal, n=10, progress=False, save=False)
    assert per.columns.tolist() == ["index", "iwae2000", "iwae2000_se", "iwae2000_ess", "exact", "exact_se"]
    assert ((per["iwae2000"] - per["exact"]).abs() <= 5 * per["iwae2000_se"] + 0.05).all()


def test_k_is_shorthand_for_elbo_and_iwae(vae_run):
    summary, per = evaluate_run(vae_run, k=7, n=5, progress=False, save=False)
    assert summary["estimator"].tolist() == ["elbo", "iwae7"]
    assert len(per) == 5
    with pytest.raises(ValueError, match="not both"):
        evaluate_run(vae_run, k=7, estimators="iwae:7", save=False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        evaluate_run(vae_run, k=0, save=False)
    summary, _ = evaluate_run(vae_run, n=3, progress=False, save=False)
    assert summary["estimator"].tolist() == ["elbo", "iwae100"]


class _Recorder:
    def __init__(self, monkeypatch):
        self.calls = []  # (particles, datapoints) per pass
        self._real = traces.log_weights
        monkeypatch.setattr(traces, "log_weights", self)

    def __call__(self, model, guide, x, *args, **kwargs):
        self.calls.append((kwargs.get("num_particles", 1), x.shape[0]))
        return self._real(model, guide, x, *args, **kwargs)


def test_particles_are_streamed_in_bounded_passes(vae_run, monkeypatch):
    monkeypatch.setattr(importance, "ROWS_PER_PASS", 60)
    monkeypatch.setattr(importance, "MAX_CHUNK", 20)  # chunks of at most 20 particles, whatever the batch
    rec = _Recorder(monkeypatch)
    _, per = evaluate_run(vae_run, estimators="elbo,iwae:300", n=4, progress=False, save=False)
    # never the [300, batch] tensor: a pass is PAD datapoints (4, padded) at most, 20 particles at a time
    assert max(k * b for k, b in rec.calls) <= max(60, 20 * importance.PAD)
    assert {b for _, b in rec.calls} == {importance.PAD}
    assert sum(k for k, _ in rec.calls) == 300  # elbo and iwae share one stream
    assert (per["iwae300"] >= per["elbo"] - 1e-6).all()


def test_an_elbo_with_its_own_particles_takes_its_own_pass(vae_run, monkeypatch):
    rec = _Recorder(monkeypatch)
    summary, per = evaluate_run(vae_run, estimators="iwae:9,elbo:5", n=4, progress=False, save=False)
    assert summary["estimator"].tolist() == ["iwae9", "elbo"]
    assert per.columns.tolist() == ["index", "iwae9", "iwae9_se", "iwae9_ess", "elbo", "elbo_se"]
    assert sorted(k for k, _ in rec.calls) == [5, 9]


@pytest.mark.parametrize("kwargs, words", [
    (dict(estimators="elbo,foo"), "unknown estimator 'foo'"),
    (dict(estimators="iwae:0"), "k must be >= 1"),
    (dict(estimators="ais:zero"), "expected an integer"),
    (dict(estimators="exact"), "exact_log_marginal"),
    (dict(chains=0), "chains must be >= 1"),
    (dict(n=0), "n must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(ais_start="posterior"), "AIS initial distribution"),
    (dict(proposal="posterior"), "unknown proposal"),
    (dict(compile="maybe"), "unknown compile setting"),
])
def test_bad_arguments_raise_before_any_work(vae_run, monkeypatch, kwargs, words):
    before = _files(vae_run.path)
    monkeypatch.setattr(traces, "log_weights", _NoWork())
    with pytest.raises(ValueError, match=words):
        evaluate_run(vae_run, progress=False, **kwargs)
    assert _files(vae_run.path) == before


# --------------------------------------------------------------------------- #
# bdmc_run
# --------------------------------------------------------------------------- #


def test_bdmc_run_writes_bounds_and_gap(vae_run, capsys):
    capsys.readouterr()
    torch.manual_seed(4)
    summary, per = bdmc_run(vae_run, n=6, num_steps=10, chains=3, batch_size=4, progress=False)
    assert capsys.readouterr() == ("", "")
    assert per.columns.tolist() == ["index", "lower", "lower_se", "upper", "upper_se", "gap"]
    assert per["index"].tolist() == list(range(6))
    assert np.isfinite(per.to_numpy()).all()
    np.testing.assert_allclose(per["gap"], per["upper"] - per["lower"])
    assert summary.columns.tolist() == ["estimator", "mean", "stderr", "n", "seconds"]
    assert summary["estimator"].tolist() == ["lower", "upper", "gap"]
    assert (summary["n"] == 6).all() and (summary["seconds"] > 0).all()
    assert summary.set_index("estimator").loc["gap", "mean"] == pytest.approx(per["gap"].mean())
    folder = vae_run.path / "bdmc" / "n6-steps10-chains3"
    pd.testing.assert_frame_equal(pd.read_csv(folder / "summary.csv"), summary, check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(pd.read_csv(folder / "per_datapoint.csv"), per, check_exact=False, rtol=1e-12)


def test_bdmc_sandwich_is_narrow_for_ppca(ppca_run):
    torch.manual_seed(5)
    summary, _ = bdmc_run(ppca_run, n=8, num_steps=50, chains=4, progress=False, save=False)
    gap = summary.set_index("estimator").loc["gap"]
    assert abs(gap["mean"]) < 0.1  # a 1-D Gaussian posterior: AIS with 50 steps is nearly exact


def test_bdmc_run_of_a_conditional_model_uses_the_test_labels(tmp_path):
    run = fit("cvae", "digits", tmp_path / "cvae", condition="label", epochs=1, max_examples=40, hidden=[16], z_dim=2,
              eval_k=5, progress=False, plots=False, evaluate=False)
    summary, per = bdmc_run(run, n=100, num_steps=5, chains=2, progress=False, save=False)
    n_test = len(run.data.test.y)
    assert len(per) == n_test < 100 and (summary["n"] == n_test).all()
    assert np.isfinite(per.to_numpy()).all()


def test_bdmc_run_rejects_bad_arguments(vae_run):
    for kwargs in (dict(n=0), dict(num_steps=0), dict(chains=0), dict(batch_size=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            bdmc_run(vae_run, progress=False, **kwargs)


# --------------------------------------------------------------------------- #
# the CLI
# --------------------------------------------------------------------------- #


def test_cli_evaluate_with_estimators(ppca_run):
    out = ppca_run.path
    code, stdout, stderr = _main(["evaluate", out, "--estimators", "elbo,iwae:50,ais:5", "--chains", "2", "--count", "6",
                                  "--batch-size", "4", "--ais-init", "guide", "--quiet", "--device", "cpu"])
    assert code == 0, stderr
    rows = _table_rows(stdout)
    assert rows["estimator"] == ["estimator", "mean", "stderr", "n", "seconds"]
    assert {"elbo", "iwae50", "ais5", "exact"} <= set(rows)
    folder = out / "evaluation" / "test-n6-elbo-iwae50-ais5-guidestart"
    summary = pd.read_csv(folder / "summary.csv")
    assert summary["estimator"].tolist() == ["elbo", "iwae50", "ais5", "exact"]
    assert float(rows["iwae50"][1]) == pytest.approx(summary.set_index("estimator").loc["iwae50", "mean"], abs=1e-4)
    assert f"result set: {folder}" in stdout
    assert str(folder / "summary.csv") in stdout
    assert str(folder / "per_datapoint.csv") in stdout
    assert len(pd.read_csv(folder / "per_datapoint.csv")) == 6


def test_cli_evaluate_k_and_proposal(vae_run):
    code, stdout, stderr = _main(["evaluate", vae_run.path, "--k", "9", "--count", "5", "--proposal", "mixture", "--quiet"])
    assert code == 0, stderr
    assert {"elbo", "iwae9"} <= set(_table_rows(stdout))


def test_cli_bdmc(vae_run):
    out = vae_run.path
    code, stdout, stderr = _main(["bdmc", out, "--count", "5", "--steps", "5", "--chains", "2", "--quiet"])
    assert code == 0, stderr
    rows = _table_rows(stdout)
    assert {"lower", "upper", "gap"} <= set(rows)
    folder = out / "bdmc" / "n5-steps5-chains2"
    summary = pd.read_csv(folder / "summary.csv")
    assert float(rows["gap"][1]) == pytest.approx(summary.set_index("estimator").loc["gap", "mean"], abs=1e-4)
    assert f"result set: {folder}" in stdout
    assert str(folder / "per_datapoint.csv") in stdout
    assert len(pd.read_csv(folder / "per_datapoint.csv")) == 5


@pytest.mark.parametrize("argv, words", [
    (["evaluate", "{run}", "--estimators", "elbo,bogus"], ["unknown estimator 'bogus'"]),
    (["evaluate", "{run}", "--estimators", "iwae:0"], ["k must be >= 1"]),
    (["evaluate", "{run}", "--estimators", "exact"], ["exact_log_marginal"]),
    (["evaluate", "{run}", "--estimators", "iwae:5", "--k", "5"], ["not both"]),
    (["evaluate", "{run}", "--chains", "0", "--estimators", "ais:3"], ["chains must be >= 1"]),
    (["bdmc", "{run}", "--steps", "0"], ["--steps must be >= 1"]),
    (["bdmc", "{run}", "--count", "-2"], ["--count must be >= 1"]),
    (["bdmc", "{absent}"], ["not a run directory"]),
    (["evaluate", "{absent}", "--estimators", "iwae:5"], ["not a run directory"]),
    (["evaluate", "{run}", "--name", "fit"], ["result set 'fit' already exists in", "choose another --name"]),
    (["evaluate", "{run}", "--name", ".hidden"], ["invalid result set name '.hidden'"]),
    (["evaluate", "{run}", "--name", "a/b"], ["invalid result set name 'a/b'"]),
    (["evaluate", "{run}", "--name", "../up"], ["invalid result set name"]),
    (["evaluate", "{run}", "--name", "two words"], ["invalid result set name"]),
    (["evaluate", "{run}", "--name", ""], ["invalid result set name"]),
    (["evaluate", "{run}", "--name", "x" * 101], ["at most 100 characters"]),
    (["bdmc", "{run}", "--name", "a:b"], ["invalid result set name 'a:b'"]),
])
def test_cli_bad_input_exits_2_and_writes_nothing(vae_run, tmp_path, monkeypatch, argv, words):
    monkeypatch.setattr(traces, "log_weights", _NoWork())
    before = _files(vae_run.path)
    argv = [a.format(run=vae_run.path, absent=tmp_path / "absent") for a in argv]
    _assert_error(*_main(argv + ["--quiet"]), *words)
    assert _files(vae_run.path) == before
    assert not (tmp_path / "absent").exists()


# --------------------------------------------------------------------------- #
# result sets: every call keeps its own, listed in results.csv
# --------------------------------------------------------------------------- #


@pytest.fixture
def fresh_run(tmp_path):
    """A tiny trained run of its own (fit wrote its evaluation as the set ``fit``)."""
    torch.manual_seed(0)
    out = tmp_path / "run"
    fit("vae", "moons", out, epochs=1, n_samples=100, hidden=[8], z_dim=2, eval_k=5, progress=False, plots=False)
    return out


def test_default_names_come_from_the_options():
    assert evaluation_name() == "test-all-elbo-iwae100"
    assert evaluation_name(n=20) == "test-n20-elbo-iwae100"
    assert evaluation_name(k=7, split="val", n=3) == "val-n3-elbo-iwae7"
    assert evaluation_name(estimators="elbo:3,iwae:4,ais:2", n=3) == "test-n3-elbo3-iwae4-ais2"
    assert evaluation_name(estimators="iwae:9,elbo", proposal="mixture") == "test-all-iwae9-elbo-mixture"
    assert evaluation_name(estimators="ais:50,exact", ais_start="guide", proposal="prior") == \
        "test-all-ais50-exact-guidestart"  # the proposal is for elbo/iwae only
    assert evaluation_name(estimators="iwae:5", ais_start="guide") == "test-all-iwae5"  # no AIS, no start
    assert bdmc_name() == "n100-steps1000-chains16"
    assert bdmc_name(n=5, num_steps=20, chains=2) == "n5-steps20-chains2"
    assert compare_name() == "test-n100-hmc-c4-s1000-w1000"
    assert compare_name(n=3, split="val", mcmc="nuts", chains=2, samples=10, warmup=0) == "val-n3-nuts-c2-s10-w0"


def test_two_evaluations_keep_both_sets_and_both_index_rows(fresh_run):
    fit_set = _files(fresh_run / "evaluation" / "fit")
    first, first_per = evaluate_run(fresh_run, k=5, n=4, progress=False)
    second, second_per = evaluate_run(fresh_run, estimators="elbo:3,iwae:6", split="val", n=3, proposal="prior",
                                      progress=False)
    for name, summary, per in (("test-n4-elbo-iwae5", first, first_per),
                               ("val-n3-elbo3-iwae6-prior", second, second_per)):
        folder = fresh_run / "evaluation" / name
        assert sorted(p.name for p in folder.iterdir()) == ["per_datapoint.csv", "summary.csv"]
        pd.testing.assert_frame_equal(pd.read_csv(folder / "summary.csv"), summary, check_exact=False, rtol=1e-12)
        pd.testing.assert_frame_equal(pd.read_csv(folder / "per_datapoint.csv"), per, check_exact=False, rtol=1e-12)
    assert _files(fresh_run / "evaluation" / "fit") == fit_set  # fit's own evaluation is untouched
    index = pd.read_csv(fresh_run / "results.csv")
    assert index.columns.tolist() == ["name", "kind", "path", "created", "seconds", "options"]
    assert index["name"].tolist() == ["fit", "test-n4-elbo-iwae5", "val-n3-elbo3-iwae6-prior"]
    assert index["kind"].tolist() == ["evaluation"] * 3
    assert index["path"].tolist() == ["evaluation/" + name for name in index["name"]]
    created = pd.to_datetime(index["created"])
    assert str(created.dt.tz) == "UTC" and created.is_monotonic_increasing
    assert (index["seconds"] > 0).all()
    assert json.loads(index["options"].iloc[2]) == {
        "estimators": ["elbo:3", "iwae:6"], "split": "val", "n": 3, "batch_size": None, "chains": 16,
        "ais_start": "prior", "proposal": "prior", "seed": 0}
    run = load_run(fresh_run)
    pd.testing.assert_frame_equal(run.results(), index, check_dtype=False)
    assert run.result_set("evaluation", "fit") == fresh_run / "evaluation" / "fit"
    pd.testing.assert_frame_equal(run.summary(), second, check_exact=False, rtol=1e-12)  # the most recent


def test_the_same_options_twice_get_a_numbered_name(fresh_run):
    argv = ["evaluate", fresh_run, "--k", "4", "--count", "3", "--quiet"]
    code, stdout, stderr = _main(argv)
    assert code == 0, stderr
    first = fresh_run / "evaluation" / "test-n3-elbo-iwae4"
    assert f"result set: {first}" in stdout and str(fresh_run / "results.csv") in stdout
    kept = _files(first)
    code, stdout, stderr = _main(argv)
    assert code == 0, stderr
    second = fresh_run / "evaluation" / "test-n3-elbo-iwae4-2"
    assert f"result set: {second}" in stdout and str(second / "summary.csv") in stdout
    assert _files(first) == kept and (second / "per_datapoint.csv").is_file()
    for _ in range(2):
        bdmc_run(fresh_run, n=2, num_steps=2, chains=2, progress=False)
    names = pd.read_csv(fresh_run / "results.csv")["name"].tolist()
    assert names == ["fit", "test-n3-elbo-iwae4", "test-n3-elbo-iwae4-2", "n2-steps2-chains2", "n2-steps2-chains2-2"]
    assert sorted(p.name for p in (fresh_run / "bdmc").iterdir()) == ["n2-steps2-chains2", "n2-steps2-chains2-2"]


def test_an_existing_name_is_refused_before_any_work(fresh_run, monkeypatch):
    code, stdout, stderr = _main(["evaluate", fresh_run, "--k", "3", "--count", "2", "--name", "mine", "--quiet"])
    assert code == 0, stderr
    assert f"result set: {fresh_run / 'evaluation' / 'mine'}" in stdout
    before = _files(fresh_run)

    def no_load(*args, **kwargs):
        raise AssertionError("the run was loaded")

    monkeypatch.setattr(cli, "load_run", no_load)
    monkeypatch.setattr(traces, "log_weights", _NoWork())
    code, out, err = _main(["evaluate", fresh_run, "--k", "5", "--name", "mine", "--quiet"])
    _assert_error(code, out, err, f"result set 'mine' already exists in {fresh_run / 'evaluation'}; "
                                  "choose another --name")
    assert _files(fresh_run) == before
    monkeypatch.undo()
    with pytest.raises(ValueError, match="'mine' already exists"):  # the API refuses it too
        evaluate_run(fresh_run, k=5, name="mine", progress=False)
    assert _files(fresh_run) == before
    summary, _ = bdmc_run(fresh_run, n=2, num_steps=2, chains=2, progress=False, name="mine")  # another kind
    assert (fresh_run / "bdmc" / "mine" / "summary.csv").is_file()


def test_fit_evaluation_survives_a_later_evaluate(fresh_run):
    fit_set = _files(fresh_run / "evaluation" / "fit")
    fit_summary = pd.read_csv(fresh_run / "evaluation" / "fit" / "summary.csv")
    assert fit_summary["n"].iloc[0] > 3
    code, stdout, stderr = _main(["evaluate", fresh_run, "--count", "3", "--quiet"])
    assert code == 0, stderr
    assert _files(fresh_run / "evaluation" / "fit") == fit_set
    later = pd.read_csv(fresh_run / "evaluation" / "test-n3-elbo-iwae100" / "summary.csv")
    assert (later["n"] == 3).all()
    run = load_run(fresh_run)
    assert run.results()["name"].tolist() == ["fit", "test-n3-elbo-iwae100"]
    pd.testing.assert_frame_equal(run.summary(), later)


def test_a_bad_name_is_refused_by_the_api_before_any_work(fresh_run, monkeypatch):
    before = _files(fresh_run)
    monkeypatch.setattr(traces, "log_weights", _NoWork())
    for name in (".x", "a/b", "a b", "", "é"):
        with pytest.raises(ValueError, match="invalid result set name"):
            evaluate_run(fresh_run, k=3, name=name, progress=False)
        with pytest.raises(ValueError, match="invalid result set name"):
            bdmc_run(fresh_run, n=2, num_steps=2, chains=2, name=name, progress=False)
    assert _files(fresh_run) == before


def test_a_run_of_the_old_layout_still_loads(fresh_run):
    """Before result sets, evaluate wrote evaluation/summary.csv itself and there was no index."""
    folder = fresh_run / "evaluation"
    for file in ("summary.csv", "per_datapoint.csv"):
        shutil.move(folder / "fit" / file, folder / file)
    (folder / "fit").rmdir()
    (fresh_run / "results.csv").unlink()
    old = pd.read_csv(folder / "summary.csv")
    run = load_run(fresh_run)
    pd.testing.assert_frame_equal(run.summary(), old)
    assert run.results().empty and run.results().columns.tolist() == [
        "name", "kind", "path", "created", "seconds", "options"]
    summary, _ = evaluate_run(run, k=3, n=2, progress=False)
    assert pd.read_csv(folder / "summary.csv").equals(old)  # the old files stay
    pd.testing.assert_frame_equal(run.summary(), summary, check_exact=False, rtol=1e-12)
    assert run.results()["name"].tolist() == ["test-n2-elbo-iwae3"]


def test_fit_without_evaluation_has_no_summary(tmp_path):
    run = fit("vae", "moons", tmp_path / "run", epochs=1, n_samples=100, hidden=[8], z_dim=2, progress=False,
              plots=False, evaluate=False)
    assert run.summary() is None and run.results().empty
    assert not (tmp_path / "run" / "results.csv").exists() and not (tmp_path / "run" / "evaluation").exists()


def test_cli_evaluate_compiled_gives_the_same_estimates(vae_run):
    """``--compile on``: the particle chunks and AIS's log-joint as compiled graphs, the same numbers to rounding."""
    from ppl_genmodels.compiled import static_path

    frames = {}
    for setting in ("off", "on"):
        code, stdout, stderr = _main(["evaluate", vae_run.path, "--estimators", "elbo,iwae:300,ais:3", "--chains",
                                      "2", "--count", "8", "--compile", setting, "--name", f"compile-{setting}",
                                      "--quiet", "--device", "cpu"])
        assert code == 0, stderr
        assert "compiled path is off" not in stderr
        # the compile time is reported apart, per path, where anything was compiled
        report = [line for line in stdout.splitlines() if line.startswith("compiled paths")]
        if setting == "on":
            assert len(report) == 1 and re.search(r"log-weights of a particle chunk: \d graph\(s\), [\d.]+ s",
                                                  report[0]) and "AIS log-joint and gradients: 1 graph(s)" in report[0]
        else:
            assert report == []
        frames[setting] = pd.read_csv(vae_run.path / "evaluation" / f"compile-{setting}" / "per_datapoint.csv")
    for column in ("elbo", "iwae300", "ais3"):
        np.testing.assert_allclose(frames["on"][column], frames["off"][column], rtol=1e-4, atol=1e-3)
    run = load_run(vae_run.path)
    evaluate_run(run, estimators="iwae:300", n=8, compile="on", progress=False, save=False)  # chunks 128, 128, 44
    static = static_path(None, run.program.model, "log-weights of a particle chunk")
    assert static is not None and static.entries and static.fallback is None
