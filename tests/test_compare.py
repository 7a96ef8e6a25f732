"""Comparing inference: gap decomposition, posterior discrepancies, compare_run and the CLI."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import ppl_genmodels
from ppl_genmodels.cli import main
from ppl_genmodels.comparison import compare_run
from ppl_genmodels.inference.compare import energy_distance, gap_decomposition, posterior_discrepancy

from conftest import make_ppca


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ppca_run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("compare") / "ppca"
    return ppl_genmodels.fit("ppca", "moons", out, z_dim=2, epochs=3, eval_k=10, progress=False, plots=False)


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def test_discrepancy_is_small_for_the_same_distribution_and_large_for_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 5, 3, generator=g)
    b = torch.randn(2000, 5, 3, generator=g)
    same = posterior_discrepancy(a, b)
    assert set(same) == {"mean_sd", "sd_ratio", "energy"}
    assert all(v.shape == (5,) for v in same.values())
    assert same["mean_sd"].max() < 0.15
    assert (same["sd_ratio"] - 1).abs().max() < 0.1
    assert same["energy"].abs().max() < 0.03
    shifted = posterior_discrepancy(a + 2.0, b)
    assert shifted["mean_sd"].min() > 1.7
    assert shifted["energy"].min() > 1.0
    wide = posterior_discrepancy(3.0 * a, b)
    assert wide["sd_ratio"].min() > 2.5
    narrow = posterior_discrepancy(0.5 * a, b)
    assert narrow["sd_ratio"].max() < 0.6  # the worst dimension's ratio, not its distance from 1


def test_energy_distance_matches_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 2, 2, generator=g, dtype=torch.float64), torch.randn(30, 2, 2, generator=g, dtype=torch.float64) + 1
    got = energy_distance(a, b)
    for j in range(2):
        x, y = a[:, j].numpy(), b[:, j].numpy()
        d = lambda p, q: np.linalg.norm(p[:, None] - q[None], axis=-1)  # noqa: E731
        want = 2 * d(x, y).mean() - d(x, x).sum() / (40 * 39) - d(y, y).sum() / (30 * 29)
        assert got[j].item() == pytest.approx(want, rel=1e-9)
    assert energy_distance(torch.randn(2000, 1, 2), torch.randn(1500, 1, 2)).shape == (1,)  # subsampled


def test_discrepancy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        posterior_discrepancy(torch.randn(10, 3, 2), torch.randn(10, 4, 2))
    with pytest.raises(ValueError, match="at least 2 draws"):
        posterior_discrepancy(torch.randn(1, 3, 2), torch.randn(10, 3, 2))


def test_gap_decomposition_on_ppca():
    model, x = make_ppca(6)
    gaps = gap_decomposition(model, x, local_steps=300, elbo_k=2000)
    assert gaps.log_px_source == "exact"
    assert np.allclose(gaps.log_px.numpy(), model.exact_log_marginal(x).detach().numpy())
    assert gaps.approximation_gap.abs().max() < 0.05  # the local family contains p(z|x)
    assert gaps.amortization_gap.min() > -0.05
    total = gaps.log_px - gaps.elbo_amortized
    assert torch.allclose(total, gaps.approximation_gap + gaps.amortization_gap)


def test_compare_run_on_ppca(ppca_run):
    torch.manual_seed(0)
    summary, per, idata = compare_run(ppca_run, n=6, samples=200, warmup=200, local_steps=200, progress=False)
    folder = ppca_run.path / "compare" / "test-n6-hmc-c4-s200-w200"
    for name in ("summary.csv", "per_datapoint.csv", "posterior.nc", "gaps.png", "posteriors.png"):
        assert (folder / name).is_file(), name
    index = ppca_run.data.test.index[:6].numpy()
    assert per["index"].tolist() == index.tolist()
    assert (per["log_px_source"] == "exact").all()
    assert per["amortization_gap"].min() > -0.05
    assert per["approximation_gap"].abs().max() < 0.05
    for column in ("rhat", "ess_bulk", "ess_tail", "accept_rate", "divergences", "guide_vs_mcmc_mean_sd",
                   "guide_vs_mcmc_sd_ratio", "guide_vs_mcmc_energy", "local_vs_mcmc_energy", "guide_vs_exact_energy",
                   "local_vs_exact_mean_sd", "mcmc_vs_exact_mean_sd"):
        assert column in per, column
    assert per["mcmc_vs_exact_mean_sd"].max() < 0.4
    assert (per["mcmc_vs_exact_sd_ratio"] - 1).abs().max() < 0.3
    assert per["mcmc_vs_exact_energy"].max() < 0.05
    assert summary["method"].tolist() == ["exact", "hmc", "local", "amortized"]
    assert summary.set_index("method").loc["hmc", "divergences"] == per["divergences"].sum()
    pd.testing.assert_frame_equal(pd.read_csv(folder / "summary.csv"), summary, check_dtype=False)

    loaded = _az().from_netcdf(folder / "posterior.nc")
    assert loaded.posterior["z"].dims == ("chain", "draw", "datapoint", "latent_dim")
    assert loaded.posterior["z"].shape == (4, 200, 6, 2)
    assert loaded.posterior["datapoint"].values.tolist() == index.tolist()
    for group in ("guide", "local_guide", "exact"):
        assert loaded[group]["z"].dims == ("chain", "draw", "datapoint", "latent_dim")
        assert loaded[group]["z"].shape[0] == 1 and loaded[group]["z"].shape[2:] == (6, 2)
    assert isinstance(idata, type(loaded))


def test_compare_run_without_a_closed_form_uses_iwae(tmp_path):
    torch.manual_seed(0)
    run = ppl_genmodels.fit("vae", "moons", tmp_path / "vae", z_dim=2, epochs=1, eval_k=10, max_examples=200,
                            progress=False, plots=False)
    summary, per, idata = compare_run(run, n=3, chains=2, samples=50, warmup=50, local_steps=20, logp_k=300,
                                      elbo_k=100, progress=False, save=False)
    assert (per["log_px_source"] == "iwae300").all()
    assert "guide_vs_exact_energy" not in per
    assert summary["method"].tolist() == ["iwae300", "hmc", "local", "amortized"]
    assert not (tmp_path / "vae" / "compare").exists()
    assert pd.read_csv(tmp_path / "vae" / "results.csv")["name"].tolist() == ["fit"]  # save=False: no index row


def test_compare_run_rejects_bad_arguments(ppca_run):
    with pytest.raises(ValueError, match="MCMC method"):
        compare_run(ppca_run, mcmc="gibbs", progress=False)
    with pytest.raises(ValueError, match="n must be"):
        compare_run(ppca_run, n=0, progress=False)


def test_cli_compare(ppca_run, capsys):
    code = main(["compare", str(ppca_run.path), "--count", "3", "--samples", "100", "--warmup", "100",
                 "--local-steps", "50", "--quiet", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0
    folder = ppca_run.path / "compare" / "test-n3-hmc-c4-s100-w100"
    assert "amortized" in out and f"result set: {folder}" in out and str(folder / "posterior.nc") in out
    assert (folder / "per_datapoint.csv").is_file()
    assert len(pd.read_csv(folder / "per_datapoint.csv")) == 3


def test_cli_compare_with_nuts(ppca_run, capsys):
    code = main(["compare", str(ppca_run.path), "--count", "2", "--mcmc", "nuts", "--chains", "2", "--samples", "30",
                 "--warmup", "30", "--local-steps", "20", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "nuts" in out
    summary = pd.read_csv(ppca_run.path / "compare" / "test-n2-nuts-c2-s30-w30" / "summary.csv")
    assert summary["method"].tolist()[1] == "nuts"


@pytest.mark.parametrize("argv, words", [
    (["--count", "0"], "--count must be >= 1"),
    (["--chains", "0"], "--chains must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--name", ".x"], "invalid result set name '.x'"),
    (["--name", "a/b"], "invalid result set name 'a/b'"),
])
def test_cli_compare_bad_input(ppca_run, capsys, argv, words):
    assert main(["compare", str(ppca_run.path), *argv, "--quiet"]) == 2
    assert words in capsys.readouterr().err


def test_cli_compare_missing_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


TINY = ["--count", "2", "--chains", "2", "--samples", "10", "--warmup", "10", "--local-steps", "2", "--logp-k", "10",
        "--seed", "0", "--quiet"]


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_each_compare_keeps_its_own_result_set(ppca_run, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged chains: these runs are tiny
        assert main(["compare", str(ppca_run.path), *TINY]) == 0
        first = ppca_run.path / "compare" / "test-n2-hmc-c2-s10-w10"
        kept = _files(first)
        assert {"summary.csv", "per_datapoint.csv", "posterior.nc", "gaps.png"} <= set(kept)
        assert main(["compare", str(ppca_run.path), *TINY]) == 0
        assert main(["compare", str(ppca_run.path), *TINY, "--name", "mine"]) == 0
    out = capsys.readouterr().out
    second = ppca_run.path / "compare" / "test-n2-hmc-c2-s10-w10-2"
    assert f"result set: {second}" in out and f"figures in {second}: gaps.png" in out
    assert _files(first) == kept and (second / "posterior.nc").is_file()
    assert (ppca_run.path / "compare" / "mine" / "summary.csv").is_file()
    index = pd.read_csv(ppca_run.path / "results.csv").set_index("name")
    assert index.loc["mine", "kind"] == "compare" and index.loc["mine", "path"] == "compare/mine"
    assert json.loads(index.loc["mine", "options"])["samples"] == 10

    before = _files(ppca_run.path)
    assert main(["compare", str(ppca_run.path), *TINY, "--name", "mine"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: result set 'mine' already exists in {ppca_run.path / 'compare'}; "
                           "choose another --name")
    assert _files(ppca_run.path) == before
