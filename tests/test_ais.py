"""Batched HMC, AIS and BDMC against known normalisers (closed forms and quadrature)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from ppl_genmodels.inference.ais import _evaluator, ais, bdmc, linear_schedule, sigmoid_schedule, simulate
from ppl_genmodels.inference.importance import iwae_estimate
from conftest import make_ppca
from ppl_genmodels.traces import LogJoint, TraceError, latent_layout, log_weights


pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules_run_from_zero_to_one():
    for betas in (sigmoid_schedule(50), linear_schedule(50)):
        assert betas.shape == (51,) and betas[0] == 0 and betas[-1] == 1
        assert torch.all(betas[1:] > betas[:-1])
    s = sigmoid_schedule(100)
    assert s[1] - s[0] < s[51] - s[50]  # dense near the ends, coarse in the middle
    with pytest.raises(ValueError):
        sigmoid_schedule(0)


@pytest.fixture
def ppca():
    return make_ppca(8)


@pytest.mark.parametrize("start", ["prior", "guide"])
def test_ais_matches_the_exact_ppca_marginal(ppca, start):
    model, x = ppca
    torch.manual_seed(1)
    result = ais(model.model, model.guide, x, num_steps=300, num_chains=32, start=start)
    exact = model.exact_log_marginal(x)
    assert result.log_z.shape == result.stderr.shape == result.ess.shape == (8,)
    assert result.log_w.shape == (32, 8)
    assert torch.all((result.log_z - exact).abs() < 3 * result.stderr + 0.02)
    assert torch.all(result.accept_rate > 0.4)


class TanhDecoder(PyroModule):
    """z ~ N(0, 1) (a 1-D latent), x | z ~ N(c tanh(a z + b), 0.3^2 I): a nonlinear decoder."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = torch.randn(3, generator=g, dtype=torch.float64) * 2
        self.b = torch.randn(3, generator=g, dtype=torch.float64)
        self.c = torch.randn(3, generator=g, dtype=torch.float64) * 2

    def decode(self, z):  # z [..., 1] -> loc [..., 3]
        return self.c * torch.tanh(self.a * z + self.b)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), x.new_ones(1)).to_event(1))
            pyro.sample("x", dist.Normal(self.decode(z), 0.3).to_event(1), obs=x)

    def guide(self, x, y=None):  # a deliberately crude amortized guide
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.3 * x[..., :1], x.new_ones(1)).to_event(1))

    def quadrature_log_marginal(self, x):
        z = torch.linspace(-10, 10, 40001, dtype=torch.float64)[:, None, None]  # [G, 1, 1]
        log_joint = dist.Normal(0.0, 1.0).log_prob(z[..., 0]) + dist.Normal(self.decode(z), 0.3).log_prob(x).sum(-1)
        dz = 20 / 40000
        return torch.logsumexp(log_joint, 0) + math.log(dz)  # [batch]


def test_iwae_and_ais_match_quadrature_on_a_nonlinear_model():
    torch.manual_seed(2)
    model = TanhDecoder()
    z = torch.randn(6, 1, dtype=torch.float64)
    x = model.decode(z) + 0.3 * torch.randn(6, 3, dtype=torch.float64)
    truth = model.quadrature_log_marginal(x)
    log_w = log_weights(model.model, model.guide, x, num_particles=20000, chunk_size=5000)
    iw, se, _ = iwae_estimate(log_w)
    assert torch.all((iw - truth).abs() < 3 * se + 0.01)
    result = ais(model.model, model.guide, x, num_steps=300, num_chains=32)
    assert torch.all((result.log_z - truth).abs() < 3 * result.stderr + 0.03)


class GammaPoisson(PyroModule):
    """A positive latent: rate ~ Gamma(3, 1), counts | rate ~ Poisson(rate) in 4 dimensions."""

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            rate = pyro.sample("rate", dist.Gamma(x.new_tensor(3.0), x.new_tensor(1.0)))
            pyro.sample("x", dist.Poisson(rate.unsqueeze(-1).expand(rate.shape + (4,))).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("rate", dist.LogNormal(torch.log1p(x.mean(-1)), x.new_tensor(0.5)))


def test_constrained_latent_is_annealed_in_unconstrained_space():
    torch.manual_seed(4)
    model = GammaPoisson()
    x = torch.poisson(torch.tensor([[1.0], [4.0], [9.0]], dtype=torch.float64).expand(3, 4))
    layout = latent_layout(model.model, x)
    assert layout.dim == 1 and layout.sites[0].name == "rate"
    u = torch.tensor([[[-1.0], [0.0], [2.0]]], dtype=torch.float64)
    values, log_jac = layout.unpack(u)
    torch.testing.assert_close(values["rate"], u.exp()[..., 0])
    torch.testing.assert_close(log_jac, u[..., 0])  # log|d exp(u)/du| = u
    torch.testing.assert_close(layout.pack(values, (1, 3)), u)
    # closed form: the Gamma-Poisson marginal, a product of negative-binomial-like terms
    s, n, a = x.sum(-1), x.shape[-1], 3.0
    exact = (torch.lgamma(s + a) - math.lgamma(a) - torch.lgamma(x + 1).sum(-1) - (s + a) * math.log(n + 1.0))
    for start in ("prior", "guide"):
        result = ais(model.model, model.guide, x, num_steps=200, num_chains=32, start=start)
        assert torch.all((result.log_z - exact).abs() < 3 * result.stderr + 0.03), start


@pytest.mark.slow  # a statistical check over many draws: run in CI with -m slow
def test_bdmc_sandwich_closes_as_steps_grow(ppca):
    model, _ = ppca
    torch.manual_seed(5)
    x, latents = simulate(model.model, torch.zeros(10, 5, dtype=torch.float64))
    assert set(latents) == {"z"} and latents["z"].shape == (10, 2)
    exact = model.exact_log_marginal(x)
    gaps = []
    for steps in (3, 30, 300):
        lower, upper = bdmc(model.model, model.guide, x, latents, num_steps=steps, num_chains=16)
        gaps.append((upper.log_z - lower.log_z).mean().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.1
    # with a long schedule both ends sit on the exact value, within their Monte Carlo error
    assert torch.all((lower.log_z - exact).abs() < 3 * lower.stderr + 0.05)
    assert torch.all((upper.log_z - exact).abs() < 3 * upper.stderr + 0.05)


def test_ais_refuses_what_it_cannot_do(ppca):
    model, x = ppca
    with pytest.raises(ValueError, match="needs latents"):
        ais(model.model, model.guide, x, num_steps=5, reverse=True)
    with pytest.raises(ValueError, match="schedule"):
        ais(model.model, model.guide, x, num_steps=5, schedule="cosine")
    with pytest.raises(ValueError, match="initial distribution"):
        LogJoint(model.model, model.guide, x, start="posterior")

    class Discrete(PyroModule):
        def model(self, x, y=None):
            with pyro.plate("data", x.shape[0]):
                c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))
                pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).expand(x.shape).to_event(1), obs=x)

        def guide(self, x, y=None):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))

    with pytest.raises(TraceError, match="discrete"):
        latent_layout(Discrete().model, torch.zeros(3, 2))


@pytest.mark.parametrize("start", ["prior", "guide"])
def test_moving_to_the_next_temperature_needs_no_evaluation(ppca, start):
    model, x = ppca
    joint = LogJoint(model.model, model.guide, x, start=start)
    u = joint.sample_start(3)
    retempered = _evaluator(joint, 0.3)(u).at(0.8)
    fresh = _evaluator(joint, 0.8)(u)
    for got, want in zip(retempered, fresh):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    log_start, log_target = joint(u)
    torch.testing.assert_close(fresh.log_density, 0.2 * log_start + 0.8 * log_target)


def test_each_annealing_step_costs_one_model_pass_per_leapfrog_step(ppca):
    model, x = ppca
    calls = []

    def counted(x, y=None):
        calls.append(1)
        return model.model(x, y)

    steps, leapfrog = 5, 3
    ais(counted, model.guide, x, num_steps=steps, num_chains=4, num_leapfrog=leapfrog)
    # building the joint (layout and plate nesting: 2), the initial draws (1), the initial point (1),
    # then one pass per leapfrog step: nothing extra when the temperature changes
    assert len(calls) == 4 + steps * leapfrog


def test_a_generator_makes_ais_repeatable_and_leaves_the_global_stream_alone(ppca):
    model, x = ppca
    before = torch.get_rng_state()
    first, second = (ais(model.model, model.guide, x, num_steps=20, num_chains=4,
                         generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(first.log_w, second.log_w)
    assert torch.equal(torch.get_rng_state(), before)
