"""Inference algorithms that work on any model/guide pair through :mod:`ppl_genmodels.traces`.

They import the traces module and each other, never the run layer: they take Pyro
programs and tensors and return small result objects of tensors.

- :mod:`~ppl_genmodels.inference.objectives`: SVI objectives (Trace, MeanField, IWAE).
- :mod:`~ppl_genmodels.inference.importance`: ELBO and IWAE-k estimates of log p(x) per datapoint.
- :mod:`~ppl_genmodels.inference.hmc`: the batched HMC kernel (``init`` / ``step``).
- :mod:`~ppl_genmodels.inference.adaptation`: dual averaging, Welford, Stan's window adaptation.
- :mod:`~ppl_genmodels.inference.ais`: annealed importance sampling and BDMC.
- :mod:`~ppl_genmodels.inference.mcmc`: posterior draws of the latents (batched HMC, Pyro's NUTS).
- :mod:`~ppl_genmodels.inference.local`: per-datapoint guides.
- :mod:`~ppl_genmodels.inference.compare`: gap decomposition and posterior discrepancies.
"""
