"""Tensor-train math: shapes, the TT linear layer, dense <-> TT."""

from .decompose import tt_svd
from .layer import TTLinear, tt_to_dense
from .shapes import LORETTA_SHAPES, factorize, tt_num_params, tt_ranks, tt_shape

__all__ = ["LORETTA_SHAPES", "TTLinear", "factorize", "tt_num_params", "tt_ranks", "tt_shape", "tt_svd",
           "tt_to_dense"]
