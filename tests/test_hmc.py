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


def _python_while_loop(cond, body, carried, constants=()):
    """torch's while_loop as a plain Python loop: what the traced loop computes, run eagerly."""
    carried = tuple(carried)
    while bool(cond(*carried, *constants)):
        carried = tuple(body(*carried, *constants))
    return carried


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_the_loop_form_of_the_trajectory_gives_the_python_loops_numbers_exactly(steps):
    """``leapfrog_loop`` (a tensor number of steps, every tensor through the body's arguments) computes what
    ``leapfrog`` does, operation by operation: the same bits, for one step and several."""
    torch.manual_seed(3)
    scale = torch.tensor([[0.5, 2.0, 1.0]])

    def logdensity(z):
        return -0.5 * ((z / scale) ** 2).sum(-1) - (z.sin() ** 2).sum(-1)

    def evaluate(z, s=scale):
        with torch.enable_grad():
            pos = z.detach().requires_grad_(True)
            value = -0.5 * ((pos / s) ** 2).sum(-1) - (pos.sin() ** 2).sum(-1)
            (grad,) = torch.autograd.grad(value.sum(), pos)
        return hmc.HMCState(z, value.detach(), grad)

    state = hmc.init(torch.randn(4, 2, 3), logdensity)
    momentum, eps, inverse_mass = torch.randn(4, 2, 3), torch.rand(4, 2, 1) * 0.3, torch.rand(1, 2, 3) + 0.5
    expected = hmc.leapfrog(state, momentum, evaluate, eps, inverse_mass, steps)
    got = hmc.leapfrog_loop(state, momentum, evaluate, eps, inverse_mass, torch.tensor(steps),
                            while_loop=_python_while_loop, constants=(scale,))
    for a, b in zip((*got[0], got[1]), (*expected[0], expected[1])):
        assert torch.equal(a, b)


def test_a_transition_is_its_draws_then_the_metropolis_step_on_them():
    """``transition`` = ``draws`` (noise, then the uniforms, from the generator) + ``metropolis``: the split a
    compiled caller uses gives the same transition from the same generator state."""
    start = hmc.init(torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                     _gaussian)
    whole = hmc.transition(start, lambda z: hmc.init(z, _gaussian), 0.4, 1.0, 3,
                           generator=torch.Generator().manual_seed(5))
    noise, uniform = hmc.draws(start, torch.Generator().manual_seed(5))
    assert noise.shape == (3, 2, 4) and uniform.shape == (3, 2)

    def integrate(state, momentum, eps, inv, steps):
        return hmc.leapfrog(state, momentum, lambda z: hmc.init(z, _gaussian), eps, inv, steps)

    split = hmc.metropolis(start, noise, uniform, integrate, 0.4, 1.0, 3)
    for a, b in zip((*whole[0], *whole[1]), (*split[0], *split[1])):
        assert torch.equal(a, b)
