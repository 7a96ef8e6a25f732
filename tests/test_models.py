"""Tests of the built-in models (VAE, CVAE, HVAE, PPCA), the MLP block and the example StudentTVAE.

Checks the model contract through Pyro traces (site names, the "data" plate,
shapes with and without an outer particles plate), the likelihoods against
hand computations, the PPCA closed forms against independent computations, and
that short SVI runs improve the ELBO.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample

from ppl_genmodels.models import CVAE, DESCRIPTIONS, HVAE, PPCA, REGISTRY, VAE
from ppl_genmodels.nets import MLP

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("my_models", ROOT / "examples" / "my_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


StudentTVAE = _load_example().StudentTVAE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


# ----------------------------------------------------------------- fixtures
B, D, Z, Y, K = 6, 5, 3, 4, 3


def _data(likelihood, n=B, d=D, dtype=torch.float32):
    if likelihood == "bernoulli":
        return torch.randint(0, 2, (n, d)).to(dtype)
    if likelihood == "categorical":
        return torch.randint(0, 4, (n, d)).to(dtype)
    return torch.randn(n, d, dtype=dtype)


def _onehot(n=B, k=Y, dtype=torch.float32):
    return F.one_hot(torch.randint(0, k, (n,)), k).to(dtype)


# name -> (constructor, likelihood of the data, whether y is passed)
CASES = {
    "vae-bernoulli": (lambda: VAE(D, Z, hidden=(8,)), "bernoulli", False),
    "vae-gaussian": (lambda: VAE(D, Z, hidden=(8, 7), likelihood="gaussian"), "gaussian", False),
    "vae-gaussian-fixed": (
        lambda: VAE(D, Z, hidden=(8,), likelihood="gaussian", scale=0.3),
        "gaussian",
        False,
    ),
    "vae-categorical": (
        lambda: VAE(D, Z, hidden=(8,), likelihood="categorical", n_levels=4),
        "categorical",
        False,
    ),
    "cvae-onehot": (lambda: CVAE(D, Z, y_dim=Y, hidden=(8,), y_kind="onehot"), "bernoulli", True),
    "cvae-real-gaussian": (
        lambda: CVAE(D, Z, y_dim=Y, hidden=(8,), likelihood="gaussian", y_kind="real"),
        "gaussian",
        True,
    ),
    "vae-fullrank": (lambda: VAE(D, Z, hidden=(8,), guide="fullrank"), "bernoulli", False),
    "vae-iaf-tanh": (lambda: VAE(D, Z, hidden=(8, 7), guide="iaf:2", activation="tanh"), "bernoulli", False),
    "cvae-iaf": (lambda: CVAE(D, Z, y_dim=Y, hidden=(8,), y_kind="onehot", guide="iaf:1"), "bernoulli", True),
    "ppca": (lambda: PPCA(D, Z), "gaussian", False),
    "studentt": (lambda: StudentTVAE(D, Z, hidden=(8,)), "gaussian", False),
    "studentt-learned-df": (lambda: StudentTVAE(D, Z, hidden=(8,), df=None), "gaussian", False),
}


def _make(name, dtype=torch.float32):
    ctor, lik, with_y = CASES[name]
    model = ctor().to(dtype)
    x = _data(lik, dtype=dtype)
    y = _onehot(dtype=dtype) if with_y else None
    return model, x, y


def _particles(fn, k=K):
    def wrapped(*args, **kwargs):
        with pyro.plate("particles", k, dim=-2):
            return fn(*args, **kwargs)

    return wrapped


def _traces(model, x, y, k=None):
    """Guide trace and the model trace replayed on it (optionally under a particles plate)."""
    guide, mdl = model.guide, model.model
    if k is not None:
        guide, mdl = _particles(guide, k), _particles(mdl, k)
    gtr = poutine.trace(guide).get_trace(x, y)
    mtr = poutine.trace(poutine.replay(mdl, trace=gtr)).get_trace(x, y)
    gtr.compute_log_prob()
    mtr.compute_log_prob()
    return gtr, mtr


def _in_data_plate(site, size):
    frames = {f.name: f for f in site["cond_indep_stack"]}
    return "data" in frames and frames["data"].size == size and frames["data"].dim == -1


# ------------------------------------------------------------------------ MLP
def test_mlp_shapes_and_layers():
    net = MLP(4, (16, 8), 3)
    assert net(torch.randn(2, 5, 4)).shape == (2, 5, 3)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4, 16), (16, 8), (8, 3)]
    assert not isinstance(net[-1], torch.nn.ReLU)
    affine = MLP(4, (), 2)
    assert len(affine) == 1 and affine(torch.randn(7, 4)).shape == (7, 2)
    assert isinstance(MLP(2, (3,), 1, activation=torch.nn.Tanh)[1], torch.nn.Tanh)


def test_mlp_rejects_bad_dims():
    with pytest.raises(ValueError):
        MLP(0, (4,), 2)
    with pytest.raises(ValueError):
        MLP(3, (4, -1), 2)


# ------------------------------------------------------- construction / registry
def test_registry_and_signatures():
    assert REGISTRY == {"vae": VAE, "cvae": CVAE, "hvae": HVAE, "ppca": PPCA}
    assert set(DESCRIPTIONS) == set(REGISTRY)
    assert all(isinstance(d, str) and d and "\n" not in d for d in DESCRIPTIONS.values())
    expected = {  # each constructor names only what its model uses
        VAE: ["x_dim", "z_dim", "y_dim", "hidden", "likelihood", "n_levels", "scale", "guide", "activation"],
        CVAE: ["x_dim", "z_dim", "y_dim", "hidden", "likelihood", "n_levels", "scale", "y_kind", "guide",
               "activation"],
        HVAE: ["x_dim", "z_dim", "y_dim", "z1_dim", "hidden", "hidden2", "likelihood", "n_levels", "scale",
               "activation"],
        PPCA: ["x_dim", "z_dim", "y_dim", "likelihood", "scale"],
    }
    for cls, names in expected.items():
        params = inspect.signature(cls).parameters
        assert list(params) == names
        assert params["z_dim"].default == (50 if cls is HVAE else 16) and params["y_dim"].default == 0
        assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in names[2:])


@pytest.mark.parametrize("name", ["vae-categorical", "cvae-onehot", "ppca", "vae-gaussian-fixed", "vae-iaf-tanh"])
def test_state_dict_round_trips_into_a_fresh_model(name):
    model, _, _ = _make(name)
    clone, _, _ = _make(name)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    clone.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values()))


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (VAE, dict(likelihood="poisson")),
        (CVAE, dict(likelihood="poisson", y_dim=2)),
        (VAE, dict(likelihood="categorical")),  # n_levels missing
        (VAE, dict(likelihood="categorical", n_levels=1)),
        (CVAE, dict(likelihood="categorical", y_dim=2)),
        (VAE, dict(likelihood="gaussian", scale=0.0)),
        (VAE, dict(hidden=256)),
        (VAE, dict(hidden=(0,))),
        (VAE, dict(y_dim=-1)),
        (CVAE, dict()),  # y_dim missing
        (CVAE, dict(y_dim=2, y_kind="ordinal")),
        (PPCA, dict(likelihood="bernoulli")),
        (PPCA, dict(scale=-1.0)),
    ],
)
def test_bad_arguments_raise_value_error(cls, kwargs):
    with pytest.raises(ValueError) as err:
        cls(4, 2, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cls", [VAE, CVAE, PPCA])
@pytest.mark.parametrize("x_dim, z_dim", [(0, 2), (3, 0), (3.5, 2)])
def test_bad_dims_raise(cls, x_dim, z_dim):
    with pytest.raises(ValueError):
        cls(x_dim, z_dim, y_dim=2, likelihood="gaussian")


# -------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", list(CASES))
def test_sites_in_data_plate(name):
    model, x, y = _make(name)
    gtr, mtr = _traces(model, x, y)
    zg, zm, xs = gtr.nodes["z"], mtr.nodes["z"], mtr.nodes["x"]
    assert zg["value"].shape == (B, Z) and zm["value"] is zg["value"]
    assert xs["is_observed"] and xs["value"] is x and not zm["is_observed"]
    for site in (zg, zm, xs):
        assert _in_data_plate(site, B)
        assert site["log_prob"].shape == (B,)
        assert torch.isfinite(site["log_prob"]).all()
    # global parameters are module parameters, never sample/param sites
    for tr in (gtr, mtr):
        names = {
            n
            for n, s in tr.nodes.items()
            if s["type"] == "param" or (s["type"] == "sample" and not site_is_subsample(s))
        }
        assert names <= {"z", "x"}


@pytest.mark.parametrize("name", list(CASES))
def test_vectorized_over_particles(name):
    model, x, y = _make(name)
    gtr, mtr = _traces(model, x, y, k=K)
    z = gtr.nodes["z"]["value"]
    assert z.shape == (K, B, Z)
    assert mtr.nodes["z"]["log_prob"].shape == (K, B)
    assert mtr.nodes["x"]["log_prob"].shape == (K, B)
    assert gtr.nodes["z"]["log_prob"].shape == (K, B)
    # each particle's log-probs equal a plain (non-vectorized) run at that particle's z
    for k in range(K):
        tr = poutine.trace(poutine.condition(model.model, data={"z": z[k]})).get_trace(x, y)
        tr.compute_log_prob()
        for site in ("z", "x"):
            torch.testing.assert_close(tr.nodes[site]["log_prob"], mtr.nodes[site]["log_prob"][k])


@pytest.mark.parametrize("name", list(CASES))
def test_elbo_finite_and_gradients_reach_every_parameter(name):
    model, x, y = _make(name)
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    value = loss.differentiable_loss(model.model, model.guide, x, y)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(CASES))
def test_float64_follows_data(name):
    model, x, y = _make(name, dtype=torch.float64)
    gtr, mtr = _traces(model, x, y, k=2)
    for site in (gtr.nodes["z"], mtr.nodes["z"], mtr.nodes["x"]):
        assert site["value"].dtype == torch.float64
        assert site["log_prob"].dtype == torch.float64
    xs, aux = model.sample_data(3, y=None if y is None else y[:3])
    assert xs.dtype == torch.float64 and aux["z"].dtype == torch.float64


@pytest.mark.parametrize("name", list(CASES))
def test_sample_data_shapes(name):
    model, _, _ = _make(name)
    x, aux = model.sample_data(7)
    assert x.shape == (7, D) and aux["z"].shape == (7, Z)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    lik = CASES[name][1]
    if lik == "bernoulli":
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    if lik == "categorical":
        assert (x == x.round()).all() and x.min() >= 0 and x.max() <= 3
    # decode gives p(x | z) with the data's event shape and batch shape of z
    px = model.decode(aux["z"], aux.get("y"))
    assert px.event_shape == (D,) and px.batch_shape == (7,)
    assert px.log_prob(x).shape == (7,)


# --------------------------------------------------------------- likelihoods
def _x_logprob(model, x, z, y=None):
    tr = poutine.trace(poutine.condition(model.model, data={"z": z})).get_trace(x, y)
    tr.compute_log_prob()
    return tr.nodes["x"]["log_prob"]


def test_vae_bernoulli_likelihood_by_hand():
    model, x, _ = _make("vae-bernoulli")
    z = torch.randn(B, Z)
    logits = model.decoder(z)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    torch.testing.assert_close(_x_logprob(model, x, z), expected)


def test_vae_gaussian_likelihood_learned_and_fixed_scale():
    model, x, _ = _make("vae-gaussian")
    with torch.no_grad():
        model.head.log_scale.copy_(torch.linspace(-1, 1, D))
    z = torch.randn(B, Z)
    scale = torch.linspace(-1, 1, D).exp()
    expected = torch.distributions.Normal(model.decoder(z), scale).log_prob(x).sum(-1)
    torch.testing.assert_close(_x_logprob(model, x, z), expected)
    assert any(n.endswith("log_scale") for n, _ in model.named_parameters())

    fixed, x, _ = _make("vae-gaussian-fixed")
    expected = torch.distributions.Normal(fixed.decoder(z), 0.3).log_prob(x).sum(-1)
    torch.testing.assert_close(_x_logprob(fixed, x, z), expected)
    assert not any("scale" in n for n, _ in fixed.named_parameters())


def test_vae_categorical_likelihood_by_hand():
    model, x, _ = _make("vae-categorical")
    z = torch.randn(B, Z)
    logp = model.decoder(z).reshape(B, D, 4).log_softmax(-1)  # [B, D, L]
    expected = logp.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).sum(-1)
    torch.testing.assert_close(_x_logprob(model, x, z), expected)
    assert model.decoder(z).shape == (B, D * 4)


def test_vae_guide_parameterisation():
    """q(z|x) = N(loc, softplus(raw) + 1e-4) with [loc, raw] = encoder(x)."""
    model, x, _ = _make("vae-gaussian")
    q = poutine.trace(model.guide).get_trace(x).nodes["z"]["fn"].base_dist
    loc, raw = model.encoder(x).chunk(2, -1)
    torch.testing.assert_close(q.loc, loc)
    torch.testing.assert_close(q.scale, F.softplus(raw) + 1e-4)


# ----------------------------------------------------------------------- CVAE
def test_cvae_onehot_generates_with_sampled_y():
    model = CVAE(D, Z, y_dim=Y, hidden=(8,), y_kind="onehot")
    x = _data("bernoulli")
    tr = poutine.trace(model.model).get_trace(x)
    ys = tr.nodes["y"]
    assert not ys["is_observed"] and _in_data_plate(ys, B)
    assert ys["value"].shape == (B, Y) and (ys["value"].sum(-1) == 1).all()
    torch.testing.assert_close(ys["fn"].probs, torch.full((B, Y), 1.0 / Y))
    # generation: the observed site can be unconditioned and sampled
    gen = poutine.trace(poutine.uncondition(model.model)).get_trace(x)
    assert gen.nodes["x"]["value"].shape == (B, D)
    # y sampled inside the model also works under the particles plate
    tr = poutine.trace(_particles(model.model)).get_trace(x)
    tr.compute_log_prob()
    assert tr.nodes["y"]["value"].shape == (K, B, Y) and tr.nodes["x"]["log_prob"].shape == (K, B)


def test_cvae_real_uses_zeros_when_y_missing():
    model = CVAE(D, Z, y_dim=Y, hidden=(8,), likelihood="gaussian", y_kind="real")
    x = _data("gaussian")
    tr = poutine.trace(model.model).get_trace(x)
    assert "y" not in tr.nodes
    z = torch.randn(B, Z)
    zeros = torch.zeros(B, Y)
    torch.testing.assert_close(_x_logprob(model, x, z), _x_logprob(model, x, z, zeros))
    # the prior is p(z | y): it depends on y
    assert not torch.allclose(model.prior(zeros).base_dist.loc, model.prior(_onehot()).base_dist.loc)


def test_cvae_guide_requires_y():
    model, x, _ = _make("cvae-onehot")
    with pytest.raises(ValueError):
        model.guide(x)


def test_cvae_networks_see_y():
    model, x, y = _make("cvae-onehot")
    z = torch.randn(K, B, Z)
    y2 = y.roll(1, dims=-1)
    assert not torch.allclose(model.decode(z, y).log_prob(x), model.decode(z, y2).log_prob(x))
    q1 = poutine.trace(model.guide).get_trace(x, y).nodes["z"]["fn"].base_dist.loc
    q2 = poutine.trace(model.guide).get_trace(x, y2).nodes["z"]["fn"].base_dist.loc
    assert not torch.allclose(q1, q2)
    assert model.decode(z, y).batch_shape == (K, B)
    xs, aux = model.sample_data(5)
    assert (aux["y"].sum(-1) == 1).all() and xs.shape == (5, D)


# ----------------------------------------------------------------------- PPCA
def _random_ppca(x_dim, z_dim, sigma=0.7, scale=None):
    model = PPCA(x_dim, z_dim, scale=scale).double()
    with torch.no_grad():
        model.W.copy_(torch.randn(x_dim, z_dim, dtype=torch.float64))
        model.mu.copy_(torch.randn(x_dim, dtype=torch.float64))
        if scale is None:
            model.log_sigma.fill_(math.log(sigma))
    return model


def test_ppca_log_marginal_matches_explicit_gaussian():
    model = _random_ppca(6, 3)
    x = 2 * torch.randn(10, 6, dtype=torch.float64)
    W, mu, s = model.W.detach(), model.mu.detach(), 0.7
    cov = W @ W.T + s**2 * torch.eye(6, dtype=torch.float64)
    expected = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x)
    got = model.exact_log_marginal(x)
    assert got.shape == (10,) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    # extra leading dims are allowed
    torch.testing.assert_close(model.exact_log_marginal(x.reshape(2, 5, 6)), expected.reshape(2, 5))


@pytest.mark.parametrize("x_dim", [1, 2])
def test_ppca_log_marginal_matches_numerical_integration(x_dim):
    """log p(x) = log integral N(z; 0, 1) N(x; w z + mu, s^2 I) dz on a fine grid (q = 1)."""
    model = _random_ppca(x_dim, 1, sigma=0.5)
    x = torch.randn(4, x_dim, dtype=torch.float64) + model.mu.detach()
    w, mu = model.W.detach()[:, 0], model.mu.detach()
    zs = torch.linspace(-12, 12, 24001, dtype=torch.float64)  # [G]
    dz = zs[1] - zs[0]
    log_joint = torch.distributions.Normal(0.0, 1.0).log_prob(zs) + torch.distributions.Normal(
        zs[:, None, None] * w + mu, 0.5
    ).log_prob(x).sum(-1).T  # [4, G]
    expected = torch.logsumexp(log_joint, dim=-1) + dz.log()
    torch.testing.assert_close(model.exact_log_marginal(x), expected, rtol=0, atol=1e-5)


def _log_joint(model, x, z):
    """log p(x, z) per datapoint from the model's own trace."""
    tr = poutine.trace(poutine.condition(model.model, data={"z": z})).get_trace(x)
    tr.compute_log_prob()
    return tr.nodes["z"]["log_prob"] + tr.nodes["x"]["log_prob"]


def test_ppca_exact_posterior_is_bayes_rule():
    model = _random_ppca(5, 2)
    x = torch.randn(8, 5, dtype=torch.float64)
    post = model.exact_posterior(x)
    assert isinstance(post, torch.distributions.MultivariateNormal)
    assert post.batch_shape == (8,) and post.event_shape == (2,)
    for z in (torch.randn(8, 2, dtype=torch.float64), post.sample()):
        expected = _log_joint(model, x, z) - model.exact_log_marginal(x)
        torch.testing.assert_close(post.log_prob(z), expected, rtol=0, atol=1e-9)


def test_ppca_guide_family_contains_exact_posterior():
    model = _random_ppca(5, 3)
    x = torch.randn(8, 5, dtype=torch.float64)
    model.set_exact_guide()
    A, b, L = model.exact_guide_params()
    torch.testing.assert_close(model.guide_scale_tril(), L)
    z = torch.randn(8, 3, dtype=torch.float64)
    tr = poutine.trace(poutine.condition(model.guide, data={"z": z})).get_trace(x)
    tr.compute_log_prob()
    exact = model.exact_posterior(x)
    torch.testing.assert_close(tr.nodes["z"]["log_prob"], exact.log_prob(z), rtol=0, atol=1e-9)
    # then every importance weight p(x, z) / q(z | x) equals p(x): the ELBO is tight
    gtr, mtr = _traces(model, x, None, k=4)
    log_w = mtr.nodes["z"]["log_prob"] + mtr.nodes["x"]["log_prob"] - gtr.nodes["z"]["log_prob"]
    torch.testing.assert_close(log_w, model.exact_log_marginal(x).expand(4, 8), rtol=0, atol=1e-9)


def test_ppca_guide_scale_tril_is_valid():
    model = PPCA(4, 3)
    with torch.no_grad():
        model.guide_R.copy_(torch.randn(3, 3))
    L = model.guide_scale_tril()
    assert torch.equal(L, L.tril()) and (L.diagonal() > 0).all()


def test_ppca_fixed_scale_and_float32_model_in_float64():
    model = PPCA(4, 2, scale=0.25)
    assert "log_sigma" not in dict(model.named_parameters())
    torch.testing.assert_close(model.sigma, torch.tensor(0.25))
    x64 = torch.randn(3, 4, dtype=torch.float64)
    assert model.exact_log_marginal(x64).dtype == torch.float64
    assert model.exact_posterior(x64).loc.dtype == torch.float64
    torch.testing.assert_close(
        model.exact_log_marginal(x64).float(), model.exact_log_marginal(x64.float())
    )


def test_ppca_more_latents_than_dims():
    model = _random_ppca(2, 3)
    x = torch.randn(4, 2, dtype=torch.float64)
    W = model.W.detach()
    cov = W @ W.T + 0.49 * torch.eye(2, dtype=torch.float64)
    expected = torch.distributions.MultivariateNormal(model.mu.detach(), cov).log_prob(x)
    torch.testing.assert_close(model.exact_log_marginal(x), expected)


# ------------------------------------------------------------------------ SVI
def _mean_elbo(model, x, n=64):
    loss = Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        return -loss.loss(model.model, model.guide, x) / x.shape[0]


def _fit(model, x, steps, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = Trace_ELBO(num_particles=1, max_plate_nesting=1)
    for _ in range(steps):
        opt.zero_grad()
        loss.differentiable_loss(model.model, model.guide, x).backward()
        opt.step()


def test_svi_improves_vae_elbo():
    protos = torch.tensor([[1.0] * 5 + [0.0] * 5, [0.0] * 5 + [1.0] * 5])
    x = protos[torch.randint(0, 2, (128,))]
    x = torch.where(torch.rand_like(x) < 0.05, 1 - x, x)
    model = VAE(10, 2, hidden=(32,))
    before = _mean_elbo(model, x)
    _fit(model, x, 300)
    after = _mean_elbo(model, x)
    assert after > before + 2.0, (before, after)


@pytest.mark.parametrize("df", [4.0, None])
def test_svi_improves_student_t_vae_elbo(df):
    t = 3 * torch.rand(128)
    x = torch.stack([t.cos(), t.sin()], -1) + 0.05 * torch.randn(128, 2)
    model = StudentTVAE(2, 2, hidden=(32,), df=df)
    before = _mean_elbo(model, x)
    _fit(model, x, 300)
    after = _mean_elbo(model, x)
    assert after > before + 1.0, (before, after)
    if df is None:
        assert model.log_df.requires_grad and not torch.isclose(model.log_df, torch.tensor(4.0).log())


def test_svi_fits_ppca_toward_the_exact_marginal():
    """Training PPCA by SVI raises the exact log-likelihood; the ELBO stays below it."""
    true = _random_ppca(4, 1, sigma=0.3)
    x, _ = true.sample_data(256)
    model = PPCA(4, 1).double()
    ll0 = model.exact_log_marginal(x).mean()
    _fit(model, x, 400, lr=3e-2)
    ll1 = model.exact_log_marginal(x).mean().detach()
    assert ll1 > ll0 + 0.5
    assert _mean_elbo(model, x) <= ll1 + 1e-6


def test_bernoulli_vector_equals_independent_bernoulli():
    from ppl_genmodels.models.vae import BernoulliVector

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6, dtype=torch.float64)  # [particles, batch, pixels]
    x = (torch.rand(4, 6) < 0.5).double()              # [batch, pixels], broadcasts
    ours = BernoulliVector(logits)
    reference = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)
    assert ours.batch_shape == reference.batch_shape and ours.event_shape == reference.event_shape
    torch.testing.assert_close(ours.log_prob(x), reference.log_prob(x.expand(3, 4, 6)))
    torch.testing.assert_close(ours.mean, reference.mean)
    assert ours.expand((2, 3, 4)).batch_shape == (2, 3, 4)
    draws = ours.sample((5,))
    assert draws.shape == (5, 3, 4, 6) and set(draws.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        BernoulliVector(logits, validate_args=True).log_prob(torch.full((4, 6), 0.5, dtype=torch.float64))
