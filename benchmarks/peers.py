"""The toolkit against compiled JAX peers (NumPyro, BlackJAX) on the same MNIST VAE, weights and data.

What is compared
----------------
Three pieces of work on a Bernoulli VAE 784-400-50 (encoder 784 -> 400 ReLU
-> 2*50 giving loc and raw, guide scale ``softplus(raw) + 1e-4``; decoder 50
-> 400 ReLU -> 784 logits), each done by the toolkit and by a peer written
with JAX, side by side in one process:

1. *One SVI epoch* (``--rows svi``): the first ``--svi-examples`` (default
   54,000) binarized MNIST training images, shuffled once, in batches of 128,
   single-particle ``Trace_ELBO``, Adam with lr 1e-3, from the same freshly
   initialised weights. Toolkit: ``ppl_genmodels.train.Trainer.step`` fed as
   ``fit`` feeds it (each batch with its datapoints' ``Streams``, fused Adam,
   the objective ``make_objective("trace")``, no host sync until the epoch
   ends), built as ``benchmarks/train_step.py`` builds it, with the model
   wrapped in a ``Program`` as ``fit`` hands it to the ``Trainer``. Peer: the same
   model and guide as NumPyro programs (``numpyro.param`` sites initialised with
   the toolkit's weights), ``numpyro.infer.SVI`` with ``Trace_ELBO`` and
   ``numpyro.optim.Adam(1e-3)``, one ``jax.jit``-ed ``svi.update`` call per batch
   (the batch gathered inside the jitted step, the loss summed on the device).
   Both sides take the gradient of the batch *mean* (the peer scales its sites
   by 1/batch with ``numpyro.handlers.scale``, as ``Trainer.step`` does) and
   both include the last partial batch (54,000 = 421 x 128 + 112), as ``fit``
   does; the peer compiles its step for both batch shapes.
2. *IWAE-5000* (``--rows iwae``) of ``--iwae-n`` test images with the trained
   weights. Toolkit: ``inference.importance.streaming_estimates`` under
   ``torch.no_grad``, as ``benchmarks/evaluate.py`` calls it (up to 100
   datapoints per call, ``--iwae-rows`` decoder rows per pass = particles per
   pass x datapoints). Peer: a ``jax.jit``-ed function that encodes once and
   folds the particles in with a running log-sum-exp, the same particles per
   pass (a ``lax.fori_loop`` over the chunks).
3. *Batched HMC* (``--rows hmc``) on p(z | x_b) of ``--hmc-n`` test images,
   ``--chains`` chains each, ``--warmup`` + ``--samples`` iterations,
   ``--leapfrog`` L. Toolkit: ``inference.mcmc.hmc_posterior`` (as in
   ``benchmarks/mcmc.py``): all datapoints and chains in one tensor, the number
   of leapfrog steps drawn each iteration uniformly from 1 .. 2L - 1 (the same
   for every chain), Stan's window adaptation with a step size per chain and a
   diagonal inverse mass per datapoint, chains started from guide draws.
   Peer: BlackJAX's HMC kernel (``blackjax.hmc.build_kernel()``: velocity
   Verlet, divergence threshold 1000) ``jax.vmap``-ed over datapoints and
   chains inside one jitted ``lax.scan``; Stan's warm-up built from BlackJAX's
   own pieces (``build_schedule``, ``dual_averaging_adaptation``,
   ``mass_matrix_adaptation``): a step size per chain by dual averaging, a
   diagonal inverse mass per datapoint pooled over its chains, the same target
   acceptance (0.65) and initial step size (0.1) as the toolkit, chains
   started from guide draws. The log density is log N(z; 0, I) + sum_d
   log Bernoulli(x_d | decoder(z)) in z (unconstrained), the target of the
   toolkit's ``traces.LogJoint``.

Why it is fair
--------------
- Same weights: the toolkit's torch weights are exported to numpy and the
  peers' networks are written by hand in ``jax.numpy`` from those arrays
  (``x @ W.T + b``). Before timing, the script checks that the JAX networks
  give the torch networks' outputs and that the NumPyro model/guide and the
  HMC log density give the toolkit's log densities at the same z.
- Same data: one binarized array (seeded Bernoulli draw of the MNIST grey
  levels, as ``train_step.py`` and ``evaluate.py`` binarize), one shuffle
  order, the same test images.
- Same number of gradient evaluations in HMC: the peer replays the toolkit's
  own sequence of jittered leapfrog counts. The script records it by wrapping
  ``inference.mcmc._jittered`` (a private helper; the wrapper only stores what
  it returns), so both sides take the same number of leapfrog steps, iteration
  by iteration. If a toolkit version lacks that helper, the peer draws its own
  counts from the same distribution and the output says the counts then agree
  in expectation only.
- Different random numbers on the two sides (torch's generator or the
  toolkit's ``Streams`` against JAX's threefry keys): the agreement checks are
  statistical (see below).
- Timing: a first ("cold") call of each side, then ``--repeats`` timed calls,
  interleaved toolkit, peer, toolkit, peer, ..., so drifts in machine load hit
  both; medians are reported. JAX dispatches asynchronously: every peer timing
  ends with ``block_until_ready``. "Compile" is the cold call minus the median
  steady call: for the peer, tracing and XLA compilation; for the toolkit,
  its first-call costs (and compilation, where the toolkit offers it).
- The toolkit's HMC wall time includes its R-hat/ESS diagnostics; the script
  recomputes them to report the sampling time alone, and the HMC ratio uses
  sampling time on both sides (the peer computes no diagnostics).
- The ratio printed is toolkit time / peer time ("toolkit/peer"); at most 1.0
  means the toolkit is at least as fast as the compiled peer.

Agreement checks
----------------
- SVI: after one epoch, each side's weights are scored by the same evaluator
  (the toolkit's single-particle ELBO per validation image, each image with
  its own stream, so both sides' weights see the same noise) on validation
  images taken after the training range (the last 6,000 of the 60,000 MNIST
  training images). Criterion: |mean difference| < 3 x sqrt(se_a^2 + se_b^2),
  se = per-datapoint standard deviation / sqrt(n).
- IWAE: per-datapoint IWAE-k of the two sides (different particles) differ by
  Monte Carlo noise only; criterion: |mean difference| < 3 x its standard
  error, the standard deviation of the per-datapoint differences / sqrt(n).
- HMC: posterior means per (datapoint, dimension) within Monte Carlo error:
  z = |mean_a - mean_b| / sqrt(var_a / ESS_a + var_b / ESS_b) with the bulk
  ESS of ``ppl_genmodels.inference.diagnostics`` for both sides' draws;
  criterion: largest z < 4.5 (with 1,000 comparisons chance alone gives a
  largest |z| of about 3.3).
- End to end: a ``--fit-epochs`` (default 50) epoch MNIST fit is EXTRAPOLATED
  as compile + N x steady epoch time per side (training epochs only: no
  validation passes or checkpoints).

Threads
-------
``--threads N`` calls ``torch.set_num_threads(N)``. XLA's CPU client has no
flag for an N-thread pool: it sizes its pool from the CPUs the process may run
on. So for N below the CPUs available, the script pins the whole process
(both sides) to the first N of them with ``os.sched_setaffinity`` before JAX
is imported, and for N = 1 also sets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``
(the setting given in jax-ml/jax issues #743 and #1539). Without
``--threads``, both libraries use their defaults (all CPUs). JAX runs on the
CPU (``JAX_PLATFORMS=cpu``) in float32.

``--compile on`` (the default) runs the toolkit as ``--compile on`` does: the
training step, IWAE's particle chunks and the HMC log-joint with its gradient
as one captured, compiled graph each (``Program.accelerate(compile=True)``,
``ppl_genmodels.compiled``); ``--compile off`` runs them as written. The
toolkit's compile time is its cold call minus its steady calls, like the peer's.

Usage::

    python benchmarks/peers.py                                   # all rows, ~15 min on 2 busy cores
    python benchmarks/peers.py --rows svi --repeats 5 --fit-epochs 100
    python benchmarks/peers.py --svi-examples 2048 --iwae-n 8 --iwae-k 500 --hmc-n 2 \\
        --warmup 50 --samples 50 --repeats 1 --train-examples 1000 --train-epochs 1   # smoke run
    python benchmarks/peers.py --run runs/mnist-vae --threads 1

Needs the optional extra (``pip install -e '.[peers]'``: jax[cpu], numpyro,
blackjax, optax). The last lines printed are the summary table.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SEED = 0
X_DIM, HIDDEN, Z_DIM = 784, 400, 50
LR = 1e-3
BATCH = 128
MIN_SCALE = 1e-4          # the guide's softplus floor (models/vae.py)
TARGET_ACCEPT = 0.65      # the toolkit's HMC target (inference/adaptation.py); the peer uses the same
INITIAL_STEP = 0.1        # hmc_posterior's default initial step size
MNIST_TRAIN_ALL = 60_000
VAL_EXAMPLES = 6_000      # the last 6,000 MNIST training images: the validation set of the SVI row
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
ROWS = ("svi", "iwae", "hmc")
PEERS_MISSING = "benchmarks/peers.py needs the optional extra: pip install -e '.[peers]'"
LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# environment: threads, imports, versions
# ---------------------------------------------------------------------------------------------


def configure_threads(threads: int | None) -> str:
    """Pin the process and set XLA's flags for ``threads`` (before JAX is imported); returns what was done."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if threads is None:
        return "library defaults (no --threads)"
    done = []
    if hasattr(os, "sched_getaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        if threads < len(allowed):
            os.sched_setaffinity(0, allowed[:threads])
            done.append(f"process pinned to CPUs {allowed[:threads]}")
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
        done.append(f"XLA_FLAGS={flags}")
    return "; ".join(done) or f"{threads} threads = all CPUs available: nothing to pin"


def import_peers():
    """(jax, numpyro, blackjax, optax), or exit with one line when the optional extra is missing."""
    try:
        import blackjax
        import jax
        import numpyro
        import optax
    except ImportError:
        raise SystemExit(PEERS_MISSING) from None
    jax.config.update("jax_enable_x64", False)  # float32, as the toolkit's tensors
    return jax, numpyro, blackjax, optax


def load_average() -> str:
    """``uptime``'s output (load averages over 1, 5, 15 minutes), or os.getloadavg() without it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        try:
            return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
        except OSError:
            return "unavailable"


def xla_threads() -> str:
    """How many CPUs XLA's pool can use (it follows the process's affinity mask)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpus} CPUs in the affinity mask"


def toolkit_compiled(program, setting: str):
    """``program`` with its hot paths compiled (``--compile on``) or not (``off``), as ``fit --compile`` would."""
    program.accelerate(precision=program.acceleration["precision"], compile=setting == "on")
    print(f"toolkit: --compile {setting}: the hot paths run "
          + ("as one captured, compiled graph each (ppl_genmodels.compiled)" if setting == "on" else "as written"))
    return program


# ---------------------------------------------------------------------------------------------
# data and the trained model
# ---------------------------------------------------------------------------------------------


def find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def binarized(folder: Path, stem: str, n: int):
    """The first ``n`` images of an MNIST IDX file as [n, 784] binary float32 (seeded Bernoulli draw), or None."""
    import torch

    path = find_idx(folder, stem)
    if path is None:
        return None
    from ppl_genmodels.data import read_idx

    images = read_idx(path)[:n]
    probs = torch.from_numpy(images.reshape(len(images), -1).astype("float32")) / 255.0
    return torch.bernoulli(probs, generator=torch.Generator().manual_seed(SEED))


def random_binary(n: int, seed: int):
    import torch

    return torch.bernoulli(torch.full((n, X_DIM), 0.5), generator=torch.Generator().manual_seed(seed))


def svi_data(folder: Path, n_train: int):
    """(training images [n_train, 784], validation images [6000, 784], description): MNIST training file,
    the training range from its start, validation its last 6,000; random binary data without MNIST."""
    x = binarized(folder, "train-images-idx3-ubyte", MNIST_TRAIN_ALL)
    if x is not None and len(x) == MNIST_TRAIN_ALL:
        return (x[:n_train].contiguous(), x[-VAL_EXAMPLES:].contiguous(),
                f"MNIST training images 0..{n_train - 1} (validation: the last {VAL_EXAMPLES}), seeded binarisation")
    print(f"WARNING: MNIST NOT FOUND at {folder}: the SVI row uses RANDOM binary data; its times are meaningful, "
          "its ELBOs are not")
    return random_binary(n_train, SEED + 3), random_binary(VAL_EXAMPLES, SEED + 4), "RANDOM binary data"


def prepare_model(args, workdir: Path, n_test: int):
    """(trained VAE, the first ``n_test`` test images, notes): ``--run`` loaded, or a VAE trained here as
    ``benchmarks/evaluate.py`` trains it (``fit`` for ``--train-epochs`` epochs on ``--train-examples``)."""
    notes = []
    if args.run is not None:
        from ppl_genmodels import load_run

        run = load_run(args.run, device="cpu")
        x = (binarized(Path(run.config.data_options.data_dir or args.data_dir), "t10k-images-idx3-ubyte", n_test)
             if run.config.data == "mnist" else None)
        notes.append(f"model: {type(run.model).__name__} from run {args.run} (epoch {run.epoch})")
        if x is None:
            x = run.data.test.x[:n_test].cpu()
            notes.append(f"test data: the run's own test split ({len(x)} points)")
        else:
            notes.append(f"test data: MNIST t10k, first {len(x)} images, seeded binarisation")
        return run.program.eval(), x, notes

    from ppl_genmodels import fit

    common = dict(hidden=[HIDDEN], z_dim=Z_DIM, epochs=args.train_epochs, eval_k=10, patience=None, device="cpu",
                  seed=SEED, progress=False, evaluate=False, plots=False)
    have = find_idx(args.data_dir, "t10k-images-idx3-ubyte") and find_idx(args.data_dir, "train-images-idx3-ubyte")
    started = time.perf_counter()
    if have:
        run = fit("vae", "mnist", out=workdir / "run", data_dir=str(args.data_dir),
                  max_examples=args.train_examples, **common)
        x = binarized(args.data_dir, "t10k-images-idx3-ubyte", n_test)
        notes.append(f"test data: MNIST t10k, first {len(x)} images, seeded binarisation")
    else:
        np.save(workdir / "random-binary.npy", random_binary(args.train_examples, SEED + 1).numpy())
        run = fit("vae", str(workdir / "random-binary.npy"), out=workdir / "run", likelihood="bernoulli", **common)
        x = random_binary(n_test, SEED + 2)
        notes.append(f"WARNING: MNIST NOT FOUND at {args.data_dir}: RANDOM binary test data [{n_test}, {X_DIM}]; "
                     "the times are meaningful, the model is not")
    last = run.metrics.iloc[-1]
    notes.append(f"model: VAE {X_DIM}-{HIDDEN}-{Z_DIM} trained here for {args.train_epochs} epochs on "
                 f"{args.train_examples} examples ({time.perf_counter() - started:.1f} s; val ELBO "
                 f"{last['val_elbo']:.2f} nats)")
    return run.program.eval(), x, notes


# ---------------------------------------------------------------------------------------------
# the networks: torch weights out and in, the same networks in jax.numpy, and their check
# ---------------------------------------------------------------------------------------------


def vae_module(model):
    """The ``VAE`` inside a ``Program`` (or the VAE itself), checked to be the network this script rebuilds."""
    from torch import nn

    from ppl_genmodels.models.vae import VAE

    vae = getattr(model, "module", model)
    if not isinstance(vae, VAE) or vae.q.family != "diag" or vae.head.likelihood != "bernoulli":
        raise SystemExit("the peers rebuild a Bernoulli VAE with a diagonal guide only; this run has another model")
    for net in (vae.encoder, vae.decoder):
        if any(not isinstance(m, (nn.Linear, nn.ReLU)) for m in net):
            raise SystemExit("the peers rebuild ReLU MLPs only; this run's networks use another activation")
    return vae


def export_weights(model) -> dict:
    """``{"enc": [(W, b), ...], "dec": [...]}`` as float32 numpy arrays (W is [out, in], as torch stores it)."""
    from torch import nn

    vae = vae_module(model)
    return {name: [(m.weight.detach().cpu().numpy().copy(), m.bias.detach().cpu().numpy().copy())
                   for m in net if isinstance(m, nn.Linear)]
            for name, net in (("enc", vae.encoder), ("dec", vae.decoder))}


def import_weights(model, weights: dict) -> None:
    """Copy ``{"enc": [(W, b), ...], "dec": [...]}`` (numpy or JAX arrays) into the toolkit model's layers."""
    import torch
    from torch import nn

    vae = vae_module(model)
    with torch.no_grad():
        for name, net in (("enc", vae.encoder), ("dec", vae.decoder)):
            for layer, (w, b) in zip([m for m in net if isinstance(m, nn.Linear)], weights[name]):
                layer.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
                layer.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))


def jax_nets(jax):
    """The VAE's pieces in jax.numpy: ``mlp``, ``encode``, ``bernoulli_loglik``, ``log_prior``, ``log_joint``."""
    jnp = jax.numpy

    def mlp(layers, h):  # ReLU between the layers, none after the last: x @ W.T + b, as torch's Linear
        for w, b in layers[:-1]:
            h = jax.nn.relu(h @ w.T + b)
        w, b = layers[-1]
        return h @ w.T + b

    def encode(enc, x):  # the guide's loc and scale
        loc, raw = jnp.split(mlp(enc, x), 2, axis=-1)
        return loc, jax.nn.softplus(raw) + MIN_SCALE

    def bernoulli_loglik(logits, x):  # sum_d log Bernoulli(x_d | logits_d)
        return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)

    def log_prior(z):  # log N(z; 0, I)
        return -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * LOG_2PI

    def log_joint(dec, z, x):  # log p(x, z)
        return log_prior(z) + bernoulli_loglik(mlp(dec, z), x)

    return {"mlp": mlp, "encode": encode, "bernoulli_loglik": bernoulli_loglik, "log_prior": log_prior,
            "log_joint": log_joint}


def as_jax(jax, weights: dict) -> dict:
    jnp = jax.numpy
    return {k: [(jnp.asarray(w), jnp.asarray(b)) for w, b in v] for k, v in weights.items()}


def check_networks(jax, nets, model, x) -> float:
    """Largest |difference| between the JAX and torch networks and log p(x, z) on ``x`` (same weights and z)."""
    import torch

    from ppl_genmodels.models.vae import diag_normal_params
    from ppl_genmodels.traces import LogJoint

    vae = vae_module(model)
    params = as_jax(jax, export_weights(model))
    xj = jax.numpy.asarray(x.numpy())
    z = torch.randn(2, x.shape[0], Z_DIM, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        loc_t, scale_t = diag_normal_params(vae.encoder(x))
        logits_t = vae.decoder(z)
        joint_t = LogJoint(model.model, model.guide, x, None, start="prior").log_target(z)
    loc_j, scale_j = nets["encode"](params["enc"], xj)
    zj = jax.numpy.asarray(z.numpy())
    logits_j = nets["mlp"](params["dec"], zj)
    joint_j = nets["log_joint"](params["dec"], zj, xj)
    diffs = {"loc": np.abs(np.asarray(loc_j) - loc_t.numpy()).max(),
             "scale": np.abs(np.asarray(scale_j) - scale_t.numpy()).max(),
             "logits": np.abs(np.asarray(logits_j) - logits_t.numpy()).max(),
             "log p(x,z)": (np.abs(np.asarray(joint_j) - joint_t.numpy()) / np.abs(joint_t.numpy())).max()}
    print("check: JAX networks vs torch, same weights and z: max |diff| "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + " (log p(x,z) relative, vs traces.LogJoint)")
    worst = max(diffs.values())
    if not worst < 1e-3:
        raise SystemExit("the JAX networks disagree with the toolkit's: the comparison would not be like for like")
    return worst


# ---------------------------------------------------------------------------------------------
# timing: a cold call per side, then interleaved repeats
# ---------------------------------------------------------------------------------------------


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleaved(name: str, toolkit, peer, repeats: int) -> dict:
    """Cold call of each side, then ``repeats`` interleaved timed calls; each call returns (seconds, payload)."""
    print(f"{name}: cold calls (first call of each side; includes compilation / first-call work)")
    t_cold, t_payload = toolkit(0)
    p_cold, p_payload = peer(0, t_payload)
    print(f"{name} cold: toolkit {t_cold:.2f} s, peer {p_cold:.2f} s")
    times = {"toolkit": [], "peer": []}
    for r in range(1, repeats + 1):
        t_sec, t_payload = toolkit(r)
        p_sec, p_payload = peer(r, t_payload)
        times["toolkit"].append(t_sec)
        times["peer"].append(p_sec)
        print(f"{name} repeat {r}: toolkit {t_sec:.2f} s, peer {p_sec:.2f} s, toolkit/peer {t_sec / p_sec:.2f}")
    t_med, p_med = median(times["toolkit"]), median(times["peer"])
    out = {"toolkit": t_med, "peer": p_med, "ratio": t_med / p_med, "toolkit_compile": t_cold - t_med,
           "peer_compile": p_cold - p_med, "toolkit_payload": t_payload, "peer_payload": p_payload}
    print(f"{name} median of {repeats}: toolkit {t_med:.2f} s, peer {p_med:.2f} s, toolkit/peer {out['ratio']:.2f}")
    print(f"{name} compile (cold - median steady): toolkit {out['toolkit_compile']:.2f} s, peer "
          f"{out['peer_compile']:.2f} s")
    return out


# ---------------------------------------------------------------------------------------------
# row 1: one SVI epoch
# ---------------------------------------------------------------------------------------------


class ToolkitEpoch:
    """One epoch of ``Trainer.step`` as ``fit`` runs it, from the initial weights, in a given order."""

    def __init__(self, init_state: dict, x_train, order, compile_setting: str):
        import torch

        from ppl_genmodels.inference.objectives import make_objective
        from ppl_genmodels.models.vae import VAE
        from ppl_genmodels.programs import Program
        from ppl_genmodels.train import Trainer

        self.init_state, self.x, self.order = init_state, x_train, order
        vae = VAE(X_DIM, Z_DIM, hidden=(HIDDEN,), likelihood="bernoulli")
        # fit hands the Trainer the model wrapped as a Program; one trainer for all repeats, so that a compiled
        # step is captured and compiled in the cold call only
        self.program = toolkit_compiled(Program(vae), compile_setting)
        objective = make_objective("trace", num_particles=1, max_plate_nesting=1)
        self.trainer = Trainer(self.program, objective, torch.optim.Adam(self.program.parameters(), lr=LR, fused=True))
        self.trainer.validate_next = False  # as fit, after its first step
        self.model = None

    def __call__(self, repeat: int):
        import torch

        from ppl_genmodels.streams import Streams

        program, trainer = self.program, self.trainer
        program.module.load_state_dict(self.init_state)  # in place: the same parameters, the initial values
        # fresh moments: the state zeroed in place, which Adam treats as a fresh optimizer's (the step counts
        # restart at 0), so that every step after the cold call runs as fit's do after its first
        for state in trainer.optimizer.state.values():
            for value in state.values():
                value.zero_()
        purpose = f"train/{repeat}"  # new draws in every repeat: the spread shows the training noise
        total = torch.zeros((), dtype=torch.float64)
        t0 = time.perf_counter()
        for begin in range(0, len(self.order), BATCH):
            rows = self.order[begin:begin + BATCH]
            total += trainer.step(self.x[rows], streams=Streams(SEED, rows, purpose)).double()
        train_elbo = -float(total) / len(self.order)  # the only host sync of the epoch
        seconds = time.perf_counter() - t0
        self.model = program
        return seconds, train_elbo


class PeerEpoch:
    """The same epoch with NumPyro: ``SVI(model, guide, Adam(1e-3), Trace_ELBO())``, jitted ``svi.update``."""

    def __init__(self, jax, numpyro, nets, init_weights: dict, x_train, order):
        self.jax, self.numpyro, self.nets = jax, numpyro, nets
        self.data = jax.numpy.asarray(x_train.numpy())
        self.order = jax.numpy.asarray(order.numpy().astype(np.int32))
        self.n = int(order.shape[0])
        self.svi = self._svi(init_weights)
        self.steps = {}  # batch size -> jitted step
        self.params = None

    def _svi(self, init: dict):
        from numpyro import distributions as dist
        from numpyro import handlers

        numpyro, mlp, encode = self.numpyro, self.nets["mlp"], self.nets["encode"]
        jnp = self.jax.numpy

        def layers(prefix, arrays):
            return [(numpyro.param(f"{prefix}{i}_w", w), numpyro.param(f"{prefix}{i}_b", b))
                    for i, (w, b) in enumerate(arrays)]

        def model(x):
            dec = layers("dec", init["dec"])
            with numpyro.plate("data", x.shape[0]), handlers.scale(scale=1.0 / x.shape[0]):
                z = numpyro.sample("z", dist.Normal(jnp.zeros(Z_DIM), 1.0).to_event(1))
                numpyro.sample("x", dist.Bernoulli(logits=mlp(dec, z)).to_event(1), obs=x)

        def guide(x):
            enc = layers("enc", init["enc"])
            with numpyro.plate("data", x.shape[0]), handlers.scale(scale=1.0 / x.shape[0]):
                loc, scale = encode(enc, x)
                numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

        self.model, self.guide = model, guide
        return numpyro.infer.SVI(model, guide, numpyro.optim.Adam(LR), numpyro.infer.Trace_ELBO())

    def _step(self, size: int):
        """The jitted step for batches of ``size``: gather the batch, ``svi.update``, add its summed loss."""
        if size not in self.steps:
            jax, svi = self.jax, self.svi

            def step(state, total, data, order, begin):  # data and order as arguments, not baked-in constants
                rows = jax.lax.dynamic_slice(order, (begin,), (size,))
                state, loss = svi.update(state, data[rows])
                return state, total + loss * size  # the loss is the batch mean (sites scaled by 1/size)

            self.steps[size] = jax.jit(step)
        return self.steps[size]

    def __call__(self, repeat: int, _toolkit_payload=None):
        jax = self.jax
        state = self.svi.init(jax.random.PRNGKey(SEED + repeat), self.data[self.order[:BATCH]])
        total = jax.numpy.zeros((), dtype=jax.numpy.float32)
        t0 = time.perf_counter()
        for begin in range(0, self.n, BATCH):
            state, total = self._step(min(BATCH, self.n - begin))(state, total, self.data, self.order, begin)
        train_elbo = -float(total.block_until_ready()) / self.n
        seconds = time.perf_counter() - t0
        self.params = self.svi.get_params(state)
        return seconds, train_elbo

    def weights(self) -> dict:
        """The trained parameters as ``{"enc": [(W, b), ...], "dec": [...]}``."""
        p = self.params
        return {k: [(np.asarray(p[f"{k}{i}_w"]), np.asarray(p[f"{k}{i}_b"]))
                    for i in range(sum(1 for name in p if name.startswith(k) and name.endswith("_w")))]
                for k in ("enc", "dec")}

    def check(self, model, x) -> None:
        """NumPyro's model and guide log densities against the toolkit's at the same z (initial weights)."""
        import torch

        from ppl_genmodels.traces import LogJoint

        infer_util = self.numpyro.infer.util
        z = torch.randn(x.shape[0], Z_DIM, generator=torch.Generator().manual_seed(SEED + 5))
        with torch.no_grad():
            joint_t = LogJoint(model.model, model.guide, x, None, start="prior").log_target(z[None])[0]
            q = vae_module(model).q(vae_module(model).encoder, x).log_prob(z)
        params = {f"{k}{i}_{n}": a for k, v in as_jax(self.jax, export_weights(model)).items()
                  for i, pair in enumerate(v) for n, a in zip("wb", pair)}
        xj, zj = self.jax.numpy.asarray(x.numpy()), self.jax.numpy.asarray(z.numpy())
        lp, _ = infer_util.log_density(self.model, (xj,), {}, {**params, "z": zj})
        lq, _ = infer_util.log_density(self.guide, (xj,), {}, {**params, "z": zj})
        n = x.shape[0]  # the sites are scaled by 1/n: the log densities come back as batch means
        dp = abs(float(lp) * n - float(joint_t.sum())) / abs(float(joint_t.sum()))
        dq = abs(float(lq) * n - float(q.sum())) / abs(float(q.sum()))
        print(f"check: NumPyro model log p(x,z) and guide log q(z|x) vs the toolkit's, same weights and z, "
              f"summed over {n} images: relative diff {dp:.1e} and {dq:.1e}")
        if not (dp < 1e-4 and dq < 1e-4):
            raise SystemExit("the NumPyro programs disagree with the toolkit's: "
                             "the comparison would not be like for like")


def per_datapoint_elbo(model, x, batch: int = 500) -> np.ndarray:
    """Single-particle ELBO of every row of ``x`` (nats), each row's particle from its own stream."""
    import pyro
    import torch

    from ppl_genmodels.streams import Streams
    from ppl_genmodels.traces import log_weights

    out = []
    with torch.no_grad(), pyro.validation_enabled(False):
        for begin in range(0, len(x), batch):
            rows = torch.arange(begin, min(len(x), begin + batch))
            with Streams(SEED, rows, "validation").draws():
                out.append(log_weights(model.model, model.guide, x[rows], None, num_particles=1, nesting=1)[0])
    return torch.cat(out).double().numpy()


def svi_row(args, jax, numpyro, nets) -> dict:
    """Time one SVI epoch on both sides; check the validation ELBOs agree."""
    import pyro
    import torch

    from ppl_genmodels.models.vae import VAE

    print("--- SVI: one epoch ---")
    x_train, x_val, source = svi_data(args.data_dir, args.svi_examples)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SEED))
    full, last = divmod(len(x_train), BATCH)
    print(f"data: {source}; {len(x_train)} images shuffled once (the same order on both sides), "
          f"{full} batches of {BATCH}"
          + (f" + a last partial batch of {last} (included on both sides)" if last else ""))
    pyro.set_rng_seed(SEED)
    init = VAE(X_DIM, Z_DIM, hidden=(HIDDEN,), likelihood="bernoulli")
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    toolkit = ToolkitEpoch(init_state, x_train, order, args.compile)
    peer = PeerEpoch(jax, numpyro, nets, export_weights(init), x_train, order)
    check_networks(jax, nets, init, x_val[:64])
    peer.check(init, x_val[:64])

    vals = []

    def run_peer(repeat, toolkit_elbo):
        seconds, train_elbo = peer(repeat)
        scored = VAE(X_DIM, Z_DIM, hidden=(HIDDEN,), likelihood="bernoulli")
        import_weights(scored, peer.weights())
        va, vb = per_datapoint_elbo(toolkit.model, x_val), per_datapoint_elbo(scored, x_val)
        vals.append((va, vb))
        print(f"svi after epoch ({'cold' if repeat == 0 else f'repeat {repeat}'}): train ELBO toolkit "
              f"{toolkit_elbo:.2f}, peer {train_elbo:.2f}; validation ELBO toolkit {va.mean():.2f}, "
              f"peer {vb.mean():.2f}")
        return seconds, train_elbo

    out = interleaved("svi", toolkit, run_peer, args.repeats)
    va, vb = vals[-1]
    se = math.sqrt(va.var(ddof=1) / len(va) + vb.var(ddof=1) / len(vb))
    diff = va.mean() - vb.mean()
    out["agree"] = abs(diff) < 3 * se
    print(f"svi agreement (last repeat, {len(va)} validation images, both scored by the toolkit's single-particle "
          f"ELBO with the same per-image streams): toolkit {va.mean():.3f}, peer {vb.mean():.3f}, "
          f"difference {diff:+.3f} nats, s.e. {se:.3f} (sqrt(se_a^2 + se_b^2) of the per-image ELBOs); "
          f"criterion |diff| < 3 s.e.: {'yes' if out['agree'] else 'NO'}")
    spread = [a.mean() - b.mean() for a, b in vals]
    print(f"svi difference per run (cold, repeats): {', '.join(f'{d:+.2f}' for d in spread)} nats")
    out["steady_epoch"] = {"toolkit": out["toolkit"], "peer": out["peer"]}
    return out


# ---------------------------------------------------------------------------------------------
# row 2: IWAE-k
# ---------------------------------------------------------------------------------------------


def make_peer_iwae(jax, nets, k: int, particles: int):
    """A jitted ``iwae(params, x, key) -> [n]``: encode once, ``particles`` per pass, running log-sum-exp."""
    jnp = jax.numpy
    full, rest = divmod(k, particles)

    def log_weights(params, key, x, loc, scale, size):
        eps = jax.random.normal(key, (size,) + loc.shape, dtype=loc.dtype)
        z = loc + scale * eps
        log_q = jnp.sum(-0.5 * eps * eps - jnp.log(scale), -1) - 0.5 * Z_DIM * LOG_2PI
        return nets["log_joint"](params["dec"], z, x) - log_q  # [size, n]

    def fold(acc, lw):
        m, s = acc
        m_new = jnp.maximum(m, lw.max(0))
        return m_new, s * jnp.exp(m - m_new) + jnp.exp(lw - m_new).sum(0)

    @jax.jit
    def iwae(params, x, key):
        loc, scale = nets["encode"](params["enc"], x)
        acc = (jnp.full(x.shape[:1], -jnp.inf, x.dtype), jnp.zeros(x.shape[:1], x.dtype))
        acc = jax.lax.fori_loop(0, full, lambda i, a: fold(a, log_weights(params, jax.random.fold_in(key, i), x,
                                                                           loc, scale, particles)), acc)
        if rest:
            acc = fold(acc, log_weights(params, jax.random.fold_in(key, full), x, loc, scale, rest))
        m, s = acc
        return m + jnp.log(s) - math.log(k)

    return iwae


def iwae_row(args, jax, nets, model, x) -> dict:
    """Time IWAE-k of the test images on both sides; check their means agree."""
    import pyro
    import torch

    from ppl_genmodels.inference.importance import streaming_estimates

    print(f"--- IWAE-{args.iwae_k} on {len(x)} test images ---")
    batch = min(100, len(x))
    particles = max(1, min(args.iwae_k, args.iwae_rows // batch))
    print(f"both sides: {batch} datapoints per call, {particles} particles per pass "
          f"({particles * batch} decoder rows), {math.ceil(args.iwae_k / particles)} passes per call")
    toolkit_compiled(model, args.compile)
    params = as_jax(jax, export_weights(model))
    peer_fn = make_peer_iwae(jax, nets, args.iwae_k, particles)
    xj = jax.numpy.asarray(x.numpy())

    def toolkit(repeat):
        pyro.set_rng_seed(SEED + repeat)
        t0 = time.perf_counter()
        with torch.no_grad():
            values = [streaming_estimates(model.model, model.guide, xb, None, k=args.iwae_k, chunk_size=particles)[1]
                      .value for xb in x.split(batch)]
        return time.perf_counter() - t0, torch.cat(values).double().numpy()

    def peer(repeat, _payload):
        key = jax.random.PRNGKey(SEED + 1000 + repeat)
        t0 = time.perf_counter()
        values = [peer_fn(params, xj[b:b + batch], jax.random.fold_in(key, b)) for b in range(0, len(x), batch)]
        values = [v.block_until_ready() for v in values]
        return time.perf_counter() - t0, np.concatenate([np.asarray(v, dtype=np.float64) for v in values])

    out = interleaved("iwae", toolkit, peer, args.repeats)
    a, b = out["toolkit_payload"], out["peer_payload"]
    d = a - b
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    out["agree"] = bool(abs(d.mean()) < 3 * se) if len(d) > 1 else False
    print(f"iwae agreement (last repeat; different particles on the two sides): mean IWAE-{args.iwae_k} toolkit "
          f"{a.mean():.3f}, peer {b.mean():.3f}, difference {d.mean():+.4f} nats, s.e. {se:.4f} (sd of the "
          f"per-image differences / sqrt({len(d)})); criterion |diff| < 3 s.e.: {'yes' if out['agree'] else 'NO'}")
    rate = len(x) * args.iwae_k
    print(f"iwae samples/s (median): toolkit {rate / out['toolkit']:,.0f}, peer {rate / out['peer']:,.0f}")
    return out


# ---------------------------------------------------------------------------------------------
# row 3: batched HMC
# ---------------------------------------------------------------------------------------------


class CountRecorder:
    """Records the toolkit's jittered leapfrog counts by wrapping ``inference.mcmc._jittered`` (pass-through)."""

    def __init__(self):
        from ppl_genmodels.inference import mcmc

        self.module, self.counts = mcmc, []
        self.original = getattr(mcmc, "_jittered", None)

    @property
    def available(self) -> bool:
        return self.original is not None

    def __enter__(self):
        self.counts = []
        if self.available:
            def recorded(num_leapfrog, generator):
                count = self.original(num_leapfrog, generator)
                self.counts.append(count)
                return count

            self.module._jittered = recorded
        return self

    def __exit__(self, *exc):
        if self.available:
            self.module._jittered = self.original


def make_peer_hmc(jax, blackjax, nets, chains: int, warmup: int, samples: int):
    """A jitted ``sample(params, x, key, counts) -> (draws [S, n, chains, D], accept [n], divergent [n], step [n])``:
    BlackJAX HMC vmapped over datapoints and chains, Stan's warm-up from BlackJAX's pieces, leapfrog counts given."""
    from blackjax.adaptation.mass_matrix import mass_matrix_adaptation
    from blackjax.adaptation.step_size import dual_averaging_adaptation
    from blackjax.adaptation.window_adaptation import build_schedule

    jnp, vmap = jax.numpy, jax.vmap
    kernel = blackjax.hmc.build_kernel()  # velocity Verlet, divergence threshold 1000 (as the toolkit's)
    da_init, da_update, da_final = dual_averaging_adaptation(TARGET_ACCEPT)
    mm_init, mm_update, mm_final = mass_matrix_adaptation(True)
    schedule = np.asarray(build_schedule(warmup), dtype=np.int32).reshape(-1, 2) if warmup else \
        np.zeros((0, 2), np.int32)

    def density(dec, x):
        return lambda u: nets["log_joint"](dec, u, x)

    def transitions(dec, keys, states, x, step, inv_mass, count):  # every chain of every datapoint, one step
        one = lambda k, s, xb, e, m: kernel(k, s, density(dec, xb), e, m, count)  # noqa: E731
        return vmap(vmap(one, (0, 0, None, 0, None)), (0, 0, 0, 0, 0))(keys, states, x, step, inv_mass)

    def pooled(mm, positions):  # one datapoint's mass window takes all its chains' positions
        for c in range(chains):
            mm = mm_update(mm, positions[c])
        return mm

    @jax.jit
    def sample(params, x, key, counts):
        dec, n = params["dec"], x.shape[0]
        loc, scale = nets["encode"](params["enc"], x)
        k_start, k_warm, k_draw = jax.random.split(key, 3)
        u0 = loc[:, None] + scale[:, None] * jax.random.normal(k_start, (n, chains, Z_DIM))  # guide draws
        states = vmap(lambda xb, ub: vmap(lambda u: blackjax.hmc.init(u, density(dec, xb)))(ub))(x, u0)
        da = vmap(vmap(da_init))(jnp.full((n, chains), INITIAL_STEP, x.dtype))
        mm = vmap(lambda _: mm_init(Z_DIM))(jnp.arange(n))

        def keys_at(base, t):
            return jax.random.split(jax.random.fold_in(base, t), n * chains).reshape(n, chains, -1)

        def warm(carry, inputs):
            states, da, mm = carry
            t, count, (stage, window_end) = inputs
            step = jnp.exp(da.log_step_size)
            states, info = transitions(dec, keys_at(k_warm, t), states, x, step, mm.inverse_mass_matrix, count)
            da = vmap(vmap(da_update))(da, info.acceptance_rate)
            mm = jax.lax.cond(stage == 1, lambda m: vmap(pooled)(m, states.position), lambda m: m, mm)
            mm, da = jax.lax.cond(window_end, lambda a: (vmap(mm_final)(a[0]), vmap(vmap(da_init))(
                vmap(vmap(da_final))(a[1]))), lambda a: a, (mm, da))
            return (states, da, mm), None

        (states, da, mm), _ = jax.lax.scan(warm, (states, da, mm), (jnp.arange(warmup), counts[:warmup],
                                                                     (schedule[:, 0], schedule[:, 1] == 1)))
        step = vmap(vmap(da_final))(da) if warmup else jnp.full((n, chains), INITIAL_STEP, x.dtype)
        inv_mass = mm.inverse_mass_matrix

        def draw(states, inputs):
            t, count = inputs
            states, info = transitions(dec, keys_at(k_draw, t), states, x, step, inv_mass, count)
            return states, (states.position, info.acceptance_rate, info.is_divergent)

        _, (draws, accept, divergent) = jax.lax.scan(draw, states, (jnp.arange(samples), counts[warmup:]))
        return draws, accept.mean((0, 2)), divergent.sum((0, 2)), jnp.median(step, axis=1)

    return sample


def hmc_row(args, jax, blackjax, nets, model, x) -> dict:
    """Time batched HMC on both sides with the same leapfrog counts; check the posterior means agree."""
    import pyro

    from ppl_genmodels.inference.diagnostics import ess_bulk
    from ppl_genmodels.inference.mcmc import diagnostics, hmc_posterior

    iterations = args.warmup + args.samples
    print(f"--- batched HMC: {len(x)} datapoints x {args.chains} chains x ({args.warmup} warm-up + "
          f"{args.samples} draws), L = {args.leapfrog} ---")
    toolkit_compiled(model, args.compile)
    recorder = CountRecorder()
    if recorder.available:
        print("leapfrog counts: the peer replays the toolkit's own jittered counts (uniform on 1 .. 2L-1, recorded "
              "from inference.mcmc._jittered): the same gradient evaluations on both sides, iteration by iteration")
    else:
        print("leapfrog counts: inference.mcmc._jittered not found; the peer draws its own counts from 1 .. 2L-1 "
              "(the gradient evaluations then agree in EXPECTATION only)")
    params = as_jax(jax, export_weights(model))
    sampler = make_peer_hmc(jax, blackjax, nets, args.chains, args.warmup, args.samples)
    xj = jax.numpy.asarray(x.numpy())
    counts_rng = np.random.default_rng(SEED)

    def toolkit(repeat):
        pyro.set_rng_seed(SEED + repeat)
        with recorder:
            t0 = time.perf_counter()
            result = hmc_posterior(model.model, model.guide, x, num_chains=args.chains, num_samples=args.samples,
                                   warmup=args.warmup, num_leapfrog=args.leapfrog, start="guide", warn=False)
            wall = time.perf_counter() - t0
        draws = result.samples["z"]  # [chains, draws, n, D]
        t0 = time.perf_counter()
        diagnostics(draws)
        diag = time.perf_counter() - t0
        counts = list(recorder.counts) if recorder.available else \
            list(counts_rng.integers(1, 2 * args.leapfrog, iterations) if args.leapfrog > 1 else [1] * iterations)
        payload = {"draws": draws.double().numpy(), "wall": wall, "diag": diag, "counts": counts,
                   "accept": float(result.accept_rate.mean()), "divergent": int(result.divergences.sum())}
        return wall - diag, payload

    def peer(repeat, payload):
        counts = jax.numpy.asarray(np.asarray(payload["counts"], dtype=np.int32))
        t0 = time.perf_counter()
        out = sampler(params, xj, jax.random.PRNGKey(SEED + 2000 + repeat), counts)
        out = jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        draws, accept, divergent, step = (np.asarray(v) for v in out)
        return seconds, {"draws": np.transpose(draws, (2, 0, 1, 3)).astype(np.float64), "accept": float(accept.mean()),
                         "divergent": int(divergent.sum()), "step": float(np.median(step)),
                         "counts": payload["counts"]}

    out = interleaved("hmc", toolkit, peer, args.repeats)
    a, b = out["toolkit_payload"], out["peer_payload"]
    steps = sum(b["counts"])
    print(f"hmc leapfrog steps per chain (= gradient evaluations after the first): toolkit {sum(a['counts'])}, "
          f"peer {steps} (mean {steps / iterations:.2f} per iteration)")
    print(f"hmc toolkit wall incl. diagnostics (last repeat): {a['wall']:.2f} s, of which R-hat/ESS diagnostics "
          f"{a['diag']:.2f} s (recomputed); the ratio above uses sampling time (wall - diagnostics)")
    print(f"hmc acceptance (sampling phase): toolkit {a['accept']:.3f}, peer {b['accept']:.3f}; divergent "
          f"transitions: toolkit {a['divergent']}, peer {b['divergent']}; "
          f"peer's median adapted step size {b['step']:.3f}")
    out["agree"], out["z"] = hmc_agreement(a["draws"], b["draws"], ess_bulk)
    return out


def hmc_agreement(draws_a: np.ndarray, draws_b: np.ndarray, ess_bulk) -> tuple[bool, float]:
    """Posterior means per (datapoint, dimension) of two [chains, draws, n, D] arrays within Monte Carlo error."""
    def moments(d):
        flat = d.reshape(-1, *d.shape[2:])
        with np.errstate(invalid="ignore", divide="ignore"):
            ess = ess_bulk(d)
        return flat.mean(0), flat.var(0, ddof=1), ess

    ma, va, ea = moments(draws_a)
    mb, vb, eb = moments(draws_b)
    z = np.abs(ma - mb) / np.sqrt(va / ea + vb / eb)
    worst = float(np.nanmax(z))
    ok = bool(worst < 4.5)
    print(f"hmc agreement (last repeat): bulk ESS per (datapoint, dim), median toolkit {np.median(ea):.0f}, "
          f"peer {np.median(eb):.0f} (of {draws_a.shape[0] * draws_a.shape[1]} draws); "
          f"max |mean diff| / sqrt(var_a/ESS_a + var_b/ESS_b) over {z.size}: {worst:.2f} "
          f"(median {float(np.nanmedian(z)):.2f}); criterion < 4.5: {'yes' if ok else 'NO'}")
    return ok, worst


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="svi,iwae,hmc", help="comma-separated rows to run (default svi,iwae,hmc)")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved repeats per side (default 3)")
    parser.add_argument("--svi-examples", type=int, default=54_000,
                        help="training images in the SVI epoch (default 54000, at most 54000)")
    parser.add_argument("--fit-epochs", type=int, default=50,
                        help="epochs of the extrapolated end-to-end fit: compile + N x steady epoch (default 50)")
    parser.add_argument("--iwae-n", type=int, default=100, help="test images for IWAE (default 100)")
    parser.add_argument("--iwae-k", type=int, default=5000, help="IWAE particles (default 5000)")
    parser.add_argument("--iwae-rows", type=int, default=4000,
                        help="decoder rows per pass, both sides: particles per pass = rows // datapoints "
                             "(default 4000)")
    parser.add_argument("--hmc-n", type=int, default=20, help="test images for HMC (default 20)")
    parser.add_argument("--chains", type=int, default=4, help="HMC chains per datapoint (default 4)")
    parser.add_argument("--warmup", type=int, default=500, help="HMC warm-up iterations (default 500)")
    parser.add_argument("--samples", type=int, default=500, help="HMC draws kept per chain (default 500)")
    parser.add_argument("--leapfrog", type=int, default=5, help="HMC mean leapfrog steps L (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both sides (torch.set_num_threads; XLA via CPU affinity, see the docstring)")
    parser.add_argument("--compile", choices=("on", "off"), default="on",
                        help="the toolkit's hot paths compiled (on, default) or as written (off)")
    parser.add_argument("--run", type=Path, default=None,
                        help="use the trained run in RUN_DIR for IWAE and HMC instead of training one here")
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs of the VAE trained here (default 2)")
    parser.add_argument("--train-examples", type=int, default=5000, help="its training images (default 5000)")
    parser.add_argument("--data-dir", type=Path, default=MNIST_DIR, help=f"MNIST folder (default {MNIST_DIR})")
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not args.rows or any(r not in ROWS for r in args.rows):
        parser.error(f"--rows takes a comma-separated subset of {','.join(ROWS)}")
    if min(args.repeats, args.svi_examples, args.fit_epochs, args.iwae_n, args.iwae_k, args.iwae_rows, args.hmc_n,
           args.samples, args.leapfrog, args.train_epochs, args.train_examples) < 1 or args.warmup < 0:
        parser.error("counts must be >= 1 (--warmup >= 0)")
    if args.svi_examples > MNIST_TRAIN_ALL - VAL_EXAMPLES:
        parser.error(f"--svi-examples is at most {MNIST_TRAIN_ALL - VAL_EXAMPLES} (the rest is the validation set)")
    if args.chains < 2:
        parser.error("--chains must be >= 2 (ESS and R-hat)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def header(args, jax, numpyro, blackjax, optax, pinning: str) -> None:
    import pyro
    import torch

    print(f"device: cpu (torch {torch.__version__}, pyro {pyro.__version__}; jax {jax.__version__} on "
          f"{jax.default_backend()}, numpyro {numpyro.__version__}, blackjax {blackjax.__version__}, "
          f"optax {optax.__version__})")
    print(f"threads: torch {torch.get_num_threads()}; XLA {xla_threads()}; cpu count {os.cpu_count()}; "
          f"--threads: {pinning}")
    print(f"dtype: float32 on both sides (torch {torch.get_default_dtype()}, jax {jax.numpy.ones(()).dtype})")
    print(f"load at start: {load_average()}")
    print(f"rows: {', '.join(args.rows)}; {args.repeats} interleaved repeats per side after one cold call each")


def summary(args, results: dict) -> None:
    """The table: per row, medians, ratio, compile times and agreement; then the extrapolated fit."""
    print(f"load at end: {load_average()}")
    width = 52
    names = {"svi": f"SVI epoch ({args.svi_examples:,} images, batch {BATCH})",
             "iwae": f"IWAE-{args.iwae_k} ({args.iwae_n} test images)",
             "hmc": f"HMC {args.hmc_n}x{args.chains}x({args.warmup}+{args.samples}) L={args.leapfrog}, sampling"}
    print(f"summary (cpu, medians of {args.repeats}; ratio = toolkit time / peer time, goal <= 1.0; "
          "compile = cold call - median steady call)")
    print(f"{'work':<{width}} {'toolkit s':>10} {'peer s':>9} {'toolkit/peer':>13} {'tk compile s':>13} "
          f"{'peer compile s':>15}  agree")
    for row in args.rows:
        r = results[row]
        print(f"{names[row]:<{width}} {r['toolkit']:>10.2f} {r['peer']:>9.2f} {r['ratio']:>13.2f} "
              f"{r['toolkit_compile']:>13.2f} {r['peer_compile']:>15.2f}  {'yes' if r['agree'] else 'NO'}")
    if "svi" in results:
        r, n = results["svi"], args.fit_epochs
        tk = max(r["toolkit_compile"], 0.0) + n * r["toolkit"]
        pe = max(r["peer_compile"], 0.0) + n * r["peer"]
        print(f"{f'{n}-epoch fit, EXTRAPOLATED (compile + {n} x epoch)':<{width}} {tk:>10.1f} {pe:>9.1f} "
              f"{tk / pe:>13.2f} {'':>13} {'':>15}  -")


def main(argv=None) -> None:
    args = parse_args(argv)
    pinning = configure_threads(args.threads)  # before JAX (and torch's thread pool) start
    jax, numpyro, blackjax, optax = import_peers()
    import pyro
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(pyro|numpyro|blackjax|jax)\b.*")
    header(args, jax, numpyro, blackjax, optax, pinning)
    nets = jax_nets(jax)
    results = {}
    if "svi" in args.rows:
        results["svi"] = svi_row(args, jax, numpyro, nets)
    if "iwae" in args.rows or "hmc" in args.rows:
        n_test = max(args.iwae_n if "iwae" in args.rows else 0, args.hmc_n if "hmc" in args.rows else 0)
        with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
            pyro.set_rng_seed(SEED)
            model, x_test, notes = prepare_model(args, Path(tmp), n_test)
        for line in notes:
            print(line)
        check_networks(jax, nets, model, x_test[:64])
        if "iwae" in args.rows:
            results["iwae"] = iwae_row(args, jax, nets, model, x_test[:args.iwae_n])
        if "hmc" in args.rows:
            results["hmc"] = hmc_row(args, jax, blackjax, nets, model, x_test[:args.hmc_n])
    summary(args, results)


if __name__ == "__main__":
    main()
