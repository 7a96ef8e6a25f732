"""The SVI training loop: epochs, early stopping, a NaN guard, progress and resumable checkpoints.

Stochastic variational inference (Hoffman et al. 2013; Kingma & Welling 2014)
maximises a bound on log p(x) over the model's and the guide's parameters
jointly. Here the bound comes from :mod:`ppl_genmodels.inference.objectives`
as a differentiable loss, and a plain ``torch.optim`` optimizer drives the
module's own parameters (no Pyro param store). Gradients are those of the
loss averaged over the datapoints of a minibatch.

Each epoch appends a row to ``metrics.csv`` (epoch, train ELBO, validation
ELBO, wall seconds), writes ``checkpoint.pt`` (model, optimizer and RNG
states, so ``resume`` continues bit-for-bit on the CPU) and, when the
validation ELBO improves, ``best.pt``. Training stops early after
``patience`` epochs without improvement, and stops with
:class:`TrainingDiverged` the moment a loss is NaN or infinite, before that
step touches the parameters: the last good checkpoint stays on disk.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from ppl_genmodels import runs
from ppl_genmodels.checkpoint import atomic_write_text, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ppl_genmodels.inference.objectives import make_objective
from ppl_genmodels.runs import ConfigError, Run, RunConfig
from ppl_genmodels.traces import TraceError, log_weights, max_plate_nesting

__all__ = ["Trainer", "TrainingDiverged", "fit", "validation_elbo"]

METRIC_COLUMNS = ["epoch", "train_elbo", "val_elbo", "seconds"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
    return classes[name](params, lr=lr)


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
        """One gradient step; returns the minibatch loss summed over datapoints (or raises on NaN)."""
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


def _check_contract(model, dataset) -> int:
    """Trace the pair once on a few training points: contract errors surface before any work."""
    x, y = next(iter(dataset.batches("train", min(8, len(dataset.train.x)))))
    try:
        with torch.no_grad(), pyro.validation_enabled(True):
            log_weights(model.model, model.guide, x, y, num_particles=1, vectorize=False)  # plates, sites
            nesting = max_plate_nesting(model.model, model.guide, x, y)
            log_weights(model.model, model.guide, x, y, num_particles=2, nesting=nesting)  # broadcasting
    except TraceError:
        raise
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise TraceError(f"model {type(model).__name__} failed on the data: {type(err).__name__}: {message}") from None
    return nesting


def _prepare(config: RunConfig, model_class=None):
    """Validate options, load data and build the model: everything that can fail before writing."""
    config.validate()
    dataset = runs.load_dataset_for(config)
    model = runs.build_model(config, dataset, model_class)
    device = runs.resolve_device(config.device)
    return dataset.to(device), model.to(device), device


def fit(
    model="vae",
    data: str = "digits",
    out=None,
    *,
    resume: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    plots: bool = True,
    **options,
) -> Run:
    """Train a model and return the :class:`~ppl_genmodels.runs.Run`.

    Args:
        model: a registry name (``"vae"``, ``"cvae"``, ``"ppca"``), ``"file.py:ClassName"``,
            or a model class following the contract.
        data: a dataset name (``digits``, ``mnist``, ``circle``, ``moons``, ``swiss-roll``)
            or a ``.npy``/``.npz``/``.csv`` file.
        out: the run directory (default ``runs/<data>-<model>``); an existing one is never
            overwritten: pass ``resume=True`` to continue it.
        resume: continue the run in ``out`` from its last checkpoint (its saved configuration
            is used; ``epochs`` and ``patience`` may be raised).
        progress: show a progress bar.
        evaluate: after training, estimate the test-set ELBO and IWAE-k (k = ``eval_k``).
        plots: write figures into ``out/plots``.
        **options: fields of :class:`~ppl_genmodels.runs.RunConfig` (epochs, lr, batch_size, ...).
    """
    model_class = model if not isinstance(model, str) else None
    if resume:
        if out is None:
            raise ConfigError("resume needs the run directory (out)")
        out = Path(out)
        config = runs.read_config(out)
        extra = sorted(set(options) - {"epochs", "patience", "device"})
        if extra:
            raise ConfigError(f"a resumed run keeps its configuration; cannot change {', '.join(extra)}")
        for key, value in options.items():
            setattr(config, key, value)
        if not (out / runs.CHECKPOINT_FILE).is_file():
            raise ConfigError(f"{out} has no {runs.CHECKPOINT_FILE} to resume from")
    else:
        if options.get("data_dir"):
            options["data_dir"] = str(Path(options["data_dir"]).resolve())
        data = str(Path(data).resolve()) if Path(str(data)).suffix in (".npy", ".npz", ".csv") else str(data)
        config = RunConfig.from_dict({"model": runs.model_spec_string(model), "data": data, **options})
        out = Path(out) if out is not None else Path("runs") / f"{Path(str(data)).stem}-{Path(config.model.split(':')[-1]).stem.lower()}"
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"run directory {out} already exists; use --resume to continue it or choose another --out")

    pyro.set_rng_seed(config.seed)
    dataset, net, device = _prepare(config, model_class)
    nesting = _check_contract(net, dataset)
    objective = make_objective(config.elbo, config.particles, nesting)
    optimizer = _make_optimizer(config.optimizer, net.parameters(), config.lr)
    trainer = Trainer(net, objective, optimizer)
    shuffle = torch.Generator().manual_seed(config.seed)

    history: list[dict] = []
    best_val, bad_epochs, start_epoch, stopped_early = -math.inf, 0, 1, False
    if resume:
        state = load_checkpoint(out / runs.CHECKPOINT_FILE, map_location="cpu")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        shuffle.set_state(state["shuffle_rng"])
        best_val, bad_epochs = state["best_val"], state["bad_epochs"]
        start_epoch = state["epoch"] + 1
        # patience may have been raised since: judge the saved counter against the new value
        stopped_early = bool(config.patience) and bad_epochs >= config.patience
        history = pd.read_csv(out / runs.METRICS_FILE).to_dict("records")[: state["epoch"]]
    else:
        out.mkdir(parents=True, exist_ok=True)
    runs.write_config(out, config)

    epochs = range(start_epoch, config.epochs + 1) if not stopped_early else range(0)
    bar = tqdm(total=len(epochs), desc=f"fit {config.model} on {config.data}", unit="epoch", disable=not progress, dynamic_ncols=True)
    last_epoch = start_epoch - 1
    for epoch in epochs:
        started = time.perf_counter()
        net.train()
        total, count = 0.0, 0
        for step, (x, y) in enumerate(dataset.batches("train", config.batch_size, shuffle=True, generator=shuffle)):
            value = trainer.step(x, y)
            if not math.isfinite(value):
                bar.close()
                kept = f"the last good checkpoint (epoch {last_epoch}) is kept in {out}" if last_epoch >= 1 else "no epoch had completed, so no checkpoint was written"
                raise TrainingDiverged(
                    f"training stopped: the loss became {value} at epoch {epoch}, step {step + 1}; {kept}; try a smaller --lr"
                )
            total += value
            count += x.shape[0]
            if progress and step % 10 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{total / count:.3f}", refresh=False)
        net.eval()
        val = validation_elbo(net, dataset)
        if not math.isfinite(val):
            bar.close()
            raise TrainingDiverged(f"training stopped: the validation ELBO became {val} at epoch {epoch}; the last good checkpoint (epoch {last_epoch}) is kept in {out}")
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "train_elbo": -total / count, "val_elbo": val, "seconds": seconds})
        if val > best_val:
            best_val, bad_epochs = val, 0
            save_checkpoint(out / runs.BEST_FILE, {"model": net.state_dict(), "epoch": epoch, "val_elbo": val})
        else:
            bad_epochs += 1
        stopped_early = bool(config.patience) and bad_epochs >= config.patience
        save_checkpoint(
            out / runs.CHECKPOINT_FILE,
            {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "best_val": best_val,
                "bad_epochs": bad_epochs,
                "stopped_early": stopped_early,
                "config": config.to_dict(),
                "rng": rng_state(),
                "shuffle_rng": shuffle.get_state(),
            },
        )
        atomic_write_text(out / runs.METRICS_FILE, pd.DataFrame(history, columns=METRIC_COLUMNS).to_csv(index=False))
        last_epoch = epoch
        bar.set_postfix(epoch=epoch, train_elbo=f"{-total / count:.3f}", val_elbo=f"{val:.3f}")
        bar.update(1)
        if stopped_early:
            break
    bar.close()
    if progress and stopped_early:
        tqdm.write(f"early stopping: no validation improvement for {config.patience} epochs (best {best_val:.3f})")

    best = load_checkpoint(out / runs.BEST_FILE, map_location=device)
    net.load_state_dict(best["model"])
    net.eval()
    run = Run(out, config, net, dataset, pd.DataFrame(history, columns=METRIC_COLUMNS), int(best["epoch"]), device)
    if evaluate:
        from ppl_genmodels.evaluation import evaluate_run

        evaluate_run(run, k=config.eval_k, progress=progress)
    if plots:
        from ppl_genmodels.evaluation import plot_run

        plot_run(run)
    return run
