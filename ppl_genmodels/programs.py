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
from torch import nn

from ppl_genmodels.traces import TraceError, first_line, log_weights, max_plate_nesting

__all__ = ["Convention", "convention", "Program"]

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


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
        copies: dict[int, torch.Tensor] = {}

        def detached(p: torch.Tensor) -> torch.Tensor:
            if id(p) not in copies:
                copies[id(p)] = p.detach()
            return copies[id(p)]

        saved = [(m._parameters, dict(m._parameters)) for m in self.modules()]
        store = dict(self._store["params"])
        for table, original in saved:
            table.update({name: detached(p) for name, p in original.items() if p is not None})
        self._store["params"] = {name: detached(p) for name, p in store.items()}
        try:
            with warnings.catch_warnings():  # pyro.module skips (and warns of) the detached copies: as meant here
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
