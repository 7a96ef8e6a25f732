"""The batched HMC kernel: independent targets with their own step sizes, divergences, generators, AIS states."""

from typing import NamedTuple

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


def _gaussian(z):
    return -0.5 * (z**2).sum(-1)


def test_a_generator_makes_transitions_repeatable_and_leaves_the_global_stream_alone():
    start = hmc.init(torch.zeros(4, 3, 2, dtype=torch.float64), _gaussian)
    before = torch.get_rng_state()
    runs = []
    for _ in range(2):
        gen, state = torch.Generator().manual_seed(7), start
        for _ in range(5):
            state, _ = hmc.step(state, _gaussian, 0.5, 1.0, 3, generator=gen)
        runs.append(state.position)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(torch.get_rng_state(), before)
    other = hmc.step(start, _gaussian, 0.5, 1.0, 3, generator=torch.Generator().manual_seed(8))[0]
    assert not torch.equal(other.position, hmc.step(start, _gaussian, 0.5, 1.0, 3,
                                                     generator=torch.Generator().manual_seed(7))[0].position)


class Tagged(NamedTuple):
    """A richer state: what the caller keeps beside the log density moves with the position."""

    position: torch.Tensor
    log_density: torch.Tensor
    grad: torch.Tensor
    tag: torch.Tensor  # [chains, batch] here: the first coordinate where the state was built


def _tagged(z):
    plain = hmc.init(z, _gaussian)
    return Tagged(*plain, z[..., 0].clone())


def test_transition_moves_every_field_of_the_state_with_the_position():
    torch.manual_seed(0)
    state = _tagged(torch.randn(50, 2, 3, dtype=torch.float64))
    new, info = hmc.transition(state, _tagged, 0.9, 1.0, 4)
    assert isinstance(new, Tagged)
    assert info.accepted.any() and (~info.accepted).any()  # both branches are exercised
    torch.testing.assert_close(new.tag, new.position[..., 0])  # every field belongs to the same point
    kept = ~info.accepted
    assert torch.equal(new.position[kept], state.position[kept]) and torch.equal(new.tag[kept], state.tag[kept])
