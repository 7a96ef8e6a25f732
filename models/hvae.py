"""VAE with two stochastic layers (Burda, Grosse & Salakhutdinov 2016, "Importance weighted autoencoders").

Generative model, for a datapoint x, with z2 the top latent (``z_dim``, 50 in the
paper) and z1 the one below it (``z1_dim``, 100):

    z2 ~ N(0, I)
    z1 | z2 ~ N(mu_p(z2), diag(sigma_p(z2)^2))       z2 - hidden2[::-1] - z1   (50-100-100-100)
    x | z1  ~ p_theta(x | decoder(z1))                z1 - hidden[::-1] - x      (100-200-200-784)

Amortized posterior, in the opposite direction:

    q(z1 | x)  = N(mu_1(x), diag(sigma_1(x)^2))      x - hidden - z1            (784-200-200-100)
    q(z2 | z1) = N(mu_2(z1), diag(sigma_2(z1)^2))    z1 - hidden2 - z2          (100-100-100-50)

Each Gaussian has [mu, r] = net(.) and sigma = softplus(r) + 1e-4; the hidden
layers use ``activation`` (tanh, as in the paper). The likelihood head is the
VAE's (``vae.LikelihoodHead``). Latent sites ``"z1"`` and ``"z2"``, observed site
``"x"``, all inside ``pyro.plate("data")``; everything acts on the last
dimension, so the model broadcasts over a leading particle dimension of z1, z2.

``HVAE(784, 50, z1_dim=100, hidden=(200, 200), hidden2=(100, 100))`` (the
defaults) is the paper's architecture. Through the toolkit's options the
built-in sizes apply unless set: pass ``--z-dim 50 --hidden 200,200`` for it
(``z1_dim`` and ``hidden2`` through ``--model-arg``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ppl_genmodels.models.vae import LikelihoodHead, check_common, diag_normal_params
from ppl_genmodels.nets import MLP, check_dims

__all__ = ["HVAE"]


def _diag_normal(net: MLP, u: torch.Tensor) -> dist.TorchDistribution:
    loc, scale = diag_normal_params(net(u))
    return dist.Normal(loc, scale, validate_args=False).to_event(1)


class HVAE(PyroModule):
    """Two-stochastic-layer VAE: p(z2) p(z1 | z2) p(x | z1), guide q(z1 | x) q(z2 | z1).

    ``y`` (and ``y_dim``) is accepted and ignored: the model is unconditional.
    """

    #: the toolkit's default sizes (z 16, hidden 256) do not apply: its own are Burda et al.'s
    toolkit_sizes = False

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 50,
        *,
        y_dim: int = 0,
        z1_dim: int = 100,
        hidden: Sequence[int] = (200, 200),
        hidden2: Sequence[int] = (100, 100),
        likelihood: str = "bernoulli",
        n_levels: int | None = None,
        scale: float | None = None,
        activation: str = "tanh",
    ):
        super().__init__()
        hidden = check_common(x_dim, z_dim, y_dim, hidden)
        check_dims(z1_dim=z1_dim)
        if isinstance(hidden2, (str, bytes)) or not isinstance(hidden2, Sequence):
            raise ValueError(f"hidden2 must be a sequence of layer widths, got {hidden2!r}")
        for h in hidden2:
            check_dims(hidden2=h)
        hidden2 = tuple(int(h) for h in hidden2)
        self.x_dim, self.z_dim, self.z1_dim = int(x_dim), int(z_dim), int(z1_dim)
        self.head = LikelihoodHead(x_dim, likelihood, n_levels, scale)
        self.encoder1 = MLP(self.x_dim, hidden, 2 * self.z1_dim, activation)      # q(z1 | x)
        self.encoder2 = MLP(self.z1_dim, hidden2, 2 * self.z_dim, activation)     # q(z2 | z1)
        self.prior1 = MLP(self.z_dim, hidden2[::-1], 2 * self.z1_dim, activation)  # p(z1 | z2)
        self.decoder = MLP(self.z1_dim, hidden[::-1], self.head.out_dim, activation)  # p(x | z1)

    def decode(self, z1: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(x | z1) for z1 [..., Z1]: batch shape [...], event shape [D]."""
        return self.head(self.decoder(z1))

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            top = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z2 = pyro.sample("z2", top)                                    # [B, Z] or [K, B, Z]
            z1 = pyro.sample("z1", _diag_normal(self.prior1, z2))          # [..., B, Z1]
            pyro.sample("x", self.decode(z1), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            z1 = pyro.sample("z1", _diag_normal(self.encoder1, x))         # [B, Z1] or [K, B, Z1]
            pyro.sample("z2", _diag_normal(self.encoder2, z1))

    @torch.no_grad()
    def sample_data(self, n: int, y: torch.Tensor | None = None):
        """Draw ``n`` datapoints: ``(x [n, D], {"z2": z2 [n, Z], "z1": z1 [n, Z1]})``."""
        p = next(self.parameters())
        z2 = torch.randn(n, self.z_dim, device=p.device, dtype=p.dtype)
        z1 = _diag_normal(self.prior1, z2).sample()
        x = self.head.sample_as_data(self.decode(z1), p.dtype)
        return x, {"z2": z2, "z1": z1}
