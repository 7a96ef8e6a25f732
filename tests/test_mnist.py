"""Integration on the real MNIST files (skipped where ../shared/data/mnist is absent)."""

from pathlib import Path

import numpy as np
import pytest

from ppl_genmodels import fit, load_run

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
pytestmark = [
    pytest.mark.mnist,
    pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").is_file(), reason=f"MNIST IDX files not found in {MNIST}"),
]


def test_vae_on_mnist_trains_and_reloads(tmp_path):
    run = fit("vae", "mnist", tmp_path / "vae", data_dir=str(MNIST), epochs=2, max_examples=600, hidden=[64],
              z_dim=8, eval_k=20, progress=False)
    summary = run.summary().set_index("estimator")
    assert np.isfinite(summary["mean"]).all()
    assert summary.loc["iwae20", "mean"] >= summary.loc["elbo", "mean"]
    assert summary.loc["elbo", "mean"] < -100  # 784 binary pixels: far from 0 nats after two short epochs
    again = load_run(tmp_path / "vae")
    assert again.data.x_dim == 784 and again.data.image_shape == (28, 28)


def test_cvae_completes_hidden_quadrants(tmp_path):
    run = fit("cvae", "mnist", tmp_path / "cvae", data_dir=str(MNIST), condition="quadrants", visible_quadrants=1,
              epochs=2, max_examples=600, hidden=[64], z_dim=8, eval_k=10, progress=False)
    assert run.data.x_dim == 3 * 196 and run.data.y_dim == 196
    assert (tmp_path / "cvae" / "plots" / "completions.png").is_file()
    assert np.isfinite(run.summary()["mean"]).all()
