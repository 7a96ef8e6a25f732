"""Declare a new generative model as a Pyro program and train it through the Python API.

The model contract is two methods on a ``PyroModule``: ``model(x, y=None)``
(prior and likelihood) and ``guide(x, y=None)`` (the amortized posterior),
with every per-datapoint site inside ``pyro.plate("data")``. Here: a VAE for
2-D data with a heavy-tailed Laplace prior, trained on the two moons.

    python examples/declare_a_model.py --epochs 100
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from ppl_genmodels import fit, load_run
from ppl_genmodels.nets import MLP


class LaplaceVAE(PyroModule):
    def __init__(self, x_dim, z_dim=2, hidden=(64, 64)):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = MLP(z_dim, hidden, x_dim)
        self.encoder = MLP(x_dim, hidden, 2 * z_dim)
        self.log_scale = nn.Parameter(torch.full((x_dim,), -2.0))  # observation noise, learned

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", dist.Laplace(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), self.log_scale.exp()).to_event(1), obs=x)

    def guide(self, x, y=None):
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", default=f"runs/laplace-vae-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    run = fit(LaplaceVAE, "moons", args.out, epochs=args.epochs, batch_size=64, patience=0, progress=not args.quiet)
    print(run.summary().to_string(index=False))

    again = load_run(args.out)  # the class is found again from this file
    print(f"reloaded {type(again.model).__name__} from {again.path} (best epoch {again.epoch}); plots in {again.path / 'plots'}")


if __name__ == "__main__":
    main()
