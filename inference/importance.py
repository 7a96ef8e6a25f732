"""Importance-sampling estimates of log p(x) per datapoint, with error bars.

All estimators are small functions of the log weights
``log_w  # [particles, batch]`` from :func:`ppl_genmodels.traces.log_weights`
(see that module for the maths of the weights).

- ELBO: mean_k log w_k, an unbiased estimate of the evidence lower bound;
  its standard error is the sample standard deviation of log w over sqrt(K).
- IWAE-K: log (1/K) sum_k w_k (Burda et al. 2016). Its exponential is an
  unbiased estimate of p(x), so the log is a stochastic lower bound whose
  bias shrinks as K grows. The standard error is the delta-method one:
  with w normalised by its maximum, se ~= sd(w) / (sqrt(K) mean(w)), the
  standard error of the mean weight relative to the mean (Owen 2013,
  "Monte Carlo theory, methods and examples", ch. 9).
- ESS = (sum w)^2 / sum w^2 (Kong 1992): how many independent draws from
  p(z|x) the K weighted particles are worth; a small ESS warns that the
  IWAE estimate (and its standard error) is unreliable.

For large K the ``[K, batch]`` tensor need never exist: :class:`ImportanceAccumulator`
takes the particles chunk by chunk and keeps, per datapoint, only

    m        running max of log w (the shift that keeps exp from overflowing)
    s1       sum_k w_k / e^m                        (rescaled by e^(m_old - m_new) when m grows)
    M2_w     sum_k (w_k / e^m - mean)^2             (rescaled by e^(2 (m_old - m_new)))
    mean, M2 of log w                               (for the ELBO from the same particles)

Centred sums of squares are merged across chunks with the pairwise update of
Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm for
computing sample variances", which avoids the cancellation of
sum w^2 - (sum w)^2 / K when the weights are nearly equal (a good guide). Then
s2 = sum w^2 / e^(2m) = M2_w + s1^2 / K, and

    IWAE-K = m + log(s1 / K),   ESS = s1^2 / s2,   se = sqrt(M2_w / (K - 1)) / (sqrt(K) s1 / K).

:func:`streaming_estimates` drives it with ``traces.log_weights(..., num_particles=chunk)``,
so memory is bounded by the chunk whatever K is.

Per-datapoint streams. With ``generator`` a :class:`ppl_genmodels.streams.Streams` (one
stream per datapoint, keyed by the datapoint's index), a datapoint's particles depend
on its own stream alone, and so, bit for bit, does its estimate, whatever batch, pass
or process computes it. Fixed draws are not enough for that: the arithmetic must not
depend on the layout either. So under streams the particles come in chunks of
:func:`particle_chunk` = min(k, 128), a function of k alone (the accumulator's
rounding depends on the chunks), and every vectorized pass holds a multiple of
:data:`PAD` = 32 datapoints, the last pass padded by repeating its last datapoint (with
its stream; the copies' results are dropped): :func:`padded_passes`. Measured on this
project's CPU build (MKL, AVX-512): a row of a matrix product has the same bits whatever
rows share the product only when their number is a multiple of 4, and element-wise
kernels run 32 float32 elements at a time and the remainder in scalar code whose
last bit can differ (softplus, sigmoid); with 32 | datapoints no datapoint's elements
fall in a remainder. A ``torch.Generator`` (or None: torch's global generator) keeps
the plain layout, passes sized by ``batch_size`` and ``rows_per_pass``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ppl_genmodels import traces
from ppl_genmodels.compiled import static_path
from ppl_genmodels.traces import is_streams, log_mean_exp, seeded_from

__all__ = [
    "Estimate",
    "ImportanceStats",
    "ImportanceAccumulator",
    "ROWS_PER_PASS",
    "PAD",
    "MAX_CHUNK",
    "particle_chunk",
    "pass_size",
    "padded_passes",
    "iwae_estimate",
    "streaming_estimates",
    "batched_estimates",
]

#: particles x datapoints per vectorized pass: bounds memory whatever k is; passes of about 4k rows keep
#: the temporaries small enough to be reused between passes (``benchmarks/evaluate.py``): on a 2-core
#: AVX-512 CPU a pass of 4096 rows of the MNIST VAE 784-400-50 took 5.1 us a row, one of 8192 rows 8.0
#: (the digits VAE 64-256-16: 0.74 and 1.30)
ROWS_PER_PASS = 4_096
#: under per-datapoint streams every vectorized pass holds a multiple of PAD datapoints (see the module docstring)
PAD = 32
#: particles per chunk under per-datapoint streams: min(k, MAX_CHUNK), a function of k alone; a pass of PAD
#: datapoints then holds at most ROWS_PER_PASS particle rows
MAX_CHUNK = ROWS_PER_PASS // PAD


def particle_chunk(k: int) -> int:
    """Particles per chunk under per-datapoint streams: min(k, :data:`MAX_CHUNK`), whatever the batch or device."""
    return max(1, min(int(k), MAX_CHUNK))


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def pass_size(particles: int, *, rows_per_pass: int | None = None, batch_size: int | None = None) -> int:
    """Datapoints per vectorized pass under per-datapoint streams: a multiple of :data:`PAD`.

    ``batch_size`` rounded up to a multiple of PAD when given; else as many datapoints as
    ``rows_per_pass`` (default :data:`ROWS_PER_PASS`) particle rows hold with ``particles``
    rows each, rounded down to a multiple of PAD, and at least PAD.
    """
    if batch_size is not None:
        return _round_up(max(1, batch_size), PAD)
    rows = ROWS_PER_PASS if rows_per_pass is None else int(rows_per_pass)
    return max(PAD, rows // max(1, int(particles)) // PAD * PAD)


def padded_passes(n: int, size: int):
    """Consecutive passes over ``n`` datapoints, ``size`` (a multiple of PAD) at a time: ``(begin, stop, rows)``.

    ``rows  # [width]`` are the datapoints of the pass, ``begin .. stop - 1``, then the last one
    repeated up to a multiple of :data:`PAD` (the copies' results are to be dropped).
    """
    for begin in range(0, n, size):
        stop = min(n, begin + size)
        yield begin, stop, torch.arange(begin, begin + _round_up(stop - begin, PAD)).clamp_max(stop - 1)


@dataclass
class Estimate:
    """Per-datapoint estimates of one estimator."""

    estimator: str          # e.g. "elbo", "iwae100"
    value: torch.Tensor     # [batch]
    stderr: torch.Tensor    # [batch]
    ess: torch.Tensor | None = None  # [batch], for importance sampling
    seconds: float = 0.0


def iwae_estimate(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IWAE-K estimate of log p(x), its delta-method standard error and the ESS, per datapoint."""
    k = log_w.shape[0]
    value = log_mean_exp(log_w, 0)
    w = torch.exp(log_w - log_w.max(0, keepdim=True).values)  # [K, B], max weight 1
    mean_w = w.mean(0)
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    if k > 1:
        stderr = w.std(0) / (math.sqrt(k) * mean_w)
    else:
        stderr = torch.full_like(value, float("nan"))
    return value, stderr, ess


class ImportanceStats(NamedTuple):
    """ELBO and IWAE-K per datapoint from K particles (each field ``[batch]``)."""

    elbo: torch.Tensor
    elbo_se: torch.Tensor
    iwae: torch.Tensor
    iwae_se: torch.Tensor
    ess: torch.Tensor
    num_particles: int


class ImportanceAccumulator:
    """Running ELBO / IWAE-K statistics over chunks of log weights ``[k_chunk, batch]``.

    ``update`` any number of chunks (of any sizes), then ``result()``: the same
    numbers, up to rounding, as :func:`elbo_estimate` and :func:`iwae_estimate`
    on the concatenated chunks, from O(batch) memory.
    """

    def __init__(self):
        self.count = 0
        self.max = None       # [B] running max of log w (-inf while every weight so far is 0)
        self.shift = None     # [B] m: the max where finite, else 0; the sums below are in units of e^m
        self.sum_w = None     # [B] s1 = sum w / e^m
        self.m2_w = None      # [B] sum (w / e^m - mean)^2
        self.mean_log = None  # [B] mean log w
        self.m2_log = None    # [B] sum (log w - mean log w)^2

    def update(self, log_w: torch.Tensor) -> "ImportanceAccumulator":
        """Add a chunk of particles ``log_w  # [k_chunk, batch]``."""
        log_w = log_w.detach()
        if log_w.dim() != 2 or log_w.shape[0] == 0:
            raise ValueError(f"expected log weights [particles, batch] with particles >= 1, got {tuple(log_w.shape)}")
        n_b = log_w.shape[0]
        chunk_max = log_w.max(0).values
        new_max = chunk_max if self.count == 0 else torch.maximum(self.max, chunk_max)
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        w = torch.exp(log_w - shift)  # [k_chunk, B], at most 1
        mean_b = w.mean(0)
        m2_b = ((w - mean_b) ** 2).sum(0)
        mean_log_b = log_w.mean(0)
        m2_log_b = ((log_w - mean_log_b) ** 2).sum(0)
        if self.count == 0:
            self.sum_w, self.m2_w, self.mean_log, self.m2_log = w.sum(0), m2_b, mean_log_b, m2_log_b
        else:
            n_a = self.count
            n = n_a + n_b
            # the old sums in units of the new max; clamped for a datapoint whose earlier weights were all 0
            scale = torch.exp((self.shift - shift).clamp_max(0.0))
            mean_a = self.sum_w * scale / n_a
            delta = mean_b - mean_a
            self.m2_w = self.m2_w * scale**2 + m2_b + delta**2 * (n_a * n_b / n)
            self.sum_w = self.sum_w * scale + w.sum(0)
            delta_log = mean_log_b - self.mean_log
            merged = self.mean_log + delta_log * (n_b / n)
            zero_weight = torch.isneginf(self.mean_log) | torch.isneginf(mean_log_b)  # a weight of 0: ELBO -inf
            self.mean_log = torch.where(zero_weight, torch.full_like(merged, -math.inf), merged)
            self.m2_log = self.m2_log + m2_log_b + delta_log**2 * (n_a * n_b / n)
        self.max, self.shift = new_max, shift
        self.count += n_b
        return self

    @property
    def sum_w_squared(self) -> torch.Tensor:
        """s2 = sum w^2 / e^(2m), per datapoint."""
        return self.m2_w + self.sum_w**2 / self.count

    def result(self) -> ImportanceStats:
        """ELBO, its standard error, IWAE-K, its delta-method standard error and the ESS."""
        if self.count == 0:
            raise ValueError("no log weights were added")
        k = self.count
        mean_w = self.sum_w / k
        iwae = self.shift + torch.log(mean_w)
        ess = self.sum_w**2 / self.sum_w_squared
        if k > 1:
            elbo_se = torch.sqrt(self.m2_log.clamp_min(0) / (k - 1)) / math.sqrt(k)
            iwae_se = torch.sqrt(self.m2_w.clamp_min(0) / (k - 1)) / (math.sqrt(k) * mean_w)
        else:
            elbo_se = torch.full_like(iwae, float("nan"))
            iwae_se = torch.full_like(iwae, float("nan"))
        return ImportanceStats(self.mean_log, elbo_se, iwae, iwae_se, ess, k)


def _chunk_weights(x, y, *, streams=None, model, guide, num_particles: int, proposal: str, nesting: int):
    """log w of one chunk of particles  # [num_particles, batch] (the same call as its compiled twin's)."""
    with seeded_from(streams):
        return traces.log_weights(model, guide, x, y, num_particles=num_particles, proposal=proposal, nesting=nesting)


@torch.no_grad()
def streaming_estimates(model, guide, x, y=None, *, k: int = 100, chunk_size: int | None = 1000,
                        proposal: str = "guide", generator=None) -> tuple[Estimate, Estimate]:
    """ELBO and IWAE-k for one batch of data from the same k particles, ``chunk_size`` at a time.

    Never holds more than ``[chunk_size, batch]`` log weights, so k may be as
    large as patience allows. ``proposal`` is that of :func:`ppl_genmodels.traces.log_weights`;
    for ``"mixture"`` chunks hold an even number of particles, so every chunk
    (and the whole) draws half its particles from the guide and half from the prior.
    ``generator``: None (torch's global generator), a ``torch.Generator``, or per-datapoint
    streams for the rows of ``x`` (particle j of a datapoint is then particle j of its
    stream, whatever the chunks: ``particle_offset`` advances chunk by chunk).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if proposal not in traces.PROPOSALS:
        raise ValueError(f"unknown proposal {proposal!r}; expected one of {', '.join(traces.PROPOSALS)}")
    start = time.perf_counter()
    chunk = k if chunk_size is None else max(1, min(int(chunk_size), k))
    if proposal == "mixture" and chunk % 2 and chunk < k:
        chunk += 1
    nesting = traces.max_plate_nesting(model, guide, x, y)
    acc = ImportanceAccumulator()
    streams = is_streams(generator)
    chunk_weights = static_path(_chunk_weights, model, "log-weights of a particle chunk") or _chunk_weights
    with seeded_from(None if streams else generator):  # a torch.Generator: one seed for every chunk
        done = 0
        while done < k:
            size = min(chunk, k - done)
            if streams:
                generator.particle_offset = done  # this chunk's particles are done .. done + size - 1
            acc.update(chunk_weights(x, y, streams=generator if streams else None, model=model, guide=guide,
                                     num_particles=size, proposal=proposal, nesting=nesting))
            done += size
    stats = acc.result()
    seconds = time.perf_counter() - start
    return (Estimate("elbo", stats.elbo, stats.elbo_se, None, seconds),
            Estimate(f"iwae{k}", stats.iwae, stats.iwae_se, stats.ess, seconds))


def _cat(parts: list[Estimate], seconds: float) -> Estimate:
    ess = None if parts[0].ess is None else torch.cat([p.ess for p in parts])
    return Estimate(parts[0].estimator, torch.cat([p.value for p in parts]), torch.cat([p.stderr for p in parts]),
                    ess, seconds)


def _kept(estimate: Estimate, count: int) -> Estimate:
    """The first ``count`` datapoints of a padded pass's estimate."""
    ess = None if estimate.ess is None else estimate.ess[:count]
    return Estimate(estimate.estimator, estimate.value[:count], estimate.stderr[:count], ess, estimate.seconds)


def _passes(x, y, k: int, batch_size, rows_per_pass, streams):
    """``(x, y, chunk, generator, kept)`` of each pass: padded passes under streams, else the plain layout."""
    n = x.shape[0]
    if streams is not None:
        for begin, stop, rows in padded_passes(n, pass_size(particle_chunk(k), rows_per_pass=rows_per_pass,
                                                            batch_size=batch_size)):
            rows = rows.to(x.device)
            yield (x[rows], None if y is None else y[rows], particle_chunk(k),
                   streams.subset(rows.to(streams.index.device)), stop - begin)
        return
    rows = ROWS_PER_PASS if rows_per_pass is None else rows_per_pass
    batch = batch_size or max(1, min(n, rows // min(k, rows)))
    chunk = max(1, rows // batch)
    for begin in range(0, n, batch):
        xb = x[begin : begin + batch]
        yield xb, None if y is None else y[begin : begin + batch], chunk, None, xb.shape[0]


@torch.no_grad()
def batched_estimates(model, guide, x, y=None, *, k: int = 100, batch_size: int | None = None,
                      rows_per_pass: int | None = None, proposal: str = "guide", progress: bool = False,
                      desc: str | None = None, generator=None) -> tuple[Estimate, Estimate]:
    """ELBO and IWAE-k for every datapoint of ``x``, in passes of at most ``rows_per_pass`` particle rows.

    Each pass takes ``batch_size`` datapoints (default: as many as fit ``rows_per_pass``,
    default :data:`ROWS_PER_PASS`, with one particle each) and streams their k particles
    through :func:`streaming_estimates` in chunks that fill the pass. ``seconds`` of the
    results is the time spent estimating (progress bars excluded).

    ``generator``: None or a ``torch.Generator`` (drawn from in that order, pass after pass),
    or per-datapoint streams for the rows of ``x``; then the layout is the fixed one of the
    module docstring (chunks of :func:`particle_chunk`, passes of :func:`pass_size` datapoints,
    a multiple of :data:`PAD`: ``batch_size`` is rounded up to one) and each datapoint's
    estimate is the same bits whatever ``batch_size``, ``rows_per_pass`` or the other rows of ``x``.
    """
    streams = generator if is_streams(generator) else None
    n = x.shape[0]
    elbos, iwaes, seconds = [], [], 0.0
    with tqdm(total=n, desc=desc or f"iwae{k}", unit="pt", disable=not progress, leave=False) as bar, \
            seeded_from(None if streams is not None else generator):
        for xb, yb, chunk, sub, kept in _passes(x, y, k, batch_size, rows_per_pass, streams):
            elbo, iwae = streaming_estimates(model, guide, xb, yb, k=k, chunk_size=chunk, proposal=proposal,
                                             generator=sub)
            if sub is not None and not sub.exact:
                streams.exact = False
            elbos.append(_kept(elbo, kept))
            iwaes.append(_kept(iwae, kept))
            seconds += elbo.seconds
            bar.update(kept)
    return _cat(elbos, seconds), _cat(iwaes, seconds)
