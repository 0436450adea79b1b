"""The FedTT server strategy: a Flower ``Strategy`` (Message API) that sends only what is trained.

Per round it samples clients (all of them cross-silo, a seeded sample of partitions cross-device), sends the
trainable tensors plus the round's config, validates every reply before using it, averages each tensor
separately (every TT core on its own), and counts the parameters and bytes that went down and up.

Bytes are counted as Flower serializes the records of each message (``count_bytes()`` of the ArrayRecord
and ConfigRecord going down, of the ArrayRecord and MetricRecord coming up: each tensor's ``.npy`` bytes,
header included, plus key names), summed over clients; transport framing (gRPC / HTTP) is not included.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..config import Config
from .freezing import FreezingPolicy, core_index, round_keys

logger = logging.getLogger("fedtt")


def check_reply(content: RecordDict, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a client's training reply cannot be aggregated, or None if it can."""
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "reply lacks the 'arrays' or 'metrics' record"
    arrays, metrics = content["arrays"], content["metrics"]
    unknown, missing = sorted(set(arrays) - set(expected)), sorted(set(expected) - set(arrays))
    if unknown or missing:
        return f"tensors do not match the request: unknown {unknown[:2]}, missing {missing[:2]}"
    for name, shape in expected.items():
        array = arrays[name]
        if tuple(array.shape) != shape or array.dtype != "float32":
            return f"{name} is {array.dtype}{tuple(array.shape)}, expected float32{shape}"
        if not np.isfinite(array.numpy()).all():
            return f"{name} has non-finite values"
    examples, loss = metrics.get("num-examples"), metrics.get("train_loss")
    if not isinstance(examples, int) or examples < 1:
        return f"num-examples is {examples!r}, expected a positive integer"
    if not isinstance(loss, (int, float)) or not np.isfinite(loss):
        return f"train_loss is {loss!r}, expected a finite number"
    return None


class FedTTStrategy(FedAvg):
    """Example-weighted FedAvg over the trainable tensors, with FedTT+ core freezing when ``policy`` is set."""

    def __init__(self, config: Config, trainable: list[str], policy: FreezingPolicy | None = None):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=config.federation.num_clients,
                         min_train_nodes=config.clients_per_round)
        self.config, self.trainable, self.policy = config, list(trainable), policy
        self.rng = random.Random(config.seed)
        self.rounds: dict[int, dict] = {}       # per-round accounting, read by the ServerApp
        self.global_arrays: ArrayRecord | None = None
        # Version (round of the last aggregate, 0 = the seeded init every node builds) of each tensor, and the
        # versions each node holds: a node is sent what it trains plus whatever changed since it last synced.
        self.version = {k: 0 for k in self.trainable}
        self.held: dict[int, dict[str, int]] = {}
        self.sending: dict[int, dict[str, int]] = {}
        # Resilience (Flower's deployment engine): nodes that vanished (no reply within round_timeout, or reported
        # offline by the SuperLink) are not waited for again, and each round's messages map replies to nodes.
        self.lost: set[int] = set()
        self.sent: dict[int, list[Message]] = {}
        self.partition_of: dict[int, int] = {}  # node id -> partition id (cross-device sampling)
        self.resumed_from = 0  # rounds done before this process (a resumed run): Flower counts rounds from 1

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly: the sampler, the tensor versions, the FedTT+ policy."""
        return {"rng": self.rng.getstate(), "version": self.version,
                "active_cores": self.policy.active if self.policy else None}

    def load_state_dict(self, state: dict, completed_rounds: int) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.version = {name: int(v) for name, v in state["version"].items()}
        if self.policy is not None:
            self.policy.active = list(state["active_cores"])
        self.resumed_from = completed_rounds

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once every node still expected is connected or ``round_timeout`` has passed.

        Expected: ``num_clients`` nodes, minus those lost in earlier rounds that have not come back. So the first
        round waits for the federation to connect, and a dead SuperNode does not hold up the rounds after the one
        it was lost in. After the deadline the round goes ahead with the connected nodes (possibly none: a round
        with fewer than ``min_replies`` valid replies keeps the global adapter and the run goes on).
        """
        timeout = self.config.federation.round_timeout
        start = time.monotonic()
        last_log = None
        while True:
            nodes = sorted(grid.get_node_ids())
            expected = self.min_available_nodes - len(self.lost - set(nodes))
            if len(nodes) >= expected:
                return nodes
            waited = time.monotonic() - start
            if waited >= timeout:
                logger.warning("%d of %d expected clients connected after %.0f s (federation.round_timeout); going "
                               "on with them", len(nodes), expected, waited)
                return nodes
            if last_log is None or time.monotonic() - last_log >= 10:
                logger.info("waiting for clients: %d of %d connected", len(nodes), expected)
                last_log = time.monotonic()
            time.sleep(1)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.resumed_from
        nodes = self._wait_for_nodes(grid)
        query_bytes = (0, 0)
        if self.config.clients_per_round < len(nodes):
            partitions, query_bytes = self._partitions(grid, nodes)
            node_of = {partition: node for node, partition in partitions.items()}
            chosen = self.rng.sample(sorted(node_of), min(self.config.clients_per_round, len(node_of)))
            sampled = sorted(node_of[partition] for partition in chosen)
        else:
            sampled = nodes
        cores = self.policy.trainable_cores(server_round) if self.policy else None
        keys = round_keys(self.trainable, cores)
        self.global_arrays = arrays
        round_config = ConfigRecord({**config, "server-round": server_round})
        if cores is not None:
            round_config["trainable-cores"] = cores
        self.rounds[server_round] = {"clients": len(sampled), "partitions": [], "trainable_cores": cores,
                                     "core_updates": {}, "params_down": 0, "bytes_down": query_bytes[0],
                                     "params_up": 0, "bytes_up": query_bytes[1], "dropped": [],
                                     "expected": {k: tuple(arrays[k].shape) for k in keys}}
        messages = [self._message(node, set(keys), arrays, round_config, self.rounds[server_round]) for node in sampled]
        self.sent[server_round] = messages  # the grid sets their ids when it pushes them
        return messages

    def _partitions(self, grid: Grid, nodes: list[int]) -> tuple[dict[int, int], tuple[int, int]]:
        """Each node's partition id, asked once per node, and the bytes (down, up) that asking took.

        Sampling partitions picks the same clients for a seed on every engine (Flower's simulation and
        deployment give nodes random ids)."""
        unknown = [node for node in nodes if node not in self.partition_of]
        down = up = 0
        if unknown:
            asks = [Message(RecordDict({"config": ConfigRecord()}), message_type=MessageType.QUERY, dst_node_id=node)
                    for node in unknown]
            down = sum(ask.content["config"].count_bytes() for ask in asks)
            for reply in grid.send_and_receive(asks, timeout=self.config.federation.round_timeout):
                if not reply.has_error() and "metrics" in reply.content.metric_records:
                    up += reply.content["metrics"].count_bytes()
                    self.partition_of[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])
        return {node: self.partition_of[node] for node in nodes if node in self.partition_of}, (down, up)

    def _message(self, node: int, keys: set[str], arrays: ArrayRecord, config: ConfigRecord, stats: dict) -> Message:
        held = self.held.get(node, {})
        down = [k for k in self.trainable if k in keys or self.version[k] > held.get(k, 0)]
        self.sending[node] = {k: self.version[k] for k in down}
        content = RecordDict({"arrays": ArrayRecord({k: arrays[k] for k in down}), "config": config})
        stats["params_down"] += sum(int(np.prod(arrays[k].shape)) for k in down)
        stats["bytes_down"] += content["arrays"].count_bytes() + config.count_bytes()
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        server_round += self.resumed_from
        stats = self.rounds[server_round]
        sent = self.sent.pop(server_round, [])
        # Errors the SuperLink makes (e.g. node unavailable) come from the SuperLink's node id: map by message id.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        answered = set()
        valid = []
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                problem = f"client failed: {reply.error.reason}"
                if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    self.lost.add(node)
            else:
                self.held[node] = {**self.held.get(node, {}), **self.sending.get(node, {})}  # it got them
                content = reply.content
                stats["bytes_up"] += sum(r.count_bytes() for r in content.values())
                problem = check_reply(content, stats["expected"])
            if problem:
                logger.warning("round %d: dropped the reply of node %d: %s", server_round, node, problem)
                stats["dropped"].append({"node": node, "reason": problem})
            else:
                valid.append(reply.content)
                stats["params_up"] += sum(int(np.prod(shape)) for shape in stats["expected"].values())
        for node in sorted({m.metadata.dst_node_id for m in sent} - answered):  # the round timed out on them
            problem = f"no reply within federation.round_timeout = {self.config.federation.round_timeout:g} s"
            logger.warning("round %d: dropped node %d: %s", server_round, node, problem)
            stats["dropped"].append({"node": node, "reason": problem})
            self.lost.add(node)
        stats["contributed"] = len(valid)
        if len(valid) < self.config.federation.min_replies:
            logger.warning("round %d: %d valid replies < federation.min_replies = %d; the global adapter is kept",
                           server_round, len(valid), self.config.federation.min_replies)
            stats["train_loss"] = None
            return None, None
        valid.sort(key=lambda c: c["metrics"].get("partition-id", 0))  # a fixed summation order on every engine
        stats["partitions"] = [c["metrics"].get("partition-id") for c in valid]
        weights = np.array([c["metrics"]["num-examples"] if self.config.federation.weighting == "examples" else 1
                            for c in valid], dtype=np.float64)
        weights /= weights.sum()
        stats["train_loss"] = float(sum(w * c["metrics"]["train_loss"] for w, c in zip(weights, valid)))
        averaged = {name: sum(w * c["arrays"][name].numpy().astype(np.float64) for w, c in zip(weights, valid))
                    for name in stats["expected"]}
        relative = self._relative_updates(averaged)
        # the adaptive policy's signal, kept for every TT run so a threshold can be chosen from a past run
        stats["core_updates"] = {str(c): (round(v, 6) if np.isfinite(v) else None) for c, v in sorted(relative.items())}
        if self.policy is not None:
            self.policy.observe(relative)
        self.version.update({name: server_round for name in averaged})
        merged = {name: self.global_arrays[name] for name in self.global_arrays}
        merged.update({name: Array(value.astype(np.float32)) for name, value in averaged.items()})
        return ArrayRecord(merged), MetricRecord({"train_loss": stats["train_loss"]})

    def _relative_updates(self, averaged: dict[str, np.ndarray]) -> dict[int, float]:
        """``||G_new - G_old|| / ||G_old||`` per core index, over every TT layer."""
        delta, norm = {}, {}
        for name, new in averaged.items():
            if (core := core_index(name)) is not None:
                old = self.global_arrays[name].numpy().astype(np.float64)
                delta[core] = delta.get(core, 0.0) + float(((new - old) ** 2).sum())
                norm[core] = norm.get(core, 0.0) + float((old ** 2).sum())
        return {c: (delta[c] / norm[c]) ** 0.5 if norm[c] > 0 else float("inf") for c in delta}
