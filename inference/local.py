"""Per-datapoint (non-amortized) guides: the best ELBO the guide's family can reach.

An amortized guide q_phi(z | x) shares one encoder across all datapoints. Its
ELBO falls short of log p(x) for two reasons (Cremer, Li & Duvenaud 2018,
"Inference suboptimality in variational autoencoders", ICML):

    log p(x) - ELBO[q_phi(. | x)]
        = ( log p(x) - ELBO[q*_x] )            approximation gap: the family
        + ( ELBO[q*_x] - ELBO[q_phi(. | x)] )  amortization gap: the encoder

where q*_x = argmax_{q in family} ELBO[q] is the member of the same family
fitted to the single datapoint x with the decoder fixed:

    ELBO[q] = E_{z ~ q} [ log p(x, z | y) - log q(z) ]  <=  log p(x | y).

:func:`fit_local_guides` finds q*_x for every datapoint of a batch at once. It
traces the amortized guide on the batch to find its latent sites (each inside
``pyro.plate("data")`` with batch shape exactly ``[batch]``) and gives each
datapoint its own free parameters in the same family, *initialised at the
amortized guide's output for that datapoint*:

- ``Normal`` or ``Independent(Normal)``, a diagonal Gaussian (the VAE and CVAE
  guides): loc ``[B, *event]`` and log scale ``[B, *event]``;
- ``MultivariateNormal`` (the PPCA guide): loc ``[B, d]`` and a per-datapoint
  Cholesky factor ``[B, d, d]``, stored unconstrained as R with
  L = strictly_lower(R) + diag(exp(diag(R)));
- any other continuous distribution (a LogNormal or Gamma latent, say): a
  diagonal Normal in the unconstrained space of the site's support, pushed
  through T = ``biject_to(support)`` (a ``TransformedDistribution``). Its loc
  starts at T^{-1}(mean of the amortized q) where that mean exists and lies in
  the support (else T^{-1} of a draw from q), its scale at 0.1. This is the
  same family only when q itself is such a pushforward (a LogNormal is); for
  other families it is a different one, and the gaps are then relative to it.

Several latent sites get independent local factors, q(z_1) q(z_2) ...; a guide
whose later sites depend on earlier ones (q(z_2 | z_1, x)) has a richer family
than that. Every built-in model has one latent site, where the families agree.

The parameters of all datapoints are optimised jointly by Adam on the summed
ELBO: datapoint b's parameters appear only in its own term, so the gradient of
the sum with respect to them is the gradient of its own ELBO, and the batch is
only a way of running B independent optimisations in one vectorized pass. The
ELBO is estimated each step from ``num_particles`` reparameterised draws
z = T(eps; lambda) (Kingma & Welling 2014) through
:func:`ppl_genmodels.traces.log_weights`. By default the draws are scored with
the parameters held constant, log q(z; stop_gradient(lambda)), so the gradient
is the path derivative alone, the "sticking the landing" estimator (Roeder, Wu &
Duvenaud 2017, "Sticking the landing: simple, lower-variance gradient
estimators for variational inference"). It drops the score term
-grad_lambda log q(z; lambda), whose expectation is zero, so it is unbiased too,
and its variance vanishes where q is the exact posterior (log p(x, z) - log q(z)
is then constant in z). With the plain estimator Adam keeps jittering around the
optimum with steps of about the learning rate, which costs a visible fraction of
a nat; with this one a family that contains the posterior (PPCA) converges to it.

Gradients are taken with respect to the local parameters only: the model's
parameters are frozen (their ``requires_grad`` flags are restored afterwards)
and never change. After the last step the ELBO of each datapoint is estimated
afresh from ``eval_particles`` draws, with its standard error.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import biject_to
from tqdm.auto import tqdm

from ppl_genmodels import traces
from ppl_genmodels.inference.importance import streaming_estimates
from ppl_genmodels.traces import DATA_PLATE, TraceError

__all__ = ["LocalSite", "LocalGuide", "LocalGuideResult", "local_guide", "fit_local_guides", "sample_local"]

#: initial scale, in unconstrained space, of the fallback family (no amortized scale to start from)
FALLBACK_SCALE = 0.1


@dataclass
class LocalSite:
    """One latent site's per-datapoint parameters, all with leading dimension ``[batch]``.

    ``raw`` holds the unconstrained tensors that are optimised:

    - ``"normal"``:      loc ``[B, *event]``, log_scale ``[B, *event]``
    - ``"mvn"``:         loc ``[B, d]``, raw_tril ``[B, d, d]`` (strictly lower part + log diagonal)
    - ``"transformed"``: loc ``[B, *u_event]``, log_scale ``[B, *u_event]`` of a Normal in the
      unconstrained space, pushed through ``transform`` (u_event: the unconstrained event shape)
    """

    name: str
    family: str
    event_shape: torch.Size
    raw: dict[str, torch.Tensor]
    transform: torch.distributions.Transform | None = None

    def distribution(self, detached: bool = False) -> dist.TorchDistribution:
        """q(z) of this site, batch shape ``[B]`` and event shape ``event_shape``."""
        raw = {k: v.detach() for k, v in self.raw.items()} if detached else self.raw
        if self.family == "normal":
            base = dist.Normal(raw["loc"], raw["log_scale"].exp(), validate_args=False)
            return base.to_event(len(self.event_shape))
        if self.family == "mvn":
            return dist.MultivariateNormal(raw["loc"], scale_tril=_tril(raw["raw_tril"]), validate_args=False)
        base = dist.Normal(raw["loc"], raw["log_scale"].exp(), validate_args=False)
        base = base.to_event(raw["loc"].dim() - 1)
        return dist.TransformedDistribution(base, [self.transform], validate_args=False)

    def params(self) -> dict[str, torch.Tensor]:
        """Readable parameters: ``{"loc", "scale"}`` (diagonal; unconstrained space for the
        fallback family) or ``{"loc", "scale_tril"}`` (MVN), detached."""
        raw = {k: v.detach() for k, v in self.raw.items()}
        if self.family == "mvn":
            return {"loc": raw["loc"].clone(), "scale_tril": _tril(raw["raw_tril"])}
        return {"loc": raw["loc"].clone(), "scale": raw["log_scale"].exp()}


def _tril(raw: torch.Tensor) -> torch.Tensor:
    """``[..., d, d]`` unconstrained -> lower triangular with a positive diagonal."""
    return raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())


def _untril(L: torch.Tensor) -> torch.Tensor:
    return L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log())


class _StickingLanding(dist.TorchDistribution):
    """Draws z = T(eps; phi) with the live parameters, scores log q(z; phi) with detached ones.

    The gradient of log p(x, z) - log q(z) then flows only along the path
    through z: the "sticking the landing" estimator (Roeder, Wu & Duvenaud 2017).
    """

    arg_constraints: dict = {}  # noqa: RUF012 (torch's convention; never mutated)
    has_rsample = True

    def __init__(self, live: dist.TorchDistribution, scorer: dist.TorchDistribution):
        self.live, self.scorer = live, scorer
        super().__init__(live.batch_shape, live.event_shape, validate_args=False)

    @property
    def support(self):
        return self.live.support

    def rsample(self, sample_shape=()) -> torch.Tensor:
        return self.live.rsample(sample_shape)

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            return self.live.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.scorer.log_prob(value)


class LocalGuide:
    """A guide ``guide(x, y=None)`` with free parameters for each datapoint of one batch.

    It samples every site from its own q inside ``pyro.plate("data", B)``; ``x``
    only has to be the batch the guide was built for (its values are not read),
    so it plugs into :func:`ppl_genmodels.traces.log_weights` and everything
    else that takes a guide. ``sticking_landing=True`` scores the draws with
    detached parameters (same values, lower-variance gradients), for fitting.
    """

    def __init__(self, sites: list[LocalSite], batch_size: int, *, sticking_landing: bool = False):
        self.sites = sites
        self.batch_size = batch_size
        self.sticking_landing = sticking_landing

    def distributions(self) -> dict[str, dist.TorchDistribution]:
        """``{site: q}``, each of batch shape ``[B]``."""
        return {s.name: s.distribution() for s in self.sites}

    def params(self) -> dict[str, dict[str, torch.Tensor]]:
        return {s.name: s.params() for s in self.sites}

    def parameters(self) -> list[torch.Tensor]:
        """The unconstrained tensors that are optimised."""
        return [t for s in self.sites for t in s.raw.values()]

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        if x.shape[0] != self.batch_size:
            raise ValueError(f"this local guide was fitted to a batch of {self.batch_size} datapoints, "
                             f"got x with {x.shape[0]}")
        with pyro.plate(DATA_PLATE, self.batch_size, dim=-1, device=x.device):
            for site in self.sites:
                q = site.distribution()
                if self.sticking_landing:
                    q = _StickingLanding(q, site.distribution(detached=True))
                pyro.sample(site.name, q)


def _base_normal(fn) -> torch.distributions.Normal | None:
    """The Normal under any number of ``Independent`` wrappers, or None."""
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    return base if isinstance(base, torch.distributions.Normal) else None


def _fallback_loc(fn, value: torch.Tensor, transform) -> torch.Tensor:
    """T^{-1}(mean of q) for each datapoint whose mean is finite and in the support, else T^{-1}(value)."""
    batch = value.shape[0]
    u_value = transform.inv(value)  # [B, *u_event]
    try:
        mean = fn.mean.expand(value.shape)
    except NotImplementedError:
        return u_value
    mean = torch.where(torch.isfinite(mean), mean, value)
    u_mean = transform.inv(mean)
    ok = fn.support.check(mean).reshape(batch, -1).all(-1) & torch.isfinite(u_mean).reshape(batch, -1).all(-1)
    return torch.where(ok.reshape((batch,) + (1,) * (u_value.dim() - 1)), u_mean, u_value)


def _local_site(name: str, site: dict, batch_size: int) -> LocalSite:
    """Per-datapoint parameters for one amortized guide site, initialised at its output."""
    fn, value = site["fn"], site["value"]
    if DATA_PLATE not in traces.plate_dims(site):
        raise TraceError(f"latent site {name!r} of the guide is outside pyro.plate({DATA_PLATE!r})")
    if tuple(fn.batch_shape) != (batch_size,):
        raise TraceError(
            f"latent site {name!r} has batch shape {tuple(fn.batch_shape)}; local guides need latents whose "
            "batch shape is just the data plate (declare vector latents with .to_event)"
        )
    if fn.support.is_discrete:
        raise TraceError(f"latent site {name!r} is discrete; local guides need continuous latents")
    event = torch.Size(fn.event_shape)
    full = (batch_size,) + tuple(event)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)

    if _base_normal(fn) is not None:
        return LocalSite(name, "normal", event, {"loc": leaf(fn.mean.expand(full)),
                                                 "log_scale": leaf(fn.stddev.expand(full).log())})
    if isinstance(fn, torch.distributions.MultivariateNormal):
        d = event[0]
        return LocalSite(name, "mvn", event, {"loc": leaf(fn.loc.expand(full)),
                                              "raw_tril": leaf(_untril(fn.scale_tril.expand(full + (d,))))})
    transform = biject_to(fn.support)
    value = value.detach().expand(full)
    u_loc = _fallback_loc(fn, value, transform)
    return LocalSite(name, "transformed", event,
                     {"loc": leaf(u_loc), "log_scale": leaf(torch.full_like(u_loc, math.log(FALLBACK_SCALE)))},
                     transform)


def local_guide(guide: Callable, x: torch.Tensor, y: torch.Tensor | None = None) -> LocalGuide:
    """A :class:`LocalGuide` for the batch ``x``, initialised at the amortized ``guide``'s output."""
    with torch.no_grad(), poutine.block():
        trace = prune_subsample_sites(poutine.trace(guide).get_trace(x, y))
    sites = [_local_site(name, site, x.shape[0]) for name, site in trace.nodes.items()
             if site["type"] == "sample" and not site["is_observed"]]
    if not sites:
        raise TraceError("the guide has no latent sites")
    return LocalGuide(sites, x.shape[0])


@contextlib.contextmanager
def _frozen(*fns: Callable):
    """Turn off ``requires_grad`` of the parameters of the modules owning ``fns`` (bound methods); restore after."""
    params = {}
    for fn in fns:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module):
            for p in owner.parameters():
                params.setdefault(id(p), (p, p.requires_grad))
    try:
        for p, _ in params.values():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in params.values():
            p.requires_grad_(flag)


@dataclass
class LocalGuideResult:
    """Per-datapoint guides fitted to one batch, and their ELBOs."""

    guide: LocalGuide          # guide(x, y=None) for THIS batch, with the optimised parameters
    elbo: torch.Tensor         # [batch] ELBO of the local guide, from eval_particles draws
    elbo_se: torch.Tensor      # [batch] its standard error
    params: dict[str, dict[str, torch.Tensor]]  # per site: {"loc", "scale"} [B, *event] or {"loc", "scale_tril"}
    history: torch.Tensor      # [steps] mean ELBO over the batch at each step (training particles)
    seconds: float


def fit_local_guides(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    steps: int = 500,
    lr: float = 0.05,
    num_particles: int = 8,
    eval_particles: int = 1000,
    sticking_landing: bool = True,
    progress: bool = False,
) -> LocalGuideResult:
    """Fit one guide per datapoint of ``x  # [batch, ...]`` in the amortized ``guide``'s family.

    Args:
        model, guide: Pyro programs ``fn(x, y)`` following the model contract (e.g.
            ``run.model.model`` and ``run.model.guide``); the model stays fixed.
        steps: Adam steps; lr: Adam's learning rate; num_particles: reparameterised
            draws per datapoint and step.
        eval_particles: draws for the final ELBO estimate and its standard error.
        sticking_landing: use the path-derivative gradient (Roeder et al. 2017), whose
            variance vanishes where q equals the posterior; False: the plain
            reparameterisation gradient. Both are unbiased for the ELBO's gradient.
        progress: a tqdm bar over the steps.
    """
    if steps < 0 or num_particles < 1 or eval_particles < 1:
        raise ValueError(f"need steps >= 0, num_particles >= 1, eval_particles >= 1; "
                         f"got {steps}, {num_particles}, {eval_particles}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    began = time.perf_counter()
    local = local_guide(guide, x, y)
    leaves = local.parameters()
    fitting = LocalGuide(local.sites, local.batch_size, sticking_landing=sticking_landing)
    history = []
    with _frozen(model, guide):
        nesting = traces.max_plate_nesting(model, local, x, y)
        optimizer = torch.optim.Adam(leaves, lr=lr)
        with tqdm(total=steps, desc="local guides", unit="step", disable=not progress, leave=False) as bar:
            for step in range(steps):
                log_w = traces.log_weights(model, fitting, x, y, num_particles=num_particles, nesting=nesting)  # [K, B]
                elbo = log_w.mean(0)  # [B]
                grads = torch.autograd.grad(-elbo.sum(), leaves)
                for p, g in zip(leaves, grads):
                    # a datapoint whose weights are not finite this step skips it (its rows are zeroed)
                    p.grad = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                optimizer.step()
                history.append(elbo.detach().mean())
                bar.update()
                if step % 50 == 0:
                    bar.set_postfix(elbo=f"{history[-1].item():.3f}")
        for p in leaves:
            p.requires_grad_(False)
        estimate, _ = streaming_estimates(model, local, x, y, k=eval_particles)
    history = torch.stack(history) if history else x.new_zeros(0, dtype=estimate.value.dtype)
    return LocalGuideResult(local, estimate.value, estimate.stderr, local.params(), history,
                            time.perf_counter() - began)


@torch.no_grad()
def sample_local(result: LocalGuideResult | LocalGuide, num_samples: int) -> dict[str, torch.Tensor]:
    """``num_samples`` draws from each datapoint's local guide: ``{site: [num_samples, B, *event]}``."""
    local = result.guide if isinstance(result, LocalGuideResult) else result
    return {name: q.sample((num_samples,)) for name, q in local.distributions().items()}
