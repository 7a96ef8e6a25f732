"""Per-datapoint log weights and the estimators built on them, against closed forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from ppl_genmodels.inference.importance import iwae_estimate, streaming_estimates
from ppl_genmodels.inference.objectives import make_objective
from ppl_genmodels.traces import TraceError, generate, log_mean_exp, log_weights, max_plate_nesting, reconstruct




def test_exact_guide_gives_constant_weights_equal_to_log_marginal(ppca):
    # With q(z|x) = p(z|x), every weight p(x, z)/q(z|x) equals p(x) exactly.
    model, x = ppca
    model.set_exact_guide()
    exact = model.exact_log_marginal(x)
    for vectorize in (True, False):
        log_w = log_weights(model.model, model.guide, x, num_particles=6, vectorize=vectorize)
        assert log_w.shape == (6, 7)
        torch.testing.assert_close(log_w, exact.expand(6, 7), atol=1e-9, rtol=0)
    chunked = log_weights(model.model, model.guide, x, num_particles=10, chunk_size=3)
    assert chunked.shape == (10, 7)
    torch.testing.assert_close(chunked, exact.expand(10, 7), atol=1e-9, rtol=0)


def test_bounds_are_ordered_and_iwae_bias_shrinks_with_k(ppca):
    model, x = ppca
    model.set_exact_guide()
    with torch.no_grad():  # a deliberately poor guide: shifted and too wide
        model.guide_b.add_(0.7)
        model.guide_R.add_(torch.eye(2, dtype=torch.float64) * 0.5)
    exact = model.exact_log_marginal(x)
    torch.manual_seed(1)
    gaps = []
    for k in (1, 10, 100, 1000):
        log_w = log_weights(model.model, model.guide, x, num_particles=k)
        elbo = log_w.mean(0)
        iw, _, _ = iwae_estimate(log_w)
        assert torch.all(iw >= elbo - 1e-12)  # Jensen, particle by particle
        gaps.append((exact - iw).mean().item())
    assert all(g > 0 for g in gaps[:3])  # a lower bound in expectation, far from tight at small k
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert gaps[3] < 0.1 * gaps[0]


def test_iwae_agrees_with_exact_within_its_standard_error(ppca):
    model, x = ppca
    model.set_exact_guide()
    with torch.no_grad():
        model.guide_b.add_(0.2)
    torch.manual_seed(2)
    log_w = log_weights(model.model, model.guide, x, num_particles=4000, chunk_size=1000)
    iw, se, ess = iwae_estimate(log_w)
    exact = model.exact_log_marginal(x)
    assert torch.all((iw - exact).abs() < 4 * se + 1e-3)
    assert torch.all(ess > 100) and torch.all(ess <= 4000)


def test_prior_proposal_estimates_the_same_marginal(ppca):
    model, x = ppca
    torch.manual_seed(3)
    log_w = log_weights(model.model, model.guide, x, num_particles=20000, proposal="prior", chunk_size=5000)
    iw, se, _ = iwae_estimate(log_w)
    assert torch.all((iw - model.exact_log_marginal(x)).abs() < 5 * se + 0.05)
    with pytest.raises(ValueError, match="proposal"):
        log_weights(model.model, model.guide, x, proposal="posterior")


def test_estimator_statistics_on_known_weights():
    log_w = torch.full((8, 3), -2.0)
    value, se, ess = iwae_estimate(log_w)
    torch.testing.assert_close(value, torch.full((3,), -2.0))
    torch.testing.assert_close(se, torch.zeros(3))
    torch.testing.assert_close(ess, torch.full((3,), 8.0))
    one_heavy = torch.tensor([[0.0], [-1e4], [-1e4], [-1e4]])
    assert iwae_estimate(one_heavy)[2].item() == pytest.approx(1.0)
    torch.testing.assert_close(log_mean_exp(torch.log(torch.tensor([[1.0], [3.0]]))), torch.log(torch.tensor([2.0])))


def test_importance_estimates_share_particles(ppca):
    model, x = ppca
    model.set_exact_guide()
    elbo, iw = streaming_estimates(model.model, model.guide, x, k=5)
    assert elbo.estimator == "elbo" and iw.estimator == "iwae5"
    torch.testing.assert_close(elbo.value, model.exact_log_marginal(x), atol=1e-9, rtol=0)
    torch.testing.assert_close(iw.value, model.exact_log_marginal(x), atol=1e-9, rtol=0)


class GlobalLatent(PyroModule):
    """Breaks the contract: a latent outside the data plate."""

    def model(self, x, y=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0).expand(x.shape).to_event(1), obs=x)

    def guide(self, x, y=None):
        pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))


class MissingInGuide(PyroModule):
    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            u = pyro.sample("u", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal((z + u).unsqueeze(-1), 1.0).expand(x.shape).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))


def test_contract_violations_are_refused():
    x = torch.randn(4, 3)
    m = GlobalLatent()
    with pytest.raises(TraceError, match="'w' is outside pyro.plate"):
        log_weights(m.model, m.guide, x, num_particles=2, vectorize=False)
    m = MissingInGuide()
    with pytest.raises(TraceError, match="'u' of the model is not sampled by the guide"):
        log_weights(m.model, m.guide, x, num_particles=2, vectorize=False)
    with pytest.raises(ValueError, match="num_particles"):
        log_weights(m.model, m.guide, x, num_particles=0)


class PixelPlates(PyroModule):
    """Per-pixel sites in a nested plate: their log-densities must be summed per datapoint."""

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))  # [.., B, 1, 1]
            with pyro.plate("pixels", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z[..., 0], 1.0), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Delta(x.mean(-1)[:, None, None], event_dim=1))  # z = mean pixel


def test_nested_plates_are_summed_per_datapoint():
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64)
    m = PixelPlates()
    assert max_plate_nesting(m.model, m.guide, x, None) == 2
    log_w = log_weights(m.model, m.guide, x, num_particles=2)
    assert log_w.shape == (2, 3)
    # a point-mass guide has log q = 0, so log w = log p(z) + sum over pixels of log p(x_j | z)
    z = x.mean(-1, keepdim=True)
    normal = torch.distributions.Normal
    by_hand = normal(0.0, 1.0).log_prob(z[:, 0]) + normal(z, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(log_w, by_hand.expand(2, 3))


def test_iwae_objective_is_the_negative_bound(ppca):
    model, x = ppca
    objective = make_objective("iwae", num_particles=5, max_plate_nesting=1)
    torch.manual_seed(7)
    loss = objective.loss(model.model, model.guide, x)
    torch.manual_seed(7)
    bound = log_mean_exp(log_weights(model.model, model.guide, x, num_particles=5, nesting=1), 0).sum()
    torch.testing.assert_close(loss, -bound)
    loss.backward()
    assert model.W.grad is not None and torch.isfinite(model.W.grad).all()
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("renyi")
    with pytest.raises(ValueError, match="particles"):
        make_objective("trace", num_particles=0)


def test_trace_objectives_match_the_mean_log_weight_for_an_exact_guide(ppca):
    model, x = ppca
    model.set_exact_guide()
    exact = model.exact_log_marginal(x).sum()
    for name in ("trace", "meanfield", "iwae"):
        loss = make_objective(name, num_particles=3, max_plate_nesting=1).loss(model.model, model.guide, x)
        torch.testing.assert_close(-loss.detach(), exact, atol=1e-8, rtol=0)


def test_generate_and_reconstruct_shapes_follow_the_template(ppca):
    model, x = ppca
    sample, mean = generate(model.model, x.new_zeros(11, 5))
    assert sample.shape == mean.shape == (11, 5) and sample.dtype == torch.float64
    assert not torch.equal(sample, mean)
    torch.testing.assert_close(mean.mean(0), model.mu.detach(), atol=3.0, rtol=0)
    recon = reconstruct(model.model, model.guide, x)
    assert recon.shape == x.shape


def test_mixture_proposal_is_unbiased_and_bounded(ppca):
    model, x = ppca
    model.set_exact_guide()
    with torch.no_grad():
        model.guide_b.add_(0.3)
    torch.manual_seed(4)
    log_w = log_weights(model.model, model.guide, x, num_particles=4001, proposal="mixture", chunk_size=1000)
    assert log_w.shape == (4001, 7)
    iw, se, _ = iwae_estimate(log_w)
    assert torch.all((iw - model.exact_log_marginal(x)).abs() < 4 * se + 1e-3)
    # defensive weights never exceed 2 p(x | z) <= 2 max_z N(x; Wz + mu, sigma^2 I)
    d = x.shape[1]
    max_lik = -0.5 * d * math.log(2 * math.pi * 0.25)
    assert log_w.max().item() <= max_lik + math.log(2.0) + 1e-9
    single = log_weights(model.model, model.guide, x, num_particles=3, proposal="mixture", vectorize=False)
    assert single.shape == (3, 7) and torch.isfinite(single).all()


def test_lean_trace_elbo_matches_pyro_trace_elbo_in_value_and_gradient():
    import pyro.infer

    from ppl_genmodels.models.vae import VAE

    torch.manual_seed(0)
    model = VAE(6, 2, hidden=(8,))
    x = (torch.rand(5, 6) < 0.4).float()
    objective = make_objective("trace", 1, 1)
    torch.manual_seed(11)
    lean = objective.loss(model.model, model.guide, x)
    lean_grads = torch.autograd.grad(lean, list(model.parameters()))
    assert objective.lean is True
    torch.manual_seed(11)
    reference = pyro.infer.Trace_ELBO().differentiable_loss(model.model, model.guide, x, None)
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    torch.testing.assert_close(lean, reference)
    for a, b in zip(lean_grads, ref_grads):
        torch.testing.assert_close(a, b)


class DiscreteLatent(PyroModule):
    """A non-reparameterisable latent: the objective must fall back on Pyro's Trace_ELBO."""

    def __init__(self):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.zeros(()))

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(logits=x.new_zeros(())))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1), 1.0).expand(x.shape).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=self.logit.expand(x.shape[0])))


def test_trace_objective_falls_back_for_discrete_latents():
    m = DiscreteLatent()
    objective = make_objective("trace", 1, 1)
    loss = objective.loss(m.model, m.guide, torch.randn(4, 2))
    assert objective.lean is False and torch.isfinite(loss)
    loss.backward()
    assert m.logit.grad is not None  # the score-function term reaches the guide
