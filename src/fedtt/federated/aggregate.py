"""The server's math: check each client's update, bound it, combine the updates, merge the result.

Every client sends its *update* (trained minus received). ``combine`` is the example-weighted mean (FedAvg), or
a coordinate-wise median or trimmed mean (robust to a minority of hostile clients; plain path only). Each reply
is bounded before it is used: its declared example count against what the node declared when it joined and
``federation.max_examples``, its update's norm against ``federation.max_update_norm`` (clipped or rejected).
The merged global adapter is checked for finiteness after the float32 cast, so no reply can make it ``inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from .protocol import SQ, group_name


@dataclass
class Reply:
    """A train reply that parsed and passed its checks."""

    node: int
    partition: int
    weight: float
    metrics: dict
    update: dict[str, np.ndarray] | None    # plain path
    masked: np.ndarray | None               # secure aggregation


def check_update(update: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a client's (decoded) update cannot be aggregated, or None if it can."""
    unknown, missing = sorted(set(update) - set(expected)), sorted(set(expected) - set(update))
    if unknown or missing:
        return f"tensors do not match the request: unknown {unknown[:2]}, missing {missing[:2]}"
    for name, shape in expected.items():
        if tuple(update[name].shape) != shape:
            return f"{name} has shape {tuple(update[name].shape)}, expected {shape}"
        if not np.isfinite(update[name]).all():
            return f"{name} has non-finite values"
    return None


def norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values()))


def bound_norm(update: dict[str, np.ndarray], max_norm: float, mode: str) -> tuple[dict[str, np.ndarray], str | None]:
    """The update within ``max_norm`` (0: no bound): scaled down (``clip``) or refused (``reject``)."""
    size = norm(update)
    if max_norm <= 0 or size <= max_norm:
        return update, None
    if mode == "reject":
        return update, f"update norm {size:.4g} exceeds federation.max_update_norm = {max_norm:g}"
    return {k: v * (max_norm / size) for k, v in update.items()}, None


def check_count(count: int, declared: int | None, cap: int) -> str | None:
    """A reply's example count (its FedAvg weight) must not exceed what its node declared when it joined, nor
    ``federation.max_examples`` (0: no cap)."""
    if declared is not None and count > declared:
        return f"num-examples = {count} is more than the {declared} the node declared when it joined"
    if cap and count > cap:
        return f"num-examples = {count} exceeds federation.max_examples = {cap}"
    return None


def mean_squares(update: dict[str, np.ndarray], groups: dict[str, object]) -> dict[str, float]:
    """Per FedTT+ group: the mean square of an update's values (the adaptive policy's agreement signal)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, value in update.items():
        if (group := groups.get(name)) is not None:
            key = group_name(group)
            sums[key] = sums.get(key, 0.0) + float(np.square(value, dtype=np.float64).sum())
            counts[key] = counts.get(key, 0) + value.size
    return {g: sums[g] / counts[g] for g in sums}


def squares_of(metrics: dict) -> dict[str, float]:
    return {key[len(SQ):]: float(value) for key, value in metrics.items() if key.startswith(SQ)}


def weighted_sums(updates: list[tuple[float, dict[str, np.ndarray], dict[str, float]]]):
    """(sum of w * update per tensor in float64, sum of w * mean square per group, sum of w)."""
    deltas: dict[str, np.ndarray] = {}
    squares: dict[str, float] = {}
    for weight, update, group_squares in updates:
        for name, value in update.items():
            deltas[name] = deltas.get(name, 0.0) + weight * value.astype(np.float64)
        for group, value in group_squares.items():
            squares[group] = squares.get(group, 0.0) + weight * value
    return deltas, squares, sum(w for w, _, _ in updates)


def robust_mean(updates: list[dict[str, np.ndarray]], kind: str, trim: float) -> dict[str, np.ndarray]:
    """Coordinate-wise median, or mean after dropping the ``trim`` fraction of largest and smallest values."""
    out = {}
    for name in updates[0]:
        stacked = np.stack([u[name].astype(np.float64) for u in updates])
        if kind == "median":
            out[name] = np.median(stacked, axis=0)
        else:
            cut = int(trim * len(updates))
            ordered = np.sort(stacked, axis=0)
            out[name] = ordered[cut:len(updates) - cut].mean(axis=0)
    return out


def agreement(mean: dict[str, np.ndarray], mean_squares: dict[str, float], chance: float,
              groups: dict[str, object]) -> dict:
    """Per group, how much the clients' updates agree: the ratio ``||weighted mean update||^2 / weighted mean of
    the clients' ||update||^2`` (1: identical updates; ``chance`` = sum of squared weights, 1/N for N equal
    clients: unrelated updates), rescaled so that 1 stays 1 and chance becomes 0. ``mean_squares``: per group
    name, the weighted mean over clients of the mean square of their update's values."""
    norms: dict = {}
    values: dict = {}
    for name, value in mean.items():
        group = groups.get(name)
        if group is not None:
            norms[group] = norms.get(group, 0.0) + float((value ** 2).sum())
            values[group] = values.get(group, 0) + value.size
    result = {}
    for g, size in norms.items():
        square = mean_squares.get(group_name(g), 0)
        ratio = min(1.0, size / (square * values[g])) if square > 0 else 1.0
        result[g] = round((ratio - chance) / (1 - chance), 6) if chance < 1 else 1.0
    return result


def merge(global_arrays: ArrayRecord, step: dict[str, np.ndarray]) -> tuple[ArrayRecord | None, str | None]:
    """The global adapter plus the server's step (the mean update under FedAvg: ``server_opt``), in float32;
    (None, why) if a value is not finite after the cast."""
    merged = {name: global_arrays[name] for name in global_arrays}
    for name, value in step.items():
        with np.errstate(over="ignore", invalid="ignore"):
            new = (global_arrays[name].numpy().astype(np.float64) + value).astype(np.float32)
        if not np.isfinite(new).all():
            return None, f"{name} would have non-finite values"
        merged[name] = Array(new)
    return ArrayRecord(merged), None
