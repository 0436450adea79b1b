"""The FedTT server strategy: a Flower ``Strategy`` (Message API) that sends only what is trained.

``configure_train`` is a short list of steps: wait for the nodes, sample clients, plan the round (the FedTT+
groups, the learning rate), check what each node holds before sending it a partial payload, run the secure
aggregation setup, build the payloads. ``aggregate_train``: collect the replies, validate them, aggregate the
example-weighted mean update of every tensor (every TT core on its own; under secure aggregation only the sum
is ever unmasked), validate the aggregate, account (parameters, bytes, privacy, FedTT+ agreement), merge.

Clients send their *update* (trained minus received), so averaging is the same with and without secure
aggregation, and a half-precision wire keeps the update's relative precision. Bytes are counted as Flower
serializes the records of each message (``count_bytes()`` of every record: the packed array with its
``.npy`` header, the index, the config or metrics), summed over clients and over every stage of the round
(queries included); transport framing (gRPC / HTTP) is not.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..config import Config
from ..privacy.secure_aggregation import SecureRound
from .codec import num_values, pack, unpack
from .freezing import FreezingPolicy, Group, round_keys

logger = logging.getLogger("fedtt")
SQ = "sq:"  # metric key prefix: a client's squared update size per group


def check_update(update: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a client's (decoded) update cannot be aggregated, or None if it can."""
    unknown, missing = sorted(set(update) - set(expected)), sorted(set(expected) - set(update))
    if unknown or missing:
        return f"tensors do not match the request: unknown {unknown[:2]}, missing {missing[:2]}"
    for name, shape in expected.items():
        if tuple(update[name].shape) != shape:
            return f"{name} has shape {tuple(update[name].shape)}, expected {shape}"
        if not np.isfinite(update[name]).all():
            return f"{name} has non-finite values"
    return None


def check_metrics(metrics: MetricRecord) -> str | None:
    examples, loss = metrics.get("num-examples"), metrics.get("train_loss")
    if not isinstance(examples, int) or examples < 1:
        return f"num-examples is {examples!r}, expected a positive integer"
    if not isinstance(loss, (int, float)) or not np.isfinite(loss):
        return f"train_loss is {loss!r}, expected a finite number"
    return None


def client_error(reason: str) -> str:
    """Flower's ``<class 'pkg.Error'>:<'message'>`` as ``Error: message``."""
    match = re.fullmatch(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>", reason, flags=re.DOTALL)
    return f"{match.group(1)}: {match.group(2)}" if match else reason


def learning_rate(config: Config, server_round: int) -> float:
    """The round's learning rate: linear warm-up, then constant, linear or cosine decay to 0 at the end."""
    fed = config.federation
    if server_round <= fed.warmup_rounds:
        return fed.lr * server_round / (fed.warmup_rounds + 1)
    progress = (server_round - fed.warmup_rounds - 1) / max(1, fed.rounds - fed.warmup_rounds)
    factor = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}
    return fed.lr * factor[fed.lr_schedule]


class FedTTStrategy(FedAvg):
    """Example-weighted FedAvg of the clients' updates, with FedTT+ group freezing when ``policy`` is set."""

    def __init__(self, config: Config, groups: dict[str, Group | None], shapes: dict[str, tuple[int, ...]],
                 policy: FreezingPolicy | None = None):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=config.federation.num_clients,
                         min_train_nodes=config.clients_per_round)
        self.config, self.groups, self.shapes, self.policy = config, dict(groups), dict(shapes), policy
        self.trainable = list(groups)
        self.rng = random.Random(config.seed)
        self.rounds: dict[int, dict] = {}       # per-round accounting, read by the ServerApp
        self.global_arrays: ArrayRecord | None = None
        # Version (the aggregated round that last changed it, 0 = the seeded init every node builds) of each
        # tensor, and the global state each node holds (it holds every tensor as of that many aggregated rounds):
        # a node is sent what it trains plus whatever changed since.
        self.version = {k: 0 for k in self.trainable}
        self.held: dict[int, int] = {}
        self.sending: dict[int, int] = {}
        # Resilience (Flower's deployment engine): nodes that vanished (no reply within round_timeout, or reported
        # offline by the SuperLink) are not waited for again, and each round's messages map replies to nodes.
        self.lost: set[int] = set()
        self.sent: dict[int, list[Message]] = {}
        self.partition_of: dict[int, int] = {}  # node id -> partition id (sampling, summation order, privacy)
        self.dp_record: dict[int, tuple[float, int]] = {}  # partition -> (sigma, DP-SGD steps), sent back on resume
        self.aggregated = 0                     # rounds whose update was applied
        self.first_error: str | None = None     # a run that never aggregated reports this
        self.resync: set[int] = set()          # nodes to send everything this round (the handshake found them unknown)
        self.secure: SecureRound | None = None
        self._replies: dict[int, RecordDict] = {}  # this round's valid replies by node
        self.resumed_from = 0  # rounds done before this process (a resumed run): Flower counts rounds from 1

    # ------------------------------------------------------------------------------------- state (resume)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly: the sampler, the tensor versions, the FedTT+ policy."""
        return {"rng": self.rng.getstate(), "version": self.version, "aggregated": self.aggregated,
                "dp_record": {str(k): list(v) for k, v in self.dp_record.items()},
                "policy": self.policy.state_dict() if self.policy else None}

    def load_state_dict(self, state: dict, completed_rounds: int) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.version = {name: int(v) for name, v in state["version"].items()}
        self.aggregated = int(state["aggregated"])
        self.dp_record = {int(k): (float(v[0]), int(v[1])) for k, v in state["dp_record"].items()}
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        self.resumed_from = completed_rounds

    # ---------------------------------------------------------------------------------------- configure

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.resumed_from
        self.global_arrays = arrays
        stats = self.rounds[server_round] = self._new_stats(server_round)
        stats["started"] = time.monotonic()
        nodes = self._wait_for_nodes(grid)
        sampled = self._sample(grid, nodes, stats)
        active = self.policy.trainable(server_round) if self.policy else None
        keys = round_keys(self.groups, active)
        stats.update(sampled=len(sampled), groups=active, lr=learning_rate(self.config, server_round),
                     expected={k: self.shapes[k] for k in keys})
        self._handshake(grid, self._answering(sampled, stats), set(keys), stats)
        self.secure = None
        extra = {}
        if self.config.privacy.secure_aggregation:
            self.secure = SecureRound(self.config, server_round, lambda asks: self._exchange(grid, asks, stats),
                                      stats["expected"], self.groups)
            try:
                extra = self.secure.setup(self._answering(sampled, stats))
            except RuntimeError as err:  # too few clients left after the key stages
                logger.warning("round %d: secure aggregation setup failed: %s", server_round, err)
                stats["skipped"] = f"secure aggregation setup failed: {err}"
                extra = {}
            sampled = [node for node in sampled if node in extra]
        round_config = ConfigRecord({**config, "server-round": server_round, "lr": stats["lr"]})
        if active is not None:
            round_config["groups"] = [str(g) for g in active]
        messages = [self._message(node, set(keys), round_config, extra.get(node), stats)
                    for node in self._answering(sampled, stats)]
        self.sent[server_round] = messages  # the grid sets their ids when it pushes them
        return messages

    @staticmethod
    def _answering(nodes: list[int], stats: dict) -> list[int]:
        """The nodes not yet dropped from the round (a node that failed a query stage is not asked again)."""
        gone = {d["node"] for d in stats["dropped"]}
        return [node for node in nodes if node not in gone]

    def _new_stats(self, server_round: int) -> dict:
        return {"round": server_round, "partitions": [], "groups": None, "agreement": {}, "params_down": 0,
                "bytes_down": 0, "params_up": 0, "bytes_up": 0, "dropped": [], "contributed": 0, "train_loss": None,
                "privacy": {}, "secure_aggregation": None}

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

    def _sample(self, grid: Grid, nodes: list[int], stats: dict) -> list[int]:
        """Cross-silo: every node. Cross-device: a seeded sample of partitions (Flower's node ids are random,
        partitions are the same on every engine, so a seed picks the same clients everywhere)."""
        self._ask_partitions(grid, nodes, stats)
        if self.config.clients_per_round >= len(nodes):
            return nodes
        node_of = {partition: node for node, partition in self.partition_of.items() if node in nodes}
        chosen = self.rng.sample(sorted(node_of), min(self.config.clients_per_round, len(node_of)))
        return sorted(node_of[partition] for partition in chosen)

    def _ask_partitions(self, grid: Grid, nodes: list[int], stats: dict) -> None:
        """Each node's partition id, asked once per node. Two nodes that report the same partition are a
        misconfigured federation (the same partition-id, or the same data file on two sites)."""
        asks = [self._query(node, "partition") for node in nodes if node not in self.partition_of]
        for reply in self._exchange(grid, asks, stats):
            self.partition_of[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])
        seen: dict[int, int] = {}
        for node, partition in sorted(self.partition_of.items()):
            if partition in seen:
                raise ValueError(f"nodes {seen[partition]} and {node} both hold partition {partition}: give every "
                                 "SuperNode its own partition-id or data file")
            seen[partition] = node

    def _handshake(self, grid: Grid, nodes: list[int], keys: set[str], stats: dict) -> None:
        """Before a partial payload (FedTT+), ask the node which global state it holds: a node that restarted
        (its state is in memory) holds the seeded init again and is sent everything that changed since; one
        that holds a state this server never sent (e.g. after a resume from an earlier checkpoint) is sent
        everything."""
        self.resync = set()
        partial = [node for node in nodes if not self._is_full(node, keys)]
        for reply in self._exchange(grid, [self._query(node, "synced") for node in partial], stats):
            node, holds = reply.metadata.src_node_id, int(reply.content["metrics"]["synced-round"])
            if holds != self.held.get(node, 0):
                logger.warning("node %d holds the global state after round %d, not %d as the server thought (did "
                               "it restart?): it is sent what it lacks", node, holds, self.held.get(node, 0))
            if 0 <= holds <= self.aggregated:
                self.held[node] = holds
            else:
                self.resync.add(node)

    def _is_full(self, node: int, keys: set[str]) -> bool:
        return node in self.resync or all(k in keys or self.version[k] > self.held.get(node, 0)
                                          for k in self.trainable)

    def _query(self, node: int, action: str) -> Message:
        return Message(RecordDict({"config": ConfigRecord()}), message_type=f"{MessageType.QUERY}.{action}",
                       dst_node_id=node)

    def _exchange(self, grid: Grid, messages: list[Message], stats: dict) -> list[Message]:
        """Send query messages, count their bytes, return the replies that carry metrics; a node that failed
        or did not answer is dropped from the round with its reason (``_answers``)."""
        if not messages:
            return []
        stats["bytes_down"] += sum(r.count_bytes() for m in messages for r in m.content.values())
        replies = grid.send_and_receive(messages, timeout=self.config.federation.round_timeout)
        answers = []
        for _, reply in self._answers(stats["round"], messages, replies, stats):
            if "metrics" in reply.content.metric_records:
                stats["bytes_up"] += sum(r.count_bytes() for r in reply.content.values())
                answers.append(reply)
        return answers

    def _message(self, node: int, keys: set[str], config: ConfigRecord, extra: ConfigRecord | None,
                 stats: dict) -> Message:
        held = self.held.get(node, 0)
        down = [k for k in self.trainable if k in keys or self.version[k] > held or node in self.resync]
        full = len(down) == len(self.trainable)
        self.sending[node] = self.aggregated
        arrays, index = pack({k: self.global_arrays[k].numpy() for k in down}, self.config.federation.wire_dtype)
        partition = self.partition_of.get(node)
        sigma, steps = self.dp_record.get(partition, (0.0, 0))
        node_config = ConfigRecord({**config, "full": full, "base-round": held, "sync-round": self.sending[node],
                                    "dp-prior-sigma": sigma, "dp-prior-steps": steps})
        content = RecordDict({"arrays": arrays, "wire": index, "config": node_config})
        if extra is not None:
            content["secagg"] = extra
        stats["params_down"] += num_values(arrays)
        stats["bytes_down"] += sum(r.count_bytes() for r in content.values())
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)

    # ---------------------------------------------------------------------------------------- aggregate

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        server_round += self.resumed_from
        stats = self.rounds[server_round]
        try:
            return self._aggregate(server_round, replies, stats)
        finally:  # the round's wall time: from sampling to the merged adapter, every stage included
            stats["seconds"] = round(time.monotonic() - stats.pop("started"), 3)

    def _aggregate(self, server_round: int, replies: Iterable[Message], stats: dict):
        valid = self._collect(server_round, replies, stats)
        if len(valid) < self.config.federation.min_replies:
            return self._skip(server_round, stats, f"{len(valid)} of {stats['sampled']} replies valid")
        valid.sort(key=lambda v: v[1]["partition-id"])  # a fixed summation order on every engine
        weights = {node: float(m["num-examples"]) if self.config.federation.weighting == "examples" else 1.0
                   for node, m in valid}
        try:
            deltas, squares, weight = self._sums(valid, weights)
        except RuntimeError as err:  # secure aggregation: too few survivors to unmask
            return self._skip(server_round, stats, f"secure aggregation aborted: {err}")
        problem = self._check_aggregate(deltas)
        if problem:
            return self._skip(server_round, stats, f"the aggregate is unusable: {problem}")
        mean = {k: v / weight for k, v in deltas.items()}
        self._account(server_round, stats, valid, weights, mean, {g: s / weight for g, s in squares.items()})
        return self._merge(mean), MetricRecord({"train_loss": stats["train_loss"]})

    def _sums(self, valid: list[tuple[int, MetricRecord]], weights: dict[int, float]):
        """(sum of w_c * update_c per tensor, sum of w_c * mean square per group, sum of w_c): unmasked from the
        masked uploads under secure aggregation, else from the plain ones."""
        if self.secure is not None:
            return self.secure.aggregate({node: self._replies[node] for node, _ in valid}, weights)
        return self._plain_sums(valid, weights)

    def _account(self, server_round: int, stats: dict, valid, weights: dict[int, float], mean: dict[str, np.ndarray],
                 mean_squares: dict[str, float]) -> None:
        stats["partitions"] = [m["partition-id"] for _, m in valid]
        stats["contributed"] = len(valid)
        stats["train_loss"] = float(sum(weights[n] * m["train_loss"] for n, m in valid) / sum(weights.values()))
        shares = np.array(list(weights.values())) / sum(weights.values())
        agreement = self._agreement(mean, mean_squares, float((shares ** 2).sum()))
        stats["agreement"] = {str(g): a for g, a in agreement.items()}
        if self.policy is not None:
            self.policy.observe(server_round, agreement)

    def _merge(self, mean: dict[str, np.ndarray]) -> ArrayRecord:
        """The global adapter plus the mean update; the updated tensors get a new version."""
        self.aggregated += 1
        self.version.update({name: self.aggregated for name in mean})
        merged = {name: self.global_arrays[name] for name in self.global_arrays}
        merged.update({name: Array((self.global_arrays[name].numpy().astype(np.float64) + value).astype(np.float32))
                       for name, value in mean.items()})
        return ArrayRecord(merged)

    def _collect(self, server_round: int, replies: Iterable[Message], stats: dict) -> list[tuple[int, MetricRecord]]:
        """The valid replies as (node, metrics); every other reply, and every node that did not answer, is
        logged and recorded with its reason. Bytes and parameters count everything that came up."""
        valid = []
        self._replies = {}
        for node, reply in self._answers(server_round, self.sent.pop(server_round, []), replies, stats):
            self.held[node] = self.sending.get(node, 0)  # it got the payload
            content = reply.content
            stats["bytes_up"] += sum(r.count_bytes() for r in content.values())
            if "arrays" in content.array_records:
                stats["params_up"] += num_values(content["arrays"])
            problem = self._check_reply(content, stats["expected"])
            if problem:
                self._drop(server_round, stats, node, problem)
            else:
                self._replies[node] = content
                valid.append((node, content["metrics"]))
                self._account_privacy(content["metrics"], stats)
        return valid

    def _answers(self, server_round: int, sent: list[Message], replies: Iterable[Message],
                 stats: dict) -> list[tuple[int, Message]]:
        """(node, reply) for every reply that is not an error. A node whose reply is an error, or that did not
        answer within round_timeout, is dropped from the round with the reason; one that the SuperLink reports
        unavailable, or that timed out, is lost (the next rounds do not wait for it). Reasons name the stage
        (the message type: train, query.partition, query.secagg_setup, ...)."""
        # Errors the SuperLink makes (e.g. node unavailable) come from the SuperLink's node id: map by message id.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        stage = sent[0].metadata.message_type if sent else "train"
        answered, answers = set(), []
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                self._drop(server_round, stats, node, f"client failed ({stage}): {client_error(reply.error.reason)}")
                if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    self.lost.add(node)
            else:
                answers.append((node, reply))
        for node in sorted({m.metadata.dst_node_id for m in sent} - answered):  # the round timed out on them
            timeout = self.config.federation.round_timeout
            self._drop(server_round, stats, node, f"no reply within federation.round_timeout = {timeout:g} s ({stage})")
            self.lost.add(node)
        return answers

    def _check_reply(self, content: RecordDict, expected: dict[str, tuple[int, ...]]) -> str | None:
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return "reply lacks the 'arrays' or 'metrics' record"
        problem = check_metrics(content["metrics"])
        if problem or self.secure is not None:  # a masked upload can only be checked for its form
            return problem or self.secure.check_masked(content)
        if "wire" not in content.config_records:
            return "reply lacks its 'wire' index"
        try:
            update = unpack(content["arrays"], content["wire"])
        except ValueError as err:
            return str(err)
        return check_update(update, expected)

    def _drop(self, server_round: int, stats: dict, node: int, problem: str) -> None:
        logger.warning("round %d: dropped the reply of node %d: %s", server_round, node, problem)
        stats["dropped"].append({"node": node, "reason": problem})
        self.first_error = self.first_error or f"round {server_round}: node {node}: {problem}"

    def _skip(self, server_round: int, stats: dict, why: str) -> tuple[None, None]:
        logger.warning("round %d: %s (federation.min_replies = %d); the global adapter is kept", server_round, why,
                       self.config.federation.min_replies)
        stats["skipped"] = why
        self.first_error = self.first_error or f"round {server_round}: {why}"
        return None, None

    def _plain_sums(self, valid, weights) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
        """Sum over clients of w_c * update_c (per tensor, float64) and of w_c * squared size (per group)."""
        deltas: dict[str, np.ndarray] = {}
        squares: dict[str, float] = {}
        for node, metrics in valid:
            content, w = self._replies[node], weights[node]
            for name, value in unpack(content["arrays"], content["wire"]).items():
                deltas[name] = deltas.get(name, 0.0) + w * value.astype(np.float64)
            for key in metrics:
                if key.startswith(SQ):
                    squares[key[len(SQ):]] = squares.get(key[len(SQ):], 0.0) + w * float(metrics[key])
        return deltas, squares, sum(weights.values())

    def _check_aggregate(self, deltas: dict[str, np.ndarray]) -> str | None:
        for name, value in deltas.items():
            if not np.isfinite(value).all():
                return f"{name} has non-finite values"
        return None

    def _agreement(self, mean: dict[str, np.ndarray], mean_squares: dict[str, float],
                   chance: float) -> dict[Group, float]:
        """Per group, how much the clients' updates agree: the ratio ``||weighted mean update||^2 / weighted mean
        of the clients' ||update||^2`` (1: identical updates; ``chance`` = sum of squared weights, 1/N for N
        equal clients: unrelated updates), rescaled so that 1 stays 1 and chance becomes 0.
        ``mean_squares``: per group (by the name clients report it under), the weighted mean over clients of
        the mean square of their update's values."""
        norms: dict[Group, float] = {}
        values: dict[Group, int] = {}
        for name, value in mean.items():
            group = self.groups.get(name)
            if group is not None:
                norms[group] = norms.get(group, 0.0) + float((value ** 2).sum())
                values[group] = values.get(group, 0) + value.size
        agreement = {}
        for g, norm in norms.items():
            ratio = min(1.0, norm / (mean_squares[str(g)] * values[g])) if mean_squares.get(str(g), 0) > 0 else 1.0
            agreement[g] = round((ratio - chance) / (1 - chance), 6) if chance < 1 else 1.0
        return agreement

    def _account_privacy(self, metrics: MetricRecord, stats: dict) -> None:
        if "epsilon" in metrics:
            partition = int(metrics["partition-id"])
            self.dp_record[partition] = (float(metrics["noise-multiplier"]), int(metrics["dp-steps"]))
            stats["privacy"][str(partition)] = {"epsilon": float(metrics["epsilon"]),
                                                "noise_multiplier": float(metrics["noise-multiplier"]),
                                                "sample_rate": float(metrics["sample-rate"]),
                                                "steps": int(metrics["dp-steps"])}
