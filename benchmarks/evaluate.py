"""Throughput and memory of per-datapoint log p(x) evaluation for a trained MNIST VAE.

What is measured
----------------
*Model.* A Bernoulli VAE on binarized MNIST (encoder 784 -> 400 -> 2*50,
decoder 50 -> 400 -> 784), trained in this script with ``ppl_genmodels.fit``
for a couple of epochs on a few thousand images (``--train-epochs``,
``--train-examples``), or loaded from an existing run with ``--run``. Test
images are the MNIST t10k file, binarized once with a seeded Bernoulli draw.
Without ``../shared/data/mnist`` the script trains and evaluates on random
binary data of the same shape and says so.

1. *IWAE-k throughput.* IWAE-k (k = 5000 by default) for each of ``--n`` test
   images, computed with the toolkit's streaming estimator
   ``inference.importance.streaming_estimates`` (the particles in chunks, a
   running logsumexp across them). A *chunk* is the number of decoder rows
   per pass, particles per pass x datapoints per call (``--batch``); the
   particle chunk is what bounds memory. For each chunk in ``--chunk`` the whole
   evaluation is timed ``--repeats`` times (the chunk sizes taking turns) and
   reported as samples/s (particles x datapoints per second) and as achieved
   GFLOP/s, counting 2 * in * out FLOPs per row for every linear layer: the
   decoder once per particle and the encoder once per datapoint (bias adds and
   activations are not counted). Right before and after every timed
   evaluation, the script times a bare float32 matmul with the shape of the
   decoder's largest layer at the same number of rows
   (``[rows, 400] x [400, 784]``, median of ``--gemm-repeats`` products), with
   ATen's ``matmul`` and, on a CPU with oneDNN, oneDNN's linear kernel, and
   takes the faster (on AMD processors oneDNN's, about twice MKL's). The
   *matmul fraction* is the achieved rate of the fastest evaluation over the
   fastest GEMM measurement at that chunk; the per-repeat ratios against the
   GEMM timed around each evaluation are printed too. Best-of on both sides
   is deliberate: on a shared machine other processes slow a long evaluation
   far more than a millisecond matmul (two OpenMP threads on two busy cores
   lose whole time slices at every parallel region, and the evaluation runs
   thousands of small kernels), so the fastest repeat is the closest to what
   the code does on an idle machine. The best chunk is the one with the
   highest fraction.

2. *Peak memory against k.* IWAE-k for several k (``--mem-k``) on ``--mem-n``
   images at one fixed chunk (the best one from 1). On the CPU each k runs in
   a fresh subprocess, because the peak resident size is a high-water mark
   that never goes down within a process (``tracemalloc`` would not see
   torch's allocations). The subprocess loads the model and data, records its
   resident size, evaluates, and reports the peak; the difference is the
   evaluation's working set. The peak is read as ``VmHWM`` from
   /proc/self/status, reset after loading where the kernel allows it (writing
   5 to /proc/self/clear_refs); ``getrusage(...).ru_maxrss`` is not used on
   Linux because a child keeps there the resident size of the parent it was
   forked from (this script's process, several hundred MiB after training).
   On CUDA, ``torch.cuda.max_memory_allocated`` is read in-process after a
   reset. The peak must not grow with k: the criterion printed is growth at
   the largest k <= 1.25 x growth at the smallest k + 16 MiB.

   The whole command, by n: ``ppl-genmodels evaluate RUN --estimators
   elbo,iwae:K --count N`` for each N of ``--mem-n-list`` (default 100, 1,000,
   10,000; the run's test split caps N, so pass ``--run`` with a run trained
   on full MNIST for 10,000), each in a fresh interpreter that prints its own
   ``VmHWM`` at the end: the peak resident size of loading, the padded passes
   and the tables together, the figure a user sees. It must stay under 1.5 GB
   whatever N.

3. *AIS.* ``inference.ais.ais`` (HMC transitions, 10 leapfrog steps, sigmoid
   schedule) with ``--ais-steps`` steps and ``--ais-chains`` chains on the
   first ``--ais-n`` images in one batched call, starting from ``--ais-init``
   (its ``start``): seconds per datapoint, mean HMC acceptance, and the AIS
   estimate next to IWAE-k on the same images (a decent schedule puts AIS at
   or above IWAE on average).

What limits the matmul fraction
-------------------------------
Per particle the decoder does 2 x (50 x 400 + 400 x 784) ~ 0.67 MFLOP of
matrix products, i.e. 800 FLOPs of GEMM for each of the 784 output logits. A
bare GEMM reaches the machine's matmul rate; the evaluation adds, per logit,
work that runs at memory or transcendental speed, not at matmul speed:

- the Bernoulli log-likelihood over 784 pixels per particle.
  ``Bernoulli(logits).log_prob`` is torch's ``binary_cross_entropy_with_logits``,
  which on the CPU runs as separate kernels over the ``[rows, 784]`` logits
  (negation, log-sigmoid, a multiply, two subtractions, a fill), each reading
  and writing a full ``rows x 784`` tensor, then a sum over pixels. Its core is
  one softplus (an exp and a log1p) per logit; that transcendental pass alone
  costs roughly a quarter of the output layer's GEMM time, so it caps the
  fraction well below 1 even when perfectly fused;
- the output layer's bias, copied into every row of the addmm result before
  the GEMM, and the hidden layer's ReLU;
- the thin first layer (50 -> 400), whose GEMM runs far below peak;
- per particle, the guide's reparameterised sample, softplus scale and
  ``Normal`` log-density and the prior's log-density over 50 latents; per
  pass, Pyro's tracing of guide and model and the encoder (rerun on every
  chunk; the FLOP count credits it once per datapoint);
- page faults. Every pass allocates several fresh ``rows x 784`` float32
  temporaries (3 MiB each at 1000 rows, 50 MiB at 16000). glibc serves large
  blocks with mmap or from the top of its heap and hands them back to the
  kernel when they are freed (above ``M_MMAP_THRESHOLD``, at most 32 MiB, or
  once more than ``M_TRIM_THRESHOLD`` is free at the top), so the next pass
  touches fresh pages again: one minor fault and a page zeroing per 4 KiB,
  which is expensive in a VM. Whether a given chunk size hits this depends on
  the allocator's history, which is why the script prints minor faults per
  pass next to each fraction; a chunk with many faults has a visibly lower
  fraction.

Small chunks pay the per-pass overhead more often; larger ones are the ones
that fault, so with the default allocator the fraction peaks at a middle
chunk. What would raise it: keeping freed memory in the process (a caching
allocator such as jemalloc or tcmalloc via ``LD_PRELOAD``, or, with glibc,
both ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set large in
the environment; setting the trim threshold alone makes things worse, since
it freezes the mmap threshold at its 128 KiB default), fewer full-size
temporaries in the likelihood (``x * logits - softplus(logits)`` is the same
log-density in one transcendental pass), and fusing bias, softplus and the
pixel sum into one pass over the GEMM output (``torch.compile`` of the
decoder and likelihood). ``--compile on`` does the last two: each particle
chunk's log-weights run as one captured graph (``ppl_genmodels.compiled``),
Inductor fuses the likelihood into the passes over the decoder's output, and
the products run through oneDNN.

Each chunk size also prints the rate of the decoder's products alone (its two
layers on the pass's row count, the same kernel, nothing else): an upper bound on
the fraction. On this project's 2-core AMD CPU, compiled, at 4,000 rows: the pass
0.59 of the GEMM, the products alone 0.95. ``torch.profiler`` on the compiled
pass (k = 2,000, 100 images) put 70% of its time in oneDNN's products, which in
the pass ran at about 0.81 of the GEMM's rate (the likelihood and the draws
between them leave the weights and activations out of cache), 18% in the fused
likelihood kernel (an exp and a log1p per logit, 0.55 ns per logit on 2 threads)
and 6% in the streams' normal draws.

Usage::

    python benchmarks/evaluate.py [--k 5000] [--n 100] [--chunk 1000,4000,16000] [--batch 100]
                                  [--repeats 3] [--gemm-repeats 10]
                                  [--train-epochs 2] [--train-examples 5000] [--run RUN_DIR] [--data-dir DIR]
                                  [--mem-k 500,5000,20000] [--mem-n 20] [--mem-chunk ROWS] [--skip-memory]
                                  [--ais-steps 1000] [--ais-chains 16] [--ais-n 10] [--ais-init prior|guide]
                                  [--skip-ais] [--device auto|cpu|cuda] [--threads N] [--compile off|on]
                                  [--mem-n-list 100,1000,10000] [--skip-memory-n]

``--n 10000`` evaluates the whole MNIST test set (about six minutes a pass on
two cores at k = 5000; add ``--repeats 1``).

Every figure is printed as a ``name: value`` line; the last three lines
summarise (a) samples/s and matmul fraction, (b) peak memory by k,
(c) AIS seconds per datapoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from torch import nn

from ppl_genmodels.inference.importance import streaming_estimates
from ppl_genmodels.programs import Program

SEED = 0
X_DIM = 784
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
MIB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return torch.device(name)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every ``nn.Linear`` in ``module``, in order."""
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def flops_per_row(module: nn.Module) -> int:
    """Matrix-product FLOPs of one row through ``module``: 2 * in * out per linear layer."""
    return sum(2 * a * b for a, b in linear_shapes(module))


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-size high-water mark to the current size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads): first touches of freshly mapped memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unavailable"


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc; falls back to the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * PAGE / MIB
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """The peak resident set size of this process's address space.

    On Linux this is ``VmHWM`` from /proc/self/status: ``ru_maxrss`` is the same
    high-water mark but also keeps the largest one the process had before its
    ``exec``, and a child forked from a big parent starts with the parent's
    resident size there. Elsewhere, ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024.0


# ---------------------------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------------------------


def find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def mnist_test_images(folder: Path, n: int) -> torch.Tensor | None:
    """The first ``n`` t10k images as [n, 784] binary float32 (seeded Bernoulli draw), or None if absent."""
    path = find_idx(folder, "t10k-images-idx3-ubyte")
    if path is None:
        return None
    from ppl_genmodels.data import read_idx

    images = read_idx(path)[:n]
    probs = torch.from_numpy(images.reshape(len(images), -1).astype("float32")) / 255.0
    return torch.bernoulli(probs, generator=torch.Generator().manual_seed(SEED))


def random_binary(n: int, seed: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, X_DIM), 0.5), generator=torch.Generator().manual_seed(seed))


def prepare(args, device: torch.device, workdir: Path, z_dim: int = 50):
    """(model, test images [n, 784] on ``device``, description lines)."""
    notes = []
    if args.run is not None:
        from ppl_genmodels import load_run

        run = load_run(args.run, device=str(device))
        model = run.model
        notes.append(f"model: {type(model).__name__} from run {args.run} (epoch {run.epoch})")
        x = None
        if run.config.data == "mnist":
            folder = Path(run.config.data_options.data_dir or args.data_dir)
            x = mnist_test_images(folder, args.n)
            if x is not None:
                notes.append(f"data: MNIST t10k from {folder} (first {len(x)} images, seeded binarisation)")
        if x is None:
            x = run.data.test.x[: args.n].cpu()
            notes.append(f"data: the run's own test split ({len(x)} points)")
        return model.eval(), x.to(device), notes

    from ppl_genmodels import fit

    common = dict(hidden=[400], z_dim=z_dim, epochs=args.train_epochs, eval_k=10, patience=None,
                  device=str(device), seed=SEED)
    have_mnist = find_idx(Path(args.data_dir), "t10k-images-idx3-ubyte") is not None and \
        find_idx(Path(args.data_dir), "train-images-idx3-ubyte") is not None
    started = time.perf_counter()
    if have_mnist:
        run = fit("vae", "mnist", out=workdir / "run", data_dir=str(args.data_dir),
                  max_examples=args.train_examples, progress=False, evaluate=False, plots=False, **common)
        x = mnist_test_images(Path(args.data_dir), args.n)
        notes.append(f"data: MNIST t10k from {args.data_dir} (first {len(x)} images, seeded binarisation)")
    else:
        train = random_binary(args.train_examples, SEED + 1).numpy()
        np.save(workdir / "random-binary.npy", train)
        run = fit("vae", str(workdir / "random-binary.npy"), out=workdir / "run", likelihood="bernoulli",
                  progress=False, evaluate=False, plots=False, **common)
        x = random_binary(args.n, SEED + 2)
        notes.append(f"data: RANDOM binary data [{args.n}, {X_DIM}] -- MNIST NOT FOUND at {args.data_dir}; "
                     "the figures below describe speed only, not a meaningful model")
    seconds = time.perf_counter() - started
    last = run.metrics.iloc[-1]
    notes.append(f"model: VAE {X_DIM}-400-{z_dim} trained here for {args.train_epochs} epochs on "
                 f"{args.train_examples} examples ({seconds:.1f} s; val ELBO {last['val_elbo']:.2f} nats)")
    return run.model.eval(), x.to(device), notes


# ---------------------------------------------------------------------------------------------
# IWAE-k, chunked
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def iwae_batch(model, x: torch.Tensor, k: int, particles: int) -> torch.Tensor:
    """IWAE-k [batch] for one batch of data, ``particles`` particles per pass."""
    _, iwae = streaming_estimates(model.model, model.guide, x, None, k=k, chunk_size=particles)
    return iwae.value


def iwae_all(model, x: torch.Tensor, k: int, rows: int, batch: int) -> tuple[torch.Tensor, int, int]:
    """IWAE-k for every row of ``x``: (values [n], particles per pass, datapoints per call)."""
    batch = min(batch, x.shape[0])
    particles = max(1, min(k, rows // batch))
    values = [iwae_batch(model, xb, k, particles) for xb in x.split(batch)]
    return torch.cat(values), particles, batch


GEMM_KERNELS: dict[str, float] = {}  # the last rate of each kernel, for the report


@torch.no_grad()
def decoder_products_gflops(shapes: list[tuple[int, int]], rows: int, device: torch.device, repeats: int) -> float:
    """The decoder's matrix products alone on ``rows`` rows, layer after layer with a ReLU between (GFLOP/s).

    ``shapes``: the decoder's ``(in, out)`` layers. The fastest kernel of the GEMM timing
    (oneDNN's linear on a CPU that has it, else ATen's ``matmul``), so no likelihood, draws,
    encoder or bias pass: the rate an IWAE pass would reach if all its other work were
    free, i.e. the ceiling of its matmul fraction at this chunk size.
    """
    weights = [torch.randn(out, inp, device=device) / inp**0.5 for inp, out in shapes]
    x = torch.randn(rows, shapes[0][0], device=device)
    onednn = device.type == "cpu" and torch.backends.mkldnn.is_available()
    linear = torch.ops.mkldnn._linear_pointwise.default if onednn else None

    def products():
        h = x
        for i, w in enumerate(weights):
            h = linear(h, w, None, "none", [], "") if onednn else h @ w.t()
            if i < len(weights) - 1:
                h = h.relu_()
        return h

    return 2.0 * rows * sum(i * o for i, o in shapes) / median_seconds(products, device, repeats) / 1e9


def median_seconds(kernel, device: torch.device, repeats: int) -> float:
    """Median wall time of ``kernel()`` over ``repeats`` calls, after two untimed ones."""
    for _ in range(2):
        kernel()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        kernel()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def gemm_gflops(rows: int, inner: int, outer: int, device: torch.device, repeats: int) -> float:
    """float32 ``[rows, inner] x [inner, outer]`` matmul rate, median over ``repeats`` (GFLOP/s).

    The faster of ATen's ``matmul`` and, on a CPU with oneDNN, oneDNN's linear kernel
    (the one a compiled program's products use, ``ppl_genmodels.compiled``): on AMD
    processors MKL, behind ATen's float32 ``matmul``, runs at about half of oneDNN's rate.
    """
    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, outer, device=device)
    out = torch.empty(rows, outer, device=device)
    kernels = {"aten": lambda: torch.matmul(a, b, out=out)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        linear = torch.ops.mkldnn._linear_pointwise.default
        kernels["onednn"] = lambda: linear(a, b.t(), None, "none", [], "")
    for name, kernel in kernels.items():
        GEMM_KERNELS[name] = 2.0 * rows * inner * outer / median_seconds(kernel, device, repeats) / 1e9
    return max(GEMM_KERNELS.values())


# ---------------------------------------------------------------------------------------------
# peak memory per k
# ---------------------------------------------------------------------------------------------


def memory_probe(path: str, k: int, rows: int, batch: int, device_name: str) -> None:
    """Subprocess entry: evaluate IWAE-k once and print one JSON line of memory figures."""
    device = torch.device(device_name)
    payload = torch.load(path, map_location=device, weights_only=False)
    model, x = payload["model"].eval(), payload["x"].to(device)
    pyro.set_rng_seed(SEED)
    reset = reset_peak_rss()
    before = current_rss_mib()
    peak_before = peak_rss_mib()
    t0 = time.perf_counter()
    values, particles, batch = iwae_all(model, x, k, rows, batch)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    print(json.dumps({"k": k, "rss_before_mib": before, "peak_before_mib": peak_before, "peak_mib": peak,
                      "growth_mib": peak - before, "peak_reset": reset, "particles": particles, "batch": batch,
                      "seconds": seconds, "iwae_mean": float(values.mean())}))


def memory_by_k(model, x, ks, rows, batch, device, threads, workdir: Path) -> list[dict]:
    results = []
    if device.type == "cuda":
        for k in ks:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / MIB
            iwae_all(model, x, k, rows, batch)
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) / MIB
            results.append({"k": k, "rss_before_mib": base, "peak_mib": peak, "growth_mib": peak - base})
        return results
    path = workdir / "probe.pt"
    torch.save({"model": model.cpu(), "x": x.cpu()}, path)
    model.to(device)
    for k in ks:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(path), "--k", str(k),
               "--chunk", str(rows), "--batch", str(batch), "--device", "cpu", "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"memory probe for k={k} failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(lines[-1]))
    return results


#: run in a fresh interpreter: the toolkit's own ``evaluate`` command, then its peak resident size (VmHWM)
_EVALUATE_AND_REPORT = (
    "import json, sys\n"
    "from ppl_genmodels.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print(json.dumps({'exit': code, 'peak_mib': peak / 1024}))\n"
)


def memory_by_n(run_dir: Path, ns: list[int], k: int, threads: int) -> list[dict]:
    """Peak resident size of the whole ``ppl-genmodels evaluate RUN --estimators elbo,iwae:K --count N``
    command (the toolkit's own pipeline: loading, sharding, padded passes, tables), one fresh process per N."""
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    stamp = time.strftime("%Y%m%d%H%M%S")
    for n in ns:
        name = f"memory-n{n}-{stamp}"
        cmd = [sys.executable, "-c", _EVALUATE_AND_REPORT, "evaluate", str(run_dir), "--estimators", f"elbo,iwae:{k}",
               "--count", str(n), "--quiet", "--name", name]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - started
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"evaluate --count {n} failed:\n{done.stderr[-2000:]}")
        summary = Path(run_dir) / "evaluation" / name / "summary.csv"
        evaluated = int(pd.read_csv(summary)["n"].iloc[0]) if summary.is_file() else n
        results.append({"n": n, "evaluated": evaluated, "seconds": seconds, **json.loads(lines[-1])})
    return results


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5000, help="IWAE particles per datapoint (default 5000)")
    parser.add_argument("--n", type=int, default=100, help="test images (default 100; 10000 = the whole test set)")
    parser.add_argument("--chunk", type=int_list, default=[1000, 4000, 16000],
                        help="decoder rows per pass to try, comma-separated (default 1000,4000,16000); "
                             "particles per pass = rows // batch")
    parser.add_argument("--batch", type=int, default=100, help="datapoints per estimator call (default 100)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed evaluations per chunk size, chunk sizes taking turns (default 3)")
    parser.add_argument("--gemm-repeats", type=int, default=10, help="matmul timings per GEMM measurement (default 10)")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=5000)
    parser.add_argument("--run", type=Path, default=None, help="use the trained run in RUN_DIR instead of training")
    parser.add_argument("--data-dir", type=Path, default=MNIST_DIR, help=f"MNIST folder (default {MNIST_DIR})")
    parser.add_argument("--mem-k", type=int_list, default=[500, 5000, 20000],
                        help="k values for the peak-memory table (default 500,5000,20000)")
    parser.add_argument("--mem-n", type=int, default=20, help="images for the peak-memory table (default 20)")
    parser.add_argument("--mem-chunk", type=int, default=None, help="rows per pass there (default: the best --chunk)")
    parser.add_argument("--ais-steps", type=int, default=1000)
    parser.add_argument("--ais-chains", type=int, default=16)
    parser.add_argument("--ais-n", type=int, default=10, help="images for AIS, batched in one call (default 10)")
    parser.add_argument("--ais-init", choices=("prior", "guide"), default="prior",
                        help="AIS initial distribution, the start of inference.ais.ais "
                             "(default prior, as in Wu et al. 2017)")
    parser.add_argument("--skip-ais", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--mem-n-list", type=int_list, default=[100, 1000, 10000],
                        help="datapoints of the whole-command memory check (default 100,1000,10000; capped by the "
                             "run's test split: pass --run with a run on full MNIST for 10000)")
    parser.add_argument("--skip-memory-n", action="store_true", help="skip the whole-command memory check")
    parser.add_argument("--compile", choices=("off", "on"), default="off",
                        help="on: IWAE's particle chunks as one compiled graph each (ppl_genmodels.compiled)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    if args.memory_probe is not None:
        memory_probe(args.memory_probe, args.k, args.chunk[0], args.batch, str(device))
        return
    if min(args.k, args.n, args.batch, args.repeats, args.gemm_repeats, args.train_epochs, args.train_examples,
           args.mem_n, args.ais_steps, args.ais_chains, args.ais_n) < 1:
        parser.error("counts must be >= 1")

    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"torch: {torch.__version__}")
    print(f"pyro: {pyro.__version__}")
    print(f"threads: {torch.get_num_threads()}")
    print(f"cpu count: {os.cpu_count()}")
    print(f"load average at start (1, 5, 15 min): {load_average()}")
    print("IWAE path: inference.importance.streaming_estimates")

    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        workdir = Path(tmp)
        pyro.set_rng_seed(SEED)
        model, x, notes = prepare(args, device, workdir)
        for line in notes:
            print(line)
        if len(x) < args.n:
            print(f"note: only {len(x)} test points available (asked for {args.n})")
        n = len(x)

        # ---- 1. IWAE-k throughput --------------------------------------------------------- #
        enc_shapes = linear_shapes(model.encoder)
        dec_shapes = linear_shapes(model.decoder)
        enc_flops, dec_flops = flops_per_row(model.encoder), flops_per_row(model.decoder)
        inner, outer = max(dec_shapes, key=lambda s: s[0] * s[1])
        total_flops = n * (args.k * dec_flops + enc_flops)
        print(f"encoder layers: {enc_shapes}")
        print(f"decoder layers: {dec_shapes}")
        print(f"decoder MFLOP per particle: {dec_flops / 1e6:.4f}")
        print(f"encoder MFLOP per datapoint: {enc_flops / 1e6:.4f}")
        print(f"IWAE k: {args.k}")
        print(f"IWAE datapoints: {n}")
        print(f"IWAE total GFLOP per evaluation: {total_flops / 1e9:.1f}")

        # warm-up: one small pass (thread pools, allocator, Pyro's first-call work)
        pyro.set_rng_seed(SEED)
        iwae_all(model, x[: min(n, args.batch)], min(args.k, 50), args.chunk[0], args.batch)
        evaluator = model  # the IWAE timings' model: as it is, or its hot paths compiled
        if args.compile == "on":
            # every pass shape of every chunk size captured and compiled before the timing starts
            evaluator = Program(model).accelerate(compile=True)
            began = time.perf_counter()
            for rows in args.chunk:
                iwae_all(evaluator, x, args.k, rows, args.batch)
            print(f"compiled path (--compile on): capturing and compiling every pass shape, plus one untimed "
                  f"evaluation per chunk size: {time.perf_counter() - began:.1f} s")

        # Chunk sizes take turns within each repeat, so that drifts in machine load hit all alike.
        stats = {rows: {"secs": [], "gemms": [], "paired": [], "faults": []} for rows in args.chunk}
        layout, values_at = {}, {}
        for _ in range(args.repeats):
            for rows in args.chunk:
                g_before = gemm_gflops(rows, inner, outer, device, args.gemm_repeats)
                pyro.set_rng_seed(SEED)
                sync(device)
                f0 = minor_faults()
                t0 = time.perf_counter()
                values, particles, batch = iwae_all(evaluator, x, args.k, rows, args.batch)
                sync(device)
                seconds = time.perf_counter() - t0
                st_faults = minor_faults() - f0
                g_after = gemm_gflops(rows, inner, outer, device, args.gemm_repeats)
                st = stats[rows]
                st["secs"].append(seconds)
                st["gemms"] += [g_before, g_after]
                st["faults"].append(st_faults)
                st["paired"].append(total_flops / seconds / 1e9 / statistics.mean([g_before, g_after]))
                layout[rows], values_at[rows] = (particles, batch), values.cpu()

        sweep = []
        for rows in args.chunk:
            st = stats[rows]
            particles, batch = layout[rows]
            real_rows = particles * batch
            fastest, med_s = min(st["secs"]), statistics.median(st["secs"])
            gemm_best, gemm_med = max(st["gemms"]), statistics.median(st["gemms"])
            achieved = total_flops / fastest / 1e9
            fraction = achieved / gemm_best
            tag = f"iwae[chunk={rows}]"
            print(f"{tag} rows per pass: {real_rows} ({particles} particles x {batch} datapoints)")
            print(f"{tag} seconds per evaluation, best: {fastest:.2f} "
                  f"(median {med_s:.2f}; repeats {', '.join(f'{v:.2f}' for v in st['secs'])})")
            print(f"{tag} samples/s, best: {n * args.k / fastest:,.0f} (median {n * args.k / med_s:,.0f})")
            print(f"{tag} achieved GFLOP/s, best: {achieved:.1f} (median {total_flops / med_s / 1e9:.1f})")
            print(f"{tag} GEMM GFLOP/s [{real_rows}x{inner}]x[{inner}x{outer}], best: {gemm_best:.1f} "
                  f"(median {gemm_med:.1f}; the faster kernel of "
                  + ", ".join(f"{name} {rate:.0f}" for name, rate in GEMM_KERNELS.items()) + " in the last timing)")
            print(f"{tag} matmul fraction, best / best: {fraction:.3f} "
                  f"(per repeat against the GEMM timed around it: {', '.join(f'{v:.3f}' for v in st['paired'])})")
            ceiling = decoder_products_gflops(dec_shapes, real_rows, device, args.gemm_repeats)
            print(f"{tag} the decoder's products alone (no likelihood, draws or encoder), same kernel: "
                  f"{ceiling:.1f} GFLOP/s = {ceiling / gemm_best:.3f} of the GEMM (an upper bound on the fraction)")
            passes = math.ceil(n / batch) * math.ceil(args.k / particles)
            faults = statistics.median(st["faults"]) / passes
            print(f"{tag} minor page faults per pass: {faults:,.0f} ({faults * PAGE / MIB:.1f} MiB of pages "
                  f"touched for the first time; {passes} passes per evaluation)")
            sweep.append({"rows": rows, "real_rows": real_rows, "seconds": fastest, "samples": n * args.k / fastest,
                          "gflops": achieved, "gemm": gemm_best, "fraction": fraction, "values": values_at[rows],
                          "ceiling": ceiling / gemm_best})
        best = max(sweep, key=lambda r: r["fraction"])
        iwae_values = best["values"]
        print(f"IWAE-{args.k} mean log p(x) (nats): {iwae_values.mean():.3f}")
        print(f"best chunk (highest matmul fraction): {best['rows']} (rows per pass {best['real_rows']})")

        # ---- 2. peak memory by k --------------------------------------------------------- #
        mem = []
        mem_rows = args.mem_chunk or best["rows"]
        if not args.skip_memory:
            xm = x[: args.mem_n]
            mem = memory_by_k(model, xm, args.mem_k, mem_rows, args.batch, device, torch.get_num_threads(), workdir)
            if device.type == "cuda":
                where = "torch.cuda.max_memory_allocated, in process"
            else:
                reset = "reset after loading" if all(r.get("peak_reset") for r in mem) else "not resettable here"
                where = f"peak RSS (VmHWM, {reset}), one fresh subprocess per k"
            print(f"memory: {len(xm)} datapoints, chunk {mem_rows} rows "
                  f"({mem[0].get('particles', '?')} particles x {mem[0].get('batch', '?')} datapoints per pass); {where}")
            for r in mem:
                if "particles" in r and r["particles"] < mem[-1]["particles"]:
                    print(f"note: k={r['k']} is below the particles per pass; that run used {r['particles']}")
                print(f"memory[k={r['k']}] before evaluation MiB: {r['rss_before_mib']:.1f}")
                print(f"memory[k={r['k']}] peak MiB: {r['peak_mib']:.1f}")
                print(f"memory[k={r['k']}] growth over before MiB: {r['growth_mib']:.1f}")
            kmax = max(args.mem_k)
            naive = kmax * len(xm) * X_DIM * 4 / MIB
            print(f"memory reference: one unchunked pass at k={kmax} would hold [k, n, 784] float32 logits "
                  f"of {naive:.0f} MiB")
            lo, hi = mem[0], mem[-1]
            flat = hi["growth_mib"] <= 1.25 * max(lo["growth_mib"], 0.0) + 16.0
            print(f"memory flat in k (growth at k={hi['k']} <= 1.25 x growth at k={lo['k']} + 16 MiB): "
                  f"{'yes' if flat else 'NO'}")

        # ---- 3. AIS ---------------------------------------------------------------------- #
        ais_line = "skipped"
        if not args.skip_ais:
            from ppl_genmodels.inference.ais import ais

            xa = x[: args.ais_n]  # the first of the IWAE points, so their IWAE-k values are at hand
            m = len(xa)
            iw = iwae_values[:m]
            if m < args.ais_n:
                print(f"note: AIS runs on the {m} IWAE points (asked for {args.ais_n}; raise --n for more)")
            pyro.set_rng_seed(SEED)
            sync(device)
            t0 = time.perf_counter()
            result = ais(model.model, model.guide, xa, num_steps=args.ais_steps, num_chains=args.ais_chains,
                         start=args.ais_init)
            sync(device)
            seconds = time.perf_counter() - t0
            log_z = result.log_z.cpu()
            diff = log_z - iw
            print(f"AIS steps: {args.ais_steps}")
            print(f"AIS chains: {args.ais_chains}")
            print(f"AIS datapoints (one batched call): {m}")
            print(f"AIS init: {args.ais_init}")
            print(f"AIS seconds total: {seconds:.2f}")
            print(f"AIS seconds per datapoint: {seconds / m:.3f}")
            print(f"AIS ms per annealing step (all chains and datapoints): {1e3 * seconds / args.ais_steps:.2f}")
            print(f"AIS mean acceptance: {result.accept_rate.mean():.3f}")
            print(f"AIS mean log p(x) (nats): {log_z.mean():.3f}")
            print(f"IWAE-{args.k} mean log p(x) on the same points (nats): {iw.mean():.3f}")
            print(f"AIS - IWAE-{args.k} mean (nats): {diff.mean():+.3f}")
            print(f"AIS >= IWAE-{args.k} on: {int((diff >= 0).sum())} of {m} points")
            ais_line = (f"{seconds / m:.3f} s/datapoint ({args.ais_steps} steps x {args.ais_chains} chains, "
                        f"{m} datapoints batched; acceptance {result.accept_rate.mean():.2f}; "
                        f"AIS - IWAE {diff.mean():+.2f} nats)")

        print(f"load average at end (1, 5, 15 min): {load_average()}")
        print(f"summary (a) IWAE-{args.k} throughput: {best['samples']:,.0f} samples/s, "
              f"{best['gflops']:.1f} GFLOP/s = {best['fraction']:.2f} of GEMM {best['gemm']:.1f} GFLOP/s "
              f"(chunk {best['real_rows']} rows; the decoder's products alone reach {best['ceiling']:.2f} of it)")
        if mem:
            table = ", ".join(f"k={r['k']}: {r['peak_mib']:.0f} MiB (+{r['growth_mib']:.0f})" for r in mem)
            print(f"summary (b) peak memory by k: {table}; flat: {'yes' if flat else 'NO'}")
        else:
            print("summary (b) peak memory by k: skipped")
        print(f"summary (c) AIS: {ais_line}")
        if not args.skip_memory_n and device.type == "cpu" and Path("/proc/self/status").exists():
            run_dir = Path(args.run) if args.run is not None else workdir / "run"
            by_n = memory_by_n(run_dir, args.mem_n_list, args.k, torch.get_num_threads())
            for r in by_n:
                print(f"memory[evaluate --count {r['n']}] datapoints {r['evaluated']}: peak {r['peak_mib']:.0f} MiB, "
                      f"{r['seconds']:.1f} s")
            table = ", ".join(f"n={r['evaluated']}: {r['peak_mib']:.0f} MiB" for r in by_n)
            bounded = max(r["peak_mib"] for r in by_n) < 1536
            print(f"summary (d) peak memory of `evaluate --estimators elbo,iwae:{args.k}` by n: {table}; "
                  f"under 1.5 GB: {'yes' if bounded else 'NO'}")


if __name__ == "__main__":
    main()
