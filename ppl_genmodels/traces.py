"""Per-datapoint log importance weights of any model/guide pair.

This is the one place where Pyro traces become numbers. For a model
p(x, z | y) and a proposal r(z | x, y) (the amortized guide q, or the prior
p(z | y)), K particles z_k ~ r give

    log w_k(x) = log p(x, z_k | y) - log r(z_k | x, y)        # [K, B]

one weight per particle and per datapoint. Everything else is derived from
this tensor: the ELBO is E_q[log w] (Kingma & Welling 2014), the
importance-weighted bound is log (1/K) sum_k w_k (Burda, Grosse &
Salakhutdinov 2016, "Importance weighted autoencoders"), and the effective
sample size is (sum w)^2 / sum w^2 (Kong 1992).

Per-datapoint weights need every sample site inside ``pyro.plate("data")``
(the model contract): a site outside it couples the datapoints and has no
per-datapoint share, so it is refused with a clear error. Pyro's own
``vectorized_importance_weights`` sums over the whole batch, which is why
this module exists.

Particles are vectorized by running the guide under an extra outer plate
``particles`` to the left of every plate the model uses, then replaying the
model against the guide's trace; a model written with ``.to_event`` and
broadcasting last-dimension operations works unchanged. ``vectorize=False``
runs the particles one at a time for models that do not broadcast.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to

DATA_PLATE = "data"
PARTICLE_PLATE = "particles"

__all__ = [
    "DATA_PLATE",
    "PROPOSALS",
    "TraceError",
    "first_line",
    "plate_dims",
    "seeded_from",
    "is_streams",
    "max_plate_nesting",
    "log_weights",
    "log_mean_exp",
    "observed_site",
    "generate",
    "reconstruct",
    "LatentSite",
    "LatentLayout",
    "latent_layout",
    "STARTS",
    "LogJoint",
    "Particles",
]

#: proposals of :func:`log_weights`: the guide q(z | x, y), the prior p(z | y), or their defensive mixture
PROPOSALS = ("guide", "prior", "mixture")


class TraceError(ValueError):
    """A model/guide pair that breaks the model contract (one-line message)."""


def first_line(err: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message, for one-line errors (empty: ``default``, else its type's name)."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return type(err).__name__ if default is None else default


def plate_dims(site) -> dict[str, int]:
    """``{plate name: batch dimension}`` of the vectorized plates a sample site sits in."""
    return {f.name: f.dim for f in site["cond_indep_stack"] if f.vectorized}


def _in_particle_plate(fn: Callable, num: int, dim: int) -> Callable:
    """``fn`` run inside ``pyro.plate("particles", num, dim=dim)``: ``num`` draws of every site at once."""

    def vectorized(*args):
        with pyro.plate(PARTICLE_PLATE, num, dim=dim):
            return fn(*args)

    return vectorized


def max_plate_nesting(model: Callable, guide: Callable, *args) -> int:
    """How many batch dimensions the plates of ``model`` and ``guide`` use (at least 1)."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    dims = [0]
    for tr in (guide_trace, model_trace):
        for site in tr.nodes.values():
            if site["type"] == "sample":
                dims += [-d for d in plate_dims(site).values()]
    return max(1, max(dims))


def _outside_data_plate(site) -> str:
    """What to change when a sample site is not inside the data plate."""
    plates = [f.name for f in site["cond_indep_stack"] if f.name != PARTICLE_PLATE]
    where = f"in pyro.plate({', '.join(repr(p) for p in plates)}) but " if plates else ""
    fix = (f"rename the plate that runs over the datapoints to {DATA_PLATE!r}" if plates
           else f"put it inside `with pyro.plate({DATA_PLATE!r}, x.shape[0]):`")
    return (f"sample site {site['name']!r} is {where}outside pyro.plate({DATA_PLATE!r}): {fix} (per-datapoint "
            "weights need every sample site in that plate; global parameters belong in pyro.param or "
            "nn.Parameter, not in sample sites)")


def _site_log_prob(site, particle_dim: int | None, num_particles: int, batch_size: int) -> torch.Tensor:
    """One site's log-density reduced to ``[K, B]`` (or ``[B]`` when particle_dim is None)."""
    dims = plate_dims(site)
    if DATA_PLATE not in dims:
        raise TraceError(_outside_data_plate(site))
    lp = site["fn"].log_prob(site["value"])
    if site["mask"] is not None:
        lp = torch.where(site["mask"], lp, lp.new_zeros(()))
    keep = [dims[DATA_PLATE]] if particle_dim is None else [particle_dim, dims[DATA_PLATE]]
    need = max(-d for d in keep)
    if lp.dim() < need:
        lp = lp.reshape((1,) * (need - lp.dim()) + lp.shape)
    keep_pos = {lp.dim() + d for d in keep}
    summed = [d for d in range(lp.dim()) if d not in keep_pos]
    if summed:
        lp = lp.sum(summed)
    shape = (batch_size,) if particle_dim is None else (num_particles, batch_size)
    return lp.expand(shape)


def is_streams(generator) -> bool:
    """True for per-datapoint random streams (:class:`ppl_genmodels.streams.Streams`), False for a
    ``torch.Generator`` or None. Known by what they do (``draws``, ``normal``, ``uniform``), not by import."""
    return generator is not None and not isinstance(generator, torch.Generator) and hasattr(generator, "draws")


@contextlib.contextmanager
def seeded_from(generator):
    """Run Pyro's draws (which use torch's global generator) from a seed drawn from ``generator``.

    The global generator's state is saved and restored around the block, so a
    caller's own random stream is untouched. With ``generator=None`` nothing
    changes: the block draws from the global generator as usual. Per-datapoint
    streams (:func:`is_streams`) draw every latent site inside the data plate from
    each datapoint's own stream instead (``streams.draws()``).
    """
    if generator is None:
        yield
        return
    if is_streams(generator):
        with generator.draws():
            yield
        return
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device).item())
    with torch.random.fork_rng():  # every device's global state, since manual_seed reseeds them all
        torch.manual_seed(seed)
        yield


def _run_pair(model, guide, args, first: str):
    """Trace the proposal program ``first`` and replay the other one against its latents."""
    if first == "guide":
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    else:
        model_trace = poutine.trace(model).get_trace(*args)
        guide_trace = poutine.trace(poutine.replay(guide, trace=model_trace)).get_trace(*args)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def _log_densities(model_trace, guide_trace, reduce):
    """(log p(z | y), log p(x | z, y), log q(z | x, y)) per particle and datapoint."""
    latent = observed = proposal = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            observed = observed + reduce(site)
        else:
            if guide_trace is not None and name not in guide_trace.nodes:
                raise TraceError(f"latent site {name!r} of the model is not sampled by the guide: add "
                                 f"pyro.sample({name!r}, ...) to the guide, inside pyro.plate({DATA_PLATE!r})")
            latent = latent + reduce(site)
    if guide_trace is not None:
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and not site["is_observed"]:
                proposal = proposal + reduce(site)
    return latent, observed, proposal


def _weights_once(model, guide, args, batch_size, proposal, particle_dim, num_particles):
    """log w for one draw of particles: ``[K, B]`` if particle_dim is set, else ``[B]``.

    ``guide``: z ~ q, log w = log p(x, z) - log q(z).  ``prior``: z ~ p(z), log w =
    log p(x | z).  ``mixture``: defensive importance sampling (Hesterberg 1995), half the
    particles from q and half from p(z), each weighed against the mixture
    (q + p) / 2, so that w <= 2 p(x | z): the estimate stays stable where the guide
    extrapolates badly (far from the data), at the price of the prior's half.
    """
    shape = (batch_size,) if particle_dim is None else (num_particles, batch_size)

    def wrap(fn, k):
        return fn if particle_dim is None else _in_particle_plate(fn, k, particle_dim)

    def reduce_for(k):
        return lambda site: _site_log_prob(site, particle_dim, k, batch_size)

    if proposal == "guide":
        latent, observed, q = _log_densities(*_run_pair(wrap(model, num_particles), wrap(guide, num_particles), args, "guide"),
                                            reduce_for(num_particles))
        log_w = latent + observed - q
    elif proposal == "prior":
        model_trace, _ = _run_pair(wrap(model, num_particles), lambda *a: None, args, "model")
        log_w = _log_densities(model_trace, None, reduce_for(num_particles))[1]
    elif proposal == "mixture":
        if particle_dim is None:
            first = "guide" if torch.rand(()) < 0.5 else "model"
            parts = [(1, first)]
        else:
            k_guide = (num_particles + 1) // 2
            parts = [(k, first) for k, first in ((k_guide, "guide"), (num_particles - k_guide, "model")) if k > 0]
        pieces = []
        for k, first in parts:
            latent, observed, q = _log_densities(*_run_pair(wrap(model, k), wrap(guide, k), args, first), reduce_for(k))
            pieces.append(latent + observed - (torch.logaddexp(q, latent) - math.log(2.0)))
        log_w = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    else:
        raise ValueError(f"unknown proposal {proposal!r}; expected one of {', '.join(PROPOSALS)}")
    if not isinstance(log_w, torch.Tensor):
        raise TraceError("the model has no sample sites to weigh")
    return log_w.expand(shape)


def log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_particles: int = 1,
    proposal: str = "guide",
    chunk_size: int | None = None,
    vectorize: bool = True,
    nesting: int | None = None,
) -> torch.Tensor:
    """Log importance weights ``[num_particles, batch]`` of ``model`` against a proposal.

    Args:
        model, guide: Pyro programs ``fn(x, y)`` following the model contract.
        x: data ``[batch, ...]``; y: optional conditioning ``[batch, ...]``.
        num_particles: K, the number of particles per datapoint.
        proposal: ``"guide"`` (z ~ q(z|x,y)), ``"prior"`` (z ~ p(z|y)), or ``"mixture"``
            (half from each, weighed against their average: defensive importance sampling).
        chunk_size: particles per vectorized pass (bounds memory); default all K at once.
        vectorize: run particles in one pass under an outer plate; False loops over them.
        nesting: the number of plate dimensions the pair uses (found by tracing if None).

    The result keeps the autograd graph, so ``-log_mean_exp(log_w).sum()`` is a
    differentiable IWAE loss; wrap calls in ``torch.no_grad()`` for evaluation.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    batch_size = x.shape[0]
    args = (x, y)
    if not vectorize:
        rows = [_weights_once(model, guide, args, batch_size, proposal, None, 1) for _ in range(num_particles)]
        return torch.stack(rows)
    if nesting is None:
        nesting = max_plate_nesting(model, guide, *args)
    particle_dim = -nesting - 1
    chunk = num_particles if chunk_size is None else max(1, min(chunk_size, num_particles))
    parts = []
    done = 0
    while done < num_particles:
        k = min(chunk, num_particles - done)
        parts.append(_weights_once(model, guide, args, batch_size, proposal, particle_dim, k))
        done += k
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log (1/K) sum_k exp(log_w_k)`` along ``dim``, computed stably."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def _site_mean(site) -> torch.Tensor:
    """The mean of an observed site's distribution where it has one, else its sampled value."""
    fn = site["fn"]
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    if isinstance(base, torch.distributions.Categorical):  # expected level of an ordinal pixel
        levels = torch.arange(base.probs.shape[-1], device=base.probs.device, dtype=base.probs.dtype)
        return (base.probs * levels).sum(-1)
    try:
        mean = fn.mean
    except NotImplementedError:
        return site["value"]
    return site["value"] if torch.isnan(mean).any() else mean


def observed_site(trace, site: str | None = None) -> str:
    """The name of the observed site that holds the data: ``site`` if given, else ``"x"`` or the only one."""
    observed = [n for n, s in trace.nodes.items() if s["type"] == "sample" and (s["is_observed"] or s["infer"].get("was_observed"))]
    if site is not None:
        return site
    if "x" in observed:
        return "x"
    if len(observed) == 1:
        return observed[0]
    raise TraceError(f"cannot tell which observed site is the data among {observed}; name it 'x'")


@torch.no_grad()
def generate(model: Callable, x_template: torch.Tensor, y: torch.Tensor | None = None, *, site: str | None = None):
    """Draw new data from the model: ``(sample, mean)`` of the observed site, each like ``x_template``.

    The model is run with its observations un-conditioned (``poutine.uncondition``),
    so any model that follows the contract can generate: ``x_template`` only
    fixes the batch size, shape, device and dtype. ``mean`` is the mean of the
    likelihood at the drawn latents (probabilities for a Bernoulli), which
    makes clearer pictures than the binary sample.
    """
    trace = poutine.trace(poutine.uncondition(model)).get_trace(x_template, y)
    name = observed_site(trace, site)
    return trace.nodes[name]["value"], _site_mean(trace.nodes[name])


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: torch.Tensor, y: torch.Tensor | None = None, *, site: str | None = None):
    """Mean of p(x | z) at z ~ q(z | x): the model's reconstruction of ``x``."""
    guide_trace = poutine.trace(guide).get_trace(x, y)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    return _site_mean(trace.nodes[observed_site(trace, site)])


# ---------------------------------------------------------------------------------------------
# The latents as one unconstrained vector per datapoint: the conditioned log joint for HMC / AIS
# ---------------------------------------------------------------------------------------------


@dataclass
class LatentSite:
    """One latent sample site: its constrained event shape and the map from unconstrained space."""

    name: str
    event_shape: torch.Size          # of z, the constrained value
    unconstrained_shape: torch.Size  # of u = transform.inv(z)
    transform: torch.distributions.Transform  # u -> z, biject_to(support)

    @property
    def numel(self) -> int:
        return math.prod(self.unconstrained_shape)


@dataclass
class LatentLayout:
    """How the per-datapoint latent sites of a model map to a flat vector ``u  # [..., dim]``.

    Samplers move in unconstrained space: a latent with support S is written
    z = T(u) with T = ``biject_to(S)`` (e.g. exp for a positive latent), so the
    density of u is p(T(u)) |det dT/du| and a sampler never leaves the support.
    """

    sites: list[LatentSite]

    @property
    def dim(self) -> int:
        return sum(s.numel for s in self.sites)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def unpack(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``u [..., dim]`` -> (constrained values per site ``[..., *event_shape]``, log|det J| ``[...]``)."""
        lead = u.shape[:-1]
        values, log_jac, start = {}, u.new_zeros(lead), 0
        for site in self.sites:
            piece = u[..., start : start + site.numel].reshape(lead + site.unconstrained_shape)
            start += site.numel
            z = site.transform(piece)
            values[site.name] = z
            ladj = site.transform.log_abs_det_jacobian(piece, z)
            if ladj.dim() > len(lead):
                ladj = ladj.reshape(ladj.shape[: len(lead)] + (-1,)).sum(-1)
            log_jac = log_jac + ladj
        return values, log_jac

    def pack(self, values: dict[str, torch.Tensor], lead: tuple) -> torch.Tensor:
        """Constrained values per site (leading shape ``lead``) -> ``u [*lead, dim]``."""
        parts = []
        for site in self.sites:
            u = site.transform.inv(values[site.name].expand(tuple(lead) + site.event_shape))
            parts.append(u.reshape(tuple(lead) + (site.numel,)))
        return torch.cat(parts, -1)

    def flatten(self, values: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        """Constrained values per site with ``lead`` leading dimensions -> ``[*lead dims, latent_dim]``, detached.

        The sites are concatenated in the layout's order: the one flat view of the
        latents that every comparison of posterior draws uses.
        """
        parts = [values[name].reshape(values[name].shape[:lead] + (-1,)) for name in self.names]
        return torch.cat(parts, -1).detach()


def latent_layout(model: Callable, x: torch.Tensor, y: torch.Tensor | None = None) -> LatentLayout:
    """The latent sites of ``model`` on data ``x``, each of batch shape exactly ``[batch]`` (the data plate)."""
    with torch.no_grad(), poutine.block():
        trace = prune_subsample_sites(poutine.trace(model).get_trace(x, y))
    sites = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        fn = site["fn"]
        if DATA_PLATE not in plate_dims(site):
            raise TraceError(f"latent site {name!r} is outside pyro.plate({DATA_PLATE!r})")
        if tuple(fn.batch_shape) != (x.shape[0],):
            raise TraceError(
                f"latent site {name!r} has batch shape {tuple(fn.batch_shape)}; samplers need latents whose "
                "batch shape is just the data plate (declare vector latents with .to_event)"
            )
        if fn.support.is_discrete:
            raise TraceError(f"latent site {name!r} is discrete; HMC and AIS need continuous latents")
        transform = biject_to(fn.support)
        event = torch.Size(fn.event_shape)
        sites.append(LatentSite(name, event, torch.Size(transform.inverse_shape(event)), transform))
    if not sites:
        raise TraceError("the model has no latent sites")
    return LatentLayout(sites)


#: where samplers start: the prior p(z | y) or the amortized guide q(z | x, y)
STARTS = ("prior", "guide")


class LogJoint:
    """The log densities of a model/guide pair on fixed data, as functions of ``u [chains, batch, dim]``.

    In unconstrained space (the log|det J| of the transform included in each):

    - ``log_target(u) = log p(x, z(u) | y) + log|J|``, the unnormalised posterior;
    - ``log_start(u) = log r(z(u)) + log|J|``, the normalised density samplers start
      from: r = p(z | y) (``start="prior"``) or the amortized guide q(z | x, y)
      (``start="guide"``). AIS anneals from it to the target.

    ``joint(u)`` returns ``(log_start, log_target)``, both ``[chains, batch]``, from one
    pass of the model (and one of the guide for ``start="guide"``); ``sample_start(chains)``
    draws u from r. The model runs with its latents conditioned on z(u) under an extra
    ``particles`` plate for the chains.
    """

    def __init__(self, model: Callable, guide: Callable, x: torch.Tensor, y: torch.Tensor | None = None,
                 *, start: str = "prior", nesting: int | None = None):
        if start not in STARTS:
            raise ValueError(f"unknown initial distribution {start!r}; expected one of {', '.join(STARTS)}")
        self.model, self.guide, self.x, self.y, self.start = model, guide, x, y, start
        self.layout = latent_layout(model, x, y)
        self.nesting = max_plate_nesting(model, guide, x, y) if nesting is None else nesting
        self.particle_dim = -self.nesting - 1

    @property
    def dim(self) -> int:
        return self.layout.dim

    def at(self, x: torch.Tensor, y: torch.Tensor | None = None) -> "LogJoint":
        """The same densities on other data of the same shapes (the layout is kept, not traced again)."""
        other = copy.copy(self)
        other.x, other.y = x, y
        return other

    def static_key(self) -> tuple:
        """What, besides the data's shapes, the computation of these densities depends on (a compiled graph's key)."""
        sites = tuple((s.name, tuple(s.event_shape), tuple(s.unconstrained_shape), type(s.transform).__name__)
                      for s in self.layout.sites)
        return self.model, self.guide, self.start, self.nesting, sites

    def _trace(self, program: Callable, values: dict, chains: int):
        conditioned = _in_particle_plate(poutine.condition(program, data=values), chains, self.particle_dim)
        return prune_subsample_sites(poutine.trace(conditioned).get_trace(self.x, self.y))

    def _parts(self, u: torch.Tensor):
        """(values, log|J|, log p(z | y), log p(x | z, y)) at ``u``, each density ``[chains, batch]``."""
        chains = u.shape[0]
        values, log_jac = self.layout.unpack(u)
        log_prior = log_lik = 0.0
        for name, site in self._trace(self.model, values, chains).nodes.items():
            if site["type"] != "sample":
                continue
            if name in values:
                log_prior = log_prior + _site_log_prob(site, self.particle_dim, chains, self.x.shape[0])
            elif site["is_observed"]:
                log_lik = log_lik + _site_log_prob(site, self.particle_dim, chains, self.x.shape[0])
            else:
                raise TraceError(f"latent site {name!r} appeared that the layout does not know")
        return values, log_jac, log_prior, log_lik

    def log_target(self, u: torch.Tensor) -> torch.Tensor:
        """``log p(x, z(u) | y) + log|J|  # [chains, batch]``."""
        _, log_jac, log_prior, log_lik = self._parts(u)
        return log_prior + log_lik + log_jac

    def __call__(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, log_jac, log_prior, log_lik = self._parts(u)
        log_target = log_prior + log_lik + log_jac
        if self.start == "prior":
            return log_prior + log_jac, log_target
        chains = u.shape[0]
        log_q = 0.0
        for name, site in self._trace(self.guide, values, chains).nodes.items():
            if site["type"] == "sample" and name in values:
                log_q = log_q + _site_log_prob(site, self.particle_dim, chains, self.x.shape[0])
        return log_q + log_jac, log_target

    @torch.no_grad()
    def sample_start(self, chains: int, generator=None) -> torch.Tensor:
        """u ~ r, ``[chains, batch, dim]``; from ``generator`` when given, a ``torch.Generator`` or per-datapoint
        streams (the global generator is left alone)."""
        program = _in_particle_plate(self.model if self.start == "prior" else self.guide, chains, self.particle_dim)
        with seeded_from(generator):
            trace = poutine.trace(program).get_trace(self.x, self.y)
        batch = self.x.shape[0]
        values = {s.name: trace.nodes[s.name]["value"].expand((chains, batch) + s.event_shape) for s in self.layout.sites}
        return self.layout.pack(values, (chains, batch))


# ---------------------------------------------------------------------------------------------
# Particles: one draw of the latents, and the pair's log densities at those values
# ---------------------------------------------------------------------------------------------


def _detached_values(trace):
    """A copy of ``trace`` whose sample values are cut from the graph that made them (the sites are copied)."""
    copy = trace.copy()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and isinstance(site["value"], torch.Tensor):
            copy.nodes[name] = {**site, "value": site["value"].detach()}
    return copy


@dataclass
class Particles:
    """K particles of the latents per datapoint, drawn from the guide, and the pair's log densities there.

    :meth:`draw` runs the guide once under the ``particles`` plate: ``trace`` holds the
    latent values ``[K, B, ...]`` (reparameterised where the guide's sites allow it,
    so they keep the graph back to the guide's parameters). The densities are then
    taken by replaying a program against those values, which is how objectives
    choose where gradients flow: replay under a parameters-detached block
    (:meth:`ppl_genmodels.programs.Program.parameters_detached`) for a density whose
    parameters are stopped, or replay :meth:`detached` particles for a density whose
    latents are stopped. Every density is ``[particles, batch]``; every sample site
    must be inside ``pyro.plate("data")`` (the model contract).
    """

    trace: object  # the guide's pyro Trace (subsample sites kept, for replay)
    x: torch.Tensor
    y: torch.Tensor | None
    num_particles: int
    nesting: int

    @classmethod
    def draw(cls, guide: Callable, x: torch.Tensor, y: torch.Tensor | None = None, *, num_particles: int = 1,
             nesting: int) -> "Particles":
        """z_k ~ q(z | x, y), k = 1..K, for every datapoint: one vectorized pass of ``guide``."""
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        program = _in_particle_plate(guide, num_particles, -nesting - 1)
        return cls(poutine.trace(program).get_trace(x, y), x, y, num_particles, nesting)

    @property
    def particle_dim(self) -> int:
        return -self.nesting - 1

    def detached(self) -> "Particles":
        """The same latent values, cut from the graph that made them (densities there keep their parameters' graph)."""
        return Particles(_detached_values(self.trace), self.x, self.y, self.num_particles, self.nesting)

    def not_reparameterized(self) -> list[str]:
        """The guide's latent sites drawn without ``rsample`` (their values carry no gradient to the guide)."""
        return [name for name, site in prune_subsample_sites(self.trace).nodes.items()
                if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample]

    def _densities(self, trace, known=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over latent sites, sum over observed sites) of a trace's log densities, each ``[K, B]``."""
        shape = (self.num_particles, self.x.shape[0])
        latent = observed = None
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample":
                continue
            lp = _site_log_prob(site, self.particle_dim, self.num_particles, self.x.shape[0])
            if site["is_observed"]:
                observed = lp if observed is None else observed + lp
                continue
            if known is not None and name not in known.nodes:
                raise TraceError(f"latent site {name!r} of the model is not sampled by the guide: add "
                                 f"pyro.sample({name!r}, ...) to the guide, inside pyro.plate({DATA_PLATE!r})")
            latent = lp if latent is None else latent + lp
        if latent is None and observed is None:
            raise TraceError("the program has no sample sites to weigh")
        like = latent if latent is not None else observed
        zeros = like.new_zeros(shape)
        return (zeros if latent is None else latent), (zeros if observed is None else observed)

    def log_q(self) -> torch.Tensor:
        """log q(z | x, y) ``[K, B]`` from the draw itself (no second pass of the guide)."""
        return self._densities(self.trace)[0]

    def replay(self, program: Callable):
        """The trace of ``program`` (run under the ``particles`` plate) with its latents set to these values."""
        run = poutine.replay(_in_particle_plate(program, self.num_particles, self.particle_dim), trace=self.trace)
        return poutine.trace(run).get_trace(self.x, self.y)

    def model_log_densities(self, model: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(z | y), log p(x | z, y)), each ``[K, B]``: the model replayed against the particles."""
        return self._densities(self.replay(model), known=self.trace)

    def guide_log_density(self, guide: Callable) -> torch.Tensor:
        """log q(z | x, y) ``[K, B]``: the guide replayed against the particles (a fresh pass, e.g. with its
        parameters detached)."""
        return self._densities(self.replay(guide))[0]
