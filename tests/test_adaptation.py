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


def test_the_warmup_schedule_follows_the_windows():
    schedule = adaptation.warmup_schedule(1000)
    ends = adaptation.warmup_windows(1000)
    assert len(schedule) == 1000
    assert [i + 1 for i, stage in enumerate(schedule) if stage.window_end] == ends
    collecting = [i + 1 for i, stage in enumerate(schedule) if stage.collect_mass]
    assert collecting[0] == 151 and collecting[-1] == ends[-1]  # after the 15% buffer, up to the last window
    assert not any(stage.collect_mass or stage.window_end for stage in adaptation.warmup_schedule(10))


def test_window_adaptation_learns_each_datapoints_scales_and_step_size():
    torch.manual_seed(3)
    scales = torch.tensor([[0.1, 1.0, 3.0], [2.0, 0.5, 0.05]], dtype=torch.float64)  # [batch, dim]

    def logdensity(z):  # [chains, batch, dim]: independent Gaussians, very different scales
        return -0.5 * ((z / scales) ** 2).sum(-1)

    position = torch.randn(4, 2, 3, dtype=torch.float64)
    state, adapt = hmc.init(position, logdensity), adaptation.window_adaptation_init(position, 0.1)
    for stage in adaptation.warmup_schedule(600):
        state, info = hmc.step(state, logdensity, adapt.step_size, adapt.inverse_mass, 5)
        adapt = adaptation.window_adaptation_update(adapt, stage, state.position, info.accept_rate, 0.65)
    step_size, inverse_mass = adaptation.window_adaptation_final(adapt)
    assert step_size.shape == (4, 2, 1) and inverse_mass.shape == (1, 2, 3)
    ratio = inverse_mass[0] / scales**2  # the inverse mass estimates each datapoint's posterior variances
    assert torch.all((ratio > 0.5) & (ratio < 2.0))
    accept = []
    for _ in range(200):
        state, info = hmc.step(state, logdensity, step_size, inverse_mass, 5)
        accept.append(info.accept_rate.mean().item())
    assert 0.5 < np.mean(accept) < 0.95


def test_final_step_size_without_any_update_is_the_initial_one():
    position = torch.zeros(2, 3, 1, dtype=torch.float64)
    step_size, inverse_mass = adaptation.window_adaptation_final(adaptation.window_adaptation_init(position, 0.3))
    assert torch.equal(step_size, torch.full((2, 3, 1), 0.3, dtype=torch.float64))
    assert torch.equal(inverse_mass, torch.ones(1, 3, 1, dtype=torch.float64))
