"""Tests for ppl_genmodels.plots."""

from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgb

import ppl_genmodels
from ppl_genmodels import plots
from ppl_genmodels.evaluation import log_density_grid

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, expected_path):
    path = Path(path)
    assert path == Path(expected_path)
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] > 50 and img.shape[1] > 50
    # nothing but the requested file(s) in the directory: no temp files left over
    leftovers = [p.name for p in path.parent.iterdir() if p.suffix != ".png"]
    assert leftovers == []
    return img


def _close(pixels, colour, tol=0.08):
    """Mask of the pixels within ``tol`` of ``colour`` (a name or an RGB(A) tuple) in every channel."""
    return (np.abs(pixels[..., :3] - np.asarray(to_rgb(colour))) < tol).all(axis=-1)


def _blend(colour, alpha):
    """What ``colour`` drawn with ``alpha`` over white looks like."""
    return tuple(alpha * np.asarray(to_rgb(colour)) + (1 - alpha))


def _runs(mask):
    """Index arrays of the runs of consecutive True entries of a 1-D mask."""
    idx = np.flatnonzero(mask)
    return np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if idx.size else []


def _tile_values(img):
    """Median grey level of each tile of a grid of grey images in a PNG, as an array [rows, cols].

    Tile rows and columns are the long runs of rows and columns with non-white
    pixels; short runs (text such as a title or a label) are skipped. Tiles
    (or unused places) that are white themselves read 1.
    """
    grey = img[..., :3].mean(-1)
    ink = grey < 0.98

    def long_runs(any_ink):
        runs = _runs(any_ink)
        longest = max(len(r) for r in runs)
        return [r for r in runs if len(r) > longest / 2]

    rows = long_runs(ink.any(1))
    cols = long_runs(ink[np.concatenate(rows)].any(0))  # a title may span several columns
    return np.array([[np.median(grey[r[0]:r[-1] + 1, c[0]:c[-1] + 1]) for c in cols] for r in rows])


def metrics_frame():
    epochs = np.arange(1, 11)
    train = -200 + 80 * (1 - np.exp(-epochs / 3))
    val = train - 5.0
    val[[0, 4]] = np.nan
    return pd.DataFrame({"epoch": epochs, "train_elbo": train, "val_elbo": val})


# ---------------------------------------------------------------------------
# plot_metrics
# ---------------------------------------------------------------------------


def test_plot_metrics_with_nan(tmp_path):
    out = tmp_path / "sub" / "dir" / "metrics.png"  # parent dirs are created
    result = plots.plot_metrics(metrics_frame(), out)
    assert isinstance(result, Path)
    img = assert_png(result, out)
    # train curve (blue), validation curve (orange), best-epoch line and star (green):
    # far more pixels than their legend entries alone
    train, val, best = (_close(img, c) for c in ("tab:blue", "tab:orange", "tab:green"))
    assert train.sum() > 400 and val.sum() > 400 and best.sum() > 200
    # the best validation ELBO is at the last epoch: the green dashed line is where
    # the curves end (which it and the star partly cover; one epoch is ~60 pixels)
    best_col = np.argmax(best.sum(0))
    assert abs(best_col - np.flatnonzero(train.any(0)).max()) <= 10
    assert abs(best_col - np.flatnonzero(val.any(0)).max()) <= 10


def test_plot_metrics_all_val_nan_and_overwrite(tmp_path):
    df = metrics_frame()
    df["val_elbo"] = np.nan
    out = tmp_path / "metrics.png"
    img = mpimg.imread(plots.plot_metrics(df, out))
    # no validation: train curve only, no validation curve and no best-epoch marker
    assert _close(img, "tab:blue").sum() > 400
    assert not _close(img, "tab:orange").any() and not _close(img, "tab:green").any()
    plots.plot_metrics(metrics_frame(), str(out))  # overwrite, str path
    img = assert_png(out, out)
    assert _close(img, "tab:orange").sum() > 400  # the new figure, with validation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png"]


def test_plot_metrics_missing_column(tmp_path):
    with pytest.raises(ValueError, match="val_elbo"):
        plots.plot_metrics(metrics_frame().drop(columns="val_elbo"), tmp_path / "m.png")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# image_grid / plot_reconstructions
# ---------------------------------------------------------------------------


def test_image_grid(tmp_path):
    # 7 black images, the fifth white, on an arbitrary scale: ceil(sqrt(7)) = 3 per row
    images = np.full((7, 12, 12), 10.0)
    images[4] = 13.0
    out = tmp_path / "grid.png"
    img = assert_png(plots.image_grid(images, out, title="samples"), out)
    np.testing.assert_allclose(_tile_values(img), [[0, 0, 0],
                                                   [0, 1, 0],
                                                   [0, 1, 1]], atol=0.01)  # last row: one tile
    untitled = mpimg.imread(plots.image_grid(images, tmp_path / "untitled.png"))
    np.testing.assert_allclose(_tile_values(untitled), _tile_values(img))
    assert img.shape[0] > untitled.shape[0]  # room for the title
    # nrow and a fixed grey scale: 0 -> black, 20 -> white, values outside clipped
    levels = np.array([-5.0, 10.0, 5.0, 15.0])
    out2 = tmp_path / "grid2.png"
    img2 = assert_png(plots.image_grid(levels[:, None, None] * np.ones((6, 8)), out2,
                                       nrow=2, vmin=0, vmax=20), out2)
    np.testing.assert_allclose(_tile_values(img2), [[0, 0.5], [0.25, 0.75]], atol=0.01)


def test_image_grid_torch(tmp_path):
    images = torch.arange(5.0, requires_grad=True)[:, None, None] * torch.ones(8, 6)
    out = tmp_path / "grid_torch.png"
    img = assert_png(plots.image_grid(images, out), out)
    # grey levels 0, 1/4, ..., 1 from the data's range; the unused sixth place is white
    np.testing.assert_allclose(_tile_values(img), [[0, 0.25, 0.5], [0.75, 1, 1]], atol=0.01)


def test_image_grid_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError):
        plots.image_grid(np.zeros(5), tmp_path / "x.png")


def test_grey_rgb_nan_and_padding():
    images = np.array([[[0.0, 1.0], [np.nan, 0.5]]] * 3)
    rgb = plots._grey_rgb(images, ncols=2, vmin=0.0, vmax=1.0)
    assert rgb.shape == (2 * 2 + 1, 2 * 2 + 1, 3)
    np.testing.assert_allclose(rgb[0, 0], 0.0)
    np.testing.assert_allclose(rgb[0, 1], 1.0)
    np.testing.assert_allclose(rgb[1, 1], 0.5)
    np.testing.assert_allclose(rgb[1, 0], plots._NAN_RGB)  # NaN pixel
    np.testing.assert_allclose(rgb[:, 2], 1.0)  # gap between tiles: white
    np.testing.assert_allclose(rgb[3:, 3:], 1.0)  # unused last tile: white


def flat_pairs(n, size, lib=np):
    """``n`` originals of grey 0.25 and reconstructions of grey 0.75 (``lib``: numpy or torch).

    One pixel of each, at 0 and 1, sets their shared grey scale to 0..1.
    """
    originals, reconstructions = lib.full((n, size, size), 0.25), lib.full((n, size, size), 0.75)
    originals[0, 0, 0], reconstructions[0, 0, 0] = 0.0, 1.0
    return originals, reconstructions


def test_plot_reconstructions(tmp_path):
    out = tmp_path / "recon.png"
    img = assert_png(plots.plot_reconstructions(*flat_pairs(6, 28), out,
                                                title="reconstructions"), out)
    # originals in the row above their reconstructions, one column per image
    np.testing.assert_allclose(_tile_values(img), [[0.25] * 6, [0.75] * 6], atol=0.01)


def test_plot_reconstructions_many_and_torch(tmp_path):
    out = tmp_path / "recon_many.png"
    img = assert_png(plots.plot_reconstructions(*flat_pairs(23, 12, torch), out), out)
    # 10 per row: three (original, reconstruction) row pairs, the last one 3 images long
    expected = np.ones((6, 10))
    expected[[0, 2]], expected[[1, 3]] = 0.25, 0.75
    expected[4, :3], expected[5, :3] = 0.25, 0.75
    np.testing.assert_allclose(_tile_values(img), expected, atol=0.01)


def test_plot_reconstructions_shape_mismatch(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_reconstructions(np.zeros((3, 4, 4)), np.zeros((2, 4, 4)),
                                   tmp_path / "r.png")


# ---------------------------------------------------------------------------
# assemble_quadrant_images
# ---------------------------------------------------------------------------


def test_assemble_quadrant_images_exact():
    # 4x4 image: visible = top half (flat 0..7), hidden = bottom-right quadrant
    x_pixels = np.arange(8)
    y_pixels = np.array([10, 11, 14, 15])
    x = np.arange(8, dtype=float)[None] + np.array([[0.0], [100.0]])  # n = 2
    y = -np.arange(1, 5, dtype=float)[None].repeat(2, axis=0)
    out = plots.assemble_quadrant_images(x, y, x_pixels, y_pixels, (4, 4))
    assert out.shape == (2, 4, 4)
    expected0 = np.array([
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [np.nan, np.nan, -1, -2],
        [np.nan, np.nan, -3, -4],
    ])
    np.testing.assert_array_equal(out[0], expected0)
    np.testing.assert_array_equal(out[1, :2], expected0[:2] + 100)
    np.testing.assert_array_equal(out[1, 2:], expected0[2:])


def test_assemble_quadrant_images_y_none_and_fill():
    out = plots.assemble_quadrant_images(np.ones((1, 2)), None, [0, 5], [1, 2], (2, 3),
                                         fill=-7.0)
    np.testing.assert_array_equal(out[0], [[1, -7, -7], [-7, -7, 1]])


def test_assemble_quadrant_images_round_trip():
    rng = np.random.default_rng(2)
    images = rng.random((5, 6, 7))
    flat = images.reshape(5, -1)
    perm = rng.permutation(42)
    x_pixels, y_pixels = perm[:17], perm[17:]
    out = plots.assemble_quadrant_images(
        torch.as_tensor(flat[:, x_pixels]), flat[:, y_pixels], x_pixels,
        torch.as_tensor(y_pixels), (6, 7))
    np.testing.assert_array_equal(out, images)


def test_assemble_quadrant_images_bad_input():
    with pytest.raises(ValueError):
        plots.assemble_quadrant_images(np.zeros((2, 3)), None, [0, 1], None, (2, 2))
    with pytest.raises(ValueError):
        plots.assemble_quadrant_images(np.zeros((2, 2)), None, [0, 4], None, (2, 2))


# ---------------------------------------------------------------------------
# plot_density_2d
# ---------------------------------------------------------------------------


def top_left_log_density(nx=40, ny=30):
    """log p = 0 where x < 0 and y > 0 (top-left quadrant), -inf elsewhere."""
    gx = np.linspace(-2, 2, nx)
    gy = np.linspace(-1.5, 1.5, ny)
    xx, yy = np.meshgrid(gx, gy)  # [ny, nx]
    logd = np.where((xx < 0) & (yy > 0), 0.0, -np.inf)
    return gx, gy, logd


VIRIDIS = matplotlib.colormaps["viridis"]  # plot_density_2d's colour map


def _heat_map(img):
    """The heat map of a plot_density_2d PNG (its left panel) and its pixels of density 0.

    The heat map is the first contiguous run of columns of the left half that hold
    pixels of density 0 (the colour bar further right is excluded that way), cut to
    the rows that hold such pixels. Returns ``(pixels, dark)``.
    """
    left_half = img[:, : img.shape[1] // 2]
    dark = _close(left_half, VIRIDIS(0.0))
    c0 = c1 = np.flatnonzero(dark.any(axis=0))[0]
    while c1 + 1 < left_half.shape[1] and dark[:, c1 + 1].any():
        c1 += 1
    rows = np.flatnonzero(dark[:, c0:c1 + 1].any(axis=1))
    box = (slice(rows[0], rows[-1] + 1), slice(c0, c1 + 1))
    return left_half[box], dark[box]


def _quadrant_means(mask):
    """Mean of a 2-D mask over each of its quarters: ``{(top, left): mean}``."""
    h, w = mask.shape
    rows = {True: slice(0, h // 2), False: slice(h // 2, h)}
    cols = {True: slice(0, w // 2), False: slice(w // 2, w)}
    return {(top, left): mask[rows[top], cols[left]].mean() for top in rows for left in cols}


def test_density_image_orientation():
    gx, gy, logd = top_left_log_density()
    image, extent = plots._density_image(gx, gy, logd)
    assert image.shape == (30, 40)
    assert extent[0] < gx[0] and extent[1] > gx[-1]
    assert extent[2] < gy[0] and extent[3] > gy[-1]
    np.testing.assert_array_equal(image[:15, :20], 1.0)  # top-left bright
    assert image[15:].sum() == 0 and image[:, 20:].sum() == 0
    # decreasing grids give the same picture
    image2, extent2 = plots._density_image(gx[::-1], gy[::-1], logd[::-1, ::-1])
    np.testing.assert_array_equal(image2, image)
    assert extent2 == extent


def test_density_image_rejects_nan_and_shape():
    gx, gy, logd = top_left_log_density()
    logd[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plots._density_image(gx, gy, logd)
    with pytest.raises(ValueError, match="shape"):
        plots._density_image(gx, gy, logd.T)


def test_plot_density_2d(tmp_path):
    rng = np.random.default_rng(3)
    gx = np.linspace(-3, 3, 50)
    gy = np.linspace(-2, 2, 40)
    xx, yy = np.meshgrid(gx, gy)
    logd = -0.5 * ((yy - np.sin(xx)) / 0.2) ** 2
    logd[:5, :5] = -np.inf
    t = np.linspace(-3, 3, 200)
    manifold = np.stack([t, np.sin(t)], axis=1)
    data = manifold[rng.integers(0, 200, 300)] + 0.1 * rng.normal(size=(300, 2))
    out = tmp_path / "density.png"
    result = plots.plot_density_2d(gx, gy, logd, out, data=data, true_manifold=manifold,
                                   title="learned density")
    img = assert_png(result, out)
    # the density follows y = sin(x): above the middle on the right, below it on the left
    pixels, dark = _heat_map(img)
    assert pixels.shape[1] > 100
    lit = _quadrant_means(~dark)
    assert lit[True, False] > 0.25 and lit[False, True] > 0.25
    assert lit[True, True] < 0.1 and lit[False, False] < 0.1
    # the true manifold (tab:red) on the right panel
    assert _close(img[:, img.shape[1] // 2:], "tab:red").sum() > 100


def test_plot_density_2d_torch_and_minimal(tmp_path):
    gx, gy, logd = top_left_log_density()
    out = tmp_path / "density_torch.png"
    result = plots.plot_density_2d(torch.as_tensor(gx), torch.as_tensor(gy),
                                   torch.as_tensor(logd), out,
                                   data=torch.zeros(10, 2))
    img = assert_png(result, out)
    black = _quadrant_means(_heat_map(img)[1])  # density 0 everywhere but top left
    assert black[True, True] < 0.1 and black[False, False] > 0.9
    # ten data points stacked at the origin (alpha 0.3 each) show tab:blue on the right
    # panel (a single one, like the legend's, is much paler); no true manifold
    assert _close(img[:, img.shape[1] // 2:], "tab:blue", tol=0.15).sum() >= 3
    assert not _close(img, "tab:red").any()


def test_plot_density_2d_nan_raises(tmp_path):
    gx, gy, logd = top_left_log_density()
    logd[0, 0] = np.nan
    out = tmp_path / "nan.png"
    with pytest.raises(ValueError, match="NaN"):
        plots.plot_density_2d(gx, gy, logd, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_plot_density_2d_png_right_side_up(tmp_path):
    """Read back the PNG: the bright region of the heat map is its top-left quarter."""
    gx, gy, logd = top_left_log_density()
    out = tmp_path / "orient.png"
    img = mpimg.imread(plots.plot_density_2d(gx, gy, logd, out))
    pixels, dark = _heat_map(img)
    assert pixels.shape[1] > 100  # a real heat map, not a thin strip
    bright, black = _quadrant_means(_close(pixels, VIRIDIS(1.0))), _quadrant_means(dark)
    assert bright[True, True] > 0.9
    for top, left in [(True, False), (False, True), (False, False)]:
        assert bright[top, left] < 0.1
        assert black[top, left] > 0.9


def test_no_pyplot_needed():
    """Plotting works without importing pyplot (no display, no global state)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, tempfile, os\n"
        "from ppl_genmodels import plots\n"
        "d = tempfile.mkdtemp()\n"
        "plots.image_grid(np.zeros((2, 3, 3)), os.path.join(d, 'g.png'))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "DISPLAY"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---------------------------------------------------------------------------
# plot_points_2d
# ---------------------------------------------------------------------------


def test_plot_points_2d(tmp_path):
    rng = np.random.default_rng(0)
    samples = np.array([-1.0, 1.0]) + 0.01 * rng.normal(size=(50, 2))  # top left
    data = np.array([1.0, -1.0]) + 0.01 * rng.normal(size=(200, 2))  # bottom right
    t = np.linspace(-0.5, 0.5, 30)
    manifold = np.stack([t, t], axis=1)  # across the middle, away from both
    out = tmp_path / "pts.png"
    img = assert_png(plots.plot_points_2d(samples, out, data=torch.as_tensor(data),
                                          true_manifold=manifold, title="samples"), out)
    # many stacked semi-transparent points show their full colour, a single one (as in
    # the legend) does not: the samples' colour is only where the samples are
    (s_rows, s_cols), (d_rows, d_cols) = (np.nonzero(_close(img, c)) for c in ("tab:orange", "tab:blue"))
    assert len(s_rows) >= 10 and len(d_rows) >= 10
    assert np.ptp(s_rows) < 15 and np.ptp(s_cols) < 15  # one small blob...
    height, width = img.shape[:2]
    assert s_rows.max() < height / 3 and s_cols.max() < width / 2  # ...top left
    assert d_rows.min() > height * 2 / 3 and d_cols.min() > width / 2  # data: bottom right
    # the true manifold in between (besides its legend marker)
    m_rows, m_cols = np.nonzero(_close(img, "tab:red"))
    between = (m_rows > s_rows.max()) & (m_rows < d_rows.min()) & (m_cols > s_cols.max()) & (m_cols < d_cols.min())
    assert between.sum() > 30
    assert [p.name for p in tmp_path.iterdir()] == ["pts.png"]


# ---------------------------------------------------------------------------
# plot_gap_histogram / plot_posteriors_2d
# ---------------------------------------------------------------------------


def test_plot_gap_histogram(tmp_path):
    # approximation gaps: 10 x 0; amortization gaps: 4 x 0.5 and 6 x 1.0
    out = tmp_path / "gaps.png"
    img = assert_png(plots.plot_gap_histogram(np.zeros(10), torch.tensor([0.5] * 4 + [1.0] * 6), out), out)
    # the bars (alpha 0.55 over white): pixel height per column, and the bars' columns
    approx_h, amort_h = (_close(img, _blend(c, 0.55), tol=0.03).sum(0) for c in ("tab:blue", "tab:red"))
    approx_bars = [r for r in _runs(approx_h > approx_h.max() / 3) if len(r) > 5]
    amort_bars = [r for r in _runs(amort_h > amort_h.max() / 3) if len(r) > 5]  # legend patches are short
    assert len(approx_bars) == 1 and len(amort_bars) == 2
    assert approx_bars[0].max() < amort_bars[0].min()  # 0 left of 0.5 left of 1.0
    # heights proportional to the counts 10, 4, 6 (medians: the legend may overlap a bar)
    heights = [np.median(h[bar]) for h, bar in [(approx_h, approx_bars[0]), (amort_h, amort_bars[0]),
                                                (amort_h, amort_bars[1])]]
    np.testing.assert_allclose(np.array(heights) / heights[0], [1.0, 0.4, 0.6], atol=0.03)


def test_plot_posteriors_2d(tmp_path):
    """One panel per datapoint; each method in its colour where its draws are."""
    rng = np.random.default_rng(0)
    where = {"MCMC": (3.0, 0.0), "guide": (-3.0, 0.0), "other": (0.0, 3.0)}  # right, left, top
    colours = {"MCMC": "0.35", "guide": "tab:red", "other": "tab:blue"}
    panels = [{label: rng.normal(size=(300, 2)) * 0.5 + centre for label, centre in where.items()}
              for _ in range(3)]
    panels[1]["guide"] = torch.as_tensor(panels[1]["guide"])
    out = tmp_path / "posteriors.png"
    img = assert_png(plots.plot_posteriors_2d(panels, out, titles=["a", "b", "c"], title="posteriors"), out)
    one = mpimg.imread(plots.plot_posteriors_2d(panels[:1], tmp_path / "one.png"))
    assert img.shape[1] == 3 * one.shape[1]  # the figure widens with the number of panels
    panel_width = one.shape[1]
    for i in range(3):
        panel = img[:, i * panel_width:(i + 1) * panel_width]
        centre = {}
        for label, colour in colours.items():
            rows, cols = np.nonzero(_close(panel, colour, tol=0.05))
            assert len(rows) > 250, (i, label)  # the ellipses, not just a legend entry
            centre[label] = rows.mean(), cols.mean()
        assert centre["guide"][1] < centre["other"][1] < centre["MCMC"][1]
        assert centre["other"][0] < min(centre["guide"][0], centre["MCMC"][0])
    with pytest.raises(ValueError):
        plots.plot_posteriors_2d([], tmp_path / "none.png")


# ---------------------------------------------------------------------------
# the learned density of a trained model
# ---------------------------------------------------------------------------


def test_learned_density_concentrates_on_the_circle(tmp_path):
    torch.manual_seed(0)
    run = ppl_genmodels.fit("vae", "circle", tmp_path / "c", epochs=60, n_samples=2000, hidden=[32, 32],
                            lr=1e-2, batch_size=64, patience=None, eval_k=5, seed=0,
                            progress=False, plots=False)
    torch.manual_seed(0)
    gx, gy, log_p = log_density_grid(run.model, run.data.train.x, grid_size=40, k=100)
    assert log_p.shape == (40, 40) and np.isfinite(log_p).all()
    xx, yy = np.meshgrid(gx, gy)  # log_p[i, j] is at (gx[j], gy[i])
    radius = np.hypot(xx, yy)
    mass = np.exp(log_p - log_p.max())
    mass /= mass.sum()
    band = (radius > 0.8) & (radius < 1.2)
    # measured: ~0.74-0.80 of the mass (seeds 0-7) in ~0.28 of the grid's area
    assert band.mean() < 0.3
    assert mass[band].sum() > 0.6
    # the centre of the circle, where there is no data, is less likely than the ring:
    # measured ~1.4 nats below the ring's median at its most likely point
    ring = (radius > 0.9) & (radius < 1.1)
    assert log_p[radius < 0.3].max() < np.median(log_p[ring]) - 0.7
