"""Split R-hat and ESS of many variables at once, checked against ArviZ's one-variable-at-a-time values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ppl_genmodels.inference.diagnostics import ess_bulk, ess_tail, split_rhat
from ppl_genmodels.inference.mcmc import diagnostics

az = pytest.importorskip("arviz")
RNG = np.random.default_rng(0)


def _ar1(chains: int, draws: int, variables: int, phi: float) -> np.ndarray:
    noise = RNG.normal(size=(chains, draws, variables))
    out = np.zeros_like(noise)
    for t in range(1, draws):
        out[:, t] = phi * out[:, t - 1] + noise[:, t]
    return out


def _with_constant_and_nan() -> np.ndarray:
    draws = RNG.normal(size=(4, 100, 3))
    draws[:, :, 1] = 2.0
    draws[0, 5, 2] = np.nan
    return draws


CASES = {
    "independent": lambda: RNG.normal(size=(4, 500, 20)),
    "autocorrelated": lambda: _ar1(4, 300, 10, 0.9),
    "stuck chains": lambda: _ar1(2, 200, 5, 0.99) + np.arange(2)[:, None, None],
    "antithetic": lambda: _ar1(4, 100, 5, -0.7),
    "odd number of draws": lambda: RNG.normal(size=(3, 7, 4)),
    "ties": lambda: RNG.integers(0, 3, size=(4, 50, 6)).astype(float),
    "constant and NaN": _with_constant_and_nan,
    "one chain": lambda: RNG.normal(size=(1, 100, 3)),
    "too few draws": lambda: RNG.normal(size=(4, 3, 2)),
    "more variables than a block": lambda: _ar1(2, 40, 600, 0.5),
}


def _arviz(draws: np.ndarray):
    dataset = az.convert_to_dataset({"z": draws})
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        return (az.rhat(dataset)["z"].values, az.ess(dataset, method="bulk")["z"].values,
                az.ess(dataset, method="tail")["z"].values)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_variable_matches_arviz(case):
    draws = CASES[case]()
    rhat, bulk, tail = _arviz(draws)
    np.testing.assert_allclose(split_rhat(draws), rhat, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(ess_bulk(draws), bulk, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(ess_tail(draws), tail, rtol=1e-9, equal_nan=True)


def test_the_diagnostics_tell_mixed_chains_from_stuck_ones():
    mixed, stuck = RNG.normal(size=(4, 400, 1)), _ar1(4, 400, 1, 0.995) + np.arange(4)[:, None, None]
    assert split_rhat(mixed)[0] < 1.01 < split_rhat(stuck)[0]
    assert ess_bulk(mixed)[0] > 1000 > 100 > ess_bulk(stuck)[0]


def test_variables_keep_their_shape_and_the_per_datapoint_summary_takes_the_worst_dimension():
    draws = RNG.normal(size=(4, 200, 3, 5))
    draws[:, :, 1, 2] += np.arange(4)[:, None] * 3.0  # one dimension of datapoint 1 does not mix
    assert split_rhat(draws).shape == ess_bulk(draws).shape == ess_tail(draws).shape == (3, 5)
    rhat, bulk, tail = diagnostics(torch.as_tensor(draws))
    np.testing.assert_allclose(rhat.numpy(), split_rhat(draws).max(-1))
    np.testing.assert_allclose(tail.numpy(), ess_tail(draws).min(-1))
    assert rhat[1] > 1.5 and rhat[0] < 1.05 and rhat[2] < 1.05
    assert bulk[1] == ess_bulk(draws)[1].min()


def test_a_single_variable_array_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="chains, draws"):
        split_rhat(np.zeros(10))
