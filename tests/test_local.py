"""Per-datapoint (non-amortized) guides: exact answers for PPCA, the gap signs, the fallback family."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import make_ppca
from pyro.nn import PyroModule
from torch import nn

from ppl_genmodels import traces
from ppl_genmodels.inference.importance import streaming_estimates
from ppl_genmodels.inference.local import fit_local_guides, local_guide, sample_local
from ppl_genmodels.models.cvae import CVAE
from ppl_genmodels.models.vae import VAE, diag_normal_params
from ppl_genmodels.traces import TraceError

N_DIMS, GAMMA_SHAPE = 4, 3.0


pytestmark = pytest.mark.usefixtures("one_thread")


class GammaPoisson(PyroModule):
    """rate ~ Gamma(3, 1) per datapoint, x_i | rate ~ Poisson(rate) for i < 4; a LogNormal guide."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(N_DIMS, 2)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            rate = pyro.sample("rate", dist.Gamma(x.new_tensor(GAMMA_SHAPE), x.new_tensor(1.0)))  # [B] or [K, B]
            pyro.sample("x", dist.Poisson(rate.unsqueeze(-1).expand(rate.shape + (N_DIMS,))).to_event(1), obs=x)

    def guide(self, x, y=None):
        loc, raw = self.encoder(torch.log1p(x)).unbind(-1)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("rate", dist.LogNormal(loc, nn.functional.softplus(raw) + 1e-3))

    @staticmethod
    def exact_log_marginal(x):
        """log of the integral of Gamma(r; a, 1) prod_i Poisson(x_i; r) over r."""
        s, a = x.sum(-1), GAMMA_SHAPE
        return (torch.lgamma(s + a) - math.lgamma(a) - torch.lgamma(x + 1).sum(-1)
                - (s + a) * math.log(N_DIMS + 1))


def _small_vae(n=8, seed=0):
    torch.manual_seed(seed)
    model = VAE(6, 2, hidden=(16,))
    x = torch.bernoulli(torch.full((n, 6), 0.5))
    return model, x


def _gamma_poisson(n=6, seed=0):
    torch.manual_seed(seed)
    model = GammaPoisson()
    x = torch.poisson(torch.rand(n, 1) * 6 * torch.ones(n, N_DIMS))
    return model, x


def _amortized_elbo(model, x, y=None, k=1000):
    elbo, _ = streaming_estimates(model.model, model.guide, x, y, k=k)
    return elbo


def test_ppca_local_guide_is_the_exact_posterior():
    model, x = make_ppca(7)  # the amortized guide is untrained: A = 0, b = 0, L = I
    torch.manual_seed(1)
    result = fit_local_guides(model.model, model.guide, x, steps=300)
    exact = model.exact_log_marginal(x)
    post = model.exact_posterior(x)
    assert result.elbo.shape == result.elbo_se.shape == (7,)
    assert (result.elbo - exact).abs().max() < 0.02
    p = result.params["z"]
    assert p["loc"].shape == (7, 2) and p["scale_tril"].shape == (7, 2, 2)
    torch.testing.assert_close(p["loc"], post.loc, atol=0.05, rtol=0)
    torch.testing.assert_close(p["scale_tril"] @ p["scale_tril"].mT, post.covariance_matrix, atol=0.05, rtol=0)
    amortized = _amortized_elbo(model, x)
    assert (result.elbo - amortized.value).min() > -0.02  # the amortization gap is never negative
    assert (result.elbo - amortized.value).mean() > 1.0   # and large for an untrained encoder
    assert result.history.shape == (300,) and torch.isfinite(result.history).all()
    assert result.history[-1] > result.history[0]


def test_ppca_plain_reparameterisation_gradient_also_converges():
    model, x = make_ppca(5)
    torch.manual_seed(2)
    result = fit_local_guides(model.model, model.guide, x, steps=300, lr=0.02, sticking_landing=False)
    exact = model.exact_log_marginal(x)
    assert (result.elbo - exact).abs().max() < 0.1
    torch.testing.assert_close(result.params["z"]["loc"], model.exact_posterior(x).loc, atol=0.1, rtol=0)


def test_local_guide_starts_at_the_amortized_output():
    model, x = _small_vae()
    local = local_guide(model.guide, x)
    with torch.no_grad():
        loc, scale = diag_normal_params(model.encoder(x))
    params = local.params()["z"]
    torch.testing.assert_close(params["loc"], loc)
    torch.testing.assert_close(params["scale"], scale)
    assert local.sites[0].family == "normal"
    # before any step the local guide is the amortized one: the same ELBO up to Monte Carlo error
    torch.manual_seed(0)
    zero = fit_local_guides(model.model, model.guide, x, steps=0, eval_particles=2000)
    amortized = _amortized_elbo(model, x, k=2000)
    assert zero.history.shape == (0,)
    assert ((zero.elbo - amortized.value).abs() < 4 * (zero.elbo_se + amortized.stderr)).all()


def test_vae_local_beats_amortized_and_plugs_into_log_weights():
    model, x = _small_vae()
    torch.manual_seed(3)
    result = fit_local_guides(model.model, model.guide, x, steps=200)
    amortized = _amortized_elbo(model, x)
    assert result.elbo.mean() > amortized.value.mean()
    assert (result.elbo > amortized.value - 3 * (result.elbo_se + amortized.stderr)).all()
    assert result.params["z"]["loc"].shape == result.params["z"]["scale"].shape == (8, 2)
    with torch.no_grad():
        log_w = traces.log_weights(model.model, result.guide, x, num_particles=5)
    assert log_w.shape == (5, 8) and torch.isfinite(log_w).all()
    draws = sample_local(result, 3)
    assert set(draws) == {"z"} and draws["z"].shape == (3, 8, 2)
    assert sample_local(result.guide, 1)["z"].shape == (1, 8, 2)
    with pytest.raises(ValueError, match="batch of 8"):
        result.guide(x[:3])


def test_cvae_local_guides_pass_y():
    torch.manual_seed(0)
    model = CVAE(5, 2, y_dim=3, hidden=(8,), y_kind="onehot")
    x = torch.bernoulli(torch.full((4, 5), 0.5))
    y = nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    result = fit_local_guides(model.model, model.guide, x, y, steps=50, eval_particles=200)
    assert result.elbo.shape == (4,) and torch.isfinite(result.elbo).all()
    assert result.elbo.mean() > _amortized_elbo(model, x, y, k=200).value.mean()


def test_positive_latent_uses_the_transformed_fallback():
    model, x = _gamma_poisson()
    torch.manual_seed(4)
    result = fit_local_guides(model.model, model.guide, x, steps=300)
    assert result.guide.sites[0].family == "transformed"
    assert result.params["rate"]["loc"].shape == result.params["rate"]["scale"].shape == (6,)
    log_p = GammaPoisson.exact_log_marginal(x)
    assert torch.isfinite(result.elbo).all()
    assert (result.elbo < log_p + 3 * result.elbo_se + 1e-3).all()  # a lower bound
    assert (log_p - result.elbo).max() < 0.1  # a LogNormal is close to the Gamma posterior
    assert (result.elbo > _amortized_elbo(model, x).value).all()
    draws = sample_local(result, 10)["rate"]
    assert draws.shape == (10, 6) and (draws > 0).all()


def test_model_parameters_are_untouched():
    for model, x in (_small_vae(), _gamma_poisson()):
        first = next(model.parameters())
        first.requires_grad_(False)  # a mix of flags must come back as it was
        flags = [p.requires_grad for p in model.parameters()]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fit_local_guides(model.model, model.guide, x, steps=20, eval_particles=50)
        after = model.state_dict()
        assert before.keys() == after.keys()
        for k, value in before.items():
            torch.testing.assert_close(after[k], value, atol=0, rtol=0)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())


def test_contract_violations_are_refused():
    model, x = _small_vae(4)
    with pytest.raises(ValueError):
        fit_local_guides(model.model, model.guide, x, num_particles=0)
    with pytest.raises(ValueError):
        fit_local_guides(model.model, model.guide, x, lr=0.0)

    def global_guide(x, y=None):
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(TraceError, match="outside"):
        local_guide(global_guide, x)

    def discrete_guide(x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Categorical(logits=torch.zeros(x.shape[0], 3)))

    with pytest.raises(TraceError, match="discrete"):
        local_guide(discrete_guide, x)

    def matrix_guide(x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(3, x.shape[0]), 1.0))

    with pytest.raises(TraceError, match="batch shape"):
        local_guide(matrix_guide, x)
