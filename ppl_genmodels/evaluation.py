"""Evaluating a trained run: per-datapoint log-likelihood estimates, samples and figures.

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
manifold.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ppl_genmodels import plots
from ppl_genmodels.checkpoint import atomic_write_text
from ppl_genmodels.inference.importance import streaming_estimates
from ppl_genmodels.runs import Run, load_run
from ppl_genmodels.traces import PROPOSALS, generate, log_mean_exp, log_weights, max_plate_nesting, reconstruct

__all__ = [
    "EstimatorSpec",
    "parse_estimators",
    "evaluate_run",
    "evaluate",
    "bdmc_run",
    "log_density_grid",
    "plot_run",
    "sample_run",
]

_ROWS_PER_PASS = 8_192  # particles x datapoints per vectorized pass: bounds memory whatever k is;
# 4k-16k rows keep the temporaries small enough to be reused (benchmarks/evaluate.py)
_AIS_ROWS = 16_384       # chains x datapoints per AIS batch (each HMC step back-propagates through them)

ESTIMATORS = {
    "elbo": "ELBO from K particles (default: those of the first iwae, else 100)",
    "iwae": "IWAE-K, log of the mean of K importance weights (default K 100)",
    "ais": "annealed importance sampling with T steps (default T 1000)",
    "exact": "the model's closed-form exact_log_marginal (added by itself when the model has one)",
}
DEFAULT_ESTIMATORS = "elbo,iwae:100"
DEFAULT_PARTICLES = 100
DEFAULT_AIS_STEPS = 1000
AIS_INITS = ("prior", "guide")
SUMMARY_COLUMNS = ["estimator", "mean", "stderr", "n", "seconds"]


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


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _has_exact(model) -> bool:
    return callable(getattr(model, "exact_log_marginal", None))


def _summary_row(name: str, values: np.ndarray, seconds: float) -> dict:
    n = len(values)
    stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"estimator": name, "mean": float(values.mean()), "stderr": stderr, "n": n, "seconds": seconds}


def _numpy(parts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([p.detach().cpu() for p in parts]).double().numpy()


def _batches(part, total: int, batch_size: int):
    for start in range(0, total, batch_size):
        stop = min(total, start + batch_size)
        yield part.x[start:stop], None if part.y is None else part.y[start:stop]


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _save(run: Run, files: dict[str, pd.DataFrame]) -> None:
    folder = Path(run.path) / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in files.items():
        atomic_write_text(folder / name, frame.to_csv(index=False))


@torch.no_grad()
def _importance_columns(model, part, total, k, want_elbo, *, batch_size, proposal, progress, split):
    """ELBO and IWAE-k columns from one stream of k particles per datapoint; (columns, seconds)."""
    batch = batch_size or max(1, min(total, _ROWS_PER_PASS // min(k, _ROWS_PER_PASS)))
    chunk = max(1, _ROWS_PER_PASS // batch)
    name = f"iwae{k}"
    parts: dict[str, list] = {key: [] for key in ("elbo", "elbo_se", name, f"{name}_se", f"{name}_ess")}
    seconds = 0.0
    label = ("elbo, " if want_elbo else "") + name
    with tqdm(total=total, desc=f"{label} ({split})", unit="pt", disable=not progress, leave=False) as bar:
        for x, y in _batches(part, total, batch):
            began = time.perf_counter()
            elbo, iw = streaming_estimates(model.model, model.guide, x, y, k=k, chunk_size=chunk, proposal=proposal)
            seconds += time.perf_counter() - began
            for key, value in zip(parts, (elbo.value, elbo.stderr, iw.value, iw.stderr, iw.ess)):
                parts[key].append(value)
            bar.update(x.shape[0])
    return {key: _numpy(value) for key, value in parts.items()}, seconds


@torch.no_grad()
def _exact_columns(model, part, total, *, batch_size, progress, split):
    batch = batch_size or min(total, _ROWS_PER_PASS)
    values, seconds = [], 0.0
    with tqdm(total=total, desc=f"exact ({split})", unit="pt", disable=not progress, leave=False) as bar:
        for x, y in _batches(part, total, batch):
            began = time.perf_counter()
            values.append(model.exact_log_marginal(x) if y is None else model.exact_log_marginal(x, y))
            seconds += time.perf_counter() - began
            bar.update(x.shape[0])
    exact = _numpy(values)
    return {"exact": exact, "exact_se": np.zeros_like(exact)}, seconds


def _ais_columns(model, part, total, steps, *, chains, init, batch_size, progress, split):
    from ppl_genmodels.inference import ais as ais_module

    batch = batch_size or max(1, min(total, _AIS_ROWS // chains))
    name = f"ais{steps}"
    parts: dict[str, list] = {key: [] for key in (name, f"{name}_se", f"{name}_ess", f"{name}_accept")}
    seconds = 0.0
    with tqdm(total=total, desc=f"{name} ({split})", unit="pt", disable=not progress, leave=False) as bar:
        for x, y in _batches(part, total, batch):
            began = time.perf_counter()
            with torch.enable_grad():
                result = ais_module.ais(model.model, model.guide, x, y, num_steps=steps, num_chains=chains, init=init,
                                        progress=progress)
            seconds += time.perf_counter() - began
            for key, value in zip(parts, (result.log_z, result.stderr, result.ess, result.acceptance)):
                parts[key].append(value)
            bar.update(x.shape[0])
    return {key: _numpy(value) for key, value in parts.items()}, seconds


def evaluate_run(run, *, estimators=None, k: int | None = None, split: str = "test", n: int | None = None,
                 batch_size: int | None = None, chains: int = 16, ais_init: str = "prior", proposal: str = "guide",
                 progress: bool = True, save: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Estimate log p(x) per datapoint of ``split`` with each estimator; returns ``(summary, per_datapoint)``.

    Args:
        run: a :class:`~ppl_genmodels.runs.Run` or a run directory.
        estimators: a spec such as ``"elbo,iwae:5000,ais:1000"`` (see :func:`parse_estimators`);
            default ``"elbo,iwae:100"``. ``exact`` is added when the model has ``exact_log_marginal``.
        k: shorthand for ``estimators=f"elbo,iwae:{k}"`` (not with ``estimators``).
        split, n: the split and how many of its first datapoints (default all).
        batch_size: datapoints per pass (default: sized to bound memory).
        chains, ais_init: AIS chains per datapoint and initial distribution (``prior`` or ``guide``).
        proposal: for elbo/iwae, ``guide``, ``prior`` or ``mixture`` (see ``traces.log_weights``).
        progress: tqdm bars while estimating; save: write the CSVs.

    ``per_datapoint`` has ``index`` (row in the split's source), then per estimator
    ``<name>`` and ``<name>_se`` (Monte Carlo standard error), ``<name>_ess`` for iwae and
    ais, ``<name>_accept`` (mean HMC acceptance) for ais. ``summary`` has one row per
    estimator: ``estimator, mean, stderr, n, seconds`` (stderr: sd over datapoints / sqrt(n)).
    An elbo and an iwae with the same K share their particles (and their seconds).
    Writes ``RUN_DIR/evaluation/summary.csv`` and ``per_datapoint.csv`` when ``save``.
    Every argument is checked before any estimate is made.
    """
    if k is not None:
        if estimators is not None:
            raise ValueError("give estimators or k, not both")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        estimators = f"elbo,iwae:{k}"
    specs = parse_estimators(DEFAULT_ESTIMATORS if estimators is None else estimators)
    _check_positive(n=n, batch_size=batch_size, chains=chains)
    if ais_init not in AIS_INITS:
        raise ValueError(f"unknown AIS initial distribution {ais_init!r}; expected one of {', '.join(AIS_INITS)}")
    if proposal not in PROPOSALS:
        raise ValueError(f"unknown proposal {proposal!r}; expected one of {', '.join(PROPOSALS)}")
    run = _as_run(run)
    model = run.model
    model.eval()
    names = [s.name for s in specs]
    if "exact" in names and not _has_exact(model):
        raise ValueError(f"estimator exact needs a model with exact_log_marginal; {type(model).__name__} has none")
    if "exact" not in names and _has_exact(model):
        specs.append(EstimatorSpec("exact"))
    if any(s.kind == "ais" for s in specs):
        from ppl_genmodels.inference import ais as _  # noqa: F401  (fail on a missing module before any work)
    part = run.data.split(split)
    total = len(part.x) if n is None else min(n, len(part.x))
    if total < 1:
        raise ValueError(f"nothing to evaluate: split {split!r} has {len(part.x)} datapoints")

    columns: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    passes: dict[int, list[EstimatorSpec]] = {}  # particles -> the elbo/iwae estimators sharing them
    for spec in specs:
        if spec.kind in ("elbo", "iwae"):
            passes.setdefault(spec.size, []).append(spec)
    common = dict(batch_size=batch_size, progress=progress, split=split)
    for spec in specs:
        if spec.kind in ("elbo", "iwae"):
            if spec.name in seconds:
                continue
            members = passes[spec.size]
            want_elbo = any(m.kind == "elbo" for m in members)
            cols, took = _importance_columns(model, part, total, spec.size, want_elbo, proposal=proposal, **common)
            for member in members:
                key = "elbo" if member.kind == "elbo" else f"iwae{spec.size}"
                suffixes = ("", "_se") if member.kind == "elbo" else ("", "_se", "_ess")
                columns.update({member.name + sfx: cols[key + sfx] for sfx in suffixes})
                seconds[member.name] = took
        elif spec.kind == "exact":
            cols, seconds["exact"] = _exact_columns(model, part, total, **common)
            columns.update(cols)
        elif spec.kind == "ais":
            cols, seconds[spec.name] = _ais_columns(model, part, total, spec.size, chains=chains, init=ais_init, **common)
            columns.update(cols)

    per_datapoint = pd.DataFrame({"index": part.index[:total].cpu().numpy()})
    for spec in specs:
        suffixes = {"iwae": ("", "_se", "_ess"), "ais": ("", "_se", "_ess", "_accept")}.get(spec.kind, ("", "_se"))
        for suffix in suffixes:
            per_datapoint[spec.name + suffix] = columns[spec.name + suffix]
    summary = pd.DataFrame([_summary_row(s.name, columns[s.name], seconds[s.name]) for s in specs],
                           columns=SUMMARY_COLUMNS)
    if save:
        _save(run, {"summary.csv": summary, "per_datapoint.csv": per_datapoint})
    return summary, per_datapoint


evaluate = evaluate_run


def _take(value: torch.Tensor, start: int, stop: int, n: int) -> torch.Tensor:
    """Rows ``start:stop`` of a per-datapoint tensor ``[n, ...]`` (a broadcast one stays whole)."""
    return value[start:stop] if value.dim() > 0 and value.shape[0] == n else value


def bdmc_run(run, *, n: int = 100, num_steps: int = 1000, chains: int = 16, batch_size: int | None = None,
             progress: bool = True, save: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bidirectional Monte Carlo on ``n`` datapoints simulated from the run's model.

    Each simulated x comes with the latent that generated it, an exact posterior
    sample; forward AIS from the prior gives a stochastic lower bound on log p(x),
    reverse AIS from that latent a stochastic upper bound (Grosse, Ghahramani &
    Adams 2015), each with ``num_steps`` steps and ``chains`` chains. The gap
    upper - lower bounds the error of AIS with that schedule on data like these.
    A conditional run simulates x given the first n y's of its test split (so
    n is at most the size of that split).

    Returns ``(summary, per_datapoint)``: per_datapoint has ``index`` (0..n-1), ``lower``,
    ``lower_se``, ``upper``, ``upper_se``, ``gap``; summary one row each for lower,
    upper and gap (``estimator, mean, stderr, n, seconds``). Writes
    ``RUN_DIR/evaluation/bdmc_summary.csv`` and ``bdmc_per_datapoint.csv`` when ``save``.
    """
    _check_positive(n=n, num_steps=num_steps, chains=chains, batch_size=batch_size)
    run = _as_run(run)
    from ppl_genmodels.inference import ais as ais_module

    model = run.model
    model.eval()
    test = run.data.test
    y = None
    if test.y is not None:
        n = min(n, len(test.y))
        y = test.y[:n]
    template = test.x.new_zeros((n,) + tuple(test.x.shape[1:]))
    x, latents = ais_module.simulate(model.model, template, y)
    batch = batch_size or max(1, min(n, _AIS_ROWS // chains))
    parts: dict[str, list] = {key: [] for key in ("lower", "lower_se", "upper", "upper_se")}
    seconds = {"lower": 0.0, "upper": 0.0}
    began = time.perf_counter()
    with tqdm(total=n, desc=f"bdmc ({num_steps} steps)", unit="pt", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            lat = {name: _take(value, start, stop, n) for name, value in latents.items()}
            yb = None if y is None else y[start:stop]
            with torch.enable_grad():
                forward, reverse = ais_module.bdmc(model.model, model.guide, x[start:stop], lat, yb, num_steps=num_steps,
                                                   num_chains=chains, progress=progress)
            for key, value in zip(parts, (forward.log_z, forward.stderr, reverse.log_z, reverse.stderr)):
                parts[key].append(value)
            seconds["lower"] += forward.seconds
            seconds["upper"] += reverse.seconds
            bar.update(stop - start)
    seconds["gap"] = time.perf_counter() - began
    columns = {key: _numpy(value) for key, value in parts.items()}
    per_datapoint = pd.DataFrame({"index": np.arange(n), **columns})
    per_datapoint["gap"] = per_datapoint["upper"] - per_datapoint["lower"]
    summary = pd.DataFrame([_summary_row(name, per_datapoint[name].to_numpy(), seconds[name])
                            for name in ("lower", "upper", "gap")], columns=SUMMARY_COLUMNS)
    if save:
        _save(run, {"bdmc_summary.csv": summary, "bdmc_per_datapoint.csv": per_datapoint})
    return summary, per_datapoint


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
    per_pass = max(1, _ROWS_PER_PASS // k)
    nesting = max_plate_nesting(model.model, model.guide, grid[:1], None)  # traced once, not per pass
    out = []
    for start in range(0, grid.shape[0], per_pass):
        log_w = log_weights(model.model, model.guide, grid[start : start + per_pass], None, num_particles=k,
                            proposal=proposal, nesting=nesting)
        out.append(log_mean_exp(log_w, 0))
    return gx.cpu().numpy(), gy.cpu().numpy(), torch.cat(out).reshape(grid_size, grid_size).cpu().numpy()


def _image_range(data):
    if data.likelihood == "categorical":
        return 0.0, float(data.n_levels - 1)
    return 0.0, 1.0


def _images(data, x: torch.Tensor, y: torch.Tensor | None = None) -> np.ndarray:
    """Flat pixel vectors -> [n, H, W] images (reassembling quadrants for a conditional split)."""
    x = x.detach().cpu().numpy()
    if data.condition == "quadrants":
        y = None if y is None else y.detach().cpu().numpy()
        return plots.assemble_quadrant_images(x, y, data.meta["x_pixels"], data.meta["y_pixels"], data.image_shape)
    return x.reshape(-1, *data.image_shape)


def _conditioning(data, n: int, label: int | None, device, dtype):
    """What to condition generation on: labels in columns, or the test set's visible quadrants."""
    if data.condition == "label":
        labels = torch.arange(n, device=device) % data.n_classes if label is None else torch.full((n,), label, device=device)
        if label is not None and not 0 <= label < data.n_classes:
            raise ValueError(f"label {label} is out of range for {data.n_classes} classes")
        return torch.nn.functional.one_hot(labels, data.n_classes).to(dtype)
    if data.condition == "quadrants":
        return data.test.y[:n]
    return None


def sample_run(run, n: int = 64, path=None, *, label: int | None = None, seed: int | None = None) -> Path:
    """Draw ``n`` samples from a trained run's model and write a figure; returns its path.

    Image data: a PNG grid of the likelihood means (for ``--condition label``, one
    class per column unless ``label`` is given; for ``quadrants``, completions of
    the first n test images). 2-D data: the samples over the data and the true manifold.
    """
    run = _as_run(run)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed is not None:
        torch.manual_seed(seed)
    data = run.data
    path = Path(path) if path is not None else Path(run.path) / "plots" / f"samples_{n}.png"
    if data.condition == "quadrants":
        n = min(n, len(data.test.y))
    template = data.test.x.new_zeros((n, data.x_dim))
    y = _conditioning(data, n, label, template.device, template.dtype)
    sample, mean = generate(run.model.model, template, y)
    if data.image_shape is not None:
        vmin, vmax = _image_range(data)
        ncol = data.n_classes if data.condition == "label" and label is None else None
        return plots.image_grid(_images(data, mean, y), path, nrow=ncol, title=f"{n} samples", vmin=vmin, vmax=vmax)
    if data.x_dim == 2:
        return plots.plot_points_2d(sample.cpu().numpy(), path, data=data.train.x.cpu().numpy(),
                                    true_manifold=data.meta.get("true_manifold"), title=f"{n} samples")
    raise ValueError(f"cannot draw samples of {data.x_dim}-dimensional non-image data; use the Python API")


def plot_run(run, *, grid_size: int = 80, k: int = 500) -> list[Path]:
    """Write the run's figures into ``RUN_DIR/plots`` and return their paths."""
    run = _as_run(run)
    folder = Path(run.path) / "plots"
    written = []
    if len(run.metrics):
        written.append(plots.plot_metrics(run.metrics, folder / "elbo.png"))
    data, model = run.data, run.model
    if data.image_shape is not None:
        written.append(sample_run(run, 64 if data.condition != "label" else 8 * data.n_classes, folder / "samples.png"))
        x, y = data.test.x[:16], None if data.test.y is None else data.test.y[:16]
        recon = reconstruct(model.model, model.guide, x, y)
        if data.condition == "quadrants":
            _, completion = generate(model.model, x, y)
            written.append(plots.plot_reconstructions(_images(data, x, y), _images(data, completion, y),
                                                      folder / "completions.png", title="test images (top) and completions from the visible quadrants (bottom)"))
        written.append(plots.plot_reconstructions(_images(data, x, y), _images(data, recon, y), folder / "reconstructions.png",
                                                  title="test images (top) and reconstructions (bottom)"))
    elif data.x_dim == 2 and data.condition is None:
        gx, gy, log_p = log_density_grid(model, data.train.x, grid_size=grid_size, k=k)
        written.append(plots.plot_density_2d(gx, gy, log_p, folder / "density.png", data=data.train.x.cpu().numpy(),
                                             true_manifold=data.meta.get("true_manifold"), title=f"learned density p(x) (importance sampling, k={k})"))
        written.append(sample_run(run, 500, folder / "samples.png"))
    return written
