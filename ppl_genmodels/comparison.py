"""How good is a run's amortized posterior? Every inference method on the same datapoints, side by side.

:func:`compare_run` takes the first ``n`` datapoints of a split of a trained
run and, with the decoder fixed, runs

- MCMC over the latents (:mod:`ppl_genmodels.inference.mcmc`: batched HMC, or
  Pyro's NUTS as the slow reference) for draws from p(z | x);
- per-datapoint guides in the amortized guide's family
  (:mod:`ppl_genmodels.inference.local`);
- the gap decomposition of Cremer, Li & Duvenaud (2018) and the posterior
  discrepancies of every method from MCMC and, where the model has
  ``exact_posterior``, from exact draws (:mod:`ppl_genmodels.inference.compare`).

It first computes everything (:class:`Comparison`), then writes it into its own
result set ``RUN_DIR/compare/<name>/`` (never overwritten; listed in ``RUN_DIR/results.csv``):
``summary.csv`` (one row per method), ``per_datapoint.csv``, ``posterior.nc`` (all draws
as ArviZ InferenceData) and the figures.

Every draw of datapoint i comes from per-datapoint streams ``Streams(seed, i, "compare/<method>")``
(:mod:`ppl_genmodels.streams`; i its position among the n compared), and the
datapoints are processed in a padded layout (:func:`~ppl_genmodels.inference.importance.padded_passes`),
so each datapoint's results do not depend on which others are compared with it. In a
job of several processes (``torchrun``, ``--processes``) each process takes its
contiguous block of the n datapoints; rank 0 gathers the per-datapoint results and
draws and writes the same files one process would. Pyro's NUTS (``mcmc="nuts"``)
draws from torch's global generator, seeded with ``seed`` in every process, so its
draws depend on the process a datapoint falls in.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ppl_genmodels import distributed, tables
from ppl_genmodels import plots as figures
from ppl_genmodels.inference.compare import (
    DISCREPANCIES,
    exact_draws,
    gap_decomposition,
    guide_draws,
    posterior_discrepancy,
)
from ppl_genmodels.inference.importance import padded_passes
from ppl_genmodels.inference.local import fit_local_guides, sample_local
from ppl_genmodels.inference.mcmc import MCMC_METHODS, RHAT_THRESHOLD, hmc_posterior, nuts_posterior
from ppl_genmodels.runs import as_run, atomic_write, writer
from ppl_genmodels.streams import Streams
from ppl_genmodels.traces import LogJoint

__all__ = ["Comparison", "compare_run", "compare", "compare_name", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ["method", "quantity", "mean", "stderr", "gap_to_log_px", "amortization_gap",
                   "vs_mcmc_mean_sd", "vs_mcmc_sd_ratio", "vs_mcmc_energy",
                   "vs_exact_mean_sd", "vs_exact_sd_ratio", "vs_exact_energy",
                   "max_rhat", "min_ess_bulk", "min_ess_tail", "divergences", "not_converged", "n", "seconds"]


@dataclass
class Comparison:
    """Everything :func:`compare_run` computed: the tables, the draws and the datapoints they are for."""

    summary: pd.DataFrame          # one row per method
    per_datapoint: pd.DataFrame    # one row per datapoint
    idata: object                  # arviz.InferenceData of every method's draws
    draws: dict[str, torch.Tensor]  # method -> [draws, batch, latent_dim]: "MCMC", "amortized q(z|x)", ...
    index: np.ndarray              # [batch] rows of the split's source


def _check_arguments(mcmc, guide_draws_, **counts) -> None:
    if mcmc not in MCMC_METHODS:
        raise ValueError(f"unknown MCMC method {mcmc!r}; expected one of {', '.join(MCMC_METHODS)}")
    for name in ("n", "chains", "samples", "logp_k", "elbo_k"):
        if counts[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {counts[name]}")
    for name in ("warmup", "local_steps"):
        if counts[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {counts[name]}")
    if guide_draws_ is not None and guide_draws_ < 2:
        raise ValueError(f"guide_draws must be >= 2, got {guide_draws_}")
    if counts["chains"] * counts["samples"] < 2:
        raise ValueError("need at least 2 MCMC draws per datapoint (chains x samples)")


def _discrepancy_columns(draws: dict[str, torch.Tensor], exact, streams: Streams,
                         progress: bool) -> dict[str, np.ndarray]:
    """``<method>_vs_<reference>_<measure>`` for guide/local vs MCMC and, with exact draws, all three vs exact."""
    pairs = [("guide", "mcmc"), ("local", "mcmc")]
    if exact is not None:
        pairs += [("guide", "exact"), ("local", "exact"), ("mcmc", "exact")]
    named = {**draws, "exact": exact}
    out = {}
    for name, ref in tqdm(pairs, desc="discrepancies", disable=not progress, leave=False):
        for key, value in posterior_discrepancy(named[name], named[ref],
                                                generator=streams.child(f"{name}_vs_{ref}")).items():
            out[f"{name}_vs_{ref}_{key}"] = value.double().numpy()
    return out


def _summary(per: pd.DataFrame, seconds: dict[str, float], mcmc_name: str) -> pd.DataFrame:
    """One row per method: log p(x), the MCMC reference with its diagnostics, the local and amortized ELBOs."""
    n, source = len(per), per["log_px_source"].iloc[0]

    def discrepancies(row, prefix):
        for ref in ("mcmc", "exact"):
            for key in DISCREPANCIES:
                column = f"{prefix}_vs_{ref}_{key}"
                if column in per:
                    row[f"vs_{ref}_{key}"] = float(per[column].mean())
        return row

    def finite(column):
        values = per[column].to_numpy(dtype=float)
        return values[~np.isnan(values)]

    rhat, bulk, tail = finite("rhat"), finite("ess_bulk"), finite("ess_tail")
    mean, se = tables.mean_and_stderr(per["log_px"])
    rows = [{"method": "exact" if source == "exact" else source, "quantity": "log p(x)", "mean": mean, "stderr": se,
             "gap_to_log_px": 0.0, "n": n, "seconds": seconds.get("log_px")},
            discrepancies({"method": mcmc_name, "quantity": "posterior draws", "n": n, "seconds": seconds.get("mcmc"),
                           "max_rhat": float(rhat.max()) if len(rhat) else float("nan"),
                           "min_ess_bulk": float(bulk.min()) if len(bulk) else float("nan"),
                           "min_ess_tail": float(tail.min()) if len(tail) else float("nan"),
                           "divergences": int(per["divergences"].sum()),
                           "not_converged": int((~(per["rhat"] < RHAT_THRESHOLD)).sum())}, "mcmc")]
    for method, prefix, column in (("local", "local", "elbo_local"), ("amortized", "guide", "elbo_amortized")):
        mean, se = tables.mean_and_stderr(per[column])
        row = {"method": method, "quantity": "ELBO", "mean": mean, "stderr": se,
               "gap_to_log_px": float((per["log_px"] - per[column]).mean()), "n": n, "seconds": seconds.get(method)}
        if method == "amortized":
            row["amortization_gap"] = float(per["amortization_gap"].mean())
        rows.append(discrepancies(row, prefix))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _inference_data(draws: dict[str, torch.Tensor], mcmc_chains: torch.Tensor, index: np.ndarray, mcmc: str,
                    log_px_source: str):
    """ArviZ InferenceData: ``posterior`` (MCMC) and one group per other method, z [chain, draw, datapoint, latent_dim]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    coords = {"datapoint": index, "latent_dim": np.arange(mcmc_chains.shape[-1])}
    dims = {"z": ["datapoint", "latent_dim"]}
    idata = az.from_dict(posterior={"z": mcmc_chains.double().numpy()}, coords=coords, dims=dims,
                         attrs={"mcmc": mcmc, "log_px_source": log_px_source})
    groups = {name: {"z": value.double().numpy()[None]} for name, value in draws.items() if value is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        idata.add_groups(groups, coords=coords, dims=dims)
    return idata


@dataclass
class _Part:
    """What one process computed for its datapoints, the padding dropped."""

    per: pd.DataFrame                    # per-datapoint columns (no index)
    draws: dict[str, torch.Tensor]       # "mcmc", "local", "guide" [draws, m, d]; "exact" too, or None
    mcmc_chains: torch.Tensor            # [chains, draws, m, d]
    seconds: dict[str, float]
    log_px_source: str


def _head(columns: dict, kept: int) -> dict:
    """Per-datapoint columns of a padded batch, its first ``kept`` rows (a string column stays as it is)."""
    return {key: value[:kept] if isinstance(value, np.ndarray) else value for key, value in columns.items()}


def _sample_posterior(module, x, y, kept: int, streams: Streams, *, mcmc, chains, samples, warmup, progress):
    """The MCMC result: batched HMC on the padded batch, or NUTS (one datapoint at a time) on the kept rows."""
    options = dict(num_chains=chains, num_samples=samples, warmup=warmup, progress=progress, warn=False)
    if mcmc == "hmc":
        return hmc_posterior(module.model, module.guide, x, y, generator=streams, **options)
    return nuts_posterior(module.model, module.guide, x[:kept], None if y is None else y[:kept],
                          generator=streams.subset(slice(0, kept)), **options)


def _compute(run, x, y, kept: int, streams: Streams, *, mcmc, chains, samples, warmup, local_steps, logp_k, elbo_k,
             num_draws, progress) -> _Part:
    """Every method on the datapoints ``x`` (a padded batch: rows after the first ``kept`` are dropped)."""
    module = run.program
    joint = LogJoint(module.model, module.guide, x, y, start="prior")
    layout = joint.layout
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    result = _sample_posterior(module, x, y, kept, streams.child("mcmc"), mcmc=mcmc, chains=chains, samples=samples,
                               warmup=warmup, progress=progress)
    seconds["mcmc"] = time.perf_counter() - began
    mcmc_chains = layout.flatten(result.samples, 3).cpu()[:, :, :kept]    # [chains, draws, m, d]
    began = time.perf_counter()
    local = fit_local_guides(module.model, module.guide, x, y, steps=local_steps, generator=streams.child("local"),
                             progress=progress)
    seconds["local"] = time.perf_counter() - began
    draws = {"mcmc": mcmc_chains.reshape((-1,) + mcmc_chains.shape[2:]),  # [chains*draws, m, d]
             "local": layout.flatten(sample_local(local, num_draws, generator=streams.child("local_draws")), 2).cpu()}
    began = time.perf_counter()
    draws["guide"] = guide_draws(module.model, module.guide, x, y, num_draws, layout, joint.nesting,
                                 generator=streams.child("guide_draws"))
    exact = exact_draws(module, x, y, num_draws, layout, generator=streams.child("exact_draws"))
    gaps = gap_decomposition(module, x, y, local=local, logp_k=logp_k, elbo_k=elbo_k, generator=streams,
                             progress=progress)
    seconds["amortized"] = seconds["log_px"] = time.perf_counter() - began
    draws = {key: value[:, :kept] for key, value in draws.items()}
    exact = None if exact is None else exact[:, :kept]
    per = pd.DataFrame({**_head(tables.columns(gaps), kept), **_head(tables.columns(result), kept),
                        **_discrepancy_columns(draws, exact, streams.subset(slice(0, kept)).child("energy"),
                                                progress)})
    return _Part(per, {**draws, "exact": exact}, mcmc_chains, seconds, gaps.log_px_source)


def _compute_shard(run, part, start: int, stop: int, seed: int, **options) -> _Part | None:
    """This process's datapoints ``start:stop`` of the split, padded to a multiple of PAD (None when it has none)."""
    if stop <= start:
        return None
    (_, _, rows), = padded_passes(stop - start, stop - start)  # one pass of every datapoint, padded
    rows = rows.to(part.x.device) + start
    streams = Streams(seed, rows, "compare", device=part.x.device)
    return _compute(run, part.x[rows], None if part.y is None else part.y[rows], stop - start, streams, **options)


def _assemble(parts: list[_Part | None], index: np.ndarray, mcmc: str) -> Comparison:
    """The comparison of all datapoints from every process's part (rank order is datapoint order)."""
    parts = [p for p in parts if p is not None]
    per = pd.concat([p.per for p in parts], ignore_index=True)
    per.insert(0, "index", index)
    seconds = {key: max(p.seconds[key] for p in parts) for key in parts[0].seconds}  # the slowest process's
    draws = {key: None if parts[0].draws[key] is None else torch.cat([p.draws[key] for p in parts], 1)
             for key in parts[0].draws}
    mcmc_chains = torch.cat([p.mcmc_chains for p in parts], 2)
    source = parts[0].log_px_source
    _warn_unconverged(per)
    idata = _inference_data({"guide": draws["guide"], "local_guide": draws["local"], "exact": draws["exact"]},
                            mcmc_chains, index, mcmc, source)
    shown = {"MCMC": draws["mcmc"], "amortized q(z|x)": draws["guide"], "local guide": draws["local"]}
    if draws["exact"] is not None:
        shown["exact"] = draws["exact"]
    return Comparison(_summary(per, seconds, mcmc), per, idata, shown, index)


def _warn_unconverged(per: pd.DataFrame) -> None:
    """One warning for the datapoints whose MCMC chains have not converged (R-hat at or above the threshold)."""
    rhat = per["rhat"].to_numpy(dtype=float)
    bad = per["index"].to_numpy()[~(rhat < RHAT_THRESHOLD)]
    if len(bad) and not np.isnan(rhat).all():
        shown = ", ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
        warnings.warn(f"{len(bad)} of {len(per)} datapoints have R-hat >= {RHAT_THRESHOLD} (index {shown}); run "
                      "more warm-up or draws before trusting them", RuntimeWarning, stacklevel=2)


def _write(run, name: str, comparison: Comparison, plots: bool, *, seconds: float, options: dict) -> None:
    def others(folder):
        atomic_write(folder / "posterior.nc", lambda tmp: comparison.idata.to_netcdf(str(tmp)))
        if plots:
            figures.plot_comparison(comparison, folder)

    run.write_result_set("compare", name, {"summary.csv": comparison.summary,
                                           "per_datapoint.csv": comparison.per_datapoint},
                         seconds=seconds, options=options, write=others)


def compare_name(*, n: int = 100, split: str = "test", mcmc: str = "hmc", chains: int = 4, samples: int = 1000,
                 warmup: int = 1000) -> str:
    """The default name of a comparison's result set: ``test-n100-hmc-c4-s1000-w1000``
    (split, n, MCMC method, chains, samples per chain, warm-up)."""
    return f"{split}-n{n}-{mcmc}-c{chains}-s{samples}-w{warmup}"


@writer("compare")
def compare_run(run, *, n: int = 100, split: str = "test", mcmc: str = "hmc", chains: int = 4, samples: int = 1000,
                warmup: int = 1000, local_steps: int = 500, logp_k: int = 5000, elbo_k: int = 1000,
                guide_draws: int | None = None, seed: int | None = 0, progress: bool = True, save: bool = True,
                plots: bool = True, name: str | None = None):
    """Compare the amortized guide of a run with MCMC, per-datapoint guides and exact answers.

    Args:
        run: a :class:`~ppl_genmodels.runs.Run` or a run directory.
        n, split: the first ``n`` datapoints of ``split``.
        mcmc: ``"hmc"`` (batched, :func:`~ppl_genmodels.inference.mcmc.hmc_posterior`) or ``"nuts"``
            (Pyro's NUTS, one datapoint and chain at a time: slow, the reference).
        chains, samples, warmup: MCMC chains per datapoint, draws per chain, warm-up iterations.
        local_steps: Adam steps of the per-datapoint guides.
        logp_k: IWAE particles for log p(x) when the model has no ``exact_log_marginal``.
        elbo_k: particles of the amortized guide's ELBO.
        guide_draws: draws from the amortized, local and exact posteriors (default chains x samples).
        seed: the seed of every datapoint's random streams (None: 0), and of torch's global generator
            (Pyro's NUTS draws from it); progress: tqdm bars (rank 0's); save: write files; plots: figures.
        name: the result set's name (letters, digits, ``-``, ``_``, ``.``); one that exists is refused
            before any work. Default: :func:`compare_name` of the options, with ``-2``, ``-3``, ...
            appended when a set of that name exists.

    Returns ``(summary, per_datapoint, idata)``. ``per_datapoint`` has ``index`` (row in the split's
    source), the gap decomposition (see :func:`~ppl_genmodels.inference.compare.gap_decomposition`),
    the MCMC diagnostics ``rhat, ess_bulk, ess_tail, accept_rate, divergences`` and discrepancy
    columns ``<a>_vs_<b>_<measure>`` for guide/local vs mcmc and, with ``exact_posterior``,
    guide/local/mcmc vs exact. ``summary`` has one row per method. ``idata`` holds the MCMC draws
    as ``posterior`` and the other methods' as groups ``guide``, ``local_guide`` (and ``exact``),
    each ``z [chain, draw, datapoint, latent_dim]``. When ``save``, writes ``summary.csv``,
    ``per_datapoint.csv``, ``posterior.nc`` and figures into the new result set
    ``RUN_DIR/compare/<name>/`` and adds its row to ``RUN_DIR/results.csv``.

    In a job of several processes each computes its block of the datapoints and rank 0
    gathers them, writes the files and returns the same ``summary`` and ``per_datapoint``
    as every other rank (``idata`` is None on the other ranks: the draws are gathered on
    rank 0 only). ``seconds`` in the summary is the slowest process's time for that method.
    """
    began = time.perf_counter()
    _check_arguments(mcmc, guide_draws, n=n, chains=chains, samples=samples, logp_k=logp_k, elbo_k=elbo_k,
                     warmup=warmup, local_steps=local_steps)
    seed = 0 if seed is None else int(seed)
    run = as_run(run)
    distributed.setup(run.device)
    if save:
        name = distributed.agree(lambda: run.new_result_name("compare", name, default=compare_name(
            n=n, split=split, mcmc=mcmc, chains=chains, samples=samples, warmup=warmup)))
    torch.manual_seed(seed)  # Pyro's NUTS draws from torch's global generator
    run.program.eval()
    part = run.data.split(split)
    total = min(n, len(part.x))
    if total < 1:
        raise ValueError(f"nothing to compare: split {split!r} has no datapoints")
    start, stop = distributed.shard(total)
    mine = _compute_shard(run, part, start, stop, seed, mcmc=mcmc, chains=chains, samples=samples, warmup=warmup,
                          local_steps=local_steps, logp_k=logp_k, elbo_k=elbo_k,
                          num_draws=guide_draws or chains * samples, progress=progress and distributed.is_main())
    parts = distributed.gather(mine)
    built: list[Comparison] = []

    def finish():  # rank 0: every datapoint's results, written once
        built.append(_assemble(parts, part.index[:total].cpu().numpy(), mcmc))
        if save:
            options = dict(n=n, split=split, mcmc=mcmc, chains=chains, samples=samples, warmup=warmup,
                           local_steps=local_steps, logp_k=logp_k, elbo_k=elbo_k, guide_draws=guide_draws,
                           seed=seed, plots=plots)
            _write(run, name, built[0], plots, seconds=time.perf_counter() - began, options=options)
        return built[0].summary, built[0].per_datapoint

    summary, per_datapoint = distributed.agree(finish)
    return summary, per_datapoint, built[0].idata if built else None


compare = compare_run
