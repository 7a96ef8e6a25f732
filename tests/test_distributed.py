"""Training across processes: torchrun's launcher, DDP on gloo, rank 0 writing, a dead rank stopping the job.

Every multi-process test starts real worker processes (``--processes N`` goes through
``torch.distributed.run``, the launcher behind ``torchrun``) on the CPU with the gloo
backend, and bounds its wait with a timeout so that a hang fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ppl_genmodels import distributed, fit
from ppl_genmodels.runs import load_checkpoint
from ppl_genmodels.train import validation_elbo

ROOT = Path(__file__).resolve().parents[1]
#: a bound on any one multi-process command: they take seconds, a hang fails the test instead of blocking it
WAIT = 240
TRAIN = ["--data", "digits", "--max-examples", "300", "--hidden", "32", "--z-dim", "4", "--epochs", "3",
         "--seed", "5", "--eval-k", "5"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _cli(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ppl_genmodels", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


def _fit_options(batch_size: int) -> dict:
    return dict(data="digits", max_examples=300, hidden=[32], z_dim=4, epochs=3, seed=5, eval_k=5,
                batch_size=batch_size, progress=False, plots=False)


# --------------------------------------------------------------------------- #
# the pieces, in one process
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n, size", [(10, 1), (10, 2), (10, 3), (3, 4), (0, 2), (1001, 7)])
def test_shards_are_contiguous_cover_everything_and_differ_by_at_most_one(n, size):
    blocks = [distributed.shard(n, distributed.World(rank, size)) for rank in range(size)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    lengths = [stop - start for start, stop in blocks]
    assert max(lengths) - min(lengths) <= 1


def test_a_global_batch_is_split_into_rank_shares_in_order():
    rows = torch.arange(10, 17)
    shares = [distributed.split_batch(rows, distributed.World(rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat(shares), rows)
    assert [len(s) for s in shares] == [3, 2, 2]


def test_one_process_needs_no_process_group():
    here = distributed.world()
    assert here == distributed.World(0, 1, 0) and not here.distributed
    value = torch.tensor([1.5, 2.0])
    assert distributed.all_sum(value) is value
    assert distributed.gather("x") == ["x"]
    assert distributed.agree(lambda: 7) == 7
    with pytest.raises(KeyError):
        distributed.agree(lambda: {}["missing"])


def test_the_validation_elbo_does_not_depend_on_the_batch_a_datapoint_is_in(tmp_path):
    """Per-datapoint streams: each datapoint's particle is the same in a batch of 7 or of 512."""
    run = fit("vae", out=tmp_path / "a", **{**_fit_options(64), "epochs": 1}, evaluate=False)
    small = validation_elbo(run.program, run.data, batch_size=7, seed=3)
    large = validation_elbo(run.program, run.data, batch_size=512, seed=3)
    assert small == pytest.approx(large, rel=1e-6)  # float32 rounding of a 7-row pass; other draws: ~1e-2
    assert validation_elbo(run.program, run.data, batch_size=512, seed=4) != large


@pytest.mark.parametrize("outcome, synchronized", [(0, (True, None)), (2, (False, distributed.ERROR_WAIT)),
                                                    ("raise", (False, distributed.ERROR_WAIT))])
def test_a_command_leaves_the_group_together_and_after_an_error_waits_a_bounded_time(monkeypatch, outcome,
                                                                                     synchronized):
    """Ranks that finished meet at a barrier before leaving; after an error a peer may be dead: a bounded wait."""
    from ppl_genmodels import cli

    calls = []

    def command(args, report):
        if outcome == "raise":
            raise KeyError("boom")
        return outcome

    monkeypatch.setattr(cli, "_run_command", command)
    monkeypatch.setattr(distributed, "teardown", lambda synchronize=False, wait=None: calls.append((synchronize, wait)))
    if outcome == "raise":
        with pytest.raises(KeyError):
            cli.main(["models"])
    else:
        assert cli.main(["models"]) == outcome
    assert calls == [synchronized]


def test_a_rank_that_finishes_first_waits_for_the_others_before_leaving(tmp_path):
    """teardown(synchronize=True) under torchrun: rank 1 leaves only once rank 0, busy 2 s longer, is done."""
    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent("""
        import os
        import time
        import torch.distributed as dist
        from ppl_genmodels import distributed

        here = distributed.setup()
        box = [None]
        if here.rank == 0:
            time.sleep(2.0)
            box[0] = "done"
        dist.broadcast_object_list(box, src=0)
        if here.rank == 0:
            time.sleep(2.0)  # still at work after the last collective
        distributed.teardown(synchronize=True)
        line = f"rank {here.rank} left at {time.time()} initialized {dist.is_initialized()}\\n"
        os.write(1, line.encode())  # one write: the two ranks' lines must not interleave
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=WAIT, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    left = {int(m[0]): float(m[1]) for m in re.findall(r"rank (\d) left at ([\d.]+) initialized False", done.stdout)}
    assert set(left) == {0, 1}, done.stdout
    assert left[1] >= left[0] - 0.5  # rank 1 waited at the barrier for rank 0's last 2 s


@pytest.mark.parametrize("late", [2.0, 8.0])
def test_after_an_error_a_rank_waits_for_a_late_peer_but_not_for_one_that_does_not_come(tmp_path, late):
    """teardown(wait=4) under torchrun: rank 0 leaves with rank 1 when it comes 2 s later, without it at 8 s."""
    script = tmp_path / "leave.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import time
        from ppl_genmodels import distributed

        here = distributed.setup()
        if here.rank == 1:
            time.sleep({late})
        arrived = time.time()
        distributed.teardown(wait=4.0)
        os.write(1, f"rank {{here.rank}} arrived at {{arrived}} left at {{time.time()}}\\n".encode())
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=WAIT, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    times = {int(m[0]): (float(m[1]), float(m[2]))
             for m in re.findall(r"rank (\d) arrived at ([\d.]+) left at ([\d.]+)", done.stdout)}
    assert set(times) == {0, 1}, done.stdout
    if late < 4.0:  # rank 0 met rank 1
        assert times[0][1] >= times[1][0] - 0.5
    else:  # rank 0 gave up on rank 1 and left before it came
        assert times[0][1] < times[1][0]


# --------------------------------------------------------------------------- #
# the command line
# --------------------------------------------------------------------------- #


def test_processes_must_be_positive(tmp_path):
    done = _cli("fit", "--processes", "0", "--out", str(tmp_path / "run"), *TRAIN)
    assert done.returncode == 2
    assert "--processes: must be >= 1" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_processes_is_refused_inside_a_torchrun_worker(tmp_path):
    env = dict(_env(), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    done = subprocess.run([sys.executable, "-m", "ppl_genmodels", "fit", "--processes", "2", "--out",
                           str(tmp_path / "run"), *TRAIN], capture_output=True, text=True, timeout=WAIT, env=env,
                          cwd=ROOT)
    assert done.returncode == 2 and "started by torchrun already" in done.stderr


def test_two_processes_train_like_one_process_with_the_global_batch(tmp_path):
    """DDP over 2 gloo workers with batch 32 each = one process with batch 64, to float tolerance."""
    one = fit("vae", out=tmp_path / "one", **_fit_options(64))
    done = _cli("fit", "--processes", "2", "--batch-size", "32", "--out", str(tmp_path / "two"), "--quiet",
                "--no-plots", *TRAIN)
    assert done.returncode == 0, done.stderr[-2000:]
    two = pd.read_csv(tmp_path / "two" / "metrics.csv")
    np.testing.assert_allclose(two["train_elbo"], one.metrics["train_elbo"], rtol=1e-5)
    np.testing.assert_allclose(two["val_elbo"], one.metrics["val_elbo"], rtol=1e-5)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["processes"] == 2 and config["global_batch_size"] == 64 and config["batch_size"] == 32
    weights = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    reference = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5)
    # rank 0 alone wrote, once: one evaluation set, no stray temporary files, no lock left behind
    assert sorted(p.name for p in (tmp_path / "two" / "evaluation").iterdir()) == ["fit"]
    assert not [p for p in (tmp_path / "two").rglob("*.tmp")] and not (tmp_path / "two" / ".lock").exists()


def test_a_run_trained_by_two_processes_resumes_in_one(tmp_path):
    done = _cli("fit", "--processes", "2", "--batch-size", "32", "--out", str(tmp_path / "run"), "--quiet",
                "--no-plots", *[a if a != "3" else "2" for a in TRAIN])
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = fit(out=tmp_path / "run", resume=True, epochs=3, progress=False, plots=False, evaluate=False)
    straight = fit("vae", out=tmp_path / "straight", **_fit_options(64), evaluate=False)
    assert resumed.metrics["epoch"].tolist() == [1, 2, 3]
    # the resumed process has batch 32 and no peer: its global batch halves, so epoch 3 differs, but the run
    # continues from the 2-process weights (epochs 1-2 equal the 1-process run with the same global batch)
    np.testing.assert_allclose(resumed.metrics["train_elbo"][:2], straight.metrics["train_elbo"][:2], rtol=1e-5)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["processes"] == 1


def test_an_error_is_reported_once_and_nothing_is_written(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    done = _cli("fit", "--processes", "2", "--out", str(tmp_path / "run"), "--quiet", *TRAIN)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already exists" in errors[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


def _workers(parent: int) -> dict[int, int]:
    """RANK -> pid of the torchrun workers below ``parent`` (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), None)
        rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None and ppid is not None and _descends(ppid, parent):
            found[rank] = int(entry.name)
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_a_killed_rank_stops_the_job_with_an_error_not_a_hang(tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "ppl_genmodels", "fit", "--processes", "2", "--out", str(out),
                            "--quiet", "--no-plots", *TRAIN[:-6], "--epochs", "100000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + WAIT
        while not (out / "checkpoint.pt").is_file():
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        workers = _workers(job.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = job.communicate(timeout=WAIT)  # a hang fails here
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    assert "worker 1 of 2 was killed by signal 9" in stderr.strip().splitlines()[-1]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1  # the last checkpoint survived


def test_fit_under_torchrun_from_the_python_api(tmp_path):
    """The same ``fit(...)`` call, started by torchrun, trains with DDP and writes from rank 0."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        from ppl_genmodels import fit, distributed
        run = fit("vae", "digits", {str(tmp_path / 'run')!r}, epochs=2, batch_size=16, max_examples=200,
                  hidden=[16], z_dim=3, progress=False, plots=False, eval_k=3)
        import os
        here = distributed.world()
        os.write(1, ("rank %d of %d epoch %d\\n" % (here.rank, here.size, run.epoch)).encode())  # one write per rank
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=WAIT, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 0 of 2" in done.stdout and "rank 1 of 2" in done.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["global_batch_size"] == 32
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 2


POISON = '''
import os

from ppl_genmodels.models.vae import VAE


class PoisonOnRankOne(VAE):
    """A VAE whose training loss becomes NaN on rank 1 alone, after its 12th training-mode call."""

    def model(self, x, y=None):
        if self.training:
            self.steps = getattr(self, "steps", 0) + 1
            if os.environ.get("RANK") == "1" and self.steps > 12:
                x = x * float("nan")
        return super().model(x, y)
'''


def test_a_nan_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    """The divergence flag is reduced over the ranks: both skip the update and stop together, no rank waits."""
    (tmp_path / "poison.py").write_text(POISON)
    out = tmp_path / "run"
    done = _cli("fit", "--model", f"{tmp_path / 'poison.py'}:PoisonOnRankOne", "--processes", "2", "--batch-size",
                "32", "--out", str(out), "--quiet", "--no-plots", *TRAIN)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    found = re.search(r"the loss became nan at epoch (\d+), step \d+; the last good checkpoint \(epoch (\d+)\) is kept",
                      errors[0])
    assert found and int(found.group(1)) >= 2 and int(found.group(2)) == int(found.group(1)) - 1, errors[0]
    kept = int(found.group(2))
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == kept and all(torch.isfinite(v).all() for v in state["model"].values())
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == list(range(1, kept + 1))


def test_a_sweep_with_two_processes_writes_the_table_of_one(tmp_path):
    """Every cell trained with DDP and evaluated on shards; rank 0 writes each result set and the table once."""
    spec = tmp_path / "spec.toml"
    spec.write_text('data = "digits"\nepochs = 2\nmax_examples = 200\nhidden = [16]\nz_dim = 3\nbatch_size = 32\n'
                    'seed = 1\n[grid]\nelbo = ["trace", "iwae"]\nparticles = [2]\n[evaluate]\nestimators = "elbo,iwae:20"\n')
    two = _cli("sweep", str(spec), "--out", str(tmp_path / "two"), "--processes", "2", "--quiet")
    assert two.returncode == 0, two.stderr[-2000:]
    spec.write_text(spec.read_text().replace("batch_size = 32", "batch_size = 64"))
    one = _cli("sweep", str(spec), "--out", str(tmp_path / "one"), "--quiet")
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = pd.read_csv(tmp_path / "two" / "sweep.csv"), pd.read_csv(tmp_path / "one" / "sweep.csv")
    assert a["run_dir"].tolist() == b["run_dir"].tolist() == ["elbo=trace,particles=2", "elbo=iwae,particles=2"]
    for column in ("test_elbo", "test_iwae20", "active_units"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-4)
    for cell in a["run_dir"]:
        assert sorted(p.name for p in (tmp_path / "two" / cell / "evaluation").iterdir()) == ["sweep"]


@pytest.mark.parametrize("given", [["--processes", "2"], ["--processes=2"], ["--proc", "2"], ["--process=2"]])
def test_the_workers_get_the_command_without_processes_however_it_was_spelled(monkeypatch, given):
    from ppl_genmodels import cli

    seen = {}
    monkeypatch.setattr(distributed, "launch", lambda processes, argv: seen.update(n=processes, argv=argv) or 0)
    assert cli.main(["evaluate", "RUN", "--count", "5", *given, "--quiet"]) == 0
    assert seen == {"n": 2, "argv": ["evaluate", "RUN", "--count", "5", "--quiet"]}
