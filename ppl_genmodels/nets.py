"""Neural-network building blocks for encoders and decoders.

Everything here is a plain ``torch.nn`` module: the models own them as
submodules, so their weights are ordinary ``nn.Parameter``s that follow
``module.to(device / dtype)`` and live in the model's ``state_dict``.

``MLP`` is a stack of affine layers with a nonlinearity between them,

    h_0 = u,   h_{l+1} = act(W_l h_l + b_l),   out = W_L h_L + b_L,

applied to the last dimension of its input, so inputs may carry any number of
leading batch dimensions (e.g. ``[particles, batch, in_dim]``). The nonlinearity
``act`` is named (``ACTIVATIONS``: relu, tanh, softplus, elu, ...); ``features(u)``
is the last hidden layer h_L (the input itself when there is none), e.g. the
context an encoder hands to a conditional flow.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "ACTIVATIONS", "activation_class", "check_dims"]

#: the hidden-layer nonlinearities by name
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


def activation_class(activation: str | type[nn.Module]) -> type[nn.Module]:
    """The ``nn.Module`` class of a nonlinearity given by name (or as a class); unknown names are refused."""
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation
    if isinstance(activation, str) and activation.lower() in ACTIVATIONS:
        return ACTIVATIONS[activation.lower()]
    raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")


class MLP(nn.Sequential):
    """Multi-layer perceptron ``in_dim -> hidden[0] -> ... -> hidden[-1] -> out_dim``.

    The output layer is linear (no activation). ``hidden=()`` gives a single
    affine map. ``activation``: a name in ``ACTIVATIONS`` or an ``nn.Module`` class.
    Works on inputs of shape ``[..., in_dim]``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        activation: str | type[nn.Module] = "relu",
    ):
        act = activation_class(activation)
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
                layers.append(act())
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.features_dim = widths[-2]

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # [..., in_dim] -> [..., out_dim]
        return super().forward(u)

    def features(self, u: torch.Tensor) -> torch.Tensor:  # [..., in_dim] -> [..., features_dim]
        """The last hidden layer h_L; ``self[-1](features(u))`` equals ``self(u)``."""
        for layer in list(self)[:-1]:
            u = layer(u)
        return u


def check_dims(**dims) -> None:
    """Raise ``ValueError`` unless every given dimension is a positive integer."""
    for name, d in dims.items():
        try:
            ok = not isinstance(d, bool) and operator.index(d) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a positive integer, got {d!r}")
