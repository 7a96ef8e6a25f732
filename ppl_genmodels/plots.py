"""Every figure of the toolkit: the primitives, and the figures of a run.

Every plotting function takes plain numpy arrays or pandas DataFrames (torch
tensors are accepted too and converted with ``np.asarray(t.detach().cpu())``),
writes a PNG file to ``path`` and returns that path as a :class:`pathlib.Path`.

* Parent directories are created as needed.
* The file is written atomically: the PNG is rendered in memory and written with
  :func:`ppl_genmodels.runs.atomic_write`, so a reader never sees a half-written image.
* Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas,
  never through ``pyplot``: importing or using this module needs no display
  and does not touch the user's global pyplot state.
* Nothing is printed.

Figures of a run (they read a :class:`~ppl_genmodels.runs.Run`):

plot_run                   everything ``fit`` draws into ``RUN_DIR/plots``.
sample_run                 draws from a trained model, as an image grid or a scatter.
plot_comparison            the figures of ``compare`` (gap histograms, 2-D posteriors).
data_images                flat pixel vectors of a dataset -> [n, H, W] images.
plot_sweep                 the figures of a sweep (validation curves, log p(x) per cell).

Primitives:

plot_metrics               ELBO curves (train / validation) per epoch.
image_grid                 grey-level images tiled into a grid.
plot_reconstructions       originals above their reconstructions.
assemble_quadrant_images   put visible / predicted pixel values back into images.
plot_density_2d            learned 2-D density next to the data and true manifold.
plot_posteriors_2d         draws of a 2-D latent from several inference methods.
plot_gap_histogram         per-datapoint approximation and amortization gaps.
plot_validation_curves     validation ELBO curves of several runs, overlaid.
plot_logpx                 log p(x) and the ELBO per sweep cell, with error bars.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ppl_genmodels.evaluation import log_density_grid
from ppl_genmodels.runs import as_run, atomic_write, locked
from ppl_genmodels.traces import generate, reconstruct

__all__ = [
    "plot_run",
    "sample_run",
    "plot_comparison",
    "data_images",
    "plot_metrics",
    "image_grid",
    "plot_reconstructions",
    "assemble_quadrant_images",
    "plot_density_2d",
    "plot_points_2d",
    "plot_posteriors_2d",
    "plot_gap_histogram",
    "plot_sweep",
    "plot_validation_curves",
    "plot_logpx",
]

DPI = 100
_GRID_PAD = 1  # pixels between tiles of an image grid
_RECON_MAX_COLS = 10  # images per row in plot_reconstructions
_NAN_RGB = (0.75, 0.85, 1.0)  # colour of NaN (e.g. unobserved) pixels in image plots


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _to_numpy(a) -> np.ndarray:
    """Convert a numpy array, torch tensor or array-like to a numpy array."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        return np.asarray(a.detach().cpu())
    return np.asarray(a)


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    """Render ``fig`` as PNG and write it atomically to ``path``; release the figure."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        fig.clear()
    return atomic_write(path, buf.getvalue())


def _as_image_stack(images, name: str) -> np.ndarray:
    """Return images as a float array [n, H, W] ([H, W] and [n, 1, H, W] are accepted)."""
    arr = _to_numpy(images).astype(float)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape [n, H, W], got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _mosaic(images: np.ndarray, ncols: int, pad: int = _GRID_PAD):
    """Tile [n, H, W] images into one 2-D array, ``ncols`` per row.

    Returns ``(mosaic, is_pad)``; ``is_pad`` marks what is not an image pixel:
    the gaps between tiles and the unused tiles of a short last row.
    """
    n, h, w = images.shape
    nrows = math.ceil(n / ncols)
    shape = (nrows * (h + pad) - pad, ncols * (w + pad) - pad)
    out = np.zeros(shape)
    is_pad = np.ones(shape, dtype=bool)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        tile = (slice(r * (h + pad), r * (h + pad) + h), slice(c * (w + pad), c * (w + pad) + w))
        out[tile] = img
        is_pad[tile] = False
    return out, is_pad


def _grey_rgb(images: np.ndarray, ncols: int, vmin: float, vmax: float) -> np.ndarray:
    """Tile images and map them to RGB: grey levels, NaN pixels light blue, padding white."""
    mosaic, is_pad = _mosaic(images, ncols)
    span = vmax - vmin if vmax > vmin else 1.0
    grey = np.clip((mosaic - vmin) / span, 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[np.isnan(mosaic)] = _NAN_RGB
    rgb[is_pad] = 1.0
    return rgb


def _value_range(arrays, vmin, vmax):
    """Default colour range: finite min..max over all arrays (given limits win)."""
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays])
    if vmin is None:
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None:
        vmax = float(finite.max()) if finite.size else 1.0
    return vmin, vmax


def _hide_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------


def plot_metrics(metrics: pd.DataFrame, path) -> Path:
    """Plot train / validation ELBO per epoch and mark the best validation epoch.

    ``metrics`` needs columns ``epoch``, ``train_elbo`` and ``val_elbo`` (nats per
    datapoint). ``val_elbo`` may contain NaN (epochs without validation); the
    validation curve connects the epochs where it was evaluated.
    """
    missing = {"epoch", "train_elbo", "val_elbo"} - set(metrics.columns)
    if missing:
        raise ValueError(f"metrics is missing column(s): {', '.join(sorted(missing))}")
    epoch = pd.to_numeric(metrics["epoch"]).to_numpy(dtype=float)
    train = pd.to_numeric(metrics["train_elbo"]).to_numpy(dtype=float)
    val = pd.to_numeric(metrics["val_elbo"]).to_numpy(dtype=float)

    fig = _new_figure((7, 4.5))
    ax = fig.add_subplot()
    ax.plot(epoch, train, label="train ELBO", color="tab:blue")
    has_val = np.isfinite(val)
    if has_val.any():
        ax.plot(epoch[has_val], val[has_val], "o-", ms=3, label="validation ELBO",
                color="tab:orange")
        best = int(np.argmax(np.where(has_val, val, -np.inf)))
        ax.axvline(epoch[best], color="tab:green", ls="--", lw=1)
        ax.plot(epoch[best], val[best], "*", ms=12, color="tab:green",
                label=f"best val {val[best]:.2f} (epoch {epoch[best]:g})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats / datapoint)")
    ax.set_title("ELBO")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


def image_grid(images, path, *, nrow: int | None = None, title: str | None = None,
               vmin=None, vmax=None) -> Path:
    """Tile grey-level images [n, H, W] into a grid with ``nrow`` images per row.

    ``nrow`` defaults to ``ceil(sqrt(n))``. The grey scale runs from the data's
    finite minimum to maximum unless ``vmin`` / ``vmax`` are given. NaN pixels
    (e.g. unobserved parts from :func:`assemble_quadrant_images`) are shown
    light blue.
    """
    imgs = _as_image_stack(images, "images")
    n, h, w = imgs.shape
    ncols = min(n, nrow if nrow is not None else math.ceil(math.sqrt(n)))
    if ncols < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    vmin, vmax = _value_range([imgs], vmin, vmax)
    rgb = _grey_rgb(imgs, ncols, vmin, vmax)

    # about 0.3 inch per 28 pixels, bounded to a sensible figure size
    width = float(np.clip(rgb.shape[1] / 28 * 0.3 * 3, 2.0, 12.0))
    height = width * rgb.shape[0] / rgb.shape[1] + (0.4 if title else 0.0)
    fig = _new_figure((width, float(np.clip(height, 1.0, 14.0))))
    ax = fig.add_subplot()
    ax.imshow(rgb, interpolation="nearest")
    _hide_ticks(ax)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_reconstructions(originals, reconstructions, path, *, title=None) -> Path:
    """Show originals above their reconstructions (both [n, H, W]).

    Up to 10 images per row; more images give several (original, reconstruction)
    row pairs. Both share one grey scale.
    """
    orig = _as_image_stack(originals, "originals")
    recon = _as_image_stack(reconstructions, "reconstructions")
    if orig.shape != recon.shape:
        raise ValueError(
            f"originals and reconstructions differ in shape: {orig.shape} vs {recon.shape}"
        )
    n, h, w = orig.shape
    ncols = min(n, _RECON_MAX_COLS)
    npairs = math.ceil(n / ncols)
    vmin, vmax = _value_range([orig, recon], None, None)

    row_h = 1.0 * h / w
    fig = _new_figure((1.0 * ncols + 1.2, 2 * npairs * row_h + (0.4 if title else 0.0) + 0.2))
    for p in range(npairs):
        chunk = slice(p * ncols, (p + 1) * ncols)
        for k, (stack, label) in enumerate(((orig, "original"), (recon, "reconstruction"))):
            ax = fig.add_subplot(2 * npairs, 1, 2 * p + k + 1)
            # a short last row is padded to the full width by _grey_rgb
            ax.imshow(_grey_rgb(stack[chunk], ncols, vmin, vmax), interpolation="nearest")
            _hide_ticks(ax)
            for side in ax.spines.values():
                side.set_visible(False)
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def assemble_quadrant_images(x, y, x_pixels, y_pixels, image_shape, *,
                             fill=np.nan) -> np.ndarray:
    """Put pixel values back at their places in row-major images.

    ``x`` [n, len(x_pixels)] holds the values of the flat pixel indices
    ``x_pixels``; ``y`` [n, len(y_pixels)] those of ``y_pixels`` (e.g. the
    visible part and a conditional model's prediction of the hidden part).
    ``y`` may be None. Pixels not covered keep ``fill``. Where the two index
    sets overlap, ``y`` wins. Returns a float array [n, H, W].
    """
    height, width = (int(s) for s in image_shape)
    x = _to_numpy(x).astype(float)
    x_pixels = _to_numpy(x_pixels).astype(np.int64).ravel()
    if x.ndim != 2 or x.shape[1] != x_pixels.size:
        raise ValueError(f"x must have shape [n, {x_pixels.size}], got {x.shape}")
    n = x.shape[0]
    out = np.full((n, height * width), fill, dtype=float)
    parts = [(x, x_pixels, "x")]
    if y is not None:
        y = _to_numpy(y).astype(float)
        y_pixels = _to_numpy(y_pixels).astype(np.int64).ravel()
        if y.shape != (n, y_pixels.size):
            raise ValueError(f"y must have shape [{n}, {y_pixels.size}], got {y.shape}")
        parts.append((y, y_pixels, "y"))
    for values, pixels, name in parts:
        if pixels.size and (pixels.min() < 0 or pixels.max() >= height * width):
            raise ValueError(
                f"{name}_pixels out of range for an image of shape {(height, width)}"
            )
        out[:, pixels] = values
    return out.reshape(n, height, width)


# ---------------------------------------------------------------------------
# 2-D densities
# ---------------------------------------------------------------------------


def _density_image(grid_x, grid_y, log_density):
    """Turn a log-density on a grid into an image for ``imshow(origin="upper")``.

    ``log_density[i, j]`` is the value at ``(grid_x[j], grid_y[i])``. Returns
    ``(image, extent)``: ``image = exp(log_density)`` arranged so that row 0 is
    the largest y (top of the plot) and column 0 the smallest x (left), and
    ``extent = (left, right, bottom, top)`` covering the grid cells.
    Raises ValueError if ``log_density`` contains NaN or +inf, or has the wrong shape.
    """
    gx = _to_numpy(grid_x).astype(float).ravel()
    gy = _to_numpy(grid_y).astype(float).ravel()
    logd = _to_numpy(log_density).astype(float)
    if logd.shape != (gy.size, gx.size):
        raise ValueError(
            f"log_density must have shape [len(grid_y), len(grid_x)] = "
            f"{(gy.size, gx.size)}, got {logd.shape}"
        )
    if gx.size == 0 or gy.size == 0:
        raise ValueError("grid_x and grid_y must not be empty")
    if np.isnan(logd).any():
        raise ValueError(f"log_density contains {int(np.isnan(logd).sum())} NaN value(s)")
    if np.isposinf(logd).any():
        raise ValueError("log_density contains +inf values")
    if not (np.isfinite(gx).all() and np.isfinite(gy).all()):
        raise ValueError("grid_x and grid_y must be finite")

    density = np.exp(logd)
    # sort both axes increasing, then flip rows so the top row is the largest y
    ix, iy = np.argsort(gx, kind="stable"), np.argsort(gy, kind="stable")
    gx, gy = gx[ix], gy[iy]
    image = density[iy][:, ix][::-1]

    def edges(g):
        half = (g[-1] - g[0]) / (g.size - 1) / 2 if g.size > 1 else 0.5
        return g[0] - half, g[-1] + half

    left, right = edges(gx)
    bottom, top = edges(gy)
    return np.ascontiguousarray(image), (left, right, bottom, top)


def plot_density_2d(grid_x, grid_y, log_density, path, *, data=None, true_manifold=None,
                    title=None) -> Path:
    """Learned density (left) next to the data and the true manifold (right).

    ``log_density`` [len(grid_y), len(grid_x)] is log p(x) on the grid; ``-inf``
    entries mean density 0, NaN raises ValueError. ``data`` [k, 2] is drawn as
    small semi-transparent points, ``true_manifold`` [m, 2] as points on both
    panels. Both panels use equal aspect and the grid's limits.
    """
    image, extent = _density_image(grid_x, grid_y, log_density)
    data = None if data is None else _to_numpy(data).astype(float).reshape(-1, 2)
    manifold = (None if true_manifold is None
                else _to_numpy(true_manifold).astype(float).reshape(-1, 2))

    aspect = (extent[3] - extent[2]) / (extent[1] - extent[0])
    height = float(np.clip(4.5 * aspect, 2.5, 9.0)) + 1.0 + (0.4 if title else 0.0)
    fig = _new_figure((11, height))
    ax_d, ax_s = fig.subplots(1, 2)

    im = ax_d.imshow(image, extent=extent, origin="upper", cmap="viridis",
                     interpolation="nearest", aspect="equal")
    cax = ax_d.inset_axes([1.04, 0.0, 0.05, 1.0])  # exactly as tall as the heat map
    fig.colorbar(im, cax=cax, label="p(x)")
    if manifold is not None:
        ax_d.plot(manifold[:, 0], manifold[:, 1], ".", ms=1, color="white", alpha=0.7)
    ax_d.set_title("learned density p(x)")

    if data is not None:
        ax_s.scatter(data[:, 0], data[:, 1], s=3, alpha=0.3, color="tab:blue",
                     linewidths=0, label="data")
    if manifold is not None:
        ax_s.plot(manifold[:, 0], manifold[:, 1], ".", ms=2, color="tab:red",
                  label="true manifold")
    ax_s.set_title("data and true manifold")
    if data is not None or manifold is not None:
        ax_s.legend(loc="upper right", markerscale=3)

    for ax in (ax_d, ax_s):
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_points_2d(points, path, *, data=None, true_manifold=None, title=None) -> Path:
    """2-D points (e.g. samples from a model) over the data and the true manifold, one panel."""
    pts = _to_numpy(points).astype(float).reshape(-1, 2)
    fig = _new_figure((5.5, 5.0))
    ax = fig.subplots()
    if data is not None:
        d = _to_numpy(data).astype(float).reshape(-1, 2)
        ax.scatter(d[:, 0], d[:, 1], s=3, alpha=0.25, color="tab:blue", linewidths=0, label="data")
    if true_manifold is not None:
        m = _to_numpy(true_manifold).astype(float).reshape(-1, 2)
        ax.plot(m[:, 0], m[:, 1], ".", ms=2, color="tab:red", label="true manifold")
    ax.scatter(pts[:, 0], pts[:, 1], s=5, alpha=0.6, color="tab:orange", linewidths=0, label="samples")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(loc="upper right", markerscale=3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------
# comparing posteriors (ppl_genmodels/comparison.py)
# ---------------------------------------------------------------------------

_METHOD_COLOURS = ("0.35", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")
_MAX_SCATTER = 1000  # draws shown per method and panel


def _covariance_ellipse(points: np.ndarray, radius: float):
    """``(x, y)`` of the ``radius``-sd ellipse of a Gaussian fitted to ``points  # [n, 2]``."""
    mean = points.mean(0)
    cov = np.cov(points.T) + 1e-12 * np.eye(2)
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(t), np.sin(t)])  # [2, 100]
    ellipse = vecs @ (np.sqrt(np.clip(vals, 0, None))[:, None] * radius * circle)
    return mean[0] + ellipse[0], mean[1] + ellipse[1]


def plot_posteriors_2d(panels, path, *, titles=None, title=None) -> Path:
    """Draws of a 2-D latent from several methods, one panel per datapoint.

    ``panels``: a list (one per datapoint, at most a handful) of ``{label: draws [n, 2]}``;
    the first label is the reference (drawn in grey). Each method's draws are
    scattered (at most 1000) with the 1- and 2-sd ellipses of a Gaussian fitted to them.
    """
    panels = list(panels)
    if not panels:
        raise ValueError("no panels to plot")
    ncols = len(panels)
    fig = _new_figure((4.0 * ncols, 4.0))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    rng = np.random.default_rng(0)
    for i, (ax, panel) in enumerate(zip(axes, panels)):
        for j, (label, draws) in enumerate(panel.items()):
            pts = _to_numpy(draws).reshape(-1, 2).astype(float)
            pts = pts[np.isfinite(pts).all(1)]
            colour = _METHOD_COLOURS[j % len(_METHOD_COLOURS)]
            shown = pts if len(pts) <= _MAX_SCATTER else pts[rng.choice(len(pts), _MAX_SCATTER, replace=False)]
            ax.scatter(shown[:, 0], shown[:, 1], s=3, alpha=0.15 if j == 0 else 0.25, color=colour, linewidths=0)
            if len(pts) > 2:
                for radius, style in ((1.0, "-"), (2.0, "--")):
                    ex, ey = _covariance_ellipse(pts, radius)
                    ax.plot(ex, ey, style, color=colour, lw=1.5, label=label if radius == 1.0 else None)
        if titles is not None and i < len(titles):
            ax.set_title(titles[i])
        ax.set_xlabel("z[0]")
        ax.set_ylabel("z[1]")
        if i == 0:
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_gap_histogram(approximation_gap, amortization_gap, path, *, title=None) -> Path:
    """Histograms of the per-datapoint approximation and amortization gaps (nats)."""
    gaps = {"approximation gap": _to_numpy(approximation_gap).astype(float).ravel(),
            "amortization gap": _to_numpy(amortization_gap).astype(float).ravel()}
    fig = _new_figure((6.0, 4.0))
    ax = fig.subplots()
    finite = np.concatenate([g[np.isfinite(g)] for g in gaps.values()])
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    for (label, values), colour in zip(gaps.items(), ("tab:blue", "tab:red")):
        values = values[np.isfinite(values)]
        ax.hist(values, bins=bins, alpha=0.55, color=colour,
                label=f"{label} (mean {values.mean():.3f})" if len(values) else label)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("nats")
    ax.set_ylabel("datapoints")
    ax.legend()
    ax.set_title(title or "log p(x) - ELBO, split into approximation and amortization gaps")
    return _save(fig, path)


# ---------------------------------------------------------------------------
# the figures of a run
# ---------------------------------------------------------------------------


def data_images(data, x, y=None) -> np.ndarray:
    """Flat pixel vectors of ``data`` (a Dataset with ``image_shape``) -> ``[n, H, W]`` images.

    For ``condition == "quadrants"`` the generated pixels ``x`` and the visible ones
    ``y`` are put back in place (pixels of a missing ``y`` stay NaN: drawn light blue).
    """
    x = _to_numpy(x)
    if data.condition == "quadrants":
        y = None if y is None else _to_numpy(y)
        return assemble_quadrant_images(x, y, data.meta["x_pixels"], data.meta["y_pixels"], data.image_shape)
    return x.reshape(-1, *data.image_shape)


def _image_range(data) -> tuple[float, float]:
    return (0.0, float(data.n_levels - 1)) if data.likelihood == "categorical" else (0.0, 1.0)


def _conditioning(data, n: int, label: int | None, device, dtype):
    """What to condition generation on: labels in columns, or the test set's visible quadrants."""
    if data.condition == "label":
        if label is not None and not 0 <= label < data.n_classes:
            raise ValueError(f"label {label} is out of range for {data.n_classes} classes")
        labels = torch.arange(n, device=device) % data.n_classes if label is None else torch.full((n,), label, device=device)
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
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if path is not None and Path(path).suffix.lower() != ".png":
        raise ValueError(f"the samples are written as a PNG image; give an --out ending in .png, not {Path(path).name}")
    run = as_run(run)
    if label is not None and run.data.condition != "label":
        raise ValueError(f"--label needs a run conditioned on class labels (--condition label); this run is "
                         f"{'conditioned on ' + run.data.condition if run.data.condition else 'unconditioned'}")
    path = Path(path) if path is not None else run.folder("plots") / f"samples_{n}.png"
    inside = path.resolve().is_relative_to(Path(run.path).resolve())
    with locked(run.path, "sample") if inside else contextlib.nullcontext():  # a file in the run: one writer
        return _draw_samples(run, n, path, label, seed)


def _draw_samples(run, n: int, path: Path, label: int | None, seed: int | None) -> Path:
    if seed is not None:
        torch.manual_seed(seed)
    data = run.data
    if data.condition == "quadrants":
        n = min(n, len(data.test.y))
    template = data.test.x.new_zeros((n, data.x_dim))
    y = _conditioning(data, n, label, template.device, template.dtype)
    sample, mean = generate(run.program.model, template, y)
    if data.image_shape is not None:
        vmin, vmax = _image_range(data)
        ncol = data.n_classes if data.condition == "label" and label is None else None
        return image_grid(data_images(data, mean, y), path, nrow=ncol, title=f"{n} samples", vmin=vmin, vmax=vmax)
    if data.x_dim == 2:
        return plot_points_2d(sample, path, data=data.train.x, true_manifold=data.meta.get("true_manifold"),
                              title=f"{n} samples")
    raise ValueError(f"cannot draw samples of {data.x_dim}-dimensional non-image data; use the Python API")


def _image_figures(run, folder: Path) -> list[Path]:
    data, model = run.data, run.program
    written = [sample_run(run, 64 if data.condition != "label" else 8 * data.n_classes, folder / "samples.png")]
    x, y = data.test.x[:16], None if data.test.y is None else data.test.y[:16]
    originals, recon = data_images(data, x, y), reconstruct(model.model, model.guide, x, y)
    if data.condition == "quadrants":
        _, completion = generate(model.model, x, y)
        written.append(plot_reconstructions(originals, data_images(data, completion, y), folder / "completions.png",
                                            title="test images (top) and completions from the visible quadrants (bottom)"))
    written.append(plot_reconstructions(originals, data_images(data, recon, y), folder / "reconstructions.png",
                                        title="test images (top) and reconstructions (bottom)"))
    return written


def plot_run(run, *, grid_size: int = 80, k: int = 500) -> list[Path]:
    """Write the run's figures into ``RUN_DIR/plots`` and return their paths.

    ELBO curves; for image data samples, reconstructions (and completions for
    quadrants); for unconditioned 2-D data the learned density (IWAE-k on a grid,
    :func:`~ppl_genmodels.evaluation.log_density_grid`) beside the true manifold, and samples.
    """
    run = as_run(run)
    folder = run.folder("plots")
    written = [plot_metrics(run.metrics, folder / "elbo.png")] if len(run.metrics) else []
    data = run.data
    if data.image_shape is not None:
        written += _image_figures(run, folder)
    elif data.x_dim == 2 and data.condition is None:
        gx, gy, log_p = log_density_grid(run.program, data.train.x, grid_size=grid_size, k=k)
        written.append(plot_density_2d(gx, gy, log_p, folder / "density.png", data=data.train.x,
                                       true_manifold=data.meta.get("true_manifold"),
                                       title=f"learned density p(x) (importance sampling, k={k})"))
        written.append(sample_run(run, 500, folder / "samples.png"))
    return written


def plot_comparison(comparison, folder) -> list[Path]:
    """The figures of ``compare``: gap histograms, and for a 2-D latent the posteriors of the first 4 datapoints."""
    folder = Path(folder)
    per = comparison.per_datapoint
    written = [plot_gap_histogram(per["approximation_gap"], per["amortization_gap"], folder / "gaps.png")]
    draws, index = comparison.draws, comparison.index
    if next(iter(draws.values())).shape[-1] == 2:
        shown = range(min(4, len(index)))
        panels = [{label: value[:, b] for label, value in draws.items()} for b in shown]
        written.append(plot_posteriors_2d(panels, folder / "posteriors.png",
                                          titles=[f"datapoint {index[b]}" for b in shown]))
    return written


# ---------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------


def plot_validation_curves(curves: dict, path, *, title: str | None = None) -> Path:
    """Validation ELBO per epoch of several runs, overlaid; ``curves``: label -> metrics (``epoch``, ``val_elbo``)."""
    fig = _new_figure((8, 5) if len(curves) <= 8 else (11, 5))
    ax = fig.add_subplot()
    for i, (label, metrics) in enumerate(curves.items()):
        epoch = pd.to_numeric(metrics["epoch"]).to_numpy(dtype=float)
        val = pd.to_numeric(metrics["val_elbo"]).to_numpy(dtype=float)
        keep = np.isfinite(val)
        style = ("-", "--", ":", "-.")[(i // 10) % 4]  # ten colours, then the next line style
        ax.plot(epoch[keep], val[keep], style, marker="o" if keep.sum() <= 1 else None, ms=4, color=f"C{i % 10}",
                label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ELBO (nats / datapoint)")
    ax.set_title(title or "validation ELBO of every cell")
    ax.grid(alpha=0.3)
    if curves:
        if len(curves) <= 8:
            ax.legend(fontsize="small")
        else:
            ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_logpx(table: pd.DataFrame, path, *, title: str | None = None) -> Path:
    """log p(x) per sweep cell with +-1 standard-error bars, beside its ELBO.

    ``table`` has ``run_dir`` (the labels), ``log_px``, ``log_px_se`` and, when present,
    ``log_px_source``, ``test_elbo`` and ``test_elbo_se`` (a ``sweep.csv``).
    """
    labels = [str(label).replace(",", ", ") for label in table["run_dir"]]
    rows = np.arange(len(labels))[::-1]
    fig = _new_figure((9, max(3.0, 0.4 * len(labels) + 1.5)))
    ax = fig.add_subplot()
    sources = sorted({str(s) for s in table.get("log_px_source", pd.Series(dtype=str)).dropna() if str(s)})
    ax.errorbar(pd.to_numeric(table["log_px"]), rows, xerr=pd.to_numeric(table["log_px_se"]), fmt="o",
                color="tab:blue", capsize=3, label=f"log p(x) ({', '.join(sources) or 'none'})")
    if "test_elbo" in table:
        ax.errorbar(pd.to_numeric(table["test_elbo"]), rows, xerr=pd.to_numeric(table.get("test_elbo_se")),
                    fmt="s", mfc="none", color="tab:orange", capsize=3, label="ELBO")
    ax.set_yticks(rows, labels, fontsize="small")
    ax.set_xlabel("nats / test datapoint (error bars: 1 standard error)")
    ax.set_title(title or "log p(x) of every cell")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_sweep(table: pd.DataFrame, curves: dict, folder) -> list[Path]:
    """The figures of a sweep: ``validation.png`` (every cell's validation ELBO curve) and ``logpx.png``."""
    folder = Path(folder)
    return [plot_validation_curves(curves, folder / "validation.png"), plot_logpx(table, folder / "logpx.png")]
