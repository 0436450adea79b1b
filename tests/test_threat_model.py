"""docs/privacy.md's threat-model table, line by line: what the server can and cannot reproduce or see, and what a
site's own privacy floor lets it refuse."""

from __future__ import annotations

import json

import conftest
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from safetensors.torch import load_file

from fedtt.config import load_config
from fedtt.engines.inprocess import InProcessGrid
from fedtt.federated import client_app as real_client
from fedtt.federated.server_app import REPRODUCIBLE_WARNING
from fedtt.federated.server_app import app as server_app
from fedtt.federated.task import run_config_for
from fedtt.privacy.policy import SitePolicy
from fedtt.run import run

DP = [*conftest.FAST, "task.max_eval_examples=20", "federation.rounds=1", "privacy.dp=true",
      "privacy.noise_multiplier=1.0"]


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_dp_noise_and_batches_come_from_each_clients_own_entropy_unless_reproducibility_is_asked_for(tmp_path):
    first = run(load_config(None, DP), tmp_path / "a")
    second = run(load_config(None, DP), tmp_path / "b")
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert any(not a[k].equal(b[k]) for k in a)  # same config, same seed: different noise and batches
    assert "warning" not in first["privacy"] and "warning" not in second["privacy"]
    reproducible = [*DP, "privacy.reproducible_noise=true"]
    third = run(load_config(None, reproducible), tmp_path / "c")
    run(load_config(None, reproducible), tmp_path / "d")
    c, d = adapter(tmp_path / "c"), adapter(tmp_path / "d")
    assert all(c[k].equal(d[k]) for k in c)
    assert third["privacy"]["warning"] == REPRODUCIBLE_WARNING and "NOT hold against the server" in REPRODUCIBLE_WARNING


def test_under_dp_no_clients_loss_reaches_the_server(tmp_path, server_inbox):
    seen = server_inbox
    results = run(load_config(None, DP), tmp_path)
    metrics = [dict(c["metrics"]) for c in seen if "arrays" in c.array_records]
    assert len(metrics) == 3 and not any("train_loss" in m for m in metrics)
    assert all(set(m) <= {"num-examples", "synced-round", "epsilon", "delta", "dp-steps", "noise-multiplier",
                          "sample-rate"} | {k for k in m if k.startswith("sq:")} for m in metrics)
    assert results["rounds"][0]["train_loss"] is None


def run_with_sites(tmp_path, config, node_configs: dict[int, dict], app=real_client.app):
    """The real ServerApp and ClientApp in process, partition i's node config extended by ``node_configs[i]``."""
    grid = InProcessGrid(app, config.federation.num_clients, run_config_for(config, str(tmp_path)))
    for context in grid.contexts.values():
        context.node_config.update(node_configs.get(int(context.node_config["partition-id"]), {}))
    context = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config_for(config, str(tmp_path)))
    server_app(grid=grid, context=context)
    return json.loads((tmp_path / "results.json").read_text())


def test_a_site_refuses_a_run_weaker_than_its_floor_and_the_run_names_it(tmp_path):
    config = load_config(None, [*DP[:-1], "privacy.target_epsilon=8.0"])
    results = run_with_sites(tmp_path, config, {0: {"site": "hospital-a", "max-epsilon": 3.0}})
    (refusal,) = [d for d in results["rounds"][0]["dropped"]]
    assert "site hospital-a refuses the run: it accepts epsilon <= 3, the run's privacy.target_epsilon is 8.0" \
        in refusal["reason"] and refusal["stage"] == "query.partition"
    assert results["rounds"][0]["partitions"] == [1, 2]  # the others trained


@pytest.mark.parametrize("floor, overrides, why", [
    ({"require-dp": True}, [], "it requires DP-SGD"),
    ({"require-secagg": True}, ["privacy.dp=true", "privacy.target_epsilon=3"], "requires secure aggregation"),
    ({"max-epsilon": 3.0}, ["privacy.dp=true", "privacy.noise_multiplier=1.0"], "privacy.target_epsilon is None"),
    ({"max-epsilon": 3.0}, ["privacy.dp=true", "privacy.target_epsilon=3", "privacy.reproducible_noise=true"],
     "reproducible_noise"),
    ({"max-delta": 1e-6}, ["privacy.dp=true", "privacy.target_epsilon=3", "privacy.delta=1e-5"], "delta <= 1e-06"),
])
def test_each_floor_refuses_what_is_weaker_and_accepts_what_meets_it(floor, overrides, why):
    policy = SitePolicy.of({"partition-id": 4, **floor})
    with pytest.raises(ValueError, match=why):
        policy.check(load_config(None, overrides))
    policy.check(load_config(None, ["privacy.dp=true", "privacy.target_epsilon=3", "privacy.delta=1e-7",
                                    "privacy.secure_aggregation=true", "federation.min_replies=3"]))
    assert policy.min_clients(load_config(None, [])) == 3
    assert SitePolicy.of({"secagg-min-clients": 7}).min_clients(load_config(None, [])) == 7


def test_a_restarted_site_keeps_its_spent_budget_from_its_own_record_and_the_server_cannot_lower_it(tmp_path):
    """Partition 0 forgets its state after round 1 (a restarted SuperNode). With ``dp-record`` in its node config
    it reads its steps back from its own disk, so it reports the epsilon of an uninterrupted run."""
    config = load_config(None, [*DP[:-1], "privacy.noise_multiplier=1.0", "federation.rounds=2"])
    records = {i: {"dp-record": str(tmp_path / f"site-{i}")} for i in range(3)}

    def restarting(msg, context):
        reply = real_client.train(msg, context)
        if context.node_config["partition-id"] == 0 and msg.content["config"]["server-round"] == 1:
            context.state = RecordDict()
        return reply

    steady = run_with_sites(tmp_path / "steady", config, records)
    restarted = run_with_sites(tmp_path / "restarted", config, {i: {"dp-record": str(tmp_path / f"again-{i}")}
                                                               for i in range(3)},
                               app=conftest.client_app_with(restarting))
    assert restarted["privacy"]["epsilon"]["0"] == pytest.approx(steady["privacy"]["epsilon"]["0"])
    assert restarted["rounds"][1]["epsilon"]["0"] > restarted["rounds"][0]["epsilon"]["0"]
    # a server reporting fewer steps than the site's own record does not lower what the site accounts
    from fedtt.federated.client_app import dp_record
    from fedtt.privacy.dp import LocalDP

    record = dp_record(records[0], config)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    dp = LocalDP.for_round(config.privacy, config.federation, context, 100, 0, torch.device("cpu"), 0,
                           record=record)
    assert dp.prior_steps == json.loads(record.read_text())["steps"] == 4 and dp.sigma == 1.0
