"""Tests for ppl_genmodels.plots."""

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch

from ppl_genmodels import plots

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
    assert_png(result, out)


def test_plot_metrics_all_val_nan_and_overwrite(tmp_path):
    df = metrics_frame()
    df["val_elbo"] = np.nan
    out = tmp_path / "metrics.png"
    plots.plot_metrics(df, out)
    plots.plot_metrics(metrics_frame(), str(out))  # overwrite, str path
    assert_png(out, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png"]


def test_plot_metrics_missing_column(tmp_path):
    with pytest.raises(ValueError, match="val_elbo"):
        plots.plot_metrics(metrics_frame().drop(columns="val_elbo"), tmp_path / "m.png")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# image_grid / plot_reconstructions
# ---------------------------------------------------------------------------


def test_image_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(7, 28, 28)) * 3 + 10  # arbitrary range
    out = tmp_path / "grid.png"
    assert_png(plots.image_grid(images, out, title="samples"), out)
    out2 = tmp_path / "grid2.png"
    assert_png(plots.image_grid(images, out2, nrow=2, vmin=0, vmax=20), out2)


def test_image_grid_torch(tmp_path):
    images = torch.rand(5, 8, 6, requires_grad=True) * 2
    out = tmp_path / "grid_torch.png"
    assert_png(plots.image_grid(images, out), out)


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


def test_plot_reconstructions(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((6, 28, 28))
    out = tmp_path / "recon.png"
    assert_png(plots.plot_reconstructions(x, x + 0.1 * rng.random(x.shape), out,
                                          title="reconstructions"), out)


def test_plot_reconstructions_many_and_torch(tmp_path):
    x = torch.rand(23, 12, 12)
    out = tmp_path / "recon_many.png"
    assert_png(plots.plot_reconstructions(x, torch.sigmoid(x), out), out)


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
    assert_png(result, out)


def test_plot_density_2d_torch_and_minimal(tmp_path):
    gx, gy, logd = top_left_log_density()
    out = tmp_path / "density_torch.png"
    result = plots.plot_density_2d(torch.as_tensor(gx), torch.as_tensor(gy),
                                   torch.as_tensor(logd), out,
                                   data=torch.zeros(10, 2))
    assert_png(result, out)


def test_plot_density_2d_nan_raises(tmp_path):
    gx, gy, logd = top_left_log_density()
    logd[0, 0] = np.nan
    out = tmp_path / "nan.png"
    with pytest.raises(ValueError, match="NaN"):
        plots.plot_density_2d(gx, gy, logd, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def _close(pixels, colour, tol=0.08):
    return (np.abs(pixels[..., :3] - np.asarray(colour)[:3]) < tol).all(axis=-1)


def test_plot_density_2d_png_right_side_up(tmp_path):
    """Read back the PNG: the bright region of the heat map is its top-left quarter."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    gx, gy, logd = top_left_log_density()
    out = tmp_path / "orient.png"
    img = mpimg.imread(plots.plot_density_2d(gx, gy, logd, out))
    left_half = img[:, : img.shape[1] // 2]
    bright = _close(left_half, cmap(1.0))
    dark = _close(left_half, cmap(0.0))
    # heat map = first contiguous run of columns containing dark (density 0) pixels;
    # the colorbar further right is excluded that way
    cols = np.flatnonzero(dark.any(axis=0))
    run_end = cols[0]
    while run_end + 1 < left_half.shape[1] and dark[:, run_end + 1].any():
        run_end += 1
    c0, c1 = cols[0], run_end
    assert c1 - c0 > 100  # a real heat map, not a thin strip
    heat_bright, heat_dark = bright[:, c0:c1 + 1], dark[:, c0:c1 + 1]
    rows = np.flatnonzero((heat_bright | heat_dark).any(axis=1))
    r0, r1 = rows[0], rows[-1]
    height, width = r1 - r0 + 1, c1 - c0 + 1
    quad = lambda a, top, left: a[  # noqa: E731
        r0 + (0 if top else height // 2): r0 + (height // 2 if top else height),
        (0 if left else width // 2): (width // 2 if left else width)]
    assert quad(heat_bright, True, True).mean() > 0.9
    for top, left in [(True, False), (False, True), (False, False)]:
        assert quad(heat_bright, top, left).mean() < 0.1
        assert quad(heat_dark, top, left).mean() > 0.9


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


def test_plot_points_2d_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    path = plots.plot_points_2d(rng.normal(size=(50, 2)), tmp_path / "pts.png",
                                data=torch.as_tensor(rng.normal(size=(200, 2))),
                                true_manifold=rng.normal(size=(30, 2)), title="samples")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pts.png"]
