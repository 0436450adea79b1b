"""``run``: one federated experiment from a validated config, on the chosen engine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import Config
from .engines.inprocess import run_inprocess
from .federated.checkpoint import check_resumable, read_checkpoint
from .federated.client_app import app as client_app
from .federated.server_app import app as server_app
from .federated.task import experiment, run_config_for
from .files import prepare_out_dir
from .privacy.dp import check_delta


class RunFailed(RuntimeError):
    """The federation ran but trained nothing (no round could be aggregated); the message says why."""


def run(config: Config, out_dir: str | Path, overwrite: bool = False, resume: bool = False) -> dict:
    """Run the federation described by ``config``; outputs go to ``out_dir``; returns results.json's content.

    ``resume``: continue the run in ``out_dir`` from its last finished round (its config, bar the number of
    rounds and the engine, must be ``config``). Everything that can be checked before training (the config,
    the data, the model, the privacy parameters) is checked before anything is written. Raises ``RunFailed``
    when no round could be aggregated (results.json then says why, with ``"status": "failed"``)."""
    out_dir = Path(out_dir)
    if resume:
        check_resumable(read_checkpoint(out_dir), config, out_dir)
    run_config = {**run_config_for(config, str(out_dir), resume), "engine": config.federation.engine}
    exp = experiment(run_config)  # cached: the in-process engine and the simulation's server thread reuse it
    check_delta(config.privacy, [len(p) for p in exp.partitions])
    if not resume:
        prepare_out_dir(out_dir, overwrite)
    # Our per-round summary replaces Flower's log (client failures are still logged); restored afterwards.
    quiet = {"flwr": logging.ERROR, "alembic": logging.WARNING}  # alembic: Flower's in-memory LinkState
    saved = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        if config.federation.engine == "inprocess":
            run_inprocess(server_app, client_app, num_nodes=config.federation.num_clients, run_config=run_config)
        else:  # "flower-sim"
            from .engines.simulation import run_simulation  # imports Ray only when used

            run_simulation(server_app, client_app, num_nodes=config.federation.num_clients, run_config=run_config)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    path = out_dir / "results.json"
    if not path.is_file():
        raise RunFailed(f"the server wrote no results to {out_dir} (see the log above for its error)")
    results = json.loads(path.read_text())
    if results.get("status") != "finished":
        raise RunFailed(results.get("error") or f"the run stopped before it finished ({results.get('status')})")
    return results
