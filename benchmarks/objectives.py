"""Does the IWAE table's ordering hold at a budget a 2-core CPU can afford? Objectives on MNIST, side by side.

What is run
-----------
Burda, Grosse & Salakhutdinov (2016), "Importance weighted autoencoders",
Table 1, at a fraction of its budget: MNIST (``../shared/data/mnist``; the
four IDX files) with dynamic binarization (a fresh Bernoulli draw of every
training batch; validation and test binarized once with the seed), their
one-stochastic-layer network (encoder 784-200-200-2x50, decoder
50-200-200-784, tanh; ``--hidden 200,200 --z-dim 50 --activation tanh``),
and six cells:

=========  =========  ===  ==============================================
cell       objective  K    Burda et al. 2016, Table 1 (1 layer, test NLL)
=========  =========  ===  ==============================================
vae        trace      1    86.76 (VAE, k=1)
iwae-5     iwae       5    85.54 (IWAE, k=5)
iwae-50    iwae       50   84.78 (IWAE, k=50)
dreg-5     dreg       5    -  (DReG: Tucker et al. 2019, not in that table)
dreg-50    dreg       50   -
rws-5      rws        5    -  (reweighted wake-sleep, Bornschein & Bengio 2015)
=========  =========  ===  ==============================================

Burda et al. trained 3,280 epochs (their two-stochastic-layer network reached
VAE 85.33, IWAE k=50 82.90 nats). Here every cell trains ``--epochs`` epochs
with Adam (``--lr``, batch ``--batch-size``, no early stopping, no learning-rate
schedule), then the toolkit estimates the test NLL = -IWAE-5000 on the full
test set (10,000 images; ``--n`` to use its first N, ``--k`` for another K)
and counts *active units* as Burda et al. do: latent u is active when
Cov_x(E_{q(z|x)}[z_u]) > 0.01, over the same test images.

The cells are run through ``ppl_genmodels.sweep(spec, out)``: ``spec`` has
the shared ``fit`` options at its top level, a ``grid`` of option lists (every
combination is one run) and an ``evaluate`` table (``estimators``, ``n``); the
sweep trains each cell, evaluates it and counts its active units. The six cells
are not one full product (trace only at K=1, rws only at K=5), so the script
groups the objectives that share the same set of K and runs one sweep per
group, each in its own folder under ``--out``: trace x {1};
{iwae, dreg} x {5, 50}; rws x {5}. ``--cells`` picks a subset. A sweep
started again in its folder skips its finished cells, so an interrupted
benchmark continues where it stopped when run again with the same ``--out``.

What is checked
---------------
The table prints each cell's test NLL with its standard error, active units,
seconds per epoch and Burda et al.'s value, then the ordering of Table 1:
IWAE and DReG better (lower NLL) than the VAE at every K, and better at K=50
than at K=5. Each comparison is a paired difference over the same test images
(per-datapoint IWAE values), with its standard error; "holds" means the
difference has the expected sign. The numbers will not reach Burda et al.'s
(far fewer epochs, no schedule, batch 100 rather than 20); the question is
whether the ordering already shows.

Every cell trains all its epochs (``patience`` 0) and is evaluated at its last
epoch (the sweep's ``evaluate.weights = "last"``), as Burda et al. report: the
epoch with the best validation ELBO would favour the ELBO-trained VAE, since the
IWAE-family objectives do not maximise the ELBO.

Budget
------
``--quick`` checks that the script works (2,000 images in every split, 2
epochs, IWAE-5000 on 100 test images; 42 s on 2 cores) and, from its fastest
epoch of each cell and its evaluation, prints an estimate of the full run. On
the 2-core CPU this was written on (AMD EPYC, 2 threads, torch 2.13 CPU, a
load average near 2 from other work), it estimated one full epoch (54,000
images, batch 100, validation included) at about 4 s for vae, 5 s for
iwae-5, 32 s for iwae-50, 7 s for dreg-5, 51 s for dreg-50 and 5 s for rws-5,
104 s for the six together, and IWAE-5000 with the active units at 0.021 s
per test image, 210 s per cell on the full test set: 21 minutes of evaluation
for the six cells. The evaluation dominates at full size, so the default
spends the budget on training instead: 12 epochs and IWAE-5000 on the first
2,000 test images (the paired ordering checks need far fewer images than the
absolute values). Measured on a quiet machine (load average near 2): 23.5
minutes in all (trace 74 s, the four iwae/dreg cells 1,241 s, rws 97 s).

Usage::

    python benchmarks/objectives.py --quick                  # under a minute: does it work, what would it cost
    python benchmarks/objectives.py                          # 12 epochs, 2,000 test images: about 24 minutes on 2 cores
    python benchmarks/objectives.py --epochs 4 --n 10000     # the full test set, less training
    python benchmarks/objectives.py --cells vae,iwae-5,iwae-50 --out runs/objectives-iwae

Writes ``--out`` (default ``runs/objectives-<date>-<time>``): one sweep
folder per group (``trace_K1/``, ``iwae-dreg_K5-50/``, ``rws_K5/``, each with
its run directories, ``sweep.csv`` and plots), ``objectives.csv`` and
``objectives.md`` (the table, the ordering checks and the settings). The last
line printed says whether the ordering held.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

import ppl_genmodels
from ppl_genmodels.runs import Run, atomic_write

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
FULL_TRAIN = 54_000  # the MNIST training split (60,000 less the 6,000 of validation)
FULL_TEST = 10_000
DEFAULT_EPOCHS = 12  # see "Budget" in the docstring
DEFAULT_TEST = 2000  # test images of the default run (see "Budget")
SWEEP_SET = re.compile(r"sweep(-\d+)?")  # the result set a sweep writes into each cell's run


@dataclass(frozen=True)
class Cell:
    name: str
    objective: str
    k: int
    burda: float | None  # Burda et al. 2016, Table 1, one stochastic layer: test NLL after 3,280 epochs


CELLS = (
    Cell("vae", "trace", 1, 86.76),
    Cell("iwae-5", "iwae", 5, 85.54),
    Cell("iwae-50", "iwae", 50, 84.78),
    Cell("dreg-5", "dreg", 5, None),
    Cell("dreg-50", "dreg", 50, None),
    Cell("rws-5", "rws", 5, None),
)
# (better, worse): the first should have the lower test NLL
ORDERING = (("iwae-5", "vae"), ("iwae-50", "vae"), ("iwae-50", "iwae-5"),
            ("dreg-5", "vae"), ("dreg-50", "vae"), ("dreg-50", "dreg-5"))


# ---------------------------------------------------------------------------------------------
# the sweeps
# ---------------------------------------------------------------------------------------------


def groups(cells: list[Cell]) -> list[dict]:
    """Grids that are full products: the objectives with the same set of K share one sweep."""
    ks = {}
    for cell in cells:
        ks.setdefault(cell.objective, set()).add(cell.k)
    by_ks = {}
    for objective, k_set in ks.items():
        by_ks.setdefault(tuple(sorted(k_set)), []).append(objective)
    return [{"elbo": objectives, "particles": list(k_tuple)} for k_tuple, objectives in by_ks.items()]


def group_name(grid: dict) -> str:
    return f"{'-'.join(grid['elbo'])}_K{'-'.join(map(str, grid['particles']))}"


def spec_for(args, grid: dict) -> dict:
    """The sweep spec: Burda et al.'s network and data, the shared training options, the grid, the evaluation."""
    spec = dict(model="vae", data="mnist", data_dir=str(args.data_dir), binarize="dynamic", hidden=[200, 200],
                z_dim=50, activation="tanh", epochs=args.epochs, patience=0, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, grid=grid, evaluate={"estimators": f"iwae:{args.k}", "n": args.n, "weights": "last"})
    if args.max_examples is not None:
        spec["max_examples"] = args.max_examples
    return spec


# ---------------------------------------------------------------------------------------------
# reading the runs back
# ---------------------------------------------------------------------------------------------


def sweep_set(run_dir: Path) -> tuple[Path, float]:
    """The newest sweep result set of a cell's run, and the seconds it took (estimates and active units)."""
    index = Run.read_results(run_dir)
    for name, kind, folder, seconds in zip(index["name"][::-1], index["kind"][::-1], index["path"][::-1],
                                           index["seconds"][::-1]):
        if kind == "evaluation" and SWEEP_SET.fullmatch(name):
            return run_dir / folder, float(seconds)
    raise RuntimeError(f"{run_dir} has no sweep result set")


def collect(tables: dict[str, pd.DataFrame], out: Path, cells: list[Cell], estimator: str
            ) -> tuple[pd.DataFrame, dict]:
    """One row per cell from the sweeps' tables, and each cell's per-datapoint values (for paired differences)."""
    by_key = {(c.objective, c.k): c for c in cells}
    rows, values = [], {}
    for group, table in tables.items():
        for r in table.to_dict("records"):
            cell = by_key[(r["elbo"], int(r["particles"]))]
            run_dir = out / group / r["run_dir"]
            folder, eval_seconds = sweep_set(run_dir)
            values[cell.name] = pd.read_csv(folder / "per_datapoint.csv").set_index("index")[estimator]
            metrics = pd.read_csv(run_dir / "metrics.csv")
            rows.append({"cell": cell.name, "objective": cell.objective, "K": cell.k, "epochs": r["epochs_run"],
                         "best_epoch": r["best_epoch"],
                         "test_nll": -r[f"test_{estimator}"], "stderr": r[f"test_{estimator}_se"],
                         "n": len(values[cell.name]), "active_units": r["active_units"],
                         "seconds_per_epoch": metrics["seconds"].median(),
                         "fastest_epoch_seconds": metrics["seconds"].min(), "evaluation_seconds": eval_seconds,
                         "burda2016_nll": cell.burda, "run": str(run_dir)})
    order = {c.name: i for i, c in enumerate(CELLS)}
    return pd.DataFrame(rows).sort_values("cell", key=lambda s: s.map(order)).reset_index(drop=True), values


def ordering(values: dict) -> pd.DataFrame:
    """Paired differences NLL(better) - NLL(worse) over the same test images; negative: the ordering holds."""
    rows = []
    for better, worse in ORDERING:
        if better in values and worse in values:
            diff = -(values[better] - values[worse]).dropna()  # NLL = -log p(x), datapoint by datapoint
            se = diff.std() / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
            rows.append({"claim": f"{better} < {worse}", "difference": diff.mean(), "stderr": se,
                         "holds": bool(diff.mean() < 0)})
    return pd.DataFrame(rows, columns=["claim", "difference", "stderr", "holds"])


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def burda(value) -> str:
    return f"{value:.2f}" if pd.notna(value) else "-"


def print_table(table: pd.DataFrame, checks: pd.DataFrame, estimator: str) -> None:
    print(f"\n{'cell':<8} {'objective':<9} {'K':>3} {'epochs':>6} {'at':>4} {f'NLL (-{estimator})':>16} {'+-':>5} "
          f"{'active':>6} {'s/epoch':>8}  {'Burda et al. 2016 (3,280 epochs)':>32}")
    for r in table.itertuples():
        print(f"{r.cell:<8} {r.objective:<9} {r.K:>3} {r.epochs:>6} {r.best_epoch:>4} {r.test_nll:>16.2f} {r.stderr:>5.2f} "
              f"{r.active_units:>6} {r.seconds_per_epoch:>8.1f}  {burda(r.burda2016_nll):>32}")
    print("\nordering (paired over the same test images; negative: the first is better)")
    for r in checks.itertuples():
        print(f"  {r.claim:<20} {r.difference:+8.3f} +- {r.stderr:.3f} nats  {'holds' if r.holds else 'does NOT hold'}")


def markdown(table: pd.DataFrame, checks: pd.DataFrame, notes: list[str], estimator: str) -> str:
    lines = [f"| cell | objective | K | epochs | evaluated epoch | test NLL (-{estimator}) | active units | s/epoch | "
             "Burda et al. 2016 (1 layer, 3,280 epochs) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.cell} | {r.objective} | {r.K} | {r.epochs} | {r.best_epoch} | {r.test_nll:.2f} +- {r.stderr:.2f} | "
              f"{r.active_units} | {r.seconds_per_epoch:.1f} | {burda(r.burda2016_nll)} |" for r in table.itertuples()]
    lines += ["", "| claim | NLL difference (nats, paired) | holds |", "|---|---|---|"]
    lines += [f"| {r.claim} | {r.difference:+.3f} +- {r.stderr:.3f} | {'yes' if r.holds else 'no'} |"
              for r in checks.itertuples()]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def estimate_full_run(table: pd.DataFrame, train_examples: int, epochs: int, n: int) -> None:
    """From a quick run: a full epoch per cell (its fastest epoch, scaled by the training images) and the evaluation
    (the fastest cell's, scaled by the test images: every cell has the same network and K)."""
    evaluation = table["evaluation_seconds"].min() / table["n"].iloc[0] * n
    print(f"\nestimate of a full run ({FULL_TRAIN:,} training images, {epochs} epochs, {n:,} test images), "
          f"extrapolated from this run's fastest epochs:")
    total = 0.0
    for r in table.itertuples():
        epoch = r.fastest_epoch_seconds * FULL_TRAIN / train_examples
        total += epoch * epochs + evaluation
        print(f"  {r.cell:<8} {epoch:7.0f} s per epoch, evaluation {evaluation:5.0f} s")
    print(f"  total about {total / 60:.0f} minutes (at this machine's load during the quick run)")


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs of every cell (default "
                                                                 f"{DEFAULT_EPOCHS}; --quick: 2)")
    parser.add_argument("--n", type=int, default=None, help=f"test images of the evaluation (default "
                                                            f"{DEFAULT_TEST:,}; --quick: 100)")
    parser.add_argument("--k", type=int, default=5000, help="particles of the test IWAE-k (default 5000)")
    parser.add_argument("--cells", default=",".join(c.name for c in CELLS),
                        help="comma-separated subset of " + ", ".join(c.name for c in CELLS))
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-examples", type=int, default=None, help="cap every split (--quick: 2000)")
    parser.add_argument("--data-dir", type=Path, default=MNIST_DIR)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/objectives-<time>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--quick", action="store_true",
                        help="check that it works and estimate the full run: 2,000 training images, 2 epochs, n=100")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.epochs is None:
        args.epochs = 2 if quick else DEFAULT_EPOCHS
    if args.n is None:
        args.n = 100 if quick else DEFAULT_TEST
    if args.max_examples is None and quick:
        args.max_examples = 2000
    args.out = args.out or Path(f"runs/objectives-{time.strftime('%Y%m%d-%H%M%S')}")
    names = [c for c in args.cells.split(",") if c]
    unknown = sorted(set(names) - {c.name for c in CELLS})
    if unknown:
        parser.error(f"unknown cell(s) {', '.join(unknown)}")
    args.cells = [c for c in CELLS if c.name in names]
    return args


def mnist_present(folder: Path) -> bool:
    """The four IDX files, gzipped or raw."""
    stems = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    return all((folder / f"{stem}-ubyte.gz").is_file() or (folder / f"{stem}-ubyte").is_file() for stem in stems)


def main(argv=None) -> int:
    args = parse(argv)
    if not mnist_present(args.data_dir):
        print(f"skipped: MNIST not found in {args.data_dir} (the four IDX files; --data-dir to point elsewhere)")
        return 0
    if not callable(getattr(ppl_genmodels, "sweep", None)):
        print("error: this version of the toolkit has no ppl_genmodels.sweep, which this benchmark runs on")
        return 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    estimator = f"iwae{args.k}"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; cells {', '.join(c.name for c in args.cells)}; "
          f"{args.epochs} epochs; {estimator} on {args.n} test images; writing {args.out}")
    tables = {}
    for grid in groups(args.cells):
        started = time.perf_counter()
        tables[group_name(grid)] = ppl_genmodels.sweep(spec_for(args, grid), args.out / group_name(grid),
                                                       progress=not args.quiet)
        print(f"sweep {group_name(grid)}: {time.perf_counter() - started:.0f} s")

    table, values = collect(tables, args.out, args.cells, estimator)
    checks = ordering(values)
    notes = [f"{args.epochs} epochs, Adam lr {args.lr}, batch {args.batch_size}, seed {args.seed}, dynamic "
             f"binarization, 784-200-200-50 tanh; {estimator} on {args.n} test images"
             + (f"; every split capped at {args.max_examples} images" if args.max_examples else ""),
             "Burda et al. 2016, Table 1: one stochastic layer after 3,280 epochs (VAE 86.76, IWAE k=5 85.54, "
             "k=50 84.78); two stochastic layers: VAE 85.33, IWAE k=50 82.90"]
    print_table(table, checks, estimator)
    atomic_write(args.out / "objectives.csv", table.to_csv(index=False))
    atomic_write(args.out / "objectives.md", markdown(table, checks, notes, estimator))
    for note in notes:
        print(f"note: {note}")
    if args.quick:
        estimate_full_run(table, args.max_examples or FULL_TRAIN, DEFAULT_EPOCHS, DEFAULT_TEST)
    print(f"wrote {args.out / 'objectives.csv'}, {args.out / 'objectives.md'}")
    held = bool(len(checks)) and bool(checks["holds"].all())
    print(f"ordering of Burda et al.'s Table 1 {'held' if held else 'did NOT hold'} "
          f"({int(checks['holds'].sum())} of {len(checks)} comparisons)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
