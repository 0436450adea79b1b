"""``TTLinear``: a linear map whose ``in x out`` weight is stored as tensor-train cores.

Cores ``G_i`` have shape ``[r_{i-1}, k_i, r_i]`` with ``r_0 = r_d = 1``. The forward pass contracts the
cores into the (small) dense weight and does one matmul, as LoRETTA does: for adapter-sized matrices this
is cheaper than contracting the activations core by core. Cores are direct parameters (``core_0`` ...)
of this leaf module so that per-sample-gradient libraries (Opacus) and per-core freezing both work.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .shapes import check_shape, tt_ranks


def tt_to_dense(cores: list[torch.Tensor], in_features: int, out_features: int) -> torch.Tensor:
    """Contract ``G_1 x G_2 x ... x G_d`` over the rank indices and reshape row-major to ``[in, out]``."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([-1], [0]))
    return out.reshape(in_features, out_features)


def loretta_init(shape: list[int], ranks: list[int], in_features: int, out_features: int,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """LoRETTA's Gaussian init: the reconstructed weight has std about ``sqrt(1 / (in + out))``."""
    target_std = math.sqrt(1.0 / (in_features + out_features)) ** (1.0 / len(shape))
    return [torch.randn(ranks[i], k, ranks[i + 1], generator=generator) / math.sqrt(ranks[i + 1]) * target_std
            for i, k in enumerate(shape)]


class TTLinear(nn.Module):
    """``y = x @ TT(G_1..G_d) + b`` with ``TT(...)`` of size ``in_features x out_features``."""

    def __init__(self, in_features: int, out_features: int, shape: list[int], rank: int, bias: bool = True,
                 zero_last_core: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shape = check_shape(shape, in_features, out_features)
        self.ranks = tt_ranks(self.shape, rank)
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        cores = loretta_init(self.shape, self.ranks, in_features, out_features, generator)
        if zero_last_core:  # TT(...) = 0 at the start: an adapter built on it begins as the identity
            cores[-1].zero_()
        for i, core in enumerate(cores):
            self.register_parameter(f"core_{i}", nn.Parameter(core))
        if bias:
            bound = 1.0 / math.sqrt(out_features)
            init = torch.empty(out_features).uniform_(-bound, bound, generator=generator)
            self.bias = nn.Parameter(init.zero_() if zero_last_core else init)
        else:
            self.register_parameter("bias", None)

    @property
    def cores(self) -> list[nn.Parameter]:
        return [getattr(self, f"core_{i}") for i in range(len(self.shape))]

    def weight(self) -> torch.Tensor:
        return tt_to_dense(self.cores, self.in_features, self.out_features)

    def set_trainable_cores(self, indices: list[int] | None) -> None:
        """Train only the cores in ``indices`` (all cores when None); the bias is left as it is."""
        for i, core in enumerate(self.cores):
            core.requires_grad_(indices is None or i in indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight()
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, shape={self.shape}, ranks={self.ranks}"
