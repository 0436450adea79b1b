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
        if config.init == "identity":  # with the up projection at zero, A(z) = 0: the model is the backbone
            with torch.no_grad():
                self.down.bias.zero_()
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


class TensorizedHead(nn.Module):
    """The head's frozen hidden x hidden dense plus a TT layer of the same size beside it, starting at zero
    (``W x + b + TT(x)``): the tensorized classifier of the paper's Figure 1(c), at the adapters' TT rank."""

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, generator: torch.Generator):
        super().__init__()
        n_in, n_out = base_layer.in_features, base_layer.out_features
        self.base_layer = base_layer
        self.tt = TTLinear(n_in, n_out, tt_shape(n_in, n_out), config.rank, bias=False, zero_last_core=True,
                           generator=generator).to(base_layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.tt(x.float()).to(x.dtype)
