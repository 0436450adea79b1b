"""One round's accounting on the server: who was sampled and dropped (and why), what crossed the wire, what was
learned. The ServerApp turns it into the round's entry of results.json."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message

from .codec import num_values

logger = logging.getLogger("fedtt")


@dataclass
class RoundStats:
    round: int
    started: float = field(default_factory=time.monotonic)
    sampled: int = 0
    lr: float = 0.0
    groups: list | None = None                         # FedTT+: the round's trained groups
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the tensors a reply must carry
    partitions: list[int] = field(default_factory=list)  # the partitions whose replies were aggregated
    contributed: int = 0
    train_loss: float | None = None                    # the weighted mean, when clients send theirs in the clear
    agreement: dict[str, float] = field(default_factory=dict)
    params_down: int = 0
    bytes_down: int = 0
    params_up: int = 0
    bytes_up: int = 0
    dropped: list[dict] = field(default_factory=list)  # {"node", "stage", "reason"}: replies not used, and why
    privacy: dict[str, dict] = field(default_factory=dict)  # per partition: its DP accounting as it reported it
    secure_aggregation: dict | None = None
    client_dp: dict | None = None                      # user-level epsilon so far, the clip, the sum's noise
    skipped: str | None = None                         # why the round kept the global adapter
    seconds: float | None = None

    def count_down(self, messages: Iterable[Message], params: bool = False) -> None:
        """Bytes (and, for train messages, values) as Flower serialises each record of what the server sent."""
        for message in messages:
            self.bytes_down += sum(r.count_bytes() for r in message.content.values())
            if params and "arrays" in message.content.array_records:
                self.params_down += num_values(message.content["arrays"])

    def count_up(self, reply: Message, params: bool = False) -> None:
        """What came up, counted whether or not it is used (a hostile reply costs traffic too)."""
        try:
            self.bytes_up += sum(r.count_bytes() for r in reply.content.values())
            if params and "arrays" in reply.content.array_records:
                self.params_up += num_values(reply.content["arrays"])
        except Exception as err:  # the reply's records are whatever the client sent
            logger.debug("round %d: a reply's size could not be counted: %s", self.round, err)

    def drop(self, node: int, stage: str, reason: str) -> None:
        logger.warning("round %d: dropped the reply of node %d (%s): %s", self.round, node, stage, reason)
        self.dropped.append({"node": node, "stage": stage, "reason": reason})

    def gone(self) -> set[int]:
        return {d["node"] for d in self.dropped}

    def finish(self) -> None:
        self.seconds = round(time.monotonic() - self.started, 3)

    def entry(self) -> dict:
        """The round's fields of results.json (the ServerApp adds the evaluation)."""
        entry = {"clients": self.contributed, "sampled": self.sampled, "train_loss": self.train_loss, "lr": self.lr,
                 "params_up": self.params_up, "params_down": self.params_down, "bytes_up": self.bytes_up,
                 "bytes_down": self.bytes_down, "partitions": self.partitions, "groups": self.groups,
                 "agreement": self.agreement, "dropped": self.dropped, "seconds": self.seconds}
        if self.skipped:
            entry["skipped"] = self.skipped
        for key in ("secure_aggregation", "client_dp"):
            if getattr(self, key):
                entry[key] = getattr(self, key)
        return entry
