"""The hot paths of a static program as one compiled graph, with a guard and the general path behind it.

Most model/guide pairs are *static*: given the shapes of their inputs, every call
runs the same sample sites, plates and tensor operations; only the values differ
(every built-in model, and most users'). For such a pair, everything Pyro does in
Python on each call (messengers, traces, plates, distribution objects) computes
nothing new. :class:`Static` runs a function of the program's parameters (the SVI
loss of a minibatch, the log-weights of a particle chunk, the log-joint HMC and
AIS evaluate) once with ``torch.fx``'s ``make_fx`` in fake-tensor mode, Pyro's
handlers and all, and keeps only the tensor operations it recorded: one graph,
which Inductor (``torch.compile``'s compiler, called directly) then turns into
fused kernels, its backward included. Later calls with the same *signature* run
that graph and never enter Pyro.

What makes this safe:

- **Inputs, not constants.** The program's parameters (module and ``pyro.param``,
  swapped in with :meth:`Program.parameters_replaced`) and the per-datapoint
  random streams' state (:meth:`Streams.state`: indices, shared key, particle offset)
  are inputs of the graph, so an optimizer step, a new batch or the next chunk of
  particles need no new capture. A draw from torch's own generator is recorded as
  a random operation and draws afresh on every call.
- **The guard.** A graph is used only for calls with its signature: the shapes,
  dtypes and devices of the inputs, the parameters' names and shapes, grad mode,
  the program's ``training`` flag, the streams' size and draw counter, and a
  caller's ``key`` for any Python value the function reads (a KL weight, a
  particle count). A new signature is captured anew (at most ``max_signatures``
  per :class:`Static`; after that the general path runs).
- **Data-dependent Python fails the capture.** In fake-tensor mode no value
  exists, so a branch on a tensor's value, ``.item()`` or ``.tolist()`` raises,
  and the program runs the general path from then on, with one warning. So does a
  graph that reads a parameter as a constant (a parameter the swap did not reach)
  or writes into one of its constants in place.
- **Falling back.** If Inductor cannot compile the graph, the recorded graph runs
  eagerly (still without Pyro's per-call cost), with one warning.

What a capture cannot see, and a user of a dynamic program should know: Python
state the program reads besides its inputs (a global counter, a random choice in
Python, an attribute changed between calls) is frozen at its captured value.
Such programs should run with ``--compile off``. A signature is captured on its
second call, and not at all while it is rare next to the others (the last, smaller
batch of an epoch): compiling a graph costs seconds, running a call as written
milliseconds. With Pyro's validation on, the first call of each signature runs the
general path, so that Pyro's checks see real values once (as the training loop
validates its first step only); the graph is captured with validation off.
"""

from __future__ import annotations

import inspect
import time
import warnings
import weakref
from typing import Callable, NamedTuple

import pyro
from pyro.infer.util import is_validation_enabled
import torch
from torch import nn

from ppl_genmodels.programs import Program
from ppl_genmodels.traces import first_line

__all__ = ["Captured", "Static", "StaticError", "Traced", "owner", "report", "static_path", "traced_path", "while_loop",
           "RARE"]

#: a signature called fewer than 1/RARE times as often as the most frequent one runs as written, uncompiled
RARE = 8


class StaticError(RuntimeError):
    """A function cannot be captured as one static graph (the reason in one line)."""


def owner(fn: Callable) -> Program | None:
    """The :class:`Program` whose bound ``model``/``guide`` ``fn`` is, or None (a plain function)."""
    program = getattr(fn, "__self__", None)
    return program if isinstance(program, Program) else None


_SHARED: "weakref.WeakKeyDictionary[Program, dict[str, Static | Traced]]" = weakref.WeakKeyDictionary()


def static_path(fn: Callable, model: Callable, label: str, *, inner_grad: bool = False) -> "Static | None":
    """The program's own :class:`Static` of ``fn`` under ``label``, when ``model`` belongs to a compiled program.

    None when ``model`` is not a :class:`Program`'s bound method or its program was not
    marked with ``accelerate(compile=True)``: the caller then runs the general path.
    One :class:`Static` per (program, label) lives as long as the program, so the
    graphs it captured serve every later call (every pass of an evaluation).
    """
    return _program_path(model, label, lambda program: Static(fn, program, label=label, inner_grad=inner_grad))


def _program_path(model: Callable, label: str, build: Callable):
    """The compiled program's path under ``label`` (``build(program)`` the first time), or None."""
    program = owner(model)
    if program is None or not program.acceleration["compile"]:
        return None
    table = _SHARED.setdefault(program, {})
    if label not in table:
        table[label] = build(program)
    return table[label]


def report(model: Callable) -> str | None:
    """One line on the compiled paths of ``model``'s program so far: per path, its graphs and the seconds spent
    capturing and compiling them, or why it runs as written. None when no path of it has compiled anything."""
    program = model if isinstance(model, Program) else owner(model)
    table = _SHARED.get(program, {}) if program is not None else {}
    parts = []
    for label, path in table.items():
        if path.fallback is not None:
            parts.append(f"{label}: as written ({path.fallback})")
        elif path.entries:
            parts.append(f"{label}: {len(path.entries)} graph(s), {path.seconds:.1f} s")
    return "compiled paths (capturing and compiling, counted in the seconds above): " + "; ".join(parts) \
        if parts else None


def _static_key(value):
    """What of an option enters a signature: its ``static_key()`` where it has one, else the value itself.

    A bound method enters as its object's identity and its function, so that a signature
    holds no reference to the program (whose own table of Statics it is part of).
    """
    if value is None or type(value) in (bool, int, float, str):  # most options: themselves, at once
        return value
    key = getattr(value, "static_key", None)
    if callable(key):
        return ("object", type(value).__qualname__, _static_key(key()))
    if isinstance(value, tuple):
        return tuple(_static_key(v) for v in value)
    if inspect.ismethod(value):
        return ("method", id(value.__self__), value.__func__)
    return value


def _describe(value) -> tuple:
    if value is None:
        return ("none",)
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device, value.requires_grad)
    raise TypeError(f"a Static function takes tensors (or None), got {type(value).__name__}")


class _Entry:
    """One signature's graph: captured, then compiled on its first call (or run eagerly)."""

    def __init__(self, graph: torch.fx.GraphModule, exact: bool, draws: int):
        self.graph = graph
        self.exact, self.draws = exact, draws  # what the streams' Python counters did during the capture
        self.run: Callable | None = None
        self._constants: list[torch.Tensor] | None = None

    @property
    def constants(self) -> list[torch.Tensor]:
        """The graph's own constant tensors, in the order of :func:`_constant_names` (found once)."""
        if self._constants is None:
            self._constants = [getattr(self.graph, name) for name in _constant_names(self.graph)]
        return self._constants


class _Lifted(torch.fx.Interpreter):
    """Runs a graph with its constant tensors read from a table instead of from the graph module."""

    def __init__(self, graph: torch.fx.GraphModule, constants: dict):
        super().__init__(graph)
        self.constants = constants

    def get_attr(self, target, args, kwargs):
        return self.constants[target] if target in self.constants else super().get_attr(target, args, kwargs)


class Captured(NamedTuple):
    """A :class:`Static`'s graph of one signature, as a function of tensors to trace inside another function.

    ``captured(parameters, constants, *tensors)`` computes the captured ``fn(*tensors)`` from
    the program's ``parameters`` (its parameters and buffers, in the graph's order, as
    ``parameters`` holds them) and the graph's own constant tensors (``constants``, as
    ``constants`` holds them) as plain tensor operations, so that a graph traced around
    it has no constants of its own: a loop's body reads every tensor as an argument.
    """

    graph: torch.fx.GraphModule
    parameters: list
    constants: list

    def static_key(self):
        """A signature's key: the graph itself (by identity)."""
        return self.graph

    def __call__(self, parameters, constants, *tensors):
        table = dict(zip(_constant_names(self.graph), constants))
        return _Lifted(self.graph, table).run(list(parameters), list(tensors), [])


def _constant_names(graph: torch.fx.GraphModule) -> list[str]:
    """The graph's constant tensors (``get_attr`` nodes), by name, each once, in the order of the graph."""
    return list(dict.fromkeys(n.target for n in graph.graph.nodes
                              if n.op == "get_attr" and isinstance(getattr(graph, n.target, None), torch.Tensor)))


class Static:
    """``fn(*tensors, streams=..., **options)`` of a program's parameters, captured once per signature and compiled.

    ``fn`` runs Pyro code (the program's ``model``/``guide``, an objective, ``log_weights``)
    and returns a tensor or a tuple of tensors; ``streams`` is the per-datapoint
    :class:`~ppl_genmodels.streams.Streams` it draws from (or None: torch's generator).
    ``compile=False`` keeps the recorded graph eager (no Inductor). ``inner_grad=True``
    is for an ``fn`` that takes its own gradients (``torch.autograd.grad``, e.g. a
    log density and its gradient for HMC) and returns values that need none: the
    backward operations are recorded into the graph as plain operations, and the graph
    runs without autograd (its outputs carry no gradient). Otherwise the graph keeps
    ``fn``'s grad-mode blocks (``torch.no_grad`` inside ``fn`` stays in force) and
    gradients flow through it to the parameters. ``label`` names the path in warnings.
    ``seconds`` adds up the time spent capturing and compiling (paid once per signature);
    ``fallback`` holds the reason once the general path has taken over for good. A
    signature is captured on its ``min_calls``-th call (default 2: a shape seen once
    runs as written) unless it is rare (:meth:`_worth_capturing`).
    """

    def __init__(self, fn: Callable, program: Program, *, label: str, compile: bool = True,
                 inner_grad: bool = False, max_signatures: int = 8, min_calls: int = 2):
        if not isinstance(program, Program):
            raise TypeError("Static needs the Program whose parameters the function reads")
        # a weak reference: the program's own Statics (static_path) live in a table keyed weakly by the program
        self._program, self.fn, self.label = weakref.ref(program), fn, label
        self.compile, self.inner_grad, self.max_signatures = bool(compile), bool(inner_grad), int(max_signatures)
        self.min_calls = int(min_calls)
        self.entries: dict[tuple, _Entry] = {}
        self.calls: dict[tuple, int] = {}  # calls of each signature
        self.fallback: str | None = None
        self.seconds = 0.0
        self._named: tuple | None = None  # (modules, their contents' identities, named tensors): see _tensors

    @property
    def program(self) -> Program:
        return self._program()

    # --- the call -------------------------------------------------------------------------------------------

    def __call__(self, *tensors, streams=None, **options):
        """``fn(*tensors, streams=streams, **options)``, from the graph of this signature when there is one.

        ``options``: the Python values ``fn`` reads (a particle count, a KL weight, an
        object with a ``static_key()`` method); part of the signature.
        """
        if self.fallback is not None:
            return self.fn(*tensors, streams=streams, **options)
        named = self._tensors()
        signature = self._signature(named, tensors, streams, options)
        if len(self.calls) > 10 * self.max_signatures:  # shapes that keep changing: start counting afresh
            self.calls.clear()
        self.calls[signature] = self.calls.get(signature, 0) + 1
        entry = self.entries.get(signature)
        if entry is None:
            if not self._worth_capturing(signature):
                return self.fn(*tensors, streams=streams, **options)
            entry = self._new_entry(signature, named, tensors, streams, options)
            if entry is None:
                return self.fn(*tensors, streams=streams, **options)
        return self._run(entry, named, tensors, streams)

    def captured(self, *tensors, **options) -> "Captured | None":
        """The graph of this call's signature (no streams), for a larger graph built around it.

        The signature is captured now if need be, whatever its count of calls. None once
        the general path has taken over.
        """
        if self.fallback is not None:
            return None
        named = self._tensors()
        signature = self._signature(named, tensors, None, options)
        entry = self.entries.get(signature) or self._new_entry(signature, named, tensors, None, options)
        if entry is None:
            return None
        return Captured(entry.graph, [p for _, p in named], entry.constants)

    def _new_entry(self, signature, named, tensors, streams, options) -> "_Entry | None":
        """Capture a new signature; None (and the general path from now on) when that cannot be done."""
        if len(self.entries) >= self.max_signatures:
            self._give_up(f"more than {self.max_signatures} different signatures (shapes or settings)")
            return None
        began = time.perf_counter()
        try:
            with pyro.validation_enabled(False):  # the checks look at values, which a capture does not have
                entry = self._capture(named, tensors, streams, options)
        except Exception as err:  # anything the capture cannot take: the general path, for good
            self._give_up(_reason(err))
            return None
        finally:
            self.seconds += time.perf_counter() - began
        self.entries[signature] = entry
        return entry

    def _worth_capturing(self, signature) -> bool:
        """Capture a signature once it has come ``min_calls`` times, unless it is rare.

        Rare means fewer calls than 1/``RARE`` of the most frequent signature's: the last,
        smaller batch of every epoch, the last particle chunk of every pass. Those run as
        written, which costs less than compiling one more graph. With Pyro's validation on,
        the first call of a signature always runs as written, so that Pyro's checks see
        real values once (the training loop validates its first step only).
        """
        calls = self.calls[signature]
        needed = max(self.min_calls, 2 if is_validation_enabled() else 1)
        return calls >= needed and calls * RARE >= max(self.calls.values())

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The program's parameters and buffers, by name: inputs of every graph.

        Walking the module tree costs about 75 us a call (generators over every module),
        as much as a small graph's kernels; the result is kept with the identities of what
        every module holds, and found afresh the moment any parameter, buffer or submodule
        is replaced, added or removed. The kept list holds the tensors, so their identities
        cannot be reused by new objects while it is kept.
        """
        if self._named is not None:
            refs, contents, named = self._named
            modules = [ref() for ref in refs]
            if None not in modules and _contents(modules) == contents:
                return named
        program = self.program
        named = [*program.named_parameters(), *(("buffer:" + n, b) for n, b in program.named_buffers())]
        modules = [m for _, m in program.named_modules(remove_duplicate=False)]
        # the modules weakly (the program among them must stay free to go: static_path's table is weak);
        # a module that went away invalidates the list, so no identity in it is ever reused
        self._named = ([weakref.ref(m) for m in modules], _contents(modules), named)
        return named

    def _signature(self, named, tensors, streams, options) -> tuple:
        params = tuple((name, tuple(p.shape), p.dtype, p.device, p.requires_grad) for name, p in named)
        stream = None if streams is None else (len(streams), streams.index.device, streams._draws)
        settings = tuple(sorted((name, _static_key(value)) for name, value in options.items()))
        return (tuple(_describe(t) for t in tensors), params, stream, settings,
                torch.is_grad_enabled() and not self.inner_grad,
                torch.is_inference_mode_enabled(), self.program.training,
                tuple(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")))  # no argument: CUDA's only

    def _give_up(self, reason: str) -> None:
        _give_up(self, reason)

    # --- capture --------------------------------------------------------------------------------------------

    def _capture(self, named, tensors, streams, options) -> _Entry:
        from torch.fx.experimental.proxy_tensor import make_fx

        originals = [p for _, p in named]
        seen: dict = {}

        def flat(params, inputs, state):
            by_id = {id(p): value for p, value in zip(originals, params)}
            proxy = None if streams is None else streams.with_state(*state)
            with self.program.parameters_replaced(lambda p: by_id.get(id(p), p), buffers=True):
                out = self.fn(*inputs, streams=proxy, **options)
            if proxy is not None:
                seen.update(exact=proxy.exact, draws=proxy._draws - streams._draws)
            return out

        state = () if streams is None else streams.state()
        # A graph that gradients flow through is traced above autograd ("pre-dispatch"), which records grad-mode
        # changes (no_grad blocks) as nodes but not autocast; every other graph is traced below autograd and
        # autocast, so that an fn's own backward operations and bfloat16 casts enter the graph as operations.
        differentiable = torch.is_grad_enabled() and not self.inner_grad
        if differentiable and self.program.acceleration["precision"] != "fp32":
            raise StaticError(f"{self.program.acceleration['precision']} networks run under autocast, which a "
                              "differentiable graph does not record")
        graph = make_fx(flat, tracing_mode="fake", pre_dispatch=differentiable)(originals, list(tensors),
                                                                                  list(state))
        _check_constants(graph, originals)
        if self.compile:
            _use_onednn(graph)
        return _Entry(graph, seen.get("exact", True), seen.get("draws", 0))

    # --- run ------------------------------------------------------------------------------------------------

    def _run(self, entry: _Entry, named, tensors, streams):
        args = ([p for _, p in named], list(tensors), [] if streams is None else list(streams.state()))
        if self.inner_grad:
            with torch.no_grad():
                return self._call(entry, args, streams)
        return self._call(entry, args, streams)

    def _call(self, entry: _Entry, args, streams):
        if entry.run is None:
            out, seconds, _ = _first_call(entry, args, self.compile, self.label)
            self.seconds += seconds
            return self._after(entry, streams, out)
        return self._after(entry, streams, entry.run(*args))

    @staticmethod
    def _after(entry: _Entry, streams, out):
        if streams is not None:
            streams.exact = streams.exact and entry.exact
            streams._draws += entry.draws
        return out


def _give_up(path: "Static | Traced", reason: str) -> None:
    """The general path for good, for ``path``'s program: its graphs dropped, the reason in one warning."""
    path.fallback = reason
    path.entries.clear()
    warnings.warn(f"{path.label}: the compiled path is off for this program ({reason}); it runs as written",
                  stacklevel=4)


def _first_call(entry: _Entry, args, compile: bool, label: str) -> tuple:
    """Run ``entry`` for the first time, compiled by Inductor when ``compile`` (eagerly, with a warning, where
    that fails); its ``run`` is set for the later calls. Returns (outputs, seconds spent compiling, whether
    Inductor failed)."""
    entry.run = entry.graph
    if not compile:
        return entry.run(*args), 0.0, False
    began = time.perf_counter()
    try:
        with warnings.catch_warnings():  # deprecations inside Inductor's own lowerings are not the user's
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
            compiled = _inductor(entry.graph, args)
            out = compiled(*args)
        entry.run = compiled
        return out, time.perf_counter() - began, False
    except Exception as err:
        warnings.warn(f"{label}: compiling failed ({type(err).__name__}: {first_line(err, '')}); the captured "
                      "graph runs eagerly", stacklevel=4)
    seconds = time.perf_counter() - began
    return entry.run(*args), seconds, True


# --- functions built around captured graphs ---------------------------------------------------------------------


def while_loop(cond: Callable, body: Callable, carried: tuple, constants: tuple = ()) -> tuple:
    """``carried = body(*carried, *constants)`` while ``cond(*carried, *constants)``, as one loop of a graph.

    torch's ``while_loop`` operator: traced by :class:`Traced`, the whole loop is one node
    of the graph, its condition and body subgraphs, whatever the number of iterations
    (a tensor among ``carried`` or ``constants``). ``cond`` returns a 0-dim bool tensor;
    ``body`` returns tensors of the shapes and dtypes of ``carried``. Both read tensors
    only through their arguments: a tensor they reach otherwise would be traced as a
    constant of the graph (which :class:`Traced` refuses).
    """
    from torch._higher_order_ops.while_loop import while_loop_op

    return tuple(while_loop_op(cond, body, tuple(carried), tuple(constants)))


class Traced:
    """``fn(parameters, *tensors, **options)`` traced once per signature into one graph, compiled by Inductor.

    For functions of tensors built around captured graphs (``Static.captured``) and plain
    tensor operations, with loops as :func:`while_loop`: no Pyro runs inside (its code,
    whose gradients a graph of plain operations cannot take, is in the captured graphs).
    The graph runs without autograd. The signature is the inputs' shapes, dtypes and
    devices and ``options`` (a captured graph among them, by identity); at most
    ``max_signatures`` of them. A call returns None where the function cannot be traced
    (the reason in one warning, and None from then on): the caller runs its general path.
    """

    def __init__(self, fn: Callable, *, label: str, compile: bool = True, max_signatures: int = 8):
        self.fn, self.label, self.compile, self.max_signatures = fn, label, bool(compile), int(max_signatures)
        self.entries: dict[tuple, _Entry] = {}
        self.fallback: str | None = None
        self.seconds = 0.0

    def __call__(self, parameters: list[torch.Tensor], *tensors, **options):
        if self.fallback is not None:
            return None
        signature = (tuple(_describe(p) for p in parameters), tuple(_describe(t) for t in tensors),
                     tuple(sorted((name, _static_key(value)) for name, value in options.items())))
        args = (list(parameters), list(tensors), [])
        entry = self.entries.get(signature)
        if entry is None:
            if len(self.entries) >= self.max_signatures:
                return self._give_up(f"more than {self.max_signatures} different signatures (shapes or settings)")
            began = time.perf_counter()
            try:
                entry = self.entries[signature] = self._trace(args, options)
            except Exception as err:
                return self._give_up(_reason(err))
            finally:
                self.seconds += time.perf_counter() - began
        with torch.no_grad():
            if entry.run is None:
                out, seconds, failed = _first_call(entry, args, self.compile, self.label)
                self.seconds += seconds
                if failed:
                    # Inductor failed (warned): a traced loop run eagerly is no faster than its caller's general
                    # path, which has compiled pieces of its own, so the caller takes over after this call
                    self.fallback = "compiling failed"
                    self.entries.clear()
                return out
            return entry.run(*args)

    def _trace(self, args, options) -> _Entry:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.fx.experimental.proxy_tensor import make_fx

        def flat(params, inputs, state):
            return self.fn(params, *inputs, **options)

        with torch.no_grad():
            graph = make_fx(flat, tracing_mode="fake")(*args)
        # a tensor of the trace (a fake tensor) held as a constant: a loop body reached an input not through its
        # arguments, and the graph would keep the value it had while tracing. The program's own constants are real.
        for module in graph.modules():  # the loops' subgraphs too
            if isinstance(module, torch.fx.GraphModule):
                for node in module.graph.nodes:
                    if node.op == "get_attr" and isinstance(getattr(module, node.target, None), FakeTensor):
                        raise StaticError(f"it reads a tensor it was not given ({node.target}): a loop body reads "
                                          "tensors only through its arguments")
        return _Entry(graph, True, 0)

    def _give_up(self, reason: str) -> None:
        _give_up(self, reason)


def traced_path(fn: Callable, model: Callable, label: str) -> "Traced | None":
    """The program's own :class:`Traced` of ``fn`` under ``label`` (as :func:`static_path`), or None."""
    return _program_path(model, label, lambda program: Traced(fn, label=label))


# --- the inverse normal CDF in operations Inductor vectorizes ---------------------------------------------------
#
# The streams' normals are the inverse CDF of 53-bit uniforms (torch.special.ndtri in float64, then float32).
# Inductor compiles ndtri as a scalar call per element: 1.75 ms for the 200,000 normals of one IWAE particle
# chunk on this project's CPU, a fifth of the chunk. A compiled graph computes them instead with P. J.
# Acklam's rational approximation of the inverse normal CDF ("An algorithm for computing the inverse normal
# cumulative distribution function", 2003; relative error below 1.15e-9): a rational function of
# (p - 1/2)^2 for 0.02425 <= p <= 1 - 0.02425, and of sqrt(-2 log p) (or of 1 - p) in the tails, all
# elementwise operations that vectorize (0.21 ms for the same chunk). In float64 its error is below
# float32's resolution, so a draw is the general path's float32 value or one of its two neighbours (a
# difference of one unit in the last place, in about 1% of draws): the float32 rounding within which a
# compiled path agrees with the general one. The general path keeps torch.special.ndtri.

_ACKLAM_A = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
             -3.066479806614716e+01, 2.506628277459239e+00)
_ACKLAM_B = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
             -1.328068155288572e+01, 1.0)
_ACKLAM_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
             4.374664141464968e+00, 2.938163982698783e+00)
_ACKLAM_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00, 1.0)
_ACKLAM_LOW = 0.02425


def _polynomial(coefficients: tuple, x: torch.Tensor) -> torch.Tensor:
    """Horner's rule, highest power first."""
    out = coefficients[0] * x + coefficients[1]
    for c in coefficients[2:]:
        out = out * x + c
    return out


def fast_ndtri(p: torch.Tensor) -> torch.Tensor:
    """The standard normal quantile of values in (0, 1], by Acklam's approximation (float64 in, out).

    Relative error below 1.15e-9: after rounding to float32 it is ``torch.special.ndtri``'s
    value or a neighbour (and infinite at 1, as ndtri is).
    """
    q = p - 0.5
    r = q * q
    central = q * _polynomial(_ACKLAM_A, r) / _polynomial(_ACKLAM_B, r)
    s = torch.sqrt(-2.0 * torch.log(torch.minimum(p, 1 - p)))
    # s is infinite at p = 1 (the streams' largest uniform, 1 - 2^-54, rounds to 1): ndtri's infinity there
    tail = torch.where(s == torch.inf, -s, _polynomial(_ACKLAM_C, s) / _polynomial(_ACKLAM_D, s))  # lower tail
    tails = (p < _ACKLAM_LOW) | (p > 1 - _ACKLAM_LOW)
    return torch.where(tails, torch.where(q < 0, tail, -tail), central)


def _vectorize_ndtri(graph: torch.fx.GraphModule) -> int:
    """Replace the graph's float64 ndtri calls by :func:`fast_ndtri`; returns how many."""
    replaced = 0
    for node in list(graph.graph.nodes):
        value = node.meta.get("val")
        if node.op == "call_function" and node.target is torch.ops.aten.special_ndtri.default and \
                isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            with graph.graph.inserting_before(node):
                _swap(graph, node, graph.graph.call_function(fast_ndtri, tuple(node.args)))
            replaced += 1
    if replaced:
        graph.recompile()
    return replaced


_WHILE_LOOP = "torch.ops.higher_order.while_loop"  # the operator's name as Inductor's cache check spells it


def _inductor(graph: torch.fx.GraphModule, args) -> Callable:
    """``graph`` compiled by Inductor (its backward through AOTAutograd), called with the same nested arguments.

    The graph goes to Inductor directly (``torch._inductor.compile``), not through
    ``torch.compile``: TorchDynamo would trace the graph's code once more and check its
    own guards on every call (40-100 us a call in the SVI step, against 1-3 ms of
    work), and a :class:`Static` already checks a signature before it picks a graph.
    The graph itself is kept as it is, to run eagerly if this fails.
    """
    from torch._guards import TracingContext, tracing
    from torch._inductor import compile as inductor_compile, config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    nested = graph.graph._codegen  # make_fx's: flattens the (parameters, inputs, state) lists, rebuilds the output
    flat = torch.fx.Graph()  # a copy (Inductor may rewrite what it gets) with plain inputs and outputs
    flat.output(flat.graph_copy(graph.graph, {}))
    # example inputs as fake tensors of a mode with a shape environment, as TorchDynamo hands them over: the
    # key of Inductor's on-disk caches is made from them (without one it compiles afresh in every process)
    inputs = list(nested.process_inputs(*args))
    fake = FakeTensorMode(shape_env=ShapeEnv())
    example = [fake.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in inputs]
    flat_module = torch.fx.GraphModule(graph, flat)
    _vectorize_ndtri(flat_module)
    # Inductor's on-disk cache skips graphs with a loop (torch's while_loop operator, not marked cacheable in
    # this torch). Its key is made from the pickled graph module, the loop's subgraphs' code included, so a
    # changed loop body is a different key: marked cacheable here (keyed by torch's version), such a graph
    # compiles once per machine, not once per process.
    cacheable = {**inductor_config.unsafe_marked_cacheable_functions, _WHILE_LOOP: torch.__version__}
    with tracing(TracingContext(fake)), inductor_config.patch(unsafe_marked_cacheable_functions=cacheable):
        compiled = inductor_compile(flat_module, example)
    # the three lists flattened by hand, where that is what the pytree flattening gives (it skips the Nones)
    direct = [a for group in args for a in group if a is not None]
    if len(direct) == len(inputs) and all(a is b for a, b in zip(direct, inputs)):
        def run(*call_args):
            return nested.process_outputs(compiled(*[a for group in call_args for a in group if a is not None]))
    else:
        def run(*call_args):
            return nested.process_outputs(compiled(*nested.process_inputs(*call_args)))

    return run


def _contents(modules: list[nn.Module]) -> list[int]:
    """The identities of the parameters, buffers and submodules every module of ``modules`` holds, in order."""
    return [id(v) for m in modules for table in (m._parameters, m._buffers, m._modules) for v in table.values()]


# --- matrix products on the CPU through oneDNN ----------------------------------------------------------------
#
# On this project's CPU (AMD EPYC, AVX-512) ATen's float32 matrix product (MKL) ran the
# shapes of a VAE's layers at 175-205 GFLOP/s, and oneDNN's linear kernel, given the
# weight as a transposed view, at 420-480 GFLOP/s, to float32 rounding (relative error
# under 1e-6 against float64): MKL does not take its AVX-512 path on AMD processors.
# A captured graph therefore runs its float32 CPU products through oneDNN. The two
# operators below carry their own gradients, so a training graph differentiates them
# with the same kernel.

_LINEAR = torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None

# Declared with torch.library's low-level registration: a call costs about 4 us over the kernel's own,
# against about 30 us through torch.library.custom_op's wrappers (11 products per SVI step).
_LIBRARY = torch.library.Library("ppl_genmodels", "DEF")
_LIBRARY.define("mm(Tensor a, Tensor b) -> Tensor")
_LIBRARY.define("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")


def _mm_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _LINEAR(a, b.t(), None, "none", [], "")  # oneDNN takes the weight [out, in]: b transposed, a view


def _linear_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _LINEAR(x, weight, bias, "none", [], "")


_LIBRARY.impl("mm", _mm_kernel, "CPU")
_LIBRARY.impl("linear", _linear_kernel, "CPU")


@torch.library.register_fake("ppl_genmodels::mm")
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


@torch.library.register_fake("ppl_genmodels::linear")
def _(x, weight, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D float32 CPU tensors, by oneDNN (differentiable)."""
    return torch.ops.ppl_genmodels.mm.default(a, b)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (x of any leading shape) for float32 CPU tensors, by oneDNN (differentiable)."""
    return torch.ops.ppl_genmodels.linear.default(x, weight, bias)


def _mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad
    # the transposed left operand made contiguous here, where a compiled backward can fuse the copy (_contiguous)
    return onednn_mm(grad, b.t()) if need_a else None, onednn_mm(a.t().contiguous(), grad) if need_b else None


def _linear_setup(ctx, inputs, output):
    x, weight, *bias = inputs  # the bias is absent when the call left it out
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bool(bias) and bias[0] is not None


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias = (tuple(ctx.needs_input_grad) + (False,))[:3]
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    grad_x = onednn_mm(g2, weight).reshape(x.shape) if need_x else None  # not for the data at the first layer
    grad_weight = onednn_mm(g2.t().contiguous(), x2) if need_weight else None  # as in _mm_backward
    return grad_x, grad_weight, g2.sum(0) if ctx.has_bias and need_bias else None


torch.library.register_autograd("ppl_genmodels::mm", _mm_backward, setup_context=_mm_setup)
torch.library.register_autograd("ppl_genmodels::linear", _linear_backward, setup_context=_linear_setup)


def _cpu_float32(node) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype == torch.float32


def _use_onednn(graph: torch.fx.GraphModule) -> int:
    """Run the graph's float32 CPU matrix products through oneDNN; returns how many were replaced."""
    if _LINEAR is None:
        return 0
    replaced = 0
    ops = torch.ops.aten
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or not all(_cpu_float32(a) for a in node.args[:3] if a is not None):
            continue
        with graph.graph.inserting_before(node):
            if node.target is ops.linear.default and len(node.args) >= 2 and not node.kwargs:
                new = graph.graph.call_function(torch.ops.ppl_genmodels.linear.default, tuple(node.args[:3]))
            elif node.target is ops.mm.default and not node.kwargs:
                a, b = node.args
                if not a.meta["val"].is_contiguous():  # a transposed view (a weight's gradient): see _contiguous
                    a = _contiguous(graph, a)
                new = graph.graph.call_function(torch.ops.ppl_genmodels.mm.default, (a, b))
            elif node.target is ops.addmm.default and len(node.args) == 3 and not node.kwargs:
                product = graph.graph.call_function(torch.ops.ppl_genmodels.mm.default, tuple(node.args[1:]))
                new = graph.graph.call_function(ops.add.Tensor, (product, node.args[0]))
            else:
                continue
        _swap(graph, node, new)
        replaced += 1
    if replaced:
        graph.recompile()
    return replaced


def _swap(graph: torch.fx.GraphModule, node: torch.fx.Node, new: torch.fx.Node) -> None:
    """Put ``new`` in ``node``'s place (its metadata and its uses); ``node`` leaves the graph."""
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.graph.erase_node(node)


def _contiguous(graph: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """A contiguous copy of ``node`` in the graph, inserted where the graph's insertion point is.

    oneDNN copies a transposed left operand into a contiguous buffer before its product, a
    pass of its own over the data; as a copy in the graph, Inductor writes that layout
    directly from the kernel that produces the operand (the training step: 8% faster).
    """
    copy = graph.graph.call_function(torch.ops.aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
    copy.meta = {"val": node.meta["val"].clone(memory_format=torch.contiguous_format)}
    return copy


def _data_dependent() -> tuple[type, ...]:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException


def _reason(err: Exception) -> str:
    """Why a capture failed, in one line."""
    if isinstance(err, _data_dependent()):
        return ("its Python depends on the values of tensors, data-dependent: a branch on a value, .item(), "
                ".tolist() or a shape computed from values")
    if "convert all Tensors to FakeTensors" in str(err):
        return ("it reads a tensor held outside the program (neither an input nor one of the program's "
                "parameters or buffers)")
    return f"{type(err).__name__}: {first_line(err, '')}"


def _check_constants(graph: torch.fx.GraphModule, parameters: list[torch.Tensor]) -> None:
    """Refuse a graph that reads a parameter as a constant, or writes into one of its constants."""
    storages = {p.untyped_storage().data_ptr() for p in parameters if p.device.type != "meta"}
    constants = set()
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(graph, node.target, None)
        if not isinstance(value, torch.Tensor):
            continue
        constants.add(node)
        if isinstance(value, nn.Parameter) or value.requires_grad or \
                value.numel() and value.untyped_storage().data_ptr() in storages:
            raise StaticError(f"a parameter is read as a constant ({node.target}): it is not reachable from the "
                              "program's parameters")
    for node in graph.graph.nodes:
        target = getattr(node.target, "_schema", None)
        if node.op == "call_function" and target is not None and target.is_mutable and node.args \
                and node.args[0] in constants:
            raise StaticError(f"the program writes into a tensor it holds ({node.args[0].target}) in place")
