"""Probabilistic PCA (Tipping & Bishop 1999), with closed-form log p(x) and p(z | x).

M. E. Tipping, C. M. Bishop, "Probabilistic Principal Component Analysis",
J. R. Statist. Soc. B 61(3), 611-622, 1999.

Generative model, x in R^D, z in R^q:

    z ~ N(0, I_q),    x | z ~ N(W z + mu, sigma^2 I_D)

with global parameters W [D, q], mu [D] and sigma (learned as log sigma, or
fixed when ``scale`` is given). Closed forms (r = x - mu,
M = W^T W + sigma^2 I_q, a q x q matrix, Cholesky M = L_M L_M^T):

    marginal    x ~ N(mu, C),  C = W W^T + sigma^2 I_D
    log p(x)  = -1/2 [ D log 2 pi + (D - q) log sigma^2 + log|M|
                       + |r - W m|^2 / sigma^2 + |m|^2 ]
    posterior   z | x ~ N(m, sigma^2 M^{-1}),   m = M^{-1} W^T r

The log-determinant uses |C| = sigma^{2(D-q)} |M| (matrix determinant lemma)
and the quadratic form uses r^T C^{-1} r = min_z |r - W z|^2 / sigma^2 + |z|^2,
attained at z = m; both terms are sums of squares, so nothing cancels. Only a
q x q Cholesky factorisation is needed, never a D x D one.

Guide: an amortized linear-Gaussian family with a full covariance shared by all
datapoints,

    q(z | x) = N(z; A x + b, L L^T),   A [q, D], b [q], L lower triangular,
    L = strictly_lower(R) + diag(exp(diag(R)))   (R an unconstrained [q, q] parameter),

which contains the exact posterior (A = M^{-1} W^T, b = -A mu,
L L^T = sigma^2 M^{-1}); ``set_exact_guide`` puts the guide there.

The closed forms run in x's dtype (parameters are cast), so a float32 model can
be evaluated exactly in float64.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from ppl_genmodels.models.vae import check_common

__all__ = ["PPCA"]


class PPCA(PyroModule):
    """Probabilistic PCA with an amortized full-covariance linear-Gaussian guide.

    Only ``likelihood="gaussian"`` is valid; ``y`` (and ``y_dim``) is accepted and ignored.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 16,
        *,
        y_dim: int = 0,
        likelihood: str = "gaussian",
        scale: float | None = None,
    ):
        super().__init__()
        check_common(x_dim, z_dim, y_dim)
        if likelihood != "gaussian":
            raise ValueError(f"PPCA supports only likelihood='gaussian', got {likelihood!r}")
        D, q = int(x_dim), int(z_dim)
        self.x_dim, self.z_dim = D, q
        # model parameters
        self.W = nn.Parameter(0.1 * torch.randn(D, q))
        self.mu = nn.Parameter(torch.zeros(D))
        if scale is None:
            self.log_sigma = nn.Parameter(torch.zeros(()))
        else:
            scale = float(scale)
            if not scale > 0 or scale == float("inf"):
                raise ValueError(f"scale must be a positive finite number, got {scale!r}")
            self.register_buffer("log_sigma", torch.tensor(math.log(scale)))
        # guide parameters: q(z | x) = N(A x + b, L L^T)
        self.guide_A = nn.Parameter(torch.zeros(q, D))
        self.guide_b = nn.Parameter(torch.zeros(q))
        self.guide_R = nn.Parameter(torch.zeros(q, q))  # strictly-lower part of L + log diag(L)

    # ------------------------------------------------------------------ helpers
    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def guide_scale_tril(self) -> torch.Tensor:
        """L [q, q]: lower triangular with positive diagonal."""
        R = self.guide_R
        return R.tril(-1) + torch.diag_embed(R.diagonal().exp())

    def _closed_form(self, x: torch.Tensor):
        """Shared pieces in x's dtype: W, mu, sigma^2, chol(M), posterior mean m [..., q]."""
        W, mu = self.W.to(x.dtype), self.mu.to(x.dtype)
        s2 = (2 * self.log_sigma.to(x.dtype)).exp()
        q = W.shape[1]
        M = W.T @ W + s2 * torch.eye(q, dtype=x.dtype, device=x.device)
        L_M = torch.linalg.cholesky(M)
        r = x - mu  # [..., D]
        u = (r @ W).reshape(-1, q).T  # [q, N]
        m = torch.cholesky_solve(u, L_M).T.reshape(*x.shape[:-1], q)  # M^{-1} W^T r
        return W, mu, s2, L_M, r, m

    # -------------------------------------------------------------- closed forms
    def exact_log_marginal(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log N(x; mu, W W^T + sigma^2 I) for x [..., D] -> [...]."""
        W, mu, s2, L_M, r, m = self._closed_form(x)
        D, q = W.shape
        quad = (r - m @ W.T).pow(2).sum(-1) / s2 + m.pow(2).sum(-1)
        logdet_M = 2 * L_M.diagonal().log().sum()
        return -0.5 * (D * math.log(2 * math.pi) + (D - q) * s2.log() + logdet_M + quad)

    def exact_posterior(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> dist.MultivariateNormal:
        """p(z | x) = N(M^{-1} W^T (x - mu), sigma^2 M^{-1}); batch shape x.shape[:-1]."""
        _, _, s2, L_M, _, m = self._closed_form(x)
        return dist.MultivariateNormal(m, scale_tril=self._posterior_scale_tril(s2, L_M))

    @staticmethod
    def _posterior_scale_tril(s2: torch.Tensor, L_M: torch.Tensor) -> torch.Tensor:
        cov = s2 * torch.cholesky_inverse(L_M)  # sigma^2 M^{-1}
        return torch.linalg.cholesky(0.5 * (cov + cov.T))

    def exact_guide_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, b, L) with q(z | x) = N(A x + b, L L^T) equal to the exact posterior."""
        W, mu = self.W, self.mu
        s2 = (2 * self.log_sigma).exp()
        M = W.T @ W + s2 * torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        L_M = torch.linalg.cholesky(M)
        A = torch.cholesky_solve(W.T, L_M)  # M^{-1} W^T  [q, D]
        return A, -(A @ mu), self._posterior_scale_tril(s2, L_M)

    @torch.no_grad()
    def set_exact_guide(self) -> None:
        """Set the guide's (A, b, L) to the exact posterior of the current W, mu, sigma."""
        A, b, L = self.exact_guide_params()
        self.guide_A.copy_(A)
        self.guide_b.copy_(b)
        self.guide_R.copy_(L.tril(-1) + torch.diag_embed(L.diagonal().log()))

    # ------------------------------------------------------------- Pyro programs
    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(x | z) = N(W z + mu, sigma^2 I) for z [..., q]: batch [...], event [D]."""
        loc = F.linear(z, self.W.to(z.dtype), self.mu.to(z.dtype))
        return dist.Normal(loc, self.log_sigma.to(z.dtype).exp(), validate_args=False).to_event(1)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z", prior)  # [B, q] or [K, B, q]
            pyro.sample("x", self.decode(z), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        loc = F.linear(x, self.guide_A.to(x.dtype), self.guide_b.to(x.dtype))  # [B, q]
        L = self.guide_scale_tril().to(x.dtype)
        with pyro.plate("data", x.shape[0], dim=-1, device=x.device):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=L, validate_args=False))

    @torch.no_grad()
    def sample_data(self, n: int, y: torch.Tensor | None = None):
        """Draw ``n`` datapoints: ``(x [n, D], {"z": z [n, q]})``."""
        W = self.W
        z = torch.randn(n, self.z_dim, device=W.device, dtype=W.dtype)
        return self.decode(z).sample(), {"z": z}
