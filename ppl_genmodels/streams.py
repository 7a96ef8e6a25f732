"""Random streams per datapoint: the draws for datapoint i depend on (seed, purpose, i) alone.

Pyro programs draw from torch's one global generator, so the particles a
datapoint gets depend on which other datapoints share its batch, on the batch
size and on how the data are split between processes. :class:`Streams` removes
that dependence with a counter-based generator (Salmon et al. 2011, "Parallel
random numbers: as easy as 1, 2, 3"; the scheme JAX's keys follow): every
random number is a pure function

    u = mix(key(seed, purpose, datapoint index, site, draw) + element counter)

where ``mix`` is the SplitMix64 finaliser (Steele, Lea & Flood 2014,
"Fast splittable pseudorandom number generators"), a bijection of 64-bit
integers that passes BigCrush when applied to a counter. Uniforms take the
top 53 bits, normals are the inverse normal CDF of a uniform, Bernoulli draws
compare a uniform with p. The element counter of a draw is its position
inside the datapoint's own slice, the particle plate's dimension numbered from
the current ``particle_offset``, so the same particle gets the same numbers
whether k particles come in one chunk or in many.

:meth:`Streams.draws` applies this to a Pyro program: a messenger that draws
every latent sample site inside ``pyro.plate("data")`` (Pyro's own
distributions, called as Pyro calls them) with the random functions of torch
routed to the streams while that one site is drawn. Draws a stream cannot place
(a random function other than the normal, uniform and Bernoulli ones, or a draw
whose shape lacks the data plate's dimension) come from torch's global
generator, and ``exact`` turns False, so a caller can say the result is not
independent of the batch layout. Sites outside the data plate (global latents)
use one shared stream, the same in every process.

:meth:`Streams.normal` and :meth:`Streams.uniform` serve samplers that draw
outside Pyro (HMC momenta, Metropolis uniforms): each call is a new draw,
numbered per ``Streams`` object, so all datapoints of a batch, which go through
the same calls in the same order, get numbers that do not depend on the batch.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager

import torch
from pyro.poutine.messenger import Messenger
from torch.overrides import TorchFunctionMode

__all__ = ["Streams", "mix", "stable_hash"]

_MASK64 = 1 << 64


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as torch's int64."""
    value %= _MASK64
    return value - _MASK64 if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
#: the data plate and the particle plate, as named by ppl_genmodels.traces (not imported: a ground-floor peer)
DATA_PLATE = "data"
PARTICLE_PLATE = "particles"


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser of int64 values (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _M1
    z = (z ^ _shift_right(z, 27)) * _M2
    return z ^ _shift_right(z, 31)


def _mix_int(value: int) -> int:
    """:func:`mix` of one Python integer, in plain integer arithmetic (the same bits as the tensor version)."""
    z = (value + _GOLDEN) % _MASK64
    z = ((z ^ (z >> 30)) * _M1) % _MASK64
    z = ((z ^ (z >> 27)) * _M2) % _MASK64
    return _signed(z ^ (z >> 31))


def stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode())


def _uniform53(z: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms in (0, 1) from the top 53 bits of mixed int64 values."""
    return (_shift_right(z, 11).double() + 0.5) * (2.0**-53)


def _open_unit(u: torch.Tensor, dtype) -> torch.Tensor:
    """Float64 uniforms in (0, 1) as ``dtype``, still inside (0, 1): float32 would round 1 - 2^-54 up to 1."""
    out = u.to(dtype)
    if dtype == torch.float64 or not out.is_floating_point():
        return out
    below_one = float(torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)))
    return out.clamp(min=torch.finfo(dtype).tiny, max=below_one)


class Streams:
    """One random stream per datapoint, keyed by (``seed``, ``purpose``, the datapoint's ``index``).

    ``index`` is the datapoints' indices ``[batch]`` (rows of the split: the same datapoint
    has the same index whatever batch or process it is in). ``purpose`` separates
    uses of one seed (training epochs, evaluation, AIS, ...). ``particle_offset`` is the
    number of the first particle of the particle plate in the next draws (a caller that
    streams particles in chunks advances it).
    """

    def __init__(self, seed: int, index, purpose: str = "", *, device=None):
        index = torch.as_tensor(index, dtype=torch.int64)
        self.seed, self.purpose = int(seed), str(purpose)
        self.index = index.to(device) if device is not None else index
        self.base = _mix_int(_mix_int(self.seed) ^ stable_hash(self.purpose))
        self.base_key = torch.full((), self.base, dtype=torch.int64, device=self.index.device)
        self._keys: torch.Tensor | None = None
        self.particle_offset = 0
        self.exact = True
        self._draws = 0

    @property
    def keys(self) -> torch.Tensor:
        """Every datapoint's key ``[batch]``, mixed from its index and the shared key when first needed.

        Not at construction: the training loop makes new streams for every minibatch, and a
        compiled step mixes the keys inside its graph (from :meth:`state`), where it costs
        nothing next to the 12 small eager operations it would take here.
        """
        if self._keys is None:
            self._keys = mix(self.index ^ self.base_key)
        return self._keys

    # --- the state a captured graph takes as inputs (ppl_genmodels.compiled) -----------------------------------

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors every draw is computed from: the indices, the shared key and the particle offset."""
        offset = torch.tensor(self.particle_offset, dtype=torch.int64)
        return self.index, self.base_key, offset

    def with_state(self, index: torch.Tensor, base_key: torch.Tensor, offset: torch.Tensor) -> "Streams":
        """A copy whose draws are computed from these tensors instead (graph inputs while a graph is captured).

        Python-side counters (``exact``, the draw counter) start as this object's; a caller
        copies them back after the draws.
        """
        copy = object.__new__(Streams)
        copy.__dict__.update(self.__dict__)
        copy.index, copy.base_key, copy.particle_offset, copy._keys = index, base_key, offset, None
        return copy

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def subset(self, rows, *, device=None) -> "Streams":
        """The streams of some of the datapoints (``rows``: a slice or indices), as fresh streams."""
        return Streams(self.seed, self.index[rows], self.purpose, device=device or self.index.device)

    def child(self, purpose: str) -> "Streams":
        """Independent streams for the same datapoints, for another purpose."""
        return Streams(self.seed, self.index, f"{self.purpose}/{purpose}", device=self.index.device)

    # --- draws outside Pyro -------------------------------------------------------------------------------------

    def _next_tag(self) -> int:
        self._draws += 1
        return self._draws

    def _bits(self, shape, data_dim: int | None, tag: int, particle_dim: int | None = None) -> torch.Tensor:
        """Mixed int64 values of a draw of ``shape``: datapoint keys along ``data_dim``, counters elsewhere."""
        shape = torch.Size(shape)
        device = self.index.device
        draw = _mix_int(tag)
        if data_dim is None:
            keys = self.base_key
        else:
            data_dim %= len(shape)
            if shape[data_dim] != len(self):
                raise ValueError(f"a draw of shape {tuple(shape)} has {shape[data_dim]} datapoints along dim "
                                 f"{data_dim}, but the streams hold {len(self)}")
            view = [1] * len(shape)
            view[data_dim] = len(self)
            keys = self.keys.reshape(view)
        particle_dim = None if particle_dim is None else particle_dim % len(shape)
        counter = torch.zeros((), dtype=torch.int64, device=device)
        stride = 1
        for dim in reversed(range(len(shape))):
            if dim == data_dim:
                continue
            steps = torch.arange(shape[dim], dtype=torch.int64, device=device)
            if dim == particle_dim:
                steps = steps + self.particle_offset
            view = [1] * len(shape)
            view[dim] = shape[dim]
            counter = counter + steps.reshape(view) * stride
            stride *= shape[dim] if dim != particle_dim else (1 << 20)  # room for 2^20 particles per draw
        return mix(mix(keys ^ draw) + counter).expand(shape)

    def uniform(self, shape, *, data_dim: int | None = 1, dtype=torch.float32, particle_dim: int | None = None,
                tag: int | None = None) -> torch.Tensor:
        """Uniforms in (0, 1) of ``shape`` whose slice along ``data_dim`` comes from each datapoint's stream."""
        tag = self._next_tag() if tag is None else tag
        return _open_unit(_uniform53(self._bits(shape, data_dim, tag, particle_dim)), dtype)

    def normal(self, shape, *, data_dim: int | None = 1, dtype=torch.float32, particle_dim: int | None = None,
               tag: int | None = None) -> torch.Tensor:
        """Standard normals of ``shape``, per datapoint along ``data_dim`` (inverse CDF of 53-bit uniforms)."""
        tag = self._next_tag() if tag is None else tag
        return torch.special.ndtri(_uniform53(self._bits(shape, data_dim, tag, particle_dim))).to(dtype)

    # --- draws inside Pyro ----------------------------------------------------------------------------------------

    @contextmanager
    def draws(self):
        """Every latent Pyro sample site drawn inside this block takes its numbers from the streams."""
        with _StreamsMessenger(self):
            yield self


class _StreamsMessenger(Messenger):
    """Draws unobserved sample sites with torch's random functions routed to the streams."""

    def __init__(self, streams: Streams):
        super().__init__()
        self.streams = streams
        self.calls: dict[str, int] = {}

    def _process_message(self, msg) -> None:
        if (msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None or msg["done"]
                or msg["infer"].get("enumerate")):
            return
        call = self.calls.get(msg["name"], 0)
        self.calls[msg["name"]] = call + 1
        frames = {frame.name: frame for frame in msg["cond_indep_stack"]}
        site_tag = stable_hash(msg["name"]) * 1_000_003 + call * 131
        event = len(getattr(msg["fn"], "event_shape", ()))
        data = frames.get(DATA_PLATE)
        particles = frames.get(PARTICLE_PLATE)
        mode = _RoutedDraws(self.streams, site_tag, event, None if data is None else data.dim,
                            None if particles is None else particles.dim)
        with mode:
            msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])
        msg["done"] = True


def _out_shape(args, kwargs):
    size = kwargs.get("size")
    if size is None:
        size = args
        if len(size) == 1 and not isinstance(size[0], int):
            size = size[0]
    return torch.Size(size)


class _RoutedDraws(TorchFunctionMode):
    """While one site is drawn: torch's normal, uniform and Bernoulli draws come from the streams."""

    FALLBACK = {torch.multinomial, torch.poisson, torch.randint, torch.randperm, torch.binomial,
                torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
                torch.Tensor.random_, torch._standard_gamma, torch._sample_dirichlet,
                # the forms of the routed functions that are not routed (scalar mean and std, a size, *_like)
                torch.normal, torch.bernoulli, torch.rand_like, torch.randn_like, torch.randint_like,
                torch.Tensor.bernoulli_}

    def __init__(self, streams: Streams, site_tag: int, event: int, data_dim, particle_dim):
        super().__init__()
        self.streams, self.site_tag, self.event = streams, site_tag, event
        self.data_dim, self.particle_dim = data_dim, particle_dim
        self.ops = 0

    def _dims(self, shape):
        """Positions of the data and particle dims in a draw of ``shape`` (batch dims right-aligned before the event)."""
        if self.data_dim is None:
            return None, None
        data = len(shape) - self.event + self.data_dim
        if data < 0 or shape[data] != len(self.streams):
            return False, None
        particle = None if self.particle_dim is None else len(shape) - self.event + self.particle_dim
        return data, (particle if particle is not None and particle >= 0 else None)

    def _uniform(self, shape, dtype, device) -> torch.Tensor | None:
        data, particle = self._dims(shape)
        if data is False:
            return None
        self.ops += 1
        bits = self.streams._bits(shape, data, self.site_tag + self.ops, particle)
        return _open_unit(_uniform53(bits), dtype).to(device=device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        routed = self._route(func, args, kwargs)
        if routed is not NotImplemented:
            return routed
        if func in self.FALLBACK:
            self.streams.exact = False
        return func(*args, **kwargs)

    def _route(self, func, args, kwargs):  # noqa: C901 - one branch per routed function
        if func is torch.Tensor.normal_:
            out, mean, std = args[0], _arg(args, kwargs, 1, "mean", 0.0), _arg(args, kwargs, 2, "std", 1.0)
            u = self._uniform(out.shape, torch.float64, out.device)
            return self._miss(func, args, kwargs) if u is None else out.copy_(torch.special.ndtri(u) * std + mean)
        if func is torch.Tensor.uniform_:
            out, low, high = args[0], _arg(args, kwargs, 1, "from", 0.0), _arg(args, kwargs, 2, "to", 1.0)
            u = self._uniform(out.shape, torch.float64, out.device)
            return self._miss(func, args, kwargs) if u is None else out.copy_(low + (high - low) * u)
        if func is torch.normal and len(args) >= 2 and isinstance(args[0], torch.Tensor):
            mean, std = torch.broadcast_tensors(torch.as_tensor(args[0]), torch.as_tensor(args[1], device=args[0].device))
            u = self._uniform(mean.shape, torch.float64, mean.device)
            return self._miss(func, args, kwargs) if u is None else (torch.special.ndtri(u).to(mean.dtype) * std + mean)
        if func in (torch.randn, torch.rand):
            shape = _out_shape(args, kwargs)
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            u = self._uniform(shape, torch.float64, kwargs.get("device"))
            if u is None:
                return self._miss(func, args, kwargs)
            return torch.special.ndtri(u).to(dtype) if func is torch.randn else _open_unit(u, dtype)
        if func is torch.bernoulli and len(args) == 1 and not kwargs.get("p"):
            probs = args[0]
            u = self._uniform(probs.shape, probs.dtype, probs.device)
            return self._miss(func, args, kwargs) if u is None else (u < probs).to(probs.dtype)
        return NotImplemented

    def _miss(self, func, args, kwargs):
        """A draw whose shape has no data dimension of the streams' size: torch's generator, and not exact."""
        self.streams.exact = False
        return func(*args, **kwargs)


def _arg(args, kwargs, position: int, name: str, default):
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)
