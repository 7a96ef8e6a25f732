"""Adaptation pieces: Welford variance, dual averaging, Stan's warm-up windows and the window adaptation."""

import numpy as np
import pytest
import torch

from ppl_genmodels.inference import adaptation, hmc

pytestmark = pytest.mark.usefixtures("one_thread")


def test_welford_matches_the_sample_variance():
    torch.manual_seed(0)
    chunks = [torch.randn(3, 4, 2, dtype=torch.float64) * torch.tensor([1.0, 3.0]) + 5 for _ in range(7)]
    state = adaptation.welford_init(chunks[0])
    for c in chunks:
        state = adaptation.welford_update(state, c)
    everything = torch.cat(chunks)  # [21, 4, 2]
    n = everything.shape[0]
    expected = (n / (n + 5.0)) * everything.var(0) + 1e-3 * 5.0 / (n + 5.0)
    torch.testing.assert_close(adaptation.welford_final(state), expected)


def test_dual_averaging_drives_acceptance_to_its_target():
    torch.manual_seed(1)

    def logdensity(z):
        return -0.5 * (z**2).sum(-1)  # standard normal in 5-D, two targets

    state = hmc.init(torch.randn(8, 2, 5, dtype=torch.float64), logdensity)
    eps = torch.full((8, 2, 1), 2.0, dtype=torch.float64)
    adapt = adaptation.dual_averaging_init(eps)
    accept = []
    for i in range(400):
        state, info = hmc.step(state, logdensity, adapt.log_step.exp(), 1.0, 3)
        adapt = adaptation.dual_averaging_update(adapt, info.accept_rate, 0.65)
        if i >= 200:
            accept.append(info.accept_rate.mean().item())
    assert abs(np.mean(accept) - 0.65) < 0.08


def test_warmup_windows_follow_stans_layout():
    assert adaptation.warmup_windows(10) == []
    ends = adaptation.warmup_windows(1000)
    assert ends[0] == 150 + 25 and ends[-1] == 900
    assert all(b > a for a, b in zip(ends, ends[1:]))
