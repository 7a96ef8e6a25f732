"""Run directories: one atomic writer for every file, safe checkpoints, and loading a trained run.

A run directory holds everything one training run produced::

    RUN_DIR/
      config.json                    the resolved configuration (RunConfig)
      metrics.csv                    one row per epoch: epoch, train_elbo, val_elbo, seconds
      checkpoint.pt                  last epoch: model, Pyro params, optimizer, RNG states, metrics (resume)
      best.pt                        model state at the best validation ELBO (used by load_run)
      results.csv                    index of result sets: name, kind, path, created, seconds, options
      evaluation/<name>/             one evaluate call (fit's own: evaluation/fit/)
      bdmc/<name>/                   one bdmc call
      compare/<name>/                one compare call: tables, draws (netCDF) and figures
      .lock                          held (flock) by the process writing the run
      plots/                         ELBO curves, samples, reconstructions or the 2-D density

Every file is written by :func:`atomic_write`: to a temporary file in the same
folder, flushed to disk, then renamed over the target (``os.replace`` is atomic
on POSIX), so a crash mid-write leaves the previous file intact and a reader
never sees half a file. A checkpoint is a plain dictionary of tensors, numbers,
strings, lists and dicts, loaded with ``torch.load(..., weights_only=True)``:
opening a run directory never unpickles arbitrary objects.

Every writer (``fit``, ``fit --resume``, ``evaluate``, ``bdmc``, ``compare``)
holds the directory's lock (:func:`locked`, ``RUN_DIR/.lock``) while it works,
so two processes never write into one run; the kernel releases it when its
process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pickle
import socket
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from ppl_genmodels import distributed
from ppl_genmodels.config import ConfigError, RunConfig, build_model, check_model_file, compiles, resolve_device
from ppl_genmodels.data import Dataset
from ppl_genmodels.programs import Program
from ppl_genmodels.traces import TraceError, first_line

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
    "RunLocked",
    "locked",
    "writer",
    "restartable",
    "remove_leftovers",
    "remove_if_empty",
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


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry (the rename) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``path`` atomically; returns it.

    ``content`` is text (written as UTF-8), bytes, or a function that writes the
    file at the temporary path it is given (``torch.save``, ``to_netcdf``). Missing
    parent folders are created. On any failure the temporary file is removed and
    whatever was at ``path`` before stays as it was. In a multi-process job only
    rank 0 writes: on the other ranks this does nothing.
    """
    if not distributed.is_main():
        return Path(path)
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
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run directories this process holds, with their nesting depth


class RunLocked(ConfigError):
    """Another live process is writing to the run directory (one-line message)."""


def _open_lock(file: Path) -> int | None:
    """An fd holding an exclusive ``flock`` on ``file`` (which still is the file at that path), or None."""
    while True:
        fd = os.open(file, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file as we opened it: try the new one


@contextlib.contextmanager
def locked(path, command: str):
    """Hold the run directory's lock for the block: one writer per run directory at a time.

    ``RUN_DIR/.lock`` carries an exclusive ``fcntl.flock`` and names its holder
    (PID, host, command, start time). The kernel drops the lock when its process
    ends, however it ends (``kill -9`` included), so a lock left by a dead process
    is never in force; a second live process gets :class:`RunLocked` naming the
    holder's PID. The same process may nest the block (``fit`` evaluates its own
    run). The directory is created if needed. In a multi-process job rank 0 holds
    the lock for all ranks (only rank 0 writes), and every rank gets its error.
    """
    path = Path(path).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    fd = distributed.agree(lambda: _acquire(path, command))  # rank 0 locks; every rank learns whether it could
    if not distributed.is_main():
        fd = None
    _held[path] = 1
    try:
        yield path
    finally:
        del _held[path]
        if fd is not None:
            (path / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)


def _acquire(path: Path, command: str) -> int:
    """Take the lock of ``path`` for this process (its file descriptor), or raise :class:`RunLocked`."""
    path.mkdir(parents=True, exist_ok=True)
    file = path / LOCK_FILE
    fd = _open_lock(file)
    if fd is None:
        try:
            owner = json.loads(file.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            owner = {}
        raise RunLocked(f"run directory {path} is in use by process {owner.get('pid', '?')} "
                        f"({owner.get('command', '?')} since {owner.get('since', '?')}); wait for it to finish")
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
             "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(owner).encode())
    return fd


def _leftover(entry: Path) -> bool:
    """A temporary file of an interrupted :func:`atomic_write` (``.<name>.<random>.tmp``)."""
    return entry.is_file() and entry.name.startswith(".") and entry.name.endswith(".tmp")


def restartable(path) -> bool:
    """Whether the run in ``path`` has no checkpoint yet: only ``config.json`` (and leftovers) are there."""
    entries = [e for e in Path(path).iterdir() if e.name != LOCK_FILE and not _leftover(e)]
    return all(e.name == CONFIG_FILE for e in entries)


def remove_leftovers(path) -> list[Path]:
    """Delete the temporary files interrupted writes left in ``path`` (call it holding the lock)."""
    leftovers = [e for e in Path(path).rglob(".*.tmp") if _leftover(e)]
    for entry in leftovers:
        entry.unlink(missing_ok=True)
    return leftovers


def remove_if_empty(path, up_to=None) -> None:
    """Remove the directory ``path`` if nothing is in it, then its empty parents up to ``up_to`` (inclusive).

    A run that failed before writing anything leaves no folder behind, not even
    the parents its directory needed.
    """
    path = Path(path)
    stop = Path(up_to) if up_to is not None else path
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == stop or path.parent == path:
            return
        path = path.parent


def write_csv(path, frame: pd.DataFrame) -> Path:
    """A table as CSV, atomically."""
    return atomic_write(path, frame.to_csv(index=False))


def save_checkpoint(path, payload: dict) -> Path:
    """Save ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _archive_damage(path: Path) -> str | None:
    """What is wrong with the zip archive ``torch.save`` writes, or None.

    ``torch.save`` writes stored (uncompressed), unencrypted file members; anything
    else (a folder bit, another compression method, an encryption flag: one flipped
    bit in a header) means damage, since PyTorch's reader would not read the member
    faithfully. Every member's CRC is then checked.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir() or info.external_attr & 0x10 or info.compress_type != zipfile.ZIP_STORED \
                        or info.flag_bits & 0x1:
                    return f"member {info.filename} has a damaged header"
            bad = archive.testzip()
    except Exception as err:  # zipfile raises many types for damaged headers
        return f"not a complete archive: {first_line(err)}"
    return None if bad is None else f"member {bad} fails its checksum"


def load_checkpoint(path, map_location=None) -> dict:
    """Load a checkpoint saved by :func:`save_checkpoint` without unpickling arbitrary objects.

    A damaged file (truncated, bit-flipped: every member's CRC is checked first)
    is reported as corrupt; a file holding anything but tensors and plain values
    is refused as not a checkpoint of this toolkit. Neither suggests loading it
    some less safe way.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    damage = _archive_damage(path)
    if damage is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({damage})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain values; "
                              "it was not written by ppl-genmodels and is not loaded") from None
    except Exception as err:  # an archive that passes its checksums but is not a torch checkpoint
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(err).__name__})") from None
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

    The run owns its directory, written with :func:`atomic_write`: figures go to
    ``run.folder("plots")``; each call of ``evaluate``, ``bdmc`` and ``compare`` writes
    its own result set ``RUN_DIR/<kind>/<name>/`` (kind ``evaluation``, ``bdmc`` or
    ``compare``; :meth:`write_result_set`), which is never overwritten, and adds one row
    to the index ``RUN_DIR/results.csv`` (:meth:`results`).
    """

    RESULTS_FILE = "results.csv"
    RESULT_KINDS = ("evaluation", "bdmc", "compare")
    RESULT_COLUMNS = ("name", "kind", "path", "created", "seconds", "options")
    NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    MAX_NAME_LENGTH = 100

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
        """The summary of the run's most recent evaluation, or None if it has never been evaluated.

        The most recent ``evaluation`` set in the index whose ``summary.csv`` is there,
        else ``evaluation/fit/summary.csv``, else (a run written before result sets
        existed) ``evaluation/summary.csv``.
        """
        index = self.results()
        recent = index.loc[index["kind"] == "evaluation", "path"].tolist()[::-1]
        candidates = [Path(self.path) / folder / "summary.csv" for folder in recent]
        candidates += [self.result_set("evaluation", "fit") / "summary.csv", self.folder("evaluation") / "summary.csv"]
        return next((pd.read_csv(path) for path in candidates if path.is_file()), None)

    @staticmethod
    def read_results(path) -> pd.DataFrame:
        """The index ``results.csv`` of the run directory ``path``: one row per result set, in the order written.

        Columns ``name, kind, path`` (the set's folder, relative to the run directory),
        ``created`` (UTC, ISO 8601), ``seconds`` (the whole call), ``options`` (compact JSON);
        an empty frame with these columns when the run has no index.
        """
        file = Path(path) / Run.RESULTS_FILE
        if not file.is_file():
            return pd.DataFrame(columns=list(Run.RESULT_COLUMNS))
        text = {column: str for column in Run.RESULT_COLUMNS if column != "seconds"}
        return pd.read_csv(file, dtype=text, keep_default_na=False)  # a set named "NA" or "1" stays a string

    def results(self) -> pd.DataFrame:
        """The run's index of result sets (see :meth:`read_results`)."""
        return self.read_results(self.path)

    def result_set(self, kind: str, name: str) -> Path:
        """The folder ``RUN_DIR/kind/name`` of a result set (``kind``: evaluation, bdmc or compare)."""
        if kind not in self.RESULT_KINDS:
            raise ValueError(f"unknown kind of result set {kind!r}; expected one of {', '.join(self.RESULT_KINDS)}")
        return self.folder(kind) / name

    @staticmethod
    def _taken(path, kind: str) -> set[str]:
        """Names of the result sets of ``kind`` in the run directory ``path``: folders and index rows."""
        folder = Path(path) / kind
        index = Run.read_results(path)
        names = set(index.loc[index["kind"] == kind, "name"])
        return names | ({entry.name for entry in folder.iterdir()} if folder.is_dir() else set())

    @staticmethod
    def check_result_name(path, kind: str, name: str) -> str:
        """``name`` for a new result set of ``kind`` in the run directory ``path``, checked.

        A valid name has letters, digits, ``-``, ``_`` and ``.`` and does not start with
        ``.``; one that a set of that kind already has is refused (one-line ``ValueError``).
        Needs no loaded run, so the command line checks before loading anything.
        """
        if kind not in Run.RESULT_KINDS:
            raise ValueError(f"unknown kind of result set {kind!r}; expected one of {', '.join(Run.RESULT_KINDS)}")
        if (not isinstance(name, str) or not name or name.startswith(".") or len(name) > Run.MAX_NAME_LENGTH
                or not set(name) <= Run.NAME_CHARACTERS):
            raise ValueError(f"invalid result set name {name!r}: use letters, digits, '-', '_' and '.' "
                             f"(not first), at most {Run.MAX_NAME_LENGTH} characters")
        if name in Run._taken(path, kind):
            raise ValueError(f"result set {name!r} already exists in {Path(path) / kind}; choose another --name")
        return name

    def unused_result_name(self, kind: str, base: str) -> str:
        """``base``, else ``base-2``, ``base-3``, ...: the first name no result set of ``kind`` has."""
        taken = self._taken(self.path, kind)
        name, number = base, 1
        while name in taken:
            number += 1
            name = f"{base}-{number}"
        return name

    def new_result_name(self, kind: str, name: str | None, *, default: str) -> str:
        """The name of a new result set: ``name`` checked (:meth:`check_result_name`), or
        ``default`` made unique (:meth:`unused_result_name`) when ``name`` is None."""
        if name is not None:
            return self.check_result_name(self.path, kind, name)
        return self.unused_result_name(kind, default)

    def write_result_set(self, kind: str, name: str, tables: dict[str, pd.DataFrame], *, seconds: float,
                         options: dict, write: Callable[[Path], object] | None = None) -> Path:
        """Write a new result set ``RUN_DIR/kind/name/`` and add its row to the index; returns its folder.

        The folder is created first and must not exist (a set is never overwritten);
        then each table as CSV, then ``write(folder)`` for other files (netCDF,
        figures), then the index row, so the index never lists a set still being written.
        """
        folder = self.result_set(kind, name)
        if not distributed.is_main():  # rank 0 writes the set (and refuses a name that exists) for every rank
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            raise ValueError(f"result set {name!r} already exists in {folder.parent}; nothing was written") from None
        for file, frame in tables.items():
            write_csv(folder / file, frame)
        if write is not None:
            write(folder)
        self._add_result(kind, name, seconds, options)
        return folder

    def _add_result(self, kind: str, name: str, seconds: float, options: dict) -> Path:
        """Append one row to ``results.csv``: read it, add the row, write it whole (atomically)."""
        index = self.results()
        row = {"name": name, "kind": kind, "path": f"{kind}/{name}",
               "created": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"), "seconds": float(seconds),
               "options": json.dumps(options, separators=(",", ":"), default=str)}
        columns = list(index.columns) + [c for c in self.RESULT_COLUMNS if c not in index.columns]
        return write_csv(Path(self.path) / self.RESULTS_FILE,
                         pd.DataFrame(index.to_dict("records") + [row], columns=columns))


def load_run(path, *, device: str | None = None, which: str = "best", model=None, model_class=None,
             trust_model_file: bool = False) -> Run:
    """Load a run directory: model with trained weights, configuration, data split and metrics.

    ``which`` is ``"best"`` (weights of the best validation epoch) or ``"last"``.
    ``model`` overrides the model named in the configuration: a class (for a model
    defined in a script that cannot be re-imported), or the instance the run was
    trained on (its weights are replaced by the run's). ``model_class`` is the
    older name of ``model``. A run whose model is a file is refused when the
    file's SHA-256 differs from the one recorded at fit (importing it runs its
    code), unless ``trust_model_file``.
    """
    path = Path(path)
    config = read_config(path)
    if which not in ("best", "last"):
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    model = model if model is not None else model_class
    if model is None:
        check_model_file(config, trust_model_file)
    if config.model_instance and model is None:
        raise ConfigError(f"run {path} was trained on a model instance; pass it (or its class) again: "
                          "load_run(path, model=...)")
    if device is None:  # the training device may be absent here (a CUDA run loaded on a laptop)
        device = config.device if config.device in ("auto", "cpu") or torch.cuda.is_available() else "auto"
    dev = distributed.local_device(resolve_device(device))  # under torchrun: this process's GPU
    dataset = config.load_data().to(dev)
    program = build_model(config, dataset, model).to(dev)
    file = path / (BEST_FILE if which == "best" else CHECKPOINT_FILE)
    if not file.is_file() and which == "best":
        file = path / CHECKPOINT_FILE
    payload = load_checkpoint(file, map_location=dev)
    program.check(*dataset.probe())  # creates the pyro.param sites the checkpoint restores
    try:
        program.load_state(payload)
    except (RuntimeError, TraceError) as err:
        first = first_line(err)
        raise CheckpointError(f"checkpoint {file} does not fit model {type(program.module).__name__}: {first}") from None
    program.eval()
    program.accelerate(precision=getattr(config, "precision", "fp32"),
                       compile=compiles(getattr(config, "compile", "off"), dev, steps=0))  # auto: not for one job
    metrics_file = path / METRICS_FILE
    metrics = pd.read_csv(metrics_file) if metrics_file.is_file() else pd.DataFrame()
    return Run(path, config, program, dataset, metrics, int(payload.get("epoch", 0)), dev)


def as_run(run) -> Run:
    """``run`` itself, or the run loaded from the directory it names."""
    return run if isinstance(run, Run) else load_run(run)


def writer(command: str):
    """Decorate ``fn(run, ..., save=True)``: when it saves, it holds the run directory's lock throughout."""

    def decorate(fn):
        @functools.wraps(fn)
        def locked_call(run, *args, save: bool = True, **kwargs):
            if not save:
                return fn(run, *args, save=save, **kwargs)
            run = as_run(run)
            distributed.setup(run.device)  # a no-op in one process; joins the job's process group under torchrun
            with locked(run.path, command):
                return fn(run, *args, save=save, **kwargs)

        return locked_call

    return decorate
