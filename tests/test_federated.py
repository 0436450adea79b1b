"""Short real federations: truncated MiniLM (2 pretrained layers), real Rotten Tomatoes, real Flower."""

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedtt.config import load_config
from fedtt.engines.inprocess import run_inprocess
from fedtt.federated import client_app as real_client
from fedtt.federated.server_app import app as server_app
from fedtt.federated.strategy import check_reply
from fedtt.federated.task import run_config_for
from fedtt.run import run

FAST = ["model.num_hidden_layers=2", "model.max_length=32", "task.max_eval_examples=300",
        "federation.batch_size=16", "federation.local_steps=8", "federation.lr=3e-3"]


def fast_config(*overrides):
    return load_config(None, FAST + list(overrides))


@pytest.fixture(scope="module")
def fedtt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fedtt")
    return run(fast_config("federation.rounds=4", "federation.partition=iid"), out), out


def test_accuracy_rises_and_outputs_are_written(fedtt_run):
    results, out = fedtt_run
    accuracies = [r["eval"]["accuracy"] for r in results["rounds"]]
    assert len(accuracies) == 4
    assert results["best"]["accuracy"] >= results["initial"]["accuracy"] + 0.1
    assert accuracies[-1] > 0.6
    assert {"results.json", "results.md", "curves.png", "config.toml", "adapter"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "results.json").read_text()) == results
    assert results["client_label_histograms"] and sum(map(sum, results["client_label_histograms"])) > 0


def test_params_and_bytes_are_what_the_clients_sent(fedtt_run):
    results, out = fedtt_run
    adapter = load_file(out / "adapter" / "adapter.safetensors")
    assert results["trainable_params"] == sum(t.numel() for t in adapter.values())
    # What one client sends: every trainable tensor as Flower serializes it (.npy bytes + key), plus metrics.
    one_client = ArrayRecord({k: Array(v.numpy()) for k, v in adapter.items()})
    npy_bytes = sum(len(Array(v.numpy()).data) + len(k) for k, v in adapter.items())
    assert one_client.count_bytes() == npy_bytes
    metrics = MetricRecord({"train_loss": 0.5, "num-examples": 1, "partition-id": 0}).count_bytes()
    config_down = ConfigRecord({"server-round": 1}).count_bytes()
    for entry in results["rounds"]:
        assert entry["clients"] == 3
        assert entry["params_up"] == entry["params_down"] == 3 * results["trainable_params"]
        assert entry["bytes_up"] == 3 * (npy_bytes + metrics)
        assert entry["bytes_down"] == 3 * (npy_bytes + config_down)
    assert results["total_bytes"] == sum(r["bytes_up"] + r["bytes_down"] for r in results["rounds"])


def test_same_seed_same_run_different_seed_different_run(fedtt_run, tmp_path):
    results, out = fedtt_run
    again = run(fast_config("federation.rounds=4", "federation.partition=iid"), tmp_path / "again")
    other = run(fast_config("federation.rounds=4", "federation.partition=iid", "seed=1"), tmp_path / "other")

    def metrics(r):
        return [(x["eval"], x["train_loss"], x["bytes_up"]) for x in r["rounds"]]

    assert metrics(again) == metrics(results)
    assert metrics(other) != metrics(results)
    a, b = load_file(out / "adapter/adapter.safetensors"), load_file(tmp_path / "again/adapter/adapter.safetensors")
    c = load_file(tmp_path / "other/adapter/adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cross_device_200_clients_10_per_round(tmp_path):
    results = run(fast_config("federation.num_clients=200", "federation.clients_per_round=10", "federation.rounds=2",
                              "federation.partition=iid", "federation.local_steps=2"), tmp_path)
    per_client = results["trainable_params"]
    assert [r["clients"] for r in results["rounds"]] == [10, 10]
    assert all(len(set(r["partitions"])) == 10 and set(r["partitions"]) <= set(range(200)) for r in results["rounds"])
    assert results["rounds"][0]["partitions"] != results["rounds"][1]["partitions"]
    assert all(r["params_up"] == 10 * per_client for r in results["rounds"])
    # round 1 also asked each of the 200 nodes once for its partition id (counted: an empty request, an int back)
    assert results["rounds"][0]["bytes_down"] == results["rounds"][1]["bytes_down"]
    assert results["rounds"][0]["bytes_up"] - results["rounds"][1]["bytes_up"] >= 200 * len("partition-id")
    assert results["clients_per_round"] == 10 and len(results["client_label_histograms"]) == 200


def corrupting_client_app(corrupt):
    """The real ClientApp, with partition 1's reply tampered with by ``corrupt(arrays)`` before it leaves."""
    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = real_client.train(msg, context)
        if context.node_config["partition-id"] == 1:
            arrays = reply.content["arrays"]
            tampered = corrupt({k: arrays[k].numpy() for k in arrays})
            reply.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in tampered.items()}),
                                        "metrics": reply.content["metrics"]})
        return reply

    return app


def first_wrong_shape(arrays):
    name = next(iter(arrays))
    return {**arrays, name: np.zeros(3, dtype=np.float32)}


def last_nan(arrays):
    name = list(arrays)[-1]
    return {**arrays, name: np.full_like(arrays[name], np.nan)}


@pytest.mark.parametrize("corrupt, reason", [(first_wrong_shape, "expected float32"), (last_nan, "non-finite")])
def test_a_bad_reply_is_dropped_logged_and_the_run_continues(corrupt, reason, tmp_path, caplog):
    config = fast_config("federation.rounds=2", "federation.local_steps=2", "federation.partition=iid")
    with caplog.at_level(logging.WARNING, logger="fedtt"):
        run_inprocess(server_app, corrupting_client_app(corrupt), num_nodes=3,
                      run_config=run_config_for(config, str(tmp_path)))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [2, 2]
    assert all(len(r["dropped"]) == 1 and reason in r["dropped"][0]["reason"] for r in results["rounds"])
    assert sum("dropped the reply of node 1001" in m for m in caplog.messages) == 2
    assert results["rounds"][0]["params_up"] == 2 * results["trainable_params"]


def test_check_reply_names_each_problem():
    expected = {"a": (2, 3), "b": (4,)}

    def reply(arrays, examples=10):
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                           "metrics": MetricRecord({"train_loss": 0.1, "num-examples": examples})})

    good = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}
    assert check_reply(reply(good), expected) is None
    assert "missing ['b']" in check_reply(reply({"a": good["a"]}), expected)
    assert "unknown ['c']" in check_reply(reply({**good, "c": good["b"]}), expected)
    assert "float64" in check_reply(reply({**good, "b": np.ones(4)}), expected)
    assert "non-finite" in check_reply(reply({**good, "b": np.array([1, np.inf, 0, 0], np.float32)}), expected)
    assert "num-examples is 0" in check_reply(reply(good, examples=0), expected)
    bad_loss = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in good.items()}),
                           "metrics": MetricRecord({"train_loss": float("nan"), "num-examples": 3})})
    assert "train_loss is nan" in check_reply(bad_loss, expected)
    assert "lacks" in check_reply(RecordDict({"arrays": ArrayRecord()}), expected)
