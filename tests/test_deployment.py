"""Flower's deployment engine on loopback: TLS, SuperNode authentication, per-site data, a SuperNode that dies.

The module starts one real deployment (``LocalDeployment``: a SuperLink with ``--ssl-*`` and
``--enable-supernode-auth``, three SuperNodes with registered keys, each reading its own CSV through
``data-path``), then checks that an unregistered key is refused, that a 2-round SecAgg+ and DP run in which a
SuperNode is killed after round 1 finishes with the other two, and that no process it started is left; then that Ctrl-C
on ``fedtt deploy-local`` stops everything. The fast tests at the end check the pieces (credentials, site
data, the strategy's waiting and drop accounting) without processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtt.config import load_config
from fedtt.engines import devcerts
from fedtt.engines.deployment import (
    EXIT_NODE_NOT_ACTIVATED,
    LocalDeployment,
    _executable,
    _signal_pid,
)
from fedtt.engines.sites import write_site_files

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.toml"
TINY = ["model.num_hidden_layers=2", "model.max_length=32", "federation.local_steps=2", "federation.rounds=2",
        "task.max_eval_examples=100", "federation.num_clients=3", "privacy.dp_defaults=false"]
NODES = 3
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}

try:
    _executable("flower-superlink")
    HAVE_FLOWER = True
except FileNotFoundError:
    HAVE_FLOWER = False
needs_flower = pytest.mark.skipif(not HAVE_FLOWER, reason="flower-superlink not installed")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _running(seen: dict[int, float]) -> list[tuple[int, list[str]]]:
    """The processes of ``seen`` (pid -> create time, so a recycled PID does not count) still running."""
    alive = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, p.cmdline()))
        except psutil.Error:
            pass
    return alive


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in THREADS}
    os.environ.update(THREADS)  # inherited by the SuperLink, the SuperNodes and every app process
    workdir = tmp_path_factory.mktemp("deploy")
    sites = write_site_files(load_config(DEMO, TINY), workdir / "sites")
    configs = [f"data-path='{path}' partition-id={i}" for i, path in enumerate(sites)]
    dep = LocalDeployment(workdir, NODES, node_configs=configs)
    try:
        t0 = time.monotonic()
        dep.start()
        dep.started_in = time.monotonic() - t0
        yield dep
    finally:
        dep.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert not dep.leftovers()


@needs_flower
def test_supernode_with_an_unregistered_key_is_refused(deployment, tmp_path):
    key = devcerts.node_key_pair(tmp_path / "intruder")  # a valid key pair, never registered
    proc = deployment.start_supernode(99, key, node_config="partition-id=0 num-partitions=3", name="intruder")
    proc.popen.wait(timeout=60)
    log = proc.log.read_text()
    # Flower logs its exit code 305; the process itself ends with 1 (the exit happens in a worker thread)
    assert proc.popen.returncode != 0 and f"Exit Code: {EXIT_NODE_NOT_ACTIVATED}" in log, log
    assert "Failed to activate SuperNode" in log
    assert len(deployment.online_nodes()) == NODES  # the registered three only


@needs_flower
def test_secure_aggregation_with_dp_runs_on_authenticated_supernodes_and_a_killed_one_does_not_stop_it(
        deployment, tmp_path):
    """2 rounds of SecAgg+ (its four message stages) and DP on TLS + SuperNode authentication; SuperNode 2 is
    killed (SIGKILL) once round 1 is in.

    Round 1: all three. Round 2: the dead node fails the first key stage and is dropped with the SuperLink's
    reason; two survivors are below secure aggregation's floor of three (each would read the other's update from
    the next global adapter), so the round is skipped with its reason and the run goes on. (One run: each
    deployment run costs ~40 s before round 1 and a SecAgg round ~2 minutes on the 2-core dev machine. That a
    later round does not wait for the dead node is test_dead_nodes_are_dropped_by_id_and_not_waited_for's.)
    """
    assert "root-certificates" in (deployment.flwr_home / "config.toml").read_text()
    assert "https://127.0.0.1" in deployment.procs["superlink"].log.read_text()  # TLS on the SuperLink
    t0, done = time.monotonic(), {}

    def kill_after_round_1(n, dep):
        done[n] = time.monotonic() - t0
        if n == 1:
            dep.kill("supernode-2", signal.SIGKILL)  # a crash: no goodbye to the SuperLink

    results = deployment.run(DEMO, [*TINY, "privacy.secure_aggregation=true", "federation.min_replies=3",
                                    "privacy.dp=true", "privacy.noise_multiplier=1.0"],
                             tmp_path / "out", timeout=400, on_round=kill_after_round_1)
    seconds = time.monotonic() - t0
    assert results["engine"] == "deployment" and results["num_clients"] == NODES
    assert results["status"] == "finished" and results["privacy"]["secure_aggregation"]
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert (rounds[0]["clients"], rounds[0]["sampled"], rounds[0]["dropped"]) == (3, 3, [])
    assert rounds[1]["clients"] == 0 and "secure aggregation setup failed" in rounds[1]["skipped"]
    for dropped in rounds[1]["dropped"]:
        assert "Node Unavailable" in dropped["reason"] or "no reply" in dropped["reason"]
        assert dropped["node"] in deployment.node_ids  # the dead node's id, not the SuperLink's
    assert all(r["train_loss"] is None for r in rounds)  # under DP and SecAgg no client's loss leaves it
    epsilon = results["privacy"]["epsilon"]
    assert all(epsilon[p] == rounds[0]["epsilon"][p] > 0 for p in ("0", "1", "2"))  # round 2 trained nobody
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not deployment.procs["supernode-2"].alive()
    for i in range(NODES):  # each SuperNode trained on its own file, read through `data-path`
        assert f"site-{i}.csv" in deployment.procs[f"supernode-{i}"].popen.args[-1]
    print(f"\nstart-up {deployment.started_in:.1f} s; run {seconds:.1f} s, rounds done at "
          f"{ {n: round(t, 1) for n, t in done.items()} } s (SuperNode 2 killed after round 1)")


@needs_flower
def test_no_process_of_the_deployment_is_left(deployment):
    pids = set(deployment.seen)
    assert len(pids) > 2 * NODES  # SuperLink, SuperNodes, SuperExecs, app processes
    deployment.stop()
    assert deployment.leftovers() == []
    assert _running(deployment.seen) == []
    groups = {p.pid for p in deployment.procs.values()}  # each started process leads its own group
    in_groups = []
    for _ in range(50):  # killed helpers may take a moment to be reaped
        in_groups = [(p.pid, p.info["cmdline"]) for p in psutil.process_iter(["cmdline", "status"])
                     if p.info["status"] != psutil.STATUS_ZOMBIE and _pgid(p.pid) in groups]
        if not in_groups:
            break
        time.sleep(0.1)
    assert in_groups == []


@needs_flower
def test_deploy_local_stops_everything_on_ctrl_c(tmp_path):
    """SIGINT to `fedtt deploy-local` while it runs: it exits and leaves no process behind."""
    workdir = tmp_path / "work"
    env = {**os.environ, **THREADS}
    launcher_log = tmp_path / "launcher.log"
    with open(launcher_log, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "fedtt.cli", "deploy-local", "--config", str(DEMO), "--nodes", "2",
             *[a for s in TINY for a in ("--set", s)], "--out", str(tmp_path / "out"), "--workdir", str(workdir),
             "--partition-ids"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, float] = {}
    try:
        me = psutil.Process(launcher.pid)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # until the SuperLink and both SuperNodes are up
            for child in me.children(recursive=True):
                seen.setdefault(child.pid, child.create_time())
            logs = workdir / "logs"
            if logs.is_dir() and len(list(logs.glob("supernode-*.log"))) == 2:
                break
            time.sleep(0.5)
        time.sleep(2)
        for child in me.children(recursive=True):
            seen.setdefault(child.pid, child.create_time())
        assert len(seen) >= 3
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:  # it failed: leave nothing running (each helper leads its own group)
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
            for pid, created in seen.items():
                _signal_pid(pid, signal.SIGKILL, created)
    assert launcher.returncode == 130, launcher_log.read_text()
    assert _running(seen) == [], launcher_log.read_text()


# --- fast checks of the pieces, no processes -------------------------------------------------------------


def test_dev_credentials_are_what_flower_expects(tmp_path):
    paths = devcerts.generate(tmp_path, nodes=2, hosts=["10.1.2.3", "link.example"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example"}
    for key in paths["node_keys"]:
        private = load_ssh_private_key(key.read_bytes(), None)  # what flower-supernode does
        public = load_ssh_public_key((key.parent / f"{key.name}.pub").read_bytes())  # flwr supernode register
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.public_key() == public
        assert key.stat().st_mode & 0o777 == 0o600
    assert paths["server_key"].stat().st_mode & 0o777 == 0o600


def test_a_site_file_is_read_with_the_task_label_names(tmp_path):
    from fedtt.federated.client_app import local_data, partition_id_of
    from fedtt.federated.task import experiment, run_config_for, site_data

    exp = experiment(run_config_for(load_config(None, ["model.num_hidden_layers=1", "task.max_eval_examples=8"]),
                                    "/unused"))  # rotten_tomatoes: labels negative, positive
    site = tmp_path / "site.csv"
    site.write_text("text,label\n great film ,positive\nawful,negative\ngood,positive\ngreat film,positive\n")
    data = site_data(exp, str(site))
    assert len(data) == 3  # stripped, de-duplicated, every row kept (no validation/test split on a site)
    texts = [exp.tokenizer.decode(ids, skip_special_tokens=True) for ids in data.input_ids]
    assert dict(zip(texts, data.labels)) == {"great film": 1, "awful": 0, "good": 1}
    one = tmp_path / "one-label.csv"  # a site may hold one label only: matched by name, not by position
    one.write_text("text,label\nwonderful,positive\nsuperb,positive\n")
    assert site_data(exp, str(one)).labels == [1, 1]
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("text,label\na,positive\nb,positive\nc,neutral\n")
    with pytest.raises(ValueError, match=r"\['neutral'\] are not labels of task"):
        site_data(exp, str(unknown))

    rows = local_data(exp, {"data-path": str(site), "partition-id": 5})[1]
    assert list(rows) == [0, 1, 2]
    assert partition_id_of({"data-path": str(site), "partition-id": 5}) == 5
    assert partition_id_of({"data-path": str(site)}) == partition_id_of({"data-path": str(site)})  # file digest
    assert partition_id_of({"data-path": str(site)}) != partition_id_of({"data-path": str(unknown)})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, text in (("a", "x,positive\n"), ("b", "y,negative\n")):  # two sites, the same relative name
        (tmp_path / folder / "train.csv").write_text("text,label\n" + text)
    assert partition_id_of({"data-path": str(tmp_path / "a/train.csv")}) != partition_id_of(
        {"data-path": str(tmp_path / "b/train.csv")})
    data, rows = local_data(exp, {"partition-id": 1, "num-partitions": 3})
    assert data is exp.train and list(rows) == list(exp.partitions[1])


class FakeGrid:
    """A grid whose nodes answer the partition query (node i holds partition i - 11) and nothing else."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message, MetricRecord, RecordDict

        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"p{m.metadata.dst_node_id}"  # as a grid does when it pushes
            reply = Message(RecordDict({"metrics": MetricRecord({"partition-id": m.metadata.dst_node_id - 11,
                                                                 "num-examples": 10})}), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


@pytest.fixture
def strategy():
    from flwr.app import Array, ArrayRecord
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedtt.federated.strategy import FedTTStrategy

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    config = load_config(None, ["federation.num_clients=3", "federation.round_timeout=1.5"])
    return FedTTStrategy(config, {"w": None}, {"w": (4,)}), ArrayRecord({"w": Array(np.ones(4, np.float32))})


def _reply(msg, loss=0.5):
    from flwr.app import Message, MetricRecord, RecordDict

    from fedtt.federated.codec import pack

    arrays, index = pack({"w": np.full(4, 2.0, np.float32)}, "float32")
    return Message(RecordDict({"arrays": arrays, "wire": index, "metrics": MetricRecord(
        {"train_loss": loss, "num-examples": 10, "synced-round": 0})}), reply_to=msg)


def test_dead_nodes_are_dropped_by_id_and_not_waited_for(strategy):
    strategy, initial = strategy
    from flwr.app import ConfigRecord
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    messages = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([11, 12, 13])))
    for i, m in enumerate(messages):  # as the grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"m{i}"
    by_node = {m.metadata.dst_node_id: m for m in messages}
    unavailable = create_message_error_unavailable_res_message(by_node[12].metadata, "node_unavail")
    assert unavailable.metadata.src_node_id != 12  # the SuperLink made it
    arrays, _ = strategy.aggregate_train(1, [_reply(by_node[11]), unavailable])  # 13: no reply (timeout)
    stats = strategy.rounds[1]
    assert arrays is not None and (stats.sampled, stats.contributed) == (3, 1)
    reasons = {d["node"]: d["reason"] for d in stats.dropped}
    assert set(reasons) == {12, 13}
    assert "Node Unavailable" in reasons[12] and "no reply within federation.round_timeout = 1.5 s" in reasons[13]

    t0 = time.monotonic()  # round 2: 12 is gone and 13 is still listed; nobody is waited for
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([11, 13])))
    assert time.monotonic() - t0 < 0.5 and sorted(m.metadata.dst_node_id for m in messages) == [11, 13]


class SecureGrid(FakeGrid):
    """Nodes that run the real client side of the SecAgg+ key stages; ``unavailable`` is the node the SuperLink
    reports unavailable from the first key stage on."""

    def __init__(self, nodes, unavailable):
        super().__init__(nodes)
        self.unavailable = unavailable
        self.sent = 0

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, RecordDict
        from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

        from fedtt.privacy import secure_aggregation as secagg

        if messages[0].metadata.message_type == "query.partition":
            return super().send_and_receive(messages, timeout)
        self.contexts = getattr(self, "contexts", {})
        replies = []
        for m in messages:
            self.sent += 1
            m.metadata.__dict__["_message_id"] = f"s{self.sent}"
            node = m.metadata.dst_node_id
            if node == self.unavailable:
                replies.append(create_message_error_unavailable_res_message(m.metadata, "node_unavail"))
                continue
            context = self.contexts.setdefault(node, Context(1, node, {}, RecordDict(), {}))
            if m.metadata.message_type == "query.secagg_setup":
                reply = secagg.client_setup(m, context, min_clients=3)
            else:
                reply = secagg.client_share(m, context)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def test_a_node_lost_in_a_secure_aggregation_key_stage_is_dropped_lost_and_not_sent_training():
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedtt.federated.strategy import FedTTStrategy

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    config = load_config(None, ["federation.num_clients=4", "federation.round_timeout=1.5",
                                "privacy.secure_aggregation=true", "federation.min_replies=3"])
    strategy = FedTTStrategy(config, {"w": None}, {"w": (4,)})
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.ones(4, np.float32))}), ConfigRecord(),
                                             SecureGrid([11, 12, 13, 14], unavailable=12)))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 13, 14]
    assert all("secagg" in m.content.config_records for m in messages)  # the survivors' forwarded shares
    (dropped,) = strategy.rounds[1].dropped  # once, at the first key stage, not again at the second
    assert dropped["node"] == 12 and dropped["stage"] == "query.secagg_setup"
    assert "Node Unavailable" in dropped["reason"] and strategy.roster.lost == {12}


def test_the_first_round_waits_for_all_nodes_until_round_timeout(strategy, caplog):
    from flwr.app import ConfigRecord

    strategy, initial = strategy

    t0 = time.monotonic()
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([11, 12])))
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 4 and len(messages) == 2  # waited round_timeout for the third, then went on
    assert "2 of 3 expected clients connected" in caplog.text
    assert strategy.rounds[1].sampled == 2


def test_round_timeout_is_validated():
    assert load_config(None, []).federation.round_timeout == 600
    with pytest.raises(ValueError, match="federation.round_timeout"):
        load_config(None, ["federation.round_timeout=0"])


def test_deploy_local_rejects_a_wrong_number_of_site_files(tmp_path, capsys):
    from fedtt.cli import main

    code = main(["deploy-local", "--nodes", "3", "--data-path", "a.csv", "--out", str(tmp_path / "o")])
    assert code == 2 and "1 --data-path files for 3 nodes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
