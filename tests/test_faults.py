"""Fault injection: runs killed, crashed, raced, tampered with and corrupted, and what survives.

Every test is ``slow`` (run with ``pytest -q -m slow tests/test_faults.py -s``). The
runs are tiny (digits capped at 200 examples, one hidden layer of 16, a 2-D latent),
so a whole ``fit`` is mostly interpreter start-up.

- ``test_kill_9_at_random_moments_then_resume``: ``kill -9`` of ``fit`` subprocesses at a
  fixed-seed list of moments (two at a time), then ``fit --resume`` (or a fresh ``fit`` when
  the kill came before ``config.json``): metrics, final weights and files must equal an
  uninterrupted run's. Prints ``FAULTS: kills=..., survived=..., lost=...``.
- ``test_crash_after_each_write_then_resume``: in-process, ``KeyboardInterrupt`` right after
  the N-th ``atomic_write`` for every N of a 3-epoch run (and once more in the resume).
  Prints ``CRASHES: ...``.
- ``test_two_fits_race_for_one_directory``, ``test_readers_are_refused_while_a_resume_holds_the_lock``:
  the run directory's lock.
- ``test_tampered_model_file_*``: the SHA-256 check of a user's model file.
- ``test_stale_lock_*``: a ``.lock`` left by a dead process is not in force.
- ``test_corrupt_*``, ``test_checkpoint_with_a_pickled_class_*``, ``test_directory_bit_*``,
  ``test_zip_header_damage_*``: truncated, bit-flipped and foreign checkpoints are refused in
  one line. Prints ``CHECKPOINT FLIPS: ...``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from ppl_genmodels import cli, comparison, plots, runs, train
from ppl_genmodels.runs import CheckpointError, load_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GATED_CLI = ROOT / "tests" / "fault_helpers" / "gated_cli.py"
PYTHON = sys.executable
# the tiny run of every test here (data, sizes, batches, evaluation), on the CPU
TINY = ["--data", "digits", "--max-examples", "200", "--hidden", "16", "--z-dim", "2", "--batch-size", "32",
        "--no-plots", "--quiet", "--eval-k", "5", "--device", "cpu"]
TINY_API = dict(data="digits", max_examples=200, hidden=[16], z_dim=2, batch_size=32, eval_k=5, device="cpu")
EPOCHS = 12  # of the subprocess runs
KILLS = 16  # 4 at moments over the whole run, 12 at moments within its epochs (see _kill_plan)
CRASH_EPOCHS = 3  # of the in-process runs of the crash test
SUBPROCESS_TIMEOUT = 180


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _popen(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "ppl_genmodels", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), **kwargs)


def _cli(args) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "ppl_genmodels", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=SUBPROCESS_TIMEOUT)


def _main(argv) -> tuple[int, str, str]:
    """The CLI in-process: (exit status, stdout, stderr); argparse's SystemExit becomes its status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _one_line_error(code, err: str, *words: str, absent: tuple[str, ...] = ("weights_only", "Traceback")) -> str:
    """Assert exit status 2 and exactly one stderr line ``error: ...`` holding ``words``; returns the line."""
    lines = err.strip().splitlines()
    assert code == 2, f"exit status {code}, stderr:\n{err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one 'error:' line:\n{err}"
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    for word in absent:
        assert word not in lines[0], f"{word!r} in {lines[0]!r}"
    return lines[0]


def _leftover_tmp(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def _fingerprint(folder: Path, skip=(runs.LOCK_FILE,)) -> dict:
    """Every entry under ``folder``: files with their bytes and mtime, folders as None.

    ``skip`` names files a live writer owns; their atomic-write temporaries (``.<name>.<random>.tmp``),
    which come and go while the writer works, are skipped with them.
    """
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.name in skip or any(p.name.startswith(f".{name}.") and p.name.endswith(".tmp") for name in skip):
            continue
        try:
            found[str(p.relative_to(folder))] = (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        except FileNotFoundError:  # renamed into place between listing and reading
            continue
    return found


def _same(a, b) -> bool:
    """Deep equality of checkpoint payloads, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _metrics_problems(out: Path, reference: pd.DataFrame) -> list[str]:
    """What is wrong with ``out/metrics.csv`` against the uninterrupted run's metrics."""
    file = out / runs.METRICS_FILE
    if not file.is_file():
        return ["metrics.csv is missing"]
    got = pd.read_csv(file)
    problems = []
    if got["epoch"].tolist() != list(range(1, len(reference) + 1)):
        problems.append(f"epochs {got['epoch'].tolist()} (expected 1..{len(reference)})")
        return problems
    for column in ("train_elbo", "val_elbo"):
        a, b = got[column].to_numpy(), reference[column].to_numpy()
        if not ((a == b) | (abs(a - b) <= 1e-12 * abs(b))).all():
            bad = [int(e) for e, x, y in zip(got["epoch"], a, b) if abs(x - y) > 1e-12 * abs(y)]
            problems.append(f"{column} differs from the uninterrupted run at epochs {bad}")
    return problems


def _run_dir_problems(out: Path, reference) -> list[str]:
    """Everything a finished run directory must satisfy, compared with the uninterrupted run."""
    problems = _metrics_problems(out, reference.metrics)
    leftovers = _leftover_tmp(out)
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    if (out / runs.LOCK_FILE).exists():
        problems.append(f".lock left behind: {(out / runs.LOCK_FILE).read_text()!r}")
    try:
        checkpoint = load_checkpoint(out / runs.CHECKPOINT_FILE)
        load_checkpoint(out / runs.BEST_FILE)
    except CheckpointError as err:
        return problems + [f"checkpoint does not load: {err}"]
    if checkpoint["epoch"] != len(reference.metrics):
        problems.append(f"checkpoint epoch {checkpoint['epoch']} != {len(reference.metrics)}")
    if not _same(checkpoint["model"], reference.checkpoint["model"]):
        problems.append("final weights differ from the uninterrupted run's")
    if checkpoint["config"] != json.loads((out / runs.CONFIG_FILE).read_text()):
        problems.append("checkpoint's config differs from config.json")
    csv_epochs = pd.read_csv(out / runs.METRICS_FILE)["epoch"].tolist()
    missing = [row["epoch"] for row in checkpoint["metrics"] if row["epoch"] not in csv_epochs]
    if missing:
        problems.append(f"metrics.csv lacks rows the checkpoint has: epochs {missing}")
    return problems


def _state(out: Path) -> str:
    """Where a killed run stood: what its directory holds."""
    if not out.exists():
        return "no directory"
    names = sorted(p.name for p in out.iterdir())
    if runs.CONFIG_FILE not in names:
        return f"before config.json ({', '.join(names) or 'empty'})"
    words = []
    if (out / runs.CHECKPOINT_FILE).is_file():
        try:
            words.append(f"checkpoint epoch {load_checkpoint(out / runs.CHECKPOINT_FILE)['epoch']}")
        except CheckpointError as err:
            words.append(f"UNREADABLE checkpoint ({err})")
    else:
        words.append("config.json only")
    if (out / runs.METRICS_FILE).is_file():
        words.append(f"metrics rows {len(pd.read_csv(out / runs.METRICS_FILE))}")
    if (out / "results.csv").is_file():
        words.append("evaluated")
    tmp = _leftover_tmp(out)
    if tmp:
        words.append(f"mid-write ({', '.join(tmp)})")
    return ", ".join(words)


def _say(line: str, record_property=None, key: str | None = None, value=None) -> None:
    print(line, file=sys.__stdout__, flush=True)  # visible with -s
    if record_property is not None:
        record_property(key, value if value is not None else line)


# --------------------------------------------------------------------------- #
# the uninterrupted reference run (a subprocess, timed)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, timed while a twin runs beside it (as the kills run, two at a time).

    The twin must produce the same metrics: without that, exactness after a resume means nothing.
    """
    folder = tmp_path_factory.mktemp("reference")
    out, twin_out = folder / "run", folder / "twin"
    began = time.monotonic()
    proc = _popen(["fit", *TINY, "--epochs", EPOCHS, "--out", out])
    twin = _popen(["fit", *TINY, "--epochs", EPOCHS, "--out", twin_out])
    at_config = at_results = None
    while proc.poll() is None:
        if at_config is None and (out / runs.CONFIG_FILE).exists():
            at_config = time.monotonic() - began
        if at_results is None and (out / "results.csv").exists():
            at_results = time.monotonic() - began  # its last write: the rest is the interpreter's exit
        time.sleep(0.001)
    duration = time.monotonic() - began
    _, stderr = proc.communicate()
    _, twin_stderr = twin.communicate()
    assert proc.returncode == 0 and twin.returncode == 0, stderr + twin_stderr
    assert at_config is not None and at_results is not None
    metrics = pd.read_csv(out / runs.METRICS_FILE)
    assert metrics["epoch"].tolist() == list(range(1, EPOCHS + 1))
    reference = SimpleNamespace(out=out, metrics=metrics, checkpoint=load_checkpoint(out / runs.CHECKPOINT_FILE),
                                duration=duration, at_config=at_config, at_results=at_results)
    assert _run_dir_problems(twin_out, reference) == [], "two identical runs differ"
    _say(f"reference run: {duration:.2f} s, config.json at {at_config:.2f} s, results.csv at {at_results:.2f} s")
    return reference


# --------------------------------------------------------------------------- #
# a. kill -9 at random moments
# --------------------------------------------------------------------------- #


def _kill_plan(reference) -> list[tuple[str, float]]:
    """(anchor, delay) pairs from a fixed seed.

    4 kills at a delay after the start drawn over the reference run's whole duration (so most fall
    in start-up, before config.json). The other 12 at a delay drawn over one epoch of the reference
    run after a drawn epoch's row reached metrics.csv (``epoch 0``: after config.json; ``epoch
    EPOCHS``: during the final evaluation): anchored on the run's own progress, they spread over its
    writes whatever the machine's load, which a delay from the start would not.
    """
    rng = random.Random(0)
    per_epoch = (reference.at_results - reference.at_config) / (EPOCHS + 1)
    plan = []
    for i in range(KILLS):
        if i < 4:
            plan.append(("start", rng.uniform(0.0, reference.duration)))
        else:
            plan.append((f"epoch {rng.randint(0, EPOCHS)}", rng.uniform(0.0, per_epoch)))
    return plan


def _rows(file: Path) -> int:
    try:
        return max(0, len(file.read_bytes().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _wait_for_anchor(proc, out: Path, anchor: str) -> None:
    if anchor == "start":
        return
    epoch = int(anchor.split()[1])
    while proc.poll() is None and not (out / runs.CONFIG_FILE).exists():
        time.sleep(0.0005)
    while proc.poll() is None and epoch and _rows(out / runs.METRICS_FILE) < epoch:
        time.sleep(0.0005)


def _wait(proc, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)


def _recover(out: Path) -> tuple[int, list[str]]:
    """``fit --resume`` (or, before config.json, ``fit`` again) until it completes; returns (calls, failures).

    In-process through ``cli.main``: the same command, without seconds of interpreter start-up
    (and across a process boundary from the killed run, which makes exactness a stronger claim).
    """
    failures = []
    for attempt in range(1, 4):
        if (out / runs.CONFIG_FILE).is_file():
            code, _, err = _main(["fit", "--resume", "--out", out, "--quiet", "--no-plots"])
        else:
            code, _, err = _main(["fit", *TINY, "--epochs", EPOCHS, "--out", out])
        if code == 0:
            return attempt, failures
        failures.append(f"attempt {attempt}: exit {code}: {err.strip()[-400:]}")
    return 0, failures


def _kill_once(out: Path, anchor: str, delay: float) -> tuple[str, list[str]]:
    """Start ``fit``, ``kill -9`` it ``delay`` seconds after ``anchor``; returns (where it stood, problems)."""
    proc = _popen(["fit", *TINY, "--epochs", EPOCHS, "--out", out])
    _wait_for_anchor(proc, out, anchor)
    _wait(proc, delay)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    if finished:
        return "finished before the kill", [] if proc.returncode == 0 else [f"exit {proc.returncode}: {err[-300:]}"]
    state = _state(out)
    # atomic writes must leave every file whole: a checkpoint that does not load is a lost run
    return state, [f"after the kill: {state}"] if "UNREADABLE" in state else []


def test_kill_9_at_random_moments_then_resume(reference, tmp_path, record_property):
    plan = _kill_plan(reference)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # two runs at a time, one per core
        killed = list(pool.map(lambda job: _kill_once(tmp_path / f"kill{job[0]}", *job[1]), enumerate(plan)))
    survived, lost, report = 0, [], []
    for i, ((anchor, delay), (state, problems)) in enumerate(zip(plan, killed)):
        out = tmp_path / f"kill{i}"
        attempts, failures = _recover(out)
        problems = problems + (_run_dir_problems(out, reference) if attempts else failures)
        report.append(f"  kill {i}: {anchor}+{delay:.3f}s -> {state}; recovered in {attempts} call(s)"
                      + (f"; LOST: {problems}" if problems else ""))
        if problems:
            lost.append((i, problems))
        else:
            survived += 1
    summary = f"FAULTS: kills={len(plan)}, survived={survived}, lost={len(lost)}"
    _say("\n".join(report))
    _say(summary, record_property, "faults", summary)
    assert not lost, "\n".join(report)


# --------------------------------------------------------------------------- #
# b. a crash after each write, in-process
# --------------------------------------------------------------------------- #

ORIGINAL_WRITE = runs.atomic_write


class _CrashingWrite:
    """``runs.atomic_write`` that raises KeyboardInterrupt right after its ``after``-th successful write
    (``after=0``: at the first call, before writing; None: never). Records what was written."""

    def __init__(self, after: int | None):
        self.after, self.done, self.written = after, 0, []

    def __call__(self, path, content):
        if self.after == 0:
            raise KeyboardInterrupt("injected crash before the first write")
        result = ORIGINAL_WRITE(path, content)
        self.done += 1
        self.written.append(Path(path).name)
        if self.done == self.after:
            raise KeyboardInterrupt(f"injected crash after write {self.done} ({Path(path).name})")
        return result


@contextlib.contextmanager
def _writes(monkeypatch, after: int | None):
    """Every module that reaches ``atomic_write`` gets the crashing one for the block."""
    writer = _CrashingWrite(after)
    with monkeypatch.context() as patch:
        for module in (runs, plots, comparison):
            patch.setattr(module, "atomic_write", writer)
        yield writer


def _fit_in_process(out: Path, resume: bool = False):
    if resume:
        return train.fit(out=out, resume=True, progress=False, plots=False)
    return train.fit("vae", out=out, epochs=CRASH_EPOCHS, progress=False, plots=False, **TINY_API)


def _complete_result_sets(out: Path) -> list[str]:
    """Problems with the results index: every listed set must be whole."""
    index = runs.Run.read_results(out)
    return [f"indexed set {row} lacks {name}" for row in index["path"]
            for name in ("summary.csv", "per_datapoint.csv") if not (out / row / name).is_file()]


def test_crash_after_each_write_then_resume(tmp_path, monkeypatch, record_property):
    with _writes(monkeypatch, None) as counter:
        _fit_in_process(tmp_path / "straight")
    total = counter.done
    straight = SimpleNamespace(metrics=pd.read_csv(tmp_path / "straight" / runs.METRICS_FILE),
                               checkpoint=load_checkpoint(tmp_path / "straight" / runs.CHECKPOINT_FILE))
    _say(f"writes of a {CRASH_EPOCHS}-epoch run ({total}): {', '.join(counter.written)}")
    assert total >= 1 + 2 * CRASH_EPOCHS

    failures, lagging, points = [], [], 0
    for after in range(0, total + 1):
        for second in (None, 1):  # the resume runs clean, or crashes itself after its first write
            out = tmp_path / f"crash{after}-{second}"
            points += 1
            with _writes(monkeypatch, after), pytest.raises(KeyboardInterrupt):
                _fit_in_process(out)
            problems = []
            if out.exists():
                if _leftover_tmp(out) or (out / runs.LOCK_FILE).exists():
                    problems.append(f"after the crash: tmp {_leftover_tmp(out)}, lock {(out / runs.LOCK_FILE).exists()}")
                if (out / runs.CHECKPOINT_FILE).is_file():
                    saved = load_checkpoint(out / runs.CHECKPOINT_FILE)["epoch"]
                    rows = len(pd.read_csv(out / runs.METRICS_FILE)) if (out / runs.METRICS_FILE).is_file() else 0
                    if rows < saved:
                        lagging.append(after)  # the row lost between checkpoint.pt and metrics.csv
            if second is not None and (out / runs.CONFIG_FILE).is_file():
                with _writes(monkeypatch, second), pytest.raises(KeyboardInterrupt):
                    _fit_in_process(out, resume=True)
            _fit_in_process(out, resume=(out / runs.CONFIG_FILE).is_file())
            problems += _run_dir_problems(out, straight) + _complete_result_sets(out)
            if problems:
                failures.append(f"crash after write {after} (then {second or 'no'} crash in the resume): {problems}")
    line = (f"CRASHES: points={points} (after writes 0..{total}, each with and without a second crash), "
            f"lost={len(failures)}, metrics.csv behind checkpoint.pt after crashes {sorted(set(lagging))}")
    _say(line, record_property, "crashes", line)
    assert lagging, "no crash fell between checkpoint.pt and metrics.csv: the test lost its point"
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- #
# c. two writers
# --------------------------------------------------------------------------- #


def _gated(tmp_path: Path, tag: str, args) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"ready-{tag}"
    proc = subprocess.Popen([PYTHON, str(GATED_CLI), str(ready), str(tmp_path / f"go-{tag.split('-')[0]}"),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    return proc, ready


def _open_gate(tmp_path: Path, tag: str, procs_and_ready) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not all(ready.exists() for _, ready in procs_and_ready):
        assert all(p.poll() is None for p, _ in procs_and_ready), [p.communicate() for p, _ in procs_and_ready]
        assert time.monotonic() < deadline, "the gated processes never got ready"
        time.sleep(0.01)
    (tmp_path / f"go-{tag}").touch()


@pytest.mark.parametrize("round_", [0, 1])
def test_two_fits_race_for_one_directory(reference, tmp_path, round_):
    out = tmp_path / "run"
    pair = [_gated(tmp_path, f"r{round_}-{k}", ["fit", *TINY, "--epochs", EPOCHS, "--out", out]) for k in (0, 1)]
    _open_gate(tmp_path, f"r{round_}", pair)
    results = [(p.wait(timeout=SUBPROCESS_TIMEOUT), *p.communicate()) for p, _ in pair]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    _, _, err = next(r for r in results if r[0] == 2)
    line = _one_line_error(2, err)
    assert "in use" in line or "already exists" in line, line
    config = json.loads((out / runs.CONFIG_FILE).read_text())
    assert load_checkpoint(out / runs.CHECKPOINT_FILE)["config"] == config
    assert _run_dir_problems(out, reference) == []


def _wait_for_lock(out: Path, pid: int, proc) -> dict:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the resume never took the lock"
        try:
            owner = json.loads((out / runs.LOCK_FILE).read_text())
            if owner.get("pid") == pid:
                return owner
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.01)


def test_readers_are_refused_while_a_resume_holds_the_lock(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference.out, out)
    holder = _popen(["fit", "--resume", "--out", out, "--epochs", 100000, "--patience", 0, "--quiet", "--no-plots"])
    try:
        _wait_for_lock(out, holder.pid, holder)
        results_before = _fingerprint(out, skip=(runs.LOCK_FILE, runs.CHECKPOINT_FILE, runs.BEST_FILE,
                                                 runs.METRICS_FILE, runs.CONFIG_FILE))
        readers = {
            "evaluate": _popen(["evaluate", out, "--estimators", "elbo", "--count", 5, "--quiet"]),
            "bdmc": _popen(["bdmc", out, "--count", 2, "--steps", 3, "--chains", 2, "--quiet"]),
            "compare": _popen(["compare", out, "--count", 2, "--chains", 1, "--samples", 5, "--warmup", 5,
                               "--local-steps", 5, "--logp-k", 10, "--quiet"]),
        }
        outcomes = {name: (p.wait(timeout=SUBPROCESS_TIMEOUT), p.communicate()[1]) for name, p in readers.items()}
        assert holder.poll() is None, "the resume ended before the readers did: the test proved nothing"
        results_after = _fingerprint(out, skip=(runs.LOCK_FILE, runs.CHECKPOINT_FILE, runs.BEST_FILE,
                                                runs.METRICS_FILE, runs.CONFIG_FILE))
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
        holder.communicate()
    refused = []
    for name, (code, err) in outcomes.items():
        lines = err.strip().splitlines()
        ok = code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "in use" in lines[0]
        if not ok:
            refused.append(f"{name} ran while fit --resume held {out}: exit {code}, stderr {err.strip()[-300:]!r}")
    wrote = sorted(set(results_after) - set(results_before))

    # the run killed while holding the lock resumes fine
    epoch = load_checkpoint(out / runs.CHECKPOINT_FILE)["epoch"]
    done = _cli(["fit", "--resume", "--out", out, "--epochs", epoch + 1, "--quiet", "--no-plots"])
    assert done.returncode == 0, done.stderr
    metrics = pd.read_csv(out / runs.METRICS_FILE)
    assert metrics["epoch"].tolist() == list(range(1, epoch + 2))
    pd.testing.assert_frame_equal(metrics.iloc[:EPOCHS][["epoch", "train_elbo", "val_elbo"]],
                                  reference.metrics[["epoch", "train_elbo", "val_elbo"]])
    assert not _leftover_tmp(out) and not (out / runs.LOCK_FILE).exists()
    checkpoint = load_checkpoint(out / runs.CHECKPOINT_FILE)
    assert [row["epoch"] for row in checkpoint["metrics"]] == metrics["epoch"].tolist()
    assert not refused and not wrote, "\n".join(refused + [f"written by the readers: {wrote}"])


# --------------------------------------------------------------------------- #
# d. a tampered model file
# --------------------------------------------------------------------------- #

USER_MODEL = '''
"""A small VAE for the 64-pixel digits, written the way a user writes one."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn


class SmallVAE(nn.Module):
    def __init__(self, x_dim, z_dim=2, hidden_dim=16):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, x_dim))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("latent", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))
'''

USER_TINY = ["--data", "digits", "--max-examples", "200", "--batch-size", "32", "--no-plots", "--quiet",
             "--eval-k", "5", "--device", "cpu"]


@pytest.fixture
def tampered_run(tmp_path):
    model = tmp_path / "my_vae.py"
    model.write_text(USER_MODEL)
    out = tmp_path / "run"
    code, _, err = _main(["fit", "--model", f"{model}:SmallVAE", *USER_TINY, "--epochs", 2, "--out", out])
    assert code == 0, err
    assert json.loads((out / runs.CONFIG_FILE).read_text())["model_sha256"]
    with model.open("a") as fh:
        fh.write("\n# a harmless comment\n")
    return model, out


REFUSED_COMMANDS = {
    "evaluate": ["evaluate", "{run}", "--estimators", "elbo", "--count", "5", "--quiet"],
    "bdmc": ["bdmc", "{run}", "--count", "2", "--steps", "3", "--chains", "2", "--quiet"],
    "compare": ["compare", "{run}", "--count", "2", "--chains", "1", "--samples", "5", "--warmup", "5",
                "--local-steps", "5", "--logp-k", "10", "--quiet"],
    "sample": ["sample", "{run}", "--count", "4"],
    "fit --resume": ["fit", "--resume", "--out", "{run}", "--epochs", "3", "--quiet", "--no-plots"],
}


def test_tampered_model_file_is_refused_by_every_command(tampered_run):
    model, out = tampered_run
    before = _fingerprint(out)
    for name, argv in REFUSED_COMMANDS.items():
        code, _, err = _main([str(out) if a == "{run}" else a for a in argv])
        _one_line_error(code, err, model.name, "--trust-model-file")
        assert _fingerprint(out) == before, f"{name} wrote into the run directory"


def test_tampered_model_file_is_opened_when_trusted(tampered_run):
    model, out = tampered_run
    code, _, err = _main(["evaluate", out, "--estimators", "elbo", "--count", 5, "--quiet", "--trust-model-file"])
    assert code == 0, err
    code, _, err = _main(["fit", "--resume", "--out", out, "--epochs", 3, "--quiet", "--no-plots",
                          "--trust-model-file"])
    assert code == 0, err
    assert pd.read_csv(out / runs.METRICS_FILE)["epoch"].tolist() == [1, 2, 3]
    # the resume records the file it trusted: the run opens without the flag from now on
    code, _, err = _main(["evaluate", out, "--estimators", "elbo", "--count", 5, "--quiet"])
    assert code == 0, err


# --------------------------------------------------------------------------- #
# e. a stale lock
# --------------------------------------------------------------------------- #


def _dead_pid() -> int:
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A finished 2-epoch run, made in-process; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("small") / "run"
    code, _, err = _main(["fit", *TINY, "--epochs", 2, "--out", out])
    assert code == 0, err
    return out


@pytest.mark.parametrize("content", ["dead pid", "garbage", "empty"])
def test_stale_lock_does_not_block_a_resume(small_run, tmp_path, content):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    text = {"dead pid": json.dumps({"pid": _dead_pid(), "host": "elsewhere", "command": "fit",
                                    "since": "2020-01-01T00:00:00Z"}),
            "garbage": "\x00\xffnot json", "empty": ""}[content]
    (out / runs.LOCK_FILE).write_text(text)
    code, _, err = _main(["fit", "--resume", "--out", out, "--epochs", 3, "--quiet", "--no-plots"])
    assert code == 0, err
    assert pd.read_csv(out / runs.METRICS_FILE)["epoch"].tolist() == [1, 2, 3]
    assert not (out / runs.LOCK_FILE).exists()


def test_stale_lock_does_not_block_a_fresh_start_in_place(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / runs.LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "command": "fit"}))
    code, _, err = _main(["fit", *TINY, "--epochs", 1, "--out", out])
    assert code == 0, err
    assert not (out / runs.LOCK_FILE).exists()


# --------------------------------------------------------------------------- #
# f. corrupt checkpoints
# --------------------------------------------------------------------------- #


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_middle(path: Path) -> None:
    """Flip one byte in the middle of the checkpoint's largest member (a tensor's bytes).

    The middle byte of the whole file may fall in the alignment padding ``torch.save``
    puts in local headers, which holds nothing: that flip is harmless and proves nothing.
    """
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    at = member.header_offset
    name_length, extra_length = struct.unpack("<HH", bytes(data[at + 26: at + 30]))
    data[at + 30 + name_length + extra_length + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class Smuggled:
    """A class of this test module: not something a checkpoint of the toolkit holds."""

    def __init__(self):
        self.value = 42


def _foreign(path: Path) -> None:
    torch.save({"model": {}, "epoch": 1, "smuggled": Smuggled()}, path)


DAMAGE = {"truncated": _truncate, "flipped": _flip_middle}


def _damaged_copy(small_run, tmp_path, damage, *files) -> tuple[Path, dict]:
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    for name in files:
        damage(out / name)
    return out, _fingerprint(out)


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_corrupt_checkpoint_stops_a_resume_in_one_line(small_run, tmp_path, how):
    out, before = _damaged_copy(small_run, tmp_path, DAMAGE[how], runs.CHECKPOINT_FILE)
    code, _, err = _main(["fit", "--resume", "--out", out, "--epochs", 3, "--quiet", "--no-plots"])
    _one_line_error(code, err, "corrupt", runs.CHECKPOINT_FILE)
    assert _fingerprint(out) == before


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_corrupt_checkpoints_stop_evaluate_and_sample_in_one_line(small_run, tmp_path, how, command):
    out, before = _damaged_copy(small_run, tmp_path, DAMAGE[how], runs.CHECKPOINT_FILE, runs.BEST_FILE)
    argv = {"evaluate": ["evaluate", out, "--estimators", "elbo", "--count", 5, "--quiet"],
            "sample": ["sample", out, "--count", 4]}[command]
    code, _, err = _main(argv)
    _one_line_error(code, err, "corrupt")
    assert _fingerprint(out) == before


@pytest.mark.parametrize("command", ["fit --resume", "evaluate"])
def test_checkpoint_with_a_pickled_class_is_refused_in_one_line(small_run, tmp_path, command):
    out, before = _damaged_copy(small_run, tmp_path, _foreign, runs.CHECKPOINT_FILE, runs.BEST_FILE)
    argv = {"fit --resume": ["fit", "--resume", "--out", out, "--epochs", 3, "--quiet", "--no-plots"],
            "evaluate": ["evaluate", out, "--estimators", "elbo", "--count", 5, "--quiet"]}[command]
    code, _, err = _main(argv)
    _one_line_error(code, err)
    assert _fingerprint(out) == before


def _central_directory(data: bytes) -> list[int]:
    """Offsets of the central-directory headers of a zip archive (torch.save's format)."""
    offsets, at = [], data.find(b"PK\x01\x02")
    while at != -1:
        offsets.append(at)
        at = data.find(b"PK\x01\x02", at + 1)
    return offsets


def _generic(message: str) -> str:
    """A message without its names and numbers, to group findings."""
    return re.sub(r"'[^']*'|[0-9][0-9.]*", "_", message)[:60]


def _load_outcome(path: Path, original: dict) -> str:
    """``ok`` (refused as corrupt in one line, or loaded unchanged), else what went wrong."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            payload = load_checkpoint(path)
        except CheckpointError as err:
            message = str(err)
            if "corrupt" not in message or "\n" in message or "weights_only" in message:
                return f"refused without saying corrupt: {message.replace(str(path), 'FILE')[:90]}"
            outcome = "ok"
        except BaseException as err:  # noqa: B036 - whatever escapes is the finding
            return f"{type(err).__name__} escapes load_checkpoint: {_generic(str(err))}"
        else:
            outcome = "ok" if _same(payload, original) else "LOADED WITH DIFFERENT CONTENT"
    if caught:
        return f"{outcome}, but warns: {_generic(str(caught[0].message))}"
    return outcome


def test_corrupt_zip_structure_is_caught_or_harmless(small_run, tmp_path, record_property):
    """Flip bytes of the archive's structure (every byte of each central-directory header, plus random
    bytes anywhere): each damaged file must be refused as corrupt, or load exactly what was saved."""
    source = small_run / runs.CHECKPOINT_FILE
    data = source.read_bytes()
    original = load_checkpoint(source)
    headers = _central_directory(data)
    flips = [(at + offset, 0xFF) for at in headers for offset in range(46)]  # every field of every entry
    flips += [(at + offset, mask) for at in headers[:2] + headers[-1:] for offset in range(46) for mask in (0x10, 0x01)]
    rng = random.Random(0)
    flips += [(rng.randrange(len(data)), 0xFF) for _ in range(300)]
    damaged = tmp_path / "damaged.pt"
    findings: dict[str, list[tuple[int, int]]] = {}
    for position, mask in flips:
        bad = bytearray(data)
        bad[position] ^= mask
        damaged.write_bytes(bytes(bad))
        outcome = _load_outcome(damaged, original)
        if outcome != "ok":
            findings.setdefault(outcome, []).append((position, mask))
    wrong = sum(len(v) for v in findings.values())
    line = f"CHECKPOINT FLIPS: tried={len(flips)}, mishandled={wrong}"
    _say(line + "".join(f"\n  {len(v)} x {k} (e.g. byte {v[0][0]} ^ {v[0][1]:#x})" for k, v in findings.items()),
         record_property, "checkpoint_flips", line)
    assert not findings, "\n".join(f"{len(v)} x {k}: first at {v[:3]}" for k, v in findings.items())


def test_directory_bit_in_zip_entry_is_reported_as_corrupt_by_evaluate(small_run, tmp_path):
    """A member's central-directory entry marked as a folder (bit 0x10 of its external attributes,
    one flipped bit): Python's zipfile still finds every CRC good, but torch's reader then returns
    bytes that are not the member's (uninitialised memory). ``evaluate`` (a subprocess, so that
    warnings reach stderr) must say "corrupt" in one line, for ``data.pkl`` (today: reported as
    "holds objects other than tensors") and for a tensor (today: loads, with garbage weights)."""
    wrong = []
    for member in ("data.pkl", "data/0"):
        out = tmp_path / member.replace("/", "-")
        shutil.copytree(small_run, out)
        for name in (runs.CHECKPOINT_FILE, runs.BEST_FILE):
            data = bytearray((out / name).read_bytes())
            with zipfile.ZipFile(out / name) as archive:
                index = next(i for i, info in enumerate(archive.infolist()) if info.filename.endswith(member))
            data[_central_directory(bytes(data))[index] + 38] ^= 0x10
            (out / name).write_bytes(bytes(data))
            with zipfile.ZipFile(out / name) as archive:
                assert archive.testzip() is None  # the damage the CRC check cannot see
        done = _cli(["evaluate", out, "--estimators", "elbo", "--count", 5, "--quiet"])
        try:
            _one_line_error(done.returncode, done.stderr, "corrupt")
        except AssertionError as err:
            wrong.append(f"{member} marked as a folder: {str(err).splitlines()[0]}")
    assert not wrong, "\n".join(wrong)


# the central-directory fields whose damage Python's zipfile reports with other exceptions than those
# load_checkpoint catches: (offset in the header, bit mask, what zipfile raises)
ZIP_FIELD_DAMAGE = [(6, 0xFF, "NotImplementedError: zip file version"),
                    (8, 0x20, "NotImplementedError: compressed patched data"),
                    (8, 0x01, "RuntimeError: encrypted"),
                    (10, 0xFF, "NotImplementedError: compression method")]


def test_zip_header_damage_stops_evaluate_and_resume_in_one_line(small_run, tmp_path):
    """One flipped bit in the central-directory header of ``data.pkl`` (version needed, flags,
    compression method), in both checkpoints: ``evaluate`` and ``fit --resume`` must exit 2 with one
    line saying "corrupt", not end in a traceback."""
    wrong = []
    for i, (offset, mask, what) in enumerate(ZIP_FIELD_DAMAGE):
        out = tmp_path / f"run{i}"
        shutil.copytree(small_run, out)
        for name in (runs.CHECKPOINT_FILE, runs.BEST_FILE):
            data = bytearray((out / name).read_bytes())
            data[_central_directory(bytes(data))[0] + offset] ^= mask
            (out / name).write_bytes(bytes(data))
        for argv in (["evaluate", out, "--estimators", "elbo", "--count", 5, "--quiet"],
                     ["fit", "--resume", "--out", out, "--epochs", 3, "--quiet", "--no-plots"]):
            try:
                code, _, err = _main(argv)
                _one_line_error(code, err, "corrupt")
            except BaseException as err:  # noqa: B036 - every case is reported, not just the first
                wrong.append(f"{argv[0]} with {what} (byte +{offset} ^ {mask:#x}): {type(err).__name__}: "
                             f"{str(err).strip().splitlines()[-1][:120] if str(err).strip() else ''}")
    assert not wrong, "\n".join(wrong)
