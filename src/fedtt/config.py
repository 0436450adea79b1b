"""Experiment configuration: one TOML file, validated on load (pydantic), ``--set key=value`` overrides.

Every section is a strict pydantic model: unknown keys (with a "did you mean"), wrong types (list elements
too), out-of-range values and impossible combinations are one-line ``ValueError``s that name the key, raised
before anything runs or is written. Keys the user leaves out that differ per method (``fedtt.defaults``) take
the method's value. The resolved config is written next to the results, so a run can be repeated from its output.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from typing import Annotated, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .adapters import METHODS as ADAPTER_METHODS
from .adapters import AdapterConfig
from .adapters.peft_methods import per_example_gradients
from .defaults import DP_DEFAULTS, METHOD_DEFAULTS
from .federated.server_opt import DEFAULTS as SERVER_OPTIMIZERS
from .federated.server_opt import unused_keys

METHODS = ("fedtt", "fedtt+", *ADAPTER_METHODS[1:])  # fedtt+: the TT adapter under a freezing policy
POLICIES = ("fixed", "cyclic", "adaptive")
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelConfig(Section):
    name: str = "minilm"                     # bundled (minilm, smollm2), a local directory, or a hub id
    num_hidden_layers: NonNegativeInt = 0    # > 0: keep only the first N pretrained layers (fast experiments)
    max_length: Annotated[int, Field(ge=8)] = 48   # tokens per example (instruction: prompt + response)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"           # auto: CUDA, else MPS, else CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False


class TaskConfig(Section):
    name: str = "rotten_tomatoes"    # bundled task, a CSV/TSV/JSONL/Parquet file, or a hub dataset
    # classification: a head predicts the label; instruction: a causal LM learns prompt -> response (a
    # labelled set becomes prompts through `template`, its labels the responses)
    kind: Literal["classification", "instruction"] = "classification"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"    # instruction files (the Alpaca layout instruction/input/output is recognised)
    response_column: str = "response"
    template: str = ""               # instruction from a labelled set, e.g. "Question: {text}"; "": the task's own
    label_words: list[str] = []      # the response for each label, in label order; []: the task's own or its names
    validation_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    max_train_examples: NonNegativeInt = 0   # 0: all
    max_eval_examples: NonNegativeInt = 0    # caps validation and test each (a seeded subset); 0: whole splits
    max_new_tokens: PositiveInt = 16         # instruction tasks: greedy generation length when evaluating
    eval_batch_size: PositiveInt = 64

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(f"task.validation_fraction + task.test_fraction = "
                             f"{self.validation_fraction + self.test_fraction:g} leaves no training data; keep it < 1")
        if self.template and "{text}" not in self.template:
            raise ValueError(f"task.template = {self.template!r} has no {{text}} placeholder; put {{text}} where "
                             "the example goes")
        return self


class FederationConfig(Section):
    num_clients: PositiveInt = 3
    clients_per_round: NonNegativeInt = 0    # 0: every client every round (cross-silo); else a seeded sample
    rounds: PositiveInt = 10
    local_steps: NonNegativeInt = 20         # optimizer steps per client per round (when local_epochs = 0)
    local_epochs: NonNegativeInt = 0         # > 0: passes over the client's data per round instead
    batch_size: PositiveInt = 16
    lr: PositiveFloat | None = None          # None: the method's default (fedtt.defaults)
    head_lr: PositiveFloat | None = None     # the task head's rate (same schedule); None: lr
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"  # decay over the run, by round (tune-default)
    warmup_rounds: NonNegativeInt = 0        # linear warm-up from lr / (warmup_rounds + 1)
    # the clients' optimizer, fresh each round. Under DP, AdamW moves a coordinate that gets only noise by about its
    # rate every step; SGD moves it by rate x noise (momentum: Polyak's, on the noised gradient)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # sgd's
    weight_decay: NonNegativeFloat = 0.0     # decoupled (AdamW's) or L2 (sgd's)
    clip_grad_norm: NonNegativeFloat = 0.0   # clip each local step's gradient norm; 0: off
    partition: Literal["iid", "dirichlet", "label_skew"] = "dirichlet"
    alpha: PositiveFloat = 0.5               # Dirichlet concentration over labels
    proportions: list[list[NonNegativeFloat]] = []   # label_skew: per-client label shares, one row per client
    min_partition_size: PositiveInt = 1
    weighting: Literal["examples", "uniform"] = "examples"   # FedAvg weights: n_c or equal
    min_replies: PositiveInt = 1             # a round is aggregated when at least this many valid replies arrive
    # Bounds on every reply (off by default): a node declaring more examples than max_examples takes no part (0: no
    # cap); an update whose L2 norm exceeds max_update_norm is scaled down to it or rejected (0: no bound).
    max_examples: NonNegativeInt = 0
    max_update_norm: NonNegativeFloat = 0.0
    norm_bound: Literal["clip", "reject"] = "clip"
    # How the updates are combined: the weighted mean (FedAvg), or robust to a minority of hostile clients (plain
    # path only): the coordinate-wise median, or the mean after trimming trim_fraction of each end.
    aggregator: Literal["mean", "median", "trimmed-mean"] = "mean"
    trim_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.1
    # Cross-device realism: each sampled client fails this round with this probability (simulated and seeded: the
    # same clients fail on every engine), and the round goes on with the others.
    dropout_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # The first rounds train the task head alone (linear probing, then fine-tuning: under DP the adapter then
    # starts from a head that already fits the features, and the head's noise does not distort them); only the
    # head's tensors travel in those rounds, both ways
    head_only_rounds: NonNegativeInt = 0
    # The server's step from the round's mean update (federated/server_opt.py; Flower's FedAvgM, FedAdam and FedYogi
    # rules): sgd with server_lr 1 is plain FedAvg. Unset keys take Flower's defaults for the optimiser: server_lr 1
    # (sgd, momentum), 0.1 (adam), 0.01 (yogi); server_momentum 0.9 (momentum); server_beta1 0.9, server_beta2 0.99,
    # server_tau 1e-3 (adam, yogi).
    server_optimizer: Literal["sgd", "momentum", "adam", "yogi"] = "sgd"
    server_lr: PositiveFloat | None = None
    server_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    server_beta1: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    server_beta2: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    server_tau: PositiveFloat | None = None
    # Evaluate the global adapter (validation and test) after every k-th round; round 0 and the last round always.
    # Rounds in between are trained, counted and checkpointed, and have no "validation" / "eval" in results.json.
    eval_every: PositiveInt = 1
    # Flower engines: seconds the server waits for a round's replies, and at the first round for the nodes to
    # connect; the round then goes on with the replies that arrived (in-process replies never wait).
    round_timeout: PositiveFloat = 600.0
    engine: Literal["inprocess", "flower-sim"] = "inprocess"
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # tensors on the wire, both directions

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ValueError("federation.local_steps and federation.local_epochs are both 0; set one of them")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"federation.clients_per_round = {self.clients_per_round} is more than "
                             f"federation.num_clients = {self.num_clients}; use 0 (all) up to {self.num_clients}")
        per_round = self.clients_per_round or self.num_clients
        if self.min_replies > per_round:
            raise ValueError(f"federation.min_replies = {self.min_replies} can never be met with {per_round} "
                             f"clients per round; use at most {per_round}")
        if self.warmup_rounds >= self.rounds:
            raise ValueError(f"federation.warmup_rounds = {self.warmup_rounds} leaves no round at the full "
                             f"learning rate; use fewer than federation.rounds = {self.rounds}")
        self._check_server_optimizer()
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"federation.momentum = {self.momentum:g} is sgd's; set federation.optimizer = 'sgd' "
                             f"or remove it")
        if self.partition == "label_skew":
            if len(self.proportions) != self.num_clients:
                raise ValueError(f"federation.proportions has {len(self.proportions)} rows; label_skew needs one "
                                 f"row of label shares per client ({self.num_clients})")
            widths = {len(row) for row in self.proportions}
            if len(widths) != 1 or widths == {0} or widths == {1}:
                raise ValueError("federation.proportions rows must all have the same number (>= 2) of label shares")
            for i, row in enumerate(self.proportions):
                if not math.isclose(sum(row), 1.0, abs_tol=1e-6):
                    raise ValueError(f"federation.proportions[{i}] = {row} sums to {sum(row):g}; each row's "
                                     "shares must sum to 1")
        elif self.proportions:
            raise ValueError(f"federation.proportions is only used with partition = 'label_skew', not "
                             f"{self.partition!r}; remove it")
        return self

    def _check_server_optimizer(self) -> None:
        unused = unused_keys(self)
        if unused:
            users = [kind for kind, keys in SERVER_OPTIMIZERS.items() if unused[0].removeprefix("server_") in keys]
            raise ValueError(f"federation.{unused[0]} is used by server_optimizer {' or '.join(map(repr, users))}, not "
                             f"{self.server_optimizer!r}; remove it or change federation.server_optimizer")


Group = int | Literal["bias", "norm"]


class FreezingConfig(Section):
    """FedTT+: which factor groups train each round (policies and reasoning: federated/freezing.py).

    A group is one core index across every TT layer (0 .. cores - 1; negative counts from the end), or, with
    ``extras = "scheduled"``, all adapter biases ("bias") or all norm weights ("norm")."""

    policy: Literal["fixed", "cyclic", "adaptive"] = "adaptive"
    # biases and norms: groups the policy schedules like cores (so a round sends one group), or every round
    extras: Literal["always", "scheduled"] = "scheduled"
    cores: Annotated[list[Group], Field(min_length=1)] = [-1]   # fixed: the groups trained every round
    cores_per_round: PositiveInt = 1         # cyclic: how many groups rotate in each round
    period: PositiveInt = 1                  # cyclic: rounds per step of the rotation
    threshold: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.1  # adaptive: freeze a group whose clients agree less
    patience: PositiveInt = 2                # adaptive: rounds a frozen group waits before it is tried again
    max_groups: NonNegativeInt = 1           # adaptive: at most this many groups per round; 0: no limit


class PrivacyConfig(Section):
    """Local DP-SGD on every client and secure aggregation (federated/privacy; facts: docs/privacy.md)."""

    dp: bool = False
    # true: under dp, keys the config leaves out take the method's private recipe (defaults.DP_DEFAULTS) before its
    # non-private defaults; false: only clipping and noise differ from the non-private run
    dp_defaults: bool = True
    target_epsilon: PositiveFloat | None = None   # the whole run's budget per client (noise calibrated to it)
    noise_multiplier: NonNegativeFloat | None = None  # sigma; with target_epsilon too: fixed sigma, budget enforced
    max_grad_norm: PositiveFloat = 1.0       # per-example clipping norm C (of the adapter, with head_grad_norm)
    # DP-SGD's Poisson rate per client (expected batch q n, trained in physical chunks of federation.batch_size);
    # None: federation.batch_size / n
    sample_rate: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # set: the task head is clipped on its own to this norm and the adapter to max_grad_norm, each noised for its
    # own clip (sigma * sqrt(2) * C_g; in a head-only round sigma * C_head); None: one norm for every trained tensor
    head_grad_norm: PositiveFloat | None = None
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None  # None: min(1e-5, 1 / (10 n)) for the largest n
    accountant: Literal["rdp", "prv"] = "rdp"
    # true: DP noise and Poisson batches are derived from the run seed, so a seed reproduces a private run, and the
    # guarantee does NOT hold against the server (it knows the seed); false: each client's own OS entropy
    reproducible_noise: bool = False
    secure_aggregation: bool = False
    secagg_num_shares: NonNegativeInt = 0    # neighbours + 1 per client (SecAgg+); 0: every sampled client
    secagg_threshold: NonNegativeInt = 0     # shares needed to unmask; 0: a majority of num_shares
    secagg_clip_range: PositiveFloat = 1.0   # each weighted update value is clipped to +-this before quantising
    secagg_bits: Annotated[int, Field(ge=8, le=30)] = 22  # quantisation levels 2**bits per value
    secagg_min_clients: Annotated[int, Field(ge=2)] = 3   # clients refuse to mask in a smaller round
    # Client-level (user-level) DP, DP-FedAvg (privacy/client_dp.py): each sampled client's whole update is clipped
    # and the round's sum gets Gaussian noise, calibrated to a user-level epsilon for the whole run.
    client_dp: bool = False
    client_dp_epsilon: PositiveFloat | None = None           # the run's user-level budget (noise calibrated to it)
    client_dp_noise_multiplier: PositiveFloat | None = None  # z instead: noise std on the sum = z * clip
    client_dp_delta: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None  # None: min(1e-5, 1 / (10 num_clients))
    client_dp_clip: PositiveFloat = 1.0      # L2 bound of each client's update (adaptive: the first round's)
    client_dp_adaptive: bool = False         # clip tracks a quantile of the update norms (Andrew et al. 2021)
    client_dp_target_quantile: Fraction = 0.5
    client_dp_clip_lr: PositiveFloat = 0.2   # geometric step of the clip per round (the paper's eta_C)
    client_dp_count_noise: PositiveFloat | None = None  # std of the noise on the clipped count; None: clients/20
    # server: the server adds the noise to the sum (it is trusted with the clean sum); distributed: every client
    # adds a share before secure aggregation masks it, so the server only ever unmasks a noised sum
    client_dp_placement: Literal["server", "distributed"] = "server"

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if self.dp and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("privacy.dp = true needs privacy.target_epsilon (the run's budget) or "
                             "privacy.noise_multiplier (sigma)")
        if not self.dp and (self.target_epsilon is not None or self.noise_multiplier is not None):
            raise ValueError("privacy.target_epsilon / privacy.noise_multiplier are set but privacy.dp = false; "
                             "set privacy.dp = true or remove them")
        # client_dp with example-level dp is allowed: the two guarantees are about different neighbouring datasets
        # (one user's data vs one example) and each holds on its own; neither number improves the other.
        calibration = (self.client_dp_epsilon is not None) + (self.client_dp_noise_multiplier is not None)
        if self.client_dp and calibration != 1:
            raise ValueError("privacy.client_dp = true needs exactly one of privacy.client_dp_epsilon (the run's "
                             "user-level budget) and privacy.client_dp_noise_multiplier")
        if not self.client_dp and (calibration or self.client_dp_delta is not None):
            raise ValueError("privacy.client_dp_epsilon / client_dp_noise_multiplier / client_dp_delta are set but "
                             "privacy.client_dp = false; set privacy.client_dp = true or remove them")
        if self.client_dp and self.client_dp_placement == "distributed" and self.client_dp_adaptive:
            raise ValueError("privacy.client_dp_adaptive needs privacy.client_dp_placement = 'server' (with the noise "
                             "split among clients, each must add it for the same clip, which the server would set)")
        if self.client_dp and self.client_dp_placement == "distributed" and not self.secure_aggregation:
            raise ValueError("privacy.client_dp_placement = 'distributed' needs privacy.secure_aggregation = true "
                             "(otherwise the server sees each noise share next to its update)")
        return self


class Config(Section):
    method: Literal[METHODS] = "fedtt"
    seed: NonNegativeInt = 0                 # training: adapter and head init, batch order, dropout, DP noise
    data_seed: NonNegativeInt | None = None  # split and partition; None: the same as seed
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    adapter: AdapterConfig = AdapterConfig()
    federation: FederationConfig = FederationConfig()
    freezing: FreezingConfig = FreezingConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data):
        """The adapter's method and seed are the experiment's; missing per-method keys take the method's value
        (its private recipe's first, under local DP on a classification task)."""
        if not isinstance(data, dict):
            return data
        data = {**data}
        method = data.get("method", "fedtt")
        defaults = METHOD_DEFAULTS.get(method, {}) if isinstance(method, str) else {}
        privacy, kind = _table(data, "privacy"), _table(data, "task").get("kind", "classification")
        if privacy.get("dp") is True and privacy.get("dp_defaults", True) is True and kind == "classification":
            defaults = {**defaults, **DP_DEFAULTS.get(method, {})}
        for key, value in defaults.items():
            section, leaf = key.split(".")
            table = data.get(section, {})
            if isinstance(table, dict) and leaf not in table:
                data[section] = {**table, leaf: value}
        adapter = data.get("adapter", {})
        if isinstance(adapter, dict):
            for key in ("method", "seed"):
                if key in adapter:
                    raise ValueError(f"adapter.{key} is not a config key; set the top-level {key} instead")
            data["adapter"] = {**adapter, "method": adapter_method(method) if isinstance(method, str) else method,
                               "seed": data.get("seed", 0)}
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        fed = self.federation
        if self.method == "fedtt+" and self.clients_per_round < fed.num_clients:
            raise ValueError("method = 'fedtt+' is for cross-silo federations (every client every round); "
                             "set federation.clients_per_round = 0 or use method = 'fedtt'")
        if self.privacy.dp and not per_example_gradients(self.adapter.method):
            able = ", ".join(m for m in METHODS if per_example_gradients(adapter_method(m)))
            raise ValueError(f"privacy.dp = true: Opacus cannot compute per-example gradients for method = "
                             f"'{self.method}' (its vectors are PEFT ParameterDicts, which Opacus cannot hook); "
                             f"DP-SGD runs with {able}")
        if self.task.kind == "instruction" and self.adapter.head == "tensorized":
            raise ValueError("adapter.head = 'tensorized' is for classification; instruction tasks keep the LM head")
        if self.privacy.secure_aggregation and self.clients_per_round < self.privacy.secagg_min_clients:
            raise ValueError(f"privacy.secure_aggregation needs at least privacy.secagg_min_clients = "
                             f"{self.privacy.secagg_min_clients} clients per round, the config has "
                             f"{self.clients_per_round}")
        if self.privacy.secure_aggregation:
            self._check_secure_aggregation()
        if self.privacy.client_dp:  # the mechanism's own rules (and its calibration) fail here, before any round
            from .privacy.client_dp import ClientDP

            ClientDP.of(self)
        self._check_groups()
        return self

    def _check_secure_aggregation(self) -> None:
        """A sum over fewer than 3 clients tells each of them the others' update (from the next global adapter);
        the SecAgg+ parameters must fit the round before round 1; robust aggregators need the updates in the clear."""
        from .privacy.secure_aggregation import round_params

        if self.federation.min_replies < 3:
            raise ValueError("privacy.secure_aggregation: federation.min_replies must be >= 3 (with two survivors each "
                             "one reads the other's update from the next global adapter)")
        if self.federation.aggregator != "mean":
            raise ValueError(f"federation.aggregator = {self.federation.aggregator!r} needs every update in the "
                             "clear; with privacy.secure_aggregation use 'mean' (bound updates with max_update_norm)")
        round_params(self.privacy, self.clients_per_round)

    def _check_groups(self) -> None:
        """FedTT+ groups: core indices within the adapters' core count (when the model's size is known without
        loading it), and "bias" / "norm" only when they are trained and scheduled."""
        extras = [g for g in self.freezing.cores if isinstance(g, str)]
        if extras and self.freezing.extras != "scheduled":
            raise ValueError(f"freezing.cores = {self.freezing.cores} lists {extras[0]!r}, which is trained every "
                             "round unless freezing.extras = 'scheduled'")
        switch = {"bias": ("train_biases", self.adapter.train_biases),
                  "norm": ("train_norms", self.adapter.train_norms)}
        untrained = [g for g in extras if not switch[g][1]]
        if untrained:
            raise ValueError(f"freezing.cores = {self.freezing.cores} lists {untrained[0]!r}, which this adapter does "
                             f"not train; set adapter.{switch[untrained[0]][0]} = true or drop it")
        count = tt_core_count(self)
        bad = [g for g in self.freezing.cores if isinstance(g, int) and count is not None and not -count <= g < count]
        if bad:
            raise ValueError(f"freezing.cores = {self.freezing.cores} is not valid: the adapters' TT layers have "
                             f"{count} cores; use indices 0..{count - 1} (or -1 for the last)")

    @property
    def clients_per_round(self) -> int:
        return self.federation.clients_per_round or self.federation.num_clients

    @property
    def split_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict:
        return self.model_dump(exclude_none=True)

    def to_toml(self) -> str:
        data = self.to_dict()
        del data["adapter"]["method"], data["adapter"]["seed"]  # derived from method and seed
        return tomli_w.dumps(data)


def _table(data: dict, section: str) -> dict:
    """A raw config's ``section`` table ({} when absent or not a table: the validators name that error)."""
    table = data.get(section, {})
    return table if isinstance(table, dict) else {}


def tt_core_count(config: Config) -> int | None:
    """The cores of each adapter TT layer, known without loading weights (None: the model's size is unknown)."""
    from .models import hidden_size
    from .tt import tt_shape

    if config.adapter.tt_shape:
        return len(config.adapter.tt_shape)
    hidden = hidden_size(config.model.name)
    try:
        return len(tt_shape(hidden, config.adapter.bottleneck)) if hidden else None
    except ValueError:  # no automatic shape: building the adapter will say so
        return None


def adapter_method(method: str) -> str:
    return "fedtt" if method == "fedtt+" else method


# ------------------------------------------------------------------------------------------- loading

def _section(loc: tuple) -> type[BaseModel] | None:
    """The config section (a model class) that ``loc`` points into, or None past the sections."""
    model = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _key(loc: tuple) -> str:
    """``('federation', 'proportions', 0, 1)`` -> ``federation.proportions[0][1]``; pydantic's union-member
    tags (``int``, ``literal[...]``) are not keys and are left out."""
    text, model = "", Config
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif model is not None and part in model.model_fields:
            text += f".{part}" if text else part
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return text


def _one_line(err: ValidationError) -> str:
    """The first problem of a pydantic error, as one line that names the key and the fix."""
    first = err.errors()[0]
    loc, kind = first["loc"], first["type"]
    if kind == "extra_forbidden":
        section = _section(loc[:-1])
        known = sorted(k for k in section.model_fields if not (section is AdapterConfig and k in ("method", "seed")))
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        where = _key(loc[:-1])
        full = f"{where}.{loc[-1]}" if where else str(loc[-1])
        hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
        return f"unknown config key {full}{hint} (valid keys here: {', '.join(known)})"
    if kind == "value_error":  # our own validators: their message names the key already
        return str(first["ctx"]["error"])
    key = _key(loc)
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{key} must be a table ([{key}] in TOML), not {first['input']!r}"
    message = first["msg"].replace("Input should be", "expected")
    return f"{key} = {first.get('input')!r} is not valid: {message}"


def config_from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ValueError(_one_line(err)) from None


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
        if not isinstance(table, dict):
            raise ValueError(f"--set {assignment!r}: {section} is a value, not a section")
    table[leaf] = _parse_value(text.strip())


def load_config(path=None, overrides: list[str] = ()) -> Config:
    from pathlib import Path

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
