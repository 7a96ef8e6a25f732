"""Bulk ESS per second per datapoint: batched HMC against Pyro's NUTS on the posteriors of a trained MNIST VAE.

What is compared
----------------
*Targets.* For each test image x_b the posterior p(z | x_b) of a Bernoulli
VAE (encoder 784 -> 400 -> 2*z, decoder z -> 400 -> 784, z = 50 by default)
with its weights fixed. The VAE is trained in this script with
``ppl_genmodels.fit`` for a couple of epochs on a few thousand MNIST training
images (``--train-epochs``, ``--train-examples``), or loaded with ``--run``.
Test images are the first ``--n`` MNIST t10k images binarized with a seeded
Bernoulli draw (random binary data when ``../shared/data/mnist`` is missing;
the output then says so).

*Samplers.*

- ``inference.mcmc.hmc_posterior``: all ``--n`` datapoints and all their
  chains in one vectorized sampler ([chains, batch, dim] tensors), 5 leapfrog
  steps on average (jittered), step size adapted per chain by dual averaging
  and a diagonal inverse mass per datapoint estimated in Stan-style windows.
- ``inference.mcmc.nuts_posterior``: Pyro's ``NUTS`` (step size by dual
  averaging, diagonal mass matrix adaptation), one datapoint and one chain at
  a time, which is how a per-datapoint reference sampler is normally run.
  NUTS is slow, so it runs on only the first ``--nuts-n`` datapoints; its
  seconds per datapoint is measured on those and *extrapolated* to the rest
  (every datapoint has the same network and the same dimension, so the cost
  per datapoint varies only with the posterior's geometry).

*Why the comparison is fair.* Both samplers target exactly the same
density, ``traces.LogJoint``'s log p(x_b, z(u)) + log|J| in unconstrained
space, evaluated by the same Pyro-traced model; both start from the
amortized guide's draws; both draw the same number of chains, warm-up
iterations and kept draws (``--chains``, ``--warmup``, ``--samples``); both
adapt a step size and a diagonal mass during warm-up and neither gets
anything the other does not. Wall times are those reported by the two
functions, which include their diagnostics (R-hat and ESS). NUTS picks
its trajectory length per iteration and HMC uses a fixed mean length, so
per draw NUTS usually mixes at least as well; the metric rewards whichever
turns seconds into independent draws faster.

*Metric.* For each method, ESS/s per datapoint =
(mean over datapoints of the smallest bulk ESS over the latent dimensions) /
(seconds per datapoint), with HMC's seconds per datapoint = its batched wall
time / n and NUTS's = its wall time / nuts_n. The last line is the ratio
HMC / NUTS.

*Agreement.* On the datapoints both ran, the posterior means must agree
within Monte Carlo error: the script prints the largest |mean difference| /
posterior SD over dimensions and datapoints, and the largest difference in
units of its Monte Carlo standard error, sqrt(var_hmc / ESS_hmc + var_nuts /
ESS_nuts) per dimension (bulk ESS per dimension). With 50 x nuts_n
comparisons, a largest z of up to about 3.5-4 is what chance alone gives.

Usage::

    python benchmarks/mcmc.py [--n 100] [--nuts-n 2] [--chains 4] [--samples 500] [--warmup 500]
                              [--leapfrog 5] [--z-dim 50] [--train-epochs 2] [--train-examples 5000]
                              [--run RUN_DIR] [--data-dir DIR] [--device auto|cpu|cuda] [--threads N]

The defaults took about 10 minutes on two CPU cores shared with other work, more than half of it in NUTS.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import (  # noqa: E402  (shared helpers of the evaluation benchmark)
    MNIST_DIR,
    SEED,
    load_average,
    pick_device,
    prepare,
    sync,
)

from ppl_genmodels.inference.mcmc import MCMCResult, diagnostics, hmc_posterior, nuts_posterior  # noqa: E402
from ppl_genmodels.traces import LatentLayout, LogJoint  # noqa: E402


# ---------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def gradient_seconds(model, x: torch.Tensor, chains: int, device: torch.device, repeats: int = 20) -> float:
    """Median seconds of one log-density-and-gradient evaluation of ``LogJoint`` at [chains, len(x), dim]."""
    joint = LogJoint(model.model, model.guide, x, None, start="prior")
    u = torch.randn(chains, x.shape[0], joint.dim, dtype=x.dtype, device=device)
    times = []
    with pyro.validation_enabled(False):
        for i in range(repeats + 3):
            sync(device)
            t0 = time.perf_counter()
            pos = u.detach().requires_grad_(True)
            value = joint(pos)[1]
            torch.autograd.grad(value.sum(), pos)
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return float(np.median(times))


def per_dim_moments(result: MCMCResult, layout: LatentLayout, points: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior mean, variance and bulk ESS per (datapoint, dimension) of the first ``points`` datapoints."""
    from ppl_genmodels.inference.diagnostics import ess_bulk

    draws = layout.flatten(result.samples, 3)[:, :, :points].cpu().double().numpy()  # [chains, draws, points, dim]
    flat = draws.reshape(-1, *draws.shape[2:])
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = ess_bulk(draws)
    return flat.mean(0), flat.var(0, ddof=1), ess


def diagnostics_seconds(result: MCMCResult, layout: LatentLayout) -> float:
    """Seconds of the diagnostics (R-hat, bulk and tail ESS of every datapoint and dimension at once) on
    ``result``'s draws, recomputed here."""
    t0 = time.perf_counter()
    diagnostics(layout.flatten(result.samples, 3))
    return time.perf_counter() - t0


def summary(values: torch.Tensor) -> str:
    v = values.double()
    return (f"min {v.min():.3f}, median {v.median():.3f}, mean {v.mean():.3f}, max {v.max():.3f}")


def report(tag: str, result: MCMCResult, points: int, chains: int, draws: int) -> tuple[float, float]:
    """Print one method's diagnostics; returns (mean min-bulk-ESS, seconds per datapoint)."""
    per_point = result.seconds / points
    ess = float(result.ess_bulk.double().mean())
    rhat = result.rhat
    print(f"{tag} datapoints: {points}")
    print(f"{tag} wall seconds: {result.seconds:.2f}")
    print(f"{tag} seconds per datapoint: {per_point:.3f}")
    print(f"{tag} R-hat (worst dimension per datapoint): {summary(rhat)}")
    print(f"{tag} datapoints with R-hat < 1.01: {int((rhat < 1.01).sum())} / {points}")
    print(f"{tag} bulk ESS (smallest dimension per datapoint): {summary(result.ess_bulk)} "
          f"(of {chains * draws} draws)")
    print(f"{tag} tail ESS (smallest dimension per datapoint): {summary(result.ess_tail)}")
    print(f"{tag} acceptance: {summary(result.accept_rate)}")
    print(f"{tag} divergent transitions: {int(result.divergences.sum())}")
    print(f"{tag} ESS/s per datapoint: {ess / per_point:.3f}")
    return ess, per_point


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="datapoints for batched HMC (default 100)")
    parser.add_argument("--nuts-n", type=int, default=2,
                        help="datapoints for NUTS, the first --nuts-n of the --n (default 2); its seconds "
                             "per datapoint is extrapolated from these")
    parser.add_argument("--chains", type=int, default=4, help="chains per datapoint, both methods (default 4)")
    parser.add_argument("--samples", type=int, default=500, help="kept draws per chain, both methods (default 500)")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up iterations per chain, both (default 500)")
    parser.add_argument("--leapfrog", type=int, default=5, help="HMC's mean number of leapfrog steps (default 5)")
    parser.add_argument("--z-dim", type=int, default=50, help="latent size of the VAE trained here (default 50)")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=5000)
    parser.add_argument("--run", type=Path, default=None, help="use the trained run in RUN_DIR instead of training")
    parser.add_argument("--data-dir", type=Path, default=MNIST_DIR, help=f"MNIST folder (default {MNIST_DIR})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    args = parser.parse_args(argv)
    if min(args.n, args.nuts_n, args.chains, args.samples, args.leapfrog, args.z_dim, args.train_epochs,
           args.train_examples) < 1 or args.warmup < 0:
        parser.error("counts must be >= 1 (--warmup >= 0)")
    if args.chains < 2:
        parser.error("--chains must be >= 2 for R-hat")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"torch: {torch.__version__}")
    print(f"pyro: {pyro.__version__}")
    try:
        from ppl_genmodels.inference.mcmc import _arviz

        print(f"arviz: {_arviz().__version__}")
    except Exception:  # diagnostics would fail below anyway
        print("arviz: unavailable")
    print(f"threads: {torch.get_num_threads()}")
    print(f"cpu count: {os.cpu_count()}")
    print(f"load average at start (1, 5, 15 min): {load_average()}")

    with tempfile.TemporaryDirectory(prefix="bench-mcmc-") as tmp:
        pyro.set_rng_seed(SEED)
        model, x, notes = prepare(args, device, Path(tmp), z_dim=args.z_dim)
    for line in notes:
        print(line)
    n = len(x)
    nuts_n = min(args.nuts_n, n)
    layout = LogJoint(model.model, model.guide, x[:1], None, start="prior").layout  # the flat view of the draws
    dim = layout.dim
    print(f"latent dimensions per datapoint: {dim}")
    print(f"chains x (warm-up + draws) per datapoint, both methods: {args.chains} x ({args.warmup} + {args.samples})")
    print(f"HMC: {n} datapoints in one batched call, {args.leapfrog} leapfrog steps on average")
    print(f"NUTS: first {nuts_n} datapoints, one datapoint and one chain at a time; "
          f"its seconds per datapoint is EXTRAPOLATED from these {nuts_n}")

    # one gradient of the log density: the unit of work both samplers repeat
    g_batched = gradient_seconds(model, x, args.chains, device)
    g_single = gradient_seconds(model, x[:1], 1, device)
    print(f"gradient seconds, [{args.chains} chains x {n} datapoints] at once: {g_batched * 1e3:.2f} ms "
          f"({g_batched / n * 1e3:.3f} ms per datapoint)")
    print(f"gradient seconds, one chain of one datapoint: {g_single * 1e3:.2f} ms")

    common = dict(num_chains=args.chains, num_samples=args.samples, warmup=args.warmup, start="guide", warn=False)

    # warm-up of thread pools and Pyro's first-call work, untimed
    pyro.set_rng_seed(SEED)
    hmc_posterior(model.model, model.guide, x[:2], num_chains=2, num_samples=5, warmup=5, warn=False)

    pyro.set_rng_seed(SEED)
    sync(device)
    hmc = hmc_posterior(model.model, model.guide, x, num_leapfrog=args.leapfrog, **common)
    sync(device)
    hmc_ess, hmc_sec = report("hmc", hmc, n, args.chains, args.samples)
    iterations = args.warmup + args.samples
    print(f"hmc seconds per iteration (all chains and datapoints): {hmc.seconds / iterations * 1e3:.1f} ms "
          f"(~{hmc.seconds / iterations / args.leapfrog * 1e3:.2f} ms per leapfrog step; "
          f"a bare gradient is {g_batched * 1e3:.2f} ms)")

    pyro.set_rng_seed(SEED + 1)
    sync(device)
    nuts = nuts_posterior(model.model, model.guide, x[:nuts_n], **common)
    sync(device)
    nuts_ess, nuts_sec = report("nuts", nuts, nuts_n, args.chains, args.samples)
    transitions = nuts_n * args.chains * iterations
    grads = nuts.seconds / g_single
    print(f"nuts seconds per transition (one chain, one datapoint): {nuts.seconds / transitions * 1e3:.1f} ms "
          f"(~{grads / transitions:.1f} bare-gradient times per transition)")

    # ---- agreement on the shared datapoints ------------------------------------------------- #
    mean_h, var_h, ess_h = per_dim_moments(hmc, layout, nuts_n)
    mean_n, var_n, ess_n = per_dim_moments(nuts, layout, nuts_n)
    sd = np.sqrt(0.5 * (var_h + var_n))
    diff = np.abs(mean_h - mean_n)
    mcse = np.sqrt(var_h / ess_h + var_n / ess_n)
    z = diff / mcse
    print(f"agreement on {nuts_n} shared datapoints x {dim} dimensions:")
    print(f"  max |mean difference| / posterior SD: {float(np.max(diff / sd)):.3f}")
    print(f"  max |mean difference| / its Monte Carlo SE: {float(np.max(z)):.2f} "
          f"(median {float(np.median(z)):.2f}; |z| > 4 in {int((z > 4).sum())} of {z.size})")
    print(f"  max |SD ratio - 1| (HMC SD / NUTS SD): {float(np.max(np.abs(np.sqrt(var_h / var_n) - 1))):.3f}")
    print(f"  means agree within Monte Carlo error: {'yes' if float(np.max(z)) < 4.5 else 'NO'}")

    print(f"load average at end (1, 5, 15 min): {load_average()}")
    hmc_rate = hmc_ess / hmc_sec
    nuts_rate = nuts_ess / nuts_sec
    print(f"per datapoint, HMC: {hmc_ess:.1f} ESS in {hmc_sec:.3f} s = {hmc_rate:.2f} ESS/s")
    print(f"per datapoint, NUTS: {nuts_ess:.1f} ESS in {nuts_sec:.3f} s = {nuts_rate:.2f} ESS/s "
          f"(extrapolated from {nuts_n} datapoints)")
    # the same figures without the diagnostics, which both functions include in their wall time
    hmc_diag, nuts_diag = diagnostics_seconds(hmc, layout), diagnostics_seconds(nuts, layout)
    hmc_bare, nuts_bare = (hmc.seconds - hmc_diag) / n, (nuts.seconds - nuts_diag) / nuts_n
    print(f"diagnostics seconds (recomputed), HMC: {hmc_diag:.2f} ({hmc_diag / n * 1e3:.1f} ms per datapoint); "
          f"NUTS: {nuts_diag:.2f} ({nuts_diag / nuts_n * 1e3:.1f} ms per datapoint)")
    print(f"sampling only, seconds per datapoint: HMC {hmc_bare:.3f}, NUTS {nuts_bare:.3f}; "
          f"ESS/s ratio {(hmc_ess / hmc_bare) / (nuts_ess / nuts_bare):.1f}")
    print(f"ESS per draw ratio (HMC / NUTS): {hmc_ess / nuts_ess:.3f}")
    print(f"seconds per datapoint ratio (NUTS / HMC): {nuts_sec / hmc_sec:.1f}")
    print(f"ESS/s per datapoint ratio (batched HMC / NUTS): {hmc_rate / nuts_rate:.1f}")


if __name__ == "__main__":
    main()
