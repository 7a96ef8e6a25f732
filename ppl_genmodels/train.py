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

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
import torch.optim.optimizer as _optimizer_module
from torch import nn
from tqdm.auto import tqdm

from ppl_genmodels import distributed, runs
from ppl_genmodels.compiled import Static
from ppl_genmodels.config import (OPTIMIZERS, ConfigError, RunConfig, build_model, check_model_file, compiles,
                                  file_sha256, is_instance, model_file, model_spec_string, resolve_device)
from ppl_genmodels.evaluation import evaluate_run
from ppl_genmodels.inference.objectives import kl_weight, make_objective
from ppl_genmodels.plots import plot_run
from ppl_genmodels.programs import Program
from ppl_genmodels.runs import Run, load_checkpoint, save_checkpoint, write_csv
from ppl_genmodels.streams import Streams
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


#: steps between the checks of the device-side divergence flag (the only host syncs of an epoch)
SYNC_EVERY = 50


@torch.no_grad()
def validation_elbo(model, dataset, split: str = "val", batch_size: int = 512, *, seed: int = 0,
                    purpose: str = "validation") -> float:
    """Single-particle ELBO estimate averaged over the datapoints of ``split`` (nats per datapoint).

    Each datapoint's particle comes from its own stream (:class:`~ppl_genmodels.streams.Streams`
    keyed by ``seed``, ``purpose`` and its row in the split), so the value does not depend on the
    batch size or on how many processes share the work: under torchrun each rank takes a
    contiguous block of the split and the sums are added over the ranks. Pyro's argument
    checks are off, so weights gone non-finite give a non-finite value, not an exception.
    """
    part = dataset.split(split)
    start, stop = distributed.shard(len(part))
    device = part.x.device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of log w, datapoints]
    nesting = None
    for begin in range(start, stop, batch_size):
        end = min(stop, begin + batch_size)
        x = part.x[begin:end]
        y = None if part.y is None else part.y[begin:end]
        if nesting is None:
            nesting = max_plate_nesting(model.model, model.guide, x, y)
        with Streams(seed, torch.arange(begin, end, device=device), purpose).draws(), pyro.validation_enabled(False):
            log_w = log_weights(model.model, model.guide, x, y, num_particles=1, nesting=nesting)  # [1, batch]
        total[0] += log_w.sum().double()
        total[1] += end - begin
    total = distributed.all_sum(total)
    return float(total[0] / total[1])


class _Loss(nn.Module):
    """The objective's loss of a minibatch as a module's output, so that DDP sees one module with the
    program's parameters (the objective itself holds none)."""

    def __init__(self, program: Program, objective):
        super().__init__()
        self.program = program
        self.objective = objective
        # the whole loss as one compiled graph (ppl_genmodels.compiled), for a program marked for it
        compiled = isinstance(program, Program) and program.acceleration["compile"]
        self.static = Static(self._loss, program, label="the training step") if compiled else None
        self._weight: tuple[float, torch.Tensor] | None = None  # the last KL weight and its tensor (kl_input)

    def forward(self, x, y=None, streams: Streams | None = None):
        if self.static is None:
            return self._loss(x, y, streams=streams)
        option, weight = self.kl_input()
        return self.static(x, y, weight, streams=streams, kl_weight=option)

    def kl_input(self) -> tuple[object, torch.Tensor | None]:
        """The objective's KL weight as a compiled step takes it: ``(option, tensor input or None)``.

        A weight of 1 (or an objective without one) is a Python option: the unweighted
        program has no scaling at all. Any other weight is a 0-dim tensor input (in the
        parameters' dtype, which is how a Python number enters their arithmetic), so a
        KL warm-up, whose weight changes every epoch, runs one graph throughout.
        """
        weight = getattr(self.objective, "kl_weight", None)
        if weight is None or isinstance(weight, torch.Tensor) or weight == 1.0:
            return weight, None
        if self._weight is None or self._weight[0] != weight:
            parameter = next(self.program.parameters(), None)
            dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
            device = parameter.device if parameter is not None else None
            self._weight = weight, torch.tensor(weight, dtype=dtype, device=device)
        return "input", self._weight[1]

    def _loss(self, x, y, weight=None, *, streams=None, **_):
        with streams.draws() if streams is not None else contextlib.nullcontext(), _kl_weight(self.objective, weight):
            return self.objective.loss(self.program.model, self.program.guide, x, y)


@contextlib.contextmanager
def _kl_weight(objective, weight):
    """A block in which ``objective.kl_weight`` is ``weight`` (a compiled step's input), unless it is None."""
    if weight is None:
        yield
        return
    saved = objective.kl_weight
    objective.kl_weight = weight
    try:
        yield
    finally:
        objective.kl_weight = saved


def _has_unused(module: nn.Module, x, y) -> bool:
    """Does one loss on ``(x, y)`` leave some parameter without a gradient? (DDP must then look for them.)"""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        loss = module(x, y)
        used = torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad], allow_unused=True)
    return any(g is None for g in used)


def _fused(optimizer) -> bool:
    """True when the optimizer's fused kernel can skip a step on the device (``found_inf``)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups)


class _AdamInGraph:
    """The training step and its Adam update as one compiled graph, for a compiled program in one process.

    ``Trainer.step`` on a compiled program otherwise runs three pieces: the loss's compiled
    graph (forward), its backward through autograd, and the optimizer's fused kernel.
    Here one :class:`~ppl_genmodels.compiled.Static` (``inner_grad``: the gradients taken
    inside, the backward recorded as plain operations) computes the loss, its gradients
    and ``torch.optim.Adam``'s update, and writes the new parameters and the optimizer's
    own state (``step``, ``exp_avg``, ``exp_avg_sq``) in place: no autograd engine, no
    ``.grad`` tensors, no optimizer call, and Inductor fuses the update into the graph's
    kernels. The optimizer stays the one the run checkpoints: its state is the state the
    graph reads and writes, so resuming, ``state_dict`` and a later step of the general
    path see the same numbers. A non-finite loss leaves the parameters and the state as
    they were (the same rule as the fused optimizers' ``found_inf``).

    It takes over only where it gives what ``optimizer.step()`` would, to float32
    rounding: exactly ``torch.optim.Adam`` (not a subclass), a float learning rate, no
    AMSGrad, capturable, differentiable or decoupled weight decay, no optimizer hooks,
    float32 networks, and once every parameter has its state (after the first step,
    which the general path takes). Otherwise, and for good once its capture failed, the
    step runs as before.
    """

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.static = Static(self._step, trainer.model, label="the training step with its Adam update",
                             inner_grad=True, min_calls=1)
        self._names: tuple[tuple[int, ...], tuple[str, ...]] | None = None  # (parameters' ids, their names)

    def __call__(self, x, y, streams, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(loss, skipped)`` after the step and update, or None when the general path must take this step."""
        optimizer = self.trainer.optimizer
        if self.static.fallback is not None or type(optimizer) is not torch.optim.Adam or \
                optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks or \
                _optimizer_module._global_optimizer_pre_hooks or _optimizer_module._global_optimizer_post_hooks or \
                self.trainer.model.acceleration["precision"] != "fp32":
            return None
        params, groups, slots = [], [], ([], [], [])
        for group in optimizer.param_groups:
            if group["amsgrad"] or group["capturable"] or group["differentiable"] or \
                    group.get("decoupled_weight_decay") or not isinstance(group["lr"], float):
                return None
            groups.append((len(group["params"]), group["lr"], *group["betas"], group["eps"], group["weight_decay"],
                           group["maximize"]))
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state or "exp_avg" not in state or not p.requires_grad:
                    return None
                params.append(p)
                slots[0].append(state["step"])
                slots[1].append(state["exp_avg"])
                slots[2].append(state["exp_avg_sq"])
        names = self._parameter_names(params)
        if names is None:
            return None
        option, weight = self.trainer.loss_module.kl_input()
        loss, skipped, *_ = self.static(x, y, weight, *slots[0], *slots[1], *slots[2], streams=streams, scale=scale,
                                        names=names, groups=tuple(groups), kl_weight=option)
        return loss, skipped

    def _parameter_names(self, params: list) -> tuple[str, ...] | None:
        """The program's names of the optimizer's parameters (None if one is not the program's)."""
        ids = tuple(map(id, params))
        if self._names is None or self._names[0] != ids:
            names = {id(p): name for name, p in self.trainer.model.named_parameters()}
            if not all(i in names for i in ids):
                return None
            self._names = ids, tuple(names[i] for i in ids)
        return self._names[1]

    def _step(self, x, y, weight, *slots, streams=None, scale: float, names: tuple, groups: tuple, **_):
        """Loss, gradients and Adam's update of every parameter, written in place; returns ``(loss, skipped, ...)``."""
        n = len(names)
        steps, exp_avgs, exp_avg_sqs = slots[:n], slots[n:2 * n], slots[2 * n:]
        current = dict(self.trainer.model.named_parameters())  # inside a capture: the graph's inputs
        params = [current[name] for name in names]
        with torch.enable_grad():
            loss = self.trainer.loss_module._loss(x, y, weight, streams=streams)
            grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
        value = loss.detach()
        bad = torch.isnan(value - value)  # an infinite or NaN loss: nothing moves
        hyper = [settings for size, *settings in groups for _ in range(size)]  # each parameter's group's
        scalars = []
        with torch.no_grad():
            for p, g, step, m, v, (lr, beta1, beta2, eps, decay, maximize) in zip(
                    params, grads, steps, exp_avgs, exp_avg_sqs, hyper):
                if g is None:  # torch.optim.Adam leaves a parameter without a gradient alone
                    continue
                g = -g if maximize else g
                g = g + decay * p if decay else g
                t = step + 1
                m_new = m + (g - m) * (1 - beta1)
                v_new = v * beta2 + g * g * (1 - beta2)
                step_size = lr / (1 - torch.pow(beta1, t))
                bias2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
                scalars += [step_size, bias2_sqrt]
                p_new = p - step_size * m_new / (v_new.sqrt() / bias2_sqrt + eps)
                for old, new in ((p, p_new), (m, m_new), (v, v_new), (step, t)):
                    old.copy_(torch.where(bad, old, new))
        # The step sizes and bias corrections are returned, unused, so that Inductor computes each once into a
        # buffer: otherwise it inlines them into every vector of the parameters' update kernels, where the two
        # powers of a float32 step count cost more than the update (and more still once beta1^t underflows,
        # after about 850 steps, into libm's slow path: 14% of a step around step 4,000).
        return value, bad.float(), *scalars


def _clear_gradients(optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``, without its profiling wrapper for torch's own optimizers.

    The wrapper costs about 30 us a step (1% of an MNIST step); an optimizer that defines its
    own ``zero_grad`` is called as it is.
    """
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = None


class Trainer:
    """One model, its objective and optimizer; ``step`` is one SVI update on a minibatch.

    Under torchrun the loss module is wrapped in ``DistributedDataParallel``, which averages
    the gradients over the ranks. ``step`` never waits for the device: the loss stays a
    tensor, and a non-finite loss on any rank makes every rank skip the update on the
    device (the fused optimizers' ``found_inf``; other optimizers check on the host).
    """

    def __init__(self, model, objective, optimizer, probe=None):
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.validate_next = True  # Pyro's argument checks run on the first step only
        self.skipped = None  # after a step: 1 (a device tensor) when its update was skipped on every rank, else 0
        self.loss_module = _Loss(model, objective)
        self.ddp = None
        if distributed.world().distributed:
            device = next(model.parameters()).device
            self.ddp = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=probe is None or _has_unused(self.loss_module, *probe))
        # a compiled program in one process: the step and its Adam update as one graph, where it applies
        self.in_graph = _AdamInGraph(self) if self.loss_module.static is not None and self.ddp is None else None

    @property
    def compile_seconds(self) -> float:
        """Seconds spent capturing and compiling the training step so far (0 when it is not compiled)."""
        return sum(static.seconds for static in self.statics)

    @property
    def statics(self) -> list[Static]:
        """The compiled paths of the step (the loss alone, the loss with the Adam update); empty when not compiled."""
        return [static for static in (self.loss_module.static, self.in_graph and self.in_graph.static) if static]

    def step(self, x, y=None, *, streams: Streams | None = None, scale: float | None = None) -> torch.Tensor:
        """One gradient step on the loss times ``scale`` (default 1 / batch).

        Returns the minibatch's loss summed over its datapoints (a 0-dim tensor on the device);
        when it is NaN or infinite on any rank, no parameter changed. ``streams``: the
        datapoints' random streams (default: torch's global generator).
        """
        scale = 1.0 / x.shape[0] if scale is None else scale
        if self.in_graph is not None and not self.validate_next:
            with pyro.validation_enabled(False):  # validated with the first step, as the general path is
                done = self.in_graph(x, y, streams, scale)
            if done is not None:
                value, self.skipped = done
                return value
        with pyro.validation_enabled(self.validate_next):
            loss = (self.ddp or self.loss_module)(x, y, streams)
        self.validate_next = False
        _clear_gradients(self.optimizer)
        (loss * scale).backward()
        value = loss.detach()
        bad = torch.isnan(value - value).float()  # 1 for an infinite or NaN loss: inf - inf is NaN
        if self.ddp is not None:
            bad = distributed.all_max(bad)
        self.skipped = bad  # 1 when this step's update was skipped: the same on every rank
        if _fused(self.optimizer):
            self.optimizer.found_inf = bad
            self.optimizer.step()
        elif not bad.item():
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
    Every rank of a multi-process job builds the same model from the same seed
    (and DDP starts them all from rank 0's values).
    """
    pyro.set_rng_seed(config.seed)
    config.validate()
    dataset = config.load_data()
    net = build_model(config, dataset, model)
    device = distributed.local_device(resolve_device(config.device))
    dataset, net = dataset.to(device), net.to(device)
    nesting = net.check(*dataset.probe())
    steps = config.epochs * math.ceil(len(dataset.split("train")) / (config.batch_size * distributed.world().size))
    net.accelerate(precision=config.precision, compile=compiles(config.compile, device, steps))  # after the check
    objective = make_objective(config.elbo, config.particles, nesting, detached=net.parameters_detached)
    trainer = Trainer(net, objective, _optimizer(config, net.parameters(), device), probe=dataset.probe())
    here = distributed.world()
    config.processes, config.global_batch_size = here.size, config.batch_size * here.size
    return _Training(out, config, dataset, net, trainer, device, torch.Generator().manual_seed(config.seed))


#: optimizers whose fused kernels skip a step on the device when told a loss was not finite
_FUSED = ("adam", "adamw", "sgd")


def _optimizer(config: RunConfig, parameters, device: torch.device):
    """The run's optimizer; fused where PyTorch has a fused kernel for it on this device (CPU and CUDA)."""
    fused = config.optimizer in _FUSED and device.type in ("cpu", "cuda")
    return OPTIMIZERS[config.optimizer](parameters, lr=config.lr, **({"fused": True} if fused else {}))


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


def _binarized(run: _Training, x, y, streams: Streams):
    """Dynamic binarization of a training batch from the datapoints' own streams (on the data's device)."""
    if run.dataset.binarize != "dynamic":
        return x, y
    draws = streams.child("binarize")
    x = (draws.uniform(x.shape, data_dim=0, dtype=x.dtype) < x).to(x.dtype)
    if y is not None and run.dataset.condition == "quadrants":
        y = (draws.uniform(y.shape, data_dim=0, dtype=y.dtype) < y).to(y.dtype)
    return x, y


def _epoch_batches(run: _Training, epoch: int):
    """This rank's share of every global minibatch of the epoch: ``(x, y, streams, scale)``.

    One permutation of the training split (the same on every rank) is cut into global
    batches of ``batch_size`` x processes rows; each rank takes a contiguous share. The
    loss of a share is scaled by processes / global rows, so that DDP's average over the
    ranks is the gradient of the mean loss over the global batch, whatever the shares'
    sizes. A rank whose share of the last batch is empty computes a loss on one row with
    scale 0, so it still joins the gradient reduction. Random draws come from the
    datapoints' streams (keyed by the seed, the epoch and the row), so the run sees the
    same numbers with any number of processes.
    """
    part, here = run.dataset.split("train"), distributed.world()
    size = run.config.batch_size * here.size
    order = torch.randperm(len(part), generator=run.shuffle).to(part.x.device)  # one host-to-device copy per epoch
    for begin in range(0, len(part), size):
        batch = order[begin:begin + size]
        rows = distributed.split_batch(batch, here)
        scale = here.size / batch.shape[0]
        if rows.shape[0] == 0:
            rows, scale = batch[:1], 0.0
        streams = Streams(run.config.seed, rows, f"train/{epoch}")
        x = part.x[rows]
        y = None if part.y is None else part.y[rows]
        yield (*_binarized(run, x, y, streams), streams, scale)


def _train_epoch(run: _Training, epoch: int, last_epoch: int, bar) -> float:
    """One pass over the shuffled training batches; returns the mean training ELBO per datapoint.

    The losses are summed on the device; the host looks at them every ``SYNC_EVERY`` steps
    and at the end of the epoch, when a non-finite loss (whose update every rank skipped)
    stops the run before anything of this epoch is written.
    """
    run.net.train()
    if hasattr(run.trainer.objective, "kl_weight"):  # the ELBO family: this epoch's KL weight (exact on resume)
        run.trainer.objective.kl_weight = kl_weight(run.config.beta, run.config.kl_warmup, epoch)
    device = run.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    bad_value = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for step, (x, y, streams, scale) in enumerate(_epoch_batches(run, epoch)):
        loss = run.trainer.step(x, y, streams=streams, scale=scale).double()
        skipped = run.trainer.skipped > 0
        new_bad = skipped & (first_bad < 0)
        first_bad = torch.where(new_bad, step, first_bad)
        bad_value = torch.where(new_bad, loss, bad_value)
        total += torch.where(skipped, torch.zeros_like(loss), loss) * (1.0 if scale else 0.0)
        count += x.shape[0] if scale else 0
        if (step + 1) % SYNC_EVERY == 0:
            _check_diverged(run, epoch, last_epoch, first_bad, bad_value)
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{float(total) / count:.3f}", refresh=False)
    _check_diverged(run, epoch, last_epoch, first_bad, bad_value)
    sums = distributed.all_sum(torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)]))
    return -float(sums[0] / sums[1])


def _check_diverged(run: _Training, epoch: int, last_epoch: int, first_bad, bad_value) -> None:
    """Stop the run if a step's loss was NaN or infinite (the flag is the same on every rank: no rank waits)."""
    step = int(first_bad)
    if step >= 0:
        value = float(bad_value)
        if distributed.world().distributed:  # the value on this rank may be finite; report the step only
            value = float("nan") if math.isfinite(value) else value
        raise TrainingDiverged(f"training stopped: the loss became {value} at epoch {epoch}, step {step + 1}; "
                               f"{_kept(run, last_epoch)}; try a smaller --lr")


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


def _report_compiled(trainer: Trainer) -> None:
    """One line after the first epoch of a compiled run: the compile time, or why the step runs as written."""
    statics = trainer.statics
    graphs = sum(len(static.entries) for static in statics)
    update = " (with its Adam update)" if trainer.in_graph is not None and trainer.in_graph.static.entries else ""
    if graphs or all(static.fallback is None for static in statics):
        tqdm.write(f"compiled training step{update}: {graphs} graph(s), captured and compiled in "
                   f"{trainer.compile_seconds:.1f} s")
    else:
        reason = next(static.fallback for static in statics if static.fallback is not None)
        tqdm.write(f"compiled training step: off ({reason}); the step runs as written")


def _epochs(run: _Training, progress: bool) -> None:
    """Train from ``run.start_epoch`` until the last epoch, early stopping or divergence."""
    epochs = range(run.start_epoch, run.config.epochs + 1) if not run.stopped_early else range(0)
    processes = distributed.world().size
    scale = f" ({processes} processes, global batch {run.config.global_batch_size})" if processes > 1 else ""
    with tqdm(total=len(epochs), desc=f"fit {run.config.model} on {run.config.data}{scale}", unit="epoch",
              disable=not progress, dynamic_ncols=True) as bar:
        last_epoch = run.start_epoch - 1
        for epoch in epochs:
            started = time.perf_counter()
            train_elbo = _train_epoch(run, epoch, last_epoch, bar if progress else None)
            run.net.eval()
            val = validation_elbo(run.net, run.dataset, seed=run.config.seed, purpose=f"validation/{epoch}")
            if not math.isfinite(val):
                raise TrainingDiverged(f"training stopped: the validation ELBO became {val} at epoch {epoch}; "
                                       f"{_kept(run, last_epoch)}")
            _write_epoch(run, epoch, train_elbo, val, time.perf_counter() - started)
            last_epoch = epoch
            if progress and epoch == run.start_epoch and run.trainer.statics:
                _report_compiled(run.trainer)
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
    distributed.setup(resolve_device(config.device))  # under torchrun: join the job before anything is decided
    created = _first_missing(out) if distributed.is_main() else None
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
    distributed.agree(lambda: _check_directory(out, resume))
    run = _start(config, out, model)
    if distributed.is_main():
        runs.remove_leftovers(out)
    if resume:
        _resume(run)
    runs.write_config(out, config)
    _epochs(run, progress)
    distributed.barrier()  # rank 0 has written best.pt
    best = load_checkpoint(out / runs.BEST_FILE, map_location=run.device)
    run.net.load_state(best)
    run.net.eval()
    result = Run(out, config, run.net, run.dataset, pd.DataFrame(run.history, columns=METRIC_COLUMNS),
                 int(best["epoch"]), run.device)
    if evaluate:
        name = distributed.agree(lambda: result.unused_result_name("evaluation", "fit"))
        evaluate_run(result, k=config.eval_k, progress=progress, name=name, seed=config.seed)
    if plots and distributed.is_main():
        plot_run(result)
    distributed.barrier()
    return result


def _check_directory(out: Path, resume: bool) -> None:
    """A resumed run has its configuration; a new run goes into a free directory."""
    if resume and not (out / runs.CONFIG_FILE).is_file():
        raise ConfigError(f"{out} is not a run directory (no {runs.CONFIG_FILE})")
    if not resume:
        _check_fresh(out)
