"""SVI objectives: what the training loop minimises.

Every objective exposes ``loss(model, guide, x, y)``: a differentiable scalar,
the *negative* bound summed over the datapoints of the batch, whose value is
the bound itself and whose gradient is the objective's estimator (a surrogate
where the estimator is not the bound's own gradient). Notation, per datapoint,
with K particles z_k ~ q(z | x) (reparameterised, z_k = g(eps_k, phi), where the
guide allows it): log w_k = log p_theta(x, z_k) - log q_phi(z_k | x), and
w~_k = w_k / sum_j w_j the normalised weights.

ELBO family (take a KL weight: ``--beta``, ``--kl-warmup``, see :func:`kl_weight`):

- ``trace``: Pyro's ``Trace_ELBO``, the reparameterised Monte Carlo ELBO
  E_q[log p(x, z) - log q(z|x)] (Kingma & Welling 2014); with K particles the
  K per-particle ELBOs are averaged. For one particle and a fully
  reparameterised guide it is computed by :class:`TraceELBO`'s lean path (the
  same value and gradients, less per-step overhead).
- ``meanfield``: Pyro's ``TraceMeanField_ELBO``, the same bound with the KL
  term computed analytically where the distributions allow it.
- ``stl``: the ELBO with "sticking the landing" guide gradients (Roeder, Wu &
  Duvenaud 2017): surrogate log p_theta(x, z(phi)) - log q_{stop phi}(z(phi)),
  the guide's density evaluated with every parameter detached, so its score
  term (zero in expectation, not in a sample) is dropped; the gradient's
  variance vanishes as q approaches the posterior.

With a KL weight w the ELBO-family loss is -(log p(x|z) + w (log p(z) - log q(z))),
applied by scaling every latent site's log-density by w (the observed sites keep
scale 1), so ``meanfield``'s analytic KL is weighted too.

Importance-weighted family (``--particles K``):

- ``iwae``: the importance-weighted bound of Burda, Grosse & Salakhutdinov
  (2016), log (1/K) sum_k w_k per datapoint, from
  :func:`ppl_genmodels.traces.log_weights`. Pyro's ``RenyiELBO(alpha=0)``
  computes the same quantity only when every site sits in the data plate;
  ``log_weights`` checks exactly that and refuses otherwise, so the bound is
  always per datapoint. K = 1 reduces it to the ELBO.
- ``dreg``: IWAE-K with doubly-reparameterised guide gradients (Tucker, Lawson,
  Gu & Maddison 2018). The model gets the IWAE gradient sum_k w~_k grad_theta log p(x, z_k)
  (surrogate: the bound at detached z_k); the guide gets
  sum_k w~_k^2 d/dz_k[log p(x, z_k) - log q(z_k)] dz_k/dphi (surrogate: those
  densities with every parameter detached, the latents live, weighted by the
  detached w~_k^2). Its guide gradient's signal-to-noise ratio does not decay
  with K as IWAE's does (Rainforth et al. 2018). At K = 1 it is ``stl``.
- ``rws``: reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019):
  wake-theta, the IWAE gradient for the model (z detached), and wake-phi,
  sum_k w~_k grad_phi log q_phi(z_k) with z_k and w~_k detached (the guide
  minimises a self-normalised estimate of KL(p(z|x) || q)). No gradient
  goes through z, so it trains discrete (non-reparameterisable) latents.
- ``renyi:ALPHA``: the variational Rényi bound (Li & Turner 2016),
  L_alpha = 1/(1-alpha) log (1/K) sum_k w_k^(1-alpha) per datapoint; alpha = 0 is
  IWAE, alpha -> 1 the ELBO (K-particle average); alpha must be < 1 and finite.

``stl``, ``dreg`` and ``renyi`` need a reparameterised guide (``rws`` or
``trace`` train a discrete latent); ``stl`` and ``dreg`` evaluate densities
with the program's parameters detached, through the program's
``parameters_detached()`` block (:class:`ppl_genmodels.programs.Program`),
passed as ``detached`` or found on the bound ``model`` method.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import pyro.infer
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from ppl_genmodels.traces import Particles, TraceError, log_mean_exp, log_weights

OBJECTIVES = {
    "trace": "Trace_ELBO: Monte Carlo ELBO (default)",
    "meanfield": "TraceMeanField_ELBO: ELBO with analytic KL where available",
    "iwae": "importance-weighted bound IWAE-K (use --particles K)",
    "stl": "ELBO with sticking-the-landing guide gradients (reparameterised guides)",
    "dreg": "IWAE-K with doubly-reparameterised guide gradients",
    "rws": "reweighted wake-sleep: IWAE-K model gradient, wake-phi guide gradient (discrete latents too)",
    "renyi:ALPHA": "variational Renyi bound, alpha < 1 (0: IWAE, towards 1: the ELBO)",
}

#: objectives with a KL term to weight (``--beta``, ``--kl-warmup``)
KL_WEIGHTED = ("trace", "meanfield", "stl")

#: objectives that take a parameter after a colon, e.g. ``renyi:0.5``
PARAMETRIC = ("renyi",)

__all__ = ["OBJECTIVES", "KL_WEIGHTED", "ObjectiveNames", "parse_objective", "kl_weight", "PyroELBO", "TraceELBO",
           "IWAE", "STL", "DReG", "RWS", "Renyi", "make_objective"]


def _valid_names() -> str:
    return ", ".join(OBJECTIVES)


def parse_objective(name: str) -> tuple[str, float | None]:
    """``"renyi:0.5"`` -> ``("renyi", 0.5)``, ``"iwae"`` -> ``("iwae", None)``; ValueError (one line) otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"unknown objective {name!r}; choose one of {_valid_names()}")
    base, sep, value = name.partition(":")
    if base not in PARAMETRIC:
        if sep or base not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; choose one of {_valid_names()}")
        return base, None
    if not sep or not value.strip():
        raise ValueError(f"unknown objective {name!r}: the Renyi bound needs its alpha, e.g. renyi:0.5; "
                         f"choose one of {_valid_names()}")
    try:
        alpha = float(value)
    except ValueError:
        raise ValueError(f"renyi:ALPHA needs a number for ALPHA, got {value!r} (e.g. renyi:0.5)") from None
    if not math.isfinite(alpha):
        raise ValueError(f"renyi:ALPHA needs a finite alpha < 1, got {value!r}")
    if alpha == 1:
        raise ValueError("renyi:1 is the ELBO; use --elbo trace (or renyi:ALPHA with alpha < 1)")
    if alpha > 1:
        raise ValueError(f"renyi:ALPHA needs alpha < 1 (a lower bound on log p(x)), got {alpha:g}")
    return base, alpha


class ObjectiveNames(tuple):
    """The objective names (:data:`OBJECTIVES`' keys) as the command line's choices.

    A parametric objective is listed as ``renyi:ALPHA``; membership accepts any
    ``renyi:VALUE`` (not a bare ``renyi``), whose value is then checked by
    :func:`parse_objective` (in ``RunConfig.validate``) with a message that says
    what is wrong.
    """

    def __new__(cls, names=tuple(OBJECTIVES)):
        return super().__new__(cls, names)

    def __contains__(self, name) -> bool:
        if not isinstance(name, str):
            return False
        base, sep, _ = name.partition(":")
        return tuple.__contains__(self, name) or bool(sep) and base in PARAMETRIC


def kl_weight(beta: float, kl_warmup: int, epoch: int) -> float:
    """The KL weight of epoch ``epoch`` (counted from 1): ``beta * min(1, epoch / kl_warmup)``, or ``beta``.

    A linear warm-up over ``kl_warmup`` epochs: the first epoch trains with
    beta / kl_warmup (never 0), epoch ``kl_warmup`` and every later one with beta.
    A function of the epoch number alone, so a resumed run continues the schedule exactly.
    """
    if kl_warmup <= 0:
        return float(beta)
    return float(beta) * min(1.0, epoch / kl_warmup)


class _LatentScale(Messenger):
    """Multiply the log-density scale of every latent (unobserved) sample site by ``weight``."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not isinstance(msg["fn"], _Subsample):
            msg["scale"] = self.weight * msg["scale"]


def _weighted(model, guide, weight):
    """``model`` and ``guide`` with their latent sites scaled by ``weight`` (unchanged for weight 1).

    ``weight``: a number, or a 0-dim tensor (a compiled training step's input: always applied).
    """
    if not isinstance(weight, torch.Tensor) and weight == 1.0:
        return model, guide
    return _LatentScale(weight)(model), _LatentScale(weight)(guide)


class PyroELBO:
    """A Pyro ELBO class used as a differentiable loss on the module's own parameters."""

    def __init__(self, elbo_cls, num_particles: int, max_plate_nesting: int):
        self.num_particles = num_particles
        self.kl_weight = 1.0
        self.elbo = elbo_cls(
            num_particles=num_particles,
            vectorize_particles=num_particles > 1,
            max_plate_nesting=max_plate_nesting,
        )

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
        model, guide = _weighted(model, guide, self.kl_weight)
        return self.elbo.differentiable_loss(model, guide, x, y)


def _log_prob_sum(trace) -> torch.Tensor:
    """Sum of the scaled, masked log-densities of a trace's sample sites (subsample sites skipped)."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
            continue
        lp = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            lp = torch.where(site["mask"], lp, lp.new_zeros(()))
        lp = lp.sum()
        total = total + (lp if site["scale"] is None or isinstance(site["scale"], float) and site["scale"] == 1.0 else site["scale"] * lp)
    return total


class TraceELBO(PyroELBO):
    """``Trace_ELBO`` with a lean path for fully reparameterised guides.

    With one particle and a guide whose every site has ``rsample``, Pyro's
    ``Trace_ELBO`` surrogate reduces to -(log p(x, z) - log q(z | x)) at the
    reparameterised draw. Computing exactly that from the two traces gives the
    same value and gradients without the per-site bookkeeping (cached log-prob
    tables, NaN hooks, host syncs) that makes up much of Pyro's per-step
    overhead on small networks. Any other case (non-reparameterisable sites,
    several particles) goes to ``pyro.infer.Trace_ELBO`` itself.
    """

    def __init__(self, num_particles: int, max_plate_nesting: int):
        super().__init__(pyro.infer.Trace_ELBO, num_particles, max_plate_nesting)
        self.lean = None if num_particles == 1 else False

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
        if self.lean is False:
            return super().loss(model, guide, x, y)
        weighted_model, weighted_guide = _weighted(model, guide, self.kl_weight)
        guide_trace = poutine.trace(weighted_guide).get_trace(x, y)
        if self.lean is None:
            self.lean = all(
                site["fn"].has_rsample
                for site in guide_trace.nodes.values()
                if site["type"] == "sample" and not site["is_observed"] and not isinstance(site["fn"], _Subsample)
            )
            if not self.lean:
                return super().loss(model, guide, x, y)
        model_trace = poutine.trace(poutine.replay(weighted_model, trace=guide_trace)).get_trace(x, y)
        return _log_prob_sum(guide_trace) - _log_prob_sum(model_trace)


class IWAE:
    """Negative importance-weighted bound, summed over the batch."""

    def __init__(self, num_particles: int, max_plate_nesting: int):
        self.num_particles = num_particles
        self.nesting = max_plate_nesting

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
        log_w = log_weights(model, guide, x, y, num_particles=self.num_particles, nesting=self.nesting)
        return -log_mean_exp(log_w, 0).sum()  # log_w: [particles, batch]


class _Particled:
    """What the objectives computed from :class:`~ppl_genmodels.traces.Particles` share."""

    name = ""
    reparameterized = False  # needs every guide site drawn with rsample

    def __init__(self, num_particles: int, max_plate_nesting: int, detached: Callable | None = None):
        self.num_particles = num_particles
        self.nesting = max_plate_nesting
        self.detached = detached
        self.checked = False

    def draw(self, guide, x, y) -> Particles:
        particles = Particles.draw(guide, x, y, num_particles=self.num_particles, nesting=self.nesting)
        if self.reparameterized and not self.checked:
            sites = particles.not_reparameterized()
            if sites:
                raise TraceError(f"--elbo {self.name} needs a reparameterised guide, but site {sites[0]!r} has no "
                                 "rsample (a discrete latent); use --elbo rws (or trace, with score-function "
                                 "gradients)")
            self.checked = True
        return particles

    def parameters_detached(self, model) -> contextlib.AbstractContextManager:
        """The program's parameters-detached block (given, or the ``parameters_detached`` of ``model``'s owner)."""
        detached = self.detached or getattr(getattr(model, "__self__", None), "parameters_detached", None)
        if detached is None:
            raise TypeError(f"--elbo {self.name} evaluates densities with the parameters detached: pass "
                            "make_objective(..., detached=program.parameters_detached) or a Program's bound "
                            "model/guide")
        return detached()


def _model_part(particles: Particles, model, log_q: torch.Tensor) -> torch.Tensor:
    """log w_k with the latents and log q detached: only the model's parameters get its gradient  # [K, B]."""
    log_prior, log_lik = particles.detached().model_log_densities(model)
    return log_prior + log_lik - log_q.detach()


def _surrogate(weights: torch.Tensor, log_density: torch.Tensor) -> torch.Tensor:
    """sum_k weights_k * log_density_k per datapoint, with value 0 (it only carries a gradient)  # [B]."""
    part = (weights.detach() * log_density).sum(0)
    return part - part.detach()


class STL(_Particled):
    """Sticking the landing: -(log p(x|z) + w (log p(z) - log q_{stop}(z))), averaged over the K particles."""

    name = "stl"
    reparameterized = True

    def __init__(self, num_particles: int, max_plate_nesting: int, detached: Callable | None = None):
        super().__init__(num_particles, max_plate_nesting, detached)
        self.kl_weight = 1.0

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
        particles = self.draw(guide, x, y)
        log_prior, log_lik = particles.model_log_densities(model)
        with self.parameters_detached(model):
            log_q = particles.guide_log_density(guide)
        bound = log_lik + self.kl_weight * (log_prior - log_q)  # [K, B]
        return -bound.mean(0).sum()


class DReG(_Particled):
    """IWAE-K with doubly-reparameterised guide gradients; the model gets the IWAE gradient."""

    name = "dreg"
    reparameterized = True

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
        particles = self.draw(guide, x, y)
        with torch.no_grad():
            log_q = particles.log_q()
        log_w = _model_part(particles, model, log_q)  # [K, B]
        with self.parameters_detached(model):
            log_prior, log_lik = particles.model_log_densities(model)
            log_w_stopped = log_prior + log_lik - particles.guide_log_density(guide)  # gradient through z only
        normalized = torch.softmax(log_w.detach(), 0)
        return -(log_mean_exp(log_w, 0) + _surrogate(normalized.pow(2), log_w_stopped)).sum()


class RWS(_Particled):
    """Reweighted wake-sleep: wake-theta (IWAE gradient, z detached) and wake-phi (sum_k w~_k grad log q(z_k))."""

    name = "rws"

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
        with torch.no_grad():
            particles = self.draw(guide, x, y)  # values only: no gradient goes through z
        log_q = particles.guide_log_density(guide)  # the guide's parameters live  # [K, B]
        log_w = _model_part(particles, model, log_q)
        normalized = torch.softmax(log_w.detach(), 0)
        return -(log_mean_exp(log_w, 0) + _surrogate(normalized, log_q)).sum()


class Renyi(_Particled):
    """The variational Renyi bound 1/(1-alpha) log (1/K) sum_k w_k^(1-alpha), per datapoint."""

    name = "renyi"
    reparameterized = True

    def __init__(self, num_particles: int, max_plate_nesting: int, alpha: float):
        super().__init__(num_particles, max_plate_nesting)
        self.alpha = alpha

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
        particles = self.draw(guide, x, y)
        log_prior, log_lik = particles.model_log_densities(model)
        log_w = log_prior + log_lik - particles.log_q()  # [K, B]
        power = 1.0 - self.alpha
        return -(log_mean_exp(power * log_w, 0) / power).sum()


def make_objective(name: str, num_particles: int = 1, max_plate_nesting: int = 1, *,
                   detached: Callable | None = None):
    """Build the objective called ``name`` (one of :data:`OBJECTIVES`, ``renyi:ALPHA`` with its alpha).

    ``detached``: the program's ``parameters_detached`` (a context-manager factory),
    used by ``stl`` and ``dreg``; without it they use the bound ``model``'s owner's.
    The ELBO-family objectives (:data:`KL_WEIGHTED`) carry a ``kl_weight``
    attribute (1.0), which the training loop sets per epoch.
    """
    if num_particles < 1:
        raise ValueError(f"--particles must be >= 1, got {num_particles}")
    base, alpha = parse_objective(name)
    if base == "trace":
        return TraceELBO(num_particles, max_plate_nesting)
    if base == "meanfield":
        return PyroELBO(pyro.infer.TraceMeanField_ELBO, num_particles, max_plate_nesting)
    if base == "iwae":
        return IWAE(num_particles, max_plate_nesting)
    if base == "stl":
        return STL(num_particles, max_plate_nesting, detached)
    if base == "dreg":
        return DReG(num_particles, max_plate_nesting, detached)
    if base == "rws":
        return RWS(num_particles, max_plate_nesting)
    return Renyi(num_particles, max_plate_nesting, alpha)
