"""Short real federations on real MiniLM and real bundled data, on real Flower: learning, outputs, bytes,
the validation-selected round, seeds, cross-device sampling, bad replies, failing loudly, local epochs."""

import json
import logging

import conftest
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import load_file

import fedtt
import fedtt.federated.task as task_module
from fedtt.cli import main
from fedtt.config import load_config
from fedtt.engines.inprocess import run_inprocess
from fedtt.federated import client_app as real_client
from fedtt.federated.codec import pack, unpack
from fedtt.federated.freezing import factor_groups
from fedtt.federated.server_app import app as server_app
from fedtt.federated.server_app import select
from fedtt.federated.task import run_config_for
from fedtt.learning.train import learning_rate, local_batches
from fedtt.models import load_backbone
from fedtt.run import run

FAST = [*conftest.FAST, "task.max_eval_examples=100"]
# Spam is learnable in a few rounds by the full MiniLM: the run every output test reads.
SPAM = ["task.name='sms_spam'", "model.max_length=32", "task.max_eval_examples=200", "federation.batch_size=16",
        "federation.local_steps=10", "federation.rounds=3", "federation.lr=1e-2", "federation.lr_schedule='constant'",
        "federation.partition='iid'"]


def config(*overrides, base=FAST):
    return load_config(None, list(base) + list(overrides))


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spam")
    return run(config(base=SPAM), out), out


def test_a_federation_learns_and_writes_its_outputs(spam_run):
    results, out = spam_run
    initial, final = results["initial"]["validation"], results["rounds"][-1]["validation"]
    assert initial["macro_f1"] < 0.5  # the majority class (ham) only
    assert final["macro_f1"] > 0.8 and results["final"]["macro_f1"] > 0.8  # spam is found, on validation and test
    assert {"results.json", "results.md", "curves.png", "config.toml", "adapter", "checkpoint.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "results.json").read_text()) == results
    assert results["status"] == "finished" and results["selection"]["metric"] == "accuracy"
    assert results["test_examples"] == results["validation_examples"] == 200


def test_params_and_bytes_are_what_the_clients_sent(spam_run):
    results, out = spam_run
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    model = fedtt.inject(load_backbone("minilm", num_labels=2)[0], config(base=SPAM).adapter)
    # the saved adapter also holds the untrained (zero) adapter biases, so that it loads on its own
    assert results["trainable_params"] == sum(adapter[k].numel() for k in model.fedtt_trainable)
    assert set(model.fedtt_trainable) < set(adapter)
    arrays, index = pack({k: adapter[k].numpy() for k in model.fedtt_trainable}, "float32")  # the model's order
    payload = arrays.count_bytes() + index.count_bytes()
    groups = sorted({str(g) for g in factor_groups(model).values() if g is not None})  # one norm per group
    assert groups == ["0", "1", "2", "3", "4"]  # the default trains no adapter biases
    metrics = MetricRecord({"train_loss": 0.5, "num-examples": 1, "synced-round": 0,
                            **{f"sq:{g}": 0.1 for g in groups}}).count_bytes()
    config_down = ConfigRecord({"server-round": 1, "lr": 0.1, "full": True, "base-round": 0, "sync-round": 0,
                                "dp-prior-steps": 0}).count_bytes()
    for entry in results["rounds"]:
        assert entry["clients"] == 3
        assert entry["params_up"] == entry["params_down"] == 3 * results["trainable_params"]
        # round 1 also asks each node its partition id and example count once (an empty query, two ints back)
        query = 3 * (len("partition-id") + len("num-examples") + 16) if entry["round"] == 1 else 0
        assert entry["bytes_up"] == 3 * (payload + metrics) + query
        assert entry["bytes_down"] == 3 * (payload + config_down)
    assert results["total_bytes"] == sum(r["bytes_up"] + r["bytes_down"] for r in results["rounds"])


def test_the_selected_round_is_the_validation_argmax(spam_run):
    results, _ = spam_run
    rounds = results["rounds"]
    best = max(r["validation"]["accuracy"] for r in rounds)
    first = next(r for r in rounds if r["validation"]["accuracy"] == best)
    assert results["selected"]["round"] == first["round"]
    assert results["selected"]["test"] == first["eval"] and results["selected"]["validation"] == first["validation"]
    assert results["final"] == rounds[-1]["eval"]
    fake = [{"round": 1, "validation": {"loss": 0.5}, "eval": {"loss": 9}},
            {"round": 2, "validation": {"loss": 0.2}, "eval": {"loss": 9}},
            {"round": 3, "validation": {"loss": 0.2}, "eval": {"loss": 0}}]
    assert select(fake, "loss", higher=False)["round"] == 2  # lower is better; ties: the earliest


def test_changing_the_test_labels_changes_no_choice(tmp_path, monkeypatch):
    base = config("method='lora'", "federation.rounds=3", "federation.local_steps=4", "federation.lr=1e-2")
    plain = run(base, tmp_path / "plain")
    conftest.flip_test_labels(monkeypatch)
    other = run(base, tmp_path / "flipped")
    task_module._build_experiment.cache_clear()
    assert other["selected"]["round"] == plain["selected"]["round"]
    assert [r["validation"] for r in other["rounds"]] == [r["validation"] for r in plain["rounds"]]
    assert [r["eval"]["accuracy"] for r in other["rounds"]] == pytest.approx(
        [1 - r["eval"]["accuracy"] for r in plain["rounds"]])


def test_same_seeds_same_run_and_the_data_seed_is_separate(tmp_path):
    def metrics(r):
        return [(x["validation"], x["eval"], x["train_loss"], x["bytes_up"]) for x in r["rounds"]]

    first = run(config("federation.rounds=2", "federation.partition='dirichlet'"), tmp_path / "a")
    again = run(config("federation.rounds=2", "federation.partition='dirichlet'"), tmp_path / "b")
    training = run(config("federation.rounds=2", "federation.partition='dirichlet'", "seed=1", "data_seed=0"),
                   tmp_path / "c")
    data = run(config("federation.rounds=2", "federation.partition='dirichlet'", "data_seed=1"), tmp_path / "d")
    assert metrics(again) == metrics(first)
    a, b = (load_file(tmp_path / d / "adapter/adapter_model.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another training seed: the same split and clients, another init and batches
    assert training["client_label_histograms"] == first["client_label_histograms"]
    assert metrics(training) != metrics(first)
    # another data seed: other clients
    assert data["client_label_histograms"] != first["client_label_histograms"] and data["seed"] == 0


def test_a_library_run_leaves_the_global_rngs_alone(tmp_path):
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    run(config("federation.rounds=1"), tmp_path)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_cross_device_200_clients_10_per_round(tmp_path):
    results = run(config("federation.num_clients=200", "federation.clients_per_round=10", "federation.rounds=2",
                         "federation.local_steps=1"), tmp_path)
    per_client = results["trainable_params"]
    assert [r["clients"] for r in results["rounds"]] == [10, 10]
    assert all(len(set(r["partitions"])) == 10 and set(r["partitions"]) <= set(range(200)) for r in results["rounds"])
    assert results["rounds"][0]["partitions"] != results["rounds"][1]["partitions"]
    assert all(r["params_up"] == 10 * per_client for r in results["rounds"])
    # round 1 also asked each of the 200 nodes once for its partition id (an empty query, an int back)
    assert results["rounds"][0]["bytes_down"] == results["rounds"][1]["bytes_down"]
    assert results["rounds"][0]["bytes_up"] - results["rounds"][1]["bytes_up"] == 200 * (len("partition-id") + 8
                                                                                         + len("num-examples") + 8)
    assert results["clients_per_round"] == 10 and len(results["client_label_histograms"]) == 200


def corrupting_client_app(corrupt):
    """The real ClientApp, with partition 1's update tampered with by ``corrupt(update)`` before it leaves."""
    def train(msg, context):
        reply = real_client.train(msg, context)
        if context.node_config["partition-id"] == 1:
            update = unpack(reply.content["arrays"], reply.content["wire"])
            arrays, index = pack(corrupt(update), "float32")
            reply.content = RecordDict({"arrays": arrays, "wire": index, "metrics": reply.content["metrics"]})
        return reply

    return conftest.client_app_with(train)


def first_wrong_shape(update):
    name = next(iter(update))
    return {**update, name: np.zeros(3, dtype=np.float32)}


def last_nan(update):
    name = list(update)[-1]
    return {**update, name: np.full_like(update[name], np.nan)}


@pytest.mark.parametrize("corrupt, reason", [(first_wrong_shape, "has shape (3,)"), (last_nan, "non-finite")])
def test_a_bad_reply_is_dropped_logged_and_the_run_continues(corrupt, reason, tmp_path, caplog):
    cfg = config("federation.rounds=2", "federation.local_steps=1")
    with caplog.at_level(logging.WARNING, logger="fedtt"):
        run_inprocess(server_app, corrupting_client_app(corrupt), num_nodes=3,
                      run_config=run_config_for(cfg, str(tmp_path)))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [2, 2]
    assert all(len(r["dropped"]) == 1 and reason in r["dropped"][0]["reason"] for r in results["rounds"])
    assert sum("dropped the reply of node 1001" in m for m in caplog.messages) == 2
    # what came up is counted, the dropped reply included: its values as well as its bytes
    sent = results["rounds"][1]["params_up"]
    assert sent == 3 * results["trainable_params"] if corrupt is last_nan else sent < 3 * results["trainable_params"]


def test_a_run_in_which_every_client_fails_exits_non_zero_with_their_error(tmp_path, capsys):
    argv = ["run", "--out", str(tmp_path / "run"), "--set", "federation.rounds=2"] + [
        a for o in FAST + ["privacy.dp=true", "privacy.noise_multiplier=0.3", "privacy.target_epsilon=0.01"]
        for a in ("--set", o)]
    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines: the one-line verdict
    assert last.startswith("fedtt: the run did not train: ") and "privacy budget exhausted" in last, last
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "privacy budget exhausted" in results["error"]
    assert all(r["clients"] == 0 and len(r["dropped"]) == 3 for r in results["rounds"])


def test_a_run_whose_clients_all_raise_fails_with_the_first_error(tmp_path):
    def broken(msg, context):
        raise RuntimeError("the GPU caught fire")

    app = conftest.client_app_with(broken)
    cfg = config("federation.rounds=1")
    run_inprocess(server_app, app, num_nodes=3, run_config=run_config_for(cfg, str(tmp_path)))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and "the GPU caught fire" in results["error"]
    assert results["rounds"][0]["dropped"][0]["reason"].startswith("client failed")


def test_local_epochs_see_each_example_once_per_epoch():
    generator = torch.Generator().manual_seed(0)
    one = local_batches(10, steps=0, epochs=1, batch_size=4, generator=generator)
    assert [len(b) for b in one] == [4, 4, 2] and sorted(i for b in one for i in b) == list(range(10))
    two = local_batches(10, steps=0, epochs=2, batch_size=4, generator=generator)
    assert [len(b) for b in two] == [4, 4, 2, 4, 4, 2]
    for epoch in (two[:3], two[3:]):
        assert sorted(i for b in epoch for i in b) == list(range(10))
    steps = local_batches(10, steps=5, epochs=0, batch_size=4, generator=generator)
    assert [len(b) for b in steps] == [4] * 5
    assert [len(b) for b in local_batches(3, steps=2, epochs=0, batch_size=8, generator=generator)] == [3, 3]


def test_the_learning_rate_schedule():
    def lrs(*overrides):
        cfg = load_config(None, ["federation.lr=1.0", "federation.rounds=5", *overrides])
        return [round(learning_rate(cfg, t), 6) for t in range(1, 6)]

    assert lrs("federation.lr_schedule='constant'") == [1.0] * 5
    assert lrs() == lrs("federation.lr_schedule='cosine'")  # the default, chosen on validation
    assert lrs("federation.lr_schedule='linear'") == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert lrs("federation.warmup_rounds=2", "federation.lr_schedule='linear'") == [0.333333, 0.666667, 1.0,
                                                                                    0.666667, 0.333333]
    cosine = lrs("federation.lr_schedule='cosine'")
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True) and cosine[-1] > 0


def test_settings_that_can_never_work_are_refused_at_load():
    with pytest.raises(ValueError, match="federation.min_replies = 10 can never be met with 3 clients"):
        load_config(None, ["federation.min_replies=10"])
    with pytest.raises(ValueError, match="federation.weight_decay = -1"):
        load_config(None, ["federation.weight_decay=-1"])


@pytest.mark.parametrize("method", ["fedtt", "lora"])
def test_a_head_only_round_trains_and_sends_the_head_alone(tmp_path, method):
    results = run(config(f"method='{method}'", "federation.rounds=2", "federation.head_only_rounds=1"), tmp_path)
    head = conftest.head_values(config(f"method='{method}'").adapter)
    assert 0 < head < results["trainable_params"]
    first, second = results["rounds"]
    assert first["params_up"] == first["params_down"] == 3 * head  # the adapter neither trains nor travels
    assert second["params_up"] == second["params_down"] == 3 * results["trainable_params"]
