"""Run directories: the resolved configuration, model building, and loading a trained run.

A run directory holds everything one training run produced::

    RUN_DIR/
      config.json                    the resolved configuration (RunConfig)
      metrics.csv                    one row per epoch: epoch, train_elbo, val_elbo, seconds
      checkpoint.pt                  last epoch: model + optimizer state, epoch, RNG states (resume)
      best.pt                        model state at the best validation ELBO (used by load_run)
      evaluation/summary.csv         estimator, mean, stderr, n, seconds
      evaluation/per_datapoint.csv   index, then one column per estimate and its standard error
      plots/*.png                    ELBO curves, samples, reconstructions or the 2-D density

A model is named by a registry name (``vae``, ``cvae``, ``ppca``), by
``path/to/file.py:ClassName`` (a user's own Pyro program), or passed to the
Python API as a class. Its constructor receives ``x_dim`` and ``z_dim`` and
whichever of ``y_dim``, ``hidden``, ``likelihood``, ``n_levels``, ``scale``,
``y_kind`` it accepts, plus ``model_args``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ppl_genmodels.checkpoint import atomic_write_text, load_checkpoint
from ppl_genmodels.data import Dataset, load_dataset

__all__ = [
    "ConfigError",
    "RunConfig",
    "Run",
    "resolve_model_class",
    "build_model",
    "load_dataset_for",
    "load_run",
    "resolve_device",
    "CONFIG_FILE",
    "METRICS_FILE",
    "CHECKPOINT_FILE",
    "BEST_FILE",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


class ConfigError(ValueError):
    """A bad option, model name or run directory (one-line message)."""


@dataclass
class RunConfig:
    """Everything that defines a training run; saved as ``config.json``."""

    model: str = "vae"
    data: str = "digits"
    data_dir: str | None = None
    likelihood: str | None = None       # None: the dataset's default
    binarize: str | None = None         # None: the dataset's default
    condition: str | None = None        # None, "label" or "quadrants"
    visible_quadrants: int = 1
    z_dim: int | None = None            # None: 2 for data of <= 3 dimensions, else 16
    hidden: list[int] | None = None     # None: [64, 64] for data of <= 3 dimensions, else [256]
    scale: float | None = None          # fixed Gaussian scale; None learns it
    model_args: dict = field(default_factory=dict)
    elbo: str = "trace"
    particles: int = 1
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 50
    patience: int | None = 10           # epochs without validation improvement; None or 0: never stop early
    seed: int = 0
    device: str = "auto"
    eval_k: int = 100
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    n_samples: int | None = None
    noise: float | None = None
    max_examples: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        from ppl_genmodels.inference.objectives import OBJECTIVES

        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.particles >= 1, f"particles must be >= 1, got {self.particles}"),
            (self.eval_k >= 1, f"eval_k must be >= 1, got {self.eval_k}"),
            (self.elbo in OBJECTIVES, f"unknown objective {self.elbo!r}; choose one of {', '.join(OBJECTIVES)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
            (self.z_dim is None or self.z_dim >= 1, f"z_dim must be >= 1, got {self.z_dim}"),
            (self.hidden is None or all(h >= 1 for h in self.hidden), f"hidden sizes must be >= 1, got {self.hidden}"),
            (self.scale is None or self.scale > 0, f"scale must be > 0, got {self.scale}"),
            (self.patience is None or self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        resolve_device(self.device)
        return self


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def _load_class_from_file(spec: str):
    path_text, _, class_name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"model file {path_text} does not exist (from --model {spec})")
    # keyed by path and modification time: an edited file is imported afresh
    module_name = f"ppl_genmodels_user_{abs(hash((str(path.resolve()), path.stat().st_mtime_ns)))}"
    if module_name in sys.modules:
        module = sys.modules[module_name]
    else:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise ConfigError(f"model file {path} failed to import: {type(err).__name__}: {err}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"model file {path} defines no class {class_name!r}")
    return cls


def resolve_model_class(spec):
    """A model class from a registry name, ``file.py:ClassName``, or a class itself."""
    from ppl_genmodels.models import REGISTRY

    if inspect.isclass(spec):
        cls = spec
    elif isinstance(spec, str) and spec in REGISTRY:
        cls = REGISTRY[spec]
    elif isinstance(spec, str) and ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        cls = _load_class_from_file(spec)
    else:
        raise ConfigError(
            f"unknown model {spec!r}; choose one of {', '.join(REGISTRY)} or give path/to/file.py:ClassName"
        )
    for method in ("model", "guide"):
        if not callable(getattr(cls, method, None)):
            raise ConfigError(f"model class {cls.__name__} has no {method}(x, y=None) method")
    return cls


def model_spec_string(spec) -> str:
    """The string stored in config.json for a model given by name, file spec or class.

    Model files are stored with absolute paths, so the run loads from any working directory.
    """
    if not inspect.isclass(spec):
        text = str(spec)
        path, sep, name = text.rpartition(":")
        if sep and path.endswith(".py") and Path(path).is_file():
            return f"{Path(path).resolve()}:{name}"
        return text
    from ppl_genmodels.models import REGISTRY

    for name, cls in REGISTRY.items():
        if cls is spec:
            return name
    try:
        path = inspect.getfile(spec)
    except TypeError:  # module not registered in sys.modules: fall back on a method's code object
        code = getattr(getattr(spec, "model", None), "__code__", None)
        if code is None or not Path(code.co_filename).is_file():
            raise ConfigError(f"cannot locate the source file of model class {spec.__name__}") from None
        path = code.co_filename
    return f"{Path(path).resolve()}:{spec.__qualname__}"


def load_dataset_for(config: RunConfig) -> Dataset:
    """The dataset a configuration names (validated by :func:`ppl_genmodels.data.load_dataset`)."""
    return load_dataset(
        config.data,
        likelihood=config.likelihood,
        binarize=config.binarize,
        data_dir=config.data_dir,
        condition=config.condition,
        visible_quadrants=config.visible_quadrants,
        seed=config.seed,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        n_samples=config.n_samples,
        noise=config.noise,
        max_examples=config.max_examples,
    )


def build_model(config: RunConfig, dataset: Dataset, model_class=None):
    """Instantiate the configured model for ``dataset`` (constructor arguments by signature)."""
    cls = resolve_model_class(model_class if model_class is not None else config.model)
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    low_dim = dataset.x_dim <= 3
    offered = {
        "x_dim": dataset.x_dim,
        "z_dim": config.z_dim if config.z_dim is not None else (2 if low_dim else 16),
        "y_dim": dataset.y_dim,
        "likelihood": dataset.likelihood,
        "n_levels": dataset.n_levels,
        "scale": config.scale,
        "y_kind": {"label": "onehot", "quadrants": "binary"}.get(dataset.condition),
    }
    hidden = config.hidden if config.hidden is not None else ([64, 64] if low_dim else [256])
    offered["hidden"] = tuple(hidden)
    for required in ("x_dim", "z_dim"):
        if required not in params and not takes_kwargs:
            raise ConfigError(f"model class {cls.__name__} must accept the constructor argument {required}")
    if dataset.y_dim and "y_dim" not in params and not takes_kwargs:
        raise ConfigError(f"data is conditioned ({dataset.condition}) but model {cls.__name__} takes no y_dim")
    kwargs = {k: v for k, v in offered.items() if k in params or (takes_kwargs and k in ("x_dim", "z_dim"))}
    for key, value in config.model_args.items():
        if key not in params and not takes_kwargs:
            raise ConfigError(f"model {cls.__name__} has no constructor argument {key!r} (from --model-arg)")
        kwargs[key] = value
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build model {cls.__name__}: {err}") from None
    return model


@dataclass
class Run:
    """A trained run: its directory, configuration, model (with trained weights), data and metrics."""

    path: Path
    config: RunConfig
    model: torch.nn.Module
    data: Dataset
    metrics: pd.DataFrame
    epoch: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def summary(self) -> pd.DataFrame | None:
        """The saved evaluation summary, if the run has been evaluated."""
        path = self.path / "evaluation" / "summary.csv"
        return pd.read_csv(path) if path.is_file() else None


def read_config(path) -> RunConfig:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{path} is not a run directory (no {CONFIG_FILE})")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON: {err}") from None
    return RunConfig.from_dict(values)


def write_config(path, config: RunConfig) -> None:
    atomic_write_text(Path(path) / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")


def load_run(path, *, device: str | None = None, which: str = "best", model_class=None) -> Run:
    """Load a run directory: model with trained weights, configuration, data split and metrics.

    ``which`` is ``"best"`` (weights of the best validation epoch) or ``"last"``.
    ``model_class`` overrides the class named in the configuration (for a model
    defined in a script that cannot be re-imported).
    """
    path = Path(path)
    config = read_config(path)
    if which not in ("best", "last"):
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    if device is None:  # the training device may be absent here (a CUDA run loaded on a laptop)
        device = config.device if config.device in ("auto", "cpu") or torch.cuda.is_available() else "auto"
    dev = resolve_device(device)
    dataset = load_dataset_for(config)
    model = build_model(config, dataset, model_class)
    file = path / (BEST_FILE if which == "best" else CHECKPOINT_FILE)
    if not file.is_file() and which == "best":
        file = path / CHECKPOINT_FILE
    payload = load_checkpoint(file, map_location="cpu")
    model.load_state_dict(payload["model"])
    model.to(dev)
    metrics_file = path / METRICS_FILE
    metrics = pd.read_csv(metrics_file) if metrics_file.is_file() else pd.DataFrame()
    return Run(path, config, model, dataset.to(dev), metrics, int(payload.get("epoch", 0)), dev)
