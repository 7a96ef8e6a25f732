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

What "the same family" means: :func:`fit_local_guides` finds q*_x for every
datapoint of a batch at once. It traces the amortized guide on the batch to find
its latent sites (each inside ``pyro.plate("data")`` with batch shape exactly
``[batch]``) and frees, per datapoint, exactly what the encoder computes from x:
each datapoint gets its own copy of the parameters of each site's distribution,
*initialised at the amortized guide's output for that datapoint*, while networks
that do not read x (a flow's weights, a conditional q(z2 | z1)) stay shared and
fixed. Per site, by the distribution the amortized guide gives it:

- ``Normal`` or ``Independent(Normal)``, a diagonal Gaussian (the ``diag`` guides
  of the VAE and CVAE, the HVAE's q(z1 | x)): loc ``[B, *event]`` and log scale
  ``[B, *event]`` (family ``"normal"``);
- ``MultivariateNormal`` (the ``fullrank`` guides, the PPCA guide): loc ``[B, d]``
  and a per-datapoint Cholesky factor ``[B, d, d]``, stored unconstrained as R with
  L = strictly_lower(R) + diag(exp(diag(R))) (family ``"mvn"``): a full-rank local
  guide for a full-rank amortized one;
- a ``TransformedDistribution`` of a Normal base through learned transforms,
  such as the ``iaf:N`` guides (Pyro's ``ConditionalAffineAutoregressive`` layers
  conditioned on the encoder's hidden state h(x)) (family ``"flow"``): the base's
  loc and log scale ``[B, *event]`` and the conditioning context ``[B, H]`` of the
  layers (every tensor with a leading ``[B]`` that a conditioned transform was
  given, e.g. ``partial(arn, context=h)``) become per-datapoint parameters; the
  flow's weights stay shared and fixed. This is the amortized family with h(x),
  mu(x), sigma(x) replaced by free values, so the amortized guide is one of its
  members (the start). Its ELBO gradient is the plain reparameterisation one:
  "sticking the landing" would score each draw with detached parameters, which
  needs the flow's inverse, Z sequential passes of each layer's network per step;
- any other continuous distribution (a LogNormal or Gamma latent, say): a
  diagonal Normal in the unconstrained space of the site's support, pushed
  through T = ``biject_to(support)`` (a ``TransformedDistribution``). Its loc
  starts at T^{-1}(mean of the amortized q) where that mean exists and lies in
  the support (else T^{-1} of a draw from q), its scale at 0.1 (family
  ``"transformed"``). This is the same family only when q itself is such a
  pushforward (a LogNormal is); for other families it is a different one, and
  the gaps are then relative to it.

Several latent sites: a site whose distribution in the amortized guide depends on
the draw of an earlier site (found by differentiating its log-density with respect
to the earlier draws), like the HVAE's q(z2 | z1), is family ``"conditional"``: it
keeps the amortized guide's own conditional, evaluated at the local guide's draw
of the earlier sites, with no parameters of its own (q(z2 | z1) reads no x, so
nothing in it is amortized over datapoints). The local guide then runs the
amortized guide with the other sites' distributions replaced by the local ones,
q*_x(z1, z2) = q_lambda_x(z1) q(z2 | z1). (A conditional that reads x as well,
q(z2 | z1, x), keeps that reading shared too: the local family is then no wider
than the amortized one in that factor.) Sites that depend on no other site get
independent local factors, q(z_1) q(z_2) ..., as the amortized guide has them.

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
The "flow" sites use the plain gradient (see above), and "conditional" sites have
no parameters of their own to detach.

Gradients are taken with respect to the local parameters only: the model's
parameters are frozen (their ``requires_grad`` flags are restored afterwards)
and never change. After the last step the ELBO of each datapoint is estimated
afresh from ``eval_particles`` draws, with its standard error.

``generator`` is None (torch's global generator), a ``torch.Generator``, or
per-datapoint streams (:class:`ppl_genmodels.streams.Streams` for the rows of ``x``):
then every draw of a datapoint (the fallback family's starting draw, each step's
particles, the final ELBO's) comes from its own stream, and since Adam acts
element by element, its fitted guide does not depend on the other datapoints of the
batch. (The ``history`` of the mean ELBO over the batch does, by definition.)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import biject_to
from tqdm.auto import tqdm

from ppl_genmodels import traces
from ppl_genmodels.inference.importance import streaming_estimates
from ppl_genmodels.traces import DATA_PLATE, TraceError, is_streams, seeded_from

__all__ = ["LocalSite", "LocalGuide", "LocalGuideResult", "local_guide", "fit_local_guides", "sample_local"]

#: initial scale, in unconstrained space, of the fallback family (no amortized scale to start from)
FALLBACK_SCALE = 0.1


@dataclass
class LocalSite:
    """One latent site's per-datapoint parameters, all with leading dimension ``[batch]``.

    ``raw`` holds the unconstrained tensors that are optimised:

    - ``"normal"``:      loc ``[B, *event]``, log_scale ``[B, *event]``
    - ``"mvn"``:         loc ``[B, d]``, raw_tril ``[B, d, d]`` (strictly lower part + log diagonal)
    - ``"flow"``:        loc, log_scale ``[B, *base_event]`` of the Normal base, and ``context``
      (``context_1``, ...) ``[B, H]``, the contexts of ``flows`` (the amortized guide's conditioned
      transforms; ``contexts`` maps the id of each original context tensor to its key in ``raw``)
    - ``"transformed"``: loc ``[B, *u_event]``, log_scale ``[B, *u_event]`` of a Normal in the
      unconstrained space, pushed through ``transform`` (u_event: the unconstrained event shape)
    - ``"conditional"``: nothing; the amortized guide's own conditional on earlier sites
    """

    name: str
    family: str
    event_shape: torch.Size
    raw: dict[str, torch.Tensor]
    transform: torch.distributions.Transform | None = None
    flows: list = field(default_factory=list)
    contexts: dict[int, str] = field(default_factory=dict)

    def distribution(self, detached: bool = False) -> dist.TorchDistribution:
        """q(z) of this site, batch shape ``[B]`` and event shape ``event_shape``."""
        if self.family == "conditional":
            raise ValueError(f"site {self.name!r} is conditional on earlier sites: it has no distribution of its own")
        raw = {k: v.detach() for k, v in self.raw.items()} if detached else self.raw
        if self.family == "normal":
            base = dist.Normal(raw["loc"], raw["log_scale"].exp(), validate_args=False)
            return base.to_event(len(self.event_shape))
        if self.family == "mvn":
            return dist.MultivariateNormal(raw["loc"], scale_tril=_tril(raw["raw_tril"]), validate_args=False)
        base = dist.Normal(raw["loc"], raw["log_scale"].exp(), validate_args=False)
        base = base.to_event(raw["loc"].dim() - 1)
        if self.family == "flow":
            swap = {key: raw[name] for key, name in self.contexts.items()}
            return dist.TransformedDistribution(base, [_recondition(t, swap) for t in self.flows],
                                                validate_args=False)
        return dist.TransformedDistribution(base, [self.transform], validate_args=False)

    def params(self) -> dict[str, torch.Tensor]:
        """Readable parameters: ``{"loc", "scale"}`` (diagonal; unconstrained space for the
        fallback family; the base for a flow, with its ``context`` tensors) or ``{"loc",
        "scale_tril"}`` (MVN), detached; ``{}`` for a conditional site."""
        raw = {k: v.detach() for k, v in self.raw.items()}
        if self.family == "conditional":
            return {}
        if self.family == "mvn":
            return {"loc": raw["loc"].clone(), "scale_tril": _tril(raw["raw_tril"])}
        extra = {name: raw[name].clone() for name in self.contexts.values()}
        return {"loc": raw["loc"].clone(), "scale": raw["log_scale"].exp(), **extra}


def _tril(raw: torch.Tensor) -> torch.Tensor:
    """``[..., d, d]`` unconstrained -> lower triangular with a positive diagonal."""
    return raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())


def _untril(L: torch.Tensor) -> torch.Tensor:
    return L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log())


def _partials(transform) -> dict[str, functools.partial]:
    """The ``functools.partial`` attributes of a conditioned transform (``arn = partial(nn, context=h)``)."""
    return {name: value for name, value in vars(transform).items() if isinstance(value, functools.partial)}


def _context_tensors(transform, batch_size: int) -> list[torch.Tensor]:
    """The per-datapoint tensors (leading dimension ``batch_size``) a conditioned transform was given."""
    found = []
    for part in _partials(transform).values():
        for value in (*part.args, *part.keywords.values()):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch_size:
                found.append(value)
    return found


def _recondition(transform, swap: dict[int, torch.Tensor]):
    """A copy of a conditioned ``transform`` whose context tensors ``t`` are replaced by ``swap[id(t)]``.

    The copy shares the transform's networks (and so its weights) but none of its
    caches: its inverse and its cached (x, y) pair start empty.
    """
    new = copy.copy(transform)
    new._inv = None
    for name in vars(transform):
        if name.startswith("_cached"):
            setattr(new, name, (None, None) if name == "_cached_x_y" else None)
    for name, part in _partials(transform).items():
        args = tuple(swap.get(id(a), a) for a in part.args)
        keywords = {k: swap.get(id(v), v) for k, v in part.keywords.items()}
        replaced = functools.partial(part.func, *args, **keywords)
        replaced.__dict__.update(part.__dict__)  # e.g. the ``permutation`` Pyro hangs on the partial
        setattr(new, name, replaced)
    return new


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


class _Replace(Messenger):
    """Gives the sample sites named in ``fns`` the distribution ``fns[name]()`` instead of their own."""

    def __init__(self, fns: dict[str, Callable[[], dist.TorchDistribution]]):
        super().__init__()
        self.fns = fns

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.fns and not msg["is_observed"]:
            msg["fn"] = self.fns[msg["name"]]()


class LocalGuide:
    """A guide ``guide(x, y=None)`` with free parameters for each datapoint of one batch.

    Without conditional sites it samples every site from its own q inside
    ``pyro.plate("data", B)``; ``x`` only has to be the batch the guide was built
    for (its values are not read). With conditional sites (``amortized`` given) it
    runs the amortized guide on ``(x, y)`` with the other sites' distributions
    replaced by the local ones, so ``x`` must be that batch. Either way it plugs into
    :func:`ppl_genmodels.traces.log_weights` and everything else that takes a guide.
    ``sticking_landing=True`` scores the draws of the "normal", "mvn" and
    "transformed" sites with detached parameters (same values, lower-variance
    gradients), for fitting. ``data``: the batch ``(x, y)``, for drawing from it.
    """

    def __init__(self, sites: list[LocalSite], batch_size: int, *, sticking_landing: bool = False,
                 amortized: Callable | None = None, data: tuple | None = None, nesting: int = 1):
        self.sites = sites
        self.batch_size = batch_size
        self.sticking_landing = sticking_landing
        self.amortized = amortized
        self.data = data
        self.nesting = nesting
        if amortized is None and any(s.family == "conditional" for s in sites):
            raise ValueError("a local guide with conditional sites needs the amortized guide")

    def with_sticking_landing(self, flag: bool) -> LocalGuide:
        """The same guide (the same parameter tensors) with ``sticking_landing=flag``."""
        return LocalGuide(self.sites, self.batch_size, sticking_landing=flag, amortized=self.amortized,
                          data=self.data, nesting=self.nesting)

    def distributions(self) -> dict[str, dist.TorchDistribution]:
        """``{site: q}``, each of batch shape ``[B]`` (the sites with a distribution of their own)."""
        return {s.name: s.distribution() for s in self.sites if s.family != "conditional"}

    def params(self) -> dict[str, dict[str, torch.Tensor]]:
        return {s.name: s.params() for s in self.sites if s.family != "conditional"}

    def parameters(self) -> list[torch.Tensor]:
        """The unconstrained tensors that are optimised."""
        return [t for s in self.sites for t in s.raw.values()]

    def _q(self, site: LocalSite) -> dist.TorchDistribution:
        q = site.distribution()
        if self.sticking_landing and site.family in ("normal", "mvn", "transformed"):
            q = _StickingLanding(q, site.distribution(detached=True))
        return q

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        if x.shape[0] != self.batch_size:
            raise ValueError(f"this local guide was fitted to a batch of {self.batch_size} datapoints, "
                             f"got x with {x.shape[0]}")
        if self.amortized is not None:
            free = {s.name: functools.partial(self._q, s) for s in self.sites if s.family != "conditional"}
            with _Replace(free):
                self.amortized(x, y)
            return
        with pyro.plate(DATA_PLATE, self.batch_size, dim=-1, device=x.device):
            for site in self.sites:
                pyro.sample(site.name, self._q(site))


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


def _check_site(name: str, site: dict, batch_size: int) -> None:
    fn = site["fn"]
    if DATA_PLATE not in traces.plate_dims(site):
        raise TraceError(f"latent site {name!r} of the guide is outside pyro.plate({DATA_PLATE!r})")
    if tuple(fn.batch_shape) != (batch_size,):
        raise TraceError(
            f"latent site {name!r} has batch shape {tuple(fn.batch_shape)}; local guides need latents whose "
            "batch shape is just the data plate (declare vector latents with .to_event)"
        )
    if fn.support.is_discrete:
        raise TraceError(f"latent site {name!r} is discrete; local guides need continuous latents")


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _flow_site(name: str, fn, batch_size: int) -> LocalSite | None:
    """The "flow" family for a Normal pushed through learned (``nn.Module``) transforms, else None."""
    if not isinstance(fn, torch.distributions.TransformedDistribution):
        return None
    base = _base_normal(fn.base_dist)
    if base is None or not any(isinstance(t, nn.Module) for t in fn.transforms):
        return None
    full = (batch_size,) + tuple(fn.base_dist.event_shape)
    raw = {"loc": _leaf(base.mean.expand(full)), "log_scale": _leaf(base.stddev.expand(full).log())}
    contexts: dict[int, str] = {}
    for transform in fn.transforms:
        for context in _context_tensors(transform, batch_size):
            if id(context) not in contexts:
                key = "context" if not contexts else f"context_{len(contexts)}"
                contexts[id(context)] = key
                raw[key] = _leaf(context)
    return LocalSite(name, "flow", torch.Size(fn.event_shape), raw, flows=list(fn.transforms), contexts=contexts)


def _local_site(name: str, site: dict, batch_size: int) -> LocalSite:
    """Per-datapoint parameters for one amortized guide site, initialised at its output."""
    _check_site(name, site, batch_size)
    fn, value = site["fn"], site["value"]
    event = torch.Size(fn.event_shape)
    full = (batch_size,) + tuple(event)
    if _base_normal(fn) is not None:
        return LocalSite(name, "normal", event, {"loc": _leaf(fn.mean.expand(full)),
                                                 "log_scale": _leaf(fn.stddev.expand(full).log())})
    if isinstance(fn, torch.distributions.MultivariateNormal):
        d = event[0]
        return LocalSite(name, "mvn", event, {"loc": _leaf(fn.loc.expand(full)),
                                              "raw_tril": _leaf(_untril(fn.scale_tril.expand(full + (d,))))})
    flow = _flow_site(name, fn, batch_size)
    if flow is not None:
        return flow
    transform = biject_to(fn.support)
    value = value.detach().expand(full)
    u_loc = _fallback_loc(fn, value, transform)
    return LocalSite(name, "transformed", event,
                     {"loc": _leaf(u_loc), "log_scale": _leaf(torch.full_like(u_loc, math.log(FALLBACK_SCALE)))},
                     transform)


def _conditional_sites(guide: Callable, trace, names: list[str], x, y) -> set[str]:
    """The latent sites whose distribution in ``guide`` depends on the draw of an earlier site.

    The guide is run again with every latent fixed at its traced value (leaves that
    require grad); a site depends on an earlier one when the log-density of its own
    value has a gradient with respect to that site's value.
    """
    if len(names) < 2:
        return set()
    leaves = {n: _leaf(trace.nodes[n]["value"]) for n in names}
    with torch.enable_grad(), poutine.block():
        again = poutine.trace(poutine.condition(guide, data=leaves)).get_trace(x, y)
        conditional = set()
        for i, name in enumerate(names[1:], start=1):
            log_q = again.nodes[name]["fn"].log_prob(leaves[name].detach()).sum()
            if log_q.requires_grad:
                grads = torch.autograd.grad(log_q, [leaves[n] for n in names[:i]], allow_unused=True)
                if any(g is not None for g in grads):
                    conditional.add(name)
    return conditional


def local_guide(guide: Callable, x: torch.Tensor, y: torch.Tensor | None = None, *, generator=None) -> LocalGuide:
    """A :class:`LocalGuide` for the batch ``x``, initialised at the amortized ``guide``'s output.

    ``generator`` draws the amortized guide's trace (whose draws start the fallback family).
    """
    with torch.no_grad(), poutine.block(), seeded_from(generator):
        trace = prune_subsample_sites(poutine.trace(guide).get_trace(x, y))
    latent = {name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]}
    if not latent:
        raise TraceError("the guide has no latent sites")
    for name, site in latent.items():
        _check_site(name, site, x.shape[0])
    conditional = _conditional_sites(guide, trace, list(latent), x, y)
    sites = [LocalSite(name, "conditional", torch.Size(site["fn"].event_shape), {}) if name in conditional
             else _local_site(name, site, x.shape[0]) for name, site in latent.items()]
    nesting = max([1, *(-d for site in latent.values() for d in traces.plate_dims(site).values())])
    return LocalGuide(sites, x.shape[0], amortized=guide if conditional else None, data=(x, y), nesting=nesting)


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
    params: dict[str, dict[str, torch.Tensor]]  # per site: {"loc", "scale"[, "context"]} or {"loc", "scale_tril"}
    history: torch.Tensor      # [steps] mean ELBO over the batch at each step (training particles)
    seconds: float


def _optimise(model, fitting: LocalGuide, leaves, x, y, *, steps, lr, num_particles, generator,
              progress) -> list[torch.Tensor]:
    """Adam on the summed ELBO of every datapoint; the mean ELBO over the batch at each step."""
    nesting = traces.max_plate_nesting(model, fitting, x, y)
    optimizer = torch.optim.Adam(leaves, lr=lr)
    history = []
    with tqdm(total=steps, desc="local guides", unit="step", disable=not progress, leave=False) as bar:
        for step in range(steps):
            with seeded_from(generator.child(f"step{step}") if is_streams(generator) else None):
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
    return history


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
    generator=None,
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
        generator: None, a ``torch.Generator`` or per-datapoint streams (module docstring).
        progress: a tqdm bar over the steps.
    """
    if steps < 0 or num_particles < 1 or eval_particles < 1:
        raise ValueError(f"need steps >= 0, num_particles >= 1, eval_particles >= 1; "
                         f"got {steps}, {num_particles}, {eval_particles}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    began = time.perf_counter()
    streams = is_streams(generator)
    with seeded_from(None if streams else generator):  # a torch.Generator: one seed for the whole fit
        local = local_guide(guide, x, y, generator=generator.child("start") if streams else None)
        leaves = local.parameters()
        with _frozen(model, guide):
            history = _optimise(model, local.with_sticking_landing(sticking_landing), leaves, x, y, steps=steps,
                                lr=lr, num_particles=num_particles, generator=generator if streams else None,
                                progress=progress)
            for p in leaves:
                p.requires_grad_(False)
            estimate, _ = streaming_estimates(model, local, x, y, k=eval_particles,
                                              generator=generator.child("elbo") if streams else None)
    history = torch.stack(history) if history else x.new_zeros(0, dtype=estimate.value.dtype)
    return LocalGuideResult(local, estimate.value, estimate.stderr, local.params(), history,
                            time.perf_counter() - began)


@torch.no_grad()
def sample_local(result: LocalGuideResult | LocalGuide, num_samples: int, *,
                 generator=None) -> dict[str, torch.Tensor]:
    """``num_samples`` draws from each datapoint's local guide: ``{site: [num_samples, B, *event]}``.

    ``generator``: None (torch's global generator), a ``torch.Generator``, or per-datapoint streams
    (then the guide runs as a Pyro program under a particle plate, each datapoint's draws from its stream).
    """
    local = result.guide if isinstance(result, LocalGuideResult) else result
    if local.amortized is None and generator is None:
        return {name: q.sample((num_samples,)) for name, q in local.distributions().items()}
    x, y = local.data
    with poutine.block(), seeded_from(generator), \
            pyro.plate(traces.PARTICLE_PLATE, num_samples, dim=-local.nesting - 1):
        trace = poutine.trace(local).get_trace(x, y)
    return {s.name: trace.nodes[s.name]["value"].expand((num_samples, local.batch_size) + s.event_shape)
            for s in local.sites}
