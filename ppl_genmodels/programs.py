"""A user's Pyro program, called the way the toolkit calls every model.

The toolkit calls every model/guide pair as ``model(x, y)`` and ``guide(x, y)``
(``x`` the data, ``y`` the conditioning or None). Pyro users write their
programs in several shapes, and :class:`Program` meets each of them without
asking for a change:

- ``model(self, x)`` / ``guide(self, x)`` with no conditioning argument, as in
  Pyro's VAE tutorial: called with the data alone.
- ``model(self, x, y=None)``: the conditioning goes to the second argument,
  whatever its name, positional or keyword-only.
- ``model(self, xs, ys=None)`` where the *second* argument is the data (the
  shape of Pyro's CVAE example, whose first argument is the visible input):
  named by ``data_arg="ys"`` (``--data-arg ys``), and the conditioning goes to
  the other argument.
- Parameters from ``pyro.module`` (an ``nn.Module``'s own parameters) and from
  ``pyro.param`` (created lazily, kept in Pyro's global param store) both train,
  move between devices and are saved with the run.

Pyro's param store is global to the process, so two runs in one process could
read each other's ``pyro.param`` values. Each program therefore keeps its own
store state, swapped in around every call with Pyro's ``ParamStoreDict.scope``;
the values ``pyro.param`` creates are adopted as ``nn.Parameter``\\ s of the
program (``Program.pyro_params``), so ``Program.parameters()`` hands them to the
optimizer and ``Program.to(device)`` moves them. :meth:`Program.check` runs
the pair once before training, so every ``pyro.param`` the first calls create
exists when the optimizer is built; one that appears only on some later call (a
branch the first datapoints never take) is adopted then, but the optimizer
built at the start does not update it.

:meth:`Program.accelerate` runs the program's *networks* in bfloat16, and
marks the program for the compiled hot paths (``compile=True``: see
:mod:`ppl_genmodels.compiled`, which captures the whole of a step, Pyro's
handlers included, as one graph). The networks are found
from the user's module down: each immediate child module with parameters is a
candidate (a child whose class has no ``forward`` of its own, an
``nn.ModuleList`` or ``nn.ModuleDict``, is looked through to its own children).
A candidate's first call runs as it always did, in float32, and decides what it
is: a call that returned tensors only (or tuples, lists, dicts of them) and made
no ``pyro.sample`` statement marks a *network*; anything else (a head that
returns a distribution, a module that samples) marks a container, which keeps
running as written while its own children become candidates. From its next call
on, a network runs under ``torch.autocast(device_type, dtype=torch.bfloat16)``
(the autocast lists of PyTorch decide which of its operations run in bfloat16:
https://pytorch.org/docs/stable/amp.html) and its floating outputs are cast back
to its parameters' dtype, so every distribution, log-density, log-sum-exp and
accumulator outside the networks stays float32. Parameters the
program uses outside a network (``pyro.param`` values, a module's own
``nn.Parameter``\\ s, as in PPCA) stay float32; a network's layers called one by
one from outside it (``MLP.features``) run as written.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn

from ppl_genmodels.traces import TraceError, first_line, log_weights, max_plate_nesting

__all__ = ["Convention", "convention", "Program", "PRECISIONS"]

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

#: the precisions a program's networks run in (``Program.accelerate``, ``--precision``)
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Convention:
    """How one program takes the data and the conditioning.

    ``data``/``condition``: the parameter names that receive x and y (``condition``
    None: the program takes no conditioning); ``positional``: pass ``(x, y)``
    positionally (a program written as ``fn(*args)``); ``data_positional``: x must
    go by position (a positional-only parameter).
    """

    name: str
    data: str | None
    condition: str | None
    positional: bool = False
    data_positional: bool = False

    def call(self, fn: Callable, x, y):
        if self.positional:
            return fn(x, y)
        kwargs = {} if self.condition is None else {self.condition: y}
        if self.data_positional:
            return fn(x, **kwargs)
        kwargs[self.data] = x
        return fn(**kwargs)


def convention(fn: Callable, name: str, data_arg: str | None = None) -> Convention:
    """Read ``fn``'s signature: which argument gets the data, which the conditioning.

    The data goes to ``data_arg`` when it is given, else to the first parameter;
    the conditioning goes to the first other parameter. Any further parameter
    must have a default (the toolkit cannot supply it).
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return Convention(name, None, None, positional=True)
    named = [p for p in params if p.kind not in _VARIADIC]
    if not named:
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
            return Convention(name, None, None, positional=True)
        raise TraceError(f"{name}() takes no arguments; it must take the data as its first argument")
    names = [p.name for p in named]
    if data_arg is not None and data_arg not in names:
        raise TraceError(f"{name}() has no argument {data_arg!r} to receive the data (from --data-arg); "
                         f"its arguments are {', '.join(names)}")
    data = data_arg if data_arg is not None else names[0]
    others = [p for p in named if p.name != data]
    condition = others[0].name if others else None
    for p in others[1:]:
        if p.default is inspect.Parameter.empty:
            raise TraceError(f"{name}() requires the argument {p.name!r}, which the toolkit cannot supply; "
                             f"give it a default (it is called as {name}({data}, {condition}))")
    by_name = {p.name: p for p in named}
    data_positional = by_name[data].kind is inspect.Parameter.POSITIONAL_ONLY
    if condition is not None and by_name[condition].kind is inspect.Parameter.POSITIONAL_ONLY:
        return Convention(name, data, condition, positional=True)
    return Convention(name, data, condition, data_positional=data_positional)


class Program(nn.Module):
    """A model/guide pair called as ``model(x, y)`` / ``guide(x, y)``, whatever its own signatures.

    ``module``: the user's object with ``model`` and ``guide`` methods (an
    ``nn.Module``, a ``PyroModule``, or any object); ``data_arg``: the name of the
    argument that receives the data when it is not the first.
    """

    def __init__(self, module, data_arg: str | None = None):
        super().__init__()
        for method in ("model", "guide"):
            if not callable(getattr(module, method, None)):
                raise TraceError(f"model {type(module).__name__} has no {method}(x) method")
        if isinstance(module, nn.Module):
            self.module = module
        else:
            object.__setattr__(self, "module", module)  # a plain object: not a submodule
        self.pyro_params = nn.ParameterDict()
        self.data_arg = data_arg
        self.conventions = {m: convention(getattr(module, m), f"{type(module).__name__}.{m}", data_arg)
                            for m in ("model", "guide")}
        self._store = {"params": {}, "constraints": {}}
        self._keys: dict[str, str | None] = {}  # store name -> key in pyro_params (None: the module's own)
        self._acceleration = {"precision": "fp32", "compile": False}

    def __getattr__(self, name: str):
        """The module's own attributes (``exact_log_marginal``, ``z_dim``, ...) read through the program."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module", self.__dict__.get("module"))
            if module is None or name.startswith("_"):
                raise
            return getattr(module, name)

    @property
    def conditioned(self) -> bool:
        """Whether the model takes a conditioning argument."""
        return self.conventions["model"].condition is not None or self.conventions["model"].positional

    @property
    def acceleration(self) -> dict:
        """The settings of :meth:`accelerate` in force: ``{"precision": ..., "compile": ...}``."""
        return dict(self._acceleration)

    def accelerate(self, *, precision: str = "fp32", compile: bool = False) -> "Program":
        """Run the program's networks in ``precision`` (``"fp32"`` or ``"bf16"``), and its hot paths compiled or not.

        The networks, how their first call finds them and what runs in bfloat16 are
        described in the module docstring. ``compile=True`` marks the program for the
        compiled hot paths (:mod:`ppl_genmodels.compiled`): the training step, the
        log-weights of a particle chunk and the HMC/AIS log-joint then run as one
        captured, compiled graph each, falling back to the general path where the
        program is not static. Each call replaces the previous settings (the networks
        are found afresh); ``accelerate()`` gives back the program as it was built.
        Only the networks' ``forward`` changes (an instance attribute, in no
        ``state_dict``): parameters, :meth:`state`, checkpoints and ``to(device)``
        are the same whatever the settings. A program with no networks is left as it
        is in bf16, with a warning.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        compile = bool(compile)
        if isinstance(self.module, nn.Module):
            for module in self.module.modules():
                wrapper = module.__dict__.get("forward")
                if isinstance(wrapper, _Network):
                    wrapper.remove()
        self._acceleration = {"precision": precision, "compile": compile}
        if precision == "fp32":
            return self
        networks = _candidates(self.module) if isinstance(self.module, nn.Module) else []
        if not networks:
            warnings.warn(f"model {type(self.module).__name__} has no networks (child modules with parameters) "
                          f"for precision {precision} to act on; it runs as it is")
        for module in networks:
            _Network.install(module, precision)
        return self

    def model(self, x, y=None):
        return self._call("model", x, y)

    def guide(self, x, y=None):
        return self._call("guide", x, y)

    def _call(self, method: str, x, y):
        with pyro.get_param_store().scope(self._store):
            out = self.conventions[method].call(getattr(self.module, method), x, y)
        if len(self._store["params"]) != len(self._keys):
            self._adopt()
        return out

    def _adopt(self) -> None:
        """Make each new ``pyro.param`` value an ``nn.Parameter`` of the program."""
        own = {id(p) for p in self.module.parameters()} if isinstance(self.module, nn.Module) else set()
        params = self._store["params"]
        for name, value in params.items():
            if name in self._keys:
                continue
            if id(value) in own:
                self._keys[name] = None
                continue
            key = f"p{len(self.pyro_params)}"
            parameter = nn.Parameter(value.detach())
            self.pyro_params[key] = parameter
            params[name] = parameter
            self._keys[name] = key

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        for name, key in self._keys.items():  # the store follows its parameters to a new device or dtype
            if key is not None:
                self._store["params"][name] = self.pyro_params[key]
        return result

    @contextlib.contextmanager
    def parameters_detached(self):
        """A block in which every parameter of the program is a detached copy: the same values, no gradient.

        Both kinds are covered: the module's own ``nn.Parameter``\\ s (swapped in each
        submodule, as ``torch.func.functional_call`` does) and the values ``pyro.param``
        returns (swapped in the program's param-store state), so a density computed in
        the block has gradients only through its inputs (e.g. reparameterised latents),
        never to a parameter. Everything is restored when the block ends.
        """
        with self.parameters_replaced(lambda p: p.detach()):
            yield self

    @contextlib.contextmanager
    def parameters_replaced(self, replace: Callable[[torch.Tensor], torch.Tensor], *, buffers: bool = False):
        """A block in which each parameter ``p`` of the program (module and ``pyro.param``) reads as ``replace(p)``.

        ``replace`` is called once per parameter; the same parameter reached twice (a
        module's weight that ``pyro.param`` also returns) gets the same replacement.
        ``buffers=True`` replaces the modules' buffers too. Everything is restored when
        the block ends.
        """
        copies: dict[int, torch.Tensor] = {}

        def replaced(p: torch.Tensor) -> torch.Tensor:
            if id(p) not in copies:
                copies[id(p)] = replace(p)
            return copies[id(p)]

        saved = [(m._parameters, dict(m._parameters)) for m in self.modules()]
        if buffers:
            saved += [(m._buffers, dict(m._buffers)) for m in self.modules()]
        store = dict(self._store["params"])
        for table, original in saved:
            table.update({name: replaced(p) for name, p in original.items() if p is not None})
        self._store["params"] = {name: replaced(p) for name, p in store.items()}
        try:
            with warnings.catch_warnings():  # pyro.module skips (and warns of) replacements without a gradient
                warnings.filterwarnings("ignore", message=".*not registered in the param store because requires_grad")
                yield self
        finally:
            for table, original in saved:
                table.update(original)
            # each call replaces the state's dict; a parameter created inside the block stays
            self._store["params"] = {**self._store["params"], **store}

    def check(self, x, y=None) -> int:
        """Trace the pair on a few datapoints; returns its plate nesting. Contract errors name the site.

        This also creates the parameters ``pyro.param`` declares (before an optimizer
        is built, or a checkpoint loaded).
        """
        name = type(self.module).__name__
        try:
            with torch.no_grad(), pyro.validation_enabled(True), poutine.block():
                log_weights(self.model, self.guide, x, y, num_particles=1, vectorize=False)  # plates, sites
                nesting = max_plate_nesting(self.model, self.guide, x, y)
                log_weights(self.model, self.guide, x, y, num_particles=2, nesting=nesting)  # broadcasting
        except TraceError as err:
            raise TraceError(f"model {name}: {err}") from None
        except Exception as err:
            message = first_line(err, "")
            c = self.conventions["model"]
            hint = "" if c.positional else (
                f"; it was called as {c.name}({c.data}=x" + (f", {c.condition}=y" if c.condition else "")
                + ") with x the data and y the conditioning; if another argument is the data, name it with --data-arg")
            raise TraceError(f"model {name} failed on the data: {type(err).__name__}: {message}{hint}") from None
        return nesting

    def state(self) -> dict:
        """What a checkpoint keeps: the module's state and the values of its ``pyro.param`` sites."""
        module_state = self.module.state_dict() if isinstance(self.module, nn.Module) else {}
        store = {name: self.pyro_params[key].detach() for name, key in self._keys.items() if key is not None}
        return {"model": module_state, "param_store": store}

    def load_state(self, payload: dict) -> None:
        """Restore :meth:`state` (after :meth:`check` has created the ``pyro.param`` sites)."""
        if isinstance(self.module, nn.Module):
            self.module.load_state_dict(payload["model"])
        for name, value in payload.get("param_store", {}).items():
            key = self._keys.get(name)
            if key is None:
                raise TraceError(f"the checkpoint holds the Pyro parameter {name!r}, which the model does not create")
            with torch.no_grad():
                self.pyro_params[key].copy_(value)


def _candidates(module: nn.Module) -> list[nn.Module]:
    """The immediate children of ``module`` that have parameters, looking through those with no ``forward``.

    A child whose class keeps ``nn.Module.forward`` (``nn.ModuleList``, ``nn.ModuleDict``,
    Pyro's conditional transforms) is never called itself: its own children stand in for it.
    """
    found = []
    for child in module.children():
        if next(child.parameters(), None) is None:
            continue
        if type(child).forward is nn.Module.forward:
            found += _candidates(child)
        else:
            found.append(child)
    return found


class _SampleSpy(Messenger):
    """Notes whether any ``pyro.sample`` statement ran inside it; changes nothing."""

    def __init__(self):
        super().__init__()
        self.sampled = False

    def _pyro_sample(self, msg) -> None:
        self.sampled = True


def _tensors_only(out) -> bool:
    """Whether ``out`` is tensors (or None, numbers), possibly in tuples, lists and dicts."""
    if out is None or isinstance(out, (torch.Tensor, bool, int, float)):
        return True
    if isinstance(out, (tuple, list)):
        return all(_tensors_only(v) for v in out)
    if isinstance(out, dict):
        return all(_tensors_only(v) for v in out.values())
    return False


def _cast_floats(out, dtype: torch.dtype):
    """``out`` with every half-precision floating tensor in it cast to ``dtype`` (tuples, lists, dicts rebuilt)."""
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.dtype in (torch.bfloat16, torch.float16) else out
    if isinstance(out, tuple):
        items = [_cast_floats(v, dtype) for v in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # a named tuple, or a tuple
    if isinstance(out, list):
        return type(out)(_cast_floats(v, dtype) for v in out)
    if isinstance(out, dict):
        return type(out)((k, _cast_floats(v, dtype)) for k, v in out.items())
    return out


class _Network:
    """The ``forward`` of one candidate network under :meth:`Program.accelerate` in bfloat16.

    Set as the module's instance attribute ``forward`` (``nn.Module.__call__`` calls
    it, hooks included), so nothing enters the ``state_dict``. ``kind`` is None until
    the first call decides it (see the module docstring); a container gives its
    ``forward`` back and hands the role to its own children.
    """

    def __init__(self, module: nn.Module, precision: str):
        self.module, self.precision = module, precision
        self.previous = module.__dict__.get("forward")  # a forward the user set on the instance, if any
        self.kind: str | None = None

    @classmethod
    def install(cls, module: nn.Module, precision: str) -> None:
        if not isinstance(module.__dict__.get("forward"), cls):
            module.__dict__["forward"] = cls(module, precision)

    def remove(self) -> None:
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.previous

    def eager(self) -> Callable:
        """The module's own ``forward``, bound."""
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    def __call__(self, *args, **kwargs):
        if self.kind is None:
            return self._first(args, kwargs)
        parameter = next(self.module.parameters())
        with torch.autocast(parameter.device.type, dtype=torch.bfloat16):
            out = self.eager()(*args, **kwargs)
        return _cast_floats(out, parameter.dtype)

    def _first(self, args, kwargs):
        """The first call, as written: it decides whether the module is a network or a container."""
        with _SampleSpy() as spy:
            out = self.eager()(*args, **kwargs)
        if spy.sampled or not _tensors_only(out):
            self.kind = "container"
            self.remove()
            for child in _candidates(self.module):
                _Network.install(child, self.precision)
        else:
            self.kind = "network"
        return out
