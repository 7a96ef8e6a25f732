"""Per-datapoint random streams (ppl_genmodels.streams): a datapoint's draws depend on (seed, purpose, index) alone.

The guides' draws are compared in batches whose size is a multiple of PAD (32): the
layout contract of the estimators (see inference/importance.py), under which the
networks' arithmetic, and not only the random numbers, is the same for a datapoint
whatever batch it is in.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from ppl_genmodels import traces
from ppl_genmodels.inference.importance import PAD
from ppl_genmodels.models.cvae import CVAE
from ppl_genmodels.models.hvae import HVAE
from ppl_genmodels.models.vae import VAE
from ppl_genmodels.streams import Streams

X_DIM = 12


def _data(n: int = 3 * PAD) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, X_DIM, generator=gen) > 0.5).float()
    y = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()
    return x, y


def _models() -> dict:
    torch.manual_seed(0)
    return {
        "diag": VAE(X_DIM, 3, hidden=(16,)),
        "fullrank": VAE(X_DIM, 3, hidden=(16,), guide="fullrank"),
        "iaf:2": VAE(X_DIM, 3, hidden=(16,), guide="iaf:2"),
        "cvae": CVAE(X_DIM, 3, y_dim=3, hidden=(16,), y_kind="onehot"),
        "hvae": HVAE(X_DIM, 2, z1_dim=3, hidden=(16,), hidden2=(8,)),
    }


def _guide_draws(model, x, y, rows: list[int], particles: int, chunks: list[int]) -> dict[str, torch.Tensor]:
    """Every latent site of ``model``'s guide for the datapoints ``rows``, ``particles`` at a time in ``chunks``."""
    streams = Streams(7, torch.tensor(rows), "test")
    nesting = traces.max_plate_nesting(model.model, model.guide, x[:1], y[:1])
    xb, yb = x[rows], y[rows]
    parts: dict[str, list[torch.Tensor]] = {}
    done = 0
    for size in chunks:
        streams.particle_offset = done
        with torch.no_grad(), streams.draws(), pyro.plate(traces.PARTICLE_PLATE, size, dim=-nesting - 1):
            trace = prune_subsample_sites(poutine.trace(model.guide).get_trace(xb, yb))
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                parts.setdefault(name, []).append(site["value"])
        done += size
    assert done == particles and streams.exact
    return {name: torch.cat(values) for name, values in parts.items()}


@pytest.mark.parametrize("name", ["diag", "fullrank", "iaf:2", "cvae", "hvae"])
def test_a_datapoints_draws_do_not_depend_on_its_batch_or_the_chunks(name):
    model = _models()[name]
    x, y = _data()
    first = list(range(PAD))
    alone = _guide_draws(model, x, y, first, 6, [6])
    mixed_rows = first[::-1] + list(range(3 * PAD - 1, 2 * PAD - 1, -1))  # reversed, then 32 others: 64 rows
    mixed = _guide_draws(model, x, y, mixed_rows, 6, [2, 3, 1])
    for site, values in alone.items():
        for position, row in enumerate(first):
            again = mixed[site][:, mixed_rows.index(row)]
            assert torch.equal(values[:, position], again), (site, row)


def test_particles_continue_across_chunks_and_differ_between_particles():
    model = _models()["diag"]
    x, y = _data()
    rows = list(range(PAD))
    z = _guide_draws(model, x, y, rows, 5, [5])["z"]
    assert torch.equal(z, _guide_draws(model, x, y, rows, 5, [1, 1, 1, 1, 1])["z"])
    assert not torch.equal(z[0], z[1])


def test_seeds_indices_and_purposes_give_different_numbers():
    base = Streams(0, torch.arange(4), "a").normal((3, 4))
    assert torch.equal(base, Streams(0, torch.arange(4), "a").normal((3, 4)))
    for other in (Streams(1, torch.arange(4), "a"), Streams(0, torch.arange(1, 5), "a"), Streams(0, torch.arange(4), "b"),
                  Streams(0, torch.arange(4), "a").child("c")):
        draw = other.normal((3, 4))
        assert not torch.isclose(draw, base).any()
    streams = Streams(0, torch.arange(4), "a")
    first, second = streams.normal((3, 4)), streams.normal((3, 4))  # each call a new draw
    assert torch.equal(first, base) and not torch.isclose(first, second).any()
    # a datapoint's column is its own, whatever rows come with it
    assert torch.equal(Streams(0, torch.tensor([2, 0]), "a").normal((3, 2))[:, 1], base[:, 0])
    assert torch.equal(Streams(0, torch.arange(4), "a").subset([3, 1]).normal((3, 2)), base[:, [3, 1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniforms_lie_strictly_inside_the_unit_interval(dtype):
    u = Streams(3, torch.arange(500), "u").uniform((400, 500), dtype=dtype)
    assert u.dtype == dtype and (u > 0).all() and (u < 1).all()
    assert abs(u.double().mean().item() - 0.5) < 0.005
    assert abs(u.double().var().item() - 1 / 12) < 0.002


def test_normals_are_standard_and_neighbouring_datapoints_uncorrelated():
    z = Streams(11, torch.arange(2000), "n").normal((50, 2000), dtype=torch.float64)  # [draws, datapoints]
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs(((z**3).mean()).item()) < 0.03 and abs(((z**4).mean()).item() - 3) < 0.06
    neighbours = torch.corrcoef(torch.stack([z[:, :-1].flatten(), z[:, 1:].flatten()]))[0, 1]
    successive = torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1]
    assert abs(neighbours.item()) < 0.015 and abs(successive.item()) < 0.015  # sd ~ 0.003 each
    seeds = torch.corrcoef(torch.stack([z.flatten(), Streams(12, torch.arange(2000), "n").normal(
        (50, 2000), dtype=torch.float64).flatten()]))[0, 1]
    assert abs(seeds.item()) < 0.015


def test_bernoulli_probabilities_are_respected_and_routed():
    probs = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    streams = Streams(0, torch.arange(5), "b")
    with streams.draws(), pyro.plate("particles", 4000, dim=-2), pyro.plate("data", 5, dim=-1):
        draws = pyro.sample("c", dist.Bernoulli(probs=probs))
    assert streams.exact and draws.shape == (4000, 5)
    freq = draws.mean(0)
    assert freq[0] == 0 and freq[-1] == 1
    assert torch.allclose(freq[1:4], probs[1:4], atol=4 * math.sqrt(0.25 / 4000))


def test_a_discrete_latent_drawn_by_multinomial_is_not_exact():
    def model():
        with pyro.plate("data", 6, dim=-1):
            pyro.sample("k", dist.Categorical(logits=torch.zeros(6, 4)))

    streams = Streams(0, torch.arange(6), "c")
    with streams.draws():
        poutine.trace(model).get_trace()
    assert not streams.exact
    routed = Streams(0, torch.arange(6), "c")
    with routed.draws(), pyro.plate("data", 6, dim=-1):
        pyro.sample("z", dist.Normal(torch.zeros(6), 1.0))
    assert routed.exact



def test_keys_are_mixed_from_the_index_and_the_state_gives_the_same_draws():
    from ppl_genmodels.streams import _mix_int, mix, stable_hash

    streams = Streams(3, torch.tensor([0, 5, 9]), "train/2")
    base = _mix_int(_mix_int(3) ^ stable_hash("train/2"))
    assert torch.equal(streams.keys, mix(torch.tensor([0, 5, 9]) ^ base))
    index, base_key, offset = streams.state()
    assert torch.equal(index, torch.tensor([0, 5, 9])) and int(base_key) == base and int(offset) == 0
    twin = Streams(3, torch.tensor([0, 5, 9]), "train/2").with_state(index.clone(), base_key.clone(), offset)
    assert torch.equal(twin.normal((4, 3, 2)), streams.normal((4, 3, 2)))
    other = streams.with_state(torch.tensor([0, 5, 8]), base_key, offset)  # another datapoint: another stream
    row = other.uniform((3, 2), data_dim=0)
    assert torch.equal(row[:2], streams.uniform((3, 2), data_dim=0, tag=2)[:2]) and not torch.equal(
        row[2], streams.uniform((3, 2), data_dim=0, tag=2)[2])
