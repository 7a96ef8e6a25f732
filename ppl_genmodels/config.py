"""What defines a training run: its options, and the model and data they name.

:class:`RunConfig` is the one source of truth for the options of ``fit``. Each
field is declared with :func:`option`, which records its help text, its
choices (taken from the registries: objectives, optimizers, likelihoods, ...)
and how to parse it from text; the ``fit`` command line is generated from
these fields (:mod:`ppl_genmodels.cli`), ``config.json`` is their dictionary,
and the data options travel as one :class:`~ppl_genmodels.data.DataOptions`
into :func:`~ppl_genmodels.data.load_dataset`. Adding an option means adding
a field here (or to ``DataOptions`` for a data option).

``config.json`` is flat: the data options sit beside the others
(``{"model": ..., "data": ..., "data_dir": ..., "likelihood": ..., "z_dim": ...}``).

A model is named by a registry name (``vae``, ``cvae``, ``ppca``), by
``path/to/file.py:ClassName`` (a user's own Pyro program), or passed to the
Python API as a class or as an instance (already built, used as it is). A class
is built with the constructor arguments it names, and only those the user set
(``--z-dim``, ``--hidden``, ``--scale``, ``--model-arg``) or the data determines
(``x_dim``, ``y_dim``, ``likelihood``, ``n_levels``, ``y_kind``); its own defaults
stand otherwise (:func:`constructor_arguments`), and the values actually used are
written back into the configuration. The built model is wrapped in a
:class:`~ppl_genmodels.programs.Program`, which calls ``model``/``guide`` in the
program's own signature.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import re
import sys
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import torch

from ppl_genmodels.data import DataOptions, Dataset, load_dataset
from ppl_genmodels.inference.objectives import KL_WEIGHTED, OBJECTIVES, ObjectiveNames, parse_objective
from ppl_genmodels.models import REGISTRY
from ppl_genmodels.programs import PRECISIONS, Program
from ppl_genmodels.traces import TraceError, first_line

__all__ = [
    "ConfigError",
    "OPTIMIZERS",
    "COMPILE_CHOICES",
    "compiles",
    "option",
    "RunConfig",
    "resolve_device",
    "resolve_model_class",
    "model_spec_string",
    "is_instance",
    "model_file",
    "file_sha256",
    "check_model_file",
    "constructor_arguments",
    "build_model",
]

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

#: optimizers by name (plain ``torch.optim``, on the module's own parameters)
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "rmsprop": torch.optim.RMSprop}


#: ``--compile``: always, never, or where it pays (:func:`compiles`)
COMPILE_CHOICES = ("auto", "on", "off")
#: optimizer steps from which ``--compile auto`` compiles a run's training step (compiling costs seconds, once)
COMPILE_MIN_STEPS = 5000
#: model passes (particles or AIS leapfrog evaluations, times datapoints) from which it compiles an evaluation
COMPILE_MIN_ROWS = 20_000_000


def compiles(setting, device: torch.device, steps: int, rows: int = 0) -> bool:
    """Whether ``--compile SETTING`` compiles the hot paths of a job on ``device``.

    ``steps``: the optimizer steps of a training job; ``rows``: the model passes of an
    evaluation (a datapoint's particle or leapfrog evaluation each). ``auto`` compiles a
    training job of at least :data:`COMPILE_MIN_STEPS` steps and an evaluation of at least
    :data:`COMPILE_MIN_ROWS` rows: compiling costs seconds once per process (much more on a
    cold cache), and on a 2-core CPU the compiled SVI step of the MNIST VAE 784-400-50 saved
    about 1 ms in 5 (the README's figures), so it pays on long jobs only. ``device`` is
    kept for a rule per device once GPU figures exist. ``True``/``False`` (configurations
    written before the three settings) mean ``on``/``off``.
    """
    setting = _compile_setting(setting)
    if setting != "auto":
        return setting == "on"
    return steps >= COMPILE_MIN_STEPS or rows >= COMPILE_MIN_ROWS


def _compile_setting(value):
    """``on``/``off`` for the booleans of older configurations; other values as they are."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


class ConfigError(ValueError):
    """A bad option, model name or run directory (one-line message)."""


def parse_int_list(text: str) -> list[int]:
    """``"256,128"`` -> ``[256, 128]``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one layer size")
    return values


def parse_key_value(text: str) -> tuple[str, object]:
    """``"df=3.5"`` -> ``("df", 3.5)``: the value is parsed as JSON where it can be, else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_optional_int(text: str) -> int | None:
    """An integer, or None for ``none`` / ``off``."""
    return None if text.lower() in ("none", "off") else int(text)


def option(default=MISSING, help: str = "", *, factory=None, choices=None, parse=None, flag: str | None = None,
           metavar: str | None = None, repeat: bool = False, resumable: bool = False, cli: bool = True):
    """A :class:`RunConfig` field with what the command line needs to offer it.

    ``help``: one line, without the default (the command line appends it);
    ``choices``: the allowed values (a registry's keys); ``parse``: text -> value
    (default: the field's type); ``flag``: the option's spelling (default
    ``--field-name``); ``repeat``: the flag may be given several times, each
    giving one ``(key, value)`` pair of a dict; ``resumable``: ``fit --resume``
    may change it; ``cli``: offered on the command line (False: set by the
    Python API only). :class:`~ppl_genmodels.data.DataOptions` uses the same
    metadata keys (help, choices).
    """
    metadata = {"help": help, "choices": None if choices is None else tuple(choices), "parse": parse, "flag": flag,
                "metavar": metavar, "repeat": repeat, "resumable": resumable, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything that defines a training run; saved as ``config.json``."""

    model: str = option("vae", "vae, cvae, hvae, ppca, or path/to/file.py:ClassName")
    data: str = option("digits", "digits, mnist, circle, moons, swiss-roll, or a .npy/.npz/.csv file")
    data_options: DataOptions = option(factory=DataOptions)  # each of its fields is an option of its own
    z_dim: int | None = option(None, "latent dimension (default 2 for data of <= 3 dimensions, else 16)")
    hidden: list[int] | None = option(None, "hidden layer sizes, e.g. 400 or 256,256 "
                                            "(default 64,64 for data of <= 3 dimensions, else 256)",
                                      parse=parse_int_list)
    scale: float | None = option(None, "fixed Gaussian observation scale (default: learned)")
    guide: str | None = option(None, "guide family of the built-in models: diag, fullrank, iaf:N (default diag)")
    activation: str | None = option(None, "hidden-layer activation of the built-in networks, e.g. relu, tanh "
                                          "(default relu)")
    model_args: dict = option(factory=dict, help="extra constructor argument for the model (JSON value), repeatable",
                              parse=parse_key_value, flag="--model-arg", metavar="KEY=VALUE", repeat=True)
    data_arg: str | None = option(None, "the argument of model() and guide() that receives the data, when it "
                                        "is not the first (the conditioning goes to the other one)")
    model_sha256: str | None = option(None, "SHA-256 of the model file at fit time; a run whose model file "
                                            "differs is not opened without --trust-model-file", cli=False)
    model_instance: bool = option(False, "the run was trained on a model instance passed to the Python API "
                                         "(load it again with load_run(path, model=instance))", cli=False)
    elbo: str = field(default="trace", metadata={  # the choices also accept renyi:ALPHA (checked by validate)
        **option(help="training objective: " + ", ".join(OBJECTIVES) + " (ALPHA < 1; see the README's "
                 "Objectives)").metadata, "choices": ObjectiveNames()})
    particles: int = option(1, "particles per datapoint for the objective (K of IWAE-K)")
    beta: float = option(1.0, "weight of the KL term (log p(z) - log q(z)) in ELBO-family objectives; the "
                              "validation and test bounds are always unweighted")
    kl_warmup: int = option(0, "epochs of linear warm-up of the KL weight: epoch e of E trains with "
                                "beta * e / E, then beta (0: none)")
    optimizer: str = option("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = option(1e-3, "learning rate")
    batch_size: int = option(128, "datapoints per minibatch")
    epochs: int = option(50, "training epochs", resumable=True)
    patience: int | None = option(10, "early-stopping patience in epochs (epochs without a better validation "
                                      "ELBO); 0 or none disables", parse=parse_optional_int, resumable=True)
    seed: int = option(0, "random seed: data split, initial weights, minibatches")
    data_seed: int | None = option(None, "seed of the data split and of its fixed binarization, when it must not "
                                         "follow --seed (e.g. replicates over --seed on one split)")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, cuda:N", resumable=True)
    eval_k: int = option(100, "particles of the IWAE-k test estimate after training")
    precision: str = option("fp32", "precision of the networks: bf16 runs them under torch.autocast, with "
                                    "log-densities, log-sum-exp and accumulators kept in float32",
                            choices=PRECISIONS, resumable=True)
    compile: str = option("auto", "run the hot paths (the training step, IWAE's particle chunks, the HMC/AIS "
                                  "log-joint) as one captured graph each, compiled by Inductor (torch.compile's "
                                  "compiler); a program that is not static runs as written, with a warning: on, "
                                  "off, or auto, where it pays (training runs of at least 5,000 optimizer steps; "
                                  "long evaluations)",
                          choices=COMPILE_CHOICES, resumable=True)
    processes: int = option(1, "processes that trained the run (the latest start or resume): under torchrun, "
                               "each took batch_size datapoints of every global batch", cli=False, resumable=True)
    global_batch_size: int | None = option(None, "datapoints per optimizer step over all processes "
                                                 "(batch_size x processes)", cli=False, resumable=True)

    @staticmethod
    def names() -> list[str]:
        """Every option name, the data options included, in ``config.json``'s order."""
        names = []
        for f in dataclasses.fields(RunConfig):
            names += [d.name for d in dataclasses.fields(DataOptions)] if f.name == "data_options" else [f.name]
        return names

    @staticmethod
    def resumable() -> set[str]:
        """The options ``fit --resume`` may change; every other one stays as the run saved it."""
        return {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("resumable")}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """From flat options (``config.json``, or keywords of ``fit``); unknown names are refused."""
        known = cls.names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "compile" in values:  # configurations written when --compile was a switch
            values = {**values, "compile": _compile_setting(values["compile"])}
        data_names = {f.name for f in dataclasses.fields(DataOptions)}
        data_options = DataOptions(**{k: v for k, v in values.items() if k in data_names})
        return cls(data_options=data_options, **{k: v for k, v in values.items() if k not in data_names})

    def to_dict(self) -> dict:
        """Flat options, as written to ``config.json``."""
        out = {}
        for name, value in dataclasses.asdict(self).items():  # copies: lists and dicts are not shared
            out.update(value if name == "data_options" else {name: value})
        return out

    def load_data(self) -> Dataset:
        """The dataset this configuration names, split with ``data_seed`` (default: ``seed``)."""
        return load_dataset(self.data, self.data_options, seed=self.seed if self.data_seed is None else self.data_seed)

    def validate(self) -> "RunConfig":
        """Check the training options (the data options are checked by :meth:`load_data`)."""
        for name in ("lr", "scale", "beta"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        for key, value in self.model_args.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"model argument {key} must be a finite number, got {value}")
        checks = [
            (self.compile in COMPILE_CHOICES, f"unknown compile setting {self.compile!r}; choose one of "
                                              f"{', '.join(COMPILE_CHOICES)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose one of "
                                           f"{', '.join(PRECISIONS)}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.particles >= 1, f"particles must be >= 1, got {self.particles}"),
            (0 <= self.seed < 2**32, f"seed must be in 0..2**32-1, got {self.seed}"),
            (self.data_seed is None or 0 <= self.data_seed < 2**32, f"data_seed must be in 0..2**32-1, got "
                                                                    f"{self.data_seed}"),
            (self.eval_k >= 1, f"eval_k must be >= 1, got {self.eval_k}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
            (self.z_dim is None or self.z_dim >= 1, f"z_dim must be >= 1, got {self.z_dim}"),
            (self.hidden is None or all(h >= 1 for h in self.hidden), f"hidden sizes must be >= 1, got {self.hidden}"),
            (self.scale is None or self.scale > 0, f"scale must be > 0, got {self.scale}"),
            (self.patience is None or self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        # the objective (renyi:ALPHA with a valid alpha), and a KL weight only where there is a KL term
        try:
            base, _ = parse_objective(self.elbo)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if isinstance(self.kl_warmup, bool) or not isinstance(self.kl_warmup, int) or self.kl_warmup < 0:
            raise ConfigError(f"kl_warmup must be a whole number of epochs >= 0, got {self.kl_warmup}")
        if base not in KL_WEIGHTED and (self.beta != 1 or self.kl_warmup != 0):
            raise ConfigError(f"--beta and --kl-warmup weight the KL term of the ELBO-family objectives "
                              f"({', '.join(KL_WEIGHTED)}); --elbo {self.elbo} has none (use beta 1, kl_warmup 0)")
        resolve_device(self.device)
        return self


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are checked; nothing else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or re.fullmatch(r"cpu|cuda(:\d+)?", name) is None:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_file(spec) -> Path | None:
    """The Python file a ``path/to/file.py:ClassName`` spec names, or None for any other model."""
    if not isinstance(spec, str) or ":" not in spec:
        return None
    path = spec.rpartition(":")[0]
    return Path(path).expanduser() if path.endswith(".py") else None


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_model_file(config: "RunConfig", trust: bool = False) -> None:
    """Refuse to import a run's model file whose bytes differ from those it was trained with.

    Opening a run with a user model imports (runs) that file; a run directory from
    elsewhere could name any file. The SHA-256 recorded at ``fit`` must match,
    unless the caller trusts the file (``--trust-model-file``).
    """
    path = model_file(config.model)
    if path is None or trust or config.model_sha256 is None or not path.is_file():
        return
    actual = file_sha256(path)
    if actual != config.model_sha256:
        raise ConfigError(f"model file {path} is not the file this run was trained with (SHA-256 {actual[:12]}..., "
                          f"recorded {config.model_sha256[:12]}...); opening the run would run its code: pass "
                          "--trust-model-file if you trust it")


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
            raise ConfigError(f"model class {cls.__name__} has no {method}(x) method")
    return cls


def is_instance(model) -> bool:
    """Whether ``model`` is an already-built model (not a name, file spec or class)."""
    return model is not None and not isinstance(model, str) and not inspect.isclass(model)


def model_spec_string(spec) -> str:
    """The string stored in config.json for a model given by name, file spec or class.

    Model files are stored with absolute paths, so the run loads from any working directory.
    """
    if is_instance(spec):
        spec = type(spec)
    if not inspect.isclass(spec):
        text = str(spec)
        path, sep, name = text.rpartition(":")
        if sep and path.endswith(".py") and Path(path).is_file():
            return f"{Path(path).resolve()}:{name}"
        return text
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


#: constructor arguments the data determines (a class receives those it names)
DATA_ARGUMENTS = ("x_dim", "y_dim", "likelihood", "n_levels", "y_kind")
#: constructor arguments set by options of their own (the rest come through --model-arg)
SIZE_ARGUMENTS = ("z_dim", "hidden", "scale", "guide", "activation")


def _data_values(dataset: Dataset) -> dict:
    return {"x_dim": dataset.x_dim, "y_dim": dataset.y_dim, "likelihood": dataset.likelihood,
            "n_levels": dataset.n_levels, "y_kind": {"label": "onehot", "quadrants": "binary"}.get(dataset.condition)}


def _toolkit_defaults(dataset: Dataset) -> dict:
    """Sizes for the built-in models, and for a class that requires them without a default of its own."""
    low_dim = dataset.x_dim <= 3
    return {"z_dim": 2 if low_dim else 16, "hidden": (64, 64) if low_dim else (256,)}


def _user_values(config: RunConfig) -> dict:
    """The constructor arguments the user set: the size options given, then ``--model-arg``."""
    values = {k: getattr(config, k) for k in SIZE_ARGUMENTS if getattr(config, k) is not None}
    if "hidden" in values:
        values["hidden"] = tuple(values["hidden"])
    return {**values, **config.model_args}


def constructor_arguments(cls, config: RunConfig, dataset: Dataset) -> dict:
    """The arguments ``cls`` is built with: those it names, and only those the user set or the data determines.

    Precedence: what the user set (``--z-dim``, ``--hidden``, ``--scale``,
    ``--model-arg``), then what the data determines (``x_dim``, ``y_dim``,
    ``likelihood``, ...), then the class's own default; the toolkit's sizes fill a
    required argument without a default (and are the built-in models' defaults).
    """
    params = {name: p for name, p in inspect.signature(cls).parameters.items() if p.kind not in _VARIADIC}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    user, data, toolkit = _user_values(config), _data_values(dataset), _toolkit_defaults(dataset)
    builtin = cls in REGISTRY.values() and getattr(cls, "toolkit_sizes", True)  # hvae keeps its own sizes
    for key in user:
        if key not in params and not takes_kwargs:
            flag = f"--{key.replace('_', '-')}" if key in SIZE_ARGUMENTS and key not in config.model_args \
                else "--model-arg"
            raise ConfigError(f"model {cls.__name__} has no constructor argument {key!r} (from {flag}); "
                              f"its arguments are {', '.join(params) or 'none'}")
    kwargs = dict(user)
    for name, p in params.items():
        if name in kwargs:
            continue
        if name in data:
            kwargs[name] = data[name]
        elif name in toolkit and (builtin or p.default is inspect.Parameter.empty):
            kwargs[name] = toolkit[name]
        elif p.default is inspect.Parameter.empty:
            raise ConfigError(f"model {cls.__name__} needs the constructor argument {name!r}; "
                              f"give it with --model-arg {name}=VALUE")
    if takes_kwargs:  # a class taking **kwargs gets the data's size and the latent size
        kwargs.setdefault("x_dim", data["x_dim"])
        kwargs.setdefault("z_dim", toolkit["z_dim"])
    return kwargs


def _record(config: RunConfig, cls, kwargs: dict) -> None:
    """Write into ``config`` the constructor arguments actually used (bound, with the class's defaults)."""
    bound = inspect.signature(cls).bind_partial(**kwargs)
    bound.apply_defaults()
    used = dict(bound.arguments)
    for name, p in inspect.signature(cls).parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            used.update(used.pop(name, {}))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            used.pop(name, None)
    given = set(config.model_args)
    for name, value in used.items():
        if name in DATA_ARGUMENTS or name in given:
            continue
        if isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # not representable in config.json (a module, a function): the class default stands
        if name in SIZE_ARGUMENTS and _fits_field(name, value):
            setattr(config, name, value)
        else:
            config.model_args[name] = value


def _fits_field(name: str, value) -> bool:
    """Whether a constructor value is valid for the :class:`RunConfig` field of the same name."""
    if value is None:
        return True
    if name == "z_dim":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if name == "hidden":
        return isinstance(value, list) and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                               for h in value)
    if name in ("guide", "activation"):
        return isinstance(value, str)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def build_model(config: RunConfig, dataset: Dataset, model=None) -> Program:
    """The configured model for ``dataset`` as a :class:`~ppl_genmodels.programs.Program`.

    ``model``: a class, name or file spec overriding ``config.model``, or an
    already-built instance (used as it is). The constructor arguments used are
    recorded in ``config`` (so ``config.json`` holds the values the model was built with).
    """
    if is_instance(model):
        module = model
    else:
        cls = resolve_model_class(model if model is not None else config.model)
        kwargs = constructor_arguments(cls, config, dataset)
        try:
            module = cls(**kwargs)
        except Exception as err:
            message = first_line(err, "")
            raise ConfigError(f"cannot build model {cls.__name__}: {type(err).__name__}: {message}") from None
        _record(config, cls, kwargs)
    try:
        program = Program(module, data_arg=config.data_arg)
    except TraceError as err:
        raise ConfigError(str(err)) from None
    if dataset.y_dim and not program.conditioned:
        raise ConfigError(f"data is conditioned ({dataset.condition}) but {type(module).__name__}.model takes "
                          "no conditioning argument")
    return program
