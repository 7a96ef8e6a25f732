"""Step-size and mass adaptation for the batched HMC kernel, each an ``init / update / final`` triple.

All of it acts per chain and per datapoint through shapes alone: a step size
``[chains, batch, 1]`` adapts every chain of every target on its own, a mass
estimate ``[batch, dim]`` pools all chains of one target (TFP's convention of
batching adaptation by shape).

- Dual averaging of the log step size toward a target acceptance rate
  (Nesterov 2009; Hoffman & Gelman 2014, "The No-U-Turn sampler", sec. 3.2),
  with Stan's constants (gamma 0.05, t0 10, kappa 0.75).
- Welford's running variance of the positions (Chan, Golub & LeVeque's pairwise
  merge), regularised toward 1e-3 as Stan does, for a diagonal inverse mass.
- Stan's window adaptation (Stan Development Team, "Stan reference manual",
  HMC adaptation): an initial buffer of 15% of the warm-up adapting the step
  size alone; doubling windows (25, 50, 100, ... iterations) whose positions
  give a new diagonal inverse mass per datapoint when they close, each followed
  by a restart of the step-size adaptation; a final buffer of 10%.
- The multiplicative rule of Wu, Burda, Salakhutdinov & Grosse (2017) for HMC
  inside AIS: the step size is multiplied by 1.02 while the acceptance beats the
  target and divided by 1.02 otherwise.

0.65 is the optimal acceptance rate for HMC with a fixed number of leapfrog
steps (Beskos, Pillai, Roberts, Sanz-Serna & Stuart 2013).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "DualAveragingState", "dual_averaging_init", "dual_averaging_update", "dual_averaging_final",
    "WelfordState", "welford_init", "welford_update", "welford_final",
    "WarmupStage", "warmup_windows", "warmup_schedule",
    "WindowAdaptationState", "window_adaptation_init", "window_adaptation_update", "window_adaptation_final",
    "adapt_step_size",
]

TARGET_ACCEPT = 0.65


class DualAveragingState(NamedTuple):
    log_step: torch.Tensor       # current log step size, any shape (e.g. [chains, batch, 1])
    log_step_avg: torch.Tensor   # iterate average, the step size to keep after warm-up
    h_bar: torch.Tensor          # running average of (target - acceptance)
    mu: torch.Tensor             # shrinkage point, log(10 * initial step size)
    count: int


def dual_averaging_init(step_size: torch.Tensor) -> DualAveragingState:
    """Start dual averaging at ``step_size``."""
    log_step = step_size.log()
    return DualAveragingState(log_step, torch.zeros_like(log_step), torch.zeros_like(log_step),
                              math.log(10.0) + log_step, 0)


def dual_averaging_update(state: DualAveragingState, accept_rate: torch.Tensor, target: float = TARGET_ACCEPT,
                          gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75) -> DualAveragingState:
    """One update from ``accept_rate`` (shape of ``log_step`` without its trailing 1) toward ``target``."""
    t = state.count + 1
    accept = accept_rate.reshape(state.log_step.shape).to(state.log_step.dtype)
    h_bar = (1 - 1 / (t + t0)) * state.h_bar + (target - accept) / (t + t0)
    log_step = state.mu - math.sqrt(t) / gamma * h_bar
    eta = t ** (-kappa)
    log_step_avg = eta * log_step + (1 - eta) * state.log_step_avg
    return DualAveragingState(log_step, log_step_avg, h_bar, state.mu, t)


def dual_averaging_final(state: DualAveragingState) -> torch.Tensor:
    """The step size to sample with: the iterate average (meaningful after at least one update)."""
    return state.log_step_avg.exp()


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


class WarmupStage(NamedTuple):
    """What one warm-up iteration does besides adapting the step size."""

    collect_mass: bool   # add the position to the current mass window
    window_end: bool     # the window closes: new inverse mass, restart the step-size adaptation


def warmup_windows(warmup: int) -> list[int]:
    """Iterations (1-based) at which a mass-matrix window ends: Stan's 15% / doubling windows / 10% layout."""
    if warmup < 20:
        return []
    start, end = int(0.15 * warmup), warmup - int(0.1 * warmup)
    size, ends, current = 25, [], start
    while current < end:
        nxt = current + size
        if nxt + 2 * size > end:
            nxt = end
        ends.append(nxt)
        current, size = nxt, size * 2
    return ends


def warmup_schedule(warmup: int) -> list[WarmupStage]:
    """One :class:`WarmupStage` per warm-up iteration (no mass windows below 20 iterations)."""
    ends = warmup_windows(warmup)
    first, last = int(0.15 * warmup), (ends[-1] if ends else 0)
    return [WarmupStage(first < it <= last, it in ends) for it in range(1, warmup + 1)]


class WindowAdaptationState(NamedTuple):
    step_size: torch.Tensor      # [chains, batch, 1] step size of the next transition
    inverse_mass: torch.Tensor   # [1, batch, dim] diagonal inverse mass of the next transition
    dual: DualAveragingState
    welford: WelfordState


def window_adaptation_init(position: torch.Tensor, step_size: float) -> WindowAdaptationState:
    """Start warm-up at ``position  # [chains, batch, dim]`` with ``step_size`` everywhere and a unit mass."""
    chains, batch, dim = position.shape
    eps = torch.full((chains, batch, 1), float(step_size), dtype=position.dtype, device=position.device)
    inverse_mass = torch.ones(1, batch, dim, dtype=position.dtype, device=position.device)
    return WindowAdaptationState(eps, inverse_mass, dual_averaging_init(eps), welford_init(position))


def window_adaptation_update(state: WindowAdaptationState, stage: WarmupStage, position: torch.Tensor,
                             accept_rate: torch.Tensor, target: float = TARGET_ACCEPT) -> WindowAdaptationState:
    """Adapt after one warm-up transition that ended at ``position`` with ``accept_rate  # [chains, batch]``."""
    dual = dual_averaging_update(state.dual, accept_rate.nan_to_num(0.0), target)
    step_size, inverse_mass, welford = dual.log_step.exp(), state.inverse_mass, state.welford
    if stage.collect_mass:
        welford = welford_update(welford, position)
    if stage.window_end:
        inverse_mass = welford_final(welford).unsqueeze(0)
        welford = welford_init(position)
        dual = dual_averaging_init(step_size)
    return WindowAdaptationState(step_size, inverse_mass, dual, welford)


def window_adaptation_final(state: WindowAdaptationState) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step_size [chains, batch, 1], inverse_mass [1, batch, dim])`` to sample with after warm-up.

    Without an update since the last restart (no warm-up, or a window that closed on
    the last iteration) the current step size stands.
    """
    step_size = dual_averaging_final(state.dual) if state.dual.count else state.step_size
    return step_size, state.inverse_mass


def adapt_step_size(step_size: torch.Tensor, accept_rate: torch.Tensor, target: float = TARGET_ACCEPT,
                    factor: float = 1.02, bounds: tuple[float, float] = (1e-4, 1.0)) -> torch.Tensor:
    """Wu et al.'s multiplicative rule: grow the step where acceptance beats ``target``, shrink it elsewhere.

    ``step_size  # [1, batch, 1]``, ``accept_rate  # [chains, batch]``: the mean over a
    target's chains decides, so every datapoint keeps its own step size.
    """
    rate = accept_rate.mean(0).reshape(step_size.shape)
    scale = torch.where(rate > target, torch.full_like(rate, factor), torch.full_like(rate, 1.0 / factor))
    return (step_size * scale).clamp(*bounds)
