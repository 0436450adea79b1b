"""Cross-device federations: Poisson-sampled clients under client-level DP, simulated drop-outs, the per-round
user-level epsilon in results.json (issue 30's wiring; the mechanism's own tests: test_client_dp.py)."""

from __future__ import annotations

import conftest
import numpy as np
import pytest

from fedtt.config import load_config
from fedtt.federated.codec import unpack
from fedtt.privacy.client_dp import ClientDP
from fedtt.run import run

XDEV = [*conftest.FAST, "task.max_eval_examples=20", "federation.local_steps=1", "federation.num_clients=20",
        "federation.clients_per_round=6", "federation.rounds=3", "federation.weighting='uniform'"]
CLIENT_DP = ["privacy.client_dp=true", "privacy.client_dp_epsilon=8", "privacy.client_dp_clip=0.05"]


def test_client_level_dp_clips_every_upload_and_reports_the_user_level_epsilon_each_round(tmp_path, server_inbox):
    config = load_config(None, XDEV + CLIENT_DP)
    results = run(config, tmp_path)
    plan = ClientDP.of(config)
    uploads = [c for c in server_inbox if "wire" in c.config_records]
    assert uploads  # the clients' uploads, each its whole update clipped to C before it left
    for content in uploads:
        update = unpack(content["arrays"], content["wire"])
        norm = np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values()))
        assert norm <= 0.05 * (1 + 1e-6)
        assert set(content["metrics"]) == {"num-examples", "synced-round"}  # no loss, no update size
    for entry in results["rounds"]:
        assert entry["client_dp"]["epsilon"] == pytest.approx(plan.epsilon(entry["round"]))
        assert entry["client_dp"]["noise_std"] == pytest.approx(plan.sigma * 0.05)
        assert entry["train_loss"] is None
    assert results["rounds"][-1]["client_dp"]["epsilon"] <= 8.0
    sampled = [e["sampled"] for e in results["rounds"]]
    assert len(set(sampled)) > 1 or sampled[0] != 6  # Poisson sampling: the round's size varies around 6


def test_simulated_drop_outs_are_counted_and_the_rest_aggregate(tmp_path):
    results = run(load_config(None, XDEV + ["federation.dropout_rate=0.5", "federation.rounds=2"]), tmp_path)
    dropped = [d for e in results["rounds"] for d in e["dropped"]]
    assert dropped and all("simulated drop-out" in d["reason"] for d in dropped)
    for entry in results["rounds"]:
        assert entry["clients"] + len(entry["dropped"]) == entry["sampled"] == 6
    again = run(load_config(None, XDEV + ["federation.dropout_rate=0.5", "federation.rounds=2"]), tmp_path / "b")
    assert [e["partitions"] for e in again["rounds"]] == [e["partitions"] for e in results["rounds"]]  # seeded


def test_client_level_dp_refuses_what_it_cannot_account_for():
    with pytest.raises(ValueError, match="weighting = 'uniform'"):
        load_config(None, [*CLIENT_DP, "federation.num_clients=20"])
    with pytest.raises(ValueError, match="client_dp_placement = 'server'"):
        load_config(None, [*CLIENT_DP, "federation.weighting='uniform'", "privacy.client_dp_adaptive=true",
                           "privacy.client_dp_placement='distributed'", "privacy.secure_aggregation=true",
                           "federation.min_replies=3"])
