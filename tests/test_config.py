"""The config loader: every key validated at load with a one-line error naming it (a fuzz of >= 1,000 invalid
configs through the CLI, nothing written), valid configs never refused, per-method defaults in one place."""

import json
import random
import time
import typing

import pytest
from pydantic import BaseModel

from fedtt.adapters.peft_methods import per_example_gradients
from fedtt.cli import main
from fedtt.config import METHODS, Config, adapter_method, load_config
from fedtt.defaults import DP_DEFAULTS, METHOD_DEFAULTS

SECTIONS = ("model", "task", "adapter", "federation", "freezing", "privacy")


def fields_of(model: type[BaseModel], prefix: str = ""):
    """(dotted key, annotation, field info) of every leaf config key."""
    for name, field in model.model_fields.items():
        if model.__name__ == "AdapterConfig" and name in ("method", "seed"):
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from fields_of(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation, field


def bounds(field) -> dict:
    found = {}
    for meta in field.metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length"):
            if getattr(meta, attr, None) is not None:
                found[attr] = getattr(meta, attr)
    return found


def invalid_values(annotation, field) -> list:
    """Values of the wrong type, element type or range for a key of this annotation."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in args if a is not type(None)]
        values = invalid_values(inner[0], field) if len(inner) == 1 else ["nope", {"a": 1}]
        return [v for v in values if v is not None]
    if origin is typing.Annotated:
        return invalid_values(args[0], type("F", (), {"metadata": args[1:]})())
    if origin is typing.Literal:
        return ["not-a-choice", 12345, True, [args[0]]]
    if origin is list:
        element = args[0]
        wrong = {int: ["a", 1.5, True], str: [1, True, 2.5], float: ["a", True]}
        values = ["not-a-list", 3]
        element_base = typing.get_args(element)[0] if typing.get_origin(element) is typing.Annotated else element
        if typing.get_origin(element_base) is list:
            values += [[["a"]], [[True]], [1.0]]
        elif element_base in wrong:
            values += [[w] for w in wrong[element_base]]
        elif typing.get_origin(element_base) in (typing.Union, __import__("types").UnionType):
            values += [[1.5], [True], [["x"]]]
        return values
    out = {int: ["three", 1.5, True, [1]], float: ["fast", True, [0.1], {"x": 1}], bool: [1, "yes", 0.0, [True]],
           str: [3, True, [1], 2.5]}[annotation]
    limits = bounds(field)
    if "ge" in limits:
        out.append(limits["ge"] - 1 if annotation is int else limits["ge"] - 0.5)
    if "gt" in limits:
        out.append(limits["gt"])
    if "le" in limits:
        out.append(limits["le"] + 1)
    if "lt" in limits:
        out.append(limits["lt"])
    return out


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


CROSS_FIELD = [  # (overrides, a key the message must name)
    (["federation.min_replies=4"], "federation.min_replies"),
    (["federation.clients_per_round=7"], "federation.clients_per_round"),
    (["federation.warmup_rounds=10"], "federation.warmup_rounds"),
    (["task.validation_fraction=0.5", "task.test_fraction=0.5"], "task.validation_fraction"),
    (["federation.partition='label_skew'"], "federation.proportions"),
    (["federation.partition='label_skew'", "federation.proportions=[[0.5,0.6],[0.5,0.5],[0.5,0.5]]"],
     "federation.proportions[0]"),
    (["federation.partition='label_skew'", "federation.proportions=[[0.5,0.5],[0.5,0.5]]"], "federation.proportions"),
    (["federation.partition='label_skew'", "federation.proportions=[[1.0],[1.0],[1.0]]"], "federation.proportions"),
    (["federation.proportions=[[0.5,0.5],[0.5,0.5],[0.5,0.5]]"], "federation.proportions"),
    (["method='fedtt+'", "federation.num_clients=10", "federation.clients_per_round=5"], "clients_per_round"),
    (["privacy.dp=true"], "privacy.target_epsilon"),
    (["privacy.target_epsilon=3.0"], "privacy.dp"),
    (["freezing.cores=[5]"], "freezing.cores"),
    (["freezing.cores=[-6]"], "freezing.cores"),
    (["freezing.cores=['bias']"], "freezing.cores"),
    (["task.template='no placeholder'"], "task.template"),
    (["method='lora'", "adapter.head='tensorized'"], "adapter.head"),
    (["task.kind='instruction'", "adapter.head='tensorized'"], "adapter.head"),
    (["federation.local_steps=0"], "federation.local_steps"),
    (["privacy.secure_aggregation=true", "federation.num_clients=2"], "privacy.secagg_min_clients"),
    (["privacy.secure_aggregation=true"], "federation.min_replies"),
    (["adapter.method='lora'"], "adapter.method"),
]


def invalid_configs() -> list[tuple[list[str], str]]:
    cases = []
    for key, annotation, field in fields_of(Config):
        for value in invalid_values(annotation, field):
            cases.append(([f"{key}={toml_value(value)}"], key))
        section, _, leaf = key.rpartition(".")
        typo = leaf[:-1] + ("x" if leaf[-1] != "x" else "y")
        cases.append(([f"{section + '.' if section else ''}{typo}=1"], f"{section + '.' if section else ''}{typo}"))
    for section in SECTIONS:
        cases += [([f"{section}=3"], section), ([f"{section}='x'"], section)]
    cases += CROSS_FIELD
    rng = random.Random(0)  # one invalid override among valid ones: the invalid key is still the one named
    singles = list(cases)
    while len(cases) < 1100:
        bad, key = rng.choice(singles)
        fillers = [f for f in ("task.eval_batch_size=32", "data_seed=2") if not key.startswith(f.split("=")[0])]
        cases.append(([rng.choice(fillers), *bad] if rng.random() < 0.5 else [*bad, rng.choice(fillers)], key))
    return cases


def test_every_invalid_config_is_a_one_line_error_naming_the_key_and_nothing_is_written(tmp_path, capsys):
    cases = invalid_configs()
    assert len(cases) >= 1000
    main(["run", "--set", "seed=-1", "--out", str(tmp_path / "warm")])  # imports once, outside the clock
    capsys.readouterr()
    start = time.perf_counter()
    for i, (overrides, key) in enumerate(cases):
        out = tmp_path / f"run-{i}"
        argv = ["run", "--out", str(out)] + [a for o in overrides for a in ("--set", o)]
        assert main(argv) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedtt: error: ") and "\n" not in err and "Traceback" not in err, (overrides, err)
        assert key in err, (overrides, key, err)
        assert not out.exists(), overrides
    assert time.perf_counter() - start < 20


def random_valid_config(rng: random.Random) -> list[str]:
    method = rng.choice(METHODS)
    clients = rng.randint(3, 12)
    overrides = [f"method='{method}'", f"seed={rng.randint(0, 99)}", f"federation.num_clients={clients}",
                 f"federation.rounds={rng.randint(2, 20)}", f"federation.batch_size={rng.randint(1, 64)}",
                 f"federation.lr={rng.choice([1e-4, 3e-3, 0.1])}", f"task.max_eval_examples={rng.randint(0, 900)}",
                 f"federation.partition='{rng.choice(['iid', 'dirichlet'])}'", f"adapter.rank={rng.randint(1, 16)}",
                 f"federation.weighting='{rng.choice(['examples', 'uniform'])}'",
                 f"federation.wire_dtype='{rng.choice(['float32', 'float16', 'bfloat16'])}'",
                 f"federation.lr_schedule='{rng.choice(['constant', 'linear', 'cosine'])}'",
                 f"freezing.policy='{rng.choice(['fixed', 'cyclic', 'adaptive'])}'",
                 f"freezing.cores=[{rng.randint(-5, 4)}]", f"freezing.threshold={rng.uniform(-1, 1):.3f}"]
    if method != "fedtt+" and rng.random() < 0.5:
        overrides.append(f"federation.clients_per_round={rng.randint(0, clients)}")
    if per_example_gradients(adapter_method(method)) and rng.random() < 0.3:  # DP-SGD refuses the others
        overrides += ["privacy.dp=true", f"privacy.target_epsilon={rng.choice([1, 3.0, 8])}"]
    if rng.random() < 0.3:
        overrides += ["privacy.secure_aggregation=true", "federation.min_replies=3", "federation.clients_per_round=0"]
    elif rng.random() < 0.3:
        overrides += [f"federation.aggregator='{rng.choice(['median', 'trimmed-mean'])}'",
                      f"federation.max_update_norm={rng.choice([0.0, 0.5, 10.0])}"]
    if method.startswith("fedtt") and rng.random() < 0.3:
        overrides.append("adapter.head='tensorized'")
    return overrides


def test_valid_configs_are_never_refused_and_round_trip_through_toml():
    rng = random.Random(1)
    for _ in range(300):
        config = load_config(None, random_valid_config(rng))
        again = load_config(None, [])  # defaults load too
        assert again.method == "fedtt"
        import tomllib

        from fedtt.config import config_from_dict
        assert config_from_dict(tomllib.loads(config.to_toml())) == config


def test_unknown_keys_suggest_the_close_one(capsys):
    with pytest.raises(ValueError, match=r"unknown config key federation.roundz; did you mean federation.rounds\?"):
        load_config(None, ["federation.roundz=3"])
    with pytest.raises(ValueError, match=r"unknown config key modle; did you mean model\?"):
        load_config(None, ["modle.name='minilm'"])


def test_each_method_takes_its_own_defaults_unless_the_config_sets_them():
    for method, defaults in METHOD_DEFAULTS.items():
        config = load_config(None, [f"method='{method}'"])
        for key, value in defaults.items():
            section, leaf = key.split(".")
            assert getattr(getattr(config, section), leaf) == value, (method, key)
    assert load_config(None, ["method='lora'", "federation.lr=0.5"]).federation.lr == 0.5
    assert load_config(None, ["method='fedtt'"]).adapter.init == "identity"


def test_momentum_is_refused_without_sgd():
    with pytest.raises(ValueError, match=r"federation.momentum = 0.9 is sgd's; set federation.optimizer = 'sgd'"):
        load_config(None, ["federation.momentum=0.9"])
    assert load_config(None, ["federation.optimizer='sgd'", "federation.momentum=0.9"]).federation.momentum == 0.9


def test_local_dp_on_a_classifier_takes_the_private_recipe_unless_the_config_sets_it():
    for method, defaults in DP_DEFAULTS.items():
        config = load_config(None, [f"method='{method}'", "privacy.dp=true", "privacy.target_epsilon=8"])
        for key, value in defaults.items():
            section, leaf = key.split(".")
            assert getattr(getattr(config, section), leaf) == value, (method, key)
    mine = load_config(None, ["method='lora'", "privacy.dp=true", "privacy.target_epsilon=8", "federation.lr=0.5",
                              "federation.local_steps=7"])
    assert (mine.federation.lr, mine.federation.local_steps) == (0.5, 7)
    assert mine.privacy.sample_rate == DP_DEFAULTS["lora"]["privacy.sample_rate"]
    # without DP, with dp_defaults off, and on instruction tasks (no head to probe first): the non-private defaults
    assert load_config(None, ["method='lora'"]).privacy.sample_rate is None
    plain = load_config(None, ["method='lora'", "privacy.dp=true", "privacy.target_epsilon=8",
                               "privacy.dp_defaults=false"])
    assert (plain.privacy.sample_rate, plain.privacy.max_grad_norm) == (None, 1.0)
    assert plain.federation.lr == METHOD_DEFAULTS["lora"]["federation.lr"] and plain.federation.local_steps == 20
    decoder = load_config(None, ["method='lora'", "privacy.dp=true", "privacy.target_epsilon=8",
                                 "task.kind='instruction'", "task.name='trec'", "model.name='smollm2'"])
    assert decoder.federation.head_only_rounds == 0
    assert decoder.federation.lr == METHOD_DEFAULTS["lora"]["federation.lr"]
