"""Tensor-train shapes for a matrix ``W`` of size ``in_features x out_features``.

A TT shape is a list of modes ``[k_1..k_d]`` with ``prod(k) == in * out``; the first modes index the
input dimension (row-major reshape, as in LoRETTA). For the hidden sizes in LoRETTA's tables the defaults
are LoRETTA's shapes, so parameter counts match the published ones; any other size is factorised.
"""

from __future__ import annotations

import math

# LoRETTA `utils/tensor_util.py` (TRANSFORMERS_HIDDEN_SIZE_TO_TENSOR_SHAPE), keyed by (hidden, bottleneck).
# The shape is given for the down projection (hidden -> bottleneck); the up projection uses it reversed,
# which keeps the same parameter count and aligns the first modes with its (smaller) input.
LORETTA_SHAPES: dict[tuple[int, int], list[int]] = {
    (768, 64): [8, 8, 12, 8, 8],
    (1024, 64): [4, 8, 8, 8, 8, 4],
    (4096, 64): [16, 16, 16, 4, 4, 4],
    (5120, 64): [5, 8, 8, 16, 8, 8],
    (8192, 64): [4, 16, 16, 16, 8, 4],
    (768, 8): [8, 8, 12, 8],
    (4096, 8): [16, 16, 8, 4, 4],
    (768, 16): [8, 16, 12, 8],
    (4096, 16): [16, 16, 16, 4, 4],
    (768, 32): [4, 8, 12, 8, 8],
    (768, 128): [8, 16, 12, 8, 8],
    (4096, 128): [16, 16, 16, 8, 4, 4],
    (768, 5): [5, 8, 12, 8],
    (4096, 5): [16, 16, 5, 4, 4],
}

# Modes far above LoRETTA's (4..16) make cores large and the factorisation pointless.
MAX_MODE = 64
TARGET_MODE = 8


def factorize(n: int, max_mode: int = MAX_MODE) -> list[int]:
    """Split ``n`` into about ``log_8(n)`` balanced modes, each at most ``max_mode``."""
    if n < 1:
        raise ValueError(f"cannot factorise {n}: sizes must be positive")
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    if primes and max(primes) > max_mode:
        raise ValueError(f"{n} has the prime factor {max(primes)} > {max_mode}")
    num_modes = max(1, round(math.log(n, TARGET_MODE)))
    while True:  # largest prime first into the smallest bin gives balanced modes; add bins until all fit
        modes = [1] * num_modes
        for prime in sorted(primes, reverse=True):
            modes[modes.index(min(modes))] *= prime
        if max(modes) <= max_mode:
            return sorted(m for m in modes if m > 1) or [1]
        num_modes += 1


def tt_shape(in_features: int, out_features: int) -> list[int]:
    """Default TT shape of an ``in x out`` matrix: LoRETTA's where published, else factorised."""
    if (in_features, out_features) in LORETTA_SHAPES:
        return list(LORETTA_SHAPES[(in_features, out_features)])
    if (out_features, in_features) in LORETTA_SHAPES:
        return list(reversed(LORETTA_SHAPES[(out_features, in_features)]))
    try:
        return factorize(in_features) + factorize(out_features)
    except ValueError as err:
        unbounded = factorize(in_features, max_mode=in_features) + factorize(out_features, max_mode=out_features)
        raise ValueError(
            f"no automatic TT shape for a {in_features}x{out_features} matrix ({err}); pass one whose modes "
            f"multiply to {in_features * out_features}, e.g. adapter.tt_shape = {unbounded}"
        ) from None


def check_shape(shape: list[int], in_features: int, out_features: int) -> list[int]:
    shape = [int(k) for k in shape]
    if any(k < 1 for k in shape) or math.prod(shape) != in_features * out_features:
        raise ValueError(
            f"TT shape {shape} does not fit a {in_features}x{out_features} matrix: its modes multiply to "
            f"{math.prod(shape)}, they must multiply to {in_features * out_features}"
        )
    return shape


def tt_ranks(shape: list[int], rank: int) -> list[int]:
    """LoRETTA's ranks ``[1, r, ..., r, 1]``: one internal rank, boundary ranks 1."""
    return [1] + [rank] * (len(shape) - 1) + [1]


def tt_num_params(shape: list[int], rank: int) -> int:
    ranks = tt_ranks(shape, rank)
    return sum(ranks[i] * k * ranks[i + 1] for i, k in enumerate(shape))
