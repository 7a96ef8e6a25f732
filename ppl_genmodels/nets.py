"""Neural-network building blocks for encoders and decoders.

Everything here is a plain ``torch.nn`` module: the models own them as
submodules, so their weights are ordinary ``nn.Parameter``s that follow
``module.to(device / dtype)`` and live in the model's ``state_dict``.

``MLP`` is a stack of affine layers with a nonlinearity between them,

    h_0 = u,   h_{l+1} = act(W_l h_l + b_l),   out = W_L h_L + b_L,

applied to the last dimension of its input, so inputs may carry any number of
leading batch dimensions (e.g. ``[particles, batch, in_dim]``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "check_dims"]


class MLP(nn.Sequential):
    """Multi-layer perceptron ``in_dim -> hidden[0] -> ... -> hidden[-1] -> out_dim``.

    The output layer is linear (no activation). ``hidden=()`` gives a single
    affine map. Works on inputs of shape ``[..., in_dim]``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        activation: type[nn.Module] = nn.ReLU,
    ):
        hidden = tuple(hidden)
        check_dims(in_dim=in_dim, out_dim=out_dim)
        for h in hidden:
            check_dims(hidden=h)
        in_dim, out_dim = int(in_dim), int(out_dim)
        widths = (in_dim, *(int(h) for h in hidden), out_dim)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(activation())
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # [..., in_dim] -> [..., out_dim]
        return super().forward(u)


def check_dims(**dims) -> None:
    """Raise ``ValueError`` unless every given dimension is a positive integer."""
    for name, d in dims.items():
        try:
            ok = not isinstance(d, bool) and operator.index(d) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a positive integer, got {d!r}")
