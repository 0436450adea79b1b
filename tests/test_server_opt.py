"""Server-side optimisers (federation.server_optimizer): Flower's FedAvgM / FedAdam / FedYogi rules on the round's
mean update, FedAvg bit for bit at the default, per-tensor state under FedTT+, and a resume that equals an
uninterrupted run."""

from __future__ import annotations

import conftest
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi
from safetensors.torch import load_file

from fedtt.config import load_config
from fedtt.engines import inprocess
from fedtt.federated.checkpoint import read_checkpoint
from fedtt.federated.codec import unpack
from fedtt.federated.protocol import TRAIN
from fedtt.federated.server_opt import ServerOptimizer
from fedtt.run import run

# Three rounds' mean updates of one two-value tensor; values exact in float32, so Flower's float32 arithmetic and
# ours start from the same numbers.
DELTAS = [np.array([0.5, -1.0]), np.array([-0.25, 0.5]), np.array([1.0, 0.0])]
# The global tensor (from 0) after each round, worked out from the rules in federated/server_opt.py:
#   momentum (lr 0.5, mu 0.9): m = [.5, -1], [.2, -.4], [1.18, -.36]; x += 0.5 m
#   adam (lr 0.1, b1 0.9, b2 0.99, tau 1e-3): round 1: m = [.05, -.1], v = [.0025, .01],
#        x = 0.1 * sqrt(1 - .99^2) / (1 - .9^2) * m / (sqrt(v) + 1e-3) = [0.07279018, -0.07351087]
#   yogi (lr 0.01): round 1: m and v as Adam's, x = 0.01 * m / (sqrt(v) + 1e-3) = [0.00980392, -0.00990099]
EXPECTED = {
    "momentum": ({"lr": 0.5, "momentum": 0.9}, [[0.25, -0.5], [0.35, -0.7], [0.94, -0.88]]),
    "adam": ({"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
             [[0.07279018, -0.07351087], [0.09523077, -0.0961512], [0.15429389, -0.11473822]]),
    "yogi": ({"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
             [[0.00980392, -0.00990099], [0.01331876, -0.01344698], [0.02352951, -0.01663838]]),
}
FLOWER = {"momentum": (FedAvgM, {"server_learning_rate": 0.5, "server_momentum": 0.9}),
          "adam": (FedAdam, {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
          "yogi": (FedYogi, {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3})}
# A tiny real federation (cached by config in the process: each distinct config builds its model once).
TINY = [*conftest.FAST, "task.max_eval_examples=20", "task.max_train_examples=200", "federation.local_steps=1",
        "federation.lr_schedule=constant"]
ADAM = ["federation.server_optimizer='adam'", "federation.server_lr=0.01"]


def _steps(kind: str, hyper: dict, deltas: list[np.ndarray]) -> list[np.ndarray]:
    """The global tensor after each round, from 0, taking every step the optimiser proposes."""
    opt, x, path = ServerOptimizer(kind, hyper), np.zeros(2), []
    for delta in deltas:
        step, state = opt.step({"w": delta})
        opt.accept(state)
        x = x + step["w"]
        path.append(x)
    return path


@pytest.mark.parametrize("kind", EXPECTED)
def test_each_rule_takes_the_hand_computed_steps_over_three_rounds(kind):
    hyper, expected = EXPECTED[kind]
    for got, want in zip(_steps(kind, hyper, DELTAS), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-8)


@pytest.mark.parametrize("kind", FLOWER)
def test_each_rule_equals_flowers_own_strategy(kind, monkeypatch):
    """Flower's FedAvgM / FedAdam / FedYogi, fed the same aggregates (their FedAvg step replaced by the aggregate)."""
    cls, kwargs = FLOWER[kind]
    strategy, current = cls(**kwargs), {"w": np.zeros(2, dtype=np.float32)}
    aggregate = {}
    monkeypatch.setattr(FedAvg, "aggregate_train", lambda self, server_round, replies: (
        ArrayRecord({k: Array(v) for k, v in aggregate.items()}), MetricRecord()))
    theirs = []
    for server_round, delta in enumerate(DELTAS, start=1):
        aggregate = {"w": current["w"] + delta.astype(np.float32)}
        if cls is FedAvgM:  # FedAvgM keeps its own copy of the global arrays after the first round
            strategy.current_arrays = strategy.current_arrays or ArrayRecord({"w": Array(current["w"])})
        else:
            strategy.current_arrays = dict(current)
        new, _ = strategy.aggregate_train(server_round, [])
        current = {"w": new["w"].numpy()}
        theirs.append(current["w"])
    ours = _steps(kind, EXPECTED[kind][0], DELTAS)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_tensor_frozen_in_a_round_keeps_its_state_and_counts_only_its_own_steps():
    """FedTT+: a round's mean holds only its trained groups' tensors; the others neither move nor age."""
    hyper = EXPECTED["adam"][0]
    opt = ServerOptimizer("adam", hyper)
    for mean in ({"a": DELTAS[0], "b": DELTAS[0]}, {"a": DELTAS[1]}):
        step, state = opt.step(mean)
        assert set(step) == set(mean)
        opt.accept(state)
    assert (opt.state["a"].steps, opt.state["b"].steps) == (2, 1)
    frozen = ServerOptimizer("adam", hyper)
    frozen.accept(frozen.step({"b": DELTAS[0]})[1])
    np.testing.assert_array_equal(opt.state["b"].m, frozen.state["b"].m)  # untouched by round 2
    step_b, _ = opt.step({"b": DELTAS[2]})  # b's second step: Adam's t = 2, as if round 2 had not happened
    np.testing.assert_allclose(step_b["b"], _steps("adam", hyper, [DELTAS[0], DELTAS[2]])[1] - _steps(
        "adam", hyper, [DELTAS[0]])[0], rtol=1e-12)


def test_a_step_changes_nothing_until_it_is_accepted():
    """The strategy accepts a step only once the merged adapter is finite: a skipped round leaves no trace."""
    opt = ServerOptimizer("momentum", {"lr": 1.0, "momentum": 0.9})
    opt.step({"w": DELTAS[0]})
    assert opt.state == {}


def test_options_are_checked_at_config_load():
    with pytest.raises(ValueError, match=r"federation.server_beta1 is used by server_optimizer 'adam' or 'yogi', "
                                         r"not 'sgd'"):
        load_config(None, ["federation.server_beta1=0.5"])
    with pytest.raises(ValueError, match=r"federation.server_momentum is used by server_optimizer 'momentum'"):
        load_config(None, ["federation.server_optimizer='adam'", "federation.server_momentum=0.9"])
    with pytest.raises(ValueError, match=r"federation.server_optimizer = 'nag' is not valid"):
        load_config(None, ["federation.server_optimizer='nag'"])
    with pytest.raises(ValueError, match=r"federation.server_beta2 = 1.0 is not valid"):
        load_config(None, ["federation.server_optimizer='yogi'", "federation.server_beta2=1.0"])
    config = load_config(None, ["federation.server_optimizer='yogi'"])
    assert ServerOptimizer.of(config.federation).hyper == {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert load_config(None, []).federation.server_optimizer == "sgd"


# ----------------------------------------------------------------------------------------- real federations

def _spy_train_rounds(monkeypatch) -> dict[int, dict]:
    """Per round, what the in-process grid carried: the global tensors sent, and each reply's (partition, example
    count, update)."""
    rounds: dict[int, dict] = {}
    real = inprocess.InProcessGrid._deliver

    def spy(self, msg):
        reply = real(self, msg)
        if msg.metadata.message_type == TRAIN and not reply.has_error():
            entry = rounds.setdefault(int(msg.content["config"]["server-round"]), {"replies": []})
            entry["global"] = unpack(msg.content["arrays"], msg.content["wire"])
            partition = int(self.contexts[msg.metadata.dst_node_id].node_config["partition-id"])
            entry["replies"].append((partition, int(reply.content["metrics"]["num-examples"]),
                                     unpack(reply.content["arrays"], reply.content["wire"])))
        return reply

    monkeypatch.setattr(inprocess.InProcessGrid, "_deliver", spy)
    return rounds


def _fedavg_mean(replies: list) -> dict[str, np.ndarray]:
    """The example-weighted mean of the updates, in float64, summed in partition order."""
    total = sum(n for _, n, _ in replies)
    names = replies[0][2]
    return {k: sum(n * u[k].astype(np.float64) for _, n, u in sorted(replies, key=lambda r: r[0])) / total
            for k in names}


def test_sgd_at_rate_1_is_exactly_fedavg_on_a_real_federation(tmp_path, monkeypatch):
    rounds = _spy_train_rounds(monkeypatch)
    run(load_config(None, [*TINY, "federation.rounds=2", "federation.server_optimizer='sgd'",
                           "federation.server_lr=1.0"]), tmp_path)
    final = read_checkpoint(tmp_path).arrays
    after = {1: rounds[2]["global"], 2: {k: final[k].numpy() for k in final}}
    for r in (1, 2):
        mean = _fedavg_mean(rounds[r]["replies"])
        for name, value in rounds[r]["global"].items():
            fedavg = (value.astype(np.float64) + mean[name]).astype(np.float32)
            np.testing.assert_array_equal(after[r][name], fedavg, err_msg=f"round {r}: {name}")


def test_adam_steps_from_the_mean_update_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    rounds = _spy_train_rounds(monkeypatch)
    whole = run(load_config(None, [*TINY, "federation.rounds=2", *ADAM]), tmp_path / "whole")
    monkeypatch.undo()
    final = read_checkpoint(tmp_path / "whole").arrays
    reference = ServerOptimizer("adam", {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3})
    after = {1: rounds[2]["global"], 2: {k: final[k].numpy() for k in final}}
    for r in (1, 2):
        mean = _fedavg_mean(rounds[r]["replies"])
        step, state = reference.step(mean)
        reference.accept(state)
        for name, value in rounds[r]["global"].items():
            np.testing.assert_allclose(after[r][name], value + step[name], rtol=1e-6, atol=1e-8)
        assert any(not np.allclose(step[k], mean[k]) for k in mean)  # not FedAvg's step
    # Stopped after round 1 and resumed: round 2 takes the same Adam step (the moments were checkpointed).
    run(load_config(None, [*TINY, "federation.rounds=1", *ADAM]), tmp_path / "part")
    checkpoint = read_checkpoint(tmp_path / "part")
    assert checkpoint.tensors and checkpoint.strategy["server_opt"]["kind"] == "adam"
    resumed = run(load_config(None, [*TINY, "federation.rounds=2", *ADAM]), tmp_path / "part", resume=True)
    for a, b in zip(resumed["rounds"], whole["rounds"]):
        assert (a["validation"], a["eval"], a["train_loss"]) == (b["validation"], b["eval"], b["train_loss"])
    x, y = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "part"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
