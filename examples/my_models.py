"""Declaring your own model: a VAE with a heavy-tailed Student-t likelihood.

Any class that follows the model contract can be trained and evaluated by
pointing the CLI at it:

    ppl-genmodels fit --model examples/my_models.py:StudentTVAE --data moons

The contract, in short: a ``PyroModule`` with ``model(x, y=None)`` and
``guide(x, y=None)``; per-datapoint sites inside ``pyro.plate("data", B)``; the
latent is site "z", the data site "x" (observed); global parameters are plain
``nn.Parameter``s; code works on the last dimension so that z may arrive with
extra leading (particle) dimensions.

Model:   z ~ N(0, I),   x_d | z ~ StudentT(df, loc = f(z)_d, scale = s_d)
Guide:   q(z | x) = N(mu(x), diag(sigma(x)^2))
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from ppl_genmodels.nets import MLP


class StudentTVAE(PyroModule):
    """VAE for continuous data with a Student-t likelihood.

    ``df``: degrees of freedom, a fixed number, or ``None`` to learn it
    (starting at 4). The per-dimension scale is always learned.
    """

    def __init__(self, x_dim: int, z_dim: int = 2, hidden=(64,), df: float | None = 4.0):
        super().__init__()
        if df is not None and not df > 0:
            raise ValueError(f"df must be positive or None (learned), got {df!r}")
        self.config = {"x_dim": x_dim, "z_dim": z_dim, "hidden": list(hidden), "df": df}
        self.z_dim = z_dim
        self.encoder = MLP(x_dim, hidden, 2 * z_dim)  # -> loc, raw scale of q(z|x)
        self.decoder = MLP(z_dim, tuple(hidden)[::-1], x_dim)  # -> loc of p(x|z)
        self.log_scale = nn.Parameter(torch.zeros(x_dim))
        if df is None:
            self.log_df = nn.Parameter(torch.tensor(4.0).log())
        else:
            self.register_buffer("log_df", torch.tensor(float(df)).log())

    def decode(self, z, y=None):
        """p(x | z), batch shape z.shape[:-1], event shape [x_dim]."""
        return dist.StudentT(self.log_df.exp(), self.decoder(z), self.log_scale.exp()).to_event(1)

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", self.decode(z), obs=x)

    def guide(self, x, y=None):
        with pyro.plate("data", x.shape[0], device=x.device):
            loc, raw = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))

    @torch.no_grad()
    def sample_data(self, n, y=None):
        p = self.log_scale
        z = torch.randn(n, self.z_dim, device=p.device, dtype=p.dtype)
        return self.decode(z).sample(), {"z": z}
