"""Why latent-variable models: the partition function, computed where it can be and costed where it cannot.

An energy-based model (LeCun, Chopra, Hadsell, Ranzato & Huang 2006, "A
tutorial on energy-based learning") gives a density by exponentiating a
free-form energy,

    p_theta(x) = exp(-E_theta(x)) / Z(theta),    Z(theta) = integral exp(-E_theta(x)) dx,

and its log-likelihood log p_theta(x) = -E_theta(x) - log Z(theta) needs
Z(theta), an integral over the whole data space, for every theta the training
visits (the gradient of log Z is the expectation of -grad E under the model
itself). For a flexible E there is no closed form, and in general the integral
is intractable: maximum-likelihood EBMs fall back on MCMC samples from the
model (contrastive divergence, Hinton 2002; persistent chains, Tieleman 2008)
or on other objectives (score matching, noise-contrastive estimation), and
their likelihoods on held-out data are then themselves estimates (AIS) whose
error is hard to bound.

In two dimensions the integral is easy, and this script does it exactly (up to
quadrature error):

1. An EBM on the circle data, E_theta a small MLP, trained by maximum likelihood
   with log Z(theta) = logsumexp over the cells of a grid of -E_theta(cell
   centre) + log(cell area): the midpoint rule over the data's bounding box
   plus a margin (the model's support). During training the grid is shifted by
   one uniform random offset per step, so that the sum is an unbiased estimate
   of Z and the energy cannot hide mass between fixed nodes; the reported log Z
   uses the fixed midpoint grid and is checked against a grid `--check-factor`
   times finer per axis. Its test log-likelihood is exact up to that error.
2. Beside it, the toolkit's VAE on the same data, p(x) = integral p(x | z) p(z) dz,
   whose density is drawn with `ppl_genmodels.evaluation.log_density_grid`
   (importance sampling at every grid point) and whose test log-likelihood is
   the IWAE-k estimate: the "probability doughnut" of both models, side by side
   in `densities.png`, on one colour scale.
3. The cost of the same quadrature as the dimension d grows: a grid of R points
   per axis has R^d cells (64^2 = 4,096; 64^6 ~ 6.9e10), each needing one
   pass of the energy network. The script times one log Z evaluation of a small
   MLP energy (d -> 64 -> 64 -> 1) for d = 1, 2, ... while the next one is
   predicted to fit in `--budget` seconds (the grid is enumerated in chunks, so
   memory stays bounded and time is the binding budget), and extrapolates
   (marked `extrapolated` in the table and in `quadrature_cost.csv`) to
   d = 6, 10 and 784 (MNIST) from the per-point time of the largest measured d,
   scaled by the network's FLOPs per point. At d = 784 the grid has ~10^1416
   points; the age of the universe is ~4.4e17 seconds.

In two dimensions the EBM wins: with its normaliser exact, the small energy
network fits the ring more tightly than the VAE does in as many epochs (test
log-likelihood about -0.24 against the VAE's -0.84 nats per point at the
default 100 epochs). The case against it is the third part, the cost.

This is the argument for latent-variable models. A VAE also integrates (over
z), but every factor of p(x, z) = p(z) p(x | z) is a normalised density, so
the model is normalised by construction: there is no Z(theta) to compute,
sampling is ancestral, and log p(x) is estimated per datapoint by importance
sampling from a learned proposal q(z | x), whose cost grows with the number of
samples, not exponentially with the dimension of x, and whose estimates are
stochastic lower bounds (ELBO, IWAE-k; Burda, Grosse & Salakhutdinov 2016).

    python examples/partition_function.py                   # under half a minute on a 2-core CPU
    python examples/partition_function.py --epochs 300      # smoother densities
    python examples/partition_function.py --quick           # seconds: the test's run

Writes into `--out` (default `runs/partition_function/`): `densities.png`,
`quadrature_cost.csv`, `ebm_log_z.csv` (log Z on the training grid and the
finer one) and the VAE's run directory `vae-<epochs>epochs-seed<seed>/` (reused
when it holds a finished run, resumed when it holds an interrupted one).
"""

from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from ppl_genmodels import fit, load_dataset, load_run, log_density_grid
from ppl_genmodels.nets import MLP
from ppl_genmodels.runs import atomic_write

SECONDS_PER_YEAR = 3.156e7
AGE_OF_UNIVERSE_S = 4.35e17
EXTRAPOLATE_TO = (10, 784)
HIDDEN = (64, 64)


# ---------------------------------------------------------------------------------------------
# the grid: cell centres of a box, enumerated in chunks
# ---------------------------------------------------------------------------------------------


class Box:
    """An axis-aligned box [lo, hi] cut into ``resolution`` cells per axis."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, resolution: int):
        self.lo, self.hi, self.resolution = lo, hi, resolution
        self.width = (hi - lo) / resolution  # [d], one cell's side per axis
        self.dim = lo.numel()

    @property
    def n_points(self) -> int:
        return self.resolution ** self.dim

    @property
    def log_cell_volume(self) -> float:
        return float(self.width.log().sum())

    def points(self, start: int, stop: int, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Cells ``start..stop-1`` (row-major order) at ``lo + (index + offset) * width``; offset 0.5: centres."""
        flat = torch.arange(start, stop, dtype=torch.long)
        digits = torch.stack([(flat // self.resolution ** k) % self.resolution for k in range(self.dim)], -1)
        offset = torch.full((self.dim,), 0.5) if offset is None else offset
        return self.lo + (digits.to(self.lo.dtype) + offset) * self.width  # [stop - start, d]

    def log_integral(self, energy: nn.Module, *, offset: torch.Tensor | None = None, chunk: int = 1 << 16
                     ) -> torch.Tensor:
        """log of the midpoint-rule sum  sum_cells exp(-E(cell point)) * cell volume  (a running logsumexp)."""
        total = None
        for start in range(0, self.n_points, chunk):
            part = torch.logsumexp(-energy(self.points(start, min(start + chunk, self.n_points), offset))
                                   .squeeze(-1), 0)
            total = part if total is None else torch.logaddexp(total, part)
        return total + self.log_cell_volume


def data_box(x: torch.Tensor, margin: float, resolution: int) -> Box:
    """The data's bounding box, widened by ``margin`` times its extent on every side."""
    lo, hi = x.min(0).values, x.max(0).values
    pad = (hi - lo) * margin
    return Box(lo - pad, hi + pad, resolution)


# ---------------------------------------------------------------------------------------------
# 1. the energy-based model, trained by maximum likelihood with log Z by quadrature
# ---------------------------------------------------------------------------------------------


def energy_network(dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(dim, HIDDEN, 1, activation=nn.SiLU)


def train_ebm(train_x: torch.Tensor, box: Box, *, epochs: int, batch_size: int, lr: float, seed: int) -> nn.Module:
    """Minimise  mean E(x) + log Z  over minibatches; each step's Z on a randomly shifted grid."""
    energy = energy_network(train_x.shape[1], seed)
    optimizer = torch.optim.Adam(energy.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for batch in train_x[order].split(batch_size):
            offset = torch.rand(box.dim, generator=generator)  # one shift per step: an unbiased estimate of Z
            loss = energy(batch).mean() + box.log_integral(energy, offset=offset)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return energy.eval()


def ebm_log_likelihood(energy: nn.Module, box: Box, x: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """log p(x) = -E(x) - log Z per datapoint; -inf outside the box (the model's support)."""
    inside = ((x >= box.lo) & (x <= box.hi)).all(-1)
    log_p = -energy(x).squeeze(-1) - log_z
    return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))


# ---------------------------------------------------------------------------------------------
# 2. the VAE beside it
# ---------------------------------------------------------------------------------------------


def vae_run(out: Path, args):
    """The toolkit's VAE on the circle data in ``out``: trained, resumed if interrupted, or reused if finished."""
    if (out / "best.pt").is_file() and len(load_run(out).metrics) == args.epochs:
        print(f"reusing the VAE trained earlier in {out} (delete it to train again)")
        return load_run(out)
    if (out / "config.json").is_file():
        return fit(out=out, resume=True, progress=not args.quiet, plots=False)
    return fit("vae", "circle", out, epochs=args.epochs, batch_size=64, patience=0, z_dim=2, hidden=list(HIDDEN),
               eval_k=args.k, seed=args.seed, progress=not args.quiet, plots=False)


def iwae_row(summary: pd.DataFrame) -> pd.Series:
    return summary[summary["estimator"].str.startswith("iwae")].iloc[0]


def plot_densities(path: Path, grid_x, grid_y, panels: list[tuple[str, np.ndarray]], manifold) -> Path:
    """The densities exp(log_p[i, j]) at (grid_x[j], grid_y[i]) side by side, one colour scale."""
    vmax = max(float(np.exp(log_p).max()) for _, log_p in panels)
    hx, hy = (grid_x[1] - grid_x[0]) / 2, (grid_y[1] - grid_y[0]) / 2
    extent = (grid_x[0] - hx, grid_x[-1] + hx, grid_y[0] - hy, grid_y[-1] + hy)
    fig = Figure(figsize=(5.2 * len(panels) + 1.2, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    for ax, (title, log_p) in zip(axes, panels):
        image = ax.imshow(np.exp(log_p), origin="lower", extent=extent, cmap="viridis", vmin=0.0, vmax=vmax,
                          interpolation="nearest", aspect="equal")
        ax.plot(manifold[:, 0], manifold[:, 1], ".", ms=0.8, color="white", alpha=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    fig.colorbar(image, ax=list(axes), label="p(x)", shrink=0.9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# 3. the quadrature's cost against the dimension
# ---------------------------------------------------------------------------------------------


def flops_per_point(dim: int) -> int:
    """Matrix-product FLOPs of one energy evaluation: 2 * in * out per linear layer."""
    widths = (dim, *HIDDEN, 1)
    return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))


def time_log_z(dim: int, resolution: int, seed: int) -> tuple[float, float]:
    """Seconds of one log Z evaluation over resolution^dim cells of [-3, 3]^dim, and its value."""
    energy = energy_network(dim, seed)
    box = Box(torch.full((dim,), -3.0), torch.full((dim,), 3.0), resolution)
    with torch.no_grad():
        energy(box.points(0, min(box.n_points, 1 << 12)))  # warm-up (allocations, kernels)
        start = time.perf_counter()
        log_z = box.log_integral(energy)
        return time.perf_counter() - start, float(log_z)


def quadrature_cost(resolution: int, max_dim: int, budget: float, seed: int) -> pd.DataFrame:
    """Measure d = 1, 2, ... while the prediction fits the budget; extrapolate the rest of 1..max_dim, 10, 784."""
    rows, per_point = [], None  # per_point: (seconds per grid point, at which d)
    for dim in sorted({*range(1, max_dim + 1), *EXTRAPOLATE_TO}):
        log10_points = dim * math.log10(resolution)
        predicted = None if per_point is None else per_point[0] * flops_per_point(dim) / flops_per_point(per_point[1])
        log10_predicted = None if predicted is None else log10_points + math.log10(predicted)
        if per_point is None or (dim <= max_dim and log10_predicted <= math.log10(budget)):
            seconds, log_z = time_log_z(dim, resolution, seed)
            per_point = (seconds / resolution ** dim, dim)
            rows.append((dim, log10_points, seconds, math.log10(seconds), "measured", log_z))
        else:
            rows.append((dim, log10_points, None, log10_predicted, "extrapolated", None))
    table = pd.DataFrame(rows, columns=["d", "log10_grid_points", "seconds", "log10_seconds", "how", "log_z"])
    table.insert(1, "resolution", resolution)
    table.insert(3, "grid_points", [f"{resolution}^{d}" if lp > 15 else str(resolution ** d)
                                    for d, lp in zip(table["d"], table["log10_grid_points"])])
    table["flops_per_point"] = [flops_per_point(d) for d in table["d"]]
    return table


def human_seconds(log10_seconds: float) -> str:
    seconds = 10 ** min(log10_seconds, 300.0)
    for unit, size, below in (("s", 1, 3600), ("hours", 3600, 86400), ("days", 86400, SECONDS_PER_YEAR),
                              ("years", SECONDS_PER_YEAR, 1e6 * SECONDS_PER_YEAR)):
        if seconds < below:
            return f"{seconds / size:.3g} {unit}"
    return f"10^{log10_seconds - math.log10(AGE_OF_UNIVERSE_S):.0f} ages of the universe"


def print_cost(table: pd.DataFrame) -> None:
    print(f"\nquadrature cost: one log Z of an MLP energy (d -> {' -> '.join(map(str, HIDDEN))} -> 1) on a grid "
          f"of {table['resolution'].iloc[0]} points per axis")
    print(f"{'d':>4}  {'grid points':>14}  {'log10 points':>12}  {'seconds':>12}  {'':<28}  how")
    for r in table.itertuples():
        seconds = f"{r.seconds:.4g}" if r.how == "measured" else f"10^{r.log10_seconds:.1f}"
        print(f"{r.d:>4}  {r.grid_points:>14}  {r.log10_grid_points:>12.1f}  {seconds:>12}  "
              f"{human_seconds(r.log10_seconds):<28}  {r.how}")
    last = table[table["how"] == "measured"].iloc[-1]
    print(f"(extrapolated rows: grid points x the seconds per point measured at d = {last.d}, "
          f"scaled by the FLOPs per point; not measured)")


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of both models (default 100)")
    parser.add_argument("--out", default="runs/partition_function", help="output folder")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run (fewer epochs, coarse grids)")
    parser.add_argument("--resolution", type=int, default=64, help="grid points per axis of the EBM's quadrature "
                                                                   "and of the cost table (default 64)")
    parser.add_argument("--check-factor", type=int, default=4, help="the finer grid's points per axis, as a "
                                                                    "multiple of --resolution (default 4)")
    parser.add_argument("--margin", type=float, default=0.25, help="box margin, as a fraction of the data's "
                                                                   "extent on each side (default 0.25)")
    parser.add_argument("--k", type=int, default=1000, help="particles of the VAE's IWAE-k test estimate")
    parser.add_argument("--grid", type=int, default=80, help="points per axis of the density pictures")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds one measured log Z of the cost table "
                                                                   "may take (predicted; default 30)")
    parser.add_argument("--max-dim", type=int, default=6, help="the cost table's dimensions 1..MAX_DIM (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.k, args.grid, args.budget = min(args.epochs, 5), min(args.k, 100), min(args.grid, 30), 0.3
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    data = load_dataset("circle", seed=args.seed)
    train_x, test_x = data.train.x, data.test.x

    # 1. The EBM, exact log Z by quadrature.
    box = data_box(train_x, args.margin, args.resolution)
    start = time.perf_counter()
    energy = train_ebm(train_x, box, epochs=args.epochs, batch_size=64, lr=2e-3, seed=args.seed)
    ebm_seconds = time.perf_counter() - start
    fine = Box(box.lo, box.hi, args.resolution * args.check_factor)
    with torch.no_grad():
        log_z, log_z_fine = float(box.log_integral(energy)), float(fine.log_integral(energy))
        log_p = ebm_log_likelihood(energy, box, test_x, torch.tensor(log_z))
    ebm_ll, ebm_se = log_p.mean().item(), (log_p.std() / math.sqrt(len(log_p))).item()
    atomic_write(out / "ebm_log_z.csv", pd.DataFrame({
        "grid": [f"{args.resolution}x{args.resolution}", f"{fine.resolution}x{fine.resolution}"],
        "log_z": [log_z, log_z_fine]}).to_csv(index=False))

    # 2. The VAE on the same split, and both densities on one grid.
    run = vae_run(out / f"vae-{args.epochs}epochs-seed{args.seed}", args)
    if not torch.equal(run.data.test.x, test_x):
        raise RuntimeError("the VAE's test split differs from the EBM's")
    vae = iwae_row(run.summary())
    corners = torch.stack([box.lo, box.hi])
    gx, gy, vae_log_p = log_density_grid(run.program, corners, grid_size=args.grid, k=min(args.k, 500), margin=0.0)
    yy, xx = torch.meshgrid(torch.as_tensor(gy), torch.as_tensor(gx), indexing="ij")
    with torch.no_grad():
        ebm_log_p = (-energy(torch.stack([xx, yy], -1)).squeeze(-1) - log_z).numpy()
    figure = plot_densities(out / "densities.png", gx, gy, [
        (f"EBM, exact log Z by quadrature\ntest log-likelihood {ebm_ll:.3f} nats", ebm_log_p),
        (f"VAE (importance sampling)\ntest {vae.estimator} {vae['mean']:.3f} nats", vae_log_p),
    ], np.asarray(data.meta["true_manifold"]))

    # 3. The quadrature's cost against the dimension.
    cost = quadrature_cost(args.resolution, args.max_dim, args.budget, args.seed)
    atomic_write(out / "quadrature_cost.csv", cost.to_csv(index=False))

    print(f"\ncircle data, {len(train_x)} training and {len(test_x)} test points, {args.epochs} epochs")
    print(f"EBM log Z on a {args.resolution}^2 grid: {log_z:.4f}; on a {fine.resolution}^2 grid: {log_z_fine:.4f} "
          f"(quadrature error about {abs(log_z - log_z_fine):.1e} nats); trained in {ebm_seconds:.1f} s")
    print(f"{'model':<6} {'test log-likelihood (nats/point)':>34}  how")
    print(f"{'EBM':<6} {ebm_ll:>25.3f} +- {ebm_se:.3f}  exact up to quadrature error (-E(x) - log Z)")
    print(f"{'VAE':<6} {vae['mean']:>25.3f} +- {vae['stderr']:.3f}  {vae.estimator} estimate (a stochastic lower bound)")
    print_cost(cost)
    print(f"\nwrote {figure}, {out / 'quadrature_cost.csv'}, {out / 'ebm_log_z.csv'}")
    return {"ebm_test_ll": ebm_ll, "vae_test_ll": float(vae["mean"]), "log_z": log_z, "log_z_fine": log_z_fine,
            "cost": cost, "figure": figure}


if __name__ == "__main__":
    main()
