"""Comparing training algorithms: a grid of ``fit`` options, one ordinary run per cell, one table.

A sweep spec (a TOML or JSON file, or a dict) holds ``fit`` options shared by every
cell, spelled as :class:`~ppl_genmodels.config.RunConfig` fields, a ``grid`` table
mapping options to lists of values (the cells are their product) and an optional
``evaluate`` table::

    model = "vae"
    data = "digits"
    epochs = 20

    [grid]
    elbo = ["trace", "iwae"]
    particles = [5, 50]
    seed = [0, 1]

    [evaluate]
    estimators = "elbo,iwae:5000"   # the ladder every cell is evaluated with (the default)
    n = 1000                        # the first n test points (default: all)
    chains = 16                     # AIS chains per datapoint
    samples = 100                   # guide draws per datapoint for active units
    weights = "best"                # "best": the best validation-ELBO epoch; "last": the last epoch

:func:`sweep` checks the whole spec before anything trains (every key, every
grid value, every cell's configuration, the data, every cell's model built and
traced once), then holds the lock of the sweep directory and, cell by cell:

- trains it with :func:`~ppl_genmodels.train.fit` in ``DIR/<cell name>/``, an
  ordinary run directory named from its grid values (``elbo=iwae,particles=5,seed=0``);
  a cell directory that already holds a run is resumed (``fit(resume=True)``);
- evaluates its best weights on the first ``n`` test points with the ladder
  (``evaluate_run``) and counts its active units
  (:func:`~ppl_genmodels.evaluation.active_units`), and writes both as the
  result set ``evaluation/sweep/`` of the run (``summary.csv``, ``per_datapoint.csv``,
  ``active_units.csv``); a cell whose index lists such a set for this ladder is
  finished and is skipped when the sweep runs again;
- adds its row to ``DIR/sweep.csv``, rewritten (atomically) after every cell.

At the end ``DIR/plots/`` gets ``validation.png`` and ``logpx.png``. ``DIR/sweep.json``
records the spec: a sweep started again in ``DIR`` must have the same options and
evaluation, and the same grid options (their lists of values may change: new cells
are added, finished ones kept).

The data split: every cell has the same data options (data options cannot be in
the grid) and the same split. A run's split is drawn from its ``data_seed``, which
defaults to its ``seed``; when ``seed`` is in the grid and the spec gives no
``data_seed``, every cell gets ``data_seed = 0``, so cells that differ in ``seed``
are replicates (initial weights, minibatches, particles) on one split and one set
of test points.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ppl_genmodels import distributed, runs, tables
from ppl_genmodels.config import ConfigError, RunConfig, build_model, resolve_device
from ppl_genmodels.data import DataOptions
from ppl_genmodels.evaluation import active_units, evaluate_run, parse_estimators
from ppl_genmodels.plots import plot_sweep
from ppl_genmodels.runs import Run, write_csv
from ppl_genmodels.traces import TraceError, first_line
from ppl_genmodels.train import TrainingDiverged, fit

__all__ = ["sweep", "read_spec", "plan_sweep", "SweepPlan", "Cell", "cell_name", "finished_set", "table_columns",
           "TABLE_FILE", "SPEC_FILE", "SET_NAME", "UNITS_FILE", "DEFAULT_ESTIMATORS"]

TABLE_FILE = "sweep.csv"
SPEC_FILE = "sweep.json"
SET_NAME = "sweep"                  # each cell's result set: RUN_DIR/evaluation/sweep/ (sweep-2, ... if taken)
UNITS_FILE = "active_units.csv"
DEFAULT_ESTIMATORS = "elbo,iwae:5000"
EVALUATE_DEFAULTS = {"estimators": DEFAULT_ESTIMATORS, "n": None, "chains": 16, "samples": 100, "weights": "best"}
_SET_PATTERN = re.compile(rf"{SET_NAME}(-\d+)?")
_SET_BY_FIT = ("model_sha256", "model_instance")      # recorded by fit itself, never set by a spec
_DATA_NAMES = {"data"} | {f.name for f in dataclasses.fields(DataOptions)}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME = 200


@dataclass
class Cell:
    """One cell of the grid: its directory name, its grid values and every ``fit`` option it trains with."""

    name: str
    values: dict
    options: dict

    @property
    def label(self) -> str:
        return self.name.replace(",", ", ")


@dataclass
class SweepPlan:
    """A checked spec: shared options, grid, the cells in grid order, and the evaluation of every cell."""

    shared: dict
    grid: dict
    cells: list[Cell]
    estimators: str
    n: int | None
    chains: int
    samples: int
    weights: str = "best"

    @property
    def ladder(self) -> dict:
        """What defines a cell's evaluation (recorded with its result set)."""
        return {"estimators": self.estimators, "n": self.n, "chains": self.chains, "samples": self.samples,
                "weights": self.weights}

    def record(self) -> dict:
        """The content of ``DIR/sweep.json``."""
        return _plain({"options": self.shared, "grid": self.grid, "evaluate": self.ladder})


def _plain(value):
    """``value`` as JSON would give it back (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------------


def read_spec(spec) -> dict:
    """A sweep spec as a dict: ``spec`` itself (a copy, paths as text), or the TOML or JSON file it names."""
    if isinstance(spec, dict):
        try:
            return json.loads(json.dumps(spec, default=_path_text))
        except (TypeError, ValueError):
            return dict(spec)  # a value JSON cannot hold: refused by the type checks, by name
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist")
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("toml", "json"):
        raise ConfigError(f"sweep spec {path} must be a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if kind == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        first = first_line(err)
        raise ConfigError(f"sweep spec {path} is not valid {kind.upper()}: {first}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"sweep spec {path} must hold a table of options at its top level")
    return values


def _path_text(value) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _option_names() -> list[str]:
    return [name for name in RunConfig.names() if name not in _SET_BY_FIT]


def _check_keys(spec: dict) -> None:
    unknown = sorted(set(spec) - set(_option_names()) - {"grid", "evaluate"})
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in the sweep spec; its keys are fit options "
                          f"({', '.join(_option_names())}), grid and evaluate")


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _check_grid(spec: dict) -> dict:
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError('the sweep spec needs a grid table of options and their lists of values, '
                          'e.g. grid = {elbo = ["trace", "iwae"], particles = [1, 5]}')
    for key, values in grid.items():
        if key not in _option_names():
            raise ConfigError(f"unknown grid option {key!r}; grid options are fit options "
                              f"({', '.join(_option_names())})")
        if key in _DATA_NAMES:
            raise ConfigError(f"{key} cannot be a grid option: every cell shares the data and its options (the "
                              f"cells are evaluated on the same test points); set {key} at the top level")
        if key in spec:
            raise ConfigError(f"{key} is both a top-level option and a grid option; give it in one place")
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"grid.{key} is an empty list; give at least one value")
        for i, value in enumerate(values):
            _check_types({key: value}, "grid.")
            if any(_same(value, other) for other in values[:i]):
                raise ConfigError(f"grid.{key} repeats the value {value!r}")
    return grid


def _check_count(table: dict, key: str, allow_none: bool = False) -> None:
    value = table[key]
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"evaluate.{key} must be an integer >= 1, got {value!r}")


def _check_evaluate(spec: dict) -> dict:
    table = spec.get("evaluate", {})
    if not isinstance(table, dict):
        raise ConfigError(f"evaluate must be a table (estimators, n, chains, samples), got {table!r}")
    unknown = sorted(set(table) - set(EVALUATE_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in evaluate; known: {', '.join(EVALUATE_DEFAULTS)}")
    table = {**EVALUATE_DEFAULTS, **table}
    if not isinstance(table["estimators"], (str, list)):
        raise ConfigError(f"evaluate.estimators must be a string such as {DEFAULT_ESTIMATORS!r}, "
                          f"got {table['estimators']!r}")
    try:
        specs = parse_estimators(table["estimators"])
    except ValueError as err:
        raise ConfigError(f"evaluate.estimators: {err}") from None
    table["estimators"] = ",".join(s.kind if s.size is None else f"{s.kind}:{s.size}" for s in specs)
    _check_count(table, "n", allow_none=True)
    _check_count(table, "chains")
    _check_count(table, "samples")
    if table["weights"] not in ("best", "last"):
        raise ConfigError(f"evaluate.weights must be 'best' (the best validation ELBO epoch) or 'last', "
                          f"got {table['weights']!r}")
    return table


def _fits(value, hint) -> bool:
    """Whether ``value`` (as TOML or JSON gives it) has the annotated type ``hint`` of an option."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _check_types(options: dict, where: str) -> None:
    hints = {**typing.get_type_hints(DataOptions), **typing.get_type_hints(RunConfig)}
    for key, value in options.items():
        if not _fits(value, hints[key]):
            text = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise ConfigError(f"{where}{key} = {value!r} has the wrong type (expected {text})")


def _text(value) -> str:
    """A grid value as text for a directory name."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list):
        return "-".join(_text(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}_{_text(v)}" for k, v in value.items())
    return str(value)


def cell_name(values: dict) -> str:
    """The directory name of a cell: ``key=value`` joined by commas, other characters than letters, digits
    and ``._+-`` of a value as ``_`` (``renyi:0.5`` -> ``renyi_0.5``, ``[64, 64]`` -> ``64-64``)."""
    name = ",".join(f"{key}={_UNSAFE.sub('_', _text(value))}" for key, value in values.items())
    if len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 13]}...{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return name


def _cells(shared: dict, grid: dict) -> list[Cell]:
    cells, names = [], {}
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination))
        name = cell_name(values)
        if name in names:
            raise ConfigError(f"grid values {names[name]} and {values} give the same directory name {name!r}")
        names[name] = values
        cells.append(Cell(name, values, {**shared, **values}))
    return cells


def _check_cells(plan: SweepPlan) -> None:
    """Every cell's configuration, the data and every cell's model, built and traced once: what ``fit``
    checks before it writes anything, done for all cells before the first one trains."""
    configs = []
    for cell in plan.cells:
        _check_types(cell.options, f"cell {cell.name}: ")
        try:
            configs.append(RunConfig.from_dict(cell.options).validate())
        except (TypeError, ValueError) as err:
            raise ConfigError(f"cell {cell.name}: {err}") from None
    dataset = configs[0].load_data()  # the data options are the same in every cell
    x, y = dataset.probe()
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: the caller's stream is untouched
        for cell, config in zip(plan.cells, configs):
            try:
                program = build_model(config, dataset)
                program.check(x, y)
            except (ConfigError, TraceError) as err:
                raise ConfigError(f"cell {cell.name}: {err}") from None
            if "exact" in plan.estimators.split(",") and not callable(getattr(program, "exact_log_marginal", None)):
                raise ConfigError(f"cell {cell.name}: evaluate.estimators has exact, but model "
                                  f"{config.model} has no exact_log_marginal")


def plan_sweep(spec) -> SweepPlan:
    """Read and check a sweep spec (see the module docstring); one-line :class:`ConfigError` on anything wrong."""
    spec = read_spec(spec)
    _check_keys(spec)
    grid = _check_grid(spec)
    table = _check_evaluate(spec)
    shared = {key: value for key, value in spec.items() if key not in ("grid", "evaluate")}
    _check_types(shared, "")
    if "seed" in grid and "data_seed" not in shared and "data_seed" not in grid:
        shared["data_seed"] = 0  # replicates over seed share one split
    plan = SweepPlan(shared, grid, _cells(shared, grid), table["estimators"], table["n"], table["chains"],
                     table["samples"], table["weights"])
    _check_cells(plan)
    return plan


# ----------------------------------------------------------------------------------------------
# the sweep directory
# ----------------------------------------------------------------------------------------------


def _check_out(out: Path, plan: SweepPlan) -> None:
    """``out`` is new, or a sweep of the same options whose cell directories are runs (or not there yet)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep directory {out} exists as a file; choose another --out")
    record = out / SPEC_FILE
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{record} is not valid JSON: {err}") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"{record} is not the record of a sweep; choose another --out")
        now = plan.record()
        for what, same in (("options", saved.get("options") == now["options"]),
                           ("evaluation", saved.get("evaluate") == now["evaluate"]),
                           ("grid options", list(saved.get("grid", {})) == list(now["grid"]))):
            if not same:
                raise ConfigError(f"{out} holds a sweep with other {what} ({record}); a sweep started again must "
                                  "keep them (only the grid's values may change): choose another --out")
    for cell in plan.cells:
        path = out / cell.name
        if path.exists() and not (path.is_dir() and ((path / runs.CONFIG_FILE).is_file() or runs.restartable(path))):
            raise ConfigError(f"{path} exists and is not a run directory; move it away or choose another --out")


def finished_set(path: Path, plan: SweepPlan) -> Path | None:
    """The cell's complete result set of this sweep's evaluation, or None if the cell is not finished."""
    index = Run.read_results(path)
    for name, kind, folder, options in zip(index["name"][::-1], index["kind"][::-1], index["path"][::-1],
                                           index["options"][::-1]):
        if kind != "evaluation" or not _SET_PATTERN.fullmatch(name):
            continue
        try:
            recorded = json.loads(options).get("sweep")
        except (json.JSONDecodeError, AttributeError):
            continue
        if recorded == _plain(plan.ladder) and (path / folder / "summary.csv").is_file() \
                and (path / folder / UNITS_FILE).is_file():
            return path / folder
    return None


def _train(cell: Cell, path: Path, progress: bool, resume: bool) -> Run:
    """Train the cell (or resume it, when its directory holds a run); returns the run with its best weights."""
    if resume:  # the spec's epochs, patience and device hold for a resumed cell too
        resumable = {key: value for key, value in cell.options.items() if key in RunConfig.resumable()}
        return fit(out=path, resume=True, progress=progress, evaluate=False, plots=False, **resumable)
    options = dict(cell.options)
    return fit(options.pop("model", "vae"), options.pop("data", "digits"), path, progress=progress,
               evaluate=False, plots=False, **options)


def _evaluate(run: Run, plan: SweepPlan, progress: bool) -> Path:
    """The sweep's result set of one trained cell: the ladder's estimates and the active units."""
    began = time.perf_counter()
    test = run.data.test
    n = len(test) if plan.n is None else min(plan.n, len(test))
    with runs.locked(run.path, "sweep"):
        summary, per_datapoint = evaluate_run(run, estimators=plan.estimators, n=plan.n, chains=plan.chains,
                                              progress=progress, save=False)
        units = active_units(run.program, test.x[:n], None if test.y is None else test.y[:n], samples=plan.samples,
                             generator=torch.Generator(device=run.device).manual_seed(0))
        ladder = plan.estimators.split(",") + (["exact"] if "exact" in set(summary["estimator"]) else [])
        options = dict(estimators=list(dict.fromkeys(ladder)), split="test", n=plan.n, chains=plan.chains,
                       ais_start="prior", proposal="guide", active_units_samples=plan.samples, sweep=plan.ladder)
        return run.write_result_set(
            "evaluation", distributed.agree(lambda: run.unused_result_name("evaluation", SET_NAME)),
            {"summary.csv": summary, "per_datapoint.csv": per_datapoint,
             UNITS_FILE: pd.DataFrame(tables.unit_columns(units), columns=tables.UNIT_COLUMNS)},
            seconds=time.perf_counter() - began, options=options)


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------


def _value(value):
    """A grid value as a table cell: numbers and text as they are, lists and tables as JSON."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _log_px(summary: pd.DataFrame) -> tuple[float, float, str]:
    """The best estimate of log p(x): ``exact`` when there, else the tightest (largest) of the stochastic
    lower bounds iwae and ais; ``(mean, stderr, estimator)``, NaN when the ladder has neither."""
    rows = summary.set_index("estimator")
    if "exact" in rows.index:
        best = "exact"
    else:
        bounds = [name for name in rows.index if name.startswith(("iwae", "ais"))]
        if not bounds:
            return math.nan, math.nan, ""
        best = max(bounds, key=lambda name: rows.at[name, "mean"])
    return float(rows.at[best, "mean"]), float(rows.at[best, "stderr"]), best


def _row(cell: Cell, path: Path, folder: Path, weights: str = "best") -> dict:
    """The cell's row of ``sweep.csv``, from its run directory (``best_epoch``: the epoch evaluated)."""
    summary = pd.read_csv(folder / "summary.csv")
    units = pd.read_csv(folder / UNITS_FILE)
    metrics = pd.read_csv(path / runs.METRICS_FILE)
    if not len(metrics):
        best_epoch = 0
    elif weights == "last":
        best_epoch = int(metrics["epoch"].iloc[-1])
    else:
        best_epoch = int(metrics.at[metrics["val_elbo"].idxmax(), "epoch"])
    row = {"run_dir": cell.name, **{key: _value(value) for key, value in cell.values.items()},
           "epochs_run": len(metrics), "best_epoch": best_epoch, "train_seconds": float(metrics["seconds"].sum())}
    for estimator, mean, stderr in zip(summary["estimator"], summary["mean"], summary["stderr"]):
        row[f"test_{estimator}"], row[f"test_{estimator}_se"] = float(mean), float(stderr)
    log_px, log_px_se, source = _log_px(summary)
    row.update(log_px=log_px, log_px_se=log_px_se, log_px_source=source,
               gap=log_px - row.get("test_elbo", math.nan), active_units=int(units["active"].sum()))
    return row


def table_columns(plan: SweepPlan, rows: list[dict]) -> list[str]:
    """``run_dir``, the grid options, training, the estimates (``test_<estimator>``, ``test_<estimator>_se``
    in the ladder's order), then ``log_px``, ``log_px_se``, ``log_px_source``, ``gap``, ``active_units``."""
    head = ["run_dir", *plan.grid, "epochs_run", "best_epoch", "train_seconds"]
    tail = ["log_px", "log_px_se", "log_px_source", "gap", "active_units"]
    middle = []
    for row in rows:
        middle += [key for key in row if key not in head and key not in tail and key not in middle]
    if not rows:
        middle = [f"test_{name}{suffix}" for name in _estimator_names(plan.estimators) for suffix in ("", "_se")]
    return head + middle + tail


def _estimator_names(estimators: str) -> list[str]:
    return [spec.name for spec in parse_estimators(estimators)]


def _write_table(out: Path, plan: SweepPlan, rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=table_columns(plan, rows))
    write_csv(out / TABLE_FILE, table)
    return table


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------


def _say(progress: bool, text: str) -> None:
    if progress:
        tqdm.write(text, file=sys.stderr)


def _done_line(row: dict, plan: SweepPlan) -> str:
    estimates = ", ".join(f"{name} {row[f'test_{name}']:.3f}" for name in _estimator_names(plan.estimators)
                          if f"test_{name}" in row)
    return (f"{row['epochs_run']} epochs in {row['train_seconds']:.1f} s; {estimates}; "
            f"active units {row['active_units']}")


def _run_cell(number: int, cell: Cell, out: Path, plan: SweepPlan, progress: bool) -> dict | None:
    """Train (or resume), evaluate and describe one cell; None when its training diverged."""
    path = out / cell.name
    where = f"[{number}/{len(plan.cells)}] {cell.name}"
    # decided by rank 0 alone in a multi-process job: the other ranks would see rank 0's writes at random moments
    folder = distributed.agree(lambda: finished_set(path, plan) if path.is_dir() else None)
    if folder is not None:
        row = distributed.agree(lambda: _row(cell, path, folder, plan.weights))
        _say(progress, f"{where}: finished earlier ({_done_line(row, plan)})")
        return row
    resumed = distributed.agree(lambda: (path / runs.CONFIG_FILE).is_file())
    try:
        run = _train(cell, path, progress, resumed)
    except TrainingDiverged as err:
        _say(progress, f"{where}: {err}; left out of the table")
        return None
    if plan.weights == "last":  # the last epoch's weights, as Burda et al. report (no early-stopping choice)
        run.program.load_state(runs.load_checkpoint(path / runs.CHECKPOINT_FILE, map_location=run.device))
        run.program.eval()
    folder = _evaluate(run, plan, progress)
    row = distributed.agree(lambda: _row(cell, path, folder, plan.weights))
    _say(progress, f"{where}: {'resumed, ' if resumed else ''}{_done_line(row, plan)}")
    return row


def _curves(out: Path, plan: SweepPlan, rows: list[dict]) -> dict[str, pd.DataFrame]:
    """The metrics of every cell in the table, by label."""
    labels = {cell.name: cell.label for cell in plan.cells}
    return {labels[row["run_dir"]]: pd.read_csv(out / row["run_dir"] / runs.METRICS_FILE) for row in rows}


def sweep(spec, out, *, progress: bool = True) -> pd.DataFrame:
    """Train and evaluate every cell of a grid of ``fit`` options; returns the table ``DIR/sweep.csv``.

    Args:
        spec: a sweep spec: a ``.toml`` or ``.json`` file or a dict (see the module docstring):
            ``fit`` options shared by every cell, ``grid`` (option -> list of values; the
            cells are their product), ``evaluate`` (``estimators``, default
            ``"elbo,iwae:5000"``; ``n``, default all test points; ``chains``; ``samples``).
        out: the sweep directory: one run directory per cell, ``sweep.csv``, ``sweep.json``,
            ``plots/validation.png`` and ``plots/logpx.png``. A sweep started again in it skips
            its finished cells and resumes the unfinished one. It is locked while the sweep runs.
        progress: a line per cell on stderr, and each cell's progress bars.

    The whole spec is checked first (one-line :class:`~ppl_genmodels.config.ConfigError`,
    nothing written). The table has one row per finished cell: ``run_dir`` (relative to
    ``out``), one column per grid option, ``epochs_run``, ``best_epoch`` (the epoch whose
    weights are evaluated), ``train_seconds`` (the sum over ``metrics.csv``), per estimator
    ``test_<name>`` and ``test_<name>_se`` (mean over the test points and its standard error,
    as in ``evaluate``'s summary), ``log_px``, ``log_px_se``, ``log_px_source`` (the best
    estimate: exact, else the largest iwae or ais bound), ``gap`` (``log_px - test_elbo``) and
    ``active_units``. Cells whose training diverged are left out and listed in
    ``table.attrs["diverged"]``.
    """
    plan = plan_sweep(spec)
    out = Path(out)
    distributed.setup(resolve_device(plan.cells[0].options.get("device", "auto")) if plan.cells else None)
    distributed.agree(lambda: _check_out(out, plan))
    rows, diverged = [], []
    with runs.locked(out, "sweep"):
        runs.atomic_write(out / SPEC_FILE, json.dumps(plan.record(), indent=2) + "\n")
        for number, cell in enumerate(plan.cells, 1):
            row = _run_cell(number, cell, out, plan, progress)
            if row is None:
                diverged.append(cell.name)
            else:
                rows.append(row)
            table = _write_table(out, plan, rows)
        if rows and distributed.is_main():
            plot_sweep(table, _curves(out, plan, rows), out / "plots")
    table.attrs["diverged"] = diverged
    return table
