"""Importance-sampling estimates of log p(x) per datapoint, with error bars.

All estimators are small functions of one tensor of log weights
``log_w  # [particles, batch]`` from :func:`ppl_genmodels.traces.log_weights`
(see that module for the maths of the weights).

- ELBO: mean_k log w_k, an unbiased estimate of the evidence lower bound;
  its standard error is the sample standard deviation of log w over sqrt(K).
- IWAE-K: log (1/K) sum_k w_k (Burda et al. 2016). Its exponential is an
  unbiased estimate of p(x), so the log is a stochastic lower bound whose
  bias shrinks as K grows. The standard error is the delta-method one:
  with w normalised by its maximum, se ~= sd(w) / (sqrt(K) mean(w)), the
  standard error of the mean weight relative to the mean (Owen 2013,
  "Monte Carlo theory, methods and examples", ch. 9).
- ESS = (sum w)^2 / sum w^2 (Kong 1992): how many independent draws from
  p(z|x) the K weighted particles are worth; a small ESS warns that the
  IWAE estimate (and its standard error) is unreliable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ppl_genmodels.traces import log_mean_exp, log_weights

__all__ = ["Estimate", "elbo_estimate", "iwae_estimate", "importance_estimates"]


@dataclass
class Estimate:
    """Per-datapoint estimates of one estimator."""

    estimator: str          # e.g. "elbo", "iwae100"
    value: torch.Tensor     # [batch]
    stderr: torch.Tensor    # [batch]
    ess: torch.Tensor | None = None  # [batch], for importance sampling
    seconds: float = 0.0


def elbo_estimate(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ELBO and its standard error per datapoint from ``log_w  # [K, B]``."""
    k = log_w.shape[0]
    value = log_w.mean(0)
    stderr = log_w.std(0) / math.sqrt(k) if k > 1 else torch.full_like(value, float("nan"))
    return value, stderr


def iwae_estimate(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IWAE-K estimate of log p(x), its delta-method standard error and the ESS, per datapoint."""
    k = log_w.shape[0]
    value = log_mean_exp(log_w, 0)
    w = torch.exp(log_w - log_w.max(0, keepdim=True).values)  # [K, B], max weight 1
    mean_w = w.mean(0)
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    if k > 1:
        stderr = w.std(0) / (math.sqrt(k) * mean_w)
    else:
        stderr = torch.full_like(value, float("nan"))
    return value, stderr, ess


@torch.no_grad()
def importance_estimates(model, guide, x, y=None, *, k: int = 100, chunk_size: int | None = 1000,
                         proposal: str = "guide") -> tuple[Estimate, Estimate]:
    """ELBO and IWAE-k estimates for one batch of data, both from the same k particles."""
    start = time.perf_counter()
    log_w = log_weights(model, guide, x, y, num_particles=k, chunk_size=chunk_size, proposal=proposal)
    seconds = time.perf_counter() - start
    elbo, elbo_se = elbo_estimate(log_w)
    iw, iw_se, ess = iwae_estimate(log_w)
    return (Estimate("elbo", elbo, elbo_se, None, seconds), Estimate(f"iwae{k}", iw, iw_se, ess, seconds))
