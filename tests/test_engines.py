"""The in-process engine and Flower's simulation engine (Ray) run the same apps to the same results.

Same config and seed: per-round accuracy, loss, parameter and byte counts and the final adapter agree
(floats within 1e-5; every Ray actor builds its own experiment from the run config). No Ray process may
outlive the run.
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context
from flwr.common.config import get_fused_config_from_dir, get_project_config, validate_config
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
from flwr.supercore.run import Run
from safetensors.torch import load_file

from fedtt.config import load_config
from fedtt.engines.simulation import backend_config, write_app_dir
from fedtt.federated.task import config_from_run_config, run_config_for
from fedtt.run import run

TINY = ["model.num_hidden_layers=2", "model.max_length=32", "federation.num_clients=3", "federation.rounds=2",
        "federation.local_steps=2", "federation.lr=3e-3", "task.max_eval_examples=100"]
TOL = 1e-5


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _processes() -> dict[int, str]:
    return {int(p.name): _cmdline(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


@pytest.fixture
def no_ray_left(monkeypatch):
    """Ray's session lives in a fresh temp dir; afterwards no Ray process of this test may be alive.

    A leftover is a new process that descends from this one, names our Ray temp dir (GCS, raylet,
    agents) or is a Ray worker (``ray::...``) that was not running before.
    """
    ray_tmp = tempfile.mkdtemp(prefix="fedtt-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    before = set(_processes())
    yield
    me, leftovers = os.getpid(), {}
    for _ in range(60):  # Ray's shutdown is asynchronous for a few processes
        leftovers = {pid: cmd for pid, cmd in _processes().items() if pid not in before and cmd and (
            ray_tmp in cmd or cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd
            or _descends_from(pid, me))}
        if not leftovers:
            break
        time.sleep(0.5)
    assert not leftovers, f"Ray processes left running: {leftovers}"
    shutil.rmtree(ray_tmp, ignore_errors=True)


CROSS_DEVICE = ["federation.num_clients=6", "federation.clients_per_round=2"]
# Cross-silo: FedTT+ (partial payloads, the handshake) under secure aggregation and DP, so every query stage
# crosses Ray too
SECURE = ["method='fedtt+'", "privacy.secure_aggregation=true", "federation.min_replies=3", "privacy.dp=true",
          "privacy.noise_multiplier=1.0", "privacy.reproducible_noise=true"]  # else each client's noise is its own


@pytest.fixture
def one_thread():
    """Ray gives each ClientApp actor one CPU (one torch thread); in-process training must sum in the same order.

    With two threads the float sums differ in the last bits and Adam, which divides by the gradient's size,
    turns that into differences of ~1e-4 in a few tensors after two rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("federation", [SECURE, CROSS_DEVICE], ids=["cross-silo-secure", "cross-device"])
def test_flower_sim_matches_inprocess(tmp_path, no_ray_left, one_thread, federation):
    """Cross-device too: the server samples partitions, so Flower's random node ids do not change who trains."""
    inprocess = run(load_config(None, TINY + federation), tmp_path / "inprocess")
    sim = run(load_config(None, TINY + federation + ["federation.engine=flower-sim"]), tmp_path / "sim")
    per_round = 2 if federation is CROSS_DEVICE else 3

    assert (inprocess["engine"], sim["engine"]) == ("inprocess", "flower-sim")
    for key in ("trainable_params", "client_label_histograms", "num_clients", "clients_per_round",
                "label_names"):
        assert sim[key] == inprocess[key], key
    for split in ("validation", "test"):
        for key in ("accuracy", "loss", "macro_f1"):
            assert sim["initial"][split][key] == pytest.approx(inprocess["initial"][split][key], abs=TOL), key
    assert len(sim["rounds"]) == len(inprocess["rounds"]) == 2
    for a, b in zip(inprocess["rounds"], sim["rounds"], strict=True):
        for key in ("round", "clients", "sampled", "partitions", "params_up", "params_down", "bytes_up",
                    "bytes_down", "groups", "dropped"):
            assert b[key] == a[key], (a["round"], key)
        assert b["clients"] == per_round and len(set(b["partitions"])) == per_round and not b["dropped"]
        assert b["train_loss"] == (None if a["train_loss"] is None else pytest.approx(a["train_loss"], abs=TOL))
        for split in ("validation", "eval"):
            for key in ("accuracy", "loss", "macro_f1"):
                assert b[split][key] == pytest.approx(a[split][key], abs=TOL), (a["round"], split, key)
    assert sim["total_bytes"] == inprocess["total_bytes"]
    assert sim["selected"]["round"] == inprocess["selected"]["round"]

    adapter_a = load_file(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors")
    adapter_b = load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys() and adapter_a
    for name in adapter_a:
        torch.testing.assert_close(adapter_b[name], adapter_a[name], rtol=0, atol=TOL, msg=name)
    assert sim["rounds"][-1]["eval"]["loss"] != sim["initial"]["test"]["loss"]  # the federation trained
    assert 'engine = "flower-sim"' in (tmp_path / "sim" / "config.toml").read_text()


def test_flower_fuses_the_run_config_each_supernode_sees(tmp_path):
    """What the simulation runtime gives every virtual SuperNode as context.run_config (no Ray needed)."""
    config = load_config(None, TINY + ["federation.engine=flower-sim"])
    run_config = {**run_config_for(config, str(tmp_path / "out")), "engine": "flower-sim"}
    app_dir = write_app_dir(tmp_path / "app", run_config)
    flower_run = Run.create_empty(run_id=7)
    flower_run.override_config = dict(run_config)
    store = DeprecatedRunInfoStore(node_id=42, node_config={"partition-id": 0, "num-partitions": 3})
    store.register_context(run_id=7, run=flower_run, app_dir=str(app_dir))
    context: Context = store.retrieve_context(7)
    assert context.run_config == run_config
    assert config_from_run_config(context.run_config) == config


def test_pyproject_is_a_flower_app_whose_default_run_config_is_the_demo(tmp_path, monkeypatch):
    """`flwr run .` reads [tool.flwr.app]; its config is an experiment file plus `--set`-style overrides."""
    root = Path(__file__).resolve().parents[1]
    pyproject = get_project_config(root)  # Flower's own validation of the app table
    valid, errors, _ = validate_config(pyproject, check_module=True, project_dir=root)
    assert valid, errors
    overrides = {"overrides": "federation.rounds=2 'model.num_hidden_layers=2'"}  # shell-style quoting works
    run_config = get_fused_config_from_dir(root, overrides)
    assert run_config["engine"] == "flower-sim" and run_config["out-dir"]
    demo = load_config(root / "configs" / "demo.toml", ["federation.rounds=2", "model.num_hidden_layers=2"])
    monkeypatch.chdir(tmp_path)  # a relative config-file is also found in the app directory on sys.path,
    monkeypatch.syspath_prepend(str(root))  # where `flwr run` installs the app (its FAB)
    assert config_from_run_config(run_config) == demo
    with pytest.raises(ValueError, match="neither 'fedtt-config' nor 'config-file'"):
        config_from_run_config({"out-dir": "x"})


def test_one_cpu_per_client_and_at_most_one_actor_per_core():
    config = backend_config(num_nodes=3)
    cpus = config["client_resources"]["num_cpus"]
    assert cpus == 1 and isinstance(cpus, int)  # an int, as Flower's CLI requires (notes G1)
    assert 1 <= config["init_args"]["num_cpus"] <= min(3, len(os.sched_getaffinity(0)))
    assert backend_config(num_nodes=1)["init_args"]["num_cpus"] == 1
