"""FedTT+: per-round core freezing, exact single-core aggregation, payloads, policies; FFA-LoRA's frozen A."""

import json

import pytest
import torch
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

import fedtt
from fedtt.config import FreezingConfig, load_config
from fedtt.engines.inprocess import run_inprocess
from fedtt.federated import client_app as real_client
from fedtt.federated.freezing import FreezingPolicy, core_index
from fedtt.federated.server_app import app as server_app
from fedtt.federated.task import run_config_for
from fedtt.models import load_backbone
from fedtt.run import run
from fedtt.tt import TTLinear, tt_shape

FAST = ["model.num_hidden_layers=2", "model.max_length=32", "task.max_eval_examples=100",
        "federation.batch_size=8", "federation.local_steps=2", "federation.partition=iid"]


def client_matrices(num_clients, trained_cores, seed=0):
    """TT layers of several clients that share every core except ``trained_cores``."""
    shared = TTLinear(64, 384, tt_shape(64, 384), rank=5, generator=torch.Generator().manual_seed(seed))
    clients = []
    for c in range(num_clients):
        cores = [core.detach().clone() for core in shared.cores]
        for j in trained_cores:
            cores[j] = cores[j] + torch.randn(cores[j].shape, generator=torch.Generator().manual_seed(100 + c))
        clients.append([core.double() for core in cores])
    return clients


def tt(cores):
    from fedtt.tt import tt_to_dense

    return tt_to_dense(cores, 64, 384)


@pytest.mark.parametrize("core", [0, 2, 4])
def test_averaging_one_trained_core_is_exactly_averaging_the_adapters(core):
    clients, weights = client_matrices(3, [core]), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    averaged_cores = [sum(w * c[i] for w, c in zip(weights, clients)) for i in range(len(clients[0]))]
    mean_of_matrices = sum(w * tt(c) for w, c in zip(weights, clients))
    assert torch.allclose(tt(averaged_cores), mean_of_matrices, atol=1e-10)


def test_averaging_two_trained_cores_is_not_exact():
    clients, weights = client_matrices(3, [0, 1]), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    averaged_cores = [sum(w * c[i] for w, c in zip(weights, clients)) for i in range(len(clients[0]))]
    mean_of_matrices = sum(w * tt(c) for w, c in zip(weights, clients))
    assert (tt(averaged_cores) - mean_of_matrices).norm() > 1e-3 * mean_of_matrices.norm()


def test_policy_schedules_are_deterministic():
    cyclic = FreezingPolicy(FreezingConfig(policy="cyclic", cores_per_round=2, period=1), num_cores=5)
    assert [cyclic.trainable_cores(t) for t in range(1, 5)] == [[3, 4], [1, 2], [0, 4], [2, 3]]
    slow = FreezingPolicy(FreezingConfig(policy="cyclic", cores_per_round=1, period=2), num_cores=3)
    assert [slow.trainable_cores(t) for t in range(1, 8)] == [[2], [2], [1], [1], [0], [0], [2]]
    fixed = FreezingPolicy(FreezingConfig(policy="fixed", cores=[2]), num_cores=5)
    assert {tuple(fixed.trainable_cores(t)) for t in range(1, 10)} == {(2,)}
    assert FreezingPolicy(FreezingConfig(policy="fixed"), num_cores=5).trainable_cores(1) == [4]  # default: last
    history = [{0: 0.5, 1: 0.001, 2: 0.3}, {0: 0.005, 2: 0.2}, {2: 0.0001}]
    runs = []
    for _ in range(2):
        adaptive = FreezingPolicy(FreezingConfig(policy="adaptive", threshold=0.5), num_cores=3)
        schedule = [adaptive.trainable_cores(1)]
        for t, updates in enumerate(history, start=2):
            adaptive.observe(updates)
            schedule.append(adaptive.trainable_cores(t))
        runs.append(schedule)
    assert runs[0] == runs[1] == [[0, 1, 2], [0, 2], [2], [2]]  # never fewer than one trainable core
    same_shape = FreezingPolicy(FreezingConfig(policy="adaptive", threshold=0.5), num_cores=3)
    same_shape.observe({0: 0.0004, 1: 0.0005, 2: 0.0003})  # small but alike: the threshold is relative
    assert same_shape.trainable_cores(2) == [0, 1, 2]


def test_bad_policy_configs_are_rejected():
    with pytest.raises(ValueError, match="freezing.cores = \\[7\\] is not valid .* 0..4"):
        FreezingPolicy(FreezingConfig(policy="fixed", cores=[7]), num_cores=5)
    with pytest.raises(ValueError, match="cross-silo"):
        load_config(None, ["method=fedtt+", "federation.num_clients=10", "federation.clients_per_round=5"])


def recording_client_app(log):
    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = real_client.train(msg, context)
        log.append({"round": msg.content["config"]["server-round"], "down": set(msg.content["arrays"]),
                    "up": set(reply.content["arrays"])})
        return reply

    return app


def test_frozen_cores_are_neither_sent_down_nor_up(tmp_path):
    config = load_config(None, FAST + ["method=fedtt+", "federation.rounds=3", "freezing.policy=cyclic"])
    log = []
    run_inprocess(server_app, recording_client_app(log), num_nodes=3, run_config=run_config_for(config, str(tmp_path)))
    results = json.loads((tmp_path / "results.json").read_text())
    saved = load_file(tmp_path / "adapter/adapter.safetensors")
    n = 1 + max(core_index(k) for k in saved if core_index(k) is not None)
    assert [r["trainable_cores"] for r in results["rounds"]] == [[n - 1], [n - 2], [n - 3]]
    assert [list(r["core_updates"]) for r in results["rounds"]] == [[str(n - 1)], [str(n - 2)], [str(n - 3)]]
    for entry in log:
        cores_up = {core_index(k) for k in entry["up"]} - {None}
        cores_down = {core_index(k) for k in entry["down"]} - {None}
        this, last = n - entry["round"], n + 1 - entry["round"]
        assert cores_up == {this}
        assert cores_down == {this, last} - {n}  # last round's aggregate of a now-frozen core goes down once
    # every trained core learned: the zero-initialised last core goes first, or no other core gets a gradient
    backbone, _ = load_backbone("minilm", num_labels=2, num_hidden_layers=2)
    fresh = fedtt.adapter_state_dict(fedtt.inject(backbone, config.adapter))
    for core in (n - 1, n - 2, n - 3):
        ups = [k for k in saved if core_index(k) == core and ".up." in k]
        assert ups and all(not torch.equal(saved[k], fresh[k]) for k in ups), core
        assert {k for k in entry["up"] if core_index(k) is None} == {k for k in entry["down"] if core_index(k) is None}
    full = sum(tensor.numel() for tensor in saved.values())
    assert results["trainable_params"] == full
    assert all(r["params_up"] < 3 * full for r in results["rounds"])
    assert results["rounds"][0]["params_down"] == results["rounds"][0]["params_up"]
    assert results["rounds"][1]["params_down"] > results["rounds"][1]["params_up"]


def test_ffa_lora_a_never_changes_in_a_federation(tmp_path):
    config = load_config(None, FAST + ["method=ffa-lora", "federation.rounds=2"])
    results = run(config, tmp_path)
    assert results["rounds"][-1]["eval"]["loss"] != results["initial"]["loss"]  # B and the head did train
    saved = load_file(tmp_path / "adapter/adapter.safetensors")
    model, _ = load_backbone("minilm", num_labels=2, num_hidden_layers=2)
    fresh = fedtt.adapter_state_dict(fedtt.inject(model, config.adapter))
    a_keys = [k for k in saved if "lora_A" in k]
    assert a_keys and all(torch.equal(saved[k], fresh[k]) for k in a_keys)
    assert not all(torch.equal(saved[k], fresh[k]) for k in saved if "lora_B" in k)
