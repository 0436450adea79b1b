"""The tensorized bottleneck adapter (LoRETTA_adp) and the wrapper that places it around a frozen linear."""

from __future__ import annotations

import torch
from torch import nn

from ..tt import TTLinear, tt_shape
from ..tt.shapes import check_shape
from .config import AdapterConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}


class TensorizedAdapter(nn.Module):
    """``A(z) = up(act(down(dropout(z)))) * scale`` with ``down: h -> m`` and ``up: m -> h`` as TT layers."""

    def __init__(self, hidden: int, config: AdapterConfig, generator: torch.Generator):
        super().__init__()
        m = config.bottleneck
        down_shape = check_shape(config.tt_shape, hidden, m) if config.tt_shape else tt_shape(hidden, m)
        self.down = TTLinear(hidden, m, down_shape, config.rank, generator=generator)
        self.up = TTLinear(m, hidden, list(reversed(down_shape)), config.rank,
                           zero_last_core=config.init == "identity", generator=generator)
        self.dropout = nn.Dropout(config.dropout)
        self.act = ACTIVATIONS[config.nonlinearity]()
        self.scale = config.scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # fp32 inside the adapter whatever the backbone dtype, as LoRETTA does
        out = self.up(self.act(self.down(self.dropout(z.float())))) * self.scale
        return out.to(z.dtype)


class AdaptedLinear(nn.Module):
    """A frozen linear with an adapter after it (``h + A(h)``) or before it (``W(x + A(x))``)."""

    def __init__(self, base_layer: nn.Linear, adapter: TensorizedAdapter, position: str):
        super().__init__()
        self.base_layer, self.adapter, self.position = base_layer, adapter, position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position == "input":
            return self.base_layer(x + self.adapter(x))
        h = self.base_layer(x)
        return h + self.adapter(h)
