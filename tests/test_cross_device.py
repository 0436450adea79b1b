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


EVERY_2 = [*XDEV, "task.max_train_examples=200", "federation.num_clients=10", "federation.clients_per_round=3",
           "federation.eval_every=2", "federation.lr_schedule=constant"]


def _stop_before_evaluating(round_: int):
    """RunRecorder.evaluates, raising at ``round_`` (the run stops with the round before it checkpointed)."""
    from fedtt.federated.server_app import RunRecorder

    real = RunRecorder.evaluates

    def evaluates(self, server_round):
        if server_round == round_:
            raise KeyboardInterrupt(f"stopped before evaluating round {round_}")
        return real(self, server_round)

    return evaluates


def test_evaluation_every_k_rounds_selects_among_the_evaluated_and_counts_bytes_every_round(tmp_path, monkeypatch):
    from fedtt.federated.server_app import RunRecorder
    from fedtt.frontier import to_target

    results = run(load_config(None, [*EVERY_2, "federation.rounds=5"]), tmp_path / "whole")
    rounds = results["rounds"]
    assert "initial" in results and [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert [r["round"] for r in rounds if "eval" in r] == [2, 4, 5]  # every 2nd and the last
    assert [r["round"] for r in rounds if "validation" in r] == [2, 4, 5]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["clients"] == 3 for r in rounds)
    assert results["total_bytes"] == sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
    evaluated = [r for r in rounds if "eval" in r]
    best = max(evaluated, key=lambda r: (r["validation"]["accuracy"], -r["round"]))
    assert results["selected"]["round"] == best["round"] and results["selected"]["test"] == best["eval"]
    assert results["final"] == rounds[-1]["eval"]
    assert to_target(results, 0.0)[0] == 0.0  # round 0 reaches any target; the gaps do not break the reader
    assert to_target(results, best["validation"]["accuracy"])[1] == pytest.approx(
        next(r for r in evaluated if r["validation"]["accuracy"] >= best["validation"]["accuracy"])["eval"]["accuracy"])
    table = (tmp_path / "whole" / "results.md").read_text()
    assert "| 3 | 3 |" in table and (tmp_path / "whole" / "curves.png").is_file()
    # A run stopped after round 3 (not evaluated) resumes from it and ends as the uninterrupted one.
    monkeypatch.setattr(RunRecorder, "evaluates", _stop_before_evaluating(4))
    with pytest.raises(KeyboardInterrupt):
        run(load_config(None, [*EVERY_2, "federation.rounds=5"]), tmp_path / "part")
    monkeypatch.undo()
    resumed = run(load_config(None, [*EVERY_2, "federation.rounds=5"]), tmp_path / "part", resume=True)
    assert [r.get("eval") for r in resumed["rounds"]] == [r.get("eval") for r in rounds]
    assert resumed["selected"] == results["selected"]
