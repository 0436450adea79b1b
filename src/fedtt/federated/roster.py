"""Who takes part in a round: the connected nodes, their partitions, the sample, and the query exchanges.

Nodes are known by the partition they declared once (the ``partition`` query: its id and its example count);
a second node claiming a partition already held is left out of the run with a reason, not a crash. Sampling
draws partitions, not Flower's random node ids, so a seed picks the same clients on every engine. Every query
reply is parsed through its schema (``protocol``); one that fails is dropped with its node, stage and reason.
"""

from __future__ import annotations

import logging
import random
import re
import time

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from ..privacy.client_dp import poisson_sample
from . import protocol
from .protocol import ProtocolError, Schema
from .rounds import RoundStats

logger = logging.getLogger("fedtt")


def client_error(reason: str) -> str:
    """Flower's ``<class 'pkg.Error'>:<'message'>`` as ``Error: message``, at most 300 characters."""
    match = re.fullmatch(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>", reason, flags=re.DOTALL)
    return (f"{match.group(1)}: {match.group(2)}" if match else reason)[:300]


class Roster:
    def __init__(self, config, grid_timeout: float):
        self.config, self.timeout = config, grid_timeout
        self.expected_nodes = config.federation.num_clients
        self.rng = random.Random(config.seed)
        self.lost: set[int] = set()                  # vanished nodes: later rounds do not wait for them
        self.partition_of: dict[int, int] = {}       # node -> partition id
        self.examples: dict[int, int] = {}           # node -> the example count it declared when it joined
        self.refused: dict[int, str] = {}            # node -> why it takes no part in this run

    # ------------------------------------------------------------------------------------------ sampling

    def sample(self, grid: Grid, stats: RoundStats) -> list[int]:
        """Cross-silo: every known node. Cross-device: a seeded sample of partitions (under client-level DP each
        partition independently with probability clients_per_round / num_clients)."""
        nodes = self._wait_for_nodes(grid)
        self._ask_partitions(grid, nodes, stats)
        known = {self.partition_of[n]: n for n in nodes if n in self.partition_of}
        if self.config.privacy.client_dp:  # the accountant's amplification assumes Poisson sampling
            q = self.config.clients_per_round / self.config.federation.num_clients
            return sorted(known[p] for p in poisson_sample(sorted(known), q, self.rng))
        if self.config.clients_per_round >= len(known):
            return sorted(known.values())
        chosen = self.rng.sample(sorted(known), self.config.clients_per_round)
        return sorted(known[p] for p in chosen)

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once every node still expected is connected or ``round_timeout`` has passed.

        Expected: ``num_clients`` nodes, minus those lost in earlier rounds that have not come back. So the first
        round waits for the federation to connect, and a dead SuperNode does not hold up the rounds after the one
        it was lost in. After the deadline the round goes ahead with the connected nodes (possibly none: a round
        with fewer than ``min_replies`` valid replies keeps the global adapter and the run goes on).
        """
        start, last_log = time.monotonic(), None
        while True:
            nodes = sorted(grid.get_node_ids())
            expected = self.expected_nodes - len(self.lost - set(nodes))
            if len(nodes) >= expected:
                return nodes
            waited = time.monotonic() - start
            if waited >= self.timeout:
                logger.warning("%d of %d expected clients connected after %.0f s (federation.round_timeout); going "
                               "on with them", len(nodes), expected, waited)
                return nodes
            if last_log is None or time.monotonic() - last_log >= 10:
                logger.info("waiting for clients: %d of %d connected", len(nodes), expected)
                last_log = time.monotonic()
            time.sleep(1)

    def _ask_partitions(self, grid: Grid, nodes: list[int], stats: RoundStats) -> None:
        """Each new node's partition id and example count, asked once per node."""
        new = [n for n in nodes if n not in self.partition_of and n not in self.refused]
        replies = self.exchange(grid, [protocol.query(n, "partition") for n in new], protocol.PARTITION_REPLY, stats)
        held = {p: n for n, p in self.partition_of.items()}
        for node, parsed in sorted(replies.items()):
            partition, count = parsed["metrics"]["partition-id"], parsed["metrics"]["num-examples"]
            cap = self.config.federation.max_examples
            if partition in held:
                self.refused[node] = f"it claims partition {partition}, which node {held[partition]} holds"
            elif cap and count > cap:
                self.refused[node] = f"it declares {count} examples, above federation.max_examples = {cap}"
            else:
                self.partition_of[node], self.examples[node], held[partition] = partition, count, node
                continue
            stats.drop(node, protocol.query_type("partition"), self.refused[node] + "; it takes no part in this run")

    # ------------------------------------------------------------------------------------------ exchanges

    def exchange(self, grid: Grid, messages: list[Message], schema: Schema, stats: RoundStats) -> dict[int, dict]:
        """Send query messages, count their bytes, return ``{node: parsed reply}``; a node that failed, did not
        answer, or answered out of schema is dropped from the round with its reason."""
        if not messages:
            return {}
        stats.count_down(messages)
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        parsed = {}
        for node, reply in self.answers(messages, replies, stats):
            stats.count_up(reply)
            try:
                parsed[node] = schema.parse(reply.content)
            except ProtocolError as err:
                stats.drop(node, schema.stage, str(err))
        return parsed

    def answers(self, sent: list[Message], replies, stats: RoundStats) -> list[tuple[int, Message]]:
        """(node, reply) for every reply that answers a message of ``sent`` and is not an error, first reply per
        node. A node whose reply is an error, or that did not answer within round_timeout, is dropped from the
        round with the reason; one that the SuperLink reports unavailable, or that timed out, is lost (the next
        rounds do not wait for it). A reply to no message of ``sent`` (another round's, a forged one) is ignored
        and logged. Reasons name the stage (train, query.partition, query.secagg_setup, ...)."""
        # Errors the SuperLink makes (e.g. node unavailable) come from the SuperLink's node id: map by message id.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        stage = sent[0].metadata.message_type if sent else protocol.TRAIN
        answered, answers = set(), []
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id)
            if node is None:
                logger.warning("round %d: ignored a reply to no message of this stage (%s) from node %d",
                               stats.round, stage, reply.metadata.src_node_id)
                continue
            if node in answered:
                stats.drop(node, stage, "a second reply to the same message")
                continue
            answered.add(node)
            if reply.has_error():
                stats.drop(node, stage, f"client failed: {client_error(str(reply.error.reason))}")
                if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    self.lost.add(node)
            else:
                answers.append((node, reply))
        for node in sorted({m.metadata.dst_node_id for m in sent} - answered):  # the round timed out on them
            stats.drop(node, stage, f"no reply within federation.round_timeout = {self.timeout:g} s")
            self.lost.add(node)
        return [(n, r) for n, r in answers if n not in stats.gone()]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
