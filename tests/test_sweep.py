"""The sweep: a grid of fit options, one run per cell on one split, one table; and active units.

Every cell is tiny (digits capped at 120 examples, an 8-unit VAE with a 2-D latent,
1-2 epochs, the ladder elbo,iwae:20), so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from conftest import make_ppca, run_cli
from ppl_genmodels import ConfigError, load_run, sweep
from ppl_genmodels.evaluation import active_units
from ppl_genmodels.runs import LOCK_FILE, Run, RunLocked
from ppl_genmodels.sweep import SPEC_FILE, TABLE_FILE, UNITS_FILE, cell_name, plan_sweep, read_spec
from ppl_genmodels.train import TrainingDiverged

sweep_module = sys.modules["ppl_genmodels.sweep"]  # the package's attribute `sweep` is the function

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"model": "vae", "data": "digits", "epochs": 1, "max_examples": 120, "hidden": [8], "z_dim": 2,
        "batch_size": 64, "evaluate": {"estimators": "elbo,iwae:20"}}
GRID = {"elbo": ["trace", "iwae"], "particles": [1, 2]}
COLUMNS = ["run_dir", "elbo", "particles", "epochs_run", "best_epoch", "train_seconds", "test_elbo", "test_elbo_se",
           "test_iwae20", "test_iwae20_se", "log_px", "log_px_se", "log_px_source", "gap", "active_units"]
NAMES = ["elbo=trace,particles=1", "elbo=trace,particles=2", "elbo=iwae,particles=1", "elbo=iwae,particles=2"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("sweep") / "grid"
        table = sweep({**BASE, "grid": GRID}, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, table


# --------------------------------------------------------------------------- #
# a grid
# --------------------------------------------------------------------------- #


def test_a_2x2_grid_gives_four_runs_and_a_table_of_finite_values(swept):
    out, table = swept
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(NAMES + ["plots"])
    saved = pd.read_csv(out / TABLE_FILE)
    assert list(saved.columns) == COLUMNS == list(table.columns)
    assert saved["run_dir"].tolist() == NAMES
    assert saved["elbo"].tolist() == ["trace", "trace", "iwae", "iwae"]
    assert saved["particles"].tolist() == [1, 2, 1, 2]
    numbers = saved.drop(columns=["run_dir", "elbo", "log_px_source"])
    assert numbers.map(math.isfinite).all().all()
    assert (saved["epochs_run"] == 1).all() and (saved["best_epoch"] == 1).all()
    assert (saved["log_px_source"] == "iwae20").all()
    assert saved["gap"].tolist() == pytest.approx((saved["test_iwae20"] - saved["test_elbo"]).tolist())
    assert saved["active_units"].between(0, 2).all()
    assert json.loads((out / SPEC_FILE).read_text())["grid"] == GRID
    assert not (out / LOCK_FILE).exists()


def test_every_cell_is_an_ordinary_run_on_the_same_split(swept):
    out, _ = swept
    runs = [load_run(out / name) for name in NAMES]
    for run in runs[1:]:
        for split in ("train", "val", "test"):
            assert torch.equal(run.data.split(split).index, runs[0].data.split(split).index)
    for run, (elbo, particles) in zip(runs, [(e, p) for e in GRID["elbo"] for p in GRID["particles"]]):
        assert (run.config.elbo, run.config.particles, run.config.seed) == (elbo, particles, 0)
        index = run.results()
        assert index[["name", "kind"]].values.tolist() == [["sweep", "evaluation"]]
        folder = run.result_set("evaluation", "sweep")
        assert run.summary()["estimator"].tolist() == ["elbo", "iwae20"]
        units = pd.read_csv(folder / UNITS_FILE)
        assert list(units.columns) == ["site", "dim", "variance", "active"]
        assert units["site"].tolist() == ["z", "z"] and units["dim"].tolist() == [0, 1]


def test_the_sweep_draws_its_figures(swept):
    out, _ = swept
    for name in ("validation.png", "logpx.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cell_names_are_safe_directory_names():
    assert cell_name({"elbo": "iwae", "particles": 5, "seed": 0}) == "elbo=iwae,particles=5,seed=0"
    assert cell_name({"elbo": "renyi:0.5", "hidden": [64, 64], "scale": None}) == \
        "elbo=renyi_0.5,hidden=64-64,scale=none"
    assert cell_name({"data_arg": "a/b"}) == "data_arg=a_b"
    assert len(cell_name({"model_args": {f"key{i}": "v" * 20 for i in range(20)}})) <= 200


# --------------------------------------------------------------------------- #
# specs: files, and what is refused
# --------------------------------------------------------------------------- #

TOML = textwrap.dedent("""
    model = "vae"
    data = "digits"
    epochs = 1
    max_examples = 120
    hidden = [8]
    z_dim = 2
    batch_size = 64

    [grid]
    particles = [1, 2]

    [evaluate]
    estimators = "elbo,iwae:20"
    n = 30
""")


def test_toml_and_json_specs_read_alike_and_run(tmp_path):
    toml_file, json_file = tmp_path / "spec.toml", tmp_path / "spec.json"
    toml_file.write_text(TOML)
    json_file.write_text(json.dumps(read_spec(toml_file)))
    assert read_spec(toml_file) == read_spec(json_file)
    assert read_spec(toml_file)["grid"] == {"particles": [1, 2]}
    assert plan_sweep(json_file).record() == plan_sweep(toml_file).record()

    code, printed, err = run_cli(["sweep", toml_file, "--out", tmp_path / "toml", "--quiet"])
    assert code == 0, err
    assert "[1/2]" not in err  # --quiet: no progress lines
    assert "particles=2" in printed and "test_iwae20" in printed
    table = sweep(json_file, tmp_path / "json", progress=False)
    assert table["run_dir"].tolist() == ["particles=1", "particles=2"]
    summary = load_run(tmp_path / "json" / "particles=2").summary()
    assert summary["n"].tolist() == [30, 30]
    from_toml = pd.read_csv(tmp_path / "toml" / TABLE_FILE)
    assert list(from_toml.columns) == list(table.columns)
    assert from_toml["test_iwae20"].tolist() == pytest.approx(table["test_iwae20"].tolist(), rel=1e-6)


def _spec(**changes) -> dict:
    spec = {**BASE, "grid": dict(GRID)}
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


BAD = {
    "unknown top-level key": (_spec(learning_rate=0.1), "unknown key(s) learning_rate"),
    "key set by fit itself": (_spec(model_sha256="abc"), "unknown key(s) model_sha256"),
    "unknown grid key": (_spec(grid={"elbo": ["trace"], "nonsense": [1]}), "unknown grid option 'nonsense'"),
    "unknown evaluate key": (_spec(evaluate={"estimators": "elbo", "k": 5}), "unknown key(s) k in evaluate"),
    "no grid": (_spec(grid=None), "needs a grid table"),
    "empty grid": (_spec(grid={}), "needs a grid table"),
    "empty list": (_spec(grid={"elbo": []}), "grid.elbo is an empty list"),
    "not a list": (_spec(grid={"particles": 5}), "grid.particles must be a list"),
    "grid key also at the top": (_spec(particles=3), "particles is both a top-level option and a grid option"),
    "data option in the grid": (_spec(grid={"max_examples": [60, 120]}), "max_examples cannot be a grid option"),
    "repeated value": (_spec(grid={"particles": [1, 1]}), "grid.particles repeats the value 1"),
    "wrong type": (_spec(epochs="2"), "epochs = '2' has the wrong type"),
    "wrong type in the grid": (_spec(grid={"particles": ["5"]}), "grid.particles = '5' has the wrong type"),
    "a bad cell": (_spec(grid={"particles": [1, 0]}), "cell particles=0: particles must be >= 1"),
    "unknown objective": (_spec(grid={"elbo": ["trace", "nope"]}), "cell elbo=nope: "),
    "bad estimator": (_spec(evaluate={"estimators": "elbo,foo"}), "evaluate.estimators: unknown estimator 'foo'"),
    "exact without a closed form": (_spec(evaluate={"estimators": "elbo,exact"}), "has no exact_log_marginal"),
    "bad n": (_spec(evaluate={"n": 0}), "evaluate.n must be an integer >= 1"),
    "bad data option": (_spec(max_examples=-1), "max_examples"),
    "bad model argument": (_spec(model_args={"nonsense": 1}), "no constructor argument 'nonsense'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_spec_is_refused_before_anything_is_written(tmp_path, case):
    spec, message = BAD[case]
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        sweep(spec, out, progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_bad_spec_files_are_one_line_errors_with_exit_status_2(tmp_path):
    (tmp_path / "broken.toml").write_text("model = \n")
    (tmp_path / "spec.yaml").write_text("model: vae\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "unknown.json").write_text(json.dumps(_spec(grid={"elbo": ["trace"], "speed": [1]})))
    for name, message in (("broken.toml", "is not valid TOML"), ("spec.yaml", "must be a .toml or .json file"),
                          ("list.json", "must hold a table"), ("missing.toml", "does not exist"),
                          ("unknown.json", "unknown grid option 'speed'")):
        code, printed, err = run_cli(["sweep", tmp_path / name, "--out", tmp_path / "out", "--quiet"])
        assert code == 2 and printed == "", name
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (name, err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- #
# stopping, starting again, and one sweep per directory
# --------------------------------------------------------------------------- #

RESTART_SPEC = {**BASE, "epochs": 2, "grid": {"particles": [1, 2, 3]}}
KEPT = ("checkpoint.pt", "best.pt", "metrics.csv", "results.csv", "config.json")


def _files(folder) -> dict:
    return {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns) for name in KEPT}


def test_a_stopped_sweep_starts_again_where_it_stopped(tmp_path, monkeypatch):
    out, real_fit, calls = tmp_path / "sweep", sweep_module.fit, []

    def stopped_in_the_third_cell(*args, **kwargs):
        calls.append(kwargs.get("resume", False))
        if len(calls) == 3:  # one epoch of two, then the sweep is stopped (Ctrl-C)
            real_fit(*args, **{**kwargs, "epochs": 1})
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "fit", stopped_in_the_third_cell)
    with pytest.raises(KeyboardInterrupt):
        sweep(RESTART_SPEC, out, progress=False)
    partial = pd.read_csv(out / TABLE_FILE)
    assert partial["run_dir"].tolist() == ["particles=1", "particles=2"]  # a valid partial table
    assert not (out / LOCK_FILE).exists()
    third = out / "particles=3"
    assert len(pd.read_csv(third / "metrics.csv")) == 1 and not (third / Run.RESULTS_FILE).exists()
    before = {name: _files(out / name) for name in ("particles=1", "particles=2")}

    def spy(*args, **kwargs):
        calls.append(kwargs.get("resume", False))
        return real_fit(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(sweep_module, "fit", spy)
    table = sweep(RESTART_SPEC, out, progress=False)
    assert calls == [True]  # only the unfinished cell is trained again, resumed from its checkpoint
    assert {name: _files(out / name) for name in before} == before  # finished cells untouched
    assert table["run_dir"].tolist() == ["particles=1", "particles=2", "particles=3"]
    assert table["epochs_run"].tolist() == [2, 2, 2]
    assert pd.read_csv(out / TABLE_FILE)[["run_dir", "test_elbo"]].equals(table[["run_dir", "test_elbo"]])
    assert table.loc[:1, "test_elbo"].tolist() == partial["test_elbo"].tolist()

    calls.clear()
    bigger = {**RESTART_SPEC, "grid": {"particles": [1, 2, 3, 4]}}  # new grid values: only the new cell trains
    assert sweep(bigger, out, progress=False)["run_dir"].tolist()[-1] == "particles=4" and calls == [False]
    with pytest.raises(ConfigError, match="holds a sweep with other options"):
        sweep({**RESTART_SPEC, "epochs": 3}, out, progress=False)


def test_a_diverged_cell_is_left_out_and_the_others_go_on(tmp_path, monkeypatch):
    real_fit = sweep_module.fit

    def diverging(*args, **kwargs):
        if kwargs.get("particles") == 1:
            raise TrainingDiverged("training stopped: the loss became nan at epoch 1, step 1")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "fit", diverging)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**BASE, "grid": {"particles": [1, 2]}}))
    code, printed, err = run_cli(["sweep", spec, "--out", tmp_path / "out"])
    assert code == 1
    assert "[1/2] particles=1: training stopped: the loss became nan" in err
    assert err.strip().splitlines()[-1] == ("error: training diverged in 1 cell(s), left out of the table: "
                                            "particles=1")
    assert pd.read_csv(tmp_path / "out" / TABLE_FILE)["run_dir"].tolist() == ["particles=2"]


def test_what_is_in_the_way_of_a_cell_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "particles=2").mkdir(parents=True)
    (out / "particles=2" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="particles=2 exists and is not a run directory"):
        sweep({**BASE, "grid": {"particles": [1, 2]}}, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["particles=2"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists as a file"):
        sweep({**BASE, "grid": {"particles": [1]}}, tmp_path / "file", progress=False)


HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()
""")


def test_two_sweeps_cannot_share_a_directory(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK_FILE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match="in use by process"):
            sweep({**BASE, "grid": {"particles": [1]}}, out, progress=False)
    finally:
        holder.stdin.close()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no cell was trained


# --------------------------------------------------------------------------- #
# active units
# --------------------------------------------------------------------------- #


def _guide_mean_variance(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """diag(A Cov(x) A^T): the variance over x of the guide mean A x + b."""
    centred = x - x.mean(0)
    return torch.diag(A @ (centred.T @ centred / x.shape[0]) @ A.T)


def test_active_units_of_ppca_match_the_closed_form():
    model, x = make_ppca(300)
    with torch.no_grad():
        model.guide_A.copy_(torch.tensor([[0.5, -0.2, 0.1, 0.0, 0.3], [0.001, 0.0, -0.002, 0.001, 0.0]],
                                         dtype=torch.float64))
    result = active_units(model, x, samples=3)
    expected = _guide_mean_variance(model.guide_A.detach(), x)
    assert result.variance["z"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected[0] > 1e-2 > expected[1]
    assert (result.counts, result.total, result.dims, result.n) == ({"z": 1}, 1, 2, 300)
    model.set_exact_guide()
    exact = active_units(model, x, batch_size=7)  # in batches of 7 datapoints
    assert exact.variance["z"] == pytest.approx(_guide_mean_variance(model.guide_A.detach(), x), rel=1e-9)
    assert exact.total == 2


class DeadDimension:
    """A pair with two latent sites: ``a`` (2-D, its guide mean linear in x), ``b`` (3-D, one dimension dead).

    The guide of ``b`` is a transformed distribution, which has no ``.mean``: its
    E_q[b | x] is the average of the draws.
    """

    def __init__(self):
        self.w = torch.tensor([[1.0, 0.0], [0.5, 2.0]], dtype=torch.float64)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("b", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(x, 1.0).to_event(1), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(x @ self.w, 0.1).to_event(1))
            loc = torch.stack([x[:, 0], 3.0 * x[:, 1], torch.full_like(x[:, 0], 0.7)], -1)  # the third is dead
            base = dist.Normal(loc, 0.05)
            moved = dist.TransformedDistribution(base, [dist.transforms.AffineTransform(0.0, 1.0)])
            pyro.sample("b", moved.to_event(1))


def test_a_dead_dimension_is_not_active_and_draws_stand_in_for_a_missing_mean():
    torch.manual_seed(0)
    x = torch.randn(400, 2, dtype=torch.float64) * torch.tensor([1.0, 0.5], dtype=torch.float64)
    pair = DeadDimension()
    with pytest.raises(NotImplementedError):
        dist.TransformedDistribution(dist.Normal(0.0, 1.0), []).mean
    result = active_units(pair, x, samples=400, generator=torch.Generator().manual_seed(0))
    assert result.counts == {"a": 2, "b": 2} and result.total == 4 and result.dims == 5
    assert result.variance["a"] == pytest.approx(_guide_mean_variance(pair.w.T, x), rel=1e-9)
    b_exact = _guide_mean_variance(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)), x)
    assert result.variance["b"][:2] == pytest.approx(b_exact, rel=0.02)  # the draws' noise: 0.05^2 / 400
    assert result.variance["b"][2] < 1e-4
    again = active_units(pair, x, samples=400, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.variance["b"], result.variance["b"])  # the generator fixes the draws


def test_cells_that_differ_in_seed_share_one_split(tmp_path):
    from ppl_genmodels import load_run

    spec = {"model": "vae", "data": "digits", "max_examples": 120, "hidden": [8], "z_dim": 2, "epochs": 1,
            "grid": {"seed": [1, 2]}, "evaluate": {"estimators": "elbo", "n": 5}}
    sweep_module = sys.modules["ppl_genmodels.sweep"]
    table = sweep_module.sweep(spec, tmp_path / "sweep", progress=False)
    runs = [load_run(tmp_path / "sweep" / d) for d in table["run_dir"]]
    assert [r.config.seed for r in runs] == [1, 2] and {r.config.data_seed for r in runs} == {0}
    for part in ("train", "val", "test"):
        assert torch.equal(runs[0].data.split(part).index, runs[1].data.split(part).index)
    assert not torch.equal(runs[0].model.encoder[0].weight, runs[1].model.encoder[0].weight)


def test_the_last_epoch_can_be_evaluated_instead_of_the_best(tmp_path):
    spec = {"model": "vae", "data": "digits", "max_examples": 120, "hidden": [8], "z_dim": 2, "epochs": 3,
            "patience": 0, "grid": {"elbo": ["trace"]}, "evaluate": {"estimators": "elbo", "n": 5, "weights": "last"}}
    sweep_module = sys.modules["ppl_genmodels.sweep"]
    table = sweep_module.sweep(spec, tmp_path / "sweep", progress=False)
    assert table["best_epoch"].tolist() == [3]
    with pytest.raises(ConfigError, match="evaluate.weights must be 'best'"):
        sweep_module.sweep({**spec, "evaluate": {"weights": "final"}}, tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()


def test_the_command_line_runs_a_sweep_and_refuses_a_bad_spec(tmp_path, capsys):
    from ppl_genmodels.cli import main

    spec = tmp_path / "spec.toml"
    spec.write_text('model = "vae"\ndata = "digits"\nmax_examples = 120\nhidden = [8]\nz_dim = 2\nepochs = 1\n'
                    '[grid]\nelbo = ["trace", "iwae"]\n[evaluate]\nestimators = "elbo,iwae:10"\nn = 5\n')
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "elbo=trace" in printed and "elbo=iwae" in printed
    assert len(pd.read_csv(tmp_path / "sweep" / TABLE_FILE)) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "vae", "grid": {"elbo": ["trace"]}, "lr_typo": 1}))
    assert main(["sweep", str(bad), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "lr_typo" in error and "\n" not in error
    assert not (tmp_path / "bad").exists()
