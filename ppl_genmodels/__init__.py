"""ppl-genmodels: deep latent-variable generative models as Pyro programs.

Declare a model as a ``PyroModule`` with ``model(x, y=None)`` and
``guide(x, y=None)``, train it with SVI, and estimate log p(x) per datapoint::

    from ppl_genmodels import fit, load_run
    run = fit("vae", "digits", "runs/digits-vae", epochs=50)
    run = load_run("runs/digits-vae")          # model with trained weights, config, data split
"""

from ppl_genmodels.comparison import compare_run
from ppl_genmodels.config import ConfigError, RunConfig, build_model
from ppl_genmodels.data import DataError, DataOptions, Dataset, load_dataset
from ppl_genmodels.evaluation import bdmc_run, evaluate, evaluate_run, log_density_grid
from ppl_genmodels.plots import plot_run, sample_run
from ppl_genmodels.runs import Run, load_run
from ppl_genmodels.sweep import sweep
from ppl_genmodels.traces import TraceError, generate, log_weights, reconstruct
from ppl_genmodels.train import Trainer, TrainingDiverged, fit

__version__ = "0.1.0"

__all__ = [
    "fit",
    "load_run",
    "evaluate",
    "evaluate_run",
    "bdmc_run",
    "compare_run",
    "sweep",
    "sample_run",
    "plot_run",
    "log_density_grid",
    "log_weights",
    "generate",
    "reconstruct",
    "load_dataset",
    "build_model",
    "Run",
    "RunConfig",
    "Dataset",
    "DataOptions",
    "Trainer",
    "DataError",
    "ConfigError",
    "TraceError",
    "TrainingDiverged",
]
