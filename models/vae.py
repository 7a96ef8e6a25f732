"""Variational autoencoder (Kingma & Welling 2014; Rezende, Mohamed & Wierstra 2014).

Generative model, for a datapoint x in R^D (or {0,1}^D, or {0..L-1}^D):

    z ~ N(0, I_Z)                              prior, z in R^Z
    x | z ~ p_theta(x | z) = prod_d p(x_d | decoder(z)_d)

Amortized posterior (the "encoder"), of the family named by ``guide``
(``GuideFamily``; the VAE and the conditional VAE share it):

- ``"diag"``: a diagonal Gaussian,
      q_phi(z | x) = N(z; mu_phi(x), diag(sigma_phi(x)^2)),
      [mu, r] = encoder(x),  sigma = softplus(r) + 1e-4;
- ``"fullrank"``: a Gaussian with an amortized Cholesky factor,
      q_phi(z | x) = N(z; mu_phi(x), L_phi(x) L_phi(x)^T),
      [mu, l] = encoder(x) with l the Z(Z+1)/2 entries of the lower triangle of L
      (row by row), its diagonal mapped to softplus(.) + 1e-4;
- ``"iaf:N"``: N inverse autoregressive flow layers on top of the diagonal
  Gaussian (Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling 2016,
  "Improving variational inference with inverse autoregressive flow"),
      z_0 ~ N(mu_phi(x), diag(sigma_phi(x)^2)),
      z_t = s_t * z_{t-1} + (1 - s_t) * m_t,  [m_t, logit s_t] = AR_t(z_{t-1}, h(x)),
  their eq. (14), where h(x) is the encoder's last hidden layer and AR_t a
  MADE network (Pyro's ``ConditionalAffineAutoregressive`` with
  ``stable=True`` over a ``ConditionalAutoRegressiveNN``), the variable order
  reversed from one layer to the next. log q(z | x) = log N(z_0) - sum_t
  sum_d log s_t,d for a z the guide drew (cheap); scoring any other z (AIS
  started at the guide, the mixture proposal) inverts each layer, Z passes of
  its network.

The likelihood head (shared with the conditional VAE in ``cvae.py``) maps the
decoder output to one of

- ``"bernoulli"``:   x_d ~ Bernoulli(logits = out_d)                (binary data)
- ``"gaussian"``:    x_d ~ N(out_d, s_d^2), s fixed (``scale``) or learned per
                     dimension (``log_scale`` parameter, initialised at log 0.1: a unit
                     scale at the start lets the decoder ignore z and the posterior collapse)
- ``"categorical"``: x_d ~ Categorical(logits = out[d, :]) over ``n_levels``
                     levels; x holds the integer levels as floats.

Shapes: everything acts on the last dimension, so the model broadcasts over
extra leading dimensions of z (e.g. z [particles, batch, Z] drawn from the
guide under an outer ``pyro.plate("particles", K, dim=-2)``) against the
observed x [batch, D].
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN, PyroModule
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import vec_to_tril_matrix

from ppl_genmodels.data import LIKELIHOODS
from ppl_genmodels.nets import MLP, activation_class, check_dims

__all__ = ["VAE", "LikelihoodHead", "BernoulliVector", "LIKELIHOODS", "GUIDES", "GuideFamily", "parse_guide",
           "diag_normal_params", "check_common"]


#: lower bound added to every softplus scale (the guide's parameterisation)
MIN_SCALE = 1e-4


def diag_normal_params(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``out`` [..., 2Z] into (loc, scale) with scale = softplus(raw) + 1e-4."""
    loc, raw = out.chunk(2, dim=-1)
    return loc, F.softplus(raw) + MIN_SCALE


#: the guide families of the built-in VAEs (``iaf:N``: N flow layers, N >= 1)
GUIDES = ("diag", "fullrank", "iaf:N")


def parse_guide(spec) -> tuple[str, int]:
    """``"diag"`` -> ("diag", 0), ``"fullrank"`` -> ("fullrank", 0), ``"iaf:3"`` -> ("iaf", 3); else ValueError."""
    if isinstance(spec, str):
        name, _, count = spec.strip().lower().partition(":")
        if name in ("diag", "fullrank") and not count:
            return name, 0
        if name == "iaf" and count.strip().isdigit() and int(count) >= 1:
            return "iaf", int(count)
    raise ValueError(f"unknown guide {spec!r}; expected diag, fullrank or iaf:N (N >= 1 flow layers)")


class GuideFamily(nn.Module):
    """Turns an encoder ``MLP``'s output into q(z | .), a distribution of the family ``spec``.

    The encoder must end in ``out_dim(spec, z_dim)`` units; ``forward(encoder, u)``
    returns q with batch shape ``u.shape[:-1]`` and event shape ``[z_dim]`` (see the
    module docstring for the three families). The flows of ``iaf:N`` are submodules
    (``flows``), so they train and are saved with the model; ``diag`` and ``fullrank``
    own no parameters. Each flow layer's MADE network has one hidden layer of
    max(``context_dim``, 2 ``z_dim``) units with the ``activation`` nonlinearity; the
    context is the encoder's last hidden layer (``MLP.features``), ``context_dim`` wide.
    """

    def __init__(self, spec: str, z_dim: int, context_dim: int, activation="relu"):
        super().__init__()
        self.family, n_flows = parse_guide(spec)
        self.spec = self.family if self.family != "iaf" else f"iaf:{n_flows}"
        self.z_dim = int(z_dim)
        act = activation_class(activation)
        width = max(int(context_dim), 2 * self.z_dim)
        order = torch.arange(self.z_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(self.z_dim, int(context_dim), [width],
                                            permutation=order if t % 2 == 0 else order.flip(0), nonlinearity=act()),
                stable=True)
            for t in range(n_flows))

    @staticmethod
    def out_dim(spec: str, z_dim: int) -> int:
        """The width of the encoder's output for the family ``spec``."""
        family, _ = parse_guide(spec)
        return z_dim + z_dim * (z_dim + 1) // 2 if family == "fullrank" else 2 * z_dim

    def forward(self, encoder: MLP, u: torch.Tensor) -> dist.TorchDistribution:
        """q(z | u) from ``encoder`` applied to ``u [..., in]``: batch shape [...], event shape [Z]."""
        if self.family == "fullrank":
            out = encoder(u)
            loc, entries = out[..., : self.z_dim], out[..., self.z_dim :]
            tril = vec_to_tril_matrix(entries)  # [..., Z, Z]
            diag = F.softplus(tril.diagonal(dim1=-2, dim2=-1)) + MIN_SCALE
            return dist.MultivariateNormal(loc, scale_tril=tril.tril(-1) + torch.diag_embed(diag),
                                           validate_args=False)
        if self.family == "diag":
            loc, scale = diag_normal_params(encoder(u))
            return dist.Normal(loc, scale, validate_args=False).to_event(1)
        context = encoder.features(u)  # [..., H], the encoder's last hidden layer
        loc, scale = diag_normal_params(encoder[-1](context))
        base = dist.Normal(loc, scale, validate_args=False).to_event(1)
        return dist.TransformedDistribution(base, [flow.condition(context) for flow in self.flows],
                                            validate_args=False)


def check_common(x_dim, z_dim, y_dim, hidden=()) -> tuple[int, ...]:
    """Validate the dimensions shared by all built-in models; return ``hidden`` as a tuple."""
    check_dims(x_dim=x_dim, z_dim=z_dim)
    try:
        if operator.index(y_dim) < 0:
            raise TypeError
    except TypeError:
        raise ValueError(f"y_dim must be a non-negative integer, got {y_dim!r}") from None
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise ValueError(f"hidden must be a sequence of layer widths, got {hidden!r}")
    for h in hidden:
        check_dims(hidden=h)
    return tuple(int(h) for h in hidden)


class BernoulliVector(dist.TorchDistribution):
    """Independent Bernoulli pixels over the last dimension, parameterised by logits (event dim 1).

    The same distribution as ``Bernoulli(logits=l).to_event(1)``, with log p(x) =
    -sum_d BCE-with-logits(l_d, x_d) computed in one pass: no separate negation of
    the per-pixel tensor and no ``Independent`` wrapper. On an MNIST-sized VAE this
    removes about 3% of a training step (``benchmarks/train_step.py``).
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)
    has_rsample = False

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = BernoulliVector(self.logits.expand(torch.Size(batch_shape) + self.event_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    @property
    def variance(self) -> torch.Tensor:
        p = self.probs
        return p * (1 - p)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return torch.bernoulli(self.probs.expand(self._extended_shape(sample_shape)))


class LikelihoodHead(nn.Module):
    """Turns decoder outputs into the observation distribution p(x | decoder output).

    ``out_dim`` is the width the decoder must produce; ``forward(out)`` returns a
    distribution with event shape [D] and batch shape ``out.shape[:-1]``.
    """

    def __init__(
        self,
        x_dim: int,
        likelihood: str = "bernoulli",
        n_levels: int | None = None,
        scale: float | None = None,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"unknown likelihood {likelihood!r}; expected one of {', '.join(LIKELIHOODS)}"
            )
        self.x_dim = int(x_dim)
        self.likelihood = likelihood
        self.n_levels = None
        self.out_dim = self.x_dim
        self.register_parameter("log_scale", None)  # set below for a learned Gaussian scale
        if likelihood == "categorical":
            if n_levels is None:
                raise ValueError("likelihood 'categorical' needs n_levels (number of levels)")
            try:
                ok = not isinstance(n_levels, bool) and operator.index(n_levels) >= 2
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"n_levels must be an integer >= 2, got {n_levels!r}")
            self.n_levels = int(n_levels)
            self.out_dim = self.x_dim * self.n_levels
        elif likelihood == "gaussian":
            if scale is None:
                self.log_scale = nn.Parameter(torch.full((self.x_dim,), math.log(0.1)))
            else:
                scale = float(scale)
                if not scale > 0 or scale == float("inf"):
                    raise ValueError(f"scale must be a positive finite number, got {scale!r}")
                self.register_buffer("fixed_scale", torch.tensor(scale))

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        if self.likelihood == "bernoulli":
            return BernoulliVector(out, validate_args=False)
        if self.likelihood == "gaussian":
            s = self.fixed_scale if self.log_scale is None else self.log_scale.exp()
            return dist.Normal(out, s, validate_args=False).to_event(1)
        logits = out.unflatten(-1, (self.x_dim, self.n_levels))  # [..., D, L], a view
        # Categorical.log_prob casts the (float) observed levels with .long() itself.
        return dist.Categorical(logits=logits, validate_args=False).to_event(1)

    def sample_as_data(self, p: dist.TorchDistribution, dtype: torch.dtype) -> torch.Tensor:
        """Draw x ~ p in the data convention: a float tensor (levels as floats)."""
        return p.sample().to(dtype)


class VAE(PyroModule):
    """VAE with an MLP encoder/decoder and a Bernoulli, Gaussian or categorical likelihood.

    ``guide``: the family of q(z | x), ``"diag"``, ``"fullrank"`` or ``"iaf:N"``
    (``GuideFamily``); ``activation``: the hidden layers' nonlinearity (``nets.ACTIVATIONS``).
    ``VAE(784, 50, hidden=(200, 200), activation="tanh")`` is the one-stochastic-layer
    network of Burda, Grosse & Salakhutdinov (2016), 784-200-200-50.
    ``y`` (and ``y_dim``, so that it trains on conditioned data too) is accepted and
    ignored: the model is unconditional.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 16,
        *,
        y_dim: int = 0,
        hidden: Sequence[int] = (256,),
        likelihood: str = "bernoulli",
        n_levels: int | None = None,
        scale: float | None = None,
        guide: str = "diag",
        activation: str = "relu",
    ):
        super().__init__()
        hidden = check_common(x_dim, z_dim, y_dim, hidden)
        self.x_dim, self.z_dim = int(x_dim), int(z_dim)
        self.head = LikelihoodHead(x_dim, likelihood, n_levels, scale)
        self.encoder = MLP(self.x_dim, hidden, GuideFamily.out_dim(guide, self.z_dim), activation)
        self.decoder = MLP(self.z_dim, hidden[::-1], self.head.out_dim, activation)
        self.q = GuideFamily(guide, self.z_dim, self.encoder.features_dim, activation)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(x | z) for z [..., Z]: batch shape [...], event shape [D]."""
        return self.head(self.decoder(z))

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z", prior)  # [B, Z] or [K, B, Z]
            pyro.sample("x", self.decode(z), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            pyro.sample("z", self.q(self.encoder, x))  # batch [B], event [Z]

    @torch.no_grad()
    def sample_data(self, n: int, y: torch.Tensor | None = None):
        """Draw ``n`` datapoints from the model: returns ``(x [n, D], {"z": z [n, Z]})``."""
        p = next(self.parameters())
        z = torch.randn(n, self.z_dim, device=p.device, dtype=p.dtype)
        x = self.head.sample_as_data(self.decode(z), p.dtype)
        return x, {"z": z}
