"""The FedTT ClientApp: one training step of one client, the same code under every engine.

``train``: decode the received tensors (FedTT+: merge them into the global state this node holds), load them,
train this round's groups on the local data (DP-SGD when configured), send back the update, trained minus
received, packed (or masked, under secure aggregation), and the squared size of the update per group. Queries
answer the server's questions: the node's partition (and its example count), the global state it holds, and
the secure aggregation stages. Every message is built and read through ``protocol``.

What a reply tells the server is kept to what the docs say it sees: under DP or secure aggregation no train loss
(it is a function of the private data with no noise on it), and the update only as DP made it or masked.
Before taking part a site checks the run against its own privacy floor (``privacy.policy.SitePolicy``, from its node
config): a server cannot talk a site out of DP, a smaller epsilon, or secure aggregation.
"""

from __future__ import annotations

import hashlib
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..adapters import load_trainable_state_dict
from ..learning.batches import Encoded
from ..privacy import client_dp
from ..privacy import secure_aggregation as secure
from ..privacy.dp import LocalDP
from ..privacy.policy import SitePolicy
from . import protocol
from .aggregate import mean_squares
from .codec import pack, unpack
from .freezing import head_only_round, nodes_keep_state, round_keys
from .task import (
    CONFIG_KEY,
    DATA_PATH_KEY,
    Experiment,
    build_data,
    config_from_run_config,
    experiment,
    load_task_of,
    site_data,
)

app = ClientApp()
SYNCED, SYNCED_ROUND = "fedtt-synced", "fedtt-synced-round"  # context.state: the global state this node holds
DROPOUT_SALT = 0x9E3779B9  # the simulated drop-out draw is independent of the batches drawn from the same seed


def site_path(node_config) -> str | None:
    """Deployment: the site's own data file (node config ``data-path``, relative to the SuperNode's directory)."""
    return os.path.expanduser(str(node_config[DATA_PATH_KEY])) if DATA_PATH_KEY in node_config else None


def partition_id_of(node_config) -> int:
    """The node's ``partition-id``; a site with its own file may omit it (default: a digest of the file's bytes,
    so two sites never share one because their files have the same name; two sites with identical files are
    refused by the server).

    It seeds the node's batches, orders the server's sum and is what the server samples, so a seed picks the
    same clients on every engine (Flower's node ids are random).
    """
    path = site_path(node_config)
    if path is not None and "partition-id" not in node_config:
        with open(path, "rb") as f:
            return int.from_bytes(hashlib.sha256(f.read()).digest()[:4], "big") % 2**31
    return int(node_config["partition-id"])


def local_data(exp: Experiment, node_config) -> tuple[Encoded, np.ndarray]:
    """This node's training rows: the site's file in deployment (see ``task.site_data``), otherwise (simulation,
    in-process, or ``--node-config "partition-id=i num-partitions=n"``) the config's partition."""
    path = site_path(node_config)
    if path is not None:
        data = site_data(exp, path)
        return data, np.arange(len(data))
    return exp.train, exp.partitions[partition_id_of(node_config)]


def local_size(config, node_config) -> int:
    """How many training examples this node holds, without building the model (a stage that needs no more)."""
    path = site_path(node_config)
    if path is not None:
        return len(load_task_of(config, path, validation_fraction=0.0, test_fraction=0.0, min_labels=1).train)
    return len(_partitions(config.to_toml())[partition_id_of(node_config)])


@lru_cache(maxsize=1)
def _partitions(config_toml: str) -> list[np.ndarray]:
    return build_data(config_from_run_config({CONFIG_KEY: config_toml})).partitions


def dp_record(node_config, config) -> Path | None:
    """Deployment: this site's DP accountant on its own disk (node config ``dp-record``: a directory), one file
    per experiment (a digest of its config), so a restarted SuperNode keeps its spent budget."""
    if "dp-record" not in node_config:
        return None
    digest = hashlib.sha256(config.to_toml().encode()).hexdigest()[:16]
    return Path(os.path.expanduser(str(node_config["dp-record"]))) / f"dp-{digest}.json"


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Each client's batches and dropout differ per round, and a seed reproduces all of them. Nothing that protects
    a client is drawn from it (DP noise, Poisson batches, SecAgg rounding), unless privacy.reproducible_noise."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**63


def synced_round(context: Context) -> int:
    return int(context.state[SYNCED_ROUND]["round"]) if SYNCED_ROUND in context.state.config_records else 0


def merge_synced(exp: Experiment, context: Context, config: dict,
                 received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FedTT+: what changed since this node last synced, on top of what it holds (never synced: the seeded init).

    A partial payload must build on the state this node holds; if it does not (the node lost its state), applying
    it would train against stale frozen cores, so it is refused."""
    if not nodes_keep_state(exp.config):
        return received
    holds, base = synced_round(context), int(config["base-round"])
    if not config["full"] and holds != base:
        raise ValueError(f"partial payload builds on the global state after round {base}, this node holds round "
                         f"{holds} (state lost?): refusing it; the server sends everything after its handshake")
    held = {k: v.numpy() for k, v in context.state[SYNCED].items()} if holds > 0 else \
        {k: v.numpy() for k, v in exp.initial.items()}
    merged = {**held, **received}
    context.state[SYNCED] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in merged.items()})
    context.state[SYNCED_ROUND] = ConfigRecord({"round": int(config["sync-round"])})
    return merged


@app.train()
def train(msg: Message, context: Context) -> Message:
    exp = experiment(context.run_config)
    cfg = exp.config
    SitePolicy.of(context.node_config).check(cfg)
    parsed = protocol.TRAIN_INS.parse(msg.content)
    config = parsed["config"]
    data, rows = local_data(exp, context.node_config)
    partition_id = partition_id_of(context.node_config)
    server_round = config["server-round"]
    groups = [protocol.group_of(g) for g in config["groups"]] if "groups" in config else None
    head = exp.model.fedtt_head_keys if head_only_round(cfg, server_round) else ()
    keys = round_keys(exp.groups, groups, head)
    received = merge_synced(exp, context, config, unpack(parsed["arrays"], parsed["wire"]))
    load_trainable_state_dict(exp.model, {k: torch.from_numpy(np.asarray(v)) for k, v in received.items()},
                              strict=False)
    params = dict(exp.model.named_parameters())
    for name in exp.model.fedtt_trainable:  # FedTT+ and head-only rounds: the round's frozen tensors get no gradient
        params[name].requires_grad_(name in keys)
    start = {k: params[k].detach().to("cpu", torch.float32).clone() for k in keys}
    seed = client_seed(cfg.seed, server_round, partition_id)
    if random.Random(seed ^ DROPOUT_SALT).random() < cfg.federation.dropout_rate:
        raise SimulatedDropout(f"simulated drop-out (federation.dropout_rate = {cfg.federation.dropout_rate:g})")
    dp = LocalDP.for_round(cfg.privacy, cfg.federation, context, len(rows), config["dp-prior-steps"], exp.device,
                           seed, dp_record(context.node_config, cfg)) if cfg.privacy.dp else None
    loss = exp.train_local(data, rows, seed=seed, lr=config["lr"], dp=dp,
                           desc=f"round {server_round} client {partition_id}")

    update = {k: (params[k].detach().to("cpu", torch.float32) - start[k]).numpy() for k in keys}
    squares = mean_squares(update, exp.groups)
    if cfg.privacy.client_dp:
        update, squares = client_level_dp(cfg, update, config.get("client-dp-clip"), seed)
    metrics = {"num-examples": len(rows), "synced-round": synced_round(context), **(dp.finish(context) if dp else {})}
    if not (cfg.privacy.dp or cfg.privacy.client_dp or "secagg" in parsed):  # a statistic of the private data
        metrics["train_loss"] = loss
    if "secagg" in parsed:
        rng = np.random.default_rng(seed) if cfg.privacy.reproducible_noise else None
        arrays = secure.client_mask(context, parsed["secagg"], update, squares, len(rows),
                                    cfg.federation.weighting == "uniform", rng)
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    else:
        arrays, index = pack(update, cfg.federation.wire_dtype)
        metrics.update({protocol.SQ + g: v for g, v in squares.items()})
        content = RecordDict({"arrays": arrays, "wire": index, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


class SimulatedDropout(RuntimeError):
    """A sampled client that fails this round (``federation.dropout_rate``): the server sees an error reply."""


def client_level_dp(cfg, update: dict[str, np.ndarray], server_clip: float | None, seed: int):
    """Client-level DP on this client: its update clipped to the clip (its own config's, or with adaptive clipping
    the round's, which the server tracks), plus its share of the noise in the distributed placement; the only
    statistic it sends is adaptive clipping's indicator (noised likewise), never its update's size."""
    plan = client_dp.ClientDP.of(cfg)
    clip_norm = server_clip if plan.count_noise and server_clip else cfg.privacy.client_dp_clip
    update, bit = client_dp.clip(update, clip_norm)
    statistics = {protocol.CLIP_BIT: bit} if plan.count_noise else {}
    if cfg.privacy.client_dp_placement == "distributed":
        rng = np.random.default_rng(seed) if cfg.privacy.reproducible_noise else None
        update = client_dp.add_noise(update, plan.noise_std(clip_norm), rng)
    return {k: v.astype(np.float32) for k, v in update.items()}, statistics


def _reply(msg: Message, **metrics) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """Which partition this node holds and how many examples (its FedAvg weight is bounded by this): the server
    samples partitions, not node ids. A site whose privacy floor the run does not meet refuses here."""
    config = config_from_run_config(context.run_config)
    SitePolicy.of(context.node_config).check(config)
    return _reply(msg, **{"partition-id": partition_id_of(context.node_config),
                          "num-examples": local_size(config, context.node_config)})


@app.query("synced")
def synced(msg: Message, context: Context) -> Message:
    """FedTT+ handshake: the global state (its round) this node holds; 0 after a restart."""
    return _reply(msg, **{"synced-round": synced_round(context)})


@app.query("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    config = config_from_run_config(context.run_config)  # no model to build for this stage
    policy = SitePolicy.of(context.node_config)
    policy.check(config)
    return secure.client_setup(msg, context, policy.min_clients(config))


@app.query("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    return secure.client_share(msg, context)


@app.query("secagg_sign")
def secagg_sign(msg: Message, context: Context) -> Message:
    config = config_from_run_config(context.run_config)
    floor = SitePolicy.of(context.node_config).min_clients(config)
    if config.privacy.client_dp and config.privacy.client_dp_placement == "distributed":
        floor = max(floor, client_dp.ClientDP.of(config).parties)  # fewer survivors: an under-noised sum
    return secure.client_sign(msg, context, floor)


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secure.client_unmask(msg, context)
