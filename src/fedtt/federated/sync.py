"""FedTT+ on the server: which version of every tensor each node holds, so a node is sent only what it trains
this round plus whatever changed since it last synced.

A tensor's version is the aggregated round that last changed it (0: the seeded init every node builds). A node
holds the global state as of some aggregated round; before a partial payload the server asks it which (the
``synced`` query): a node that restarted holds the seeded init again and is sent what changed since; one that
holds a state this server never sent (e.g. after a resume from an earlier checkpoint) is sent everything.

Only FedTT+ nodes keep that state. Under every other method a node loads each payload over its own model, so the
server treats it as holding the seeded init and sends every tensor changed since: a partial payload (a head-only
round) then leaves out only tensors no round has changed, and no node is asked.
"""

from __future__ import annotations

import logging

from flwr.serverapp import Grid

from . import protocol
from .roster import Roster
from .rounds import RoundStats

logger = logging.getLogger("fedtt")


class Sync:
    def __init__(self, trainable: list[str], keeps_state: bool):
        self.trainable = trainable
        self.keeps_state = keeps_state
        self.version = {k: 0 for k in trainable}
        self.aggregated = 0                   # rounds whose update was applied
        self.held: dict[int, int] = {}        # node -> the aggregated round whose global state it holds
        self.sending: dict[int, int] = {}     # node -> the state this round's payload brings it to
        self.resync: set[int] = set()         # nodes to send everything this round

    def handshake(self, grid: Grid, roster: Roster, nodes: list[int], keys: set[str], stats: RoundStats) -> None:
        """Ask the nodes about to get a partial payload which global state they hold."""
        self.resync = set()
        if not self.keeps_state:
            return
        partial = [n for n in nodes if len(self.payload(n, keys)) < len(self.trainable)]
        replies = roster.exchange(grid, [protocol.query(n, "synced") for n in partial], protocol.SYNCED_REPLY, stats)
        for node, parsed in replies.items():
            holds = parsed["metrics"]["synced-round"]
            if holds != self.held.get(node, 0):
                logger.warning("node %d holds the global state after round %d, not %d as the server thought (did "
                               "it restart?): it is sent what it lacks", node, holds, self.held.get(node, 0))
            if holds <= self.aggregated:
                self.held[node] = holds
            else:
                self.resync.add(node)

    def payload(self, node: int, keys: set[str]) -> list[str]:
        """The tensors to send ``node``: the round's trained ones and every one that changed since it synced."""
        held = self.held.get(node, 0)
        return [k for k in self.trainable if k in keys or self.version[k] > held or node in self.resync]

    def sent(self, node: int) -> None:
        self.sending[node] = self.aggregated

    def received(self, node: int) -> None:
        """The node answered the train message, so it got the payload."""
        if self.keeps_state:
            self.held[node] = self.sending.get(node, 0)

    def applied(self, names) -> None:
        self.aggregated += 1
        self.version.update({name: self.aggregated for name in names})

    def state_dict(self) -> dict:
        return {"version": self.version, "aggregated": self.aggregated}

    def load_state_dict(self, state: dict) -> None:
        self.version = {name: int(v) for name, v in state["version"].items()}
        self.aggregated = int(state["aggregated"])
