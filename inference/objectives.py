"""SVI objectives: what the training loop minimises.

Every objective exposes ``loss(model, guide, x, y)``: a differentiable scalar,
the *negative* bound summed over the datapoints of the batch.

- ``trace``: Pyro's ``Trace_ELBO``, the reparameterised Monte Carlo ELBO
  E_q[log p(x, z) - log q(z|x)] (Kingma & Welling 2014); with K particles the
  K per-particle ELBOs are averaged. For one particle and a fully
  reparameterised guide it is computed by :class:`TraceELBO`'s lean path (the
  same value and gradients, less per-step overhead).
- ``meanfield``: Pyro's ``TraceMeanField_ELBO``, the same bound with the KL
  term computed analytically where the distributions allow it.
- ``iwae``: the importance-weighted bound of Burda, Grosse & Salakhutdinov
  (2016), log (1/K) sum_k w_k per datapoint, from
  :func:`ppl_genmodels.traces.log_weights`. Pyro's ``RenyiELBO(alpha=0)``
  computes the same quantity only when every site sits in the data plate;
  ``log_weights`` checks exactly that and refuses otherwise, so the bound is
  always per datapoint. K = 1 reduces it to the ELBO.
"""

from __future__ import annotations

import pyro.infer
import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import _Subsample

from ppl_genmodels.traces import log_mean_exp, log_weights

OBJECTIVES = {
    "trace": "Trace_ELBO: Monte Carlo ELBO (default)",
    "meanfield": "TraceMeanField_ELBO: ELBO with analytic KL where available",
    "iwae": "importance-weighted bound IWAE-K (use --particles K)",
}

__all__ = ["OBJECTIVES", "PyroELBO", "TraceELBO", "IWAE", "make_objective"]


class PyroELBO:
    """A Pyro ELBO class used as a differentiable loss on the module's own parameters."""

    def __init__(self, elbo_cls, num_particles: int, max_plate_nesting: int):
        self.num_particles = num_particles
        self.elbo = elbo_cls(
            num_particles=num_particles,
            vectorize_particles=num_particles > 1,
            max_plate_nesting=max_plate_nesting,
        )

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
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
        guide_trace = poutine.trace(guide).get_trace(x, y)
        if self.lean is None:
            self.lean = all(
                site["fn"].has_rsample
                for site in guide_trace.nodes.values()
                if site["type"] == "sample" and not site["is_observed"] and not isinstance(site["fn"], _Subsample)
            )
            if not self.lean:
                return super().loss(model, guide, x, y)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
        return _log_prob_sum(guide_trace) - _log_prob_sum(model_trace)


class IWAE:
    """Negative importance-weighted bound, summed over the batch."""

    def __init__(self, num_particles: int, max_plate_nesting: int):
        self.num_particles = num_particles
        self.nesting = max_plate_nesting

    def loss(self, model, guide, x, y=None) -> torch.Tensor:
        log_w = log_weights(model, guide, x, y, num_particles=self.num_particles, nesting=self.nesting)
        return -log_mean_exp(log_w, 0).sum()  # log_w: [particles, batch]


def make_objective(name: str, num_particles: int = 1, max_plate_nesting: int = 1):
    """Build the objective called ``name`` (one of :data:`OBJECTIVES`)."""
    if num_particles < 1:
        raise ValueError(f"--particles must be >= 1, got {num_particles}")
    if name == "trace":
        return TraceELBO(num_particles, max_plate_nesting)
    if name == "meanfield":
        return PyroELBO(pyro.infer.TraceMeanField_ELBO, num_particles, max_plate_nesting)
    if name == "iwae":
        return IWAE(num_particles, max_plate_nesting)
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
