"""The FedTT ClientApp: one training step of one client, the same code under every engine."""

from __future__ import annotations

import os
import zlib

import datasets
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..adapters import load_trainable_state_dict
from .freezing import round_keys
from .task import DATA_PATH_KEY, Experiment, experiment, site_dataset, train_local

app = ClientApp()
SYNCED = "fedtt-synced"  # context.state record: the global tensors this node holds (FedTT+ partial payloads)


def site_path(node_config) -> str | None:
    """Deployment: the site's own data file (node config ``data-path``, relative to the SuperNode's directory)."""
    return os.path.expanduser(str(node_config[DATA_PATH_KEY])) if DATA_PATH_KEY in node_config else None


def partition_id_of(node_config) -> int:
    """The node's ``partition-id``; a site with its own file may omit it (default: a checksum of the path).

    It seeds the node's batches, orders the server's sum and is what the server samples, so a seed picks the
    same clients on every engine (Flower's node ids are random).
    """
    path = site_path(node_config)
    if path is not None and "partition-id" not in node_config:
        return zlib.crc32(path.encode()) % 2**31
    return int(node_config["partition-id"])


def local_data(exp: Experiment, node_config) -> datasets.Dataset:
    """This node's training set: the site's file in deployment (see ``task.site_dataset``), otherwise
    (simulation, in-process, or ``--node-config "partition-id=i num-partitions=n"``) the config's partition."""
    path = site_path(node_config)
    return site_dataset(exp, path) if path is not None else exp.partitions[partition_id_of(node_config)]


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Each client's batches and dropout differ per round, and a seed reproduces all of them."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**63


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the received tensors, train this round's trainable ones on the local partition, send them back."""
    exp = experiment(context.run_config)
    dataset, partition_id = local_data(exp, context.node_config), partition_id_of(context.node_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    cores = [int(c) for c in config["trainable-cores"]] if "trainable-cores" in config else None
    keys = round_keys(exp.model.fedtt_trainable, cores)

    received = msg.content["arrays"]
    if cores is not None:  # FedTT+ sends only what changed since this node last synced (never: the seeded init)
        synced = context.state.array_records.get(SYNCED) or ArrayRecord(exp.initial)
        received = ArrayRecord({**dict(synced), **dict(received)})
        context.state[SYNCED] = received
    load_trainable_state_dict(exp.model, received.to_torch_state_dict(), strict=False)
    params = dict(exp.model.named_parameters())
    for name in exp.model.fedtt_trainable:  # FedTT+: the round's frozen cores get no gradient
        params[name].requires_grad_(name in keys)
    loss = train_local(exp, dataset, seed=client_seed(exp.config.seed, server_round, partition_id),
                       desc=f"round {server_round} client {partition_id}")

    arrays = ArrayRecord({name: params[name].detach() for name in keys})
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(dataset), "partition-id": partition_id})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds: the server samples partitions, not node ids."""
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id_of(context.node_config)})}),
                   reply_to=msg)
