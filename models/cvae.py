"""Conditional variational autoencoder (Sohn, Lee & Yan 2015).

K. Sohn, H. Lee, X. Yan, "Learning Structured Output Representation using Deep
Conditional Generative Models", NeurIPS 2015.

Naming: in this package ``x`` is always what the model generates and ``y`` the
conditioning information. Sohn et al. use the opposite letters (their input is
x, their structured output is y), so their p(y | x, z) is our p(x | y, z).

Three networks, all MLPs:

    prior network         p_theta(z | y)    = N(z; mu_p(y), diag(sigma_p(y)^2))
    generation network    p_theta(x | y, z) = likelihood head of decoder([z, y])
    recognition network   q_phi(z | x, y)   = N(z; mu_q(x, y), diag(sigma_q(x, y)^2))

with [mu, r] = net(.) and sigma = softplus(r) + 1e-4. The recognition network's
family is ``guide`` (``"diag"`` above, ``"fullrank"`` or ``"iaf:N"``: see
``vae.GuideFamily``), conditioned on [x, y]; ``activation`` names the hidden
layers' nonlinearity. The ELBO is
E_q[log p(x | y, z)] - KL(q(z | x, y) || p(z | y)), a lower bound on log p(x | y).

``y_kind`` says what y is: ``"onehot"`` (a class label as a one-hot vector) or
``"real"`` / ``"binary"`` (e.g. the visible quadrants of an image, zeros where
nothing is visible); default ``"real"``. When ``model`` is called with
``y=None`` it still generates: for ``"onehot"`` it samples y from a uniform
OneHotCategorical as sample site ``"y"``; otherwise it uses y = 0 ("nothing
visible"). The guide q(z | x, y) needs y and raises without it.

The likelihood options are those of the VAE (``vae.LikelihoodHead``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ppl_genmodels.models.vae import GuideFamily, LikelihoodHead, check_common, diag_normal_params
from ppl_genmodels.nets import MLP

__all__ = ["CVAE", "Y_KINDS"]

Y_KINDS = ("onehot", "real", "binary")


def _cat_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim after broadcasting the leading dims (views only)."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(lead + a.shape[-1:]), b.expand(lead + b.shape[-1:])], dim=-1)


class CVAE(PyroModule):
    """Conditional VAE: prior p(z|y), generation p(x|y,z), recognition q(z|x,y)."""

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
        y_kind: str | None = None,
        guide: str = "diag",
        activation: str = "relu",
    ):
        super().__init__()
        hidden = check_common(x_dim, z_dim, y_dim, hidden)
        if y_dim < 1:
            raise ValueError("CVAE needs the conditioning dimension y_dim >= 1")
        y_kind = "real" if y_kind is None else y_kind
        if y_kind not in Y_KINDS:
            raise ValueError(f"unknown y_kind {y_kind!r}; expected one of {', '.join(Y_KINDS)}")
        self.x_dim, self.z_dim, self.y_dim = int(x_dim), int(z_dim), int(y_dim)
        self.y_kind = y_kind
        self.head = LikelihoodHead(x_dim, likelihood, n_levels, scale)
        self.prior_net = MLP(self.y_dim, hidden, 2 * self.z_dim, activation)
        self.encoder = MLP(self.x_dim + self.y_dim, hidden, GuideFamily.out_dim(guide, self.z_dim), activation)
        self.decoder = MLP(self.z_dim + self.y_dim, hidden[::-1], self.head.out_dim, activation)
        self.q = GuideFamily(guide, self.z_dim, self.encoder.features_dim, activation)

    def prior(self, y: torch.Tensor) -> dist.TorchDistribution:
        """p(z | y) for y [..., Y]: batch shape [...], event shape [Z]."""
        loc, scale = diag_normal_params(self.prior_net(y))
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> dist.TorchDistribution:
        """p(x | y, z); y [..., Y] is broadcast against z [..., Z] (e.g. [B, Y] vs [K, B, Z])."""
        return self.head(self.decoder(_cat_broadcast(z, y.to(z.dtype))))

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            if y is None:
                if self.y_kind == "onehot":
                    uniform = dist.OneHotCategorical(logits=x.new_zeros(self.y_dim))
                    y = pyro.sample("y", uniform)  # [B, Y]
                else:
                    y = x.new_zeros(x.shape[0], self.y_dim)  # nothing visible
            else:
                y = y.to(x.dtype)
            z = pyro.sample("z", self.prior(y))  # [B, Z] or [K, B, Z]
            pyro.sample("x", self.decode(z, y), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        if y is None:
            raise ValueError("CVAE.guide needs the conditioning y: q(z | x, y) is undefined for y=None")
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            pyro.sample("z", self.q(self.encoder, torch.cat([x, y.to(x.dtype)], dim=-1)))

    @torch.no_grad()
    def sample_data(self, n: int, y: torch.Tensor | None = None):
        """Draw ``n`` datapoints: ``(x [n, D], {"z": z, "y": y})``.

        Without ``y``: one-hot kinds draw uniform labels, other kinds use zeros.
        """
        p = next(self.parameters())
        if y is None:
            if self.y_kind == "onehot":
                idx = torch.randint(self.y_dim, (n,), device=p.device)
                y = torch.nn.functional.one_hot(idx, self.y_dim).to(p.dtype)
            else:
                y = torch.zeros(n, self.y_dim, device=p.device, dtype=p.dtype)
        else:
            y = y.to(device=p.device, dtype=p.dtype)
        z = self.prior(y).sample()
        x = self.head.sample_as_data(self.decode(z, y), p.dtype)
        return x, {"z": z, "y": y}
