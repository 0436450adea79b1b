"""Flower's simulation engine (Ray): the same ServerApp and ClientApp, each client call in a Ray actor.

The ServerApp runs in a thread of this process behind Flower's ``InMemoryGrid``; every message goes
through Flower's in-memory LinkState to a pool of Ray actors (``ClientAppActor``), each a separate
process that runs the ClientApp for one virtual SuperNode after another and builds its own experiment
(``task.experiment`` is cached per process). This is Flower's own simulation runtime, the one
``flwr run`` uses in simulation mode.

Run config. ``flwr.simulation.run_simulation`` (1.41) has no ``run_config`` / override argument: it gives
the ServerApp and every ClientApp an empty ``context.run_config``. Under ``flwr run`` the simulation
process (``flwr.simulation.app.run_simulation_process``) instead calls Flower's
``flwr.simulation.run_simulation._run_simulation`` with a ``Run`` whose ``override_config`` holds the
``--run-config`` values, a server ``Context`` whose ``run_config`` is the fused config, and the app
directory, from whose ``pyproject.toml`` (``[tool.flwr.app.config]``) each SuperNode fuses its own
``context.run_config`` (``DeprecatedRunInfoStore.register_context``). This engine makes that same call,
with a generated app directory whose ``[tool.flwr.app.config]`` declares the run config's keys: the apps
receive the run config through ``context.run_config``, fused by Flower, exactly as under ``flwr run``.
The call is private Flower API, hence the pinned ``flwr==1.41.0`` and the signature check below.

Resources: every virtual client gets one CPU (an int; notes G1), Ray gets ``min(clients, cores)`` CPUs,
so there are that many actors, each running its clients one after another. Ray binds to loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ``ray`` is first imported) and is shut down when the
run ends, so no Ray process outlives ``run_simulation``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import psutil
import tomli_w
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

logger = logging.getLogger(__name__)
RUN_MARKER = "FEDTT_SIMULATION_RUN"

# Flower's private entry point and the arguments this engine passes to it (checked on every run).
_FLOWER_ARGS = {"num_supernodes", "exit_event", "client_app", "server_app", "backend_name", "backend_config",
                "server_app_context", "app_dir", "run", "is_app", "verbose_logging"}


def _loopback_ray() -> None:
    """Make Ray use 127.0.0.1 (notes G5); the variable is read when ``ray`` is imported."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            logger.warning("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: Ray may "
                           "bind to a non-loopback address; set the variable before importing ray")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def backend_config(num_nodes: int, num_cpus: int | None = None) -> dict:
    """One CPU per virtual client (an int: notes G1); ``min(clients, cores)`` Ray CPUs, i.e. actors."""
    num_cpus = num_cpus or min(num_nodes, available_cpus())
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False,
                          "logging_level": "WARNING", "log_to_driver": True}}


def write_app_dir(directory: Path, run_config: dict) -> Path:
    """A minimal Flower app directory whose ``[tool.flwr.app.config]`` declares ``run_config``'s keys.

    Flower fuses each SuperNode's ``context.run_config`` from this table and the run's override config;
    keys not declared here would be dropped (``flwr.common.config.fuse_dicts``). The components are
    informational: the app objects are passed in directly.
    """
    pyproject = {
        "project": {"name": "fedtt-simulation", "version": "0.1.0", "description": "fedtt run config",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {
            "publisher": "fedtt",
            "components": {"serverapp": "fedtt.federated.server_app:app",
                           "clientapp": "fedtt.federated.client_app:app"},
            "config": dict(run_config),
        }}},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return directory


def run_simulation(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict,
                   num_cpus: int | None = None) -> None:
    """Run ``server_app`` with ``num_nodes`` virtual SuperNodes of ``client_app`` on Ray.

    ``run_config`` (flat ``str -> str | int | float | bool``) becomes ``context.run_config`` of the
    ServerApp and of every ClientApp. ``num_cpus``: Ray CPUs (= concurrent actors); default
    ``min(num_nodes, cores)``.
    """
    _loopback_ray()
    import ray
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    # The module, not the function that flwr.simulation re-exports under the same name.
    flower_sim = importlib.import_module("flwr.simulation.run_simulation")

    missing = _FLOWER_ARGS - set(inspect.signature(flower_sim._run_simulation).parameters)
    if missing:
        raise RuntimeError(f"this flwr version's simulation runtime lacks {sorted(missing)}; fedtt's "
                           "flower-sim engine needs flwr==1.41.0")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    run_config = dict(run_config)

    # What flwr.simulation.app.run_simulation_process builds from the SuperLink's run before this call.
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    # Messages the strategy creates read run and sender from the process-wide task identity (as
    # run_simulation does for its own Run).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    server_context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                             run_config=dict(run_config))
    ray_was_running = ray.is_initialized()
    marker = os.environ[RUN_MARKER] = uuid.uuid4().hex  # inherited by every process Ray starts for this run
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    with tempfile.TemporaryDirectory(prefix="fedtt-sim-app-") as app_dir:
        write_app_dir(Path(app_dir), run_config)
        try:
            flower_sim._run_simulation(
                num_supernodes=num_nodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app, server_app=server_app, backend_name="ray",
                backend_config=backend_config(num_nodes, num_cpus), server_app_context=server_context,
                app_dir=app_dir, run=run, is_app=True, verbose_logging=False)
        finally:
            if not ray_was_running and ray.is_initialized():
                ray.shutdown()  # raylet, GCS, workers: nothing outlives the run
            if not ray_was_running:
                _stop_marked(marker)
            del os.environ[RUN_MARKER]


def _stop_marked(marker: str) -> None:
    """Stop the processes this run started that are still alive: Ray (or Flower, which may shut Ray down
    itself) returns before every actor has exited, and the orphans are no longer our children (seen under
    load). They are recognised by the marker they inherited in their environment."""
    def marked(process: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return process.pid != os.getpid() and process.environ().get(RUN_MARKER) == marker
        return False

    alive = [p for p in psutil.process_iter() if marked(p)]
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, still_alive = psutil.wait_procs(alive, timeout=10)
    for process in still_alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
