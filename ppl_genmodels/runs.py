"""Run directories: one atomic writer for every file, safe checkpoints, and loading a trained run.

A run directory holds everything one training run produced::

    RUN_DIR/
      config.json                    the resolved configuration (RunConfig)
      metrics.csv                    one row per epoch: epoch, train_elbo, val_elbo, seconds
      checkpoint.pt                  last epoch: model + optimizer state, epoch, RNG states (resume)
      best.pt                        model state at the best validation ELBO (used by load_run)
      evaluation/                    evaluate and bdmc tables
      compare/                       compare tables, draws (netCDF) and figures
      plots/                         ELBO curves, samples, reconstructions or the 2-D density

Every file is written by :func:`atomic_write`: to a temporary file in the same
folder, flushed to disk, then renamed over the target (``os.replace`` is atomic
on POSIX), so a crash mid-write leaves the previous file intact and a reader
never sees half a file. A checkpoint is a plain dictionary of tensors, numbers,
strings, lists and dicts, loaded with ``torch.load(..., weights_only=True)``:
opening a run directory never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from ppl_genmodels.config import ConfigError, RunConfig, build_model, resolve_device
from ppl_genmodels.data import Dataset
from ppl_genmodels.programs import Program
from ppl_genmodels.traces import TraceError

__all__ = [
    "CheckpointError",
    "atomic_write",
    "write_csv",
    "save_checkpoint",
    "load_checkpoint",
    "read_config",
    "write_config",
    "Run",
    "load_run",
    "as_run",
    "CONFIG_FILE",
    "METRICS_FILE",
    "CHECKPOINT_FILE",
    "BEST_FILE",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of the wrong kind (one-line message)."""


def atomic_write(path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``path`` atomically; returns it.

    ``content`` is text (written as UTF-8), bytes, or a function that writes the
    file at the temporary path it is given (``torch.save``, ``to_netcdf``). Missing
    parent folders are created. On any failure the temporary file is removed and
    whatever was at ``path`` before stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(content, str):
                fh.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                fh.write(content)
        if callable(content):
            content(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_csv(path, frame: pd.DataFrame) -> Path:
    """A table as CSV, atomically."""
    return atomic_write(path, frame.to_csv(index=False))


def save_checkpoint(path, payload: dict) -> Path:
    """Save ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path, map_location=None) -> dict:
    """Load a checkpoint saved by :func:`save_checkpoint` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {first}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a ppl-genmodels checkpoint (no model state)")
    return payload


def read_config(path) -> RunConfig:
    """The configuration saved in the run directory ``path``."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{path} is not a run directory (no {CONFIG_FILE})")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON: {err}") from None
    return RunConfig.from_dict(values)


def write_config(path, config: RunConfig) -> Path:
    return atomic_write(Path(path) / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")


@dataclass
class Run:
    """A trained run: its directory, configuration, model (with trained weights), data and metrics.

    ``run.model`` is the user's own model object; ``run.program`` calls its
    ``model``/``guide`` the way the toolkit calls every pair (``(x, y)``).

    The run owns its directory: results go to ``run.folder("evaluation")``,
    ``run.folder("compare")`` and ``run.folder("plots")``, written with :func:`atomic_write`.
    """

    path: Path
    config: RunConfig
    program: Program
    data: Dataset
    metrics: pd.DataFrame
    epoch: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def model(self):
        """The model object itself (the class the run names, or the instance it was given)."""
        return self.program.module

    def folder(self, name: str) -> Path:
        """``RUN_DIR/name`` (not created until something is written there)."""
        return Path(self.path) / name

    def write_tables(self, folder: str, tables: dict[str, pd.DataFrame]) -> list[Path]:
        """Write each table as ``RUN_DIR/folder/<file name>`` (CSV, atomically)."""
        return [write_csv(self.folder(folder) / name, frame) for name, frame in tables.items()]

    def summary(self) -> pd.DataFrame | None:
        """The saved evaluation summary, if the run has been evaluated."""
        path = self.folder("evaluation") / "summary.csv"
        return pd.read_csv(path) if path.is_file() else None


def load_run(path, *, device: str | None = None, which: str = "best", model=None, model_class=None) -> Run:
    """Load a run directory: model with trained weights, configuration, data split and metrics.

    ``which`` is ``"best"`` (weights of the best validation epoch) or ``"last"``.
    ``model`` overrides the model named in the configuration: a class (for a model
    defined in a script that cannot be re-imported), or the instance the run was
    trained on (its weights are replaced by the run's). ``model_class`` is the
    older name of ``model``.
    """
    path = Path(path)
    config = read_config(path)
    if which not in ("best", "last"):
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    model = model if model is not None else model_class
    if config.model_instance and model is None:
        raise ConfigError(f"run {path} was trained on a model instance; pass it (or its class) again: "
                          "load_run(path, model=...)")
    if device is None:  # the training device may be absent here (a CUDA run loaded on a laptop)
        device = config.device if config.device in ("auto", "cpu") or torch.cuda.is_available() else "auto"
    dev = resolve_device(device)
    dataset = config.load_data().to(dev)
    program = build_model(config, dataset, model).to(dev)
    file = path / (BEST_FILE if which == "best" else CHECKPOINT_FILE)
    if not file.is_file() and which == "best":
        file = path / CHECKPOINT_FILE
    payload = load_checkpoint(file, map_location=dev)
    x, y = next(iter(dataset.batches("train", min(8, len(dataset.train.x)))))
    program.check(x, y)  # creates the pyro.param sites the checkpoint restores
    try:
        program.load_state(payload)
    except (RuntimeError, TraceError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {file} does not fit model {type(program.module).__name__}: {first}") from None
    program.eval()
    metrics_file = path / METRICS_FILE
    metrics = pd.read_csv(metrics_file) if metrics_file.is_file() else pd.DataFrame()
    return Run(path, config, program, dataset, metrics, int(payload.get("epoch", 0)), dev)


def as_run(run) -> Run:
    """``run`` itself, or the run loaded from the directory it names."""
    return run if isinstance(run, Run) else load_run(run)
