"""Batched Hamiltonian Monte Carlo: many independent targets, several chains each, in one tensor.

Positions have shape ``[chains, batch, dim]``: ``batch`` indexes independent
targets (one posterior p(z | x_b) per datapoint) and ``chains`` independent
chains per target. ``logdensity_fn(position) -> log_density  # [chains, batch]``
is differentiated with autograd; because the targets are independent, the
gradient of the summed log density is every chain's own gradient.

HMC (Duane et al. 1987; Neal 2011, "MCMC using Hamiltonian dynamics"):
momentum p ~ N(0, M) with a diagonal mass M = 1 / inverse_mass, ``num_leapfrog``
leapfrog steps of size eps on H(z, p) = -log pi(z) + p^T M^{-1} p / 2, then a
Metropolis correction, accepting with probability min(1, exp(H_0 - H_L)).
A trajectory whose energy error exceeds ``divergence_threshold`` (or becomes
non-finite) is a divergence and is rejected.

Following BlackJAX, the sampler is a pure ``init`` / ``step`` pair over a small
state: design choices (the threshold) are fixed arguments, tunable values
(``step_size``, ``inverse_mass``) are passed on every call with shapes that
broadcast against the position, so a ``[1, batch, 1]`` step size gives each
target its own step size and a ``[chains, batch, 1]`` one each chain its own.
Adaptation is a separate piece (:mod:`ppl_genmodels.inference.adaptation`).
Every random draw (momentum, acceptance) comes from ``generator`` when one is
given (on the position's device), else from torch's global generator. With
per-datapoint streams (:class:`ppl_genmodels.streams.Streams` for the ``batch``
datapoints) the momentum of chain c of datapoint b and its acceptance uniform come
from b's own stream, the t-th transition's draws being the t-th draws of the
streams: a datapoint's chain does not depend on the other datapoints of the batch.

``transition`` is its two halves: ``draws`` (the momentum noise and the acceptance
uniform, before the trajectory, in the order the transition uses them) and
``metropolis`` (trajectory and correction, given those draws), so that a compiled
caller can draw eagerly and run the rest as one graph. The trajectory is an
``integrate`` function: ``integrator(evaluate)``, ``leapfrog`` (a Python loop over a
given number of steps) on ``evaluate``, by default, or ``leapfrog_loop``, the same
arithmetic as one loop whose number of steps is a tensor (the form a traced graph
holds as torch's ``while_loop``).

``step`` differentiates a plain log density. ``transition`` is the same
transition for a state that carries more than the log density at its position
(AIS keeps both ends of its annealing path there): any ``NamedTuple`` with the
fields ``position``, ``log_density`` and ``grad``, built at a new position by
``evaluate(position)``; on acceptance every field moves with the position.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

import torch

from ppl_genmodels.traces import is_streams

__all__ = ["HMCState", "HMCInfo", "init", "step", "transition", "draws", "metropolis", "leapfrog", "integrator",
           "leapfrog_loop"]


class HMCState(NamedTuple):
    position: torch.Tensor      # [chains, batch, dim]
    log_density: torch.Tensor   # [chains, batch]
    grad: torch.Tensor          # [chains, batch, dim] gradient of the log density at the position


class HMCInfo(NamedTuple):
    accept_rate: torch.Tensor   # [chains, batch] Metropolis acceptance probability of the transition
    accepted: torch.Tensor      # [chains, batch] bool
    divergent: torch.Tensor     # [chains, batch] bool
    energy: torch.Tensor        # [chains, batch] Hamiltonian at the end of the trajectory


State = TypeVar("State", bound=tuple)


def init(position: torch.Tensor, logdensity_fn: Callable[[torch.Tensor], torch.Tensor]) -> HMCState:
    """The sampler state at ``position  # [chains, batch, dim]``: the log density and its gradient, detached."""
    with torch.enable_grad():
        pos = position.detach().requires_grad_(True)
        value = logdensity_fn(pos)
        (grad,) = torch.autograd.grad(value.sum(), pos)
    return HMCState(position.detach(), value.detach(), grad.detach())


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.reshape(mask.shape + (1,) * (new.dim() - mask.dim())), new, old)


def leapfrog(state: State, momentum: torch.Tensor, evaluate: Callable[[torch.Tensor], State], step_size,
             inverse_mass: torch.Tensor, num_leapfrog: int) -> tuple[State, torch.Tensor]:
    """``num_leapfrog`` leapfrog steps from ``state``: (the state at the end, the final momentum)."""
    point, z = state, state.position
    p = momentum + 0.5 * step_size * state.grad  # half step in momentum
    for i in range(num_leapfrog):
        z = z + step_size * inverse_mass * p
        point = evaluate(z)
        if i < num_leapfrog - 1:
            p = p + step_size * point.grad
    return point, p + 0.5 * step_size * point.grad


def integrator(evaluate: Callable[[torch.Tensor], State]) -> Callable:
    """:func:`leapfrog` on ``evaluate``, as ``metropolis`` takes a trajectory:
    ``(state, momentum, step_size, inverse_mass, num_leapfrog) -> (state, momentum)``."""
    def integrate(state, momentum, step_size, inverse_mass, num_leapfrog):
        return leapfrog(state, momentum, evaluate, step_size, inverse_mass, num_leapfrog)

    return integrate


def leapfrog_loop(state: State, momentum: torch.Tensor, evaluate: Callable[..., State], step_size: torch.Tensor,
                  inverse_mass: torch.Tensor, num_leapfrog: torch.Tensor, *, while_loop: Callable,
                  constants: tuple = ()) -> tuple[State, torch.Tensor]:
    """:func:`leapfrog` with the number of steps a 0-dim integer tensor (at least 1), as one loop.

    ``while_loop(cond, body, carried, constants)`` runs ``carried = body(*carried, *constants)``
    while ``cond(*carried, *constants)`` (torch's ``while_loop`` operator in a traced graph).
    Its body reads tensors only through its arguments, so ``evaluate(position, *constants)``
    gets every other tensor it needs (parameters, data) from ``constants``. Every step
    computes what :func:`leapfrog`'s does, in the same order: the momentum's full step
    before each position step but the first, so the two give the same numbers.
    """
    fields = len(state)
    kind = type(state)

    def cond(i, p, *rest):
        return i < rest[fields]

    def body(i, p, *rest):
        point, (_, eps, inv, *more) = kind(*rest[:fields]), rest[fields:]
        p = torch.where(i > 0, p + eps * point.grad, p)
        return (i + 1, p, *evaluate(point.position + eps * inv * p, *more))

    p = momentum + 0.5 * step_size * state.grad  # half step in momentum
    start = torch.zeros((), dtype=torch.int64, device=num_leapfrog.device)
    _, p, *point = while_loop(cond, body, (start, p, *state), (num_leapfrog, step_size, inverse_mass, *constants))
    point = kind(*point)
    return point, p + 0.5 * step_size * point.grad


def _normal(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normals shaped like ``like  # [chains, batch, dim]``: per datapoint from streams, else ``generator``."""
    if is_streams(generator):
        return generator.normal(like.shape, data_dim=1, dtype=like.dtype).to(like.device)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def _uniform(like: torch.Tensor, generator) -> torch.Tensor:
    """Uniforms on [0, 1) (in (0, 1) from streams) shaped like ``like  # [chains, batch]``."""
    if is_streams(generator):
        return generator.uniform(like.shape, data_dim=1, dtype=like.dtype).to(like.device)
    return torch.rand(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def draws(state: State, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A transition's random draws: standard normal momentum noise ``[chains, batch, dim]`` and the
    acceptance uniforms ``[chains, batch]``, in that order (the trajectory itself draws nothing)."""
    return _normal(state.position, generator), _uniform(state.log_density, generator)


def metropolis(
    state: State,
    noise: torch.Tensor,
    uniform: torch.Tensor,
    integrate: Callable,
    step_size: torch.Tensor | float,
    inverse_mass: torch.Tensor | float,
    num_leapfrog,
    divergence_threshold: float = 1000.0,
) -> tuple[State, HMCInfo]:
    """The transition given its draws (:func:`draws`): a trajectory by ``integrate(state, momentum, step_size,
    inverse_mass, num_leapfrog)`` (:func:`leapfrog` or :func:`leapfrog_loop`), then the Metropolis correction."""
    z0 = state.position
    inverse_mass = torch.as_tensor(inverse_mass, dtype=z0.dtype, device=z0.device)
    momentum = noise * inverse_mass.rsqrt()  # p ~ N(0, M)
    energy0 = -state.log_density + 0.5 * (inverse_mass * momentum**2).sum(-1)
    proposal, p = integrate(state, momentum, step_size, inverse_mass, num_leapfrog)
    energy = -proposal.log_density + 0.5 * (inverse_mass * p**2).sum(-1)
    delta = energy0 - energy  # log of the Metropolis ratio
    divergent = ~torch.isfinite(delta) | (-delta > divergence_threshold)
    accept_rate = torch.where(divergent, torch.zeros_like(delta), delta.clamp(max=0.0).exp())
    accepted = uniform < accept_rate
    new = type(state)(*(_select(accepted, a, b) for a, b in zip(proposal, state)))
    return new, HMCInfo(accept_rate, accepted, divergent, energy)


def transition(
    state: State,
    evaluate: Callable[[torch.Tensor], State],
    step_size: torch.Tensor | float,
    inverse_mass: torch.Tensor | float = 1.0,
    num_leapfrog: int = 10,
    *,
    divergence_threshold: float = 1000.0,
    generator=None,
) -> tuple[State, HMCInfo]:
    """One HMC transition of every chain of every target, for a state built by ``evaluate(position)``.

    ``generator``: None (torch's global generator), a ``torch.Generator``, or per-datapoint streams.
    """
    noise, uniform = draws(state, generator)
    return metropolis(state, noise, uniform, integrator(evaluate), step_size, inverse_mass, num_leapfrog,
                      divergence_threshold)


def step(
    state: HMCState,
    logdensity_fn: Callable[[torch.Tensor], torch.Tensor],
    step_size: torch.Tensor | float,
    inverse_mass: torch.Tensor | float = 1.0,
    num_leapfrog: int = 10,
    *,
    divergence_threshold: float = 1000.0,
    generator=None,
) -> tuple[HMCState, HMCInfo]:
    """One HMC transition of every chain of every target of ``logdensity_fn``."""
    return transition(state, lambda position: init(position, logdensity_fn), step_size, inverse_mass, num_leapfrog,
                      divergence_threshold=divergence_threshold, generator=generator)
