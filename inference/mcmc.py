"""Posterior samples of the latents, p(z | x, y), with the decoder fixed: batched HMC, and Pyro's NUTS as reference.

``hmc_posterior`` runs several chains for every datapoint of a batch in one
vectorized sampler (``inference/hmc.py``) on the conditioned log joint
log p(x, z | y) in unconstrained space (:class:`ppl_genmodels.traces.LogJoint`).
The number of leapfrog steps is drawn afresh at every iteration (uniform on
1 .. 2L - 1), which keeps fixed-length trajectories from resonating with the
target. L = 5 by default: on the MNIST VAE of ``benchmarks/mcmc.py`` (50-D
latent) the bulk ESS per draw was the same for L = 5, 10 and 20, so the
shortest trajectory that still mixes gives the most ESS per second. Warm-up
is Stan's window adaptation (:mod:`ppl_genmodels.inference.adaptation`): the
step size adapted per chain and per datapoint by dual averaging, a diagonal
inverse mass per datapoint from the doubling windows.

``nuts_posterior`` is the reference: Pyro's ``NUTS`` on the same log density,
one datapoint and one chain at a time, with its own adaptation.

``generator`` is None (torch's global generator), a ``torch.Generator``, or
per-datapoint streams (:class:`ppl_genmodels.streams.Streams` for the rows of ``x``).
With streams, ``hmc_posterior``'s starting draws and momenta and acceptance uniforms
come from each datapoint's own stream (``start``, ``kernel``), and its adaptation is
per chain and datapoint, so a datapoint's draws do not depend on its batch; the
jittered number of leapfrog steps, which every chain of the batch shares, comes from
a ``torch.Generator`` seeded from the streams' seed and purpose alone, the same in
every batch and process. Pyro's NUTS draws from torch's global generator whatever
``generator`` is: only its starting draws follow ``generator``.

Both return an :class:`MCMCResult` with draws per latent site of shape
``[chains, draws, batch, *event]`` and per-datapoint diagnostics from ArviZ:
split rank-normalised R-hat, bulk and tail effective sample sizes (Vehtari et
al. 2021), each the worst over the datapoint's latent dimensions, plus the
acceptance rate and the number of divergent transitions. Datapoints whose
chains did not converge (R-hat above 1.01) are reported with a warning.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from tqdm.auto import tqdm

from ppl_genmodels.compiled import Captured, Static, Traced, static_path, traced_path, while_loop
from ppl_genmodels.inference import hmc
from ppl_genmodels.inference.diagnostics import ess_bulk, ess_tail, split_rhat
from ppl_genmodels.inference.adaptation import (
    TARGET_ACCEPT,
    warmup_schedule,
    window_adaptation_final,
    window_adaptation_init,
    window_adaptation_update,
)
from ppl_genmodels.traces import LogJoint, is_streams, seeded_from

__all__ = ["MCMCResult", "MCMC_METHODS", "RHAT_THRESHOLD", "hmc_posterior", "nuts_posterior", "diagnostics",
           "compiled_transition", "traced_transition"]

#: the samplers of the latent posterior: batched HMC (:func:`hmc_posterior`) and Pyro's NUTS (:func:`nuts_posterior`)
MCMC_METHODS = ("hmc", "nuts")
RHAT_THRESHOLD = 1.01
#: an energy error above this (in nats) is a divergent transition, rejected (as Stan's and BlackJAX's default)
DIVERGENCE = 1000.0


@dataclass
class MCMCResult:
    """Posterior draws of the latents and per-datapoint diagnostics."""

    samples: dict[str, torch.Tensor]  # site -> [chains, draws, batch, *event], constrained values
    rhat: torch.Tensor                # [batch] worst split R-hat over the latent dimensions
    ess_bulk: torch.Tensor            # [batch] smallest bulk ESS over the latent dimensions
    ess_tail: torch.Tensor            # [batch] smallest tail ESS
    accept_rate: torch.Tensor         # [batch] mean acceptance probability of the sampling phase
    divergences: torch.Tensor         # [batch] divergent transitions in the sampling phase (all chains)
    seconds: float
    method: str = "hmc"

    def converged(self, threshold: float = RHAT_THRESHOLD) -> torch.Tensor:
        """``[batch]`` bool: R-hat below ``threshold`` in every latent dimension."""
        return self.rhat < threshold


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def diagnostics(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R-hat, bulk ESS, tail ESS) per datapoint from ``draws  # [chains, draws, batch, dim]``.

    Split rank-normalised R-hat and ESS of Vehtari, Gelman, Simpson, Carpenter &
    Buerkner (2021) for every (datapoint, dimension) at once
    (:mod:`ppl_genmodels.inference.diagnostics`, equal to ArviZ's to rounding); the
    worst dimension of each datapoint is reported. One chain gives R-hat = NaN.
    """
    array = draws.detach().cpu().double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        rhat = split_rhat(array)            # [batch, dim]
        bulk = ess_bulk(array)
        tail = ess_tail(array)
    return (torch.as_tensor(np.max(rhat, -1)), torch.as_tensor(np.min(bulk, -1)), torch.as_tensor(np.min(tail, -1)))


def _warn_unconverged(result: MCMCResult) -> None:
    bad = (~result.converged()).nonzero().flatten().tolist()
    if bad and result.rhat.shape[0] and not torch.isnan(result.rhat).all():
        shown = ", ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
        warnings.warn(
            f"{len(bad)} of {result.rhat.shape[0]} datapoints have R-hat >= {RHAT_THRESHOLD} "
            f"(batch positions {shown}); run more warm-up or draws before trusting them",
            RuntimeWarning,
            stacklevel=4,  # the caller of hmc_posterior / nuts_posterior
        )


def _result(layout, u_draws: torch.Tensor, accept_rate, divergences, began: float, method: str,
            warn: bool) -> MCMCResult:
    """Constrained draws ``[chains, draws, batch, *event]`` per site, with ArviZ's diagnostics."""
    values, _ = layout.unpack(u_draws)
    samples = {name: v.detach() for name, v in values.items()}
    rhat, bulk, tail = diagnostics(layout.flatten(samples, 3))
    result = MCMCResult(samples, rhat, bulk, tail, accept_rate, divergences, time.perf_counter() - began, method)
    if warn:
        _warn_unconverged(result)
    return result


def _count_generator(generator) -> torch.Generator | None:
    """Where the jittered leapfrog counts come from: ``generator`` itself, or for per-datapoint streams a CPU
    ``torch.Generator`` seeded from their seed and purpose (``base``) alone, since one count serves the whole batch."""
    if is_streams(generator):
        return torch.Generator().manual_seed(generator.base % 2**63)
    return generator


def _target_and_grad(u: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None, *, streams=None,
                     joint: LogJoint) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x, z(u) | y) + log|J|  # [chains, batch], and its gradient in u  # [chains, batch, dim], detached."""
    with torch.enable_grad():
        pos = u.detach().requires_grad_(True)
        value = joint.at(x, y).log_target(pos)
        (grad,) = torch.autograd.grad(value.sum(), pos)
    return value.detach(), grad.detach()


def _evaluator(joint: LogJoint) -> Callable[[torch.Tensor], hmc.HMCState]:
    """``u -> HMCState`` of the joint's target: one graph (value and gradient) where the program is compiled."""
    compiled = static_path(_target_and_grad, joint.model, "HMC log-joint and gradient", inner_grad=True)
    target_and_grad = compiled or _target_and_grad

    def evaluate(u: torch.Tensor) -> hmc.HMCState:
        return hmc.HMCState(u.detach(), *target_and_grad(u, joint.x, joint.y, joint=joint))

    return evaluate


def traced_transition(params: list, *tensors, target: Captured, kind: type, point: Callable, extra: int,
                      threshold: float):
    """One HMC transition given its draws, as tensor operations around ``target``: the whole trajectory is one
    loop of the traced graph (the body of :class:`compiled.Traced` for :func:`compiled_transition`).

    ``tensors``: the state's fields (a ``kind``), noise, uniforms, step size, inverse mass,
    number of leapfrog steps, ``extra`` more tensors for ``point``, then the data ``x`` (and
    ``y``). ``params`` are the program's parameters, then the captured graph's constants.
    ``point(u, outputs, *more)`` builds the state at ``u`` from ``target``'s outputs there.
    """
    fields = len(kind._fields)
    state = kind(*tensors[:fields])
    noise, uniform, step_size, inverse_mass, num_leapfrog = tensors[fields:fields + 5]
    more, data = tensors[fields + 5:fields + 5 + extra], tensors[fields + 5 + extra:]
    count, inputs = len(target.parameters), len(params)

    def evaluate(u, *constants):  # every tensor through the loop's arguments: (*more, *params, *data)
        tables, given = constants[extra:extra + inputs], constants[extra + inputs:]
        outputs = target(tables[:count], tables[count:], u, *given, *([None] * (2 - len(given))))
        return point(u, outputs, *constants[:extra])

    def integrate(start, momentum, eps, inv, steps):
        return hmc.leapfrog_loop(start, momentum, evaluate, eps, inv, steps, while_loop=while_loop,
                                 constants=(*more, *params, *data))

    new, info = hmc.metropolis(state, noise, uniform, integrate, step_size, inverse_mass, num_leapfrog, threshold)
    return (*new, *info)


def compiled_transition(joint: LogJoint, state, step_size, inverse_mass, num_leapfrog: int, generator, *,
                        evaluate: Callable, traced: Traced | None, static: Static | None, point: Callable,
                        extra: tuple = ()):
    """``(state, info)`` of one HMC transition of ``joint``'s state: one compiled call where it can be.

    ``static`` is the program's captured evaluation of the state's densities (called as
    ``static(u, x, y, joint=joint)``), ``traced`` the program's :class:`Traced` of
    :func:`traced_transition`: the captured graph runs inside a loop over the leapfrog steps,
    whose number is an input, so every trajectory length runs the same graph. The draws are
    made first, from ``generator``. Where the program is not compiled or either graph cannot
    be made, the same draws go to :func:`hmc.metropolis` with ``evaluate`` at every step.
    """
    noise, uniform = hmc.draws(state, generator)
    captured = None if traced is None or traced.fallback is not None else \
        static.captured(state.position, joint.x, joint.y, joint=joint)
    if captured is not None:
        data = (joint.x,) if joint.y is None else (joint.x, joint.y)
        steps = torch.tensor(num_leapfrog, device=state.position.device)
        out = traced([*captured.parameters, *captured.constants], *state, noise, uniform, step_size, inverse_mass,
                     steps, *extra, *data, target=captured, kind=type(state), point=point, extra=len(extra),
                     threshold=DIVERGENCE)
        if out is not None:
            return type(state)(*out[:len(state)]), hmc.HMCInfo(*out[len(state):])
    return hmc.metropolis(state, noise, uniform, hmc.integrator(evaluate), step_size, inverse_mass, num_leapfrog,
                          DIVERGENCE)


def _hmc_point(u, outputs):
    """The HMC state at ``u`` from the captured log-joint's (value, gradient)."""
    return hmc.HMCState(u, *outputs)


def _transitions(joint: LogJoint, evaluate: Callable[[torch.Tensor], hmc.HMCState]) -> Callable:
    """``(state, step_size, inverse_mass, num_leapfrog, generator) -> (state, info)``: one HMC transition
    (:func:`compiled_transition`: one compiled call on a compiled program, else ``evaluate`` at every step)."""
    paths = dict(evaluate=evaluate, point=_hmc_point,
                 traced=traced_path(traced_transition, joint.model, "HMC transition"),
                 static=static_path(_target_and_grad, joint.model, "HMC log-joint and gradient", inner_grad=True))

    def transition(state: hmc.HMCState, step_size, inverse_mass, num_leapfrog: int, generator):
        return compiled_transition(joint, state, step_size, inverse_mass, num_leapfrog, generator, **paths)

    return transition


def _jittered(num_leapfrog: int, generator: torch.Generator | None) -> int:
    """A number of leapfrog steps drawn uniformly from 1 .. 2L - 1 (mean L).

    A fixed trajectory length can resonate with the target: on a Gaussian, a length
    near a multiple of its period brings every chain back where it started and
    the chains barely move (Neal 2011, sec. 5.4.2.2). Drawing the length afresh
    at every iteration breaks that at no cost on average.
    """
    if num_leapfrog <= 1:
        return 1
    device = None if generator is None else generator.device
    return int(torch.randint(1, 2 * num_leapfrog, (), generator=generator, device=device).item())


def _start_positions(model, guide, x, y, joint: LogJoint, chains: int, start: str, generator) -> torch.Tensor:
    """``[chains, batch, dim]`` draws from the prior (``joint``'s own start) or the guide."""
    if start != joint.start:
        joint = LogJoint(model, guide, x, y, start=start, nesting=joint.nesting)
    return joint.sample_start(chains, generator=generator)


def hmc_posterior(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_chains: int = 4,
    num_samples: int = 1000,
    warmup: int = 1000,
    start: str = "guide",
    num_leapfrog: int = 5,
    step_size: float = 0.1,
    target_accept: float = TARGET_ACCEPT,
    generator=None,
    progress: bool = False,
    warn: bool = True,
) -> MCMCResult:
    """Batched HMC draws from p(z | x_b, y_b) for every datapoint b of ``x``, decoder fixed.

    Chains start from draws of ``start`` (``"guide"`` or ``"prior"``). ``generator``, when
    given, drives every random draw (the starting draws, the leapfrog counts, every
    transition): the draws depend on it alone, and torch's global generator is left as it was.
    With per-datapoint streams see the module docstring.
    """
    if num_chains < 1 or num_samples < 1 or warmup < 0 or num_leapfrog < 1:
        raise ValueError("num_chains, num_samples and num_leapfrog must be >= 1 and warmup >= 0")
    began = time.perf_counter()
    streams = is_streams(generator)
    starts, kernel = (generator.child("start"), generator.child("kernel")) if streams else (generator, generator)
    counts = _count_generator(generator)
    with seeded_from(generator):  # Pyro's own draws (tracing the pair) from the generator too
        joint = LogJoint(model, guide, x, y, start="prior")
        u = _start_positions(model, guide, x, y, joint, num_chains, start, starts)
    if streams and not starts.exact:
        generator.exact = False  # some start draw came from torch's global generator
    draws, accept = [], x.new_zeros(num_chains, x.shape[0])
    divergent = torch.zeros(num_chains, x.shape[0], dtype=torch.long)
    with pyro.validation_enabled(False), tqdm(total=warmup + num_samples, desc="HMC", unit="it",
                                              disable=not progress, leave=False) as bar:
        evaluate = _evaluator(joint)
        transition = _transitions(joint, evaluate)
        state, adapt = evaluate(u), window_adaptation_init(u, step_size)
        for stage in warmup_schedule(warmup):
            state, info = transition(state, adapt.step_size, adapt.inverse_mass, _jittered(num_leapfrog, counts),
                                     kernel)
            adapt = window_adaptation_update(adapt, stage, state.position, info.accept_rate, target_accept)
            bar.update(1)
        eps, inverse_mass = window_adaptation_final(adapt)
        for _ in range(num_samples):
            state, info = transition(state, eps, inverse_mass, _jittered(num_leapfrog, counts), kernel)
            draws.append(state.position)
            accept = accept + info.accept_rate
            divergent = divergent + info.divergent.long().cpu()
            bar.update(1)
    return _result(joint.layout, torch.stack(draws, 1), (accept / num_samples).mean(0).cpu(), divergent.sum(0),
                   began, "hmc", warn)


def _nuts_chain(joint: LogJoint, start: torch.Tensor, num_samples: int, warmup: int, target_accept: float):
    """One chain of Pyro's NUTS on one datapoint: ``(draws [draws, dim], divergences, acceptance rate)``."""
    def potential(params):
        return -joint.log_target(params["u"].reshape(1, 1, -1)).sum()

    kernel = NUTS(potential_fn=potential, target_accept_prob=target_accept, adapt_step_size=True,
                  adapt_mass_matrix=True, full_mass=False)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1,
                initial_params={"u": start.detach()}, disable_progbar=True)
    with pyro.validation_enabled(False):
        mcmc.run()
    extra = mcmc.diagnostics()
    rate = extra.get("acceptance rate", {}).get("chain 0")
    return (mcmc.get_samples()["u"], len(extra.get("divergences", {}).get("chain 0", [])),
            float(rate) if rate is not None else float("nan"))


def nuts_posterior(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_chains: int = 4,
    num_samples: int = 1000,
    warmup: int = 1000,
    start: str = "guide",
    target_accept: float = 0.8,
    generator=None,
    progress: bool = False,
    warn: bool = True,
) -> MCMCResult:
    """Pyro's NUTS on the same conditioned log density, one datapoint and one chain at a time.

    ``generator`` drives the chains' starting draws only: Pyro's NUTS draws from the global generator.
    (Per-datapoint streams: each datapoint's starting draws from its own stream.)
    """
    began = time.perf_counter()
    batch = x.shape[0]
    per_point, accept, divergent = [], torch.zeros(batch), torch.zeros(batch, dtype=torch.long)
    layout = None
    with tqdm(total=batch * num_chains, desc="NUTS", unit="chain", disable=not progress, leave=False) as bar:
        for b in range(batch):
            xb, yb = x[b : b + 1], None if y is None else y[b : b + 1]
            joint = LogJoint(model, guide, xb, yb, start="prior")
            layout = joint.layout
            point = generator.subset(slice(b, b + 1)) if is_streams(generator) else generator
            starts = _start_positions(model, guide, xb, yb, joint, num_chains, start, point)  # [chains, 1, dim]
            chains = []
            for c in range(num_chains):
                draws, divergences, rate = _nuts_chain(joint, starts[c, 0], num_samples, warmup, target_accept)
                chains.append(draws)  # [draws, dim]
                divergent[b] += divergences
                accept[b] += rate / num_chains
                bar.update(1)
            per_point.append(torch.stack(chains))  # [chains, draws, dim]
    return _result(layout, torch.stack(per_point, 2).to(x.dtype), accept, divergent, began, "nuts", warn)
