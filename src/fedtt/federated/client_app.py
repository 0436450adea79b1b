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


def local_data(exp: Experiment, node_config) -> tuple[datasets.Dataset, int]:
    """This node's training set and partition id.

    Deployment: node config ``data-path`` names the site's own file (see ``task.site_dataset``); its optional
    ``partition-id`` only seeds the node's batches and orders the server's sum (default: a checksum of the
    path). Otherwise (simulation, in-process, or ``--node-config "partition-id=i num-partitions=n"``): the
    config's partition ``partition-id`` of the task.
    """
    if DATA_PATH_KEY in node_config:
        path = os.path.expanduser(str(node_config[DATA_PATH_KEY]))  # relative: to the SuperNode's directory
        partition_id = int(node_config.get("partition-id", zlib.crc32(path.encode()) % 2**31))
        return site_dataset(exp, path), partition_id
    partition_id = int(node_config["partition-id"])
    return exp.partitions[partition_id], partition_id


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Each client's batches and dropout differ per round, and a seed reproduces all of them."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**63


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the received tensors, train this round's trainable ones on the local partition, send them back."""
    exp = experiment(context.run_config)
    dataset, partition_id = local_data(exp, context.node_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    cores = [int(c) for c in config["trainable-cores"]] if "trainable-cores" in config else None
    keys = round_keys(exp.model.fedtt_trainable, cores)

    received = msg.content["arrays"]
    if cores is not None:  # FedTT+ sends only what changed: this node keeps its own copy of the global tensors
        synced = context.state.array_records.get(SYNCED)
        received = ArrayRecord({**(dict(synced) if synced else {}), **dict(received)})
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
