"""Built-in generative models, each a Pyro program following the model contract.

Every model is a ``pyro.nn.PyroModule`` with ``model(x, y=None)`` and
``guide(x, y=None)``, per-datapoint sites inside ``pyro.plate("data", B)``,
latent site ``"z"`` (``"z1"`` and ``"z2"`` for the two-layer ``HVAE``) and
observed site ``"x"``, and a constructor ``Model(x_dim, z_dim=16, *, y_dim=0, ...)``
whose other keywords are those it uses (``hidden``, ``likelihood``, ``n_levels``,
``scale``, ``y_kind``, ``guide``, ``activation``, ...): the toolkit passes a model
only the arguments it names.

``REGISTRY`` maps the CLI names to the classes; ``DESCRIPTIONS`` gives one line each.
"""

from ppl_genmodels.models.cvae import CVAE
from ppl_genmodels.models.hvae import HVAE
from ppl_genmodels.models.ppca import PPCA
from ppl_genmodels.models.vae import VAE

__all__ = ["VAE", "CVAE", "HVAE", "PPCA", "REGISTRY", "DESCRIPTIONS"]

REGISTRY = {"vae": VAE, "cvae": CVAE, "hvae": HVAE, "ppca": PPCA}

DESCRIPTIONS = {
    "vae": "Variational autoencoder, N(0, I) prior and MLP encoder/decoder (Kingma & Welling 2014)",
    "cvae": "Conditional VAE p(x | y) with a learned prior p(z | y) (Sohn, Lee & Yan 2015)",
    "hvae": "VAE with two stochastic layers z2 -> z1 -> x, tanh MLPs (Burda, Grosse & Salakhutdinov 2016)",
    "ppca": "Probabilistic PCA with exact log p(x) and p(z | x) (Tipping & Bishop 1999)",
}
