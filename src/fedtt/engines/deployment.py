"""Flower's deployment engine on loopback: one SuperLink and N SuperNodes, TLS and SuperNode authentication on.

``fedtt deploy-local`` (and ``LocalDeployment`` for tests) does on one machine what docs/deployment.md does by hand
in several terminals:

1. development credentials (``devcerts``): a CA, a SuperLink certificate for 127.0.0.1 and one EC key pair per
   SuperNode;
2. ``$FLWR_HOME/config.toml`` with a SuperLink connection (address + ``root-certificates``) for the ``flwr`` CLI;
3. ``flower-superlink`` with ``--ssl-*`` and ``--enable-supernode-auth`` on a free 127.0.0.1 port;
4. ``flwr supernode register <key.pub>`` for every SuperNode (only registered keys may connect; on loopback only,
   because Flower 1.41's Control API, which registers keys, is itself unauthenticated: docs/deployment.md);
5. one ``flower-supernode`` per site (``--root-certificates``, ``--auth-supernode-private-key``,
   ``--node-config "data-path='<site file>' partition-id=<i>"``, its own Runtime API port and ``$FLWR_HOME``);
6. ``flwr run <app> <connection> --stream --run-config <toml>`` (``config-file``, ``overrides``, ``out-dir``);
7. wait until the ServerApp has written ``results.md`` (after ``results.json`` and ``adapter/``), then stop
   every process it started.

Processes. Every process is started in its own session (process group) with its output in ``<workdir>/logs``.
The SuperLink and each SuperNode start helpers (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``),
some in sessions of their own, so the launcher snapshots the descendants of what it started while it runs and
stops them all by PID: SIGTERM to each process group and PID, then SIGKILL to whatever is still alive after a
grace period. ``stop()`` runs on normal exit, on errors and on Ctrl-C (``with LocalDeployment(...)``);
``LocalDeployment.leftovers()`` lists any process it ever saw that is still alive.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w

from ..files import atomic_write, prepare_out_dir
from . import devcerts, sites

logger = logging.getLogger("fedtt")

CONNECTION = "fedtt-local"          # SuperLink connection name written into $FLWR_HOME/config.toml
# Every message starts an app process once the SuperExec next polls (default every 1 s): a round has several
# stages (handshake, secure aggregation), so a shorter poll shortens each round by seconds
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
EXIT_NODE_NOT_ACTIVATED = 305       # the exit code flower-supernode logs when the SuperLink refuses its key


class DeploymentError(RuntimeError):
    """A process of the deployment failed; the message ends with the tail of its log."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def project_dir() -> Path:
    """The Flower app directory: the one holding fedtt's pyproject.toml (src layout), else the working directory."""
    for candidate in (Path(__file__).resolve().parents[3], Path.cwd()):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and "fedtt.federated.server_app:app" in pyproject.read_text():
            return candidate
    raise FileNotFoundError("fedtt's Flower app (pyproject.toml with [tool.flwr.app]) was not found; pass --app")


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name  # the venv's own Flower, whatever PATH says
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install flwr (pip install 'flwr[simulation]==1.41.0')")
    return found


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

    ``node_configs[i]`` is SuperNode i's ``--node-config`` string (default ``partition-id=i num-partitions=N``).
    Use as a context manager; ``stop()`` is idempotent and kills everything that was started.
    """

    workdir: Path
    num_nodes: int
    node_configs: list[str] | None = None
    app_dir: Path | None = None
    echo: Callable[[str], None] | None = None  # receives `flwr run`'s output lines
    procs: dict[str, Proc] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time of every process seen
    groups: set[int] = field(default_factory=set)  # process groups led by a process seen (helpers start some)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.app_dir = Path(self.app_dir).resolve() if self.app_dir else project_dir()
        self.logs = self.workdir / "logs"
        self.creds = self.workdir / "creds"
        self.flwr_home = self.workdir / "flwr-home"
        self.node_configs = self.node_configs or [f"partition-id={i} num-partitions={self.num_nodes}"
                                                  for i in range(self.num_nodes)]
        if len(self.node_configs) != self.num_nodes:
            raise ValueError(f"{len(self.node_configs)} node configs for {self.num_nodes} nodes")
        self.port = 0
        self.node_ids: list[int] = []
        self._lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home or self.flwr_home)}
        # flower-superlink and flower-supernode start `flower-superexec` from PATH: use this venv's
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self) -> None:
        """Credentials, SuperLink, key registration, SuperNodes; returns when every SuperNode is online."""
        self.logs.mkdir(parents=True, exist_ok=True)
        paths = devcerts.generate(self.creds, nodes=self.num_nodes, overwrite=True)  # this run's own dev creds
        self.ca = paths["ca"]
        ports = free_ports(self.num_nodes + 1)
        self.port, node_ports = ports[0], ports[1:]
        self.write_connection()
        self.start_superlink(paths["server_cert"], paths["server_key"])
        for key in paths["node_keys"]:
            self.node_ids.append(self.register(key.with_name(key.name + ".pub")))
        for i, key in enumerate(paths["node_keys"]):
            self.start_supernode(i, key, node_ports[i], self.node_configs[i])
        self.wait_for_nodes(self.num_nodes)

    def write_connection(self) -> Path:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: {
            "address": f"127.0.0.1:{self.port}", "root-certificates": str(self.ca)}}}
        path = self.flwr_home / "config.toml"
        path.write_text(tomli_w.dumps(config))
        return path

    def _spawn(self, name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None,
               pipe: bool = False) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdout=subprocess.PIPE if pipe else out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env or self.env(), cwd=cwd or self.workdir,
                                     start_new_session=True)  # own process group: stopped as a whole
        proc = Proc(name, popen, log)
        with self._lock:
            self.procs[name] = proc
            self._remember(popen.pid)
        return proc

    def _remember(self, pid: int) -> None:
        try:
            self.seen.setdefault(pid, psutil.Process(pid).create_time())
            if os.getpgid(pid) == pid:
                self.groups.add(pid)
        except (psutil.Error, OSError):
            pass

    def snapshot(self) -> None:
        """Remember every descendant of the processes started so far (helpers, ServerApp, ClientApps)."""
        with self._lock:
            for proc in self.procs.values():
                try:
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        self._remember(child.pid)
                except psutil.Error:
                    pass

    def start_superlink(self, cert: Path, key: Path) -> Proc:
        proc = self._spawn("superlink", [
            _executable("flower-superlink"), "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeploymentError(f"flower-superlink exited with code {proc.popen.returncode}:\n"
                                      f"{tail(proc.log)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    self.snapshot()
                    return proc
            time.sleep(0.2)
        raise DeploymentError(f"flower-superlink did not listen on 127.0.0.1:{self.port} within 60 s:\n"
                              f"{tail(proc.log)}")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a short ``flwr`` CLI command against this deployment's SuperLink."""
        return subprocess.run([_executable("flwr"), *args], env=self.env(), cwd=self.workdir, timeout=timeout,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def register(self, public_key: Path) -> int:
        """``flwr supernode register``: the SuperLink accepts SuperNodes with this key from now on."""
        done = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        try:
            return int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])
        except (ValueError, KeyError) as err:
            raise DeploymentError(f"flwr supernode register {public_key} failed ({err}):\n"
                                  f"{done.stdout}\n{done.stderr}") from None

    def start_supernode(self, index: int, key: Path, port: int | None = None, node_config: str = "",
                        name: str | None = None) -> Proc:
        home = self.workdir / "nodes" / str(index)
        (home / "flwr-home").mkdir(parents=True, exist_ok=True)
        argv = [_executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.ca), "--auth-supernode-private-key", str(key),
                "--host", "127.0.0.1", "--port", str(port or free_ports(1)[0])]
        if node_config:
            argv += ["--node-config", node_config]
        return self._spawn(name or f"supernode-{index}", argv, env=self.env(home / "flwr-home"), cwd=home)

    def online_nodes(self) -> list[int]:
        done = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(done.stdout[done.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return []
        return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs.values():
                if proc.name.startswith("supernode-") and not proc.alive():
                    raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode}:\n"
                                          f"{tail(proc.log)}")
            if len(self.online_nodes()) >= count:
                self.snapshot()
                return
            time.sleep(1)
        raise DeploymentError(f"fewer than {count} SuperNodes online after {timeout:.0f} s; logs in {self.logs}")

    # --- the federation ------------------------------------------------------------------------------------

    def run(self, config_file: str | Path, overrides: list[str], out_dir: str | Path, *,
            timeout: float | None = None, on_round: Callable[[int, LocalDeployment], None] | None = None,
            poll: float = 1.0) -> dict:
        """``flwr run`` the experiment on this deployment; returns results.json once the run has finished.

        ``on_round(n, self)`` is called once results.json shows round ``n`` (tests kill a node there).
        """
        out_dir = Path(out_dir).resolve()
        results, done_marker = out_dir / "results.json", out_dir / "results.md"
        run_config = {"config-file": str(Path(config_file).resolve()), "overrides": " ".join(overrides),
                      "out-dir": str(out_dir), "engine": "deployment"}
        run_config_file = self.workdir / "run-config.toml"
        run_config_file.write_text(tomli_w.dumps(run_config))  # a file: no quoting issues in --run-config
        proc = self._spawn("flwr-run", [_executable("flwr"), "run", str(self.app_dir), CONNECTION, "--stream",
                                        "--run-config", str(run_config_file)], pipe=True)
        reader = threading.Thread(target=self._copy_output, args=(proc,), daemon=True)
        reader.start()
        start, rounds_seen = time.monotonic(), 0
        while True:
            self.snapshot()
            rounds = _rounds(results)
            for n in range(rounds_seen + 1, rounds + 1):
                if on_round is not None:
                    on_round(n, self)
            rounds_seen = max(rounds_seen, rounds)
            if not proc.alive():
                reader.join(timeout=5)
                if done_marker.exists():
                    return json.loads(results.read_text())
                raise DeploymentError(f"flwr run exited (code {proc.popen.returncode}) before the ServerApp wrote "
                                      f"{done_marker}:\n{tail(proc.log)}\nSuperLink log:\n"
                                      f"{tail(self.procs['superlink'].log)}")
            if not self.procs["superlink"].alive():
                raise DeploymentError(f"flower-superlink died:\n{tail(self.procs['superlink'].log)}")
            if timeout is not None and time.monotonic() - start > timeout:
                raise DeploymentError(f"the run did not finish within {timeout:.0f} s; logs in {self.logs}")
            time.sleep(poll)

    def _copy_output(self, proc: Proc) -> None:
        with open(proc.log, "a", encoding="utf-8") as log:
            try:
                for raw in proc.popen.stdout:
                    line = raw.decode(errors="replace")
                    log.write(line)
                    log.flush()
                    if self.echo is not None:
                        self.echo(line.rstrip("\n"))
            except (OSError, ValueError):  # the pipe was closed by stop()
                pass

    # --- stopping ------------------------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``name``, its process group and every descendant (a crash: SIGKILL)."""
        proc = self.procs[name]
        self.snapshot()
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        _signal_group(proc.pid, sig)
        for child in children:
            _signal_pid(child.pid, sig, self.seen.get(child.pid))

    def stop(self, grace: float = 10.0) -> None:
        """Stop everything started (flwr run, SuperNodes, SuperLink, their helpers): TERM, then KILL."""
        self.snapshot()
        order = sorted(self.procs.values(), key=lambda p: (p.name == "superlink", p.name))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in order:  # our children lead their groups; not reaped yet, so their ids are not reused
                _signal_group(proc.pid, sig)
            for group in sorted(self.groups - {p.pid for p in order}):  # groups helpers started, leader alive
                if group in self.leftovers():
                    _signal_group(group, sig)
            for pid, created in list(self.seen.items()):
                _signal_pid(pid, sig, created)
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
            while self.leftovers() and time.monotonic() < deadline:
                time.sleep(0.2)
        for proc in order:  # reap our direct children
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not exit", proc.name, proc.pid)
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()

    def leftovers(self) -> list[int]:
        """PIDs of processes this deployment started (or saw descend from them) that are still running."""
        alive = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int, created: float | None) -> None:
    try:
        p = psutil.Process(pid)
        if created is None or p.create_time() == created:  # not a recycled PID
            p.send_signal(sig)
    except psutil.Error:
        pass


def _rounds(results: Path) -> int:
    try:
        return len(json.loads(results.read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


# --- the `fedtt deploy-local` command ----------------------------------------------------------------------


def deploy_local(config_file: str | None, overrides: list[str], out_dir: str | Path, *, nodes: int = 3,
                 workdir: str | Path | None = None, data_paths: list[str] | None = None,
                 partition_ids: bool = False, overwrite: bool = False, timeout: float | None = None,
                 echo: Callable[[str], None] | None = print) -> dict:
    """``fedtt deploy-local``: run the experiment on a loopback deployment, stop everything, return results.

    Sites: ``data_paths`` (one file per node), else ``partition_ids`` (``partition-id=i num-partitions=N``),
    else the config's partitions written to ``<workdir>/sites/site-<i>.csv`` and read back by each node.
    ``federation.num_clients`` is set to ``nodes``.
    """
    from ..config import load_config

    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    if data_paths and len(data_paths) != nodes:
        raise ValueError(f"{len(data_paths)} --data-path files for {nodes} nodes; give one per node")
    overrides = [*overrides, f"federation.num_clients={nodes}"]
    config = load_config(config_file, overrides)  # fails here, not in the ServerApp, on a bad key
    out_dir = prepare_out_dir(Path(out_dir).resolve(), overwrite)
    if config_file is None:  # the defaults: give the ServerApp a file anyway
        config_file = str(out_dir / "experiment.toml")
        atomic_write(config_file, config.to_toml())
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedtt-deploy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    configs = sites.node_configs(config, workdir, data_paths, partition_ids)
    logger.info("deployment workdir %s (credentials, logs, FLWR_HOME)", workdir)
    with LocalDeployment(workdir, nodes, node_configs=configs, echo=echo) as deployment:
        logger.info("SuperLink on 127.0.0.1:%d (TLS, SuperNode authentication), %d SuperNodes online",
                    deployment.port, nodes)
        return deployment.run(config_file, overrides, out_dir, timeout=timeout)
