"""The SVI training loop: epochs, early stopping, a NaN guard, progress and resumable checkpoints.

Stochastic variational inference (Hoffman et al. 2013; Kingma & Welling 2014)
maximises a bound on log p(x) over the model's and the guide's parameters
jointly. Here the bound comes from :mod:`ppl_genmodels.inference.objectives`
as a differentiable loss, and a plain ``torch.optim`` optimizer drives the
program's parameters: the module's own and those its ``pyro.param`` sites
create (:class:`~ppl_genmodels.programs.Program`). Gradients are those of the
loss averaged over the datapoints of a minibatch.

:func:`fit` reads as its three steps: start a run or resume one
(:func:`_start` / :func:`_resume`: options checked, data loaded and the model
built before anything is written), train one epoch (:func:`_train_epoch`), and
write what the epoch produced (:func:`_write_epoch`): a row of ``metrics.csv``
(epoch, train ELBO, validation ELBO, wall seconds), ``checkpoint.pt`` (model,
optimizer and RNG states, so ``resume`` continues bit-for-bit on the CPU) and,
when the validation ELBO improves, ``best.pt``. Training stops early after
``patience`` epochs without improvement, and stops with
:class:`TrainingDiverged` the moment a loss is NaN or infinite, before that
step touches the parameters: the last good checkpoint stays on disk.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from ppl_genmodels import runs
from ppl_genmodels.config import (OPTIMIZERS, ConfigError, RunConfig, build_model, check_model_file, file_sha256,
                                  is_instance, model_file, model_spec_string, resolve_device)
from ppl_genmodels.evaluation import evaluate_run
from ppl_genmodels.inference.objectives import kl_weight, make_objective
from ppl_genmodels.plots import plot_run
from ppl_genmodels.programs import Program
from ppl_genmodels.runs import Run, load_checkpoint, save_checkpoint, write_csv
from ppl_genmodels.traces import log_weights, max_plate_nesting

__all__ = ["Trainer", "TrainingDiverged", "fit", "validation_elbo", "rng_state", "set_rng_state"]

METRIC_COLUMNS = ["epoch", "train_elbo", "val_elbo", "seconds"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


def rng_state() -> dict:
    """The state of every random-number generator training touches, as checkpointable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@torch.no_grad()
def validation_elbo(model, dataset, split: str = "val", batch_size: int = 512) -> float:
    """Single-particle ELBO estimate averaged over the datapoints of ``split`` (nats per datapoint)."""
    total, count, nesting = 0.0, 0, None
    for x, y in dataset.batches(split, batch_size):
        if nesting is None:
            nesting = max_plate_nesting(model.model, model.guide, x, y)
        log_w = log_weights(model.model, model.guide, x, y, num_particles=1, nesting=nesting)  # [1, batch]
        total += log_w.sum().item()
        count += x.shape[0]
    return total / count


class Trainer:
    """One model, its objective and optimizer; ``step`` is one SVI update on a minibatch."""

    def __init__(self, model, objective, optimizer):
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.validate_next = True  # Pyro's argument checks run on the first step only

    def step(self, x, y=None) -> float:
        """One gradient step; returns the minibatch loss summed over datapoints (NaN or inf: no step taken)."""
        with pyro.validation_enabled(self.validate_next):
            loss = self.objective.loss(self.model.model, self.model.guide, x, y)
        self.validate_next = False
        value = loss.item()
        if not math.isfinite(value):
            return value
        self.optimizer.zero_grad(set_to_none=True)
        (loss / x.shape[0]).backward()
        self.optimizer.step()
        return value


@dataclass
class _Training:
    """What the epochs share: the run's directory and configuration, data, model, optimizer and progress."""

    out: Path
    config: RunConfig
    dataset: object
    net: Program
    trainer: Trainer
    device: torch.device
    shuffle: torch.Generator
    history: list = field(default_factory=list)
    best_val: float = -math.inf
    bad_epochs: int = 0
    start_epoch: int = 1
    stopped_early: bool = False


def _new_config(model, data, out, options: dict) -> tuple[RunConfig, Path]:
    """The configuration of a new run and its directory."""
    if options.get("data_dir"):
        options["data_dir"] = str(Path(options["data_dir"]).resolve())
    data = str(Path(data).resolve()) if Path(str(data)).suffix in (".npy", ".npz", ".csv") else str(data)
    config = RunConfig.from_dict({"model": model_spec_string(model), "data": data, **options,
                                  "model_instance": is_instance(model)})
    path = model_file(config.model)
    config.model_sha256 = file_sha256(path) if path is not None and path.is_file() else None
    if out is None:
        out = Path("runs") / f"{Path(str(data)).stem}-{Path(config.model.split(':')[-1]).stem.lower()}"
    return config, Path(out)


def _check_fresh(out: Path) -> None:
    """A new run goes into a missing or empty directory, or one whose run has no checkpoint yet.

    A run killed before its first checkpoint, or stopped by a divergence in its
    first epoch, leaves only ``config.json``: it is started again in place.
    """
    if any(out.iterdir()):
        if not runs.restartable(out):
            raise ConfigError(f"run directory {out} already exists; use --resume to continue it or choose "
                              "another --out")


def _resumed_config(out, options: dict, trust_model_file: bool) -> tuple[RunConfig, Path]:
    """The saved configuration of the run in ``out``, with the options a resume may change."""
    if out is None:
        raise ConfigError("resume needs the run directory (out)")
    out = Path(out)
    config = runs.read_config(out)
    extra = sorted(set(options) - RunConfig.resumable())
    if extra:
        raise ConfigError(f"a resumed run keeps its configuration; cannot change {', '.join(extra)}")
    for key, value in options.items():
        setattr(config, key, value)
    check_model_file(config, trust_model_file)
    path = model_file(config.model)
    if trust_model_file and path is not None and path.is_file():
        config.model_sha256 = file_sha256(path)  # the checkpoints from now on come from this file
    return config, out


def _start(config: RunConfig, out: Path, model) -> _Training:
    """Check, load and build everything that can fail before the run directory is written.

    The pair is traced once on a few training points, so that contract errors
    surface (and the ``pyro.param`` sites exist for the optimizer) before any work.
    """
    pyro.set_rng_seed(config.seed)
    config.validate()
    dataset = config.load_data()
    net = build_model(config, dataset, model)
    device = resolve_device(config.device)
    dataset, net = dataset.to(device), net.to(device)
    nesting = net.check(*dataset.probe())
    objective = make_objective(config.elbo, config.particles, nesting, detached=net.parameters_detached)
    trainer = Trainer(net, objective, OPTIMIZERS[config.optimizer](net.parameters(), lr=config.lr))
    return _Training(out, config, dataset, net, trainer, device, torch.Generator().manual_seed(config.seed))


def _resume(run: _Training) -> None:
    """Restore the model, optimizer, RNG states, counters and metrics of the last checkpoint.

    A run without a checkpoint (killed or stopped in its first epoch) starts at
    epoch 1. ``metrics.csv`` is rewritten from the history the checkpoint carries,
    so a row lost between the two writes comes back.
    """
    if not (run.out / runs.CHECKPOINT_FILE).is_file():
        return
    state = load_checkpoint(run.out / runs.CHECKPOINT_FILE, map_location="cpu")
    run.net.load_state(state)
    run.trainer.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    run.shuffle.set_state(state["shuffle_rng"])
    run.best_val, run.bad_epochs = state["best_val"], state["bad_epochs"]
    run.start_epoch = state["epoch"] + 1
    # patience may have been raised since: judge the saved counter against the new value
    run.stopped_early = bool(run.config.patience) and run.bad_epochs >= run.config.patience
    if "metrics" in state:
        run.history = [dict(row) for row in state["metrics"]]
    else:  # checkpoints written before they carried the history
        run.history = pd.read_csv(run.out / runs.METRICS_FILE).to_dict("records")[: state["epoch"]]
    write_csv(run.out / runs.METRICS_FILE, pd.DataFrame(run.history, columns=METRIC_COLUMNS))


def _kept(run: _Training, last_epoch: int) -> str:
    """What a stopped run leaves: its last good checkpoint, or nothing to resume yet."""
    if last_epoch >= 1:
        return f"the last good checkpoint (epoch {last_epoch}) is kept in {run.out}"
    return (f"no epoch had completed, so there is no checkpoint; {run.out} can be started again in place "
            "(or resumed from epoch 1)")


def _train_epoch(run: _Training, epoch: int, last_epoch: int, bar) -> float:
    """One pass over the shuffled training batches; returns the mean training ELBO per datapoint."""
    run.net.train()
    if hasattr(run.trainer.objective, "kl_weight"):  # the ELBO family: this epoch's KL weight (exact on resume)
        run.trainer.objective.kl_weight = kl_weight(run.config.beta, run.config.kl_warmup, epoch)
    total, count = 0.0, 0
    for step, (x, y) in enumerate(run.dataset.batches("train", run.config.batch_size, shuffle=True,
                                                      generator=run.shuffle)):
        value = run.trainer.step(x, y)
        if not math.isfinite(value):
            raise TrainingDiverged(f"training stopped: the loss became {value} at epoch {epoch}, step {step + 1}; "
                                   f"{_kept(run, last_epoch)}; try a smaller --lr")
        total += value
        count += x.shape[0]
        if bar is not None and step % 10 == 0:
            bar.set_postfix(epoch=epoch, loss=f"{total / count:.3f}", refresh=False)
    return -total / count


def _write_epoch(run: _Training, epoch: int, train_elbo: float, val: float, seconds: float) -> None:
    """Record the epoch: ``best.pt`` if it improved, ``checkpoint.pt`` and ``metrics.csv`` always."""
    run.history.append({"epoch": epoch, "train_elbo": train_elbo, "val_elbo": val, "seconds": seconds})
    if val > run.best_val:
        run.best_val, run.bad_epochs = val, 0
        save_checkpoint(run.out / runs.BEST_FILE, {**run.net.state(), "epoch": epoch, "val_elbo": val})
    else:
        run.bad_epochs += 1
    run.stopped_early = bool(run.config.patience) and run.bad_epochs >= run.config.patience
    save_checkpoint(run.out / runs.CHECKPOINT_FILE, {
        **run.net.state(), "optimizer": run.trainer.optimizer.state_dict(), "epoch": epoch,
        "best_val": run.best_val, "bad_epochs": run.bad_epochs, "stopped_early": run.stopped_early,
        "config": run.config.to_dict(), "rng": rng_state(), "shuffle_rng": run.shuffle.get_state(),
        "metrics": [dict(row) for row in run.history],
    })
    write_csv(run.out / runs.METRICS_FILE, pd.DataFrame(run.history, columns=METRIC_COLUMNS))


def _epochs(run: _Training, progress: bool) -> None:
    """Train from ``run.start_epoch`` until the last epoch, early stopping or divergence."""
    epochs = range(run.start_epoch, run.config.epochs + 1) if not run.stopped_early else range(0)
    with tqdm(total=len(epochs), desc=f"fit {run.config.model} on {run.config.data}", unit="epoch",
              disable=not progress, dynamic_ncols=True) as bar:
        last_epoch = run.start_epoch - 1
        for epoch in epochs:
            started = time.perf_counter()
            train_elbo = _train_epoch(run, epoch, last_epoch, bar if progress else None)
            run.net.eval()
            val = validation_elbo(run.net, run.dataset)
            if not math.isfinite(val):
                raise TrainingDiverged(f"training stopped: the validation ELBO became {val} at epoch {epoch}; "
                                       f"{_kept(run, last_epoch)}")
            _write_epoch(run, epoch, train_elbo, val, time.perf_counter() - started)
            last_epoch = epoch
            bar.set_postfix(epoch=epoch, train_elbo=f"{train_elbo:.3f}", val_elbo=f"{val:.3f}")
            bar.update(1)
            if run.stopped_early:
                break
    if progress and run.stopped_early:
        tqdm.write(f"early stopping: no validation improvement for {run.config.patience} epochs "
                   f"(best {run.best_val:.3f})")


def fit(
    model="vae",
    data: str = "digits",
    out=None,
    *,
    resume: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    plots: bool = True,
    trust_model_file: bool = False,
    **options,
) -> Run:
    """Train a model and return the :class:`~ppl_genmodels.runs.Run`.

    Args:
        model: a registry name (``"vae"``, ``"cvae"``, ``"ppca"``), ``"file.py:ClassName"``,
            a model class, or an already-built model instance (used as it is; a run
            trained on an instance is loaded again with ``load_run(out, model=...)``).
        data: a dataset name (``digits``, ``mnist``, ``circle``, ``moons``, ``swiss-roll``)
            or a ``.npy``/``.npz``/``.csv`` file.
        out: the run directory (default ``runs/<data>-<model>``); an existing one is never
            overwritten: pass ``resume=True`` to continue it. A run with no checkpoint yet
            (killed or diverged in its first epoch) is started again in place. The
            directory is locked while ``fit`` runs: a second process gets an error.
        resume: continue the run in ``out`` from its last checkpoint (its saved configuration
            is used; ``epochs``, ``patience`` and ``device`` may be changed).
        progress: show a progress bar.
        evaluate: after training, estimate the test-set ELBO and IWAE-k (k = ``eval_k``).
        plots: write figures into ``out/plots``.
        trust_model_file: on resume, import the run's model file even if it changed since
            the run was trained (its SHA-256 is recorded at fit).
        **options: options of :class:`~ppl_genmodels.config.RunConfig`, data options included
            (epochs, lr, batch_size, max_examples, ...).
    """
    config, out = (_resumed_config(out, options, trust_model_file) if resume
                   else _new_config(model, data, out, options))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run directory {out} already exists as a file; choose another --out")
    created = _first_missing(out)
    try:
        with runs.locked(out, "fit --resume" if resume else "fit"):
            return _fit_locked(config, out, None if isinstance(model, str) else model, resume, progress, evaluate,
                               plots)
    except BaseException:
        if created is not None:
            runs.remove_if_empty(out, up_to=created)  # a run that failed before writing anything leaves nothing
        raise


def _first_missing(out: Path) -> Path | None:
    """The outermost folder of ``out`` that does not exist yet (``out`` itself, or a parent), or None."""
    missing = None
    for folder in [out, *out.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def _fit_locked(config: RunConfig, out: Path, model, resume: bool, progress: bool, evaluate: bool,
                plots: bool) -> Run:
    """Train while holding the run directory's lock: check it, start or resume, train, evaluate."""
    if resume and not (out / runs.CONFIG_FILE).is_file():
        raise ConfigError(f"{out} is not a run directory (no {runs.CONFIG_FILE})")
    if not resume:
        _check_fresh(out)
    run = _start(config, out, model)
    runs.remove_leftovers(out)
    if resume:
        _resume(run)
    runs.write_config(out, config)
    _epochs(run, progress)
    best = load_checkpoint(out / runs.BEST_FILE, map_location=run.device)
    run.net.load_state(best)
    run.net.eval()
    result = Run(out, config, run.net, run.dataset, pd.DataFrame(run.history, columns=METRIC_COLUMNS),
                 int(best["epoch"]), run.device)
    if evaluate:
        evaluate_run(result, k=config.eval_k, progress=progress, name=result.unused_result_name("evaluation", "fit"))
    if plots:
        plot_run(result)
    return result
