"""Experiment configuration: one TOML file, validated on load, ``--set key=value`` overrides.

Every section is a dataclass; unknown keys and values of the wrong type are one-line errors that name the
key. The resolved config is written next to the results, so a run can be repeated from its output.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
import tomllib

from .adapters import AdapterConfig

METHODS = ("fedtt", "fedtt+", "lora", "ffa-lora")
PARTITIONS = ("iid", "dirichlet", "label_skew")
ENGINES = ("inprocess", "flower-sim")
POLICIES = ("fixed", "cyclic", "adaptive")


@dataclass
class ModelConfig:
    name: str = "minilm"            # bundled (minilm, smollm2), a local directory, or a hub id
    num_hidden_layers: int = 0      # > 0: keep only the first N pretrained layers (fast experiments)
    max_length: int = 64            # tokens per example


@dataclass
class TaskConfig:
    name: str = "rotten_tomatoes"   # bundled task, a CSV/JSONL/Parquet file, or a hub dataset
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train_examples: int = 0     # 0: all
    max_eval_examples: int = 0      # 0: the whole test split is evaluated every round


@dataclass
class FederationConfig:
    num_clients: int = 3
    clients_per_round: int = 0      # 0: every client every round (cross-silo); else a seeded sample
    rounds: int = 10
    local_steps: int = 10           # optimizer steps per client per round (ignored if local_epochs > 0)
    local_epochs: int = 0
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    partition: str = "dirichlet"
    alpha: float = 0.5              # Dirichlet concentration over labels
    proportions: list = field(default_factory=list)  # label_skew: per-client label proportions
    min_partition_size: int = 1
    weighting: str = "examples"     # FedAvg weights: "examples" (n_c) or "uniform"
    min_replies: int = 1            # a round is aggregated when at least this many valid replies arrived
    round_timeout: float = 600.0    # seconds a round waits for replies (Flower engines); the round then
                                    # goes on with those that arrived
    engine: str = "inprocess"


@dataclass
class FreezingConfig:
    """FedTT+: which TT cores are trainable each round (policies and reasoning: federated/freezing.py)."""
    policy: str = "adaptive"  # the best mean accuracy of the three in docs/results.md
    cores: list = field(default_factory=lambda: [-1])  # fixed: trainable core indices; -1: the zero-init last core
    cores_per_round: int = 1                    # cyclic: how many cores rotate in each round
    period: int = 1                             # cyclic: rounds per step of the rotation
    threshold: float = 0.5  # adaptive: freeze a core when its ||dG|| / ||G|| < threshold x the round's largest


@dataclass
class Config:
    method: str = "fedtt"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    freezing: FreezingConfig = field(default_factory=FreezingConfig)

    def __post_init__(self):
        fed = self.federation
        choices = {"method": (self.method, METHODS), "federation.partition": (fed.partition, PARTITIONS),
                   "federation.engine": (fed.engine, ENGINES), "freezing.policy": (self.freezing.policy, POLICIES),
                   "federation.weighting": (fed.weighting, ("examples", "uniform"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} = {value!r} is not valid; use one of: {', '.join(allowed)}")
        positive = {"federation.num_clients": fed.num_clients, "federation.rounds": fed.rounds,
                    "federation.batch_size": fed.batch_size, "federation.min_replies": fed.min_replies,
                    "model.max_length": self.model.max_length}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} = {value} is not valid; use a positive integer")
        if fed.local_steps < 1 and fed.local_epochs < 1:
            raise ValueError("federation.local_steps and federation.local_epochs are both 0; set one of them")
        if not 0 <= fed.clients_per_round <= fed.num_clients:
            raise ValueError(f"federation.clients_per_round = {fed.clients_per_round} is not valid; use 0 (all) "
                             f"up to federation.num_clients = {fed.num_clients}")
        if not fed.round_timeout > 0:
            raise ValueError(f"federation.round_timeout = {fed.round_timeout} is not valid; use a positive "
                             "number of seconds")
        if fed.lr <= 0 or fed.alpha <= 0:
            raise ValueError("federation.lr and federation.alpha must be positive")
        if self.method == "fedtt+" and self.clients_per_round < fed.num_clients:
            raise ValueError("method = 'fedtt+' is for cross-silo federations (every client every round); "
                             "set federation.clients_per_round = 0 or use method = 'fedtt'")
        if (self.adapter.method, self.adapter.seed) != (adapter_method(self.method), self.seed):
            raise ValueError("adapter.method and adapter.seed follow the top-level method and seed; "
                             "build configs with config_from_dict / load_config")

    @property
    def clients_per_round(self) -> int:
        return self.federation.clients_per_round or self.federation.num_clients

    def to_dict(self) -> dict:
        return _drop_none(dataclasses.asdict(self))

    def to_toml(self) -> str:
        data = self.to_dict()
        del data["adapter"]["method"], data["adapter"]["seed"]  # derived from method and seed
        return tomli_w.dumps(data)


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _check_type(key: str, value, annotation):
    """Return ``value`` if it fits ``annotation`` (ints are accepted for floats), else a one-line error."""
    hint = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    allowed = tuple(typing.get_origin(h) or h for h in hint if h is not type(None))
    if value is None and type(None) in hint:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return value
    names = " or ".join(a.__name__ for a in allowed)
    raise ValueError(f"{key} = {value!r} has the wrong type; expected {names}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.')} must be a table ([{prefix.rstrip('.')}])")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, hints[name])
    return cls(**kwargs)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as method=lora


def apply_override(data: dict, assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {assignment!r} is not of the form key=value (e.g. federation.rounds=5)")
    *sections, leaf = key.strip().split(".")
    table = data
    for section in sections:
        table = table.setdefault(section, {})
    table[leaf] = _parse_value(text.strip())


def adapter_method(method: str) -> str:
    return "fedtt" if method == "fedtt+" else method


def config_from_dict(data: dict) -> Config:
    data = dict(data)
    if isinstance(data.get("adapter", {}), dict):  # the adapter's method and seed are the experiment's
        for key in {"method", "seed"} & set(data.get("adapter", {})):
            raise ValueError(f"adapter.{key} is not a config key; set the top-level {key} instead")
        method = data.get("method", "fedtt")
        data["adapter"] = {**data.get("adapter", {}), "seed": data.get("seed", 0),
                           "method": adapter_method(method) if isinstance(method, str) else method}
    try:
        return _build(Config, data)
    except TypeError as err:  # e.g. a section given as a value
        raise ValueError(f"invalid config: {err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)
