"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC) for log p(x) per datapoint.

AIS (Neal 2001, "Annealed importance sampling") moves particles through a
sequence of distributions from a normalised initial density r(z) to the
unnormalised posterior p(x, z), along the geometric path

    f_t(z) = r(z)^(1 - beta_t) p(x, z)^beta_t,      0 = beta_0 < ... < beta_T = 1,

with one MCMC transition leaving f_t invariant at each step. The weight

    log w = sum_t (beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log r(z_{t-1})]

has E[w] = p(x), so log-mean-exp over chains is a stochastic lower bound on
log p(x) that tightens as T grows. The protocol follows Wu, Burda,
Salakhutdinov & Grosse (2017), "On the quantitative analysis of decoder-based
generative models": r is the prior (or here, optionally, the amortized guide),
the schedule is the sigmoid one, beta_t proportional to sigmoid(delta (2t/T - 1))
rescaled to [0, 1] (delta = 4), each transition is HMC (``inference/hmc.py``)
with ``leapfrog_steps`` leapfrog steps, and each datapoint's step size is adapted
towards an acceptance rate of 0.65 (multiplied by 1.02 above it, divided by 1.02
below). Adapting from the chains' own history makes the transitions depend on
the past, as in that protocol; the bias this introduces is small next to the
annealing bias, and the BDMC sandwich below measures the total.

Run in reverse (beta from 1 to 0) from an exact posterior sample, the same sum
has E[w] = 1 / p(x), so -log-mean-exp is a stochastic *upper* bound. BDMC
(Grosse, Ghahramani & Adams 2015, "Sandwiching the marginal likelihood using
bidirectional Monte Carlo") uses data simulated from the model, where the latent
that generated each x is such an exact sample: the forward and reverse
estimates sandwich log p(x), and the width of the sandwich bounds the error of
AIS with that schedule.

Latents with constrained support are annealed in unconstrained space (the
log|det J| of the transform is part of both densities; see
:class:`ppl_genmodels.traces.LogJoint`). Chains are a vectorized particle
plate and datapoints the data plate, so one pass of the model serves every
chain of every datapoint of a batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from ppl_genmodels.inference import hmc
from ppl_genmodels.inference.importance import iwae_estimate
from ppl_genmodels.traces import DATA_PLATE, LogJoint, TraceError, _pick_observed

__all__ = ["AISResult", "sigmoid_schedule", "linear_schedule", "ais", "simulate", "bdmc"]


@dataclass
class AISResult:
    """Per-datapoint AIS estimates."""

    log_z: torch.Tensor        # [batch] forward: estimate of log p(x|y) (stochastic lower bound); reverse: upper bound
    stderr: torch.Tensor       # [batch] delta-method standard error across chains
    ess: torch.Tensor          # [batch] effective sample size of the chains' weights
    log_w: torch.Tensor        # [chains, batch]
    acceptance: torch.Tensor   # [batch] mean HMC acceptance over steps and chains
    step_size: torch.Tensor    # [batch] final adapted step size
    seconds: float


def sigmoid_schedule(num_steps: int, delta: float = 4.0, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """``[num_steps + 1]`` inverse temperatures from 0 to 1, dense near both ends (Grosse et al. 2015)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.sigmoid(torch.linspace(-delta, delta, num_steps + 1, dtype=dtype, device=device))
    return (s - s[0]) / (s[-1] - s[0])


def linear_schedule(num_steps: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """``[num_steps + 1]`` evenly spaced inverse temperatures from 0 to 1."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=dtype, device=device)


SCHEDULES = {"sigmoid": sigmoid_schedule, "linear": linear_schedule}


def _annealed(joint: LogJoint, beta: float) -> Callable:
    """log f_beta(u) = log r(u) + beta (log p(u) - log r(u)), carrying log p - log r as aux."""

    def logdensity(u):
        log_init, log_target = joint(u)
        diff = log_target - log_init
        return log_init + beta * diff, diff

    return logdensity


def ais(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_steps: int = 1000,
    num_chains: int = 16,
    init: str = "prior",
    leapfrog_steps: int = 10,
    step_size: float = 0.1,
    target_accept: float = 0.65,
    schedule: str = "sigmoid",
    reverse: bool = False,
    start: dict | None = None,
    progress: bool = False,
) -> AISResult:
    """AIS estimate of log p(x | y) for every datapoint of ``x  # [batch, ...]``.

    ``reverse=True`` anneals from the posterior back to ``init`` starting at the
    latents ``start`` (``{site: value [batch, ...]}``, an exact posterior sample,
    e.g. from :func:`simulate`), and returns the stochastic upper bound.
    """
    if num_chains < 1 or leapfrog_steps < 1:
        raise ValueError(f"num_chains and leapfrog_steps must be >= 1, got {num_chains}, {leapfrog_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if reverse and start is None:
        raise ValueError("reverse AIS needs start: the exact posterior latents to start from")
    began = time.perf_counter()
    joint = LogJoint(model, guide, x, y, init=init)
    batch = x.shape[0]
    betas = SCHEDULES[schedule](num_steps).tolist()
    if reverse:
        betas = betas[::-1]
        u = joint.layout.pack({k: v.detach().to(x.dtype) for k, v in start.items()}, (num_chains, batch))
    else:
        u = joint.sample_init(num_chains)
    eps = torch.full((1, batch, 1), float(step_size), dtype=x.dtype, device=x.device)
    log_w = x.new_zeros(num_chains, batch)
    accept_total = x.new_zeros(batch)
    with pyro.validation_enabled(False):
        state = hmc.init(u, _annealed(joint, betas[0]))
        for t in tqdm(range(1, num_steps + 1), desc="AIS", unit="step", disable=not progress, leave=False):
            log_w = log_w + (betas[t] - betas[t - 1]) * state.aux  # weight increment at the current z
            target = _annealed(joint, betas[t])
            state = hmc.init(state.position, target)  # same position, new temperature
            state, info = hmc.step(state, target, eps, 1.0, leapfrog_steps)
            eps = hmc.adapt_step_size(eps, info.accept_prob, target_accept)
            accept_total = accept_total + info.accept_prob.mean(0)
    value, stderr, ess = iwae_estimate(log_w)
    if reverse:
        value = -value  # E[w] = 1 / p(x): the estimate of log p(x) is -log-mean-exp
    return AISResult(value, stderr, ess, log_w, accept_total / num_steps, eps.reshape(batch),
                     time.perf_counter() - began)


@torch.no_grad()
def simulate(model: Callable, x_template: torch.Tensor, y: torch.Tensor | None = None):
    """Draw data from the model: ``(x, latents)`` with ``latents = {site: value [n, ...]}`` that generated x.

    ``x_template [n, ...]`` fixes the number of draws, shape, device and dtype.
    A pair (z, x) drawn this way makes z an exact sample of p(z | x), which is
    what reverse AIS needs.
    """
    trace = prune_subsample_sites(poutine.trace(poutine.uncondition(model)).get_trace(x_template, y))
    name = _pick_observed(trace, None)
    latents = {}
    for site_name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["infer"].get("was_observed") and not site["is_observed"]:
            if DATA_PLATE not in {f.name for f in site["cond_indep_stack"]}:
                raise TraceError(f"latent site {site_name!r} is outside pyro.plate({DATA_PLATE!r})")
            latents[site_name] = site["value"]
    return trace.nodes[name]["value"], latents


def bdmc(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    latents: dict,
    y: torch.Tensor | None = None,
    *,
    num_steps: int = 1000,
    num_chains: int = 16,
    init: str = "prior",
    leapfrog_steps: int = 10,
    step_size: float = 0.1,
    target_accept: float = 0.65,
    schedule: str = "sigmoid",
    progress: bool = False,
) -> tuple[AISResult, AISResult]:
    """Forward (lower bound) and reverse (upper bound) AIS on simulated data with known latents."""
    options = dict(num_steps=num_steps, num_chains=num_chains, init=init, leapfrog_steps=leapfrog_steps,
                   step_size=step_size, target_accept=target_accept, schedule=schedule, progress=progress)
    forward = ais(model, guide, x, y, **options)
    backward = ais(model, guide, x, y, reverse=True, start=latents, **options)
    return forward, backward

