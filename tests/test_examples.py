"""Every example runs (with fewer epochs) and answers its question."""

import importlib.util
from pathlib import Path

import pytest

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
