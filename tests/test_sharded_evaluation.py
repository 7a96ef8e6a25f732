"""Evaluation, BDMC and comparison give the same bits whatever the batch size and the number of processes.

Every datapoint draws from its own random stream (ppl_genmodels.streams) and every
vectorized pass holds a multiple of PAD datapoints, so a datapoint's results do not
depend on which others share its pass or its process. The multi-process runs start
real gloo workers through torchrun's launcher (``--processes N``), one thread each,
and bound their wait with a timeout so that a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from ppl_genmodels import bdmc_run, compare_run, evaluate_run, fit
from ppl_genmodels.inference.importance import MAX_CHUNK, PAD, particle_chunk, pass_size, padded_passes

ROOT = Path(__file__).resolve().parents[1]
#: a bound on any one multi-process command: they take seconds, a hang fails the test instead of blocking it
WAIT = 300
ESTIMATORS = "elbo,iwae:50,ais:20"
COUNT = 70  # test points: batches of 32, 64 and 96 (padded) all split them differently
COMPARE = ["--count", "6", "--chains", "2", "--samples", "20", "--warmup", "20", "--local-steps", "10",
           "--logp-k", "50"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sharded") / "vae"
    return fit("vae", "digits", out, epochs=2, max_examples=300, hidden=[32], z_dim=4, progress=False, plots=False,
               evaluate=False)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _cli(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "ppl_genmodels", *map(str, args), "--quiet"], capture_output=True,
                          text=True, timeout=WAIT, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def _same_table(path: Path, frame: pd.DataFrame, *, ignore=()) -> None:
    """The CSV at ``path`` holds exactly ``frame`` (columns in ``ignore``, e.g. timings, excepted)."""
    written = pd.read_csv(path)
    pd.testing.assert_frame_equal(written.drop(columns=list(ignore)), frame.drop(columns=list(ignore)),
                                  check_exact=True)


@pytest.mark.parametrize("n, size", [(1, PAD), (70, PAD), (70, 2 * PAD), (100, 3 * PAD)])
def test_padded_passes_cover_every_datapoint_once_in_multiples_of_pad(n, size):
    covered = []
    for begin, stop, rows in padded_passes(n, size):
        assert len(rows) % PAD == 0 and len(rows) <= size
        assert rows[: stop - begin].tolist() == list(range(begin, stop)) and (rows[stop - begin :] == stop - 1).all()
        covered += list(range(begin, stop))
    assert covered == list(range(n))


def test_pass_sizes_are_multiples_of_pad_and_chunks_depend_on_k_alone():
    assert [pass_size(50, batch_size=b) for b in (1, 3, 32, 33)] == [PAD, PAD, PAD, 2 * PAD]
    assert pass_size(5000) == PAD  # at least PAD datapoints, however many particles
    assert pass_size(10, rows_per_pass=10_000) == 1000 // PAD * PAD
    assert [particle_chunk(k) for k in (1, 50, MAX_CHUNK, 5000)] == [1, 50, MAX_CHUNK, MAX_CHUNK]


def test_evaluation_does_not_depend_on_the_batch_size(run):
    _, reference = evaluate_run(run, estimators=ESTIMATORS, n=COUNT, progress=False, name="default")
    for batch_size in (1, 3, 8, 33, 50, 100):
        _, per = evaluate_run(run, estimators=ESTIMATORS, n=COUNT, batch_size=batch_size, progress=False,
                              name=f"b{batch_size}")
        pd.testing.assert_frame_equal(per, reference, check_exact=True)
        written = run.path / "evaluation" / f"b{batch_size}" / "per_datapoint.csv"
        assert written.read_bytes() == (run.path / "evaluation" / "default" / "per_datapoint.csv").read_bytes()
    _, other_seed = evaluate_run(run, estimators="iwae:50", n=COUNT, seed=1, progress=False, save=False)
    assert not (other_seed["iwae50"] == reference["iwae50"]).any()  # the seed reaches every stream


@pytest.mark.parametrize("processes", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_evaluation_does_not_depend_on_the_number_of_processes(run, processes):
    _, per = evaluate_run(run, estimators=ESTIMATORS, n=COUNT, progress=False, save=False)
    _cli("evaluate", run.path, "--estimators", ESTIMATORS, "--count", COUNT, "--processes", processes,
         "--name", f"p{processes}")
    folder = run.path / "evaluation" / f"p{processes}"
    _same_table(folder / "per_datapoint.csv", per)
    summary = pd.read_csv(folder / "summary.csv")
    assert summary["estimator"].tolist() == ["elbo", "iwae50", "ais20"] and (summary["n"] == COUNT).all()


def test_more_processes_than_datapoints_still_finish(run):
    _, per = evaluate_run(run, k=5, n=1, progress=False, save=False)
    _cli("evaluate", run.path, "--k", 5, "--count", 1, "--processes", 2, "--name", "one-point")
    _same_table(run.path / "evaluation" / "one-point" / "per_datapoint.csv", per)


def test_bdmc_does_not_depend_on_the_number_of_processes(run):
    summary, per = bdmc_run(run, n=20, num_steps=20, chains=4, batch_size=5, progress=False, name="p1")
    _cli("bdmc", run.path, "--count", 20, "--steps", 20, "--chains", 4, "--processes", 2, "--name", "p2")
    folder = run.path / "bdmc" / "p2"
    _same_table(folder / "per_datapoint.csv", per)
    _same_table(folder / "summary.csv", summary, ignore=["seconds"])
    assert (run.path / "bdmc" / "p1" / "per_datapoint.csv").read_bytes() == (folder / "per_datapoint.csv").read_bytes()


def test_compare_does_not_depend_on_the_number_of_processes(run):
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged chains: these runs are tiny
        summary, per, _ = compare_run(run, n=6, chains=2, samples=20, warmup=20, local_steps=10, logp_k=50,
                                      progress=False, name="p1")
    _cli("compare", run.path, *COMPARE, "--processes", 2, "--name", "p2")
    one, two = run.path / "compare" / "p1", run.path / "compare" / "p2"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    _same_table(two / "per_datapoint.csv", per)
    _same_table(two / "summary.csv", summary, ignore=["seconds"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = az.from_netcdf(one / "posterior.nc"), az.from_netcdf(two / "posterior.nc")
    assert first.groups() == second.groups()
    for group in first.groups():  # the same draws; only the creation times differ
        assert getattr(first, group).equals(getattr(second, group)), group
