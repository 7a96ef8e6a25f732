"""Evaluating a trained run: per-datapoint estimates of log p(x) with error bars, and BDMC bounds.

``evaluate_run`` estimates log p(x) (or log p(x | y) for a conditional model)
for every datapoint of a split with a list of estimators, each with its
per-datapoint Monte Carlo standard error:

- ``elbo[:K]`` and ``iwae[:K]``: the ELBO and the IWAE-K bound from K particles
  of a proposal (the guide by default), streamed over chunks of particles
  (:mod:`ppl_genmodels.inference.importance`);
- ``ais[:T]``: annealed importance sampling with T steps and ``chains`` chains
  per datapoint (:mod:`ppl_genmodels.inference.ais`);
- ``exact``: the model's closed form ``exact_log_marginal``, added by itself
  when the model has one.

``bdmc_run`` simulates data from the run's model and sandwiches log p(x) of
each simulated point between forward (lower) and reverse (upper) AIS
(Grosse et al. 2015); the gap bounds the error of AIS with that many steps.

The dataset-level standard error in the summaries is the standard deviation of
the per-datapoint values over sqrt(n): the error of the average over the
evaluated points, which includes the Monte Carlo noise.

``log_density_grid`` evaluates the IWAE-k estimate of log p(x) on a grid of
2-D points, which draws the learned density of a model trained on a 2-D
manifold (:func:`ppl_genmodels.plots.plot_run` shows it).

Random streams. Every Monte Carlo draw for the datapoint at position i of the
evaluated ones (0 .. n-1, the same in every process) comes from its own stream
``Streams(seed, i, "evaluate/<estimator>")`` (:mod:`ppl_genmodels.streams`; an elbo
and an iwae of the same K share ``evaluate/iwae<K>``), and every vectorized pass
holds a multiple of :data:`~ppl_genmodels.inference.importance.PAD` datapoints with
particles in chunks that depend on K alone (see :mod:`ppl_genmodels.inference.importance`).
So a datapoint's estimates are the same bits whatever ``batch_size`` and however
many processes share the work (measured on the CPU; on CUDA the kernels a matrix
product uses may change with its size). ``bdmc_run`` simulates datapoint i from
``Streams(seed, i, "bdmc/simulate")``.

Several processes. Started by ``torchrun`` (or ``--processes``), each process
evaluates its contiguous block of the datapoints (:func:`ppl_genmodels.distributed.shard`),
rank 0 gathers the per-datapoint values, builds the tables and writes the files, and
every process returns the same tables. ``seconds`` in a summary is then the slowest
process's time for that estimator.

Memory. On the CPU a pass holds about :data:`~ppl_genmodels.inference.importance.ROWS_PER_PASS`
particle rows. On CUDA the rows per pass come from the free device memory
(``torch.cuda.mem_get_info``): :data:`MEMORY_FRACTION` of it, divided by the bytes
one particle row took in a probe pass of ``PAD`` datapoints x :data:`PROBE_PARTICLES`
particles (the peak of ``torch.cuda.max_memory_allocated``); an AIS row, which keeps
the graph of both densities for its gradient, counts as :data:`AIS_ROW_COST` rows.
That changes only how many datapoints share a pass, never the results.

Tables are built from the estimators' results by :mod:`ppl_genmodels.tables`
and written by the run (:meth:`~ppl_genmodels.runs.Run.write_result_set`): each
call into its own result set, ``RUN_DIR/evaluation/<name>/`` or ``RUN_DIR/bdmc/<name>/``,
listed in ``RUN_DIR/results.csv``. The default name says what defines the result
(:func:`evaluation_name`, :func:`bdmc_name`); a set is never overwritten.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from ppl_genmodels import distributed, tables
from ppl_genmodels.config import COMPILE_CHOICES, compiles
from ppl_genmodels.data import Split
from ppl_genmodels.inference import ais as ais_module
from ppl_genmodels.inference.importance import (PAD, ROWS_PER_PASS, Estimate, batched_estimates, padded_passes,
                                                pass_size)
from ppl_genmodels.runs import as_run, writer
from ppl_genmodels.streams import Streams
from ppl_genmodels.traces import (DATA_PLATE, PARTICLE_PLATE, PROPOSALS, STARTS, log_mean_exp, log_weights,
                                  max_plate_nesting, plate_dims, seeded_from)

__all__ = [
    "EstimatorSpec",
    "parse_estimators",
    "evaluate_run",
    "evaluate",
    "evaluation_name",
    "bdmc_run",
    "bdmc_name",
    "log_density_grid",
    "ActiveUnits",
    "active_units",
]

#: chains x datapoints per AIS batch (each HMC step back-propagates through them); on a 2-core CPU, AIS on the
#: MNIST VAE 784-400-50 with 16 chains took 7.2 ms a datapoint in batches of 4096 rows, 7.8 in batches of 8192
_AIS_ROWS = 4_096
#: the share of the free CUDA memory that one evaluation pass may fill
MEMORY_FRACTION = 0.5
#: particles per datapoint of the probe pass that measures the memory of one particle row (CUDA)
PROBE_PARTICLES = 64
#: what one AIS row (a chain of a datapoint, its graph kept for the gradient) costs in importance rows
AIS_ROW_COST = 4

DEFAULT_ESTIMATORS = "elbo,iwae:100"
DEFAULT_PARTICLES = 100
DEFAULT_AIS_STEPS = 1000


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator of a spec: its kind and size (particles for elbo/iwae, annealing steps for ais)."""

    kind: str               # "elbo", "iwae", "ais" or "exact"
    size: int | None = None

    @property
    def name(self) -> str:
        """The canonical name, also the column name: ``elbo``, ``iwae5000``, ``ais1000``, ``exact``."""
        return self.kind if self.kind in ("elbo", "exact") else f"{self.kind}{self.size}"


_TOKEN = re.compile(r"^(elbo|iwae|ais|exact)(?::(.*)|(\d+))?$")


def parse_estimators(spec) -> list[EstimatorSpec]:
    """Parse ``"elbo,iwae:5000,ais:1000"`` (or a list of such items) into estimator specs.

    Grammar: comma-separated items ``elbo[:K]``, ``iwae[:K]``, ``ais[:T]``, ``exact``;
    the canonical names (``iwae5000``, ``ais1000``) are accepted too. An ``elbo``
    without K shares the particles of the first ``iwae`` (it costs nothing there),
    else uses 100. Raises ``ValueError`` with a one-line message on anything else.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if not items or all(not str(item).strip() for item in items):
        raise ValueError("no estimators given; expected e.g. elbo,iwae:100,ais:1000")
    parsed: list[tuple[str, int | None]] = []
    for item in items:
        text = str(item).strip().lower()
        if not text:
            raise ValueError(f"empty estimator in {spec!r}; expected comma-separated elbo[:K], iwae[:K], ais[:T], exact")
        match = _TOKEN.match(text)
        if match is None:
            word = text.partition(":")[0]
            raise ValueError(f"unknown estimator {word!r} in {spec!r}; expected elbo[:K], iwae[:K], ais[:T] or exact")
        kind, number = match.group(1), match.group(2) if match.group(2) is not None else match.group(3)
        if kind == "exact":
            if number is not None:
                raise ValueError(f"estimator {text!r}: exact takes no number")
            parsed.append((kind, None))
            continue
        if number is None:
            parsed.append((kind, None))
            continue
        if not re.fullmatch(r"[+-]?\d+", number.strip()):
            raise ValueError(f"estimator {text!r}: expected an integer after ':', got {number!r}")
        value = int(number)
        if value < 1:
            what = "the number of annealing steps" if kind == "ais" else "the number of particles k"
            raise ValueError(f"estimator {text!r}: {what} must be >= 1, got {value}")
        parsed.append((kind, value))
    first_iwae = next((size or DEFAULT_PARTICLES for kind, size in parsed if kind == "iwae"), DEFAULT_PARTICLES)
    defaults = {"elbo": first_iwae, "iwae": DEFAULT_PARTICLES, "ais": DEFAULT_AIS_STEPS, "exact": None}
    specs = [EstimatorSpec(kind, size if size is not None else defaults[kind]) for kind, size in parsed]
    seen = set()
    for est in specs:
        if est.name in seen:
            raise ValueError(f"estimator {est.name} is given twice in {spec!r}")
        seen.add(est.name)
    return specs


def _has_exact(model) -> bool:
    return callable(getattr(model, "exact_log_marginal", None))


def _batches(part: Split, total: int, batch_size: int):
    for start in range(0, total, batch_size):
        stop = min(total, start + batch_size)
        yield part.x[start:stop], None if part.y is None else part.y[start:stop]


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class _Points:
    """The datapoints this process evaluates: positions ``start .. start + len - 1`` of the evaluated ones."""

    x: torch.Tensor
    y: torch.Tensor | None
    start: int
    seed: int
    purpose: str = "evaluate"

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def streams(self, name: str) -> Streams:
        """Each datapoint's stream for the estimator ``name``, keyed by its position among the evaluated ones."""
        index = torch.arange(self.start, self.start + len(self), device=self.x.device)
        return Streams(self.seed, index, f"{self.purpose}/{name}", device=self.x.device)

    def passes(self, size: int):
        """``(x, y, rows, kept)`` of each pass of ``size`` datapoints, padded to a multiple of PAD."""
        for begin, stop, rows in padded_passes(len(self), size):
            rows = rows.to(self.x.device)
            yield self.x[rows], None if self.y is None else self.y[rows], rows, stop - begin


def _head(columns: dict[str, np.ndarray], kept: int) -> dict[str, np.ndarray]:
    """The first ``kept`` rows of a padded pass's columns."""
    return {key: value[:kept] for key, value in columns.items()}


def _warn_inexact(streams: Streams, what: str) -> None:
    if not streams.exact:
        warnings.warn(f"{what}: some draws could not come from the datapoints' own streams (a random function the "
                      "streams do not route, e.g. torch.multinomial for a discrete latent); these estimates depend "
                      "on the batch layout and the number of processes", RuntimeWarning, stacklevel=3)


@torch.no_grad()
def _device_rows(program, x: torch.Tensor, y: torch.Tensor | None) -> int | None:
    """Particle rows per importance pass: None (``ROWS_PER_PASS``) off CUDA; on CUDA what the free memory holds.

    :data:`MEMORY_FRACTION` of ``torch.cuda.mem_get_info()``'s free memory, divided by the bytes
    per particle row measured on one probe pass of PAD datapoints x :data:`PROBE_PARTICLES` particles
    (its peak allocation); never fewer than ``ROWS_PER_PASS``.
    """
    if x.device.type != "cuda" or x.shape[0] == 0:
        return None
    rows = torch.arange(PAD, device=x.device).clamp_max(x.shape[0] - 1)
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    log_weights(program.model, program.guide, x[rows], None if y is None else y[rows], num_particles=PROBE_PARTICLES)
    per_row = max(1, torch.cuda.max_memory_allocated(x.device) - before) / (PAD * PROBE_PARTICLES)
    free, _ = torch.cuda.mem_get_info(x.device)
    return max(ROWS_PER_PASS, int(MEMORY_FRACTION * free / per_row))


def _ais_rows(rows: int | None) -> int:
    """Chain rows per AIS pass: ``_AIS_ROWS`` on the CPU, more when a device holds more importance rows."""
    return _AIS_ROWS if rows is None else max(_AIS_ROWS, rows // AIS_ROW_COST)


def _importance_columns(model, points: _Points, k, want_elbo, *, batch_size, rows, proposal, progress, split):
    """ELBO and IWAE-k columns, by estimator name, from one stream of k particles per datapoint; and seconds."""
    label = ("elbo, " if want_elbo else "") + f"iwae{k}"
    streams = points.streams(f"iwae{k}")
    elbo, iwae = batched_estimates(model.model, model.guide, points.x, points.y, k=k, batch_size=batch_size,
                                   rows_per_pass=rows, proposal=proposal, progress=progress,
                                   desc=f"{label} ({split})", generator=streams)
    _warn_inexact(streams, label)
    return {"elbo": tables.columns(elbo, "elbo"), f"iwae{k}": tables.columns(iwae, f"iwae{k}")}, elbo.seconds


@torch.no_grad()
def _exact_columns(model, points: _Points, *, batch_size, rows, progress, split):
    size = pass_size(1, rows_per_pass=rows, batch_size=batch_size)
    parts, seconds = [], 0.0
    with tqdm(total=len(points), desc=f"exact ({split})", unit="pt", disable=not progress, leave=False) as bar:
        for x, y, _, kept in points.passes(size):
            began = time.perf_counter()
            value = model.exact_log_marginal(x) if y is None else model.exact_log_marginal(x, y)
            seconds += time.perf_counter() - began
            parts.append(_head(tables.columns(Estimate("exact", value, torch.zeros_like(value)), "exact"), kept))
            bar.update(kept)
    return tables.concat(parts), seconds


def _ais_columns(model, points: _Points, steps, *, chains, start, batch_size, rows, progress, split):
    size = pass_size(chains, rows_per_pass=_ais_rows(rows), batch_size=batch_size)
    name, parts, seconds = f"ais{steps}", [], 0.0
    streams = points.streams(name)
    with tqdm(total=len(points), desc=f"{name} ({split})", unit="pt", disable=not progress, leave=False) as bar:
        for x, y, index, kept in points.passes(size):
            generator = streams.subset(index)
            with torch.enable_grad():
                result = ais_module.ais(model.model, model.guide, x, y, num_steps=steps, num_chains=chains,
                                        start=start, generator=generator, progress=progress)
            _warn_inexact(generator, name)
            seconds += result.seconds
            parts.append(_head(tables.columns(result, name), kept))
            bar.update(kept)
    return tables.concat(parts), seconds


def _check_choices(*, ais_start: str, proposal: str, compile: str | None) -> None:
    """One-line errors for an unknown AIS start, proposal or compile setting."""
    if compile is not None and compile not in COMPILE_CHOICES:
        raise ValueError(f"unknown compile setting {compile!r}; choose one of {', '.join(COMPILE_CHOICES)}")
    if ais_start not in STARTS:
        raise ValueError(f"unknown AIS initial distribution {ais_start!r}; expected one of {', '.join(STARTS)}")
    if proposal not in PROPOSALS:
        raise ValueError(f"unknown proposal {proposal!r}; expected one of {', '.join(PROPOSALS)}")


def _compile_for(run, rows: int, setting: str | None) -> None:
    """Mark the run's program for the compiled hot paths where ``setting`` (default: the run's) says so."""
    setting = getattr(run.config, "compile", "off") if setting is None else setting
    program = run.program
    program.accelerate(precision=program.acceleration["precision"], compile=compiles(setting, run.device, 0, rows=rows))


def _passes_per_datapoint(spec: EstimatorSpec, chains: int) -> int:
    """Model passes an estimator makes per datapoint: k particles, or steps x chains x the AIS leapfrog steps."""
    if spec.kind in ("elbo", "iwae"):
        return spec.size or 0
    if spec.kind == "ais":
        return spec.size * chains * ais_module.NUM_LEAPFROG  # the leapfrog steps AIS runs
    return 0


def _resolve_estimators(model, estimators, k) -> list[EstimatorSpec]:
    """The estimator specs to run: from ``estimators`` or ``k``, plus ``exact`` where the model has one."""
    if k is not None:
        if estimators is not None:
            raise ValueError("give estimators or k, not both")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        estimators = f"elbo,iwae:{k}"
    specs = parse_estimators(DEFAULT_ESTIMATORS if estimators is None else estimators)
    names = [s.name for s in specs]
    if model is not None and "exact" in names and not _has_exact(model):
        raise ValueError(f"estimator exact needs a model with exact_log_marginal; {type(getattr(model, 'module', model)).__name__} has none")
    if model is not None and "exact" not in names and _has_exact(model):
        specs.append(EstimatorSpec("exact"))
    return specs


def _estimate(model, points: _Points, specs, *, batch_size, chains, ais_start, proposal, progress, split):
    """Each estimator's per-datapoint columns and seconds, by name; an elbo and an iwae of the same K share a pass."""
    columns: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    if len(points) == 0:  # an empty shard: nothing to compute, but the collectives still need this process
        return columns, seconds
    common = dict(batch_size=batch_size, rows=_device_rows(model, points.x, points.y), progress=progress, split=split)
    for spec in specs:
        if spec.name in seconds:
            continue
        if spec.kind in ("elbo", "iwae"):
            members = [s for s in specs if s.kind in ("elbo", "iwae") and s.size == spec.size]
            want_elbo = any(m.kind == "elbo" for m in members)
            cols, took = _importance_columns(model, points, spec.size, want_elbo, proposal=proposal, **common)
            for member in members:
                columns[member.name] = cols["elbo" if member.kind == "elbo" else member.name]
                seconds[member.name] = took
        elif spec.kind == "exact":
            columns["exact"], seconds["exact"] = _exact_columns(model, points, **common)
        else:
            columns[spec.name], seconds[spec.name] = _ais_columns(model, points, spec.size, chains=chains,
                                                                  start=ais_start, **common)
    return columns, seconds


def _merge(parts: list) -> tuple[list, dict[str, float]]:
    """The ``columns`` of every process that had datapoints, in rank order (which is datapoint order), and
    per estimator the slowest process's seconds."""
    parts = [(columns, seconds) for columns, seconds in parts if seconds]
    return [c for c, _ in parts], {name: max(s[name] for _, s in parts) for name in parts[0][1]}


def evaluation_name(*, estimators=None, k: int | None = None, split: str = "test", n: int | None = None,
                    ais_start: str = "prior", proposal: str = "guide") -> str:
    """The default name of an evaluation's result set, from the options that define the result.

    ``<split>-<n<N> or all>-<estimators>``, each estimator as its canonical name in the
    order given (``elbo``, ``iwae100``, ``ais1000``, ``exact``; an elbo with its own K
    as ``elbo<K>``), then ``-prior`` or ``-mixture`` when elbo/iwae use that proposal and
    ``-guidestart`` when AIS starts from the guide: ``test-n20-elbo-iwae100``.
    """
    specs = _resolve_estimators(None, estimators, k)
    shared = next((s.size for s in specs if s.kind == "iwae"), DEFAULT_PARTICLES)  # an elbo without K has it
    words = [split, "all" if n is None else f"n{n}"]
    words += [f"elbo{s.size}" if s.kind == "elbo" and s.size != shared else s.name for s in specs]
    if proposal != "guide" and any(s.kind in ("elbo", "iwae") for s in specs):
        words.append(proposal)
    if ais_start != "prior" and any(s.kind == "ais" for s in specs):
        words.append(f"{ais_start}start")
    return "-".join(words)


@writer("evaluate")
def evaluate_run(run, *, estimators=None, k: int | None = None, split: str = "test", n: int | None = None,
                 batch_size: int | None = None, chains: int = 16, ais_start: str = "prior", proposal: str = "guide",
                 seed: int = 0, progress: bool = True, save: bool = True, name: str | None = None,
                 compile: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Estimate log p(x) per datapoint of ``split`` with each estimator; returns ``(summary, per_datapoint)``.

    Args:
        run: a :class:`~ppl_genmodels.runs.Run` or a run directory.
        estimators: a spec such as ``"elbo,iwae:5000,ais:1000"`` (see :func:`parse_estimators`);
            default ``"elbo,iwae:100"``. ``exact`` is added when the model has ``exact_log_marginal``.
        k: shorthand for ``estimators=f"elbo,iwae:{k}"`` (not with ``estimators``).
        split, n: the split and how many of its first datapoints (default all).
        batch_size: datapoints per pass (default: sized to bound memory), rounded up to a multiple of
            ``PAD`` (32); the results do not depend on it.
        chains, ais_start: AIS chains per datapoint and initial distribution (``prior`` or ``guide``).
        proposal: for elbo/iwae, ``guide``, ``prior`` or ``mixture`` (see ``traces.log_weights``).
        seed: the seed of every datapoint's random streams (see the module docstring).
        progress: tqdm bars while estimating (rank 0's); save: write the CSVs.
        name: the result set's name (letters, digits, ``-``, ``_``, ``.``); one that exists is
            refused. Default: :func:`evaluation_name` of the options, with ``-2``, ``-3``, ...
            appended when a set of that name exists.
        compile: ``auto``, ``on`` or ``off`` (default: the run's ``--compile``): run the particle
            chunks and AIS's log-joint as compiled graphs (``ppl_genmodels.compiled``); ``auto``
            compiles evaluations of at least ``config.COMPILE_MIN_ROWS`` model passes.

    ``per_datapoint`` has ``index`` (row in the split's source), then per estimator
    ``<name>`` and ``<name>_se`` (Monte Carlo standard error), ``<name>_ess`` for iwae and
    ais, ``<name>_accept`` (mean HMC acceptance) for ais. ``summary`` has one row per
    estimator: ``estimator, mean, stderr, n, seconds`` (stderr: sd over datapoints / sqrt(n);
    seconds: the estimator's time, the slowest process's in a multi-process job).
    An elbo and an iwae with the same K share their particles (and their seconds).
    When ``save``, writes ``summary.csv`` and ``per_datapoint.csv`` into the new result set
    ``RUN_DIR/evaluation/<name>/`` and adds its row to ``RUN_DIR/results.csv``; earlier
    sets are kept. Every argument (the name included) is checked before any estimate is made.
    Under ``torchrun`` each process evaluates its block of the datapoints; rank 0 writes, and
    every process returns the same tables.
    """
    began = time.perf_counter()
    default_name = evaluation_name(estimators=estimators, k=k, split=split, n=n, ais_start=ais_start,
                                   proposal=proposal)  # a bad spec fails here, before the run is loaded
    _check_positive(n=n, batch_size=batch_size, chains=chains)
    _check_choices(ais_start=ais_start, proposal=proposal, compile=compile)
    run = as_run(run)
    distributed.setup(run.device)
    model = run.program
    model.eval()
    specs = _resolve_estimators(model, estimators, k)
    part = run.data.split(split)
    total = len(part.x) if n is None else min(n, len(part.x))
    if total < 1:
        raise ValueError(f"nothing to evaluate: split {split!r} has {len(part.x)} datapoints")
    _compile_for(run, total * sum(_passes_per_datapoint(spec, chains) for spec in specs), compile)
    if save:
        name = distributed.agree(lambda: run.new_result_name("evaluation", name, default=default_name))
    start, stop = distributed.shard(total)
    points = _Points(part.x[start:stop], None if part.y is None else part.y[start:stop], start, int(seed))
    parts = distributed.gather(_estimate(model, points, specs, batch_size=batch_size, chains=chains,
                                         ais_start=ais_start, proposal=proposal,
                                         progress=progress and distributed.is_main(), split=split))

    def finish():  # rank 0: the tables of every datapoint, written once
        pieces, seconds = _merge(parts)
        columns = {s.name: tables.concat([piece[s.name] for piece in pieces]) for s in specs}
        per_datapoint = pd.DataFrame({"index": part.index[:total].cpu().numpy(),
                                      **{key: value for s in specs for key, value in columns[s.name].items()}})
        summary = pd.DataFrame([tables.summary_row(s.name, columns[s.name][s.name], seconds[s.name])
                                for s in specs], columns=tables.SUMMARY_COLUMNS)
        if save:
            options = dict(estimators=[s.kind if s.size is None else f"{s.kind}:{s.size}" for s in specs],
                           split=split, n=n, batch_size=batch_size, chains=chains, ais_start=ais_start,
                           proposal=proposal, seed=int(seed))
            run.write_result_set("evaluation", name, {"summary.csv": summary, "per_datapoint.csv": per_datapoint},
                                 seconds=time.perf_counter() - began, options=options)
        return summary, per_datapoint

    return distributed.agree(finish)


evaluate = evaluate_run


def _take(value: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """The rows ``rows`` of a per-datapoint tensor ``[n, ...]`` (a broadcast one stays whole)."""
    return value[rows.to(value.device)] if value.dim() > 0 and value.shape[0] == n else value


def _simulate(run, n: int, seed: int):
    """``(x, latents, y)``: ``n`` datapoints drawn from the run's model (given the first n test y's, if any).

    Datapoint i is drawn from its own stream ``Streams(seed, i, "bdmc/simulate")``, in one pass
    padded to a multiple of PAD, so every process simulates the same datapoints.
    """
    test = run.data.test
    y = None
    if test.y is not None:
        n = min(n, len(test.y))
        y = test.y[:n]
    (_, _, rows), = padded_passes(n, n)
    rows = rows.to(test.x.device)
    template = test.x.new_zeros((len(rows),) + tuple(test.x.shape[1:]))
    streams = Streams(seed, rows, "bdmc/simulate", device=test.x.device)
    x, latents = ais_module.simulate(run.program.model, template, None if y is None else y[rows], generator=streams)
    _warn_inexact(streams, "bdmc's simulation")
    return x[:n], {key: _take(value, torch.arange(n), len(rows)) for key, value in latents.items()}, y


def bdmc_name(*, n: int = 100, num_steps: int = 1000, chains: int = 16) -> str:
    """The default name of a BDMC result set: ``n100-steps1000-chains16``."""
    return f"n{n}-steps{num_steps}-chains{chains}"


def _bdmc_columns(run, points: _Points, latents: dict, n: int, *, num_steps, chains, batch_size, progress):
    """Forward and reverse AIS columns (``lower``, ``upper`` and their ``_se``) and seconds of this process's points."""
    if len(points) == 0:
        return {}, {}
    size = pass_size(chains, rows_per_pass=_ais_rows(_device_rows(run.program, points.x, points.y)),
                     batch_size=batch_size)
    streams = points.streams("ais")
    parts, seconds = [], {"lower": 0.0, "upper": 0.0}
    began = time.perf_counter()
    with tqdm(total=len(points), desc=f"bdmc ({num_steps} steps)", unit="pt", disable=not progress,
              leave=False) as bar:
        for x, y, rows, kept in points.passes(size):
            with torch.enable_grad():
                forward, reverse = ais_module.bdmc(
                    run.program.model, run.program.guide, x,
                    {key: _take(value, rows + points.start, n) for key, value in latents.items()}, y,
                    num_steps=num_steps, num_chains=chains, generator=streams.subset(rows), progress=progress)
            parts.append(_head({**tables.value_columns(forward, "lower"), **tables.value_columns(reverse, "upper")},
                               kept))
            seconds["lower"] += forward.seconds
            seconds["upper"] += reverse.seconds
            bar.update(kept)
    seconds["gap"] = time.perf_counter() - began
    return tables.concat(parts), seconds


@writer("bdmc")
def bdmc_run(run, *, n: int = 100, num_steps: int = 1000, chains: int = 16, batch_size: int | None = None,
             seed: int = 0, progress: bool = True, save: bool = True,
             name: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bidirectional Monte Carlo on ``n`` datapoints simulated from the run's model.

    Each simulated x comes with the latent that generated it, an exact posterior
    sample; forward AIS from the prior gives a stochastic lower bound on log p(x),
    reverse AIS from that latent a stochastic upper bound (Grosse, Ghahramani &
    Adams 2015), each with ``num_steps`` steps and ``chains`` chains. The gap
    upper - lower bounds the error of AIS with that schedule on data like these.
    A conditional run simulates x given the first n y's of its test split (so
    n is at most the size of that split). ``seed``: of the per-datapoint streams of the
    simulation (``bdmc/simulate``) and of AIS (``bdmc/ais``).

    Returns ``(summary, per_datapoint)``: per_datapoint has ``index`` (0..n-1), ``lower``,
    ``lower_se``, ``upper``, ``upper_se``, ``gap``; summary one row each for lower,
    upper and gap (``estimator, mean, stderr, n, seconds``; seconds the slowest process's).
    When ``save``, writes ``summary.csv`` and ``per_datapoint.csv`` into the new result set
    ``RUN_DIR/bdmc/<name>/`` and adds its row to ``RUN_DIR/results.csv``. ``name`` as for
    :func:`evaluate_run` (default :func:`bdmc_name`, made unique; a given name that exists is
    refused before any work). Under ``torchrun`` every process simulates the same n datapoints
    and runs AIS on its block of them; rank 0 writes, and every process returns the same tables.
    """
    began = time.perf_counter()
    _check_positive(n=n, num_steps=num_steps, chains=chains, batch_size=batch_size)
    run = as_run(run)
    distributed.setup(run.device)
    if save:
        name = distributed.agree(lambda: run.new_result_name("bdmc", name, default=bdmc_name(
            n=n, num_steps=num_steps, chains=chains)))
    run.program.eval()
    x, latents, y = _simulate(run, n, int(seed))
    n = x.shape[0]
    start, stop = distributed.shard(n)
    points = _Points(x[start:stop], None if y is None else y[start:stop], start, int(seed), purpose="bdmc")
    parts = distributed.gather(_bdmc_columns(run, points, latents, n, num_steps=num_steps, chains=chains,
                                             batch_size=batch_size, progress=progress and distributed.is_main()))

    def finish():  # rank 0: the tables of every datapoint, written once
        pieces, seconds = _merge(parts)
        per_datapoint = pd.DataFrame({"index": np.arange(n), **tables.concat(pieces)})
        per_datapoint["gap"] = per_datapoint["upper"] - per_datapoint["lower"]
        summary = pd.DataFrame([tables.summary_row(key, per_datapoint[key].to_numpy(), seconds[key])
                                for key in ("lower", "upper", "gap")], columns=tables.SUMMARY_COLUMNS)
        if save:
            run.write_result_set("bdmc", name, {"summary.csv": summary, "per_datapoint.csv": per_datapoint},
                                 seconds=time.perf_counter() - began,
                                 options=dict(n=n, num_steps=num_steps, chains=chains, batch_size=batch_size,
                                              seed=int(seed)))
        return summary, per_datapoint

    return distributed.agree(finish)


@torch.no_grad()
def log_density_grid(model, points: torch.Tensor, *, grid_size: int = 80, k: int = 500, margin: float = 0.15,
                     proposal: str = "mixture"):
    """Importance-sampling estimate of log p(x) on a ``grid_size`` x ``grid_size`` grid around 2-D ``points``.

    Most grid points lie off the data, where an amortized guide was never trained
    and extrapolates badly; the default defensive ``mixture`` proposal (half guide,
    half prior; see :func:`ppl_genmodels.traces.log_weights`) keeps every weight
    below 2 p(x | z), so the picture has no spurious hot spots.

    Returns ``(grid_x [G], grid_y [G], log_p [G, G])`` with ``log_p[i, j]`` at ``(grid_x[j], grid_y[i])``.
    """
    pts = points.detach()
    lo, hi = pts.min(0).values, pts.max(0).values
    pad = (hi - lo) * margin
    lo, hi = lo - pad, hi + pad
    gx = torch.linspace(lo[0].item(), hi[0].item(), grid_size, dtype=pts.dtype, device=pts.device)
    gy = torch.linspace(lo[1].item(), hi[1].item(), grid_size, dtype=pts.dtype, device=pts.device)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)  # [G*G, 2]
    per_pass = max(1, ROWS_PER_PASS // k)
    nesting = max_plate_nesting(model.model, model.guide, grid[:1], None)  # traced once, not per pass
    out = []
    for start in range(0, grid.shape[0], per_pass):
        log_w = log_weights(model.model, model.guide, grid[start : start + per_pass], None, num_particles=k,
                            proposal=proposal, nesting=nesting)
        out.append(log_mean_exp(log_w, 0))
    return gx.cpu().numpy(), gy.cpu().numpy(), torch.cat(out).reshape(grid_size, grid_size).cpu().numpy()


#: Burda et al.'s threshold on Var_x(E_q[u | x]) above which a latent dimension u counts as active
ACTIVE_THRESHOLD = 1e-2


@dataclass
class ActiveUnits:
    """The active latent units of a guide on some datapoints (Burda, Grosse & Salakhutdinov 2016).

    ``variance``: per latent site of the guide, A_u = Var_x(E_q[u | x]) of each of its
    dimensions (the site's event, flattened in its own order) ``[dims]``, float64 on the CPU;
    ``counts``: per site, how many dimensions exceed ``threshold``; ``total``: their sum;
    ``dims``: the number of latent dimensions; ``n``: the datapoints x ran over.
    """

    variance: dict[str, torch.Tensor]
    counts: dict[str, int]
    total: int
    dims: int
    threshold: float
    n: int


def _posterior_means(site, particle_dim: int) -> torch.Tensor:
    """E_q[u | x] of one guide site, averaged over its particles: ``[batch, dims]``.

    The mean of the site's distribution where it has a finite one (exact for a guide
    site whose parameters depend on x alone; for a site that depends on other latents,
    the average of its conditional means over the particles, by the tower rule), else
    the average of the draws themselves.
    """
    fn, value = site["fn"], site["value"]
    try:
        mean = fn.mean
    except NotImplementedError:
        mean = value
    mean = (mean if torch.isfinite(mean).all() else value).expand(value.shape)
    event = len(fn.event_shape)
    mean = mean.movedim((particle_dim - event, plate_dims(site)[DATA_PLATE] - event), (0, 1))
    return mean.reshape(mean.shape[0], mean.shape[1], -1).double().mean(0)


@torch.no_grad()
def active_units(program, x: torch.Tensor, y: torch.Tensor | None = None, *, samples: int = 100,
                 threshold: float = ACTIVE_THRESHOLD, batch_size: int | None = None,
                 generator: torch.Generator | None = None) -> ActiveUnits:
    """Count the active latent units of ``program``'s guide on the datapoints ``x`` (``y``: their conditioning).

    Burda et al. (2016, section 5.2) call a latent dimension u active when
    A_u = Cov_x(E_{q(u | x)}[u]) > 10^-2: the guide's mean of u moves with x. Each
    latent site of the guide inside ``pyro.plate("data")`` is drawn ``samples`` times per
    datapoint (one vectorized pass under a particle plate, ``batch_size`` datapoints at a
    time); E_q[u | x] is the mean of the site's distribution when it has one, else the
    average of the draws (their Monte Carlo noise, of variance Var_q(u | x) / samples,
    then adds to A_u). A_u is the variance over the datapoints (divided by n) of each
    dimension. ``program`` is a model/guide pair called as ``model(x, y)`` / ``guide(x, y)``
    (a :class:`~ppl_genmodels.programs.Program` or a built-in model); ``generator`` seeds
    the draws (None: torch's global stream).
    """
    _check_positive(samples=samples, batch_size=batch_size)
    if x.shape[0] < 2:
        raise ValueError(f"active units need at least 2 datapoints, got {x.shape[0]}")
    nesting = max_plate_nesting(program.model, program.guide, x[:1], None if y is None else y[:1])
    particle_dim = -nesting - 1

    def draws(xb, yb):
        with pyro.plate(PARTICLE_PLATE, samples, dim=particle_dim):
            return program.guide(xb, yb)

    batch = batch_size or max(1, ROWS_PER_PASS // samples)
    means: dict[str, list[torch.Tensor]] = {}
    with seeded_from(generator):
        for xb, yb in _batches(Split(x, y, torch.arange(x.shape[0])), x.shape[0], batch):
            trace = poutine.trace(draws).get_trace(xb, yb)
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and not site["is_observed"] and DATA_PLATE in plate_dims(site):
                    means.setdefault(name, []).append(_posterior_means(site, particle_dim).cpu())
    if not means:
        raise ValueError(f"the guide has no latent sites inside pyro.plate({DATA_PLATE!r})")
    variance = {name: torch.cat(parts).var(0, unbiased=False) for name, parts in means.items()}
    counts = {name: int((value > threshold).sum()) for name, value in variance.items()}
    return ActiveUnits(variance, counts, sum(counts.values()), sum(v.numel() for v in variance.values()),
                       float(threshold), int(x.shape[0]))
