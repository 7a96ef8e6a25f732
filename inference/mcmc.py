"""Posterior samples of the latents, p(z | x, y), with the decoder fixed: batched HMC, and Pyro's NUTS as reference.

``hmc_posterior`` runs several chains for every datapoint of a batch in one
vectorized sampler (``inference/hmc.py``) on the conditioned log joint
log p(x, z | y) in unconstrained space (:class:`ppl_genmodels.traces.LogJoint`).
The number of leapfrog steps is drawn afresh at every iteration (uniform on
1 .. 2L - 1), which keeps fixed-length trajectories from resonating with the
target. L = 5 by default: on the MNIST VAE of ``benchmarks/mcmc.py`` (50-D
latent) the bulk ESS per draw was the same for L = 5, 10 and 20, so the
shortest trajectory that still mixes gives the most ESS per second. Warm-up follows Stan's scheme (Stan Development Team, "Stan reference manual",
HMC adaptation): an initial buffer adapting the step size alone, doubling
windows that estimate a diagonal inverse mass per datapoint (Welford variance
of all its chains' positions, regularised toward 1e-3), after each of which
the step-size adaptation restarts, and a final buffer. The step size is
adapted per chain and per datapoint by dual averaging (Hoffman & Gelman 2014).

``nuts_posterior`` is the reference: Pyro's ``NUTS`` on the same log density,
one datapoint and one chain at a time, with its own adaptation.

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
from tqdm.auto import tqdm

from ppl_genmodels.inference import hmc
from ppl_genmodels.traces import LogJoint

__all__ = ["MCMCResult", "hmc_posterior", "nuts_posterior", "diagnostics", "warmup_windows"]

RHAT_THRESHOLD = 1.01


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

    def flat(self) -> torch.Tensor:
        """All latent sites flattened per datapoint: ``[chains, draws, batch, latent_dim]``."""
        parts = [v.reshape(v.shape[:3] + (-1,)) for v in self.samples.values()]
        return torch.cat(parts, -1)

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
    Buerkner (2021), computed by ArviZ for every (datapoint, dimension); the worst
    dimension of each datapoint is reported. One chain gives R-hat = NaN.
    """
    az = _arviz()
    array = draws.detach().cpu().double().numpy()
    dataset = az.convert_to_dataset({"z": array})
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        rhat = az.rhat(dataset)["z"].values            # [batch, dim]
        bulk = az.ess(dataset, method="bulk")["z"].values
        tail = az.ess(dataset, method="tail")["z"].values
    return (torch.as_tensor(np.max(rhat, -1)), torch.as_tensor(np.min(bulk, -1)), torch.as_tensor(np.min(tail, -1)))


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


def _warn_unconverged(result: MCMCResult) -> None:
    bad = (~result.converged()).nonzero().flatten().tolist()
    if bad and result.rhat.shape[0] and not torch.isnan(result.rhat).all():
        shown = ", ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
        warnings.warn(
            f"{len(bad)} of {result.rhat.shape[0]} datapoints have R-hat >= {RHAT_THRESHOLD} "
            f"(batch positions {shown}); run more warm-up or draws before trusting them",
            RuntimeWarning,
            stacklevel=3,
        )


def _jittered(num_leapfrog: int) -> int:
    """A number of leapfrog steps drawn uniformly from 1 .. 2L - 1 (mean L).

    A fixed trajectory length can resonate with the target: on a Gaussian, a length
    near a multiple of its period brings every chain back where it started and
    the chains barely move (Neal 2011, sec. 5.4.2.2). Drawing the length afresh
    at every iteration breaks that at no cost on average.
    """
    return int(torch.randint(1, 2 * num_leapfrog, ()).item()) if num_leapfrog > 1 else 1


def _init_positions(model, guide, x, y, joint: LogJoint, chains: int, init: str) -> torch.Tensor:
    if init == "prior":
        return joint.sample_init(chains)
    if init == "guide":
        return LogJoint(model, guide, x, y, init="guide", nesting=joint.nesting).sample_init(chains)
    raise ValueError(f"unknown init {init!r}; expected 'guide' or 'prior'")


def hmc_posterior(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_chains: int = 4,
    num_samples: int = 1000,
    warmup: int = 1000,
    init: str = "guide",
    num_leapfrog: int = 5,
    step_size: float = 0.1,
    target_accept: float = 0.65,
    progress: bool = False,
    warn: bool = True,
) -> MCMCResult:
    """Batched HMC draws from p(z | x_b, y_b) for every datapoint b of ``x``, decoder fixed."""
    if num_chains < 1 or num_samples < 1 or warmup < 0 or num_leapfrog < 1:
        raise ValueError("num_chains, num_samples and num_leapfrog must be >= 1 and warmup >= 0")
    began = time.perf_counter()
    joint = LogJoint(model, guide, x, y, init="prior")

    def logdensity(u):
        return joint(u)[1]  # log p(x, z(u) | y) + log|J|  [chains, batch]

    batch = x.shape[0]
    u = _init_positions(model, guide, x, y, joint, num_chains, init)
    eps = torch.full((num_chains, batch, 1), float(step_size), dtype=x.dtype, device=x.device)
    inverse_mass = torch.ones(1, batch, joint.dim, dtype=x.dtype, device=x.device)
    window_ends = set(warmup_windows(warmup))
    mass_start = int(0.15 * warmup) if window_ends else warmup
    draws, accept, divergent = [], x.new_zeros(num_chains, batch), torch.zeros(num_chains, batch, dtype=torch.long)
    with pyro.validation_enabled(False):
        state = hmc.init(u, logdensity)
        adapt = hmc.dual_averaging_init(eps)
        welford = hmc.welford_init(u)
        bar = tqdm(total=warmup + num_samples, desc="HMC", unit="it", disable=not progress, leave=False)
        for it in range(1, warmup + 1):
            state, info = hmc.step(state, logdensity, eps, inverse_mass, _jittered(num_leapfrog))
            adapt = hmc.dual_averaging_update(adapt, info.accept_prob.nan_to_num(0.0), target_accept)
            eps = adapt.log_step.exp()
            if mass_start < it and window_ends:
                welford = hmc.welford_update(welford, state.position)
            if it in window_ends:
                inverse_mass = hmc.welford_final(welford).unsqueeze(0)
                welford = hmc.welford_init(state.position)
                state = hmc.init(state.position, logdensity)
                adapt = hmc.dual_averaging_init(eps)
            bar.update(1)
        if warmup:
            eps = adapt.log_step_avg.exp() if adapt.count else eps
        for _ in range(num_samples):
            state, info = hmc.step(state, logdensity, eps, inverse_mass, _jittered(num_leapfrog))
            draws.append(state.position)
            accept = accept + info.accept_prob
            divergent = divergent + info.divergent.long().cpu()
            bar.update(1)
        bar.close()
    u_draws = torch.stack(draws, 1)  # [chains, draws, batch, dim]
    values, _ = joint.layout.unpack(u_draws)
    samples = {name: v.detach() for name, v in values.items()}
    flat = torch.cat([v.reshape(v.shape[:3] + (-1,)) for v in samples.values()], -1)
    rhat, bulk, tail = diagnostics(flat)
    result = MCMCResult(samples, rhat, bulk, tail, (accept / num_samples).mean(0).cpu(), divergent.sum(0),
                        time.perf_counter() - began, "hmc")
    if warn:
        _warn_unconverged(result)
    return result


def nuts_posterior(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_chains: int = 4,
    num_samples: int = 1000,
    warmup: int = 1000,
    init: str = "guide",
    target_accept: float = 0.8,
    progress: bool = False,
    warn: bool = True,
) -> MCMCResult:
    """Pyro's NUTS on the same conditioned log density, one datapoint and one chain at a time."""
    from pyro.infer import MCMC, NUTS

    began = time.perf_counter()
    batch = x.shape[0]
    per_point, accept, divergent = [], torch.zeros(batch), torch.zeros(batch, dtype=torch.long)
    layout = None
    bar = tqdm(total=batch * num_chains, desc="NUTS", unit="chain", disable=not progress, leave=False)
    for b in range(batch):
        xb = x[b : b + 1]
        yb = None if y is None else y[b : b + 1]
        joint = LogJoint(model, guide, xb, yb, init="prior")
        layout = joint.layout
        starts = _init_positions(model, guide, xb, yb, joint, num_chains, init)  # [chains, 1, dim]
        chains = []
        for c in range(num_chains):
            def potential(params):
                return -joint(params["u"].reshape(1, 1, -1))[1].sum()

            kernel = NUTS(potential_fn=potential, target_accept_prob=target_accept, adapt_step_size=True,
                          adapt_mass_matrix=True, full_mass=False)
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1,
                        initial_params={"u": starts[c, 0].detach()}, disable_progbar=True)
            with pyro.validation_enabled(False):
                mcmc.run()
            chains.append(mcmc.get_samples()["u"])  # [draws, dim]
            extra = mcmc.diagnostics()
            divergent[b] += len(extra.get("divergences", {}).get("chain 0", []))
            rate = extra.get("acceptance rate", {}).get("chain 0")
            accept[b] += float(rate) / num_chains if rate is not None else float("nan")
            bar.update(1)
        per_point.append(torch.stack(chains))  # [chains, draws, dim]
    bar.close()
    u_draws = torch.stack(per_point, 2).to(x.dtype)  # [chains, draws, batch, dim]
    values, _ = layout.unpack(u_draws)
    samples = {name: v.detach() for name, v in values.items()}
    flat = torch.cat([v.reshape(v.shape[:3] + (-1,)) for v in samples.values()], -1)
    rhat, bulk, tail = diagnostics(flat)
    result = MCMCResult(samples, rhat, bulk, tail, accept, divergent, time.perf_counter() - began, "nuts")
    if warn:
        _warn_unconverged(result)
    return result
