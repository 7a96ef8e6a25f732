"""Posterior sampling over the latents: adaptation pieces, exact posteriors, NUTS agreement, calibration."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from scipy import stats

from conftest import make_ppca
from ppl_genmodels.inference.mcmc import diagnostics, hmc_posterior, nuts_posterior


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # a statistical check over many draws: run in CI with -m slow
def test_hmc_recovers_the_exact_ppca_posterior():
    model, x = make_ppca(6)
    torch.manual_seed(2)
    result = hmc_posterior(model.model, model.guide, x, num_chains=4, num_samples=1000, warmup=500)
    z = result.samples["z"]  # [chains, draws, batch, 2]
    assert z.shape == (4, 1000, 6, 2)
    exact = model.exact_posterior(x)
    flat = z.reshape(-1, 6, 2)
    mean = flat.mean(0)
    sd = exact.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
    mc_error = sd / result.ess_bulk.unsqueeze(-1).sqrt()
    assert torch.all((mean - exact.mean).abs() < 4 * mc_error)
    centred = flat - mean
    cov = torch.einsum("nbi,nbj->bij", centred, centred) / (flat.shape[0] - 1)
    torch.testing.assert_close(cov, exact.covariance_matrix.detach(), atol=0.15 * sd.max().item() ** 2, rtol=0.15)
    assert torch.all(result.rhat < 1.01)
    assert torch.all(result.ess_bulk > 400) and torch.all(result.divergences == 0)
    assert torch.all((result.accept_rate > 0.5) & (result.accept_rate <= 1.0))


@pytest.mark.slow  # a statistical check over many draws: run in CI with -m slow
def test_batched_hmc_and_pyro_nuts_agree():
    model, x = make_ppca(2, seed=3)
    torch.manual_seed(4)
    ours = hmc_posterior(model.model, model.guide, x, num_chains=2, num_samples=400, warmup=300)
    theirs = nuts_posterior(model.model, model.guide, x, num_chains=2, num_samples=300, warmup=200, warn=False)
    assert theirs.samples["z"].shape == (2, 300, 2, 2) and theirs.method == "nuts"
    a, b = ours.samples["z"].reshape(-1, 2, 2), theirs.samples["z"].reshape(-1, 2, 2)
    sd = a.std(0)
    error = sd * (1 / ours.ess_bulk.unsqueeze(-1) + 1 / theirs.ess_bulk.unsqueeze(-1)).sqrt()
    assert torch.all((a.mean(0) - b.mean(0)).abs() < 4 * error)
    assert torch.all((a.std(0) / b.std(0) - 1).abs() < 0.2)


class Nonlinear1D(PyroModule):
    """z ~ N(0, 1), x | z ~ N(2 tanh(z) + 0.5 z, 0.3^2) in 2 dimensions (scaled differently)."""

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), x.new_ones(1)).to_event(1))
            loc = torch.cat([2 * torch.tanh(z) + 0.5 * z, z - torch.tanh(z)], -1)
            pyro.sample("x", dist.Normal(loc, 0.3).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(1), x.new_ones(1)).to_event(1))


def _sbc_ranks(shift: float = 0.0):
    """Simulation-based calibration (Talts et al. 2018): one simulation per datapoint, batched."""
    from ppl_genmodels.inference.ais import simulate

    torch.manual_seed(5)
    model = Nonlinear1D()
    x, latents = simulate(model.model, torch.zeros(200, 2, dtype=torch.float64))
    result = hmc_posterior(model.model, model.guide, x, num_chains=2, num_samples=400, warmup=200, start="prior",
                           warn=False)
    draws = result.samples["z"][:, ::20, :, 0] + shift  # thinned: [2, 20, 200]
    draws = draws.reshape(-1, 200)  # 40 draws per simulation
    return (draws < latents["z"][:, 0]).sum(0).numpy()  # ranks in 0..40


@pytest.mark.slow  # a statistical check over many draws: run in CI with -m slow
def test_simulation_based_calibration_is_uniform_and_catches_bias():
    ranks = _sbc_ranks()
    counts = np.bincount(ranks // 6, minlength=7)[:7]  # 41 ranks in 7 bins (the last bin holds 36..40)
    expected = np.array([6] * 6 + [5]) / 41 * len(ranks)
    assert stats.chisquare(counts, expected).pvalue > 0.01
    biased = _sbc_ranks(shift=0.3)  # a sampler whose draws sit 0.3 too high must fail the same test
    counts_b = np.bincount(biased // 6, minlength=7)[:7]
    assert stats.chisquare(counts_b, expected).pvalue < 0.01


def test_diagnostics_flag_chains_that_disagree():
    torch.manual_seed(6)
    good = torch.randn(4, 300, 3, 2)
    rhat, bulk, tail = diagnostics(good)
    assert rhat.shape == bulk.shape == tail.shape == (3,)
    assert torch.all(rhat < 1.02) and torch.all(bulk > 500)
    stuck = good.clone()
    stuck[0] += 3.0  # one chain elsewhere
    assert torch.all(diagnostics(stuck)[0] > 1.1)


def test_unconverged_datapoints_raise_a_warning():
    model, x = make_ppca(3, seed=7)
    with pytest.warns(RuntimeWarning, match="R-hat"):
        hmc_posterior(model.model, model.guide, x, num_chains=2, num_samples=5, warmup=0, step_size=1e-3)


def test_a_generator_makes_hmc_draws_repeatable_and_leaves_the_global_stream_alone():
    model, x = make_ppca(3, seed=5)
    before = torch.get_rng_state()
    first, second = (hmc_posterior(model.model, model.guide, x, num_chains=2, num_samples=20, warmup=30, warn=False,
                                   generator=torch.Generator().manual_seed(11)) for _ in range(2))
    assert torch.equal(first.samples["z"], second.samples["z"])
    assert torch.equal(torch.get_rng_state(), before)
