"""Inference algorithms that work on any model/guide pair through :mod:`ppl_genmodels.traces`.

- :mod:`~ppl_genmodels.inference.objectives`: SVI objectives (Trace, MeanField, IWAE).
- :mod:`~ppl_genmodels.inference.importance`: ELBO and IWAE-k estimates of log p(x) per datapoint.
"""
