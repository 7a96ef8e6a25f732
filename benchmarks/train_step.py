"""Time one SVI training step of the toolkit against a hand-written PyTorch VAE step.

What is compared
----------------
*Toolkit*: ``ppl_genmodels.models.vae.VAE`` (a Pyro program: ``model`` and
``guide`` methods on a ``PyroModule``), the ``"trace"`` objective (Pyro's
``Trace_ELBO``, one particle) and ``ppl_genmodels.train.Trainer.step`` as
``fit`` runs it: the guide's draws from the batch's per-datapoint streams
(``ppl_genmodels.streams.Streams``), the loss evaluated, the gradients zeroed,
the batch-averaged loss back-propagated, the device-side NaN guard, and a
fused Adam step that the guard can skip without the host looking; the loss
comes back as a tensor (no host sync).

*Hand-written*: the same VAE as a plain ``nn.Module`` whose loss is the ELBO
written out directly with ``torch.distributions`` and
``binary_cross_entropy_with_logits`` and ``torch.randn`` noise, followed by
``zero_grad`` / ``backward`` / a fused Adam ``step``, returning the loss as a
tensor: the loop one would write by hand, without a NaN guard.

Why the comparison is fair
--------------------------
- Same network: encoder 784 -> 400 (ReLU) -> 2*50 giving (loc, raw), guide
  scale ``softplus(raw) + 1e-4``; decoder 50 -> 400 (ReLU) -> 784 Bernoulli
  logits. The hand-written module is initialised with a copy of the toolkit
  model's weights.
- Same objective: the single-sample reparameterised ELBO with the *sampled* KL,
  ``log p(x|z) + log p(z) - log q(z|x)`` at ``z = loc + scale * eps``, summed
  over the batch; the gradient is taken of the batch mean. Before timing, the
  script evaluates both losses on the same batch with the same weights and the
  same random noise and prints them: they must agree.
- Same data (the same fixed list of minibatches, cycled), the same batch size
  (128), the same optimizer (fused Adam, lr 1e-3), the same device and thread count.
- Both are warmed up, then timed in interleaved repeats (toolkit, then
  hand-written, in each repeat), so drifts in machine load hit both alike; the
  reported figure is the median over repeats of the per-repeat time ratio.
  On a busy host, ``--block 5`` alternates the two sides every 5 steps inside
  each repeat, which keeps short bursts of load from landing on one side only.

The difference measured is therefore the cost of expressing the model as a
Pyro program (tracing, plates, distribution wrappers, ELBO bookkeeping) and of
the toolkit's training-step wrapper, over the bare tensor computation.

*Compiled*: with ``--compile on`` or ``both`` (the default) the toolkit's step also
runs as ``fit --compile on`` runs it: the whole loss (Pyro's handlers, the objective,
the streams' draws), its gradients and the Adam update captured once as one graph by
``ppl_genmodels.compiled.Static`` and compiled by Inductor; the graph writes the
parameters and the optimizer's state in place (the first step, which creates the
optimizer's state, runs the general path). Its capture and compile time is printed
with its warm-up, apart from the timed steps.

*Hand-written, compiled*: with ``--compile on`` or ``both`` the hand-written step also
runs with its loss through ``torch.compile`` ("hand compiled", ATen's products), and on
a CPU with oneDNN once more with its layers' products through oneDNN as the toolkit's
compiled graphs run them ("hand compiled+oneDNN"): the fastest this loop runs in
PyTorch on the CPU, so ``toolkit compiled / hand compiled+oneDNN`` is what the Pyro
program still costs over it once both are compiled. Their compile times fall in the
warm-up.

Usage::

    python benchmarks/train_step.py [--repeats 7] [--steps 50] [--warmup 20] [--block K]
                                    [--batch-size 128] [--n 4096] [--compile off|on|both]
                                    [--device auto|cpu|cuda] [--threads N]

The last lines printed are ``median ratio (SIDE / hand-written): R`` for every other
side and, when compiled, ``median ratio (toolkit compiled / hand compiled+oneDNN): R``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from ppl_genmodels.compiled import onednn_linear
from ppl_genmodels.inference.objectives import make_objective
from ppl_genmodels.models.vae import VAE
from ppl_genmodels.programs import Program
from ppl_genmodels.streams import Streams
from ppl_genmodels.train import Trainer

X_DIM, HIDDEN, Z_DIM = 784, 400, 50
MIN_SCALE = 1e-4
LR = 1e-3
SEED = 0
MNIST_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist" / "train-images-idx3-ubyte.gz"


class HandVAE(nn.Module):
    """The same VAE without Pyro: plain layers and the ELBO written out."""

    def __init__(self, x_dim: int = X_DIM, hidden: int = HIDDEN, z_dim: int = Z_DIM, linear=nn.Linear):
        super().__init__()
        self.encoder = nn.Sequential(linear(x_dim, hidden), nn.ReLU(), linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(linear(z_dim, hidden), nn.ReLU(), linear(hidden, x_dim))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative single-sample ELBO (sampled KL), summed over the batch."""
        loc, raw = self.encoder(x).chunk(2, dim=-1)
        scale = F.softplus(raw) + MIN_SCALE
        q = Normal(loc, scale, validate_args=False)
        z = q.rsample()  # loc + scale * eps
        log_q = q.log_prob(z).sum(-1)
        log_pz = Normal(torch.zeros_like(z), torch.ones_like(z), validate_args=False).log_prob(z).sum(-1)
        log_px = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(-1)
        return -(log_px + log_pz - log_q).sum()


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose product runs through oneDNN (``ppl_genmodels.compiled.onednn_linear``, differentiable):
    the kernels the toolkit's compiled graphs use for float32 products on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


class HandTrainer:
    """The hand-written counterpart of ``Trainer.step``."""

    def __init__(self, model: HandVAE, optimizer: torch.optim.Optimizer, compiled: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.loss = torch.compile(model.loss) if compiled else model.loss

    def step(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        (loss / x.shape[0]).backward()
        self.optimizer.step()
        return loss.detach()


class ToolkitStep:
    """``Trainer.step`` fed as ``fit`` feeds it: each batch with its datapoints' streams."""

    def __init__(self, trainer: Trainer, batch_size: int):
        self.trainer, self.batch_size, self.calls = trainer, batch_size, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device) + self.calls * self.batch_size
        self.calls += 1
        return self.trainer.step(x, streams=Streams(SEED, rows, f"train/{self.calls}"))


def copy_weights(src: VAE, dst: HandVAE) -> None:
    """Give the hand-written model the toolkit model's initial weights."""
    with torch.no_grad():
        for a, b in ((src.encoder, dst.encoder), (src.decoder, dst.decoder)):
            la = [m for m in a if isinstance(m, nn.Linear)]
            lb = [m for m in b if isinstance(m, nn.Linear)]
            if [tuple(m.weight.shape) for m in la] != [tuple(m.weight.shape) for m in lb]:
                raise RuntimeError("toolkit and hand-written networks differ in shape")
            for ma, mb in zip(la, lb):
                mb.weight.copy_(ma.weight)
                mb.bias.copy_(ma.bias)


def load_data(n: int) -> tuple[torch.Tensor, str]:
    """``n`` binary MNIST training images [n, 784], or random binary data when MNIST is absent."""
    gen = torch.Generator().manual_seed(SEED)
    if MNIST_IMAGES.is_file():
        from ppl_genmodels.data import read_idx

        images = read_idx(MNIST_IMAGES)[:n]
        probs = torch.from_numpy(images.reshape(len(images), -1).astype("float32")) / 255.0
        return torch.bernoulli(probs, generator=gen), f"MNIST (first {len(probs)} training images, seeded Bernoulli binarisation)"
    x = torch.bernoulli(torch.full((n, X_DIM), 0.5), generator=gen)
    return x, f"RANDOM binary data [{n}, {X_DIM}] (MNIST not found at {MNIST_IMAGES})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step, batches: list[torch.Tensor], start: int, count: int, device: torch.device) -> float:
    """Run ``count`` steps on the cycled batches; return wall seconds (device synchronised)."""
    nb = len(batches)
    sync(device)
    t0 = time.perf_counter()
    for i in range(start, start + count):
        step(batches[i % nb])
    sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (default 7)")
    parser.add_argument("--steps", type=int, default=50, help="steps per side per repeat (default 50)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per side first (default 20)")
    parser.add_argument("--block", type=int, default=None,
                        help="alternate the two sides every BLOCK steps within a repeat (default: --steps, "
                             "i.e. all toolkit steps then all hand-written steps); a small block evens out "
                             "machine-load changes on a busy host")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n", type=int, default=4096, help="datapoints (default 4096)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both",
                        help="time the toolkit's general step (off), its compiled step (on), or both (default)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.batch_size < 1 or args.n < args.batch_size:
        parser.error("need repeats >= 1, steps >= 1, batch-size >= 1 and n >= batch-size")
    block = args.steps if args.block is None else args.block
    if not 1 <= block <= args.steps:
        parser.error("--block must be between 1 and --steps")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")

    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}")

    pyro.set_rng_seed(SEED)  # seeds torch, numpy and random
    x, source = load_data(args.n)
    nb = len(x) // args.batch_size
    batches = [b.to(device) for b in x[: nb * args.batch_size].split(args.batch_size)]
    print(f"data: {source}; {nb} fixed batches of {args.batch_size}")

    vae = VAE(X_DIM, Z_DIM, hidden=(HIDDEN,), likelihood="bernoulli").to(device)
    hand = HandVAE().to(device)
    copy_weights(vae, hand)
    objective = make_objective("trace", num_particles=1, max_plate_nesting=1)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    sides = {}  # name -> (step function, loss function)
    for compiled in {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]:
        program = Program(copy.deepcopy(vae)).accelerate(compile=compiled)
        trainer = Trainer(program, objective, torch.optim.Adam(program.parameters(), lr=LR, **fused))
        trainer.validate_next = False
        name = "toolkit compiled" if compiled else "toolkit"
        sides[name] = (ToolkitStep(trainer, args.batch_size), lambda b, p=program: objective.loss(p.model, p.guide, b))
    baseline = HandTrainer(hand, torch.optim.Adam(hand.parameters(), lr=LR, **fused))
    sides["hand-written"] = (baseline.step, hand.loss)
    if args.compile != "off":  # PyTorch's own best on this loop: the same step through torch.compile
        linears = {"hand compiled": nn.Linear}
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            linears["hand compiled+oneDNN"] = OneDNNLinear
        for name, linear in linears.items():
            twin = HandVAE(linear=linear).to(device)
            twin.load_state_dict(hand.state_dict())
            trainer = HandTrainer(twin, torch.optim.Adam(twin.parameters(), lr=LR, **fused), compiled=True)
            sides[name] = (trainer.step, twin.loss)

    # Same weights, same noise: the objectives must give the same number.
    with torch.no_grad():
        torch.manual_seed(SEED)
        lt = objective.loss(vae.model, vae.guide, batches[0]).item()
        torch.manual_seed(SEED)
        lh = hand.loss(batches[0]).item()
    print(f"objective check (same weights and noise, batch 0): toolkit {lt / args.batch_size:.4f}, "
          f"hand-written {lh / args.batch_size:.4f} nats/datapoint (rel. diff {abs(lt - lh) / abs(lh):.1e})")
    if not math.isclose(lt, lh, rel_tol=1e-4):
        raise SystemExit("the two objectives disagree: the comparison would not be like for like")

    torch.manual_seed(SEED)
    for name, (step, _) in sides.items():
        began = time.perf_counter()
        run_steps(step, batches, 0, args.warmup, device)
        print(f"warm-up of {name}: {args.warmup} steps in {time.perf_counter() - began:.1f} s"
              + (f" (capturing and compiling the step: {step.trainer.compile_seconds:.1f} s)"
                 if name == "toolkit compiled" else ""))
    done_steps = args.warmup  # per side; every side sees the same batch sequence
    how = "one side after the other" if block == args.steps else f"alternating every {block} steps"
    print(f"timing {args.repeats} repeats x {args.steps} steps each ({how}); ms per step:")
    print(f"{'repeat':>6}" + "".join(f"  {name:>20}" for name in sides)
          + "".join(f"  {name + ' / hand':>22}" for name in sides if name != "hand-written"))

    ratios = {name: [] for name in sides if name != "hand-written"}
    for r in range(args.repeats):
        seconds = dict.fromkeys(sides, 0.0)
        for first in range(0, args.steps, block):
            k = min(block, args.steps - first)
            for name, (step, _) in sides.items():
                seconds[name] += run_steps(step, batches, done_steps, k, device)
            done_steps += k
        for name in ratios:
            ratios[name].append(seconds[name] / seconds["hand-written"])
        print(f"{r + 1:>6}" + "".join(f"  {1e3 * t / args.steps:>20.3f}" for t in seconds.values())
              + "".join(f"  {values[-1]:>22.3f}" for values in ratios.values()))

    with torch.no_grad():
        final = {name: sum(loss(b).item() for b in batches) / (nb * args.batch_size)
                 for name, (_, loss) in sides.items()}
    print(f"loss after {done_steps} steps (nats/datapoint, all batches): "
          + ", ".join(f"{name} {value:.2f}" for name, value in final.items()))
    for name, values in ratios.items():
        print(f"median ratio ({name} / hand-written): {statistics.median(values):.2f}")
    floor = "hand compiled+oneDNN" if "hand compiled+oneDNN" in ratios else "hand compiled"
    if "toolkit compiled" in ratios and floor in ratios:
        versus = [a / b for a, b in zip(ratios["toolkit compiled"], ratios[floor])]
        print(f"median ratio (toolkit compiled / {floor}): {statistics.median(versus):.2f}")

if __name__ == "__main__":
    main()
