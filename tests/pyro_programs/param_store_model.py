"""A linear-Gaussian latent model written with ``pyro.param`` only, as in Pyro's SVI tutorials.

No ``nn.Module``: every parameter lives in Pyro's param store. ``model(data)``
and ``guide(data)`` take the data alone.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints


class LinearGaussian:
    def __init__(self, x_dim, z_dim=1):
        self.x_dim, self.z_dim = x_dim, z_dim

    def model(self, data):
        weight = pyro.param("weight", 0.1 * torch.ones(self.z_dim, self.x_dim))
        noise = pyro.param("noise", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Normal(data.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(z @ weight, noise).to_event(1), obs=data)

    def guide(self, data):
        encoder = pyro.param("encoder", torch.zeros(self.x_dim, self.z_dim))
        scale = pyro.param("q_scale", torch.ones(self.z_dim), constraint=constraints.positive)
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(data @ encoder, scale).to_event(1))
