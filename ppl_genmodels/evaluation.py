"""Evaluating a trained run: per-datapoint log-likelihood estimates, samples and figures.

``evaluate_run`` estimates, for every datapoint of a split, the ELBO and the
IWAE-k estimate of log p(x) (or log p(x | y) for a conditional model) from the
same k particles of the amortized guide (see
:mod:`ppl_genmodels.inference.importance` for the estimators and their
standard errors). The dataset-level standard error in ``summary.csv`` is the
standard deviation of the per-datapoint values over sqrt(n): the error of the
average over the evaluated points, which includes the Monte Carlo noise.

``log_density_grid`` evaluates the IWAE-k estimate of log p(x) on a grid of
2-D points, which draws the learned density of a model trained on a 2-D
manifold.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ppl_genmodels import plots
from ppl_genmodels.checkpoint import atomic_write_text
from ppl_genmodels.inference.importance import elbo_estimate, iwae_estimate
from ppl_genmodels.runs import Run, load_run
from ppl_genmodels.traces import generate, log_mean_exp, log_weights, reconstruct

__all__ = ["evaluate_run", "evaluate", "log_density_grid", "plot_run", "sample_run"]

_ROWS_PER_PASS = 50_000  # particles x datapoints per vectorized pass: bounds memory whatever k is


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


@torch.no_grad()
def evaluate_run(run, *, k: int = 100, split: str = "test", n: int | None = None, batch_size: int | None = None,
                 progress: bool = True, save: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ELBO and IWAE-k per datapoint of ``split``; returns ``(summary, per_datapoint)`` DataFrames.

    Writes ``RUN_DIR/evaluation/summary.csv`` and ``per_datapoint.csv`` when ``save``.
    """
    run = _as_run(run)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model = run.model
    model.eval()
    part = run.data.split(split)
    total = len(part.x) if n is None else min(n, len(part.x))
    if total < 1:
        raise ValueError(f"nothing to evaluate: split {split!r} has {len(part.x)} datapoints, n={n}")
    batch_size = batch_size or max(1, min(total, _ROWS_PER_PASS // min(k, _ROWS_PER_PASS)))
    chunk = max(1, _ROWS_PER_PASS // batch_size)
    columns: dict[str, list] = {"elbo": [], "elbo_se": [], "iwae": [], "iwae_se": [], "ess": []}
    seconds = 0.0
    bar = tqdm(total=total, desc=f"evaluate ({split}, k={k})", unit="pt", disable=not progress, leave=False)
    for start in range(0, total, batch_size):
        x = part.x[start : start + batch_size][: total - start]
        y = None if part.y is None else part.y[start : start + batch_size][: total - start]
        began = time.perf_counter()
        log_w = log_weights(model.model, model.guide, x, y, num_particles=k, chunk_size=chunk)  # [k, batch]
        elbo, elbo_se = elbo_estimate(log_w)
        iw, iw_se, ess = iwae_estimate(log_w)
        seconds += time.perf_counter() - began
        for key, value in zip(columns, (elbo, elbo_se, iw, iw_se, ess)):
            columns[key].append(value.cpu())
        bar.update(x.shape[0])
    bar.close()
    values = {key: torch.cat(v).double().numpy() for key, v in columns.items()}
    iw_name = f"iwae{k}"
    per_datapoint = pd.DataFrame({
        "index": part.index[:total].cpu().numpy(),
        "elbo": values["elbo"],
        "elbo_se": values["elbo_se"],
        iw_name: values["iwae"],
        f"{iw_name}_se": values["iwae_se"],
        f"{iw_name}_ess": values["ess"],
    })
    rows = []
    for name, column in (("elbo", "elbo"), (iw_name, iw_name)):
        v = per_datapoint[column].to_numpy()
        rows.append({
            "estimator": name,
            "mean": float(v.mean()),
            "stderr": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"),
            "n": len(v),
            "seconds": seconds,
        })
    summary = pd.DataFrame(rows)
    if save:
        folder = Path(run.path) / "evaluation"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "summary.csv", summary.to_csv(index=False))
        atomic_write_text(folder / "per_datapoint.csv", per_datapoint.to_csv(index=False))
    return summary, per_datapoint


evaluate = evaluate_run


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
    out = []
    for start in range(0, grid.shape[0], per_pass):
        log_w = log_weights(model.model, model.guide, grid[start : start + per_pass], None, num_particles=k,
                            proposal=proposal)
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
