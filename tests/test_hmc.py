"""The batched HMC kernel: independent targets with their own step sizes, divergences, generators, AIS states."""

import pytest
import torch

from ppl_genmodels.inference import hmc
from ppl_genmodels.inference.adaptation import adapt_step_size

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batched_hmc_samples_each_target_with_its_own_step_size():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [3.0, 1.0], [0.5, -1.0]], dtype=torch.float64)  # [batch, dim]
    scales = torch.tensor([[0.5, 1.0], [2.0, 0.3], [1.0, 1.0]], dtype=torch.float64)

    def logdensity(z):  # z [chains, batch, dim]: independent Gaussians, one per datapoint
        return torch.distributions.Normal(means, scales).log_prob(z).sum(-1)

    state = hmc.init(torch.zeros(200, 3, 2, dtype=torch.float64), logdensity)
    eps = torch.full((1, 3, 1), 0.3, dtype=torch.float64)
    draws, accept = [], []
    for i in range(400):
        state, info = hmc.step(state, logdensity, eps, scales.pow(2), num_leapfrog=5)
        if i < 100:
            eps = adapt_step_size(eps, info.accept_rate)
        else:
            draws.append(state.position)
            accept.append(info.accept_rate)
    samples = torch.stack(draws).reshape(-1, 3, 2)
    torch.testing.assert_close(samples.mean(0), means, atol=0.1 * 2, rtol=0)
    torch.testing.assert_close(samples.std(0), scales, atol=0.15, rtol=0.1)
    assert 0.4 < torch.stack(accept).mean() <= 1.0


def test_hmc_rejects_divergent_trajectories():
    def logdensity(z):
        return -0.5 * (z**2).sum(-1) * 1e6  # so stiff that a unit step explodes

    state = hmc.init(torch.full((4, 2, 3), 0.01), logdensity)
    new, info = hmc.step(state, logdensity, 1.0, 1.0, num_leapfrog=3)
    assert info.divergent.all() and not info.accepted.any()
    torch.testing.assert_close(new.position, state.position)
