"""Every example runs (with fewer epochs) and answers its question."""

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

from conftest import table_rows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_circle_manifold_draws_a_doughnut(tmp_path, capsys):
    out = tmp_path / "circle"
    ring, centre = load("circle_manifold").main(["--epochs", "25", "--grid", "30", "--k", "100", "--out", str(out), "--quiet"])
    assert (out / "doughnut.png").read_bytes()[:4] == b"\x89PNG"
    assert ring > centre + 0.3  # the density is higher on the circle than in its empty middle
    assert "times denser" in capsys.readouterr().out


def test_declare_a_model_trains_and_reloads(tmp_path, capsys):
    out = tmp_path / "laplace"
    load("declare_a_model").main(["--epochs", "3", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert "reloaded LaplaceVAE" in text and "iwae100" in text
    assert (out / "metrics.csv").is_file() and (out / "plots" / "density.png").is_file()


def test_partition_function_is_exact_in_2d_and_explodes_with_dimension(tmp_path, capsys):
    out = tmp_path / "partition"
    result = load("partition_function").main(["--quick", "--out", str(out), "--quiet"])
    assert (out / "densities.png").read_bytes()[:4] == b"\x89PNG"
    cost = pd.read_csv(out / "quadrature_cost.csv")
    assert {1, 2, 3, 4, 5, 6, 10, 784} <= set(cost["d"]) and set(cost["how"]) == {"measured", "extrapolated"}
    assert cost.loc[cost["d"] == 784, "how"].item() == "extrapolated"
    # The EBM's log Z on the training grid (64 per axis) agrees with a grid 4 times finer to 0.01 nats.
    assert abs(result["log_z"] - result["log_z_fine"]) < 0.01
    assert math.isfinite(result["ebm_test_ll"]) and math.isfinite(result["vae_test_ll"])
    rows = table_rows(capsys.readouterr().out)
    for d in ("1", "2", "3", "6", "10", "784"):
        assert d in rows and rows[d][-1] in ("measured", "extrapolated"), d
