"""SVI objectives: what the training loop minimises.

Every objective exposes ``loss(model, guide, x, y)``: a differentiable scalar,
the *negative* bound summed over the datapoints of the batch.

- ``trace``: Pyro's ``Trace_ELBO``, the reparameterised Monte Carlo ELBO
  E_q[log p(x, z) - log q(z|x)] (Kingma & Welling 2014); with K particles the
  K per-particle ELBOs are averaged.
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

from ppl_genmodels.traces import log_mean_exp, log_weights

OBJECTIVES = {
    "trace": "Trace_ELBO: Monte Carlo ELBO (default)",
    "meanfield": "TraceMeanField_ELBO: ELBO with analytic KL where available",
    "iwae": "importance-weighted bound IWAE-K (use --particles K)",
}

__all__ = ["OBJECTIVES", "PyroELBO", "IWAE", "make_objective"]


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
        return PyroELBO(pyro.infer.Trace_ELBO, num_particles, max_plate_nesting)
    if name == "meanfield":
        return PyroELBO(pyro.infer.TraceMeanField_ELBO, num_particles, max_plate_nesting)
    if name == "iwae":
        return IWAE(num_particles, max_plate_nesting)
    raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
