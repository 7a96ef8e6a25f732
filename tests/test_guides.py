"""Guide families of the built-in VAEs (diag, fullrank, iaf:N), named activations, and the two-layer HVAE.

Checks each family's log q against a direct computation, that vectorized
particles give the same per-particle log weights as a loop, that the guides
train and are saved, that the per-datapoint guides of ``compare`` stay in the
family, and that every backend (evaluate with elbo/iwae/ais, bdmc, compare) runs
on a tiny digits run of each family and of the HVAE.
"""

import math
from types import SimpleNamespace

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

import ppl_genmodels
from ppl_genmodels import traces
from ppl_genmodels.comparison import compare_run
from ppl_genmodels.config import ConfigError, RunConfig, build_model, constructor_arguments
from ppl_genmodels.evaluation import bdmc_run, evaluate_run
from ppl_genmodels.inference.importance import streaming_estimates
from ppl_genmodels.inference.local import fit_local_guides, local_guide, sample_local
from ppl_genmodels.models import CVAE, DESCRIPTIONS, HVAE, REGISTRY, VAE
from ppl_genmodels.models.vae import GuideFamily, parse_guide
from ppl_genmodels.nets import ACTIVATIONS, MLP

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("diag", "fullrank", "iaf:2")
D, Z, B, K = 6, 3, 5, 4


def _data(n=B, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, D), 0.5, dtype=dtype), generator=g)


def _vae(guide, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return VAE(D, Z, hidden=(8,), guide=guide).to(dtype)


def _hvae(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return HVAE(D, 2, z1_dim=3, hidden=(8,), hidden2=(5,)).to(dtype)


def _models():
    return {**{g: _vae(g) for g in FAMILIES}, "hvae": _hvae()}


# ----------------------------------------------------------- options and refusals
@pytest.mark.parametrize("spec", ["", "Diag:1", "full", "iaf", "iaf:0", "iaf:-1", "iaf:x", "iaf:2:3", 3, None])
def test_bad_guide_specs_are_refused_in_one_line(spec):
    with pytest.raises(ValueError, match="expected diag, fullrank or iaf:N") as err:
        VAE(D, Z, guide=spec)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        CVAE(D, Z, y_dim=2, guide=spec)


def test_guide_specs_parse():
    assert parse_guide("diag") == ("diag", 0)
    assert parse_guide("fullrank") == ("fullrank", 0)
    assert parse_guide("iaf:3") == ("iaf", 3)
    assert GuideFamily.out_dim("fullrank", 4) == 4 + 10 and GuideFamily.out_dim("iaf:1", 4) == 8


def test_activations_by_name_and_refusal():
    for name, cls in ACTIVATIONS.items():
        assert isinstance(MLP(2, (3,), 1, activation=name)[1], cls)
    assert {"relu", "tanh", "softplus", "elu"} <= set(ACTIVATIONS)
    assert isinstance(MLP(2, (3,), 1, activation=torch.nn.Tanh)[1], torch.nn.Tanh)  # a class still works
    for bad in ("swish", "", 3):
        with pytest.raises(ValueError, match="expected one of relu, tanh") as err:
            MLP(2, (3,), 1, activation=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown activation"):
        VAE(D, Z, activation="swish")
    with pytest.raises(ValueError, match="unknown activation"):
        HVAE(D, activation="swish")


def test_options_reach_the_constructor_and_build_burda_et_al_one_layer_network():
    mnist = SimpleNamespace(x_dim=784, y_dim=0, likelihood="bernoulli", n_levels=None, condition=None)
    config = RunConfig(model="vae", data="mnist", activation="tanh", hidden=[200, 200], z_dim=50, guide="iaf:1")
    kwargs = constructor_arguments(VAE, config, mnist)
    assert kwargs["activation"] == "tanh" and kwargs["guide"] == "iaf:1"
    model = VAE(**kwargs)
    shapes = lambda net: [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert shapes(model.encoder) == [(784, 200), (200, 200), (200, 100)]  # 784-200-200-(2 x 50)
    assert shapes(model.decoder) == [(50, 200), (200, 200), (200, 784)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in [*model.encoder, *model.decoder]) == 4
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    with pytest.raises(ConfigError, match="no constructor argument 'guide'"):
        constructor_arguments(HVAE, RunConfig(model="hvae", guide="iaf:1"), mnist)


def test_bad_options_are_one_line_config_errors():
    dataset = ppl_genmodels.load_dataset("digits", ppl_genmodels.DataOptions(max_examples=50), seed=0)
    for option in (dict(guide="iaf:zero"), dict(activation="swish")):
        with pytest.raises(ConfigError) as err:
            build_model(RunConfig(model="vae", **option), dataset)
        assert "\n" not in str(err.value)
    config = RunConfig(model="cvae", guide="fullrank", activation="elu")
    assert build_model(config, ppl_genmodels.load_dataset(
        "digits", ppl_genmodels.DataOptions(max_examples=50, condition="label"), seed=0)) is not None
    assert (config.guide, config.activation) == ("fullrank", "elu")  # the values used are written back


def test_registry_has_hvae():
    assert REGISTRY["hvae"] is HVAE and "hvae" in DESCRIPTIONS
    model = HVAE(784)
    shapes = lambda net: [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert shapes(model.encoder1) == [(784, 200), (200, 200), (200, 200)]   # q(z1 | x): 2 x 100
    assert shapes(model.encoder2) == [(100, 100), (100, 100), (100, 100)]   # q(z2 | z1): 2 x 50
    assert shapes(model.prior1) == [(50, 100), (100, 100), (100, 200)]      # p(z1 | z2): 2 x 100
    assert shapes(model.decoder) == [(100, 200), (200, 200), (200, 784)]    # p(x | z1)
    assert isinstance(model.encoder1[1], torch.nn.Tanh)
    for bad in (dict(z1_dim=0), dict(hidden2=5), dict(hidden2=(0,)), dict(likelihood="poisson")):
        with pytest.raises(ValueError) as err:
            HVAE(D, 2, **bad)
        assert "\n" not in str(err.value)


def test_hvae_contract_float64_and_gradients():
    model, x = _hvae(torch.float64), _data(dtype=torch.float64)
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    sites = {n: s for n, s in model_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    assert list(sites) == ["z2", "z1", "x"] and sites["x"]["is_observed"]
    assert all("data" in {f.name for f in s["cond_indep_stack"]} for s in sites.values())
    assert sites["z2"]["value"].shape == (B, 2) and sites["z1"]["value"].shape == (B, 3)
    assert all(s["value"].dtype == torch.float64 for s in sites.values())
    loss = -traces.log_weights(model.model, model.guide, x, num_particles=3).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    xs, latents = model.sample_data(4)
    assert xs.shape == (4, D) and latents["z2"].shape == (4, 2) and latents["z1"].shape == (4, 3)
    assert set(xs.unique().tolist()) <= {0.0, 1.0} and xs.dtype == torch.float64


# ------------------------------------------------------------------- log q by hand
def test_fullrank_log_q_matches_torch_multivariate_normal():
    model, x = _vae("fullrank", torch.float64), _data(dtype=torch.float64)
    trace = poutine.trace(model.guide).get_trace(x)
    site = trace.nodes["z"]
    assert isinstance(site["fn"], dist.MultivariateNormal) and site["fn"].event_shape == (Z,)
    out = model.encoder(x)
    loc, entries = out[:, :Z], out[:, Z:]
    L = torch.zeros(B, Z, Z, dtype=torch.float64)
    k = 0
    for i in range(Z):  # the lower triangle row by row, the diagonal through softplus + 1e-4
        for j in range(i + 1):
            L[:, i, j] = F.softplus(entries[:, k]) + 1e-4 if i == j else entries[:, k]
            k += 1
    want = torch.distributions.MultivariateNormal(loc, scale_tril=L).log_prob(site["value"])
    torch.testing.assert_close(site["fn"].log_prob(site["value"]), want)
    torch.testing.assert_close(site["fn"].covariance_matrix, L @ L.mT)
    assert (site["fn"].covariance_matrix - torch.diag_embed(site["fn"].variance)).abs().max() > 1e-3  # not diagonal


def _iaf_by_hand(model, x, eps):
    """z and log q(z | x) for the base draw ``eps``, applying each layer of eq. (14) directly."""
    h = x
    for layer in list(model.encoder)[:-1]:
        h = layer(h)
    loc, raw = model.encoder[-1](h).chunk(2, -1)
    scale = F.softplus(raw) + 1e-4
    base = torch.distributions.Normal(loc, scale)
    z, log_det = loc + scale * eps, 0.0
    for flow in model.q.flows:
        mean, logit = flow.nn(z, context=h)
        gate = torch.sigmoid(logit + 2.0)  # Pyro's sigmoid_bias
        z = gate * z + (1 - gate) * mean
        log_det = log_det + torch.log(gate).sum(-1)
    return z, base.log_prob(loc + scale * eps).sum(-1) - log_det


def test_iaf_log_q_is_base_density_minus_log_det_jacobian():
    model, x = _vae("iaf:3", torch.float64), _data(dtype=torch.float64)
    assert len(model.q.flows) == 3
    eps = torch.randn(B, Z, dtype=torch.float64)
    z, want = _iaf_by_hand(model, x, eps)
    q = model.q(model.encoder, x)
    assert isinstance(q, dist.TransformedDistribution) and q.batch_shape == (B,) and q.event_shape == (Z,)
    torch.testing.assert_close(q.log_prob(z.clone()), want)  # through the flow's inverse
    drawn = q.rsample()
    torch.testing.assert_close(q.log_prob(drawn), q.log_prob(drawn.clone()))  # cached pass == inverse
    # the layers really are autoregressive: output d depends on inputs before it in the layer's order only
    jac = torch.autograd.functional.jacobian(lambda e: _iaf_by_hand(model, x[:1], e)[0], eps[:1])[0, :, 0, :]
    assert not torch.allclose(jac, torch.diag(jac.diagonal()))


def test_iaf_flows_are_submodules_that_get_gradients_and_are_saved():
    model, x = _vae("iaf:2"), _data()
    names = [n for n, _ in model.named_parameters() if n.startswith("q.flows.")]
    assert names and all(n in model.state_dict() for n in names)
    loss = -traces.log_weights(model.model, model.guide, x, num_particles=3).mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("q.flows.")]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    clone = _vae("iaf:2", seed=1)
    clone.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    a = model.q(model.encoder, x).log_prob(torch.zeros(B, Z))
    b = clone.q(clone.encoder, x).log_prob(torch.zeros(B, Z))
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------- vectorized particles
class _Record(Messenger):
    def __init__(self, store):
        super().__init__()
        self.store = store

    def _postprocess_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            self.store[msg["name"]] = msg["value"].detach()


class _Fix(Messenger):
    """Gives latent sites fixed values without marking them observed (they are scored as draws)."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]


def _with(messenger_cls, guide, arg):
    def wrapped(x, y=None):
        with messenger_cls(arg):
            guide(x, y)

    return wrapped


@pytest.mark.parametrize("name", [*FAMILIES, "hvae"])
def test_vectorized_particles_equal_looped_particles(name):
    model, x = _models()[name], _data()
    drawn = {}
    with torch.no_grad():
        log_w = traces.log_weights(model.model, _with(_Record, model.guide, drawn), x, num_particles=K)
        assert log_w.shape == (K, B) and torch.isfinite(log_w).all()
        assert all(v.shape[:2] == (K, B) for v in drawn.values())
        for k in range(K):
            fixed = {site: value[k] for site, value in drawn.items()}  # [B, ...]: no particle dimension
            looped = traces.log_weights(model.model, _with(_Fix, model.guide, fixed), x, vectorize=False)
            torch.testing.assert_close(looped[0], log_w[k], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- local guides
@pytest.mark.parametrize("name, families", [("diag", ["normal"]), ("fullrank", ["mvn"]), ("iaf:2", ["flow"]),
                                            ("hvae", ["normal", "conditional"])])
def test_local_guides_stay_in_the_family_and_start_at_the_amortized_guide(name, families):
    model, x = _models()[name], _data()
    local = local_guide(model.guide, x)
    assert [s.family for s in local.sites] == families
    # the local guide starts as the amortized one: the same log q at the same latents
    drawn = {}
    with torch.no_grad():
        amortized_trace = poutine.trace(_with(_Record, model.guide, drawn)).get_trace(x, None)
        local_trace = poutine.trace(_with(_Fix, local, drawn)).get_trace(x, None)
    for site in drawn:
        torch.testing.assert_close(local_trace.nodes[site]["fn"].log_prob(drawn[site]),
                                   amortized_trace.nodes[site]["fn"].log_prob(drawn[site].clone()),
                                   rtol=1e-5, atol=1e-5)
    if name == "iaf:2":
        params = local.params()["z"]
        assert set(params) == {"loc", "scale", "context"} and params["context"].shape == (B, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    result = fit_local_guides(model.model, model.guide, x, steps=60, eval_particles=300)
    amortized, _ = streaming_estimates(model.model, model.guide, x, k=300)
    assert result.elbo.mean() > amortized.value.mean()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # flows, q(z2|z1) untouched
    draws = sample_local(result, 7)
    latents = {"hvae": {"z1": (7, B, 3), "z2": (7, B, 2)}}.get(name, {"z": (7, B, Z)})
    assert {k: tuple(v.shape) for k, v in draws.items()} == latents
    with torch.no_grad():
        assert torch.isfinite(traces.log_weights(model.model, result.guide, x, num_particles=3)).all()


def test_hvae_local_guide_keeps_q_z2_given_z1():
    model, x = _hvae(), _data()
    local = local_guide(model.guide, x)
    draws = sample_local(local, 2000)
    z1, z2 = draws["z1"], draws["z2"]  # z2 is drawn from q(z2 | z1) at the local z1
    with torch.no_grad():
        loc, _ = model.encoder2(z1).chunk(2, -1)
    resid = z2 - loc
    assert resid.mean(0).abs().max() < 0.2  # centred on the conditional's mean at each z1


# --------------------------------------------------------- tiny digits runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short digits run per guide family and of the HVAE (ReLU VAEs, a tanh HVAE)."""
    out = tmp_path_factory.mktemp("guides")
    made = {}
    for name in (*FAMILIES, "hvae"):
        torch.manual_seed(0)
        options = dict(model_args={"z1_dim": 4, "hidden2": [16]}) if name == "hvae" else dict(guide=name)
        made[name] = ppl_genmodels.fit("hvae" if name == "hvae" else "vae", "digits", out / name.replace(":", ""),
                                       z_dim=2, hidden=[32], epochs=4, lr=3e-3, max_examples=600, eval_k=5,
                                       progress=False, plots=False, evaluate=False, **options)
    return made


@pytest.mark.parametrize("name", [*FAMILIES, "hvae"])
def test_each_family_trains(runs, name):
    run = runs[name]
    val = run.metrics["val_elbo"].to_numpy()
    assert len(val) == 4 and (val[-1] - val[0]) > 2.0
    if name != "hvae":
        assert run.config.guide == name
    reloaded = ppl_genmodels.load_run(run.path)
    for key, value in run.program.state_dict().items():
        torch.testing.assert_close(reloaded.program.state_dict()[key], value)


@pytest.mark.parametrize("name", [*FAMILIES, "hvae"])
def test_every_backend_runs_on_each_family(runs, name):
    run = runs[name]
    torch.manual_seed(0)
    for start in ("prior", "guide"):
        summary, per = evaluate_run(run, estimators="elbo,iwae:20,ais:4", n=4, ais_start=start, progress=False,
                                    save=False)
        means = summary.set_index("estimator")["mean"]
        assert set(means.index) == {"elbo", "iwae20", "ais4"} and means.notna().all()
        assert means["iwae20"] > means["elbo"] - 0.5
    summary, per = bdmc_run(run, n=3, num_steps=4, chains=2, progress=False, save=False)
    assert len(per) == 3 and per.select_dtypes("number").notna().all().all()
    summary, per, _ = compare_run(run, n=3, chains=2, samples=20, warmup=20, local_steps=10, logp_k=50, elbo_k=50,
                                  progress=False, save=False, plots=False)
    assert summary["method"].tolist() == ["iwae50", "hmc", "local", "amortized"]
    assert per[["amortization_gap", "approximation_gap", "local_vs_mcmc_energy"]].notna().all().all()


def test_hvae_iwae_tightens_on_the_elbo(runs):
    run = runs["hvae"]
    torch.manual_seed(1)
    summary, _ = evaluate_run(run, estimators="elbo,iwae:200", n=20, progress=False, save=False)
    means = summary.set_index("estimator")["mean"]
    assert means["iwae200"] > means["elbo"] + 0.1  # two stochastic layers: a visible gap
    assert math.isfinite(means["iwae200"])
