"""Tests for the ``ppl-genmodels`` command line (in-process through ``main``, plus two subprocess smoke tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli as _main
from conftest import table_rows as _table_rows
from ppl_genmodels import cli
from ppl_genmodels.config import ConfigError, RunConfig
from ppl_genmodels.runs import load_checkpoint, load_run, read_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MODELS = ROOT / "examples" / "my_models.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--hidden", "32", "--z-dim", "2", "--eval-k", "10", "--no-plots", "--quiet", "--device", "cpu"]




def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_error(code: int, out: str, err: str, *words: str):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------- #
# trained runs shared by several tests
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits"
    code, stdout, stderr = _main(["fit", "--data", "digits", "--epochs", "2", "--max-examples", "48",
                                  "--batch-size", "24", "--out", out, *QUICK])
    summary = pd.read_csv(out / "evaluation" / "fit" / "summary.csv") if code == 0 else None  # fit's own result set
    return out, code, stdout, stderr, summary


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "moons"
    code, stdout, stderr = _main(["fit", "--data", "moons", "--n-samples", "200", "--epochs", "2", "--out", out,
                                  "--hidden", "16", "--eval-k", "5", "--no-plots", "--quiet"])
    assert code == 0, stderr
    return out


def test_fit_prints_summary_table(digits_run):
    out, code, stdout, stderr, summary = digits_run
    assert code == 0, stderr
    assert f"run directory: {out}" in stdout
    rows = _table_rows(stdout)
    assert rows["estimator"][:3] == ["estimator", "mean", "stderr"]
    assert summary["estimator"].tolist() == ["elbo", "iwae10"]
    for name in ("elbo", "iwae10"):
        assert name in rows
        printed_mean = float(rows[name][1])
        assert printed_mean == pytest.approx(summary.set_index("estimator").loc[name, "mean"], abs=1e-4)
    assert float(rows["iwae10"][1]) >= float(rows["elbo"][1]) - 1e-3
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert not (out / "plots").exists()  # --no-plots
    config = read_config(out)
    assert (config.hidden, config.z_dim, config.data_options.max_examples, config.batch_size) == ([32], 2, 48, 24)


def test_fit_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--data", "digits", "--max-examples", "32", *QUICK]
    assert _main(["fit", "--epochs", "1", "--out", out, *args])[0] == 0
    code, stdout, stderr = _main(["fit", "--resume", "--out", out, "--epochs", "2", "--quiet", "--no-plots"])
    assert code == 0, stderr
    assert "elbo" in _table_rows(stdout)
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert read_config(out).epochs == 2
    index = pd.read_csv(out / "results.csv")  # the resumed fit's evaluation is a new set; the first one stays
    assert index["name"].tolist() == ["fit", "fit-2"]
    assert all((out / "evaluation" / name / "summary.csv").is_file() for name in ("fit", "fit-2"))


def test_fit_resume_refuses_a_missing_run(tmp_path):
    code, out, err = _main(["fit", "--resume", "--out", tmp_path / "absent", "--epochs", "2"])
    _assert_error(code, out, err, "not a run directory")


def test_fit_resume_keeps_saved_epochs_and_patience(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(RunConfig(epochs=200, patience=0).to_dict()))
    calls = []

    def recording_fit(*args, **kwargs):
        calls.append(kwargs)
        raise ConfigError("recorded")

    monkeypatch.setattr("ppl_genmodels.cli.fit", recording_fit)
    code, _, err = _main(["fit", "--resume", "--out", out])
    assert code == 2 and "recorded" in err and len(calls) == 1
    assert calls[0]["resume"] is True
    assert calls[0].get("epochs", 200) == 200
    assert calls[0].get("patience", 0) == 0


# --------------------------------------------------------------------------- #
# sample and evaluate
# --------------------------------------------------------------------------- #


def test_sample_image_run(digits_run):
    out = digits_run[0]
    code, stdout, stderr = _main(["sample", out, "--count", "16", "--seed", "1"])
    assert code == 0, stderr
    png = out / "plots" / "samples_16.png"
    assert stdout.strip() == f"wrote {png}"
    assert _is_png(png)


def test_sample_to_chosen_path(digits_run, tmp_path):
    target = tmp_path / "figs" / "grid.png"
    code, stdout, stderr = _main(["sample", digits_run[0], "--count", "9", "--out", target])
    assert code == 0, stderr
    assert _is_png(target)


def test_sample_2d_run(moons_run):
    code, stdout, stderr = _main(["sample", moons_run, "--count", "16"])
    assert code == 0, stderr
    assert _is_png(moons_run / "plots" / "samples_16.png")


def test_evaluate(digits_run):
    out = digits_run[0]
    code, stdout, stderr = _main(["evaluate", out, "--k", "20", "--count", "30", "--quiet"])
    assert code == 0, stderr
    rows = _table_rows(stdout)
    assert "elbo" in rows and "iwae20" in rows
    folder = out / "evaluation" / "test-n30-elbo-iwae20"
    summary = pd.read_csv(folder / "summary.csv")
    per = pd.read_csv(folder / "per_datapoint.csv")
    assert summary["estimator"].tolist() == ["elbo", "iwae20"]
    assert (summary["n"] == 30).all()
    assert len(per) == 30 and "iwae20" in per.columns
    np.testing.assert_array_equal(per["index"].to_numpy(), load_run(out).data.test.index[:30].numpy())
    assert (per["iwae20"] >= per["elbo"] - 1e-4).all()
    assert float(rows["elbo"][1]) == pytest.approx(summary.loc[0, "mean"], abs=1e-4)
    assert str(folder / "per_datapoint.csv") in stdout
    pd.testing.assert_frame_equal(pd.read_csv(out / "evaluation" / "fit" / "summary.csv"), digits_run[4])  # kept


def test_evaluate_val_split(moons_run):
    code, stdout, stderr = _main(["evaluate", moons_run, "--k", "4", "--split", "val", "--quiet"])
    assert code == 0, stderr
    per = pd.read_csv(moons_run / "evaluation" / "val-all-elbo-iwae4" / "per_datapoint.csv")
    np.testing.assert_array_equal(per["index"].to_numpy(), load_run(moons_run).data.val.index.numpy())


# --------------------------------------------------------------------------- #
# listings
# --------------------------------------------------------------------------- #


def test_models_listing():
    code, stdout, stderr = _main(["models"])
    assert code == 0 and stderr == ""
    names = [line.split()[0] for line in stdout.splitlines()[1:]]
    assert names == ["vae", "cvae", "hvae", "ppca"]


def test_datasets_listing():
    code, stdout, _ = _main(["datasets"])
    assert code == 0
    names = [line.split()[0] for line in stdout.splitlines()[1:]]
    assert {"digits", "mnist", "circle", "moons", "swiss-roll"} <= set(names)


# --------------------------------------------------------------------------- #
# bad input: exit status 2, one line on stderr, nothing written
# --------------------------------------------------------------------------- #


def _npy(folder: Path, name: str, array) -> Path:
    path = folder / name
    np.save(path, np.asarray(array, dtype=np.float32))
    return path


@pytest.mark.parametrize(
    "make_args, words",
    [
        (lambda d: ["--model", "transformer"], ["unknown model 'transformer'"]),
        (lambda d: ["--data", "imagenet"], ["unknown dataset 'imagenet'"]),
        (lambda d: ["--data", _npy(d, "nan.npy", [[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]] * 10)], ["NaN"]),
        (lambda d: ["--data", _npy(d, "grey.npy", np.linspace(0, 3, 60).reshape(30, 2)), "--likelihood", "bernoulli"],
         ["Bernoulli", "0/1"]),
        (lambda d: ["--model", f"{d}/absent.py:Model", "--data", "moons"], ["does not exist"]),
        (lambda d: ["--data", "moons", "--lr", "0"], ["lr must be > 0"]),
    ],
)
def test_fit_bad_input(tmp_path, make_args, words):
    data_dir = tmp_path / "inputs"
    data_dir.mkdir()
    out = tmp_path / "run"
    code, stdout, stderr = _main(["fit", *make_args(data_dir), "--out", out, "--epochs", "1", "--quiet", "--no-plots"])
    _assert_error(code, stdout, stderr, *words)
    assert not out.exists()
    assert stdout == ""


def test_fit_existing_out_is_refused_and_untouched(digits_run):
    out = digits_run[0]
    before = _files(out)
    code, stdout, stderr = _main(["fit", "--data", "digits", "--out", out, "--epochs", "1", *QUICK])
    _assert_error(code, stdout, stderr, "already exists", "--resume")
    assert _files(out) == before


def test_sample_with_corrupt_checkpoint(digits_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digits_run[0], copy, ignore=shutil.ignore_patterns("plots"))
    (copy / "best.pt").write_bytes(b"\x00garbage" * 100)
    before = _files(copy)
    code, stdout, stderr = _main(["sample", copy, "--count", "16"])
    _assert_error(code, stdout, stderr, "best.pt")
    assert _files(copy) == before
    assert not (copy / "plots").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sample_a_run_trained_on_cuda_on_a_cpu_machine(digits_run, tmp_path):
    copy = tmp_path / "gpu-run"
    shutil.copytree(digits_run[0], copy, ignore=shutil.ignore_patterns("plots"))
    config = json.loads((copy / "config.json").read_text())
    config["device"] = "cuda"  # as written by `fit --device cuda` on a GPU machine
    (copy / "config.json").write_text(json.dumps(config))
    code, stdout, stderr = _main(["sample", copy, "--count", "4"])
    assert code == 0, stderr
    assert _is_png(copy / "plots" / "samples_4.png")


def test_sample_and_evaluate_bad_arguments(digits_run, tmp_path):
    _assert_error(*_main(["sample", tmp_path / "absent", "--count", "4"]), "not a run directory")
    before = _files(digits_run[0])
    _assert_error(*_main(["sample", digits_run[0], "--count", "0"]), "n must be >= 1")
    _assert_error(*_main(["evaluate", digits_run[0], "--k", "0", "--quiet"]), "k must be >= 1")
    assert _files(digits_run[0]) == before


def test_argument_parsing_errors_exit_with_status_2(capsys):
    for argv in (["fit", "--hidden", "32,x"], ["fit", "--model-arg", "novalue"], ["fit", "--elbo", "renyi"], []):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_parser_value_types():
    args = cli.build_parser().parse_args(["fit", "--hidden", "64,32", "--patience", "none",
                                          "--model-arg", "df=3.5", "--model-arg", "name=abc", "--model-arg", "df2=null"])
    assert args.hidden == [64, 32]
    assert args.patience is None
    assert dict(args.model_args) == {"df": 3.5, "name": "abc", "df2": None}


def test_diverged_training_exits_with_status_1(tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = _main(["fit", "--data", "digits", "--optimizer", "sgd", "--lr", "1e8", "--epochs", "3",
                                  "--max-examples", "64", "--out", out, *QUICK])
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training stopped") and "epoch" in lines[0]
    assert not (out / "evaluation").exists()


# --------------------------------------------------------------------------- #
# conditional and user models
# --------------------------------------------------------------------------- #


def test_cvae_on_labels_trains_and_samples(tmp_path):
    out = tmp_path / "cvae"
    code, stdout, stderr = _main(["fit", "--model", "cvae", "--condition", "label", "--data", "digits", "--epochs", "2",
                                  "--max-examples", "40", "--out", out, *QUICK])
    assert code == 0, stderr
    assert {"elbo", "iwae10"} <= set(_table_rows(stdout))
    assert read_config(out).data_options.condition == "label"
    assert _main(["sample", out, "--count", "20"])[0] == 0
    assert _is_png(out / "plots" / "samples_20.png")
    code, stdout, _ = _main(["sample", out, "--count", "8", "--label", "3", "--out", tmp_path / "threes.png"])
    assert code == 0 and _is_png(tmp_path / "threes.png")
    _assert_error(*_main(["sample", out, "--count", "8", "--label", "12"]), "out of range")


@pytest.mark.skipif(not EXAMPLE_MODELS.is_file(), reason="examples/my_models.py is not there yet")
def test_example_user_model_trains(tmp_path):
    out = tmp_path / "student"
    code, stdout, stderr = _main(["fit", "--model", f"{EXAMPLE_MODELS}:StudentTVAE", "--data", "moons", "--n-samples",
                                  "200", "--epochs", "2", "--hidden", "16", "--eval-k", "5", "--model-arg", "df=3.5",
                                  "--out", out, "--no-plots", "--quiet"])
    assert code == 0, stderr
    assert {"elbo", "iwae5"} <= set(_table_rows(stdout))
    config = read_config(out)
    assert config.model == f"{EXAMPLE_MODELS}:StudentTVAE" and config.model_args == {"df": 3.5}
    run = load_run(out)
    assert type(run.model).__name__ == "StudentTVAE"
    assert torch.exp(run.model.log_df).item() == pytest.approx(3.5)


# --------------------------------------------------------------------------- #
# the real entry points, in a subprocess
# --------------------------------------------------------------------------- #


def test_python_dash_m_lists_models():
    result = subprocess.run([sys.executable, "-m", "ppl_genmodels", "models"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ["vae", "cvae", "hvae", "ppca"]


def _console_script() -> str | None:
    beside = Path(sys.executable).parent / "ppl-genmodels"
    return str(beside) if beside.is_file() else shutil.which("ppl-genmodels")


@pytest.mark.skipif(_console_script() is None, reason="the ppl-genmodels console script is not installed")
def test_console_script_lists_datasets():
    result = subprocess.run([_console_script(), "datasets"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    names = {line.split()[0] for line in result.stdout.splitlines()[1:]}
    assert {"digits", "mnist", "circle", "moons", "swiss-roll"} <= names


def test_ais_start_keeps_its_old_spelling():
    for flag in ("--ais-start", "--ais-init"):
        assert cli.build_parser().parse_args(["evaluate", "run", flag, "guide"]).ais_start == "guide"
    assert cli.build_parser().parse_args(["evaluate", "run"]).ais_start == "prior"


@pytest.mark.parametrize("option", [["--model", "cvae"], ["--data", "moons"], ["--z-dim", "3"], ["--val-fraction", "0.2"]])
def test_resume_refuses_to_change_the_saved_configuration(tmp_path, option):
    code, out, err = _main(["fit", "--resume", "--out", tmp_path / "run", "--epochs", "3", *option])
    _assert_error(code, out, err, f"cannot change {option[0][2:].replace('-', '_')} with --resume")
    assert not (tmp_path / "run").exists()


def test_no_option_collides_with_torchruns_parser():
    """torchrun reads every option after ``-m ppl_genmodels`` too: an option that is a prefix of one of its
    flags is an (ambiguous) abbreviation there. None of ours may be."""
    import argparse

    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser()
    theirs = [s for action in torchrun._actions for s in action.option_strings]
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                assert not [t for t in theirs if t.startswith(flag)], (name, flag)
    argv = ["--standalone", "--nproc-per-node", "2", "-m", "ppl_genmodels", "evaluate", "RUN", "--count", "64",
            "--chains", "4", "--name", "x", "--quiet"]
    parsed = torchrun.parse_args(argv)
    assert parsed.training_script == "ppl_genmodels" and parsed.training_script_args == argv[5:]
