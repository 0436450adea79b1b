"""FedTT+: factor groups, exact single-core aggregation, payloads, policies, the state handshake; FFA-LoRA's A."""

import json

import conftest
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from safetensors.torch import load_file

import fedtt
from fedtt.config import FreezingConfig, load_config
from fedtt.engines.inprocess import run_inprocess
from fedtt.federated import client_app as real_client
from fedtt.federated.codec import unpack
from fedtt.federated.freezing import ADAPTER_TT, FreezingPolicy, factor_groups, num_cores
from fedtt.federated.server_app import app as server_app
from fedtt.federated.task import experiment, run_config_for
from fedtt.models import load_backbone
from fedtt.run import run
from fedtt.tt import TTLinear, tt_shape, tt_to_dense

FAST = [*conftest.FAST, "method='fedtt+'"]


def core_of(name):
    match = ADAPTER_TT.search(name)
    return int(match.group(3)) if match and match.group(3) is not None else None


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


@pytest.mark.parametrize("core", [0, 2, 4])
def test_averaging_one_trained_core_is_exactly_averaging_the_adapters(core):
    clients, weights = client_matrices(3, [core]), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    averaged_cores = [sum(w * c[i] for w, c in zip(weights, clients)) for i in range(len(clients[0]))]
    mean_of_matrices = sum(w * tt_to_dense(c, 64, 384) for w, c in zip(weights, clients))
    assert torch.allclose(tt_to_dense(averaged_cores, 64, 384), mean_of_matrices, atol=1e-10)


def test_averaging_two_trained_cores_is_not_exact():
    clients, weights = client_matrices(3, [0, 1]), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    averaged_cores = [sum(w * c[i] for w, c in zip(weights, clients)) for i in range(len(clients[0]))]
    mean_of_matrices = sum(w * tt_to_dense(c, 64, 384) for w, c in zip(weights, clients))
    assert (tt_to_dense(averaged_cores, 64, 384) - mean_of_matrices).norm() > 1e-3 * mean_of_matrices.norm()


def test_factor_groups_of_a_model():
    model, _ = load_backbone("minilm", num_labels=2, num_hidden_layers=1, seed=0)
    fedtt.inject(model, fedtt.AdapterConfig(train_biases=True, train_norms=True))
    groups = factor_groups(model)
    assert {g for g in groups.values()} == {0, 1, 2, 3, 4, "bias", "norm", None}
    assert groups["classifier.weight"] is None  # the head trains every round
    assert groups["bert.encoder.layer.0.output.dense.adapter.up.core_4"] == 4
    assert groups["bert.encoder.layer.0.output.dense.adapter.down.bias"] == "bias"
    assert groups["bert.encoder.layer.0.output.LayerNorm.weight"] == "norm"
    assert num_cores(model) == 5
    with pytest.raises(ValueError, match="the same number of cores"):
        num_cores(mixed_model())


def mixed_model():
    model, _ = load_backbone("minilm", num_labels=2, num_hidden_layers=1, seed=0)
    return fedtt.inject(model, fedtt.AdapterConfig(target_modules=["attention.output.dense", "output.dense"],
                                                   position="input"))  # inputs of 384 and of 1536: 5 and 6 cores


def test_policy_schedules_are_deterministic():
    cyclic = FreezingPolicy(FreezingConfig(policy="cyclic", cores_per_round=2, extras="always"), num_cores=5,
                            extras=["bias"])
    assert [cyclic.trainable(t) for t in range(1, 5)] == [[4, 3, "bias"], [2, 1, "bias"], [4, 0, "bias"],
                                                         [3, 2, "bias"]]
    scheduled = FreezingPolicy(FreezingConfig(policy="cyclic", extras="scheduled"), num_cores=3, extras=["bias"])
    assert [scheduled.trainable(t) for t in range(1, 6)] == [[2], [1], [0], ["bias"], [2]]
    slow = FreezingPolicy(FreezingConfig(policy="cyclic", period=2), num_cores=3, extras=[])
    assert [slow.trainable(t) for t in range(1, 8)] == [[2], [2], [1], [1], [0], [0], [2]]
    fixed = FreezingPolicy(FreezingConfig(policy="fixed", cores=[2]), num_cores=5, extras=[])
    assert {tuple(fixed.trainable(t)) for t in range(1, 10)} == {(2,)}
    assert FreezingPolicy(FreezingConfig(policy="fixed"), num_cores=5, extras=[]).trainable(1) == [4]


def test_adaptive_freezes_disagreeing_groups_tries_them_again_and_is_deterministic():
    history = [{0: 0.9, 1: 0.02, 2: 0.5}, {0: 0.03, 2: 0.6}, {2: 0.7}, {1: 0.8, 2: 0.2}]
    runs = []
    for _ in range(2):
        policy = FreezingPolicy(FreezingConfig(policy="adaptive", threshold=0.1, patience=2, max_groups=0),
                                num_cores=3, extras=[])
        schedule = [policy.trainable(1)]
        for t, agreement in enumerate(history, start=1):
            policy.observe(t, {g: a for g, a in agreement.items() if g in schedule[-1]})
            schedule.append(policy.trainable(t + 1))
        runs.append(schedule)
    # round 1: all; 1 disagreed -> frozen after round 1; 0 after round 2; 1 is back in round 4 (patience 2)
    assert runs[0] == runs[1] == [[2, 1, 0], [2, 0], [2], [2, 1], [2, 1, 0]]
    capped = FreezingPolicy(FreezingConfig(policy="adaptive", max_groups=1, extras="always"), num_cores=3,
                            extras=["bias"])
    assert capped.trainable(1) == [2, "bias"]  # the zero-initialised last core first; biases every round
    capped.observe(1, {2: 0.3})
    assert capped.trainable(2) == [1, "bias"]  # untried groups count as agreeing fully
    capped.observe(2, {1: 0.5})
    capped.observe(3, {0: 0.4})
    assert capped.trainable(4) == [1, "bias"]
    lonely = FreezingPolicy(FreezingConfig(policy="adaptive"), num_cores=2, extras=[])
    lonely.observe(1, {0: -0.2, 1: -0.1})
    assert lonely.trainable(2) == [1]  # never fewer than one group: the most agreeing stays


def test_bad_policy_configs_are_rejected():
    with pytest.raises(ValueError, match=r"freezing.cores = \[7\] is not valid.*0..4"):
        FreezingPolicy(FreezingConfig(policy="fixed", cores=[7]), num_cores=5, extras=[])
    with pytest.raises(ValueError, match="freezing.cores_per_round = 6 is more than the 5 groups"):
        FreezingPolicy(FreezingConfig(policy="cyclic", cores_per_round=6), num_cores=5, extras=[])
    with pytest.raises(ValueError, match="cross-silo"):
        load_config(None, ["method='fedtt+'", "federation.num_clients=10", "federation.clients_per_round=5"])


def recording_client_app(log, wipe=None):
    """The real ClientApp; it logs what each train message carried and, with ``wipe = (partition, round)``,
    forgets everything that node holds after that round (a restarted SuperNode)."""
    def train(msg, context):
        reply = real_client.train(msg, context)
        log.append({"round": msg.content["config"]["server-round"], "partition": context.node_config["partition-id"],
                    "down": set(unpack(msg.content["arrays"], msg.content["wire"])),
                    "up": set(unpack(reply.content["arrays"], reply.content["wire"]))})
        if wipe == (context.node_config["partition-id"], msg.content["config"]["server-round"]):
            context.state = RecordDict()
        return reply

    return conftest.client_app_with(train)


def test_frozen_cores_are_neither_sent_down_nor_up(tmp_path):
    config = load_config(None, FAST + ["federation.rounds=3", "freezing.policy='cyclic'"])
    log = []
    run_inprocess(server_app, recording_client_app(log), num_nodes=3, run_config=run_config_for(config, str(tmp_path)))
    results = json.loads((tmp_path / "results.json").read_text())
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    n = 1 + max(c for c in map(core_of, saved) if c is not None)
    # one group per round (the default trains no adapter biases): the head alone travels with it
    assert [r["groups"] for r in results["rounds"]] == [[n - 1], [n - 2], [n - 3]]
    assert [list(r["agreement"]) for r in results["rounds"]] == [[str(n - i)] for i in (1, 2, 3)]
    for entry in log:
        cores_up = {core_of(k) for k in entry["up"]} - {None}
        cores_down = {core_of(k) for k in entry["down"]} - {None}
        this, last = n - entry["round"], n + 1 - entry["round"]
        assert cores_up == {this}
        assert cores_down == {this, last} - {n}  # last round's aggregate of a now-frozen core goes down once
        assert {k for k in entry["up"] if core_of(k) is None} == {k for k in entry["down"] if core_of(k) is None}
    # every trained core learned: the zero-initialised last core goes first, or no other core gets a gradient
    backbone, _ = load_backbone("minilm", num_labels=2, num_hidden_layers=2)
    model = fedtt.inject(backbone, config.adapter)
    fresh = fedtt.adapter_state_dict(model)
    for core in (n - 1, n - 2, n - 3):
        ups = [k for k in saved if core_of(k) == core and ".up." in k]
        assert ups and all(not torch.equal(saved[k], fresh[k]) for k in ups), core
    full = sum(saved[k].numel() for k in model.fedtt_trainable)  # the file also holds the zero, untrained biases
    assert results["trainable_params"] == full
    assert all(r["params_up"] < 3 * full for r in results["rounds"])
    assert results["rounds"][0]["params_down"] == results["rounds"][0]["params_up"]
    assert results["rounds"][1]["params_down"] > results["rounds"][1]["params_up"]


def test_a_node_that_lost_its_state_ends_with_the_same_tensors_as_one_that_kept_it(tmp_path):
    config = load_config(None, FAST + ["federation.rounds=4", "freezing.policy='cyclic'"])
    runs = {}
    for name, wipe in (("kept", None), ("wiped", (1, 2))):
        log = []
        run_inprocess(server_app, recording_client_app(log, wipe), num_nodes=3,
                      run_config=run_config_for(config, str(tmp_path / name)))
        runs[name] = (json.loads((tmp_path / name / "results.json").read_text()), log,
                      load_file(tmp_path / name / "adapter/adapter_model.safetensors"))
    (kept, _, kept_adapter), (wiped, wiped_log, wiped_adapter) = runs["kept"], runs["wiped"]
    assert kept_adapter.keys() == wiped_adapter.keys()
    assert all(torch.equal(kept_adapter[k], wiped_adapter[k]) for k in kept_adapter)
    assert [r["validation"] for r in kept["rounds"]] == [r["validation"] for r in wiped["rounds"]]
    # round 3: the handshake found partition 1 back at the seeded init and sent it everything that changed
    third = {e["partition"]: e for e in wiped_log if e["round"] == 3}
    assert len(third[1]["down"]) > len(third[0]["down"])
    assert wiped["rounds"][2]["params_down"] > kept["rounds"][2]["params_down"]


def test_a_client_refuses_a_partial_payload_it_cannot_apply():
    config = load_config(None, FAST + ["federation.rounds=2"])
    exp = experiment(run_config_for(config, "/unused"))
    context = type("Ctx", (), {"state": RecordDict()})()
    partial = ConfigRecord({"full": False, "base-round": 3, "sync-round": 4})
    with pytest.raises(ValueError, match="builds on the global state after round 3, this node holds round 0"):
        real_client.merge_synced(exp, context, partial, {})
    first = ConfigRecord({"full": False, "base-round": 0, "sync-round": 1})
    name = exp.model.fedtt_trainable[0]
    merged = real_client.merge_synced(exp, context, first, {name: np.ones(exp.initial[name].shape, np.float32)})
    assert real_client.synced_round(context) == 1 and np.all(merged[name] == 1)
    assert set(merged) == set(exp.initial)  # the rest is the seeded init


def test_ffa_lora_a_never_changes_in_a_federation(tmp_path):
    config = load_config(None, FAST[:-1] + ["method='ffa-lora'", "federation.rounds=2"])
    results = run(config, tmp_path)
    assert results["rounds"][-1]["eval"]["loss"] != results["initial"]["test"]["loss"]  # B and the head trained
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    model, _ = load_backbone("minilm", num_labels=2, num_hidden_layers=2)
    fresh = fedtt.adapter_state_dict(fedtt.inject(model, config.adapter))
    a_keys = [k for k in saved if "lora_A" in k]
    assert a_keys and all(torch.equal(saved[k], fresh[k.replace("base_model.model.", "").replace(
        "lora_A.", "lora_A.default.")]) for k in a_keys)
    assert not all(torch.equal(saved[k], fresh[k.replace("base_model.model.", "").replace(
        "lora_B.", "lora_B.default.")]) for k in saved if "lora_B" in k)
