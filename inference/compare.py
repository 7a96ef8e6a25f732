"""How far is the amortized posterior q(z | x) from p(z | x)? Gap decomposition and posterior discrepancies.

Gap decomposition (Cremer, Li & Duvenaud 2018, "Inference suboptimality in
variational autoencoders", ICML). For each datapoint x, with the decoder fixed,

    log p(x) - ELBO[q_phi(. | x)]
        = ( log p(x) - ELBO[q*_x] )              approximation gap
        + ( ELBO[q*_x] - ELBO[q_phi(. | x)] )    amortization gap

where q*_x is the best member of the guide's family for that one datapoint,
fitted by :func:`ppl_genmodels.inference.local.fit_local_guides`, and
ELBO[q] = E_q[log p(x, z) - log q(z)]. log p(x) is the model's closed form
``exact_log_marginal`` where it has one, else the IWAE-k bound
log (1/k) sum_i p(x, z_i) / q_phi(z_i | x) with k large (Burda, Grosse &
Salakhutdinov 2016), a stochastic lower bound whose bias shrinks with k. With
an estimated log p(x) the approximation gap is therefore itself a lower bound
(up to Monte Carlo noise).

Posterior discrepancies compare two sets of draws per datapoint, a candidate
A and a reference B (each ``[draws, batch, dim]``, all latent sites flattened):

- ``mean_sd``: max over dimensions of |mean_A - mean_B| / sd_B, how far the
  candidate's mean sits from the reference's in units of the reference's
  posterior standard deviation;
- ``sd_ratio``: sd_A / sd_B in the dimension where log(sd_A / sd_B) is
  largest in absolute value (1 is perfect; < 1 an over-confident candidate,
  the usual failure of a reverse-KL fit);
- ``energy``: the energy distance (Szekely & Rizzo 2013, "Energy statistics:
  a class of statistics based on distances", J. Stat. Plan. Inference)

      D^2(A, B) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|,   X, X' ~ A,  Y, Y' ~ B,

  zero exactly when the two distributions are equal. It is estimated with
  U-statistics for the within-sample terms (so it is unbiased and may come out
  slightly negative when the two agree) from at most ``max_draws`` (500) draws
  of each set, chosen at random, since it costs O(draws^2) per datapoint.

:func:`compare_run` puts it together on a trained run: MCMC over the latents
(:mod:`ppl_genmodels.inference.mcmc`, batched HMC or Pyro's NUTS) as the
reference posterior, per-datapoint guides, draws from the amortized guide and,
where the model has ``exact_posterior``, from the exact posterior; it writes
tables (CSV), all draws as ArviZ InferenceData (netCDF) and figures.
"""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ppl_genmodels.inference.importance import streaming_estimates
from ppl_genmodels.inference.local import fit_local_guides, sample_local
from ppl_genmodels.inference.mcmc import RHAT_THRESHOLD, MCMCResult, hmc_posterior, nuts_posterior
from ppl_genmodels.traces import LogJoint

__all__ = ["energy_distance", "posterior_discrepancy", "gap_decomposition", "compare_run", "MCMC_METHODS"]

MCMC_METHODS = ("hmc", "nuts")
MAX_ENERGY_DRAWS = 500
_ROWS_PER_PASS = 8_192  # particles x datapoints per pass of the importance estimates
DISCREPANCIES = ("mean_sd", "sd_ratio", "energy")


# ---------------------------------------------------------------------------
# posterior discrepancy
# ---------------------------------------------------------------------------


def _check_draws(name: str, draws: torch.Tensor) -> torch.Tensor:
    draws = torch.as_tensor(draws)
    if draws.dim() == 2:
        draws = draws.unsqueeze(-1)
    if draws.dim() != 3:
        raise ValueError(f"{name}: expected draws [draws, batch, dim], got shape {tuple(draws.shape)}")
    if draws.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 draws per datapoint, got {draws.shape[0]}")
    return draws


def _subsample(draws: torch.Tensor, max_draws: int, generator: torch.Generator | None) -> torch.Tensor:
    if draws.shape[0] <= max_draws:
        return draws
    keep = torch.randperm(draws.shape[0], generator=generator)[:max_draws].to(draws.device)
    return draws[keep]


def energy_distance(samples_a: torch.Tensor, samples_b: torch.Tensor, *, max_draws: int = MAX_ENERGY_DRAWS,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Energy distance D^2 between two sets of draws per datapoint; ``[draws, batch, dim]`` each -> ``[batch]``."""
    a = _subsample(_check_draws("samples_a", samples_a), max_draws, generator).transpose(0, 1).double()  # [B, Na, d]
    b = _subsample(_check_draws("samples_b", samples_b), max_draws, generator).transpose(0, 1).double()  # [B, Nb, d]
    na, nb = a.shape[1], b.shape[1]
    cross = torch.cdist(a, b).mean((-2, -1))
    within_a = torch.cdist(a, a).sum((-2, -1)) / (na * (na - 1))  # the diagonal is 0: a U-statistic
    within_b = torch.cdist(b, b).sum((-2, -1)) / (nb * (nb - 1))
    return 2 * cross - within_a - within_b


@torch.no_grad()
def posterior_discrepancy(samples_a: torch.Tensor, samples_b: torch.Tensor, *, max_draws: int = MAX_ENERGY_DRAWS,
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Discrepancies of draws ``samples_a`` from reference draws ``samples_b`` (``[draws, batch, dim]`` each).

    Returns ``{"mean_sd", "sd_ratio", "energy"}``, each ``[batch]`` (see the module docstring).
    """
    a, b = _check_draws("samples_a", samples_a), _check_draws("samples_b", samples_b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"samples_a {tuple(a.shape)} and samples_b {tuple(b.shape)} differ in batch or dimension")
    a64, b64 = a.double(), b.double()
    sd_a, sd_b = a64.std(0), b64.std(0)  # [B, d]
    mean_sd = ((a64.mean(0) - b64.mean(0)).abs() / sd_b).amax(-1)
    log_ratio = torch.log(sd_a / sd_b)  # [B, d]
    worst = log_ratio.abs().argmax(-1, keepdim=True)
    sd_ratio = log_ratio.gather(-1, worst).squeeze(-1).exp()
    energy = energy_distance(a64, b64, max_draws=max_draws, generator=generator)
    return {"mean_sd": mean_sd.cpu(), "sd_ratio": sd_ratio.cpu(), "energy": energy.cpu()}


# ---------------------------------------------------------------------------
# gap decomposition
# ---------------------------------------------------------------------------


def _has(module, name: str) -> bool:
    return callable(getattr(module, name, None))


@torch.no_grad()
def _importance(module, x, y, k: int, *, progress: bool, desc: str):
    """(ELBO estimate, IWAE-k estimate) of the amortized guide, over batches of datapoints; tensors [n]."""
    n = x.shape[0]
    batch = max(1, min(n, _ROWS_PER_PASS // min(k, _ROWS_PER_PASS)))
    chunk = max(1, _ROWS_PER_PASS // batch)
    parts = {key: [] for key in ("elbo", "elbo_se", "iwae", "iwae_se")}
    with tqdm(total=n, desc=desc, unit="pt", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch):
            xb = x[start : start + batch]
            yb = None if y is None else y[start : start + batch]
            elbo, iwae = streaming_estimates(module.model, module.guide, xb, yb, k=k, chunk_size=chunk)
            for key, value in zip(parts, (elbo.value, elbo.stderr, iwae.value, iwae.stderr)):
                parts[key].append(value.detach().cpu())
            bar.update(xb.shape[0])
    return {key: torch.cat(value) for key, value in parts.items()}


def gap_decomposition(module, x: torch.Tensor, y: torch.Tensor | None = None, *, local=None, logp_k: int = 5000,
                      elbo_k: int = 1000, local_steps: int = 500, progress: bool = False) -> pd.DataFrame:
    """Per-datapoint log p(x), ELBO of the local and of the amortized guide, and the two gaps.

    Args:
        module: the model (a ``PyroModule`` with ``model`` and ``guide``; ``exact_log_marginal`` used if present).
        x, y: one batch of data.
        local: a :class:`~ppl_genmodels.inference.local.LocalGuideResult` already fitted to this batch
            (else one is fitted with ``local_steps`` steps).
        logp_k: particles of the IWAE estimate of log p(x) when there is no closed form.
        elbo_k: particles of the amortized guide's ELBO estimate.

    Returns a DataFrame with ``log_px, log_px_se, log_px_source, elbo_local, elbo_local_se,
    elbo_amortized, elbo_amortized_se, approximation_gap, amortization_gap`` (one row per datapoint).
    """
    for name, value in (("logp_k", logp_k), ("elbo_k", elbo_k)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if local is None:
        local = fit_local_guides(module.model, module.guide, x, y, steps=local_steps, progress=progress)
    amortized = _importance(module, x, y, elbo_k, progress=progress, desc=f"amortized ELBO (k={elbo_k})")
    if _has(module, "exact_log_marginal"):
        with torch.no_grad():
            log_px = (module.exact_log_marginal(x) if y is None else module.exact_log_marginal(x, y)).detach().cpu()
        log_px_se, source = torch.zeros_like(log_px), "exact"
    else:
        iw = _importance(module, x, y, logp_k, progress=progress, desc=f"log p(x) (iwae{logp_k})")
        log_px, log_px_se, source = iw["iwae"], iw["iwae_se"], f"iwae{logp_k}"
    elbo_local = local.elbo.detach().cpu()
    frame = pd.DataFrame({
        "log_px": log_px.double().numpy(),
        "log_px_se": log_px_se.double().numpy(),
        "log_px_source": source,
        "elbo_local": elbo_local.double().numpy(),
        "elbo_local_se": local.elbo_se.detach().cpu().double().numpy(),
        "elbo_amortized": amortized["elbo"].double().numpy(),
        "elbo_amortized_se": amortized["elbo_se"].double().numpy(),
    })
    frame["approximation_gap"] = frame["log_px"] - frame["elbo_local"]
    frame["amortization_gap"] = frame["elbo_local"] - frame["elbo_amortized"]
    return frame


# ---------------------------------------------------------------------------
# draws from each method
# ---------------------------------------------------------------------------


def _flat(values: dict[str, torch.Tensor], names: list[str], lead: int) -> torch.Tensor:
    """Latent sites in ``names`` order flattened: ``[*lead dims, latent_dim]``."""
    parts = [values[name].reshape(values[name].shape[:lead] + (-1,)) for name in names]
    return torch.cat(parts, -1).detach().cpu()


@torch.no_grad()
def _guide_draws(module, x, y, num: int, joint: LogJoint) -> torch.Tensor:
    """``[num, batch, latent_dim]`` draws from the amortized guide, constrained, in the layout's order."""
    init = LogJoint(module.model, module.guide, x, y, init="guide", nesting=joint.nesting)
    values, _ = init.layout.unpack(init.sample_init(num))
    return _flat(values, [s.name for s in joint.layout.sites], 2)


@torch.no_grad()
def _exact_draws(module, x, y, num: int, joint: LogJoint) -> torch.Tensor | None:
    """``[num, batch, latent_dim]`` from ``exact_posterior`` for a model with one latent site, else None."""
    if not _has(module, "exact_posterior") or len(joint.layout.sites) != 1:
        return None
    post = module.exact_posterior(x) if y is None else module.exact_posterior(x, y)
    draws = post.sample((num,))
    draws = draws.reshape(num, x.shape[0], -1)
    return draws.cpu() if draws.shape[-1] == joint.dim else None


# ---------------------------------------------------------------------------
# compare_run
# ---------------------------------------------------------------------------


def _atomic_netcdf(idata, path: Path) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        idata.to_netcdf(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _inference_data(mcmc_flat: torch.Tensor, draws: dict[str, torch.Tensor], index: np.ndarray, mcmc_method: str,
                    log_px_source: str):
    """ArviZ InferenceData: ``posterior`` (MCMC) and one group per other method, z [chain, draw, datapoint, latent_dim]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    dim = mcmc_flat.shape[-1]
    coords = {"datapoint": index, "latent_dim": np.arange(dim)}
    dims = {"z": ["datapoint", "latent_dim"]}
    idata = az.from_dict(posterior={"z": mcmc_flat.double().numpy()}, coords=coords, dims=dims,
                         attrs={"mcmc": mcmc_method, "log_px_source": log_px_source})
    groups = {name: {"z": value.double().numpy()[None]} for name, value in draws.items()}
    if groups:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            idata.add_groups(groups, coords=coords, dims=dims)
    return idata


def _nanmax(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.max()) if len(values) else float("nan")


def _nanmin(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.min()) if len(values) else float("nan")


def _mean_se(values: pd.Series) -> tuple[float, float]:
    v = values.to_numpy(dtype=float)
    n = len(v)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


SUMMARY_COLUMNS = ["method", "quantity", "mean", "stderr", "gap_to_log_px", "amortization_gap",
                   "vs_mcmc_mean_sd", "vs_mcmc_sd_ratio", "vs_mcmc_energy",
                   "vs_exact_mean_sd", "vs_exact_sd_ratio", "vs_exact_energy",
                   "max_rhat", "min_ess_bulk", "min_ess_tail", "divergences", "not_converged", "n", "seconds"]


def _summary(per: pd.DataFrame, methods: list[str], seconds: dict[str, float], mcmc_name: str) -> pd.DataFrame:
    n = len(per)
    source = per["log_px_source"].iloc[0]
    rows = []

    def disc(row, prefix):
        for ref in ("mcmc", "exact"):
            for key in DISCREPANCIES:
                column = f"{prefix}_vs_{ref}_{key}"
                if column in per:
                    row[f"vs_{ref}_{key}"] = float(per[column].mean())

    log_px_mean, log_px_se = _mean_se(per["log_px"])
    rows.append({"method": "exact" if source == "exact" else source, "quantity": "log p(x)", "mean": log_px_mean,
                 "stderr": log_px_se, "gap_to_log_px": 0.0, "n": n, "seconds": seconds.get("log_px")})
    mcmc_row = {"method": mcmc_name, "quantity": "posterior draws", "n": n, "seconds": seconds.get("mcmc"),
                "max_rhat": _nanmax(per["rhat"].to_numpy(dtype=float)),
                "min_ess_bulk": _nanmin(per["ess_bulk"].to_numpy(dtype=float)),
                "min_ess_tail": _nanmin(per["ess_tail"].to_numpy(dtype=float)),
                "divergences": int(per["divergences"].sum()),
                "not_converged": int((~(per["rhat"] < RHAT_THRESHOLD)).sum())}
    disc(mcmc_row, "mcmc")
    rows.append(mcmc_row)
    for method, prefix, column in (("local", "local", "elbo_local"), ("amortized", "guide", "elbo_amortized")):
        mean, se = _mean_se(per[column])
        row = {"method": method, "quantity": "ELBO", "mean": mean, "stderr": se,
               "gap_to_log_px": float((per["log_px"] - per[column]).mean()), "n": n, "seconds": seconds.get(method)}
        if method == "amortized":
            row["amortization_gap"] = float(per["amortization_gap"].mean())
        disc(row, prefix)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return frame


def compare_run(run, *, n: int = 100, split: str = "test", mcmc: str = "hmc", chains: int = 4, samples: int = 1000,
                warmup: int = 1000, local_steps: int = 500, logp_k: int = 5000, elbo_k: int = 1000,
                guide_draws: int | None = None, seed: int | None = None, progress: bool = True, save: bool = True,
                plots: bool = True):
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
        seed: seeds torch before anything random; progress: tqdm bars; save: write files; plots: figures.

    Returns ``(summary, per_datapoint, idata)``. ``per_datapoint`` has ``index`` (row in the split's
    source), the gap decomposition (see :func:`gap_decomposition`), the MCMC diagnostics ``rhat,
    ess_bulk, ess_tail, accept_rate, divergences`` and discrepancy columns ``<a>_vs_<b>_<measure>``
    for guide/local vs mcmc and, with ``exact_posterior``, guide/local/mcmc vs exact. ``summary``
    has one row per method. ``idata`` holds the MCMC draws as ``posterior`` and the other
    methods' as groups ``guide``, ``local_guide`` (and ``exact``), each ``z [chain, draw,
    datapoint, latent_dim]``. Writes ``RUN_DIR/compare/summary.csv``, ``per_datapoint.csv``,
    ``posterior.nc`` and figures when ``save``.
    """
    from ppl_genmodels.runs import Run, load_run

    if mcmc not in MCMC_METHODS:
        raise ValueError(f"unknown MCMC method {mcmc!r}; expected one of {', '.join(MCMC_METHODS)}")
    for name, value in (("n", n), ("chains", chains), ("samples", samples), ("logp_k", logp_k), ("elbo_k", elbo_k)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("warmup", warmup), ("local_steps", local_steps)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if guide_draws is not None and guide_draws < 2:
        raise ValueError(f"guide_draws must be >= 2, got {guide_draws}")
    if chains * samples < 2:
        raise ValueError("need at least 2 MCMC draws per datapoint (chains x samples)")
    run = run if isinstance(run, Run) else load_run(run)
    if seed is not None:
        torch.manual_seed(seed)
    module = run.model
    module.eval()
    part = run.data.split(split)
    total = min(n, len(part.x))
    if total < 1:
        raise ValueError(f"nothing to compare: split {split!r} has no datapoints")
    x = part.x[:total]
    y = None if part.y is None else part.y[:total]
    index = part.index[:total].cpu().numpy()
    num_draws = guide_draws or chains * samples
    seconds: dict[str, float] = {}

    joint = LogJoint(module.model, module.guide, x, y, init="prior")
    began = time.perf_counter()
    sampler = hmc_posterior if mcmc == "hmc" else nuts_posterior
    result: MCMCResult = sampler(module.model, module.guide, x, y, num_chains=chains, num_samples=samples,
                                 warmup=warmup, progress=progress)
    seconds["mcmc"] = time.perf_counter() - began
    mcmc_chains = _flat(result.samples, [s.name for s in joint.layout.sites], 3)  # [chains, draws, B, d]
    mcmc_draws = mcmc_chains.reshape((-1,) + mcmc_chains.shape[2:])               # [chains*draws, B, d]

    began = time.perf_counter()
    local = fit_local_guides(module.model, module.guide, x, y, steps=local_steps, progress=progress)
    seconds["local"] = time.perf_counter() - began
    local_draws = _flat(sample_local(local, num_draws), [s.name for s in joint.layout.sites], 2)

    began = time.perf_counter()
    amortized_draws = _guide_draws(module, x, y, num_draws, joint)
    exact_draws = _exact_draws(module, x, y, num_draws, joint)
    per = gap_decomposition(module, x, y, local=local, logp_k=logp_k, elbo_k=elbo_k, progress=progress)
    seconds["amortized"] = seconds["log_px"] = time.perf_counter() - began

    per.insert(0, "index", index)
    per["rhat"] = result.rhat.double().numpy()
    per["ess_bulk"] = result.ess_bulk.double().numpy()
    per["ess_tail"] = result.ess_tail.double().numpy()
    per["accept_rate"] = result.accept_rate.double().numpy()
    per["divergences"] = result.divergences.numpy()
    pairs = [("guide", amortized_draws, "mcmc", mcmc_draws), ("local", local_draws, "mcmc", mcmc_draws)]
    if exact_draws is not None:
        pairs += [(name, draws, "exact", exact_draws)
                  for name, draws in (("guide", amortized_draws), ("local", local_draws), ("mcmc", mcmc_draws))]
    for name, draws, ref, ref_draws in tqdm(pairs, desc="discrepancies", disable=not progress, leave=False):
        for key, value in posterior_discrepancy(draws, ref_draws).items():
            per[f"{name}_vs_{ref}_{key}"] = value.double().numpy()

    summary = _summary(per, ["mcmc", "local", "amortized"], seconds, mcmc)
    groups = {"guide": amortized_draws, "local_guide": local_draws}
    if exact_draws is not None:
        groups["exact"] = exact_draws
    idata = _inference_data(mcmc_chains, groups, index, mcmc, per["log_px_source"].iloc[0])
    if save:
        from ppl_genmodels import plots as figures
        from ppl_genmodels.checkpoint import atomic_write_text

        folder = Path(run.path) / "compare"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "summary.csv", summary.to_csv(index=False))
        atomic_write_text(folder / "per_datapoint.csv", per.to_csv(index=False))
        _atomic_netcdf(idata, folder / "posterior.nc")
        if plots:
            figures.plot_gap_histogram(per["approximation_gap"].to_numpy(), per["amortization_gap"].to_numpy(),
                                       folder / "gaps.png")
            if joint.dim == 2:
                shown = list(range(min(4, total)))
                panels = []
                for b in shown:
                    panel = {"MCMC": mcmc_draws[:, b].numpy(), "amortized q(z|x)": amortized_draws[:, b].numpy(),
                             "local guide": local_draws[:, b].numpy()}
                    if exact_draws is not None:
                        panel["exact"] = exact_draws[:, b].numpy()
                    panels.append(panel)
                figures.plot_posteriors_2d(panels, folder / "posteriors.png",
                                           titles=[f"datapoint {index[b]}" for b in shown])
    return summary, per, idata


compare = compare_run
