"""Estimator results as table columns: the one way a result becomes part of a CSV file.

Every estimator of :mod:`ppl_genmodels.inference` returns a small result object
with per-datapoint tensors. :func:`columns` turns one into named numpy columns,
each result type by one fixed rule:

=======================  =====================================================================
result                   columns (``name`` is the estimator's column name)
=======================  =====================================================================
``Estimate``             ``name``, ``name_se``, and ``name_ess`` when it has an ESS (IWAE)
``AISResult``            ``name``, ``name_se``, ``name_ess``, ``name_accept``
``LocalGuideResult``     ``name``, ``name_se`` (the local guides' ELBO)
``MCMCResult``           ``rhat``, ``ess_bulk``, ``ess_tail``, ``accept_rate``, ``divergences``
``GapDecomposition``     ``log_px``, ``log_px_se``, ``log_px_source``, ``elbo_local``, ``elbo_local_se``,
                         ``elbo_amortized``, ``elbo_amortized_se``, ``approximation_gap``,
                         ``amortization_gap``
=======================  =====================================================================

(``MCMCResult`` and ``GapDecomposition`` columns get a ``name_`` prefix only when a
name is given.) :func:`value_columns` keeps just the estimate and its standard
error. Floating-point values become float64, counts stay integers.
:func:`unit_columns` lists an ``ActiveUnits`` result (active latent units) one
latent dimension a row: ``site``, ``dim``, ``variance``, ``active``.

A summary row describes the per-datapoint values of one estimator over the
evaluated datapoints: their mean and its standard error, sd / sqrt(n), which
includes the Monte Carlo noise of each value.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ppl_genmodels.inference.ais import AISResult
from ppl_genmodels.inference.compare import GapDecomposition
from ppl_genmodels.inference.importance import Estimate
from ppl_genmodels.inference.local import LocalGuideResult
from ppl_genmodels.inference.mcmc import MCMCResult

__all__ = ["columns", "value_columns", "concat", "mean_and_stderr", "summary_row", "SUMMARY_COLUMNS", "unit_columns",
           "UNIT_COLUMNS"]

SUMMARY_COLUMNS = ["estimator", "mean", "stderr", "n", "seconds"]

_RULES = {  # result type -> (column suffix, attribute) in column order
    Estimate: (("", "value"), ("_se", "stderr"), ("_ess", "ess")),
    AISResult: (("", "log_z"), ("_se", "stderr"), ("_ess", "ess"), ("_accept", "accept_rate")),
    LocalGuideResult: (("", "elbo"), ("_se", "elbo_se")),
    MCMCResult: tuple((f"_{a}", a) for a in ("rhat", "ess_bulk", "ess_tail", "accept_rate", "divergences")),
    GapDecomposition: tuple((f"_{a}", a) for a in ("log_px", "log_px_se", "log_px_source", "elbo_local",
                                                   "elbo_local_se", "elbo_amortized", "elbo_amortized_se",
                                                   "approximation_gap", "amortization_gap")),
}


def _array(value):
    if isinstance(value, str):
        return value
    value = torch.as_tensor(value).detach().cpu()
    return value.double().numpy() if value.is_floating_point() else value.numpy()


def _rule(result) -> tuple:
    for kind, rule in _RULES.items():
        if isinstance(result, kind):
            return rule
    raise TypeError(f"no column rule for a {type(result).__name__}")


def columns(result, name: str = "") -> dict[str, np.ndarray]:
    """Per-datapoint columns of one estimator's ``result`` (see the module docstring)."""
    out = {}
    for suffix, attribute in _rule(result):
        value = getattr(result, attribute)
        if value is not None:
            out[f"{name}{suffix}" if name else suffix.lstrip("_")] = _array(value)
    return out


def value_columns(result, name: str) -> dict[str, np.ndarray]:
    """Just the estimate and its standard error: ``name`` and ``name_se``."""
    return dict(list(columns(result, name).items())[:2])


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The columns of consecutive batches of datapoints, joined."""
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean over datapoints and its standard error sd / sqrt(n) (NaN for a single value)."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def summary_row(name: str, values, seconds: float) -> dict:
    """One row of an evaluation summary: ``estimator, mean, stderr, n, seconds``."""
    mean, stderr = mean_and_stderr(values)
    return {"estimator": name, "mean": mean, "stderr": stderr, "n": len(values), "seconds": seconds}


UNIT_COLUMNS = ["site", "dim", "variance", "active"]


def unit_columns(result) -> dict[str, np.ndarray]:
    """One row per latent dimension of an ``ActiveUnits`` result (:func:`ppl_genmodels.evaluation.active_units`).

    ``site`` (the guide's sample site), ``dim`` (the dimension's place in the site's flattened
    event), ``variance`` (A_u = Var_x(E_q[u | x])) and ``active`` (A_u above the result's threshold).
    """
    names = [name for name, value in result.variance.items() for _ in range(value.numel())]
    dims = [d for value in result.variance.values() for d in range(value.numel())]
    variance = np.concatenate([_array(value).reshape(-1) for value in result.variance.values()])
    return {"site": np.array(names, dtype=object), "dim": np.array(dims, dtype=np.int64), "variance": variance,
            "active": variance > result.threshold}
