"""Dense -> TT by TT-SVD (Oseledets 2011): sequential truncated SVDs of the unfoldings."""

from __future__ import annotations

import torch


def tt_svd(matrix: torch.Tensor, shape: list[int], rank: int) -> list[torch.Tensor]:
    """Cores ``[r_{i-1}, k_i, r_i]`` of ``matrix`` reshaped row-major to ``shape``, ranks at most ``rank``.

    With ``rank`` at least the unfolding ranks the reconstruction is exact (up to float error).
    """
    tensor = matrix.detach().reshape(shape).to(torch.float64)
    cores, left_rank, rest = [], 1, tensor
    for k in shape[:-1]:
        unfolding = rest.reshape(left_rank * k, -1)
        u, s, vh = torch.linalg.svd(unfolding, full_matrices=False)
        r = min(rank, s.numel())
        cores.append(u[:, :r].reshape(left_rank, k, r))
        rest = s[:r, None] * vh[:r]
        left_rank = r
    cores.append(rest.reshape(left_rank, shape[-1], 1))
    return [c.to(matrix.dtype) for c in cores]
