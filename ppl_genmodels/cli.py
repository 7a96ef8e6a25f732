"""The ``ppl-genmodels`` command line: a thin layer over the Python API.

Each subcommand parses its options, calls the API and prints the resulting
table. Bad input ends with a one-line ``error: ...`` on stderr and exit status 2
(1 when training diverged), before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one layer size")
    return values


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-genmodels", description="Deep latent-variable generative models as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train a model with SVI and evaluate it")
    fit.add_argument("--model", default="vae", help="vae, cvae, ppca, or path/to/file.py:ClassName (default vae)")
    fit.add_argument("--data", default="digits", help="digits, mnist, circle, moons, swiss-roll, or a .npy/.npz/.csv file (default digits)")
    fit.add_argument("--data-dir", help="folder with the MNIST IDX files (for --data mnist)")
    fit.add_argument("--out", help="run directory (default runs/<data>-<model>); never overwritten")
    fit.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    fit.add_argument("--likelihood", choices=["bernoulli", "gaussian", "categorical"], help="observation model (default: the dataset's)")
    fit.add_argument("--binarize", choices=["dynamic", "fixed", "threshold"], help="binarization for a Bernoulli likelihood")
    fit.add_argument("--condition", choices=["label", "quadrants"], help="conditioning information y for a conditional model")
    fit.add_argument("--visible-quadrants", type=int, default=1, help="visible quadrants for --condition quadrants (1-3)")
    fit.add_argument("--z-dim", type=int, help="latent dimension (default 2 for 2-D data, else 16)")
    fit.add_argument("--hidden", type=_int_list, help="hidden layer sizes, e.g. 400 or 256,256")
    fit.add_argument("--scale", type=float, help="fixed Gaussian observation scale (default: learned)")
    fit.add_argument("--model-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="extra constructor argument for the model (JSON value), repeatable")
    fit.add_argument("--elbo", choices=["trace", "meanfield", "iwae"], default="trace", help="training objective (default trace)")
    fit.add_argument("--particles", type=int, default=1, help="particles per datapoint for the objective (K of IWAE-K)")
    fit.add_argument("--optimizer", choices=["adam", "adamw", "sgd", "rmsprop"], default="adam")
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--batch-size", type=int, default=128)
    fit.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="training epochs (default 50)")
    fit.add_argument("--patience", type=_optional_int, default=argparse.SUPPRESS,
                     help="early-stopping patience in epochs; 0 or none disables (default 10)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    fit.add_argument("--eval-k", type=int, default=100, help="particles of the IWAE-k test estimate (default 100)")
    fit.add_argument("--n-samples", type=int, help="number of points for synthetic 2-D data (default 2000)")
    fit.add_argument("--noise", type=float, help="noise level for synthetic 2-D data")
    fit.add_argument("--max-examples", type=int, help="cap every split at this many examples (quick runs)")
    fit.add_argument("--no-plots", action="store_true", help="skip the figures")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = sub.add_parser("sample", help="draw samples from a trained run and write a PNG")
    sample.add_argument("run", help="run directory")
    sample.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", help="PNG path (default RUN/plots/samples_N.png)")
    sample.add_argument("--label", type=int, help="class to generate (conditional models on labels)")
    sample.add_argument("--seed", type=int, help="random seed")
    sample.add_argument("--device", help="device to load the run on (default: the training device, else auto)")

    evaluate = sub.add_parser("evaluate", help="estimates of log p(x) per datapoint: ELBO, IWAE-k, AIS, exact")
    evaluate.add_argument("run", help="run directory")
    evaluate.add_argument("--estimators", help="comma-separated elbo[:K], iwae[:K], ais[:T], exact (default elbo,iwae:100; "
                          "exact is added for models with a closed form)")
    evaluate.add_argument("--k", type=int, help="shorthand for --estimators elbo,iwae:K")
    evaluate.add_argument("--split", choices=["train", "val", "test"], default="test")
    evaluate.add_argument("--n", type=int, help="evaluate only the first N datapoints of the split")
    evaluate.add_argument("--chains", type=int, default=16, help="AIS chains per datapoint (default 16)")
    evaluate.add_argument("--batch-size", type=int, help="datapoints per pass (default: sized to bound memory)")
    evaluate.add_argument("--ais-init", choices=["prior", "guide"], default="prior",
                          help="AIS initial distribution (default prior)")
    evaluate.add_argument("--proposal", choices=["guide", "prior", "mixture"], default="guide",
                          help="importance proposal of elbo and iwae (default guide)")
    evaluate.add_argument("--device", help="device to load the run on (default: the training device, else auto)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")

    bdmc = sub.add_parser("bdmc", help="sandwich bounds on log p(x) of data simulated from the model (BDMC)")
    bdmc.add_argument("run", help="run directory")
    bdmc.add_argument("--n", type=int, default=100, help="simulated datapoints (default 100)")
    bdmc.add_argument("--steps", type=int, default=1000, help="annealing steps of each AIS direction (default 1000)")
    bdmc.add_argument("--chains", type=int, default=16, help="AIS chains per datapoint (default 16)")
    bdmc.add_argument("--batch-size", type=int, help="datapoints per pass (default: sized to bound memory)")
    bdmc.add_argument("--device", help="device to load the run on (default: the training device, else auto)")
    bdmc.add_argument("--quiet", action="store_true", help="no progress bar")

    compare = sub.add_parser("compare", help="amortized guide vs MCMC, per-datapoint guides and exact posteriors: "
                             "gap decomposition and posterior discrepancies")
    compare.add_argument("run", help="run directory")
    compare.add_argument("--n", type=int, default=100, help="first N datapoints of the split (default 100)")
    compare.add_argument("--split", choices=["train", "val", "test"], default="test")
    compare.add_argument("--mcmc", choices=["hmc", "nuts"], default="hmc",
                         help="batched HMC, or Pyro's NUTS (one datapoint and chain at a time; slow) (default hmc)")
    compare.add_argument("--chains", type=int, default=4, help="MCMC chains per datapoint (default 4)")
    compare.add_argument("--samples", type=int, default=1000, help="MCMC draws per chain (default 1000)")
    compare.add_argument("--warmup", type=int, default=1000, help="MCMC warm-up iterations (default 1000)")
    compare.add_argument("--local-steps", type=int, default=500, help="Adam steps of the per-datapoint guides (default 500)")
    compare.add_argument("--logp-k", type=int, default=5000,
                         help="IWAE particles for log p(x) when the model has no closed form (default 5000)")
    compare.add_argument("--seed", type=int, help="random seed")
    compare.add_argument("--device", help="device to load the run on (default: the training device, else auto)")
    compare.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("models", help="list the built-in models")
    sub.add_parser("datasets", help="list the built-in datasets")
    return parser


FIT_OPTIONS = ["data_dir", "likelihood", "binarize", "condition", "visible_quadrants", "z_dim", "hidden", "scale", "elbo",
               "particles", "optimizer", "lr", "batch_size", "epochs", "patience", "seed", "device", "eval_k", "n_samples",
               "noise", "max_examples"]


RESUMABLE = ("epochs", "patience", "device")  # what --resume may change; the rest of the run's config stays
NEW_RUN_DEFAULTS = {"epochs": 50, "patience": 10}


def _fit(args) -> int:
    from ppl_genmodels.runs import ConfigError
    from ppl_genmodels.train import fit

    if args.resume:
        defaults = vars(build_parser().parse_args(["fit"]))
        changed = [name for name in FIT_OPTIONS + ["model", "data", "model_arg"]
                   if name not in RESUMABLE and getattr(args, name) != defaults[name]]
        if changed:
            raise ConfigError(f"a resumed run keeps its configuration; cannot change {', '.join(changed)} with --resume")
        options = {name: getattr(args, name) for name in RESUMABLE if hasattr(args, name)}
        if options.get("device") == "auto":
            del options["device"]
        run = fit(out=args.out, resume=True, progress=not args.quiet, plots=not args.no_plots, **options)
    else:
        options = {name: getattr(args, name, NEW_RUN_DEFAULTS.get(name)) for name in FIT_OPTIONS}
        options["model_args"] = dict(args.model_arg)
        run = fit(args.model, args.data, args.out, progress=not args.quiet, plots=not args.no_plots, **options)
    summary = run.summary()
    print(f"run directory: {run.path}  (best epoch {run.epoch}; metrics.csv, checkpoint.pt, best.pt, evaluation/, plots/)")
    if summary is not None:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def _sample(args) -> int:
    from ppl_genmodels.evaluation import sample_run
    from ppl_genmodels.runs import load_run

    path = sample_run(load_run(args.run, device=args.device), args.n, args.out, label=args.label, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _print_summary(summary, what: str) -> None:
    print(f"{what}: mean over datapoints (nats), its standard error, datapoints, seconds")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _evaluate(args) -> int:
    from ppl_genmodels.evaluation import evaluate_run, parse_estimators
    from ppl_genmodels.runs import load_run

    if args.estimators is not None and args.k is not None:
        raise ValueError("give --estimators or --k, not both")
    if args.k is not None and args.k < 1:
        raise ValueError(f"k must be >= 1, got {args.k}")
    estimators = f"elbo,iwae:{args.k}" if args.k is not None else args.estimators
    if estimators is not None:
        parse_estimators(estimators)  # a bad spec fails before the run is loaded
    run = load_run(args.run, device=args.device)
    summary, _ = evaluate_run(run, estimators=estimators, split=args.split, n=args.n, batch_size=args.batch_size,
                              chains=args.chains, ais_init=args.ais_init, proposal=args.proposal,
                              progress=not args.quiet)
    _print_summary(summary, f"log p(x) on the {args.split} split")
    folder = run.path / "evaluation"
    print(f"summary: {folder / 'summary.csv'}")
    print(f"per-datapoint estimates: {folder / 'per_datapoint.csv'}")
    return 0


def _check_at_least(args, minimum: int, *names: str) -> None:
    """One-line error for the first option below ``minimum`` (options left unset are skipped)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _bdmc(args) -> int:
    from ppl_genmodels.evaluation import bdmc_run
    from ppl_genmodels.runs import load_run

    _check_at_least(args, 1, "n", "steps", "chains", "batch_size")
    run = load_run(args.run, device=args.device)
    summary, _ = bdmc_run(run, n=args.n, num_steps=args.steps, chains=args.chains, batch_size=args.batch_size,
                          progress=not args.quiet)
    _print_summary(summary, f"BDMC bounds on log p(x) of simulated data ({args.steps} steps)")
    folder = run.path / "evaluation"
    print(f"summary: {folder / 'bdmc_summary.csv'}")
    print(f"per-datapoint bounds: {folder / 'bdmc_per_datapoint.csv'}")
    return 0


def _compare(args) -> int:
    from ppl_genmodels.inference.compare import compare_run
    from ppl_genmodels.runs import load_run

    _check_at_least(args, 1, "n", "chains", "samples", "logp_k")
    _check_at_least(args, 0, "warmup", "local_steps")
    run = load_run(args.run, device=args.device)
    summary, per, _ = compare_run(run, n=args.n, split=args.split, mcmc=args.mcmc, chains=args.chains,
                                  samples=args.samples, warmup=args.warmup, local_steps=args.local_steps,
                                  logp_k=args.logp_k, seed=args.seed, progress=not args.quiet)
    print(f"inference on the first {len(per)} datapoints of the {args.split} split: log p(x) and ELBOs (nats), "
          "gaps, discrepancies from MCMC / exact draws, MCMC diagnostics")
    print(summary.T.to_string(header=False, float_format=lambda v: f"{v:.4f}"))
    folder = run.path / "compare"
    print(f"summary: {folder / 'summary.csv'}")
    print(f"per-datapoint gaps, diagnostics and discrepancies: {folder / 'per_datapoint.csv'}")
    print(f"draws (ArviZ InferenceData): {folder / 'posterior.nc'}")
    figures = sorted(p.name for p in folder.glob("*.png"))
    if figures:
        print(f"figures in {folder}: {', '.join(figures)}")
    return 0


def _list(table: dict, header: str) -> int:
    width = max(len(k) for k in table)
    print(f"{header:<{width}}  description")
    for name, text in table.items():
        print(f"{name:<{width}}  {text}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ppl_genmodels.checkpoint import CheckpointError
    from ppl_genmodels.data import DataError
    from ppl_genmodels.runs import ConfigError
    from ppl_genmodels.traces import TraceError
    from ppl_genmodels.train import TrainingDiverged

    try:
        if args.command == "fit":
            return _fit(args)
        if args.command == "sample":
            return _sample(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "bdmc":
            return _bdmc(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "models":
            from ppl_genmodels.models import DESCRIPTIONS

            return _list(DESCRIPTIONS, "model")
        if args.command == "datasets":
            from ppl_genmodels.data import DATASETS

            return _list(DATASETS, "dataset")
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (DataError, ConfigError, TraceError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
