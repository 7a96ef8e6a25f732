"""Split R-hat and effective sample sizes of many variables at once.

The rank-normalised split R-hat and the bulk and tail effective sample sizes of
Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021), "Rank-normalization,
folding, and localization: an improved R-hat for assessing convergence of
MCMC", Bayesian Analysis 16(2), computed for every variable of
``draws  # [chains, draws, *variables]`` in one pass of array operations.
ArviZ computes the same quantities one variable at a time, in a Python loop
over every (datapoint, dimension); the definitions here follow ArviZ 0.23's
choices where the paper leaves room (Blom's offset 3/8 in the rank
normalisation, R's type-7 quantiles for the tail ESS, Geyer's initial positive
and monotone sequences with ArviZ's last-pair rule, the floor 1/log10(S) of the
autocorrelation time), so the values equal ArviZ's to rounding (the tests check
against ArviZ on random, autocorrelated, tied, constant and NaN draws). The
sorts and FFTs run in torch, on all the machine's threads.

- **R-hat**: chains split in halves (an odd middle draw is dropped); the larger
  of the R-hat of the rank-normalised draws (bulk) and of the rank-normalised
  absolute deviations from the median (tail). NaN with fewer than 2 chains or
  4 draws, or any NaN draw.
- **Bulk ESS**: the ESS of the rank-normalised split chains.
- **Tail ESS**: the smaller ESS of the indicators ``draw <= q`` for the 5% and
  95% quantiles q, on split chains.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.fftpack import next_fast_len

__all__ = ["split_rhat", "ess_bulk", "ess_tail"]

#: Blom's (1958) offset of the rank normal scores
_BLOM = 3.0 / 8.0
#: variables per block of work
_BLOCK = 256


def _flat(draws) -> tuple[np.ndarray, tuple[int, ...]]:
    """``[chains, draws, variables]`` float64, and the variables' shape."""
    array = np.asarray(draws, dtype=float)
    if array.ndim < 2:
        raise ValueError(f"expected draws [chains, draws, ...], got shape {array.shape}")
    return array.reshape(array.shape[0], array.shape[1], -1), array.shape[2:]


def _split(array: np.ndarray) -> np.ndarray:
    """Each chain cut in two halves (the middle draw of an odd count dropped): ``[2 chains, draws // 2, V]``."""
    half = array.shape[1] // 2
    return np.concatenate([array[:, :half], array[:, array.shape[1] - half:]], axis=0)


def _z_scale(array: np.ndarray) -> np.ndarray:
    """Rank normal scores of each variable over all its chains and draws (average ranks for ties)."""
    chains, draws, variables = array.shape
    rows = np.ascontiguousarray(array.reshape(chains * draws, variables).T)  # each variable's draws contiguous
    size = chains * draws
    scores = torch.special.ndtri((_average_ranks(rows) - _BLOM) / (size - 2 * _BLOM + 1))  # [V, chains * draws]
    return scores.T.numpy().reshape(array.shape)


def _average_ranks(rows: np.ndarray) -> torch.Tensor:
    """Ranks 1..n along each row, tied values sharing their average rank (``scipy.stats.rankdata``'s
    "average"), by torch's multi-threaded sort."""
    values, order = torch.sort(torch.from_numpy(rows), dim=-1)
    n = values.shape[-1]
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group = torch.cumsum(starts, dim=-1) - 1  # [V, n]: the run of equal values each sorted position is in
    position = torch.arange(n, dtype=torch.float64).expand_as(values)
    first = torch.full_like(values, float(n)).scatter_reduce(-1, group, position, reduce="amin")
    last = torch.full_like(values, -1.0).scatter_reduce(-1, group, position, reduce="amax")
    average = (first.gather(-1, group) + last.gather(-1, group)) / 2 + 1
    return torch.empty_like(average).scatter_(-1, order, average)


def _rhat(array: np.ndarray) -> np.ndarray:
    """The potential scale reduction of each variable of ``[chains, draws, V]`` (Gelman & Rubin)."""
    draws = array.shape[1]
    between = draws * np.var(array.mean(axis=1), axis=0, ddof=1)
    within = np.mean(np.var(array, axis=1, ddof=1), axis=0)
    return np.sqrt((between / within + draws - 1) / draws)


def _autocov(array: np.ndarray) -> np.ndarray:
    """Autocovariance at every lag along the draws, by FFT: ``[chains, draws, V]``."""
    draws = array.shape[1]
    size = next_fast_len(2 * draws)
    centred = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array - array.mean(axis=1, keepdims=True), 1, -1)))
    spectrum = torch.fft.rfft(centred, n=size, dim=-1)
    acov = torch.fft.irfft(spectrum * spectrum.conj(), n=size, dim=-1)[..., :draws] / draws
    return np.moveaxis(acov.numpy(), -1, 1)


def _positive_sequence(rho: np.ndarray, acov_mean: np.ndarray, mean_var, var_plus) -> tuple[np.ndarray, np.ndarray]:
    """Geyer's initial positive sequence of the autocorrelations ``rho  # [V, draws]`` (in place); the
    last lag each variable uses (``max_t``)."""
    draws = rho.shape[1]
    even = np.ones(rho.shape[0])
    odd = rho[:, 1].copy()
    active = even + odd > 0
    t_end = np.ones(rho.shape[0], dtype=int)
    for t in range(1, draws - 3, 2):
        if not active.any():
            break
        new_even = 1.0 - (mean_var - acov_mean[:, t + 1]) / var_plus
        new_odd = 1.0 - (mean_var - acov_mean[:, t + 2]) / var_plus
        store = active & (new_even + new_odd >= 0)
        rho[store, t + 1], rho[store, t + 2] = new_even[store], new_odd[store]
        even, odd = np.where(active, new_even, even), np.where(active, new_odd, odd)
        t_end = np.where(active, t + 2, t_end)
        active &= new_even + new_odd > 0
    max_t = t_end - 2
    keep = even > 0
    rho[keep, max_t[keep] + 1] = even[keep]
    return rho, max_t


def _monotone(rho: np.ndarray, max_t: np.ndarray) -> np.ndarray:
    """Geyer's initial monotone sequence: no pair of lags above the pair before it (in place)."""
    for t in range(1, rho.shape[1] - 2, 2):
        live = t <= max_t - 2
        if not live.any():
            break
        earlier = rho[:, t - 1] + rho[:, t]
        fix = live & (rho[:, t + 1] + rho[:, t + 2] > earlier)
        rho[fix, t + 1] = rho[fix, t + 2] = earlier[fix] / 2.0
    return rho


def _ess(array: np.ndarray) -> np.ndarray:
    """Effective sample size of each variable of ``[chains, draws, V]`` (Geyer's initial monotone sequence)."""
    chains, draws, variables = array.shape
    acov = _autocov(array)
    acov_mean = acov.mean(axis=0).T  # [V, draws]
    mean_var = acov_mean[:, 0] * draws / (draws - 1.0)
    var_plus = mean_var * (draws - 1.0) / draws
    if chains > 1:
        var_plus = var_plus + np.var(array.mean(axis=1), axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.zeros((variables, draws))
        rho[:, 0] = 1.0
        rho[:, 1] = 1.0 - (mean_var - acov_mean[:, 1]) / var_plus
        rho, max_t = _positive_sequence(rho, acov_mean, mean_var, var_plus)
        rho = _monotone(rho, max_t)
    lags = np.arange(draws)
    total = chains * draws
    tau = (-1.0 + 2.0 * np.where(lags <= max_t[:, None], rho, 0.0).sum(axis=1)
           + np.where(max_t + 1 < draws, rho[np.arange(variables), np.minimum(max_t + 1, draws - 1)], 0.0))
    ess = total / np.maximum(tau, 1.0 / np.log10(total))
    ess[np.isnan(rho).any(axis=1)] = np.nan
    constant = np.ptp(array, axis=(0, 1)) < np.finfo(float).resolution
    return np.where(constant, float(total), ess)


def _valid(array: np.ndarray, min_chains: int) -> np.ndarray:
    """Variables with enough chains and draws and no NaN."""
    enough = array.shape[0] >= min_chains and array.shape[1] >= 4
    return np.full(array.shape[2], enough) & ~np.isnan(array).any(axis=(0, 1))


def _per_variable(draws, min_chains: int, statistic) -> np.ndarray:
    """``statistic([chains, draws, block])`` over blocks of the valid variables; NaN for the others.

    Blocks of :data:`_BLOCK` variables keep the sorts and FFTs in cache (on a 2-core CPU, 5,000
    variables of 4 x 500 draws took 1.7 s in blocks of 250 against 4.2 s in one piece).
    """
    array, shape = _flat(draws)
    out = np.full(array.shape[2], np.nan)
    valid = np.flatnonzero(_valid(array, min_chains))
    with np.errstate(invalid="ignore", divide="ignore"):
        for start in range(0, len(valid), _BLOCK):
            block = valid[start:start + _BLOCK]
            out[block] = statistic(array[:, :, block])
    return out.reshape(shape)


def _rhat_rank(array: np.ndarray) -> np.ndarray:
    split = _split(array)
    bulk = _rhat(_z_scale(split))
    folded = np.abs(split - np.median(split.reshape(-1, split.shape[2]), axis=0))
    return np.maximum(bulk, _rhat(_z_scale(folded)))


def _ess_tail(array: np.ndarray, prob: float) -> np.ndarray:
    low, high = np.quantile(array.reshape(-1, array.shape[2]), [prob, 1.0 - prob], axis=0)  # R's type 7, as ArviZ
    return np.minimum(_ess(_split((array <= low).astype(float))), _ess(_split((array <= high).astype(float))))


def split_rhat(draws) -> np.ndarray:
    """Rank-normalised split R-hat of every variable of ``draws  # [chains, draws, *variables]``."""
    return _per_variable(draws, 2, _rhat_rank)


def ess_bulk(draws) -> np.ndarray:
    """Bulk effective sample size of every variable of ``draws  # [chains, draws, *variables]``."""
    return _per_variable(draws, 1, lambda array: _ess(_z_scale(_split(array))))


def ess_tail(draws, prob: float = 0.05) -> np.ndarray:
    """Tail effective sample size (the smaller of the ``prob`` and 1 - ``prob`` quantile ESS) of every variable."""
    return _per_variable(draws, 1, lambda array: _ess_tail(array, prob))
