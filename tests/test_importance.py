"""Streaming IWAE-k / ELBO: the chunked accumulator against the all-at-once estimators."""

import math

import pytest
import torch

from ppl_genmodels import traces
from ppl_genmodels.inference.importance import ImportanceAccumulator, iwae_estimate, streaming_estimates
from ppl_genmodels.models.ppca import PPCA
from ppl_genmodels.models.vae import VAE


def _stream(log_w: torch.Tensor, sizes) -> ImportanceAccumulator:
    acc = ImportanceAccumulator()
    for chunk in log_w.split(list(sizes)):
        acc.update(chunk)
    return acc


def elbo_estimate(log_w):
    """Reference: the ELBO and its standard error from all particles at once, ``log_w  # [K, B]``."""
    k = log_w.shape[0]
    stderr = log_w.std(0) / math.sqrt(k) if k > 1 else torch.full_like(log_w[0], float("nan"))
    return log_w.mean(0), stderr


def _assert_matches_all_at_once(stats, log_w, atol=1e-10):
    elbo, elbo_se = elbo_estimate(log_w)
    iw, iw_se, ess = iwae_estimate(log_w)
    for got, want in ((stats.elbo, elbo), (stats.elbo_se, elbo_se), (stats.iwae, iw), (stats.iwae_se, iw_se),
                      (stats.ess, ess)):
        torch.testing.assert_close(got, want, atol=atol, rtol=atol, equal_nan=True)
    assert stats.num_particles == log_w.shape[0]


@pytest.fixture
def ppca_pair():
    torch.manual_seed(0)
    model = PPCA(5, 2).double()
    with torch.no_grad():
        model.W.copy_(torch.randn(5, 2, dtype=torch.float64))
        model.mu.copy_(torch.randn(5, dtype=torch.float64))
        model.log_sigma.fill_(math.log(0.5))
    x, _ = model.sample_data(6)
    return model, x


# --------------------------------------------------------------------------- #
# the accumulator on known tensors
# --------------------------------------------------------------------------- #


def test_accumulator_equals_all_at_once_whatever_the_chunks():
    torch.manual_seed(0)
    log_w = 3.0 * torch.randn(500, 4, dtype=torch.float64) - 50.0
    log_w[420, :] += 25.0  # a late chunk whose max exceeds everything before it: the sums are rescaled
    log_w[3, 1] += 40.0    # and an early giant weight in one column
    for sizes in ([500], [1] * 500, [7] * 71 + [3], [100, 1, 399], [250, 250]):
        _assert_matches_all_at_once(_stream(log_w, sizes).result(), log_w)


def test_accumulator_with_a_single_particle():
    log_w = torch.tensor([[-3.0, 2.5, -1e4]], dtype=torch.float64)
    stats = _stream(log_w, [1]).result()
    torch.testing.assert_close(stats.elbo, log_w[0])
    torch.testing.assert_close(stats.iwae, log_w[0])
    torch.testing.assert_close(stats.ess, torch.ones(3, dtype=torch.float64))
    assert torch.isnan(stats.elbo_se).all() and torch.isnan(stats.iwae_se).all()
    _assert_matches_all_at_once(stats, log_w)


def test_accumulator_on_constant_and_extreme_weights():
    const = torch.full((64, 3), -2.0, dtype=torch.float64)
    stats = _stream(const, [10] * 6 + [4]).result()
    torch.testing.assert_close(stats.iwae, torch.full((3,), -2.0, dtype=torch.float64))
    assert torch.all(stats.iwae_se.abs() < 1e-12) and torch.all(stats.elbo_se.abs() < 1e-12)
    torch.testing.assert_close(stats.ess, torch.full((3,), 64.0, dtype=torch.float64))
    # log weights far below exp's range, and one weight dominating all the others
    heavy = torch.cat([torch.full((30, 2), -2e4, dtype=torch.float64), torch.tensor([[-1e4, -1e4]], dtype=torch.float64)])
    stats = _stream(heavy, [15, 15, 1]).result()
    assert torch.all(torch.isfinite(stats.iwae))
    torch.testing.assert_close(stats.iwae, torch.full((2,), -1e4 - math.log(31), dtype=torch.float64))
    torch.testing.assert_close(stats.ess, torch.ones(2, dtype=torch.float64))
    _assert_matches_all_at_once(stats, heavy)


def test_accumulator_float32_matches_to_float32_precision():
    torch.manual_seed(1)
    log_w = 2.0 * torch.randn(3000, 5) - 100.0
    stats = _stream(log_w, [128] * 23 + [56]).result()
    _assert_matches_all_at_once(stats, log_w, atol=1e-5)


def test_accumulator_with_zero_weights():
    # a datapoint whose first chunk has only zero weights (log w = -inf), then finite ones far below 0
    first = torch.tensor([[-math.inf, -1.0], [-math.inf, -2.0]], dtype=torch.float64)
    later = torch.tensor([[-1000.0, -1.5], [-1001.0, -1.0]], dtype=torch.float64)
    log_w = torch.cat([first, later])
    stats = _stream(log_w, [2, 2]).result()
    want = torch.logsumexp(torch.tensor([-1000.0, -1001.0], dtype=torch.float64), 0) - math.log(4)
    torch.testing.assert_close(stats.iwae[0], want)
    assert stats.elbo[0] == -math.inf
    _assert_matches_all_at_once(_stream(log_w[:, 1:], [2, 2]).result(), log_w[:, 1:])  # the ordinary column
    everything_zero = _stream(torch.full((3, 1), -math.inf), [3]).result()
    assert everything_zero.iwae.item() == -math.inf


def test_accumulator_rejects_bad_input():
    with pytest.raises(ValueError, match="no log weights"):
        ImportanceAccumulator().result()
    with pytest.raises(ValueError, match="particles, batch"):
        ImportanceAccumulator().update(torch.zeros(5))


# --------------------------------------------------------------------------- #
# streaming_estimates on models: the same particles as all at once, bounded chunks
# --------------------------------------------------------------------------- #


class _Recorder:
    """Wraps traces.log_weights: records every chunk it returns and the particles asked for."""

    def __init__(self, monkeypatch):
        self.chunks, self.requested = [], []
        self._real = traces.log_weights
        monkeypatch.setattr(traces, "log_weights", self)

    def __call__(self, *args, **kwargs):
        self.requested.append(kwargs.get("num_particles", 1))
        out = self._real(*args, **kwargs)
        self.chunks.append(out)
        return out


@pytest.mark.parametrize("proposal", ["guide", "prior", "mixture"])
def test_streaming_equals_all_at_once_on_the_same_particles(ppca_pair, monkeypatch, proposal):
    model, x = ppca_pair
    with torch.no_grad():  # a guide that is not the posterior, so the weights vary
        model.guide_b.add_(0.5)
    rec = _Recorder(monkeypatch)
    torch.manual_seed(3)
    elbo, iw = streaming_estimates(model.model, model.guide, x, k=250, chunk_size=40, proposal=proposal)
    log_w = torch.cat(rec.chunks)
    assert log_w.shape == (250, 6)
    assert max(rec.requested) <= 40 and sum(rec.requested) == 250
    want_elbo, want_elbo_se = elbo_estimate(log_w)
    want_iw, want_iw_se, want_ess = iwae_estimate(log_w)
    assert elbo.estimator == "elbo" and iw.estimator == "iwae250"
    torch.testing.assert_close(elbo.value, want_elbo, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(elbo.stderr, want_elbo_se, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(iw.value, want_iw, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(iw.stderr, want_iw_se, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(iw.ess, want_ess, atol=1e-9, rtol=1e-9)
    assert elbo.ess is None and iw.seconds > 0


def test_mixture_chunks_hold_an_even_number_of_particles(ppca_pair, monkeypatch):
    model, x = ppca_pair
    rec = _Recorder(monkeypatch)
    streaming_estimates(model.model, model.guide, x, k=11, chunk_size=3, proposal="mixture")
    assert rec.requested == [4, 4, 3]  # half guide, half prior in every full chunk


def test_memory_does_not_grow_with_k(monkeypatch):
    torch.manual_seed(0)
    model = VAE(6, 2, hidden=(8,), likelihood="bernoulli")
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    rec = _Recorder(monkeypatch)
    elbo, iw = streaming_estimates(model.model, model.guide, x, k=5000, chunk_size=64)
    assert max(rec.requested) <= 64 and sum(rec.requested) == 5000
    assert max(c.shape[0] for c in rec.chunks) <= 64
    assert iw.estimator == "iwae5000"
    assert torch.all(iw.value >= elbo.value) and torch.all(torch.isfinite(iw.stderr))
    assert torch.all((iw.ess >= 1) & (iw.ess <= 5000))


def test_streaming_with_the_exact_guide_gives_the_exact_marginal(ppca_pair):
    model, x = ppca_pair
    model.set_exact_guide()
    elbo, iw = streaming_estimates(model.model, model.guide, x, k=100, chunk_size=7)
    exact = model.exact_log_marginal(x)
    torch.testing.assert_close(elbo.value, exact, atol=1e-9, rtol=0)
    torch.testing.assert_close(iw.value, exact, atol=1e-9, rtol=0)
    assert torch.all(iw.stderr < 1e-9) and torch.all((iw.ess - 100).abs() < 1e-6)


def test_streaming_agrees_with_exact_within_its_standard_error(ppca_pair):
    model, x = ppca_pair
    model.set_exact_guide()
    with torch.no_grad():
        model.guide_b.add_(0.3)
    torch.manual_seed(4)
    _, iw = streaming_estimates(model.model, model.guide, x, k=3000, chunk_size=500)
    assert torch.all((iw.value - model.exact_log_marginal(x)).abs() < 4 * iw.stderr + 1e-3)


def test_streaming_rejects_bad_arguments(ppca_pair):
    model, x = ppca_pair
    with pytest.raises(ValueError, match="k must be >= 1"):
        streaming_estimates(model.model, model.guide, x, k=0)
    with pytest.raises(ValueError, match="proposal"):
        streaming_estimates(model.model, model.guide, x, k=3, proposal="posterior")
