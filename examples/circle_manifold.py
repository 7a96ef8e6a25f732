"""The classic picture of a low-dimensional manifold: a VAE's density around a circle.

Points lie on a circle in the plane (a one-dimensional manifold) with a little
Gaussian noise. A VAE with a 2-D latent is trained on them, and its learned
density p(x) = integral p(x | z) p(z) dz, estimated at every point of a grid
by importance sampling, is drawn as a heat map beside the true circle: a
"probability doughnut" around the manifold, with an empty middle.

    python examples/circle_manifold.py                 # about a minute on a CPU
    python examples/circle_manifold.py --epochs 300    # a smoother doughnut
"""

import argparse
import math
import time
from pathlib import Path

import torch

from ppl_genmodels import fit, log_density_grid
from ppl_genmodels.plots import plot_density_2d
from ppl_genmodels.traces import log_mean_exp, log_weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--grid", type=int, default=80, help="grid points per axis")
    parser.add_argument("--k", type=int, default=500, help="importance samples per grid point")
    parser.add_argument("--out", default=f"runs/circle-manifold-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    run = fit("vae", "circle", args.out, epochs=args.epochs, batch_size=64, patience=0, z_dim=2,
              hidden=[64, 64], progress=not args.quiet, plots=False)
    gx, gy, log_p = log_density_grid(run.program, run.data.train.x, grid_size=args.grid, k=args.k)
    path = plot_density_2d(gx, gy, log_p, Path(args.out) / "doughnut.png", data=run.data.train.x,
                           true_manifold=run.data.meta["true_manifold"],
                           title=f"VAE on a noisy circle: learned p(x) (importance sampling, k={args.k})")

    # The doughnut in numbers: density on the true circle against the empty centre.
    on_circle = torch.as_tensor(run.data.meta["true_manifold"], dtype=run.data.train.x.dtype)
    probes = torch.cat([on_circle, on_circle.new_zeros(1, 2)])
    with torch.no_grad():
        log_w = log_weights(run.program.model, run.program.guide, probes, num_particles=2000, proposal="mixture")
    log_p_probes = log_mean_exp(log_w, 0)
    ring, centre = log_p_probes[:-1].mean().item(), log_p_probes[-1].item()
    print(run.summary().to_string(index=False))
    print(f"mean log p(x) on the true circle: {ring:.3f}; at the centre: {centre:.3f} "
          f"(the ring is {math.exp(ring - centre):.3g} times denser)")
    print(f"wrote {path}")
    return ring, centre


if __name__ == "__main__":
    main()
