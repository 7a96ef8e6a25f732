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
with ``num_leapfrog`` leapfrog steps, and each datapoint's step size is adapted
towards an acceptance rate of 0.65 (multiplied by 1.02 above it, divided by 1.02
below). Adapting from the chains' own history makes the transitions depend on
the past, as in that protocol; the bias this introduces is small next to the
annealing bias, and the BDMC sandwich below measures the total.

AIS is a driver around the HMC kernel (as TFP builds it): its state is an
:class:`AnnealedPoint`, the HMC state at the current temperature plus both ends
of the path, log r and log p(x, z) with their gradients, evaluated together at
every leapfrog step. Since log f_beta = log r + beta (log p - log r) is linear
in beta, moving to the next temperature is arithmetic on the point already held
(:meth:`AnnealedPoint.at`): no extra pass of the model per temperature.

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

Every function takes a ``generator``: None (torch's global generator), a
``torch.Generator``, or per-datapoint streams (:class:`ppl_genmodels.streams.Streams`
for the rows of ``x``): then the initial draws (through Pyro, under ``streams.draws()``)
and every HMC transition of a datapoint come from its own stream, and since the step
size adapts per datapoint, a datapoint's estimate does not depend on its batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from ppl_genmodels.compiled import static_path, traced_path
from ppl_genmodels.inference import hmc
from ppl_genmodels.inference.adaptation import TARGET_ACCEPT, adapt_step_size
from ppl_genmodels.inference.importance import iwae_estimate
from ppl_genmodels.inference.mcmc import compiled_transition, traced_transition
from ppl_genmodels.traces import DATA_PLATE, LogJoint, TraceError, is_streams, observed_site, seeded_from

__all__ = ["AISResult", "AnnealedPoint", "SCHEDULES", "NUM_LEAPFROG", "sigmoid_schedule", "linear_schedule", "ais",
           "simulate", "bdmc"]

#: leapfrog steps of every HMC transition between two temperatures (the default of :func:`ais` and :func:`bdmc`)
NUM_LEAPFROG = 10


@dataclass
class AISResult:
    """Per-datapoint AIS estimates."""

    log_z: torch.Tensor        # [batch] forward: estimate of log p(x|y) (stochastic lower bound); reverse: upper bound
    stderr: torch.Tensor       # [batch] delta-method standard error across chains
    ess: torch.Tensor          # [batch] effective sample size of the chains' weights
    log_w: torch.Tensor        # [chains, batch]
    accept_rate: torch.Tensor  # [batch] mean HMC acceptance over steps and chains
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


class AnnealedPoint(NamedTuple):
    """A position on the annealing path: the HMC state at temperature beta and both ends of the path."""

    position: torch.Tensor     # [chains, batch, dim] unconstrained latents u
    log_density: torch.Tensor  # [chains, batch] log f_beta(u) = log r(u) + beta (log p(x, u) - log r(u))
    grad: torch.Tensor         # [chains, batch, dim] its gradient
    log_start: torch.Tensor    # [chains, batch] log r(u)
    log_target: torch.Tensor   # [chains, batch] log p(x, z(u) | y) (+ log|J| in both)
    grad_start: torch.Tensor   # [chains, batch, dim]
    grad_target: torch.Tensor  # [chains, batch, dim]

    def at(self, beta: float) -> "AnnealedPoint":
        """The same point at inverse temperature ``beta``: both log densities are known, so no evaluation."""
        return self._replace(log_density=self.log_start + beta * (self.log_target - self.log_start),
                             grad=self.grad_start + beta * (self.grad_target - self.grad_start))


def _ends_and_grads(u: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None, *, streams=None,
                    joint: LogJoint) -> tuple[torch.Tensor, ...]:
    """(log_start, log_target, their gradients in u) at ``u``, detached: one pass of the pair."""
    with torch.enable_grad():
        pos = u.detach().requires_grad_(True)
        log_start, log_target = joint.at(x, y)(pos)
        (grad_start,) = torch.autograd.grad(log_start.sum(), pos, retain_graph=True)  # cheap: no decoder
        (grad_target,) = torch.autograd.grad(log_target.sum(), pos)
    return log_start.detach(), log_target.detach(), grad_start.detach(), grad_target.detach()


def _evaluator(joint: LogJoint, beta: float) -> Callable[[torch.Tensor], AnnealedPoint]:
    """``u -> AnnealedPoint`` at temperature ``beta``; one graph where the program is compiled."""
    compiled = static_path(_ends_and_grads, joint.model, "AIS log-joint and gradients", inner_grad=True)
    ends_and_grads = compiled or _ends_and_grads

    def evaluate(u: torch.Tensor) -> AnnealedPoint:
        log_start, log_target, grad_start, grad_target = ends_and_grads(u, joint.x, joint.y, joint=joint)
        return AnnealedPoint(u.detach(), log_start, grad_start, log_start, log_target, grad_start,
                             grad_target).at(beta)

    return evaluate


class AISState(NamedTuple):
    point: AnnealedPoint       # where the chains are, at the current temperature
    log_w: torch.Tensor        # [chains, batch] accumulated log weights
    step_size: torch.Tensor    # [1, batch, 1] HMC step size of each datapoint
    accept_total: torch.Tensor  # [batch] sum over steps of the mean acceptance over chains


def _annealed_point(u: torch.Tensor, outputs: tuple, beta: torch.Tensor) -> AnnealedPoint:
    """The point at ``u`` and inverse temperature ``beta`` (a tensor) from the captured graph's outputs there."""
    log_start, log_target, grad_start, grad_target = outputs
    return AnnealedPoint(u, log_start, grad_start, log_start, log_target, grad_start, grad_target).at(beta)


def _anneal(state: AISState, joint: LogJoint, beta_prev: float, beta: float, num_leapfrog: int, target_accept: float,
            generator) -> AISState:
    """One AIS step: add the weight increment at the current point, then one HMC transition leaving f_beta invariant.

    On a compiled program the transition after its draws is one compiled call, the leapfrog
    steps a loop inside it (:func:`~ppl_genmodels.inference.mcmc.compiled_transition`), with
    beta an input of the graph (a 0-dim tensor, as a Python number enters the arithmetic).
    """
    point = state.point
    log_w = state.log_w + (beta - beta_prev) * (point.log_target - point.log_start)
    like = point.log_density
    beta_input = torch.tensor(beta, dtype=like.dtype, device=like.device)
    point, info = compiled_transition(
        joint, point.at(beta), state.step_size, like.new_ones(()), num_leapfrog, generator,
        evaluate=_evaluator(joint, beta), point=_annealed_point, extra=(beta_input,),
        traced=traced_path(traced_transition, joint.model, "AIS transition"),
        static=static_path(_ends_and_grads, joint.model, "AIS log-joint and gradients", inner_grad=True))
    step_size = adapt_step_size(state.step_size, info.accept_rate, target_accept)
    return AISState(point, log_w, step_size, state.accept_total + info.accept_rate.mean(0))


def _check(num_chains: int, num_leapfrog: int, schedule: str, reverse: bool, latents) -> None:
    if num_chains < 1 or num_leapfrog < 1:
        raise ValueError(f"num_chains and num_leapfrog must be >= 1, got {num_chains}, {num_leapfrog}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if reverse and latents is None:
        raise ValueError("reverse AIS needs latents: the exact posterior latents to start from")


def ais(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_steps: int = 1000,
    num_chains: int = 16,
    start: str = "prior",
    num_leapfrog: int = NUM_LEAPFROG,
    step_size: float = 0.1,
    target_accept: float = TARGET_ACCEPT,
    schedule: str = "sigmoid",
    reverse: bool = False,
    latents: dict | None = None,
    generator=None,
    progress: bool = False,
) -> AISResult:
    """AIS estimate of log p(x | y) for every datapoint of ``x  # [batch, ...]``.

    ``start`` is the initial distribution r: ``"prior"`` or ``"guide"``. ``reverse=True``
    anneals from the posterior back to r starting at ``latents`` (``{site: value [batch, ...]}``,
    an exact posterior sample, e.g. from :func:`simulate`), and returns the stochastic
    upper bound. ``generator``, when given, drives every random draw (tracing the pair, the
    initial draws, every HMC transition): the result depends on it alone, and torch's
    global generator is left as it was. Per-datapoint streams give the initial draws and
    the transitions streams of their own (``start``, ``kernel``).
    """
    _check(num_chains, num_leapfrog, schedule, reverse, latents)
    began = time.perf_counter()
    with seeded_from(generator):  # Pyro's own draws (tracing the pair) from the generator too
        joint = LogJoint(model, guide, x, y, start=start)
    starts, kernel = (generator.child("start"), generator.child("kernel")) if is_streams(generator) else \
        (generator, generator)
    batch = x.shape[0]
    betas = SCHEDULES[schedule](num_steps).tolist()
    if reverse:
        betas = betas[::-1]
        u = joint.layout.pack({k: v.detach().to(x.dtype) for k, v in latents.items()}, (num_chains, batch))
    else:
        u = joint.sample_start(num_chains, generator=starts)
        if is_streams(generator) and not starts.exact:
            generator.exact = False  # some start draw came from torch's global generator
    eps = torch.full((1, batch, 1), float(step_size), dtype=x.dtype, device=x.device)
    with pyro.validation_enabled(False):
        state = AISState(_evaluator(joint, betas[0])(u), x.new_zeros(num_chains, batch), eps, x.new_zeros(batch))
        for t in tqdm(range(1, num_steps + 1), desc="AIS", unit="step", disable=not progress, leave=False):
            state = _anneal(state, joint, betas[t - 1], betas[t], num_leapfrog, target_accept, kernel)
    value, stderr, ess = iwae_estimate(state.log_w)
    if reverse:
        value = -value  # E[w] = 1 / p(x): the estimate of log p(x) is -log-mean-exp
    return AISResult(value, stderr, ess, state.log_w, state.accept_total / num_steps, state.step_size.reshape(batch),
                     time.perf_counter() - began)


@torch.no_grad()
def simulate(model: Callable, x_template: torch.Tensor, y: torch.Tensor | None = None, *, generator=None):
    """Draw data from the model: ``(x, latents)`` with ``latents = {site: value [n, ...]}`` that generated x.

    ``x_template [n, ...]`` fixes the number of draws, shape, device and dtype.
    A pair (z, x) drawn this way makes z an exact sample of p(z | x), which is
    what reverse AIS needs. ``generator``: None, a ``torch.Generator``, or per-datapoint
    streams for the n draws (each simulated datapoint then depends on its own stream alone).
    """
    with seeded_from(generator):
        trace = prune_subsample_sites(poutine.trace(poutine.uncondition(model)).get_trace(x_template, y))
    name = observed_site(trace)
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
    start: str = "prior",
    num_leapfrog: int = NUM_LEAPFROG,
    step_size: float = 0.1,
    target_accept: float = TARGET_ACCEPT,
    schedule: str = "sigmoid",
    generator=None,
    progress: bool = False,
) -> tuple[AISResult, AISResult]:
    """Forward (lower bound) and reverse (upper bound) AIS on simulated data with known latents.

    A ``torch.Generator`` drives both runs in turn; per-datapoint streams give each run a stream
    of its own (``forward``, ``reverse``).
    """
    options = dict(num_steps=num_steps, num_chains=num_chains, start=start, num_leapfrog=num_leapfrog,
                   step_size=step_size, target_accept=target_accept, schedule=schedule, progress=progress)
    streams = is_streams(generator)
    forward = ais(model, guide, x, y, generator=generator.child("forward") if streams else generator, **options)
    backward = ais(model, guide, x, y, reverse=True, latents=latents,
                   generator=generator.child("reverse") if streams else generator, **options)
    return forward, backward
