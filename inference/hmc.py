"""Batched Hamiltonian Monte Carlo: many independent targets, several chains each, in one tensor.

Positions have shape ``[chains, batch, dim]``: ``batch`` indexes independent
targets (one posterior p(z | x_b) per datapoint) and ``chains`` independent
chains per target. ``logdensity_fn(position) -> log_density  # [chains, batch]``
is differentiated with autograd; because the targets are independent, the
gradient of the summed log density is every chain's own gradient.

HMC (Duane et al. 1987; Neal 2011, "MCMC using Hamiltonian dynamics"):
momentum p ~ N(0, M) with a diagonal mass M = 1 / inverse_mass, ``num_steps``
leapfrog steps of size eps on H(z, p) = -log pi(z) + p^T M^{-1} p / 2, then a
Metropolis correction, accepting with probability min(1, exp(H_0 - H_L)).
A trajectory whose energy error exceeds ``divergence_threshold`` (or becomes
non-finite) is a divergence and is rejected.

Following BlackJAX, the sampler is a pure ``init`` / ``step`` pair over a small
state: design choices (the threshold) are fixed arguments, tunable values
(``step_size``, ``inverse_mass``) are passed on every call with shapes that
broadcast against the position, so a ``[1, batch, 1]`` step size gives each
target its own step size and a ``[chains, batch, 1]`` one each chain its own.
Adaptation is a separate piece (``adapt_step_size`` here, used by AIS).

``logdensity_fn`` may also return ``(log_density, aux)`` where ``aux`` is any
tensor with leading shape ``[chains, batch]`` that the caller wants carried
along with the accepted position (AIS keeps log p - log r there); it is
selected with the position on acceptance and never fed back into the dynamics.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

__all__ = [
    "HMCState", "HMCInfo", "value_and_grad", "init", "step", "adapt_step_size",
    "DualAveragingState", "dual_averaging_init", "dual_averaging_update",
    "WelfordState", "welford_init", "welford_update", "welford_final",
]


class HMCState(NamedTuple):
    position: torch.Tensor      # [chains, batch, dim]
    log_density: torch.Tensor   # [chains, batch]
    grad: torch.Tensor          # [chains, batch, dim]
    aux: torch.Tensor | None    # [chains, batch, ...] or None


class HMCInfo(NamedTuple):
    accept_prob: torch.Tensor   # [chains, batch] Metropolis acceptance probability
    accepted: torch.Tensor      # [chains, batch] bool
    divergent: torch.Tensor     # [chains, batch] bool
    energy: torch.Tensor        # [chains, batch] Hamiltonian at the end of the trajectory


def value_and_grad(logdensity_fn: Callable, position: torch.Tensor):
    """``(log_density, grad, aux)`` at ``position``, all detached."""
    with torch.enable_grad():
        pos = position.detach().requires_grad_(True)
        out = logdensity_fn(pos)
        value, aux = out if isinstance(out, tuple) else (out, None)
        (grad,) = torch.autograd.grad(value.sum(), pos)
    return value.detach(), grad.detach(), None if aux is None else aux.detach()


def init(position: torch.Tensor, logdensity_fn: Callable) -> HMCState:
    """The sampler state at ``position  # [chains, batch, dim]``."""
    return HMCState(position.detach(), *value_and_grad(logdensity_fn, position))


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.reshape(mask.shape + (1,) * (new.dim() - mask.dim())), new, old)


def step(
    state: HMCState,
    logdensity_fn: Callable,
    step_size: torch.Tensor | float,
    inverse_mass: torch.Tensor | float = 1.0,
    num_steps: int = 10,
    divergence_threshold: float = 1000.0,
) -> tuple[HMCState, HMCInfo]:
    """One HMC transition for every chain of every target."""
    z0, lp0, g0 = state.position, state.log_density, state.grad
    inverse_mass = torch.as_tensor(inverse_mass, dtype=z0.dtype, device=z0.device)
    momentum = torch.randn_like(z0) * inverse_mass.rsqrt()  # p ~ N(0, M)
    energy0 = -lp0 + 0.5 * (inverse_mass * momentum**2).sum(-1)

    z, lp, g, aux = z0, lp0, g0, state.aux
    p = momentum + 0.5 * step_size * g  # half step in momentum
    for i in range(num_steps):
        z = z + step_size * inverse_mass * p
        lp, g, aux = value_and_grad(logdensity_fn, z)
        if i < num_steps - 1:
            p = p + step_size * g
    p = p + 0.5 * step_size * g

    energy = -lp + 0.5 * (inverse_mass * p**2).sum(-1)
    delta = energy0 - energy  # log of the Metropolis ratio
    divergent = ~torch.isfinite(delta) | (-delta > divergence_threshold)
    accept_prob = torch.where(divergent, torch.zeros_like(delta), delta.clamp(max=0.0).exp())
    accepted = torch.rand_like(accept_prob) < accept_prob
    new = HMCState(
        _select(accepted, z, z0),
        torch.where(accepted, lp, lp0),
        _select(accepted, g, g0),
        None if aux is None else _select(accepted, aux, state.aux),
    )
    return new, HMCInfo(accept_prob, accepted, divergent, energy)


def adapt_step_size(step_size: torch.Tensor, accept_prob: torch.Tensor, target: float = 0.65,
                    factor: float = 1.02, bounds: tuple[float, float] = (1e-4, 1.0)) -> torch.Tensor:
    """Multiplicative per-target adaptation: grow the step where acceptance beats ``target``, shrink it elsewhere.

    ``step_size  # [1, batch, 1]``, ``accept_prob  # [chains, batch]``: the mean over a
    target's chains decides. This is the rule of Wu, Burda, Salakhutdinov & Grosse
    (2017) for HMC inside AIS, applied per datapoint.
    """
    rate = accept_prob.mean(0).reshape(step_size.shape)
    scale = torch.where(rate > target, torch.full_like(rate, factor), torch.full_like(rate, 1.0 / factor))
    return (step_size * scale).clamp(*bounds)


# ------------------------------------------------------------------------------------------
# Warm-up adaptation: dual averaging of the step size, Welford estimates of the diagonal mass
# ------------------------------------------------------------------------------------------


class DualAveragingState(NamedTuple):
    log_step: torch.Tensor       # current log step size, any shape (e.g. [chains, batch, 1])
    log_step_avg: torch.Tensor   # iterate average, the step size to keep after warm-up
    h_bar: torch.Tensor          # running average of (target - acceptance)
    mu: torch.Tensor             # shrinkage point, log(10 * initial step size)
    count: int


def dual_averaging_init(step_size: torch.Tensor) -> DualAveragingState:
    """Start dual averaging at ``step_size`` (Nesterov 2009; Hoffman & Gelman 2014, sec. 3.2)."""
    log_step = step_size.log()
    return DualAveragingState(log_step, torch.zeros_like(log_step), torch.zeros_like(log_step),
                              math.log(10.0) + log_step, 0)


def dual_averaging_update(state: DualAveragingState, accept_prob: torch.Tensor, target: float = 0.65,
                          gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75) -> DualAveragingState:
    """One update from ``accept_prob`` (shape of ``log_step`` without its trailing 1) toward ``target``.

    The defaults are Stan's (gamma 0.05, t0 10, kappa 0.75); 0.65 is the optimal
    acceptance for HMC with a fixed number of leapfrog steps (Beskos et al. 2013).
    """
    t = state.count + 1
    accept = accept_prob.reshape(state.log_step.shape).to(state.log_step.dtype)
    h_bar = (1 - 1 / (t + t0)) * state.h_bar + (target - accept) / (t + t0)
    log_step = state.mu - math.sqrt(t) / gamma * h_bar
    eta = t ** (-kappa)
    log_step_avg = eta * log_step + (1 - eta) * state.log_step_avg
    return DualAveragingState(log_step, log_step_avg, h_bar, state.mu, t)


class WelfordState(NamedTuple):
    count: int
    mean: torch.Tensor   # [batch, dim]
    m2: torch.Tensor     # [batch, dim]


def welford_init(like: torch.Tensor) -> WelfordState:
    """Running per-target variance over chains and iterations; ``like  # [chains, batch, dim]``."""
    return WelfordState(0, torch.zeros_like(like[0]), torch.zeros_like(like[0]))


def welford_update(state: WelfordState, position: torch.Tensor) -> WelfordState:
    """Add every chain's ``position  # [chains, batch, dim]`` (Chan et al.'s pairwise merge)."""
    n_new = position.shape[0]
    mean_new = position.mean(0)
    m2_new = ((position - mean_new) ** 2).sum(0)
    n = state.count + n_new
    delta = mean_new - state.mean
    mean = state.mean + delta * n_new / n
    m2 = state.m2 + m2_new + delta**2 * state.count * n_new / n
    return WelfordState(n, mean, m2)


def welford_final(state: WelfordState) -> torch.Tensor:
    """Regularised variance estimate ``[batch, dim]`` (Stan's shrinkage toward 1e-3)."""
    n = state.count
    var = state.m2 / max(n - 1, 1)
    return (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))
