"""How far is the amortized posterior q(z | x) from p(z | x)? Gap decomposition and posterior discrepancies.

Gap decomposition (Cremer, Li & Duvenaud 2018, "Inference suboptimality in
variational autoencoders", ICML). For each datapoint x, with the decoder fixed,

    log p(x) - ELBO[q_phi(. | x)]
        = ( log p(x) - ELBO[q*_x] )              approximation gap
        + ( ELBO[q*_x] - ELBO[q_phi(. | x)] )    amortization gap

where q*_x is the best member of the guide's family for that one datapoint,
fitted by :func:`ppl_genmodels.inference.local.fit_local_guides`, and
ELBO[q] = E_q[log p(x, z) - log q(z)]. log p(x) is the model's closed form
``exact_log_marginal`` where it has one, else the IWAE-k bound
log (1/k) sum_i p(x, z_i) / q_phi(z_i | x) with k large (Burda, Grosse &
Salakhutdinov 2016), a stochastic lower bound whose bias shrinks with k. With
an estimated log p(x) the approximation gap is therefore itself a lower bound
(up to Monte Carlo noise).

Posterior discrepancies compare two sets of draws per datapoint, a candidate
A and a reference B (each ``[draws, batch, dim]``, all latent sites flattened):

- ``mean_sd``: max over dimensions of |mean_A - mean_B| / sd_B, how far the
  candidate's mean sits from the reference's in units of the reference's
  posterior standard deviation;
- ``sd_ratio``: sd_A / sd_B in the dimension where log(sd_A / sd_B) is
  largest in absolute value (1 is perfect; < 1 an over-confident candidate,
  the usual failure of a reverse-KL fit);
- ``energy``: the energy distance (Szekely & Rizzo 2013, "Energy statistics:
  a class of statistics based on distances", J. Stat. Plan. Inference)

      D^2(A, B) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|,   X, X' ~ A,  Y, Y' ~ B,

  zero exactly when the two distributions are equal. It is estimated with
  U-statistics for the within-sample terms (so it is unbiased and may come out
  slightly negative when the two agree) from at most ``max_draws`` (500) draws
  of each set, chosen at random, since it costs O(draws^2) per datapoint.

:func:`guide_draws` and :func:`exact_draws` give every method's draws in the
same flat layout. :func:`ppl_genmodels.comparison.compare_run` puts it all
together on a trained run and writes the tables, draws and figures.

``generator`` is None (torch's global generator), a ``torch.Generator``, or
per-datapoint streams (:class:`ppl_genmodels.streams.Streams` for the rows of ``x``).
With streams every draw of a datapoint comes from its own stream: the energy
distance's subsample of draws is chosen per datapoint (the draws ranked by uniforms
of its stream) rather than shared by the batch, and each estimate of
:func:`gap_decomposition` gets a stream of its own (``local``, ``elbo``, ``logp``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch

from ppl_genmodels.inference.importance import batched_estimates
from ppl_genmodels.inference.local import LocalGuideResult, fit_local_guides
from ppl_genmodels.traces import DATA_PLATE, PARTICLE_PLATE, LatentLayout, LogJoint, is_streams, seeded_from

__all__ = ["DISCREPANCIES", "energy_distance", "posterior_discrepancy", "GapDecomposition", "gap_decomposition",
           "guide_draws", "exact_draws"]

MAX_ENERGY_DRAWS = 500
DISCREPANCIES = ("mean_sd", "sd_ratio", "energy")


def _check_draws(name: str, draws: torch.Tensor) -> torch.Tensor:
    draws = torch.as_tensor(draws)
    if draws.dim() == 2:
        draws = draws.unsqueeze(-1)
    if draws.dim() != 3:
        raise ValueError(f"{name}: expected draws [draws, batch, dim], got shape {tuple(draws.shape)}")
    if draws.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 draws per datapoint, got {draws.shape[0]}")
    return draws


def _subsample(draws: torch.Tensor, max_draws: int, generator) -> torch.Tensor:
    """``max_draws`` of the draws ``[draws, batch, dim]``: the same ones for every datapoint, or with streams
    each datapoint's own (its draws ranked by uniforms of its stream)."""
    if draws.shape[0] <= max_draws:
        return draws
    if is_streams(generator):
        ranks = generator.uniform(draws.shape[:2], data_dim=1, dtype=torch.float64).to(draws.device)  # [draws, B]
        keep = ranks.argsort(0)[:max_draws]  # [max_draws, B]
        return draws.gather(0, keep.unsqueeze(-1).expand(-1, -1, draws.shape[-1]))
    keep = torch.randperm(draws.shape[0], generator=generator)[:max_draws].to(draws.device)
    return draws[keep]


def energy_distance(samples_a: torch.Tensor, samples_b: torch.Tensor, *, max_draws: int = MAX_ENERGY_DRAWS,
                    generator=None) -> torch.Tensor:
    """Energy distance D^2 between two sets of draws per datapoint; ``[draws, batch, dim]`` each -> ``[batch]``."""
    a = _subsample(_check_draws("samples_a", samples_a), max_draws, generator).transpose(0, 1).double()  # [B, Na, d]
    b = _subsample(_check_draws("samples_b", samples_b), max_draws, generator).transpose(0, 1).double()  # [B, Nb, d]
    na, nb = a.shape[1], b.shape[1]
    cross = torch.cdist(a, b).mean((-2, -1))
    within_a = torch.cdist(a, a).sum((-2, -1)) / (na * (na - 1))  # the diagonal is 0: a U-statistic
    within_b = torch.cdist(b, b).sum((-2, -1)) / (nb * (nb - 1))
    return 2 * cross - within_a - within_b


@torch.no_grad()
def posterior_discrepancy(samples_a: torch.Tensor, samples_b: torch.Tensor, *, max_draws: int = MAX_ENERGY_DRAWS,
                          generator=None) -> dict[str, torch.Tensor]:
    """Discrepancies of draws ``samples_a`` from reference draws ``samples_b`` (``[draws, batch, dim]`` each).

    Returns ``{"mean_sd", "sd_ratio", "energy"}``, each ``[batch]`` (see the module docstring).
    """
    a, b = _check_draws("samples_a", samples_a), _check_draws("samples_b", samples_b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"samples_a {tuple(a.shape)} and samples_b {tuple(b.shape)} differ in batch or dimension")
    a64, b64 = a.double(), b.double()
    sd_a, sd_b = a64.std(0), b64.std(0)  # [B, d]
    mean_sd = ((a64.mean(0) - b64.mean(0)).abs() / sd_b).amax(-1)
    log_ratio = torch.log(sd_a / sd_b)  # [B, d]
    worst = log_ratio.abs().argmax(-1, keepdim=True)
    sd_ratio = log_ratio.gather(-1, worst).squeeze(-1).exp()
    energy = energy_distance(a64, b64, max_draws=max_draws, generator=generator)
    return {"mean_sd": mean_sd.cpu(), "sd_ratio": sd_ratio.cpu(), "energy": energy.cpu()}


@dataclass
class GapDecomposition:
    """Per-datapoint log p(x), the ELBOs of the local and the amortized guide, and the two gaps (``[batch]`` each)."""

    log_px: torch.Tensor             # exact, or the IWAE-k estimate
    log_px_se: torch.Tensor          # its Monte Carlo standard error (0 when exact)
    log_px_source: str               # "exact" or "iwae<k>"
    elbo_local: torch.Tensor
    elbo_local_se: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_amortized_se: torch.Tensor

    @property
    def approximation_gap(self) -> torch.Tensor:
        """log p(x) - ELBO[q*_x]: what the guide's family cannot reach."""
        return self.log_px - self.elbo_local

    @property
    def amortization_gap(self) -> torch.Tensor:
        """ELBO[q*_x] - ELBO[q_phi(. | x)]: what the shared encoder misses."""
        return self.elbo_local - self.elbo_amortized


def _has(module, name: str) -> bool:
    return callable(getattr(module, name, None))


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()


def gap_decomposition(module, x: torch.Tensor, y: torch.Tensor | None = None, *,
                      local: LocalGuideResult | None = None, logp_k: int = 5000, elbo_k: int = 1000,
                      local_steps: int = 500, generator=None, progress: bool = False) -> GapDecomposition:
    """Per-datapoint log p(x), ELBO of the local and of the amortized guide, and the two gaps.

    Args:
        module: the model (an object with ``model`` and ``guide``; ``exact_log_marginal`` used if present).
        x, y: the data.
        local: a :class:`~ppl_genmodels.inference.local.LocalGuideResult` already fitted to these
            datapoints (else one is fitted with ``local_steps`` steps).
        logp_k: particles of the IWAE estimate of log p(x) when there is no closed form.
        elbo_k: particles of the amortized guide's ELBO estimate.
        generator: None, a ``torch.Generator`` (drawn from in turn) or per-datapoint streams.

    All values are float64 on the CPU.
    """
    for name, value in (("logp_k", logp_k), ("elbo_k", elbo_k)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    def stream(purpose):
        return generator.child(purpose) if is_streams(generator) else generator

    if local is None:
        local = fit_local_guides(module.model, module.guide, x, y, steps=local_steps, generator=stream("local"),
                                 progress=progress)
    amortized, _ = batched_estimates(module.model, module.guide, x, y, k=elbo_k, progress=progress,
                                     desc=f"amortized ELBO (k={elbo_k})", generator=stream("elbo"))
    if _has(module, "exact_log_marginal"):
        with torch.no_grad():
            log_px = module.exact_log_marginal(x) if y is None else module.exact_log_marginal(x, y)
        log_px_se, source = torch.zeros_like(log_px), "exact"
    else:
        _, iwae = batched_estimates(module.model, module.guide, x, y, k=logp_k, progress=progress,
                                    desc=f"log p(x) (iwae{logp_k})", generator=stream("logp"))
        log_px, log_px_se, source = iwae.value, iwae.stderr, f"iwae{logp_k}"
    return GapDecomposition(_float64(log_px), _float64(log_px_se), source, _float64(local.elbo),
                            _float64(local.elbo_se), _float64(amortized.value), _float64(amortized.stderr))


@torch.no_grad()
def guide_draws(model, guide, x: torch.Tensor, y: torch.Tensor | None, num: int, layout: LatentLayout,
                nesting: int | None = None, generator=None) -> torch.Tensor:
    """``[num, batch, latent_dim]`` draws from the amortized guide, constrained, flattened in ``layout``'s order."""
    start = LogJoint(model, guide, x, y, start="guide", nesting=nesting)
    values, _ = start.layout.unpack(start.sample_start(num, generator=generator))
    return layout.flatten(values, 2).cpu()


def _sample(post, num: int, batch: int, generator) -> torch.Tensor:
    """``num`` draws of a distribution of batch shape ``[batch]``; per datapoint from streams, through Pyro."""
    if not is_streams(generator):
        with seeded_from(generator):
            return post.sample((num,))
    with generator.draws(), pyro.plate(PARTICLE_PLATE, num, dim=-2), pyro.plate(DATA_PLATE, batch, dim=-1):
        return pyro.sample("exact", post)


@torch.no_grad()
def exact_draws(module, x: torch.Tensor, y: torch.Tensor | None, num: int, layout: LatentLayout, *,
                generator=None) -> torch.Tensor | None:
    """``[num, batch, latent_dim]`` from ``module.exact_posterior`` for a model with one latent site, else None."""
    if not _has(module, "exact_posterior") or len(layout.sites) != 1:
        return None
    post = module.exact_posterior(x) if y is None else module.exact_posterior(x, y)
    draws = _sample(post, num, x.shape[0], generator).reshape(num, x.shape[0], -1)
    return draws.cpu() if draws.shape[-1] == layout.dim else None
