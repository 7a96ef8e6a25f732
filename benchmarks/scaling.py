"""Scaling over processes: training epoch time and IWAE-5000 throughput with 1 and 2 processes (or 1..N GPUs).

What is measured
----------------
Every measurement is one CLI command, run as a subprocess
``[sys.executable, "-m", "ppl_genmodels", ...]`` from the repository root, with
``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) set explicitly: a process count
P gets ``cores // P`` threads per process (``--cores``, default the cores this
process may run on). P > 1 adds ``--processes P``, so the command goes through
torchrun's launcher (``ppl_genmodels.distributed.launch``); P = 1 is the plain
command, without the launcher.

1. *Training.* ``fit`` of the MNIST VAE 784-400-50 (``--data mnist --hidden
   400 --z-dim 50``, Bernoulli likelihood with dynamic binarization, default
   Adam, ``--patience 0``, seed 0, ``--no-plots --quiet``) for ``--epochs``
   epochs (default 3) at a fixed *global* batch (``--global-batch``, default
   128): 1 process x 128, 2 processes x 64 (``--batch-size`` is per process;
   DDP averages the gradients, so both see the same global minibatches). The
   figures: the median of the per-epoch ``seconds`` of ``metrics.csv`` over
   epochs 2..E (epoch 1 also pays for start-up: thread pools, allocator,
   DDP's first buckets), which covers the training steps and the validation
   ELBO; the wall time of the whole command (interpreter and launcher start,
   data loading, the epochs, and ``fit``'s own closing test evaluation,
   IWAE-100 on the test split, whose seconds are shown apart); and the last
   epoch's train and validation ELBO, so that one sees the runs train alike.
   They agree closely but not bit for bit: DDP sums the processes' gradients
   in another order than one process sums its batch, and the rounding
   differences grow over the steps (about 0.04 nats train, 0.08 validation
   after 3 MNIST epochs; about 1e-5 after 2 epochs on 2,000 images).
2. *IWAE-5000 throughput.* ``evaluate RUN --estimators iwae:5000 --count N``
   (default N = 100 MNIST test images) on one trained run, the 1-process
   training run of the first repeat, with each process count. Throughput is
   datapoints per second over the evaluation's own seconds (``results.csv`` of
   the run: the whole ``evaluate_run`` call on rank 0, loading excluded) and,
   end to end, over the command's wall time. The evaluation is sharded by
   datapoint with a random stream per datapoint, so its results must not
   depend on the number of processes: the script compares every
   ``per_datapoint.csv`` with the first 1-process one, byte for byte (and the
   largest absolute difference of the values), and prints whether they are
   identical. On the CPU they must be; on CUDA, kernels may differ with the
   batch shape, so there the check is reported but only expected to be close.
3. *Repeats.* ``--repeats`` (default 3) rounds; in each round every process
   count trains once, then every process count evaluates once, the order of
   the process counts reversed every other round (1, 2 / 2, 1 / 1, 2 ...), so
   slow drifts in the machine's load hit both alike. The table reports the
   medians over rounds and the speed-up of each process count over 1 process
   (time ratio t1 / tP; rate ratio for throughput). The 1-minute load average
   is recorded before every command.

Expectations on a 2-core CPU
----------------------------
With 2 cores, 1 process runs 2 OpenMP threads and 2 processes run 1 thread
each: both use the same two cores, and what the second process buys is only
what intra-op threading of small kernels leaves on the table, against the
all-reduce of ~0.7M gradients per step (gloo, over loopback) and the cost of
a second interpreter. The expected speed-up is therefore small (around 1, and
below 1 for the end-to-end wall time, which also pays for the launcher and a
second start-up). The point of the CPU figures is that the multi-process path
works end to end and that its results agree with one process. On a shared
host, two OpenMP threads lose more to other processes than one thread does
(a parallel region waits for its slowest thread), which favours 2 x 1
threads; check the load averages printed before trusting a ratio. With
``--device cuda`` and G GPUs the process counts are 1..G, one GPU each
(nccl); that is the configuration where a speed-up near P is the target.

Budget
------
``--quick`` checks that the script works in about a minute or two: 2,000
images in every split (``--max-examples``) of MNIST, or the ``digits`` data
set when MNIST is absent, 2 epochs, IWAE-1000 on 20 test points, 2 repeats.
The full default is 6 trainings of 3 epochs on the 54,000 MNIST training
images and 6 evaluations, each with a few seconds of start-up, and each
training ends with ``fit``'s IWAE-100 on the 10,000 test images (10-35 s).
On a quiet 2-core AMD EPYC (torch 2.13 CPU, load average 1-2) the full
default took 3.1 minutes: 1 process x 2 threads trained an epoch in 2.75 s and
2 processes x 1 thread in 5.39 s (0.51x: the gloo all-reduce of every step
and the loss of intra-op threading cost more than the second process gives);
IWAE-5000 on 100 test points took 3.40 s and 3.17 s (1.07x); end to end the
launcher and the second start-up made the 2-process commands 0.65-0.70x as
fast. The per-datapoint results were identical, byte for byte, in every round.
Under load from other work (load average 3-4) the same runs measured 2-4x in
favour of 2 x 1 threads, because a 2-thread process loses more to other
processes than two 1-thread ones do: check the loads the report prints.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"
SEED = 0
QUICK = dict(epochs=2, max_examples=2000, k=1000, count=20, repeats=2)
FULL = dict(epochs=3, max_examples=None, k=5000, count=100, repeats=3)


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def uptime_line() -> str:
    """``uptime``'s own line when the command exists, else the load averages."""
    try:
        done = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    load = load_average()
    return "load average: " + (", ".join(f"{v:.2f}" for v in load) if load else "unavailable")


def machine(device: str) -> dict:
    import pyro

    info = {"cpu": cpu_model(), "cores": usable_cores(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "pyro": pyro.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if device == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# ---------------------------------------------------------------------------------------------
# running one command
# ---------------------------------------------------------------------------------------------


def command_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK"):
        env.pop(name, None)  # a command of this script is never part of an outer torchrun job
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_command(argv: list[str], threads: int, log: Path, timeout: float) -> tuple[int, float]:
    """Run ``python -m ppl_genmodels ARGV``; its output goes to ``log``. Returns (exit status, wall seconds).

    The command runs in its own session; on timeout its whole process group (the launcher and its workers)
    is killed and the status is 124.
    """
    cmd = [sys.executable, "-m", "ppl_genmodels", *argv]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write(f"$ OMP_NUM_THREADS={threads} {' '.join(cmd)}\n")
        out.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=command_env(threads), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
        wall = time.perf_counter() - started
    return code, wall


def tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


# ---------------------------------------------------------------------------------------------
# reading the run directories
# ---------------------------------------------------------------------------------------------


def result_seconds(run_dir: Path, name: str) -> float:
    """``seconds`` of result set ``name`` in the run's ``results.csv`` (NaN when absent)."""
    try:
        index = pd.read_csv(run_dir / "results.csv")
        rows = index[index["name"].astype(str) == name]
        return float(rows["seconds"].iloc[-1]) if len(rows) else math.nan
    except (OSError, KeyError, ValueError, IndexError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return math.nan


def training_figures(run_dir: Path) -> dict:
    out = {"epochs_run": 0, "epoch_seconds": math.nan, "all_epoch_seconds": "", "final_train_elbo": math.nan,
           "final_val_elbo": math.nan, "fit_evaluation_seconds": result_seconds(run_dir, "fit"),
           "config_processes": math.nan, "config_global_batch": math.nan}
    try:
        metrics = pd.read_csv(run_dir / "metrics.csv")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return out
    if len(metrics):
        later = metrics[metrics["epoch"] > 1]["seconds"]
        out.update(epochs_run=len(metrics), epoch_seconds=float(later.median()) if len(later) else math.nan,
                   all_epoch_seconds=";".join(f"{v:.3f}" for v in metrics["seconds"]),
                   final_train_elbo=float(metrics["train_elbo"].iloc[-1]),
                   final_val_elbo=float(metrics["val_elbo"].iloc[-1]))
    try:
        config = json.loads((run_dir / "config.json").read_text())
        out.update(config_processes=config.get("processes", math.nan),
                   config_global_batch=config.get("global_batch_size", math.nan))
    except (OSError, ValueError):
        pass
    return out


def evaluation_figures(run_dir: Path, name: str, estimator: str) -> dict:
    folder = run_dir / "evaluation" / name
    out = {"evaluation_seconds": result_seconds(run_dir, name), "estimator_seconds": math.nan, "datapoints": 0,
           "iwae_mean": math.nan, "per_datapoint": ""}
    try:
        summary = pd.read_csv(folder / "summary.csv")
        row = summary[summary["estimator"] == estimator].iloc[0]
        out.update(estimator_seconds=float(row["seconds"]), datapoints=int(row["n"]), iwae_mean=float(row["mean"]))
    except (OSError, KeyError, IndexError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        pass
    if (folder / "per_datapoint.csv").is_file():
        out["per_datapoint"] = str(folder / "per_datapoint.csv")
    return out


def compare_values(reference: Path, other: Path) -> tuple[bool, float]:
    """(byte-identical, largest absolute difference over the numeric columns; inf when the rows differ)."""
    same = filecmp.cmp(reference, other, shallow=False)
    a, b = pd.read_csv(reference), pd.read_csv(other)
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return same, math.inf
    if "index" in a.columns and not (a["index"].to_numpy() == b["index"].to_numpy()).all():
        return same, math.inf
    numeric = [c for c in a.columns if c != "index" and pd.api.types.is_numeric_dtype(a[c])]
    diff = max((float((a[c] - b[c]).abs().max()) for c in numeric), default=0.0)
    return same, diff


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


def median(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else math.nan


# (phase, column, label, format, kind): kind "time" -> speed-up t1 / tP, "rate" -> rP / r1, None -> no ratio
MEASURES = (
    ("train", "epoch_seconds", "training: seconds per epoch (median of epochs 2..E)", "{:.2f}", "time"),
    ("train", "wall_seconds", "training: wall seconds of `fit` (end to end)", "{:.1f}", "time"),
    ("train", "fit_evaluation_seconds", "training: seconds of fit's closing IWAE-100 test evaluation", "{:.2f}",
     "time"),
    ("train", "overhead_seconds", "training: the rest of the wall time (start-up, data, writing)", "{:.1f}", "time"),
    ("train", "final_train_elbo", "training: train ELBO, last epoch (nats)", "{:.4f}", None),
    ("train", "final_val_elbo", "training: validation ELBO, last epoch (nats)", "{:.4f}", None),
    ("evaluate", "evaluation_seconds", "IWAE-{k}: evaluation seconds ({n} datapoints)", "{:.2f}", "time"),
    ("evaluate", "datapoints_per_second", "IWAE-{k}: datapoints/s", "{:.2f}", "rate"),
    ("evaluate", "wall_seconds", "IWAE-{k}: wall seconds of `evaluate` (end to end)", "{:.1f}", "time"),
    ("evaluate", "wall_datapoints_per_second", "IWAE-{k}: datapoints/s end to end", "{:.2f}", "rate"),
    ("evaluate", "iwae_mean", "IWAE-{k}: mean log p(x) (nats)", "{:.4f}", None),
)


def summarise(rows: list[dict], processes: list[int], k: int, n: int) -> list[dict]:
    table = []
    for phase, column, label, fmt, kind in MEASURES:
        entry = {"measure": label.format(k=k, n=n), "phase": phase, "column": column, "format": fmt, "kind": kind}
        for p in processes:
            ok = [r for r in rows if r["phase"] == phase and r["processes"] == p and r["exit_status"] == 0]
            entry[f"p{p}"] = median([r.get(column, math.nan) for r in ok])
        base = entry[f"p{processes[0]}"]
        for p in processes[1:]:
            value = entry[f"p{p}"]
            if kind == "time":
                entry[f"speedup_p{p}"] = base / value if value and value > 0 else math.nan
            elif kind == "rate":
                entry[f"speedup_p{p}"] = value / base if base and base > 0 else math.nan
            else:
                entry[f"speedup_p{p}"] = math.nan
        table.append(entry)
    return table


def fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def markdown_table(table: list[dict], processes: list[int], threads: dict[int, int], device: str) -> str:
    def head(p):
        plural = "es" if p != 1 else ""
        if device == "cuda":
            return f"{p} process{plural} ({p} GPU{'s' if p != 1 else ''}, {threads[p]} threads each)"
        each = f"{threads[p]} thread{'s' if threads[p] != 1 else ''}" + (" each" if p != 1 else "")
        return f"{p} process{plural} ({each})"

    columns = ["measure"] + [head(p) for p in processes] + [f"speed-up {p} vs {processes[0]}" for p in processes[1:]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for e in table:
        cells = [e["measure"]] + [fmt(e[f"p{p}"], e["format"]) for p in processes]
        cells += [fmt(e[f"speedup_p{p}"], "{:.2f}") for p in processes[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def mnist_present(folder: Path) -> bool:
    """The four IDX files, gzipped or raw."""
    stems = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    return all((folder / f"{stem}-ubyte.gz").is_file() or (folder / f"{stem}-ubyte").is_file() for stem in stems)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="check that it works: 2,000 images per split (digits without MNIST), 2 epochs, "
                             "IWAE-1000 on 20 points, 2 repeats")
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist",
                        help="training data (default mnist; --quick falls back to digits when MNIST is absent)")
    parser.add_argument("--data-dir", type=Path, default=MNIST_DIR, help=f"MNIST folder (default {MNIST_DIR})")
    parser.add_argument("--processes", type=int_list, default=None,
                        help="process counts, comma-separated, the first one the reference (default 1,2 on the "
                             "CPU; 1..number of GPUs with --device cuda)")
    parser.add_argument("--cores", type=int, default=None,
                        help="cores to share out: each process gets cores // processes threads "
                             "(default: the cores this process may use)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--global-batch", type=int, default=128,
                        help="global minibatch; each process trains on global / processes (default 128)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs, >= 2 (default 3; --quick 2)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="cap every split of the training data (default: none; --quick 3000)")
    parser.add_argument("--k", type=int, default=None, help="IWAE particles (default 5000; --quick 1000)")
    parser.add_argument("--count", type=int, default=None, help="test points evaluated (default 100; --quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; --quick 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one command may take (default 1800)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/scaling-<date>-<time>)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (epoch 1 is left out of the epoch time)")
    if min(args.k, args.count, args.repeats, args.global_batch) < 1 or args.timeout <= 0:
        parser.error("--k, --count, --repeats, --global-batch and --timeout must be positive")
    if args.max_examples is not None and args.max_examples < 1:
        parser.error("--max-examples must be >= 1")
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            parser.error("--device cuda but no CUDA device is visible")
        args.processes = args.processes or list(range(1, gpus + 1))
        if max(args.processes) > gpus:
            parser.error(f"--processes asks for {max(args.processes)} GPUs; {gpus} visible")
    else:
        args.processes = args.processes or [1, 2]
    if len(set(args.processes)) != len(args.processes):
        parser.error("--processes lists a count twice")
    bad = [p for p in args.processes if args.global_batch % p]
    if bad:
        parser.error(f"--global-batch {args.global_batch} is not divisible by {bad[0]} processes")
    args.cores = args.cores or usable_cores()
    args.out = (args.out or REPO / "runs" / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    return args


def fit_argv(args, p: int, run_dir: Path) -> list[str]:
    argv = ["fit", "--model", "vae", "--data", args.data, "--hidden", "400", "--z-dim", "50",
            "--likelihood", "bernoulli", "--binarize", "dynamic", "--epochs", str(args.epochs),
            "--batch-size", str(args.global_batch // p), "--patience", "0", "--seed", str(SEED),
            "--device", args.device, "--out", str(run_dir), "--no-plots", "--quiet"]
    if args.data == "mnist":
        argv += ["--data-dir", str(args.data_dir)]
    if args.max_examples is not None:
        argv += ["--max-examples", str(args.max_examples)]
    return argv + (["--processes", str(p)] if p > 1 else [])


def evaluate_argv(args, p: int, run_dir: Path, name: str) -> list[str]:
    argv = ["evaluate", str(run_dir), "--estimators", f"iwae:{args.k}", "--count", str(args.count),
            "--split", "test", "--device", args.device, "--name", name, "--quiet"]
    return argv + (["--processes", str(p)] if p > 1 else [])


def main(argv=None) -> int:
    args = parse(argv)
    notes = []
    if args.data == "mnist" and not mnist_present(args.data_dir):
        if not args.quick:
            print(f"skipped: MNIST not found in {args.data_dir} (the four IDX files; --data-dir to point elsewhere, "
                  "--quick or --data digits to run on the digits data set instead)")
            return 0
        args.data = "digits"
        notes.append(f"MNIST not found in {args.data_dir}: --quick runs on the digits data set (8x8 images)")

    procs = args.processes
    threads = {p: max(1, args.cores // p) for p in procs}
    if any(p > args.cores for p in procs) and args.device == "cpu":
        notes.append(f"more processes than the {args.cores} core(s) shared out: each process still gets 1 thread")
    info = machine(args.device)
    info["uptime_start"] = uptime_line()
    load_start = load_average()
    estimator = f"iwae{args.k}"
    data_text = (f"{args.data}" + (f" ({args.data_dir})" if args.data == "mnist" else "")
                 + (f", every split capped at {args.max_examples}" if args.max_examples else ""))

    print(f"cpu: {info['cpu']}; {info['cpu_count']} logical CPUs, {args.cores} shared out as threads; "
          f"torch {info['torch']}, pyro {info['pyro']}")
    if args.device == "cuda":
        print(f"gpus: {', '.join(info['gpus'])}")
    print(f"uptime at start: {info['uptime_start']}")
    print(f"processes: {', '.join(f'{p} x {threads[p]} thread(s)' for p in procs)}; device {args.device}")
    print(f"training: VAE 784-400-50 on {data_text}, {args.epochs} epochs, global batch {args.global_batch}; "
          f"evaluation: IWAE-{args.k} on {args.count} test points; {args.repeats} repeats; writing {args.out}")
    for note in notes:
        print(f"note: {note}")

    rows: list[dict] = []
    eval_run: Path | None = None
    started_all = time.perf_counter()

    def record(row: dict) -> None:
        rows.append(row)
        write(args.out / "commands.csv", pd.DataFrame(rows).to_csv(index=False))

    for r in range(1, args.repeats + 1):
        order = procs if r % 2 == 1 else procs[::-1]
        # ---- training ---------------------------------------------------------------------- #
        for p in order:
            run_dir = args.out / "train" / f"p{p}-r{r}"
            log = args.out / "logs" / f"train-p{p}-r{r}.log"
            load = load_average()
            code, wall = run_command(fit_argv(args, p, run_dir), threads[p], log, args.timeout)
            row = {"round": r, "phase": "train", "processes": p, "threads": threads[p],
                   "per_process_batch": args.global_batch // p, "exit_status": code, "wall_seconds": wall,
                   "load_1min_before": load[0] if load else math.nan, "run_dir": str(run_dir),
                   **training_figures(run_dir)}
            epochs_total = sum(float(v) for v in row["all_epoch_seconds"].split(";") if v)
            row["overhead_seconds"] = wall - epochs_total - row["fit_evaluation_seconds"]
            record(row)
            status = "ok" if code == 0 else f"FAILED (exit status {code}; log {log})"
            print(f"round {r} train    p={p}: epoch {fmt(row['epoch_seconds'], '{:.2f}')} s, wall {wall:.1f} s, "
                  f"train/val ELBO {fmt(row['final_train_elbo'], '{:.3f}')} / {fmt(row['final_val_elbo'], '{:.3f}')}, "
                  f"load {fmt(row['load_1min_before'], '{:.2f}')}  {status}")
            if code != 0:
                print(tail(log))
            if p == procs[0] and eval_run is None and code == 0:
                eval_run = run_dir
        # ---- evaluation -------------------------------------------------------------------- #
        if eval_run is None:
            print(f"round {r} evaluate: skipped (no {procs[0]}-process training run finished)")
            continue
        for p in order:
            name = f"scaling-p{p}-r{r}"
            log = args.out / "logs" / f"evaluate-p{p}-r{r}.log"
            load = load_average()
            code, wall = run_command(evaluate_argv(args, p, eval_run, name), threads[p], log, args.timeout)
            figures = evaluation_figures(eval_run, name, estimator)
            n = figures["datapoints"]
            row = {"round": r, "phase": "evaluate", "processes": p, "threads": threads[p], "exit_status": code,
                   "wall_seconds": wall, "load_1min_before": load[0] if load else math.nan, "run_dir": str(eval_run),
                   "result_set": name, **figures,
                   "datapoints_per_second": n / figures["evaluation_seconds"] if n and figures["evaluation_seconds"] > 0
                   else math.nan,
                   "wall_datapoints_per_second": n / wall if n else math.nan}
            record(row)
            status = "ok" if code == 0 else f"FAILED (exit status {code}; log {log})"
            print(f"round {r} evaluate p={p}: {n} points in {fmt(row['evaluation_seconds'], '{:.2f}')} s "
                  f"({fmt(row['datapoints_per_second'], '{:.2f}')}/s), wall {wall:.1f} s, "
                  f"load {fmt(row['load_1min_before'], '{:.2f}')}  {status}")
            if code != 0:
                print(tail(log))

    total = time.perf_counter() - started_all
    info["uptime_end"] = uptime_line()
    load_end = load_average()

    # ---- checks ------------------------------------------------------------------------------ #
    evals = [r for r in rows if r["phase"] == "evaluate" and r["exit_status"] == 0 and r["per_datapoint"]]
    reference = next((r for r in evals if r["processes"] == procs[0]), None)
    checks = []
    if reference is not None:
        for r in evals:
            if r is reference:
                continue
            same, diff = compare_values(Path(reference["per_datapoint"]), Path(r["per_datapoint"]))
            checks.append({"against": f"p{r['processes']} round {r['round']}", "processes": r["processes"],
                           "identical": same, "max_abs_difference": diff})
    across = [c for c in checks if c["processes"] != procs[0]]
    if reference is None or not across:
        identical_text = "not checked (no successful evaluation with " + \
            ("the reference process count)" if reference is None else "another process count)")
        identical = None
    else:
        identical = all(c["identical"] for c in across)
        worst = max(c["max_abs_difference"] for c in across)
        identical_text = ("yes, byte for byte" if identical else f"NO (largest absolute difference {worst:.3g})") + \
            f" ({len(across)} evaluation(s) with {', '.join(str(p) for p in procs[1:])} process(es) against " \
            f"p{procs[0]} round {reference['round']})"
    repeat_checks = [c for c in checks if c["processes"] == procs[0]]
    repeat_text = ("yes" if all(c["identical"] for c in repeat_checks) else "NO") if repeat_checks else "not checked"
    trains = {p: [r for r in rows if r["phase"] == "train" and r["processes"] == p and r["exit_status"] == 0]
              for p in procs}
    elbo_gap = math.nan
    if trains[procs[0]] and any(trains[p] for p in procs[1:]):
        base = trains[procs[0]][0]
        elbo_gap = max(abs(t[c] - base[c]) for p in procs[1:] for t in trains[p]
                       for c in ("final_train_elbo", "final_val_elbo"))
    failed = [r for r in rows if r["exit_status"] != 0]
    loads = [r["load_1min_before"] for r in rows if not math.isnan(r["load_1min_before"])]
    if args.device == "cpu" and loads and median(loads) > info["cores"]:
        busy = (f"the machine was busy (median 1-minute load {median(loads):.2f} on {info['cores']} cores): "
                "other processes took CPU time from these commands")
        if max(threads.values()) > 1:
            busy += (", and a process with several OpenMP threads loses far more to that than one with a single "
                     "thread, so the ratios above measure contention as much as scaling; compare with --cores 1 "
                     "(every process 1 thread)")
        notes.append(busy)

    # ---- the table ----------------------------------------------------------------------------- #
    table = summarise(rows, procs, args.k, args.count)
    md = markdown_table(table, procs, threads, args.device)
    lines = [f"# Scaling over processes ({args.device})", "",
             f"- CPU: {info['cpu']}; {info['cpu_count']} logical CPUs, {args.cores} shared out as threads "
             f"({', '.join(f'{p} x {threads[p]}' for p in procs)})",
             f"- torch {info['torch']}, pyro {info['pyro']}, Python {info['python']}, {info['platform']}"]
    if args.device == "cuda":
        lines.append(f"- GPUs: {', '.join(info['gpus'])}")
    lines += [f"- uptime at start: {info['uptime_start']}", f"- uptime at end: {info['uptime_end']}",
              f"- 1-minute load before each command: median "
              f"{fmt(median([r['load_1min_before'] for r in rows]), '{:.2f}')}, range "
              f"{fmt(min((r['load_1min_before'] for r in rows), default=math.nan), '{:.2f}')}-"
              f"{fmt(max((r['load_1min_before'] for r in rows), default=math.nan), '{:.2f}')}",
              f"- training: VAE 784-400-50 (Bernoulli, dynamic binarization, Adam lr 1e-3, seed {SEED}) on "
              f"{data_text}, {args.epochs} epochs, global batch {args.global_batch} "
              f"({', '.join(f'{p} x {args.global_batch // p}' for p in procs)})",
              f"- evaluation: IWAE-{args.k} on the first {args.count} test points of the p{procs[0]} round-1 run, "
              f"seed {SEED}",
              f"- medians over {args.repeats} rounds (process counts interleaved, order reversed every other round); "
              f"speed-up = t({procs[0]}) / t(P) for times, rate(P) / rate({procs[0]}) for throughputs",
              f"- total {total / 60:.1f} minutes", "", md, "",
              f"- per_datapoint.csv identical across process counts: {identical_text}",
              f"- per_datapoint.csv identical across rounds with {procs[0]} process(es): {repeat_text}",
              f"- largest difference of the last-epoch train/val ELBO from the p{procs[0]} round-1 run: "
              f"{fmt(elbo_gap, '{:.2g}')} nats",
              f"- failed commands: {len(failed)}" + ("" if not failed else " (" + "; ".join(
                  f"{r['phase']} p{r['processes']} round {r['round']}: exit status {r['exit_status']}"
                  for r in failed) + ")")]
    lines += [f"- note: {note}" for note in notes]
    report = "\n".join(lines) + "\n"

    summary = pd.DataFrame([{k: v for k, v in e.items() if k not in ("format",)} for e in table])
    write(args.out / "scaling.csv", summary.to_csv(index=False))
    write(args.out / "scaling.md", report)
    write(args.out / "scaling.json", json.dumps({
        "machine": info, "load_start": load_start, "load_end": load_end, "settings": {
            "device": args.device, "processes": procs, "threads": threads, "cores": args.cores, "data": args.data,
            "data_dir": str(args.data_dir), "max_examples": args.max_examples, "epochs": args.epochs,
            "global_batch": args.global_batch, "k": args.k, "count": args.count, "repeats": args.repeats,
            "quick": args.quick},
        "table": [{k: v for k, v in e.items() if k != "format"} for e in table],
        "identical_across_processes": identical, "per_datapoint_checks": checks,
        "elbo_max_abs_difference": elbo_gap, "commands": rows, "failed": len(failed), "total_seconds": total,
        "notes": notes}, indent=2, default=str, allow_nan=True))

    print()
    print(report)
    print(f"wrote {args.out / 'scaling.md'}, {args.out / 'scaling.csv'}, {args.out / 'commands.csv'}")
    verdict = "all commands succeeded" if not failed else f"{len(failed)} of {len(rows)} commands FAILED"
    same = {True: "identical", False: "NOT identical", None: "not compared"}[identical]
    print(f"{verdict}; per-datapoint results across process counts: {same}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
