"""A conditional VAE in the shape of Pyro's CVAE example (structured output prediction).

As in that example: the constructor takes a pre-trained baseline network (so
the model must be built by the user and handed over as an instance); the first
argument ``xs`` of ``model``/``guide`` is the *visible input* and the second,
``ys``, the *output* that is generated, ``None`` at prediction time; the
networks are registered with ``pyro.module``; ``pyro.plate("data")`` has no
size; the prior network sees the input and the baseline's guess. Here the
input is the visible quadrant of a digit and the output the other quadrants
(the toolkit's ``--condition quadrants``: data ``x`` = output, ``y`` = input),
so the toolkit is told ``data_arg="ys"``.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn


class Baseline(nn.Module):
    """A deterministic guess of the output from the input (trained before the CVAE)."""

    def __init__(self, in_dim, out_dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, xs):
        return torch.sigmoid(self.net(xs))


class Encoder(nn.Module):
    def __init__(self, in_dim, z_dim, hidden_1, hidden_2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_1), nn.ReLU(), nn.Linear(hidden_1, hidden_2), nn.ReLU())
        self.loc = nn.Linear(hidden_2, z_dim)
        self.log_scale = nn.Linear(hidden_2, z_dim)

    def forward(self, a, b):
        h = self.net(torch.cat([a, b], dim=-1))
        return self.loc(h), torch.exp(self.log_scale(h))


class Decoder(nn.Module):
    def __init__(self, z_dim, out_dim, hidden_1, hidden_2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden_1), nn.ReLU(), nn.Linear(hidden_1, hidden_2), nn.ReLU(),
                                 nn.Linear(hidden_2, out_dim))

    def forward(self, z):
        return torch.sigmoid(self.net(z))


class CVAE(nn.Module):
    def __init__(self, z_dim, hidden_1, hidden_2, pre_trained_baseline_net):
        super().__init__()
        self.baseline_net = pre_trained_baseline_net
        in_dim = pre_trained_baseline_net.net[0].in_features
        out_dim = pre_trained_baseline_net.net[-1].out_features
        self.prior_net = Encoder(in_dim + out_dim, z_dim, hidden_1, hidden_2)
        self.generation_net = Decoder(z_dim, out_dim, hidden_1, hidden_2)
        self.recognition_net = Encoder(in_dim + out_dim, z_dim, hidden_1, hidden_2)

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        with pyro.plate("data"):
            with torch.no_grad():
                y_hat = self.baseline_net(xs)
            prior_loc, prior_scale = self.prior_net(xs, y_hat)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = self.generation_net(zs)
            if ys is not None:
                pyro.sample("y", dist.Bernoulli(loc, validate_args=False).to_event(1), obs=ys)
            else:
                pyro.deterministic("y", loc.detach())
        return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                y_hat = self.baseline_net(xs)
                loc, scale = self.prior_net(xs, y_hat)
            else:
                loc, scale = self.recognition_net(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
