"""A killed or finished run continues from its checkpoint exactly: same rounds, same numbers, same adapter."""

import json
import os
import signal
import subprocess
import sys
import time

import conftest
import pytest
import torch
from safetensors.torch import load_file

from fedtt.config import load_config
from fedtt.federated.checkpoint import FILE as CHECKPOINT
from fedtt.run import run

FAST = conftest.FAST
# Extending a run equals a longer one only when the rate does not decay over the planned rounds.
EXTEND = [*FAST, "federation.lr_schedule=constant"]
SETUPS = {"fedtt+ adaptive": ["method=fedtt+", "freezing.policy=adaptive", "freezing.patience=1"],
          "cross-device": ["federation.num_clients=6", "federation.clients_per_round=2"],
          "dp": ["privacy.dp=true", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=20.0",
                 "privacy.reproducible_noise=true"]}  # equal runs need the same noise (each client's own otherwise)


# The first resumed round re-sends FedTT+ tensors that nodes lost with their process and asks cross-device nodes
# their partition ids again: more bytes, the same parameters trained.
RESYNC = ("params_down", "bytes_down", "bytes_up")


def _comparable(results: dict) -> dict:
    rounds = [{k: v for k, v in r.items() if k not in (*RESYNC, "seconds")} for r in results["rounds"]]
    return {**{k: v for k, v in results.items() if k not in ("wall_seconds", "total_bytes")}, "rounds": rounds}


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
def test_a_run_extended_from_its_checkpoint_equals_an_uninterrupted_run(tmp_path, setup):
    whole = run(load_config(None, EXTEND + setup + ["federation.rounds=3"]), tmp_path / "whole")
    part = run(load_config(None, EXTEND + setup + ["federation.rounds=2"]), tmp_path / "part")
    assert [r["round"] for r in part["rounds"]] == [1, 2]
    resumed = run(load_config(None, EXTEND + setup + ["federation.rounds=3"]), tmp_path / "part", resume=True)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert _comparable(resumed) == _comparable(whole)  # metrics, uplink bytes, sampled partitions, frozen cores
    for key in RESYNC:
        assert [r[key] for r in resumed["rounds"][:2]] == [r[key] for r in whole["rounds"][:2]], key
        assert resumed["rounds"][2][key] >= whole["rounds"][2][key], key
    assert resumed["wall_seconds"] >= part["wall_seconds"]
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "privacy" in whole:  # every client's epsilon is the whole run's, as if it had not stopped
        assert resumed["privacy"]["epsilon"] == whole["privacy"]["epsilon"]
        assert [r["epsilon"] for r in resumed["rounds"]] == [r["epsilon"] for r in whole["rounds"]]


def test_resume_refuses_what_would_not_continue_the_same_run(tmp_path):
    config = load_config(None, FAST + ["federation.rounds=1"])
    with pytest.raises(FileNotFoundError, match="no checkpoint.safetensors there"):
        run(config, tmp_path, resume=True)
    run(config, tmp_path)
    with pytest.raises(ValueError, match=r"already finished 1 of 1 rounds; pass --set federation.rounds=N"):
        run(config, tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"config changed in federation.lr \(0.01 -> 0.5\)"):
        run(load_config(None, FAST + ["federation.rounds=2", "federation.lr=0.5"]), tmp_path, resume=True)
    (tmp_path / CHECKPOINT).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is damaged"):
        run(load_config(None, FAST + ["federation.rounds=2"]), tmp_path, resume=True)


def test_a_killed_fedtt_run_resumes_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedtt.cli", "run", "--out", str(out), *(f"--set={o}" for o in FAST),
           "--set=federation.rounds=3", "--set=federation.local_steps=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / CHECKPOINT).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # after round 1 was saved, in the middle of round 2 (or later)
    process.wait()
    done = json.loads((out / "results.json").read_text())["rounds"]
    assert 1 <= len(done) < 3, "the run was not killed mid-way"
    resumed = subprocess.run([sys.executable, "-m", "fedtt.cli", "run", "--out", str(out), "--resume"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert results["rounds"][0] == done[0]  # kept, not redone
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
