"""The FedTT ClientApp: one training step of one client, the same code under every engine."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..adapters import load_trainable_state_dict
from .freezing import round_keys
from .task import experiment, train_local

app = ClientApp()
SYNCED = "fedtt-synced"  # context.state record: the global tensors this node holds (FedTT+ partial payloads)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Each client's batches and dropout differ per round, and a seed reproduces all of them."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**63


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the received tensors, train this round's trainable ones on the local partition, send them back."""
    exp = experiment(context.run_config)
    partition_id = int(context.node_config["partition-id"])
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
    dataset = exp.partitions[partition_id]
    loss = train_local(exp, dataset, seed=client_seed(exp.config.seed, server_round, partition_id),
                       desc=f"round {server_round} client {partition_id}")

    arrays = ArrayRecord({name: params[name].detach() for name in keys})
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(dataset), "partition-id": partition_id})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
