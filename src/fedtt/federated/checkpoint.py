"""Checkpoints: after every round the server writes ``<out>/checkpoint.safetensors`` so a killed run resumes.

One file, replaced atomically: the global trainable tensors, the strategy's state tensors (the server optimiser's
moments, named with a ``server_opt:`` prefix no trainable tensor has), and in its metadata the round, the rest of
the strategy's state (sampler, tensor versions, FedTT+ policy, optimiser step counts) and results.json's content.
Clients keep no state between rounds that a resumed run needs (they rebuild the seeded initial adapter and are
sent what changed since), so ``fedtt run --resume`` continues exactly where the run stopped: same seed, same
rounds, same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from ..config import Config
from ..files import CHECKPOINT as FILE
from ..files import atomic_write
from ..report import json_safe as _json_safe
from .server_opt import PREFIX as STATE_PREFIX

# What may change on resume: how many rounds in all (to extend a run), how it is executed, how often it is
# evaluated (evaluation changes no training).
MAY_CHANGE = {"federation.rounds", "federation.engine", "federation.round_timeout", "federation.eval_every"}


class Checkpoint(NamedTuple):
    round: int
    arrays: ArrayRecord
    strategy: dict
    results: dict
    config: dict
    tensors: dict[str, np.ndarray] | None = None  # the strategy's state tensors (``state_tensors``)


def save_checkpoint(out_dir: Path, server_round: int, arrays: ArrayRecord, strategy: dict, results: dict,
                    config: Config, tensors: dict[str, np.ndarray] | None = None) -> None:
    state = {"round": server_round, "strategy": strategy, "results": results, "config": _as_json(config)}
    data = save({**{name: arrays[name].numpy() for name in arrays}, **(tensors or {})},
                metadata={"fedtt": json.dumps(_json_safe(state))})
    atomic_write(out_dir / FILE, data)


def read_checkpoint(out_dir: str | Path) -> Checkpoint:
    path = Path(out_dir) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {out_dir}: no {FILE} there (no round of that run finished); "
                                "start it again with --overwrite")
    try:
        with safe_open(path, framework="np") as f:
            state = json.loads(f.metadata()["fedtt"])
        tensors = load_file(path)
    except (SafetensorError, KeyError, ValueError) as err:
        raise ValueError(f"cannot resume {out_dir}: {path} is damaged ({err}); start the run again with "
                         "--overwrite") from None
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(t)) for name, t in sorted(tensors.items())
                          if not name.startswith(STATE_PREFIX)})
    extra = {name: t for name, t in tensors.items() if name.startswith(STATE_PREFIX)}
    return Checkpoint(state["round"], arrays, state["strategy"], state["results"], state["config"], extra)


def check_resumable(checkpoint: Checkpoint, config: Config, out_dir: str | Path) -> None:
    """One-line errors for a resume that could not continue the same run."""
    check_same_run(checkpoint.config, config, out_dir)
    if checkpoint.round >= config.federation.rounds:
        raise ValueError(f"cannot resume {out_dir}: it already finished {checkpoint.round} of "
                         f"{config.federation.rounds} rounds; pass --set federation.rounds=N with N > "
                         f"{checkpoint.round} to train more")


def check_same_run(old_config: dict, config: Config, out_dir: str | Path) -> None:
    """A one-line error when ``config`` differs from the run's (``old_config``, as JSON) in more than MAY_CHANGE."""
    old, new = _flat(old_config), _flat(_as_json(config))
    changed = [key for key in sorted(old.keys() | new.keys()) if key not in MAY_CHANGE and old.get(key) != new.get(key)]
    if changed:
        key = changed[0]
        raise ValueError(f"cannot resume {out_dir}: the config changed in {key} ({old.get(key)!r} -> "
                         f"{new.get(key)!r}); only {', '.join(sorted(MAY_CHANGE))} may change (omit --config to "
                         "reuse the run's config.toml)")


def _as_json(config: Config) -> dict:
    return config.model_dump(mode="json")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

