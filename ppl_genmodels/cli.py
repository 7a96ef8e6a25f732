"""The ``ppl-genmodels`` command line: a thin layer over the Python API.

Each subcommand parses its options, calls the API and prints the resulting
table. The options of ``fit`` are generated from the fields of
:class:`~ppl_genmodels.config.RunConfig` and :class:`~ppl_genmodels.data.DataOptions`
(their help, choices and parsers), so an option added there appears here by
itself. Choice lists come from the registries (splits, proposals, initial
distributions, MCMC methods). Bad input ends with a one-line ``error: ...`` on
stderr and exit status 2 (1 when training diverged), before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ppl_genmodels import compiled, distributed
from ppl_genmodels.comparison import compare_name, compare_run
from ppl_genmodels.config import COMPILE_CHOICES, ConfigError, RunConfig
from ppl_genmodels.data import DATASETS, SPLIT_NAMES, DataError
from ppl_genmodels.evaluation import bdmc_name, bdmc_run, evaluate_run, evaluation_name, parse_estimators
from ppl_genmodels.inference.mcmc import MCMC_METHODS
from ppl_genmodels.models import DESCRIPTIONS
from ppl_genmodels.plots import sample_run
from ppl_genmodels.runs import CheckpointError, Run, load_run
from ppl_genmodels.sweep import SPEC_FILE, TABLE_FILE, sweep
from ppl_genmodels.traces import PROPOSALS, STARTS, TraceError, first_line
from ppl_genmodels.train import TrainingDiverged, fit

__all__ = ["main", "build_parser"]


def _field_parser(hint, f: dataclasses.Field):
    """Text -> value for a field: its ``parse`` metadata, else its (non-None) annotated type ``hint``."""
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return kinds[0]


def _default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING or f.default is None or "(default" in f.metadata.get("help", ""):
        return ""
    return f" (default {f.default})"


def _add_field_options(parser: argparse.ArgumentParser, owner) -> None:
    """One option per field of ``owner`` (a dataclass); a nested dataclass field adds its own fields.

    Every option defaults to ``SUPPRESS``: only what the user gave reaches ``fit``,
    which takes everything else from :class:`RunConfig`'s defaults (or, on resume,
    from the run's saved configuration).
    """
    hints = typing.get_type_hints(owner)
    for f in dataclasses.fields(owner):
        if dataclasses.is_dataclass(hints[f.name]):  # e.g. RunConfig.data_options: its fields are options
            _add_field_options(parser, hints[f.name])
            continue
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, type=_field_parser(hints[f.name], f),
                      help=meta.get("help", "") + _default_text(f))
        if hints[f.name] is bool:  # a switch: --name / --no-name
            kwargs.update(action=argparse.BooleanOptionalAction, help=meta.get("help", ""))
            del kwargs["type"]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("repeat"):
            kwargs["action"] = "append"
        parser.add_argument(flag, **kwargs)


def _fit_parser(sub) -> None:
    fit = sub.add_parser("fit", help="train a model with SVI and evaluate it")
    _add_field_options(fit, RunConfig)
    fit.add_argument("--out", help="run directory (default runs/<data>-<model>); never overwritten")
    fit.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    fit.add_argument("--no-plots", action="store_true", help="skip the figures")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    _trust_option(fit)
    _processes_option(fit)


def _processes_option(parser) -> None:
    parser.add_argument("--processes", dest="launch_processes", type=int, metavar="N", help="run N worker processes on this machine through torchrun's "
                        "launcher (training with DDP, evaluation sharded by datapoint); under torchrun leave it out")


def _run_options(parser, seed: bool = False) -> None:
    parser.add_argument("run", help="run directory")
    if seed:
        parser.add_argument("--seed", type=int, help="random seed of the Monte Carlo streams (default 0): each "
                            "datapoint's draws depend on it and the datapoint's index only")
    _processes_option(parser)
    parser.add_argument("--device", help="device to load the run on (default: the training device, else auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _trust_option(parser)


def _trust_option(parser) -> None:
    parser.add_argument("--trust-model-file", action="store_true",
                        help="import the run's model file even if it changed since fit (it runs that file's code)")


def _name_option(parser, kind: str, example: str) -> None:
    parser.add_argument("--name", help=f"name of this call's result set RUN/{kind}/NAME (letters, digits, -, _, .; "
                        f"refused if it exists); default from the options, e.g. {example} (-2, -3, ... when taken)")


def _evaluation_parsers(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="estimates of log p(x) per datapoint: ELBO, IWAE-k, AIS, exact")
    evaluate.add_argument("--estimators", help="comma-separated elbo[:K], iwae[:K], ais[:T], exact (default "
                          "elbo,iwae:100; exact is added for models with a closed form)")
    evaluate.add_argument("--k", type=int, help="shorthand for --estimators elbo,iwae:K")
    evaluate.add_argument("--split", choices=SPLIT_NAMES, default="test")
    evaluate.add_argument("--count", dest="n", type=int, help="evaluate only the first N datapoints of the split")
    evaluate.add_argument("--chains", type=int, default=16, help="AIS chains per datapoint (default 16)")
    evaluate.add_argument("--batch-size", type=int, help="datapoints per pass (default: sized to bound memory)")
    evaluate.add_argument("--ais-start", "--ais-init", dest="ais_start", choices=STARTS, default="prior",
                          help="AIS initial distribution (default prior)")
    evaluate.add_argument("--proposal", choices=PROPOSALS, default="guide",
                          help="importance proposal of elbo and iwae (default guide)")
    evaluate.add_argument("--compile", choices=COMPILE_CHOICES,
                          help="run the particle chunks and AIS's log-joint as compiled graphs: on, off, or auto, "
                               "for evaluations of at least 20 million model passes (default: the run's --compile)")
    _name_option(evaluate, "evaluation", "test-n20-elbo-iwae100")
    _run_options(evaluate, seed=True)

    bdmc = sub.add_parser("bdmc", help="sandwich bounds on log p(x) of data simulated from the model (BDMC)")
    bdmc.add_argument("--count", dest="n", type=int, default=100, help="simulated datapoints (default 100)")
    bdmc.add_argument("--steps", type=int, default=1000, help="annealing steps of each AIS direction (default 1000)")
    bdmc.add_argument("--chains", type=int, default=16, help="AIS chains per datapoint (default 16)")
    bdmc.add_argument("--batch-size", type=int, help="datapoints per pass (default: sized to bound memory)")
    _name_option(bdmc, "bdmc", "n100-steps1000-chains16")
    _run_options(bdmc, seed=True)

    compare = sub.add_parser("compare", help="amortized guide vs MCMC, per-datapoint guides and exact posteriors: "
                             "gap decomposition and posterior discrepancies")
    compare.add_argument("--count", dest="n", type=int, default=100, help="first N datapoints of the split (default 100)")
    compare.add_argument("--split", choices=SPLIT_NAMES, default="test")
    compare.add_argument("--mcmc", choices=MCMC_METHODS, default="hmc",
                         help="batched HMC, or Pyro's NUTS (one datapoint and chain at a time; slow) (default hmc)")
    compare.add_argument("--chains", type=int, default=4, help="MCMC chains per datapoint (default 4)")
    compare.add_argument("--samples", type=int, default=1000, help="MCMC draws per chain (default 1000)")
    compare.add_argument("--warmup", type=int, default=1000, help="MCMC warm-up iterations (default 1000)")
    compare.add_argument("--local-steps", type=int, default=500, help="Adam steps of the per-datapoint guides (default 500)")
    compare.add_argument("--logp-k", type=int, default=5000,
                         help="IWAE particles for log p(x) when the model has no closed form (default 5000)")
    _name_option(compare, "compare", "test-n100-hmc-c4-s1000-w1000")
    _run_options(compare, seed=True)


def _sweep_parser(sub) -> None:
    sweep_cmd = sub.add_parser("sweep", help="train and evaluate a grid of fit options: one run per cell, one table")
    sweep_cmd.add_argument("spec", help="sweep spec, a .toml or .json file: fit options shared by every cell, a grid "
                           "table (option = [values]; the cells are their product), an evaluate table")
    sweep_cmd.add_argument("--out", required=True, help="sweep directory: a run directory per cell, sweep.csv, "
                           "plots/; a sweep started again there skips its finished cells")
    sweep_cmd.add_argument("--quiet", action="store_true", help="no progress lines or bars")
    _processes_option(sweep_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-genmodels", description="Deep latent-variable generative models as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _fit_parser(sub)
    sample = sub.add_parser("sample", help="draw samples from a trained run and write a PNG")
    sample.add_argument("run", help="run directory")
    sample.add_argument("--count", dest="n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", help="PNG path (default RUN/plots/samples_N.png)")
    sample.add_argument("--label", type=int, help="class to generate (conditional models on labels)")
    sample.add_argument("--seed", type=int, help="random seed")
    sample.add_argument("--device", help="device to load the run on (default: the training device, else auto)")
    _trust_option(sample)
    _evaluation_parsers(sub)
    _sweep_parser(sub)
    sub.add_parser("models", help="list the built-in models")
    sub.add_parser("datasets", help="list the built-in datasets")
    return parser


def _fit(args) -> int:
    options = {name: getattr(args, name) for name in RunConfig.names() if hasattr(args, name)}
    if "model_args" in options:
        options["model_args"] = dict(options["model_args"])  # KEY=VALUE pairs, the last one of a key wins
    if args.resume:
        fixed = [name for name in options if name not in RunConfig.resumable()]
        if fixed:
            raise ConfigError(f"a resumed run keeps its configuration; cannot change {', '.join(fixed)} with --resume")
        run = fit(out=args.out, resume=True, progress=not args.quiet, plots=not args.no_plots,
                  trust_model_file=args.trust_model_file, **options)
    else:
        run = fit(options.pop("model", "vae"), options.pop("data", "digits"), args.out, progress=not args.quiet,
                  plots=not args.no_plots, **options)
    summary = run.summary()
    print(f"run directory: {run.path}  (best epoch {run.epoch}; metrics.csv, checkpoint.pt, best.pt, evaluation/fit/, plots/)")
    if summary is not None:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def _sample(args) -> int:
    run = load_run(args.run, device=args.device, trust_model_file=args.trust_model_file)
    path = sample_run(run, args.n, args.out, label=args.label, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _print_summary(summary, what: str) -> None:
    print(f"{what}: mean over datapoints (nats), its standard error, datapoints, seconds")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _load(args) -> Run:
    """The run of an evaluate/bdmc/compare command, its process group joined in a multi-process job."""
    run = load_run(args.run, device=args.device, trust_model_file=args.trust_model_file)
    distributed.setup(run.device)
    return run


def _seed(args) -> dict:
    return {} if args.seed is None else {"seed": args.seed}


def _check_name(args, kind: str) -> None:
    """A bad or taken --name fails before the run is loaded."""
    if args.name is not None:
        Run.check_result_name(args.run, kind, args.name)


def _print_result_set(run, folder, files: dict[str, str]) -> None:
    """Where the call wrote: its result set's folder, the index, and each file (``what: path``)."""
    print(f"result set: {folder}  (listed in {run.folder(Run.RESULTS_FILE)})")
    for what, file in files.items():
        print(f"{what}: {folder / file}")


def _print_compiled(run) -> None:
    """The compiled paths' graphs and compile seconds of the command's program, when it compiled any."""
    line = compiled.report(run.program)
    if line is not None and distributed.is_main():
        print(line)


def _evaluate(args) -> int:
    if args.estimators is not None and args.k is not None:
        raise ValueError("give --estimators or --k, not both")
    _check_at_least(args, 1, "k", "n", "chains", "batch_size")  # before the run is loaded
    options = dict(estimators=args.estimators, k=args.k, split=args.split, n=args.n, batch_size=args.batch_size,
                   chains=args.chains, ais_start=args.ais_start, proposal=args.proposal, progress=not args.quiet,
                   compile=args.compile)
    if args.estimators is not None:
        parse_estimators(args.estimators)  # a bad spec fails before the run is loaded
    _check_name(args, "evaluation")
    run = _load(args)
    name = distributed.agree(lambda: run.new_result_name("evaluation", args.name, default=evaluation_name(
        estimators=args.estimators, k=args.k, split=args.split, n=args.n, ais_start=args.ais_start,
        proposal=args.proposal)))
    summary, _ = evaluate_run(run, name=name, **options, **_seed(args))
    _print_summary(summary, f"log p(x) on the {args.split} split")
    _print_compiled(run)
    _print_result_set(run, run.result_set("evaluation", name),
                      {"summary": "summary.csv", "per-datapoint estimates": "per_datapoint.csv"})
    return 0


#: options whose flag is not their name: ``--count`` (not ``--n``, which ``torchrun`` reads as an
#: ambiguous abbreviation of its own ``--nnodes``/``--nproc-per-node`` even after ``-m ppl_genmodels``)
_FLAGS = {"n": "--count"}


def _check_at_least(args, minimum: int, *names: str) -> None:
    """One-line error for the first option below ``minimum`` (options left unset are skipped)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            flag = _FLAGS.get(name, f"--{name.replace('_', '-')}")
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def _bdmc(args) -> int:
    _check_at_least(args, 1, "n", "steps", "chains", "batch_size")
    _check_name(args, "bdmc")
    run = _load(args)
    name = distributed.agree(lambda: run.new_result_name(
        "bdmc", args.name, default=bdmc_name(n=args.n, num_steps=args.steps, chains=args.chains)))
    summary, _ = bdmc_run(run, n=args.n, num_steps=args.steps, chains=args.chains, batch_size=args.batch_size,
                          progress=not args.quiet, name=name, **_seed(args))
    _print_summary(summary, f"BDMC bounds on log p(x) of simulated data ({args.steps} steps)")
    _print_compiled(run)
    _print_result_set(run, run.result_set("bdmc", name),
                      {"summary": "summary.csv", "per-datapoint bounds": "per_datapoint.csv"})
    return 0


def _compare(args) -> int:
    _check_at_least(args, 1, "n", "chains", "samples", "logp_k")
    _check_at_least(args, 0, "warmup", "local_steps")
    _check_name(args, "compare")
    run = _load(args)
    name = distributed.agree(lambda: run.new_result_name("compare", args.name, default=compare_name(
        n=args.n, split=args.split, mcmc=args.mcmc, chains=args.chains, samples=args.samples, warmup=args.warmup)))
    summary, per, _ = compare_run(run, n=args.n, split=args.split, mcmc=args.mcmc, chains=args.chains,
                                  samples=args.samples, warmup=args.warmup, local_steps=args.local_steps,
                                  logp_k=args.logp_k, seed=args.seed, progress=not args.quiet, name=name)
    print(f"inference on the first {len(per)} datapoints of the {args.split} split: log p(x) and ELBOs (nats), "
          "gaps, discrepancies from MCMC / exact draws, MCMC diagnostics")
    print(summary.T.to_string(header=False, float_format=lambda v: f"{v:.4f}"))
    _print_compiled(run)
    folder = run.result_set("compare", name)
    _print_result_set(run, folder, {"summary": "summary.csv",
                                    "per-datapoint gaps, diagnostics and discrepancies": "per_datapoint.csv",
                                    "draws (ArviZ InferenceData)": "posterior.nc"})
    figures = sorted(p.name for p in folder.glob("*.png"))
    if figures:
        print(f"figures in {folder}: {', '.join(figures)}")
    return 0


def _sweep(args) -> int:
    table = sweep(args.spec, args.out, progress=not args.quiet)
    print(f"sweep directory: {args.out}  ({len(table)} cells; {TABLE_FILE}, {SPEC_FILE}, plots/, a run directory "
          "per cell)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    diverged = table.attrs.get("diverged")
    if diverged:
        print(f"error: training diverged in {len(diverged)} cell(s), left out of the table: {', '.join(diverged)}",
              file=sys.stderr)
        return 1
    return 0


def _list(table: dict, header: str) -> int:
    width = max(len(k) for k in table)
    print(f"{header:<{width}}  description")
    for name, text in table.items():
        print(f"{name:<{width}}  {text}")
    return 0


def _models(args) -> int:
    return _list(DESCRIPTIONS, "model")


def _datasets(args) -> int:
    return _list(DATASETS, "dataset")


COMMANDS = {"fit": _fit, "sample": _sample, "evaluate": _evaluate, "bdmc": _bdmc, "compare": _compare,
            "sweep": _sweep, "models": _models, "datasets": _datasets}


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    empty = [a.split("=")[0] for a in argv if a.startswith("--") and a.endswith("=--")]
    if empty:  # argparse would take "--opt=--" as an empty list and skip the option's type
        parser.error(f"argument {empty[0]}: expected one value, got '--'")
    args = parser.parse_args(argv)
    here = distributed.world()
    processes = getattr(args, "launch_processes", None)
    if processes is not None:
        if processes < 1:
            parser.error(f"argument --processes: must be >= 1, got {processes}")
        if here.distributed:
            parser.error("argument --processes: this process was started by torchrun already; leave it out")
        if processes > 1:
            return _launch(processes, argv)
    if not here.rank == 0:  # one process reports: the others run silently
        sys.stdout = _Silent()
        if hasattr(args, "quiet"):
            args.quiet = True
    status = 1
    try:
        status = _run_command(args, report=here.rank == 0)
        return status
    finally:  # ranks leave the group together (a gloo group torn down under a peer can abort it), after an
        # error for at most ERROR_WAIT seconds
        distributed.teardown(synchronize=status == 0, wait=None if status == 0 else distributed.ERROR_WAIT)


class _Silent:
    """Standard output of the ranks other than 0: their reports would repeat rank 0's."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _launch(processes: int, argv: list[str]) -> int:
    """Start ``processes`` workers running this same command (without ``--processes``)."""
    rest, skip = [], False
    for arg in argv:
        name = arg.split("=")[0]
        is_processes = len(name) > 2 and "--processes".startswith(name)  # argparse took it, abbreviated or not
        if skip:
            skip = False
        elif is_processes:
            skip = "=" not in arg
        else:
            rest.append(arg)
    try:
        return distributed.launch(processes, rest)
    except distributed.LaunchError as err:
        if err.exitcode in (1, 2):  # a worker's own one-line error is already on stderr
            return err.exitcode
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run_command(args, report: bool) -> int:
    """Run the parsed command; errors become one line on stderr (from rank 0 alone) and an exit status."""
    def error(text: str, status: int) -> int:
        if report:
            print(f"error: {text}", file=sys.stderr)
        return status

    try:
        return COMMANDS[args.command](args)
    except TrainingDiverged as err:
        return error(str(err), 1)
    except (MemoryError, RuntimeError) as err:
        text = first_line(err)
        if distributed.peer_failure(err):
            return error(f"another process of this job failed or stopped ({text[:200]}); this one stops too", 1)
        if not isinstance(err, MemoryError) and "memory" not in text.lower():
            raise
        return error(f"out of memory ({text[:200]}); use fewer --particles, a smaller --batch-size or --count", 1)
    except (DataError, ConfigError, TraceError, CheckpointError, ValueError) as err:
        return error(str(err), 2)


if __name__ == "__main__":
    sys.exit(main())
