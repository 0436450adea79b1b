"""The FedTT server strategy: a Flower ``Strategy`` (Message API) that sends only what is trained and trusts no
reply's bytes.

``configure_train``: start the round, sample the clients (``roster``), plan what trains, ask FedTT+ nodes what
they hold (``sync``), run the secure aggregation setup, build the train messages. ``aggregate_train``: parse and
bound every reply (a reply that fails is dropped with its reason, never raised on), combine the valid ones
(``aggregate``; under secure aggregation only their sum is unmasked), take the server optimiser's step from the
mean (``server_opt``; FedAvg by default), merge, account. Bytes are counted as Flower serialises the records of
each message, summed over clients and every stage of the round (queries included); transport framing (gRPC /
HTTP) is not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..config import Config
from ..learning.train import learning_rate
from ..privacy import client_dp
from ..privacy.secagg import SecAggAbort
from ..privacy.secure_aggregation import SecureRound
from . import aggregate, protocol
from .aggregate import Reply
from .codec import pack, unpack
from .freezing import FreezingPolicy, Group, head_only_round, nodes_keep_state, round_keys
from .protocol import ProtocolError
from .roster import Roster
from .rounds import RoundStats
from .server_opt import ServerOptimizer
from .sync import Sync

logger = logging.getLogger("fedtt")


class FedTTStrategy(FedAvg):
    """Example-weighted FedAvg of the clients' updates, with FedTT+ group freezing when ``policy`` is set."""

    def __init__(self, config: Config, groups: dict[str, Group | None], shapes: dict[str, tuple[int, ...]],
                 policy: FreezingPolicy | None = None, head: list[str] = ()):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=config.federation.num_clients,
                         min_train_nodes=config.clients_per_round)
        self.config, self.groups, self.shapes, self.policy = config, dict(groups), dict(shapes), policy
        self.head = list(head)  # the task head's tensors: alone trained and sent in head-only rounds
        self.roster = Roster(config, config.federation.round_timeout)
        self.sync = Sync(list(groups), nodes_keep_state(config))
        self.rounds: dict[int, RoundStats] = {}  # per-round accounting, read by the ServerApp
        self.dp_steps: dict[int, int] = {}        # partition -> DP-SGD steps it reported (sent back on resume)
        self.global_arrays: ArrayRecord | None = None
        self.secure: SecureRound | None = None
        self.sent: dict[int, list[Message]] = {}
        self.client_dp = client_dp.ServerClientDP(client_dp.ClientDP.of(config), config.privacy.client_dp_placement
                                                  == "server") if config.privacy.client_dp else None
        self.server_opt = ServerOptimizer.of(config.federation)
        self.resumed_from = 0  # rounds done before this process (a resumed run): Flower counts rounds from 1

    def global_round(self, server_round: int) -> int:
        """The run's round number of Flower's ``server_round`` (they differ after a resume)."""
        return server_round + self.resumed_from

    @property
    def aggregated(self) -> int:
        return self.sync.aggregated

    @property
    def first_error(self) -> str | None:
        """The first problem of this process's rounds (a run that never aggregated reports it)."""
        for stats in self.rounds.values():
            if stats.dropped:
                return f"round {stats.round}: node {stats.dropped[0]['node']}: {stats.dropped[0]['reason']}"
            if stats.skipped:
                return f"round {stats.round}: {stats.skipped}"
        return None

    # ------------------------------------------------------------------------------------- state (resume)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly: the sampler, the tensor versions, the FedTT+ policy, the
        server optimiser's step counts (its moments: ``state_tensors``)."""
        return {**self.roster.state_dict(), **self.sync.state_dict(), "server_opt": self.server_opt.state_dict(),
                "client_dp": self.client_dp.state_dict() if self.client_dp else None,
                "dp_steps": {str(k): v for k, v in self.dp_steps.items()},
                "policy": self.policy.state_dict() if self.policy else None}

    def state_tensors(self) -> dict[str, np.ndarray]:
        return self.server_opt.tensors()

    def load_state_dict(self, state: dict, completed_rounds: int, tensors: dict[str, np.ndarray] | None = None) -> None:
        self.roster.load_state_dict(state)
        self.server_opt.load_state_dict(state.get("server_opt"), tensors or {})
        self.sync.load_state_dict(state)
        self.dp_steps = {int(k): int(v) for k, v in state["dp_steps"].items()}
        if self.client_dp:
            self.client_dp.load_state_dict(state["client_dp"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        self.resumed_from = completed_rounds

    # ---------------------------------------------------------------------------------------- configure

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        stats = self._start(self.global_round(server_round), arrays)
        nodes = self.roster.sample(grid, stats)
        keys = self._plan(stats, len(nodes))
        self.sync.handshake(grid, self.roster, self._answering(nodes, stats), keys, stats)
        extra = self._secure_setup(grid, self._answering(nodes, stats), stats)
        messages = [self._train_message(node, keys, stats, extra.get(node))
                    for node in self._answering(nodes, stats) if self.secure is None or node in extra]
        self.sent[stats.round] = messages  # the grid sets their ids when it pushes them
        return messages

    def _start(self, server_round: int, arrays: ArrayRecord) -> RoundStats:
        self.global_arrays, self.secure = arrays, None
        stats = self.rounds[server_round] = RoundStats(server_round)
        if self.client_dp:
            stats.client_dp = self.client_dp.record(server_round)
        return stats

    def _plan(self, stats: RoundStats, sampled: int) -> set[str]:
        """The round's trained groups (FedTT+), tensors and learning rate."""
        head_only = head_only_round(self.config, stats.round)
        active = self.policy.trainable(stats.round) if self.policy and not head_only else None
        keys = round_keys(self.groups, active, self.head if head_only else ())
        stats.sampled, stats.groups, stats.lr = sampled, active, learning_rate(self.config, stats.round)
        stats.expected = {k: self.shapes[k] for k in keys}
        return set(keys)

    @staticmethod
    def _answering(nodes: list[int], stats: RoundStats) -> list[int]:
        """The nodes not yet dropped from the round (a node that failed a query stage is not asked again)."""
        gone = stats.gone()
        return [node for node in nodes if node not in gone]

    def _secure_setup(self, grid: Grid, nodes: list[int], stats: RoundStats) -> dict[int, ConfigRecord]:
        """Secure aggregation's key stages; a setup that cannot complete skips the round with its reason."""
        if not self.config.privacy.secure_aggregation:
            return {}
        self.secure = SecureRound(self.config, stats.round, lambda asks, schema: self.roster.exchange(
            grid, asks, schema, stats), stats.expected, self._statistics(stats.expected), self.roster.examples)
        try:
            return self.secure.setup(nodes)
        except (SecAggAbort, ValueError) as err:
            stats.skipped = f"secure aggregation setup failed: {err}"
            logger.warning("round %d: %s", stats.round, stats.skipped)
            return {}

    def _statistics(self, expected: dict[str, tuple[int, ...]]) -> list[str]:
        """The per-client statistics a reply carries beside its update (masked with it under SecAgg): each FedTT+
        group's update size, which client-level DP withholds (un-noised), and adaptive clipping's indicator."""
        if self.client_dp:
            return [protocol.CLIP_BIT] if self.client_dp.plan.count_noise else []
        return sorted({protocol.group_name(self.groups[n]) for n in expected if self.groups.get(n) is not None})

    def _train_message(self, node: int, keys: set[str], stats: RoundStats, extra: ConfigRecord | None) -> Message:
        down = self.sync.payload(node, keys)
        self.sync.sent(node)
        arrays, index = pack({k: self.global_arrays[k].numpy() for k in down}, self.config.federation.wire_dtype)
        config = ConfigRecord({"server-round": stats.round, "lr": stats.lr, "full": len(down) == len(self.groups),
                               "base-round": self.sync.held.get(node, 0), "sync-round": self.sync.aggregated,
                               "dp-prior-steps": self.dp_steps.get(self.roster.partition_of.get(node, -1), 0)})
        if stats.groups is not None:
            config["groups"] = [protocol.group_name(g) for g in stats.groups]
        if self.client_dp:
            config["client-dp-clip"] = self.client_dp.clip
        content = RecordDict({"arrays": arrays, "wire": index, "config": config})
        if extra is not None:
            content["secagg"] = extra
        message = Message(content=content, message_type=protocol.TRAIN, dst_node_id=node)
        stats.count_down([message], params=True)
        return message

    # ---------------------------------------------------------------------------------------- aggregate

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                      MetricRecord | None]:
        stats = self.rounds[self.global_round(server_round)]
        try:
            valid = self._collect(stats, replies)
            if stats.skipped:
                return self._skip(stats, stats.skipped)
            if len(valid) < self.config.federation.min_replies:
                return self._skip(stats, f"{len(valid)} of {stats.sampled} replies valid")
            combined = self._combine(stats, valid)
            if combined is None:
                return None, None
            mean, squares = combined
            step, opt_state = self.server_opt.step(mean)
            merged, problem = aggregate.merge(self.global_arrays, step)
            if problem:
                return self._skip(stats, f"the aggregate is unusable: {problem}")
            self.server_opt.accept(opt_state)
            self.sync.applied(mean)
            self._account(stats, valid, mean, squares)
            return merged, MetricRecord({} if stats.train_loss is None else {"train_loss": stats.train_loss})
        finally:  # the round's wall time: from sampling to the merged adapter, every stage included
            stats.finish()

    def _collect(self, stats: RoundStats, replies: Iterable[Message]) -> list[Reply]:
        """The valid replies in partition order (a fixed summation order on every engine); every other reply,
        and every node that did not answer, is recorded with its reason. Bytes and values count everything."""
        valid = []
        for node, message in self.roster.answers(self.sent.pop(stats.round, []), replies, stats):
            self.sync.received(node)
            stats.count_up(message, params=True)
            try:
                valid.append(self._check(node, message.content, stats))
            except ProtocolError as err:
                stats.drop(node, protocol.TRAIN, str(err))
        return sorted(valid, key=lambda r: r.partition)

    def _check(self, node: int, content: RecordDict, stats: RoundStats) -> Reply:
        """Parse one train reply and bound it; ProtocolError says why it cannot be used."""
        parsed = protocol.TRAIN_REPLY.parse(content)
        metrics = parsed["metrics"]
        fed = self.config.federation
        problem = aggregate.check_count(metrics["num-examples"], self.roster.examples.get(node), fed.max_examples)
        if problem:
            raise ProtocolError(problem)
        weight = float(metrics["num-examples"]) if fed.weighting == "examples" else 1.0
        partition = self.roster.partition_of[node]
        if self.secure is not None:
            return Reply(node, partition, weight, metrics, None, self.secure.masked_vector(parsed["arrays"]))
        if "wire" not in parsed:
            raise ProtocolError("the reply lacks its 'wire' index")
        try:
            update = unpack(parsed["arrays"], parsed["wire"])
        except ValueError as err:
            raise ProtocolError(str(err)) from None
        problem = aggregate.check_update(update, stats.expected)
        update, problem = (update, problem) if problem else aggregate.bound_norm(update, fed.max_update_norm,
                                                                                fed.norm_bound)
        if problem:
            raise ProtocolError(problem)
        if self.client_dp:  # the noise is calibrated to the clip: no reply may exceed it (wire rounding included)
            update, _ = client_dp.clip(update, self.client_dp.clip)
        return Reply(node, partition, weight, metrics, update, None)

    def _combine(self, stats: RoundStats, valid: list[Reply]):
        """(mean update per tensor, weighted mean square per group) of the valid replies, or None (skipped)."""
        fed = self.config.federation
        if self.secure is not None:
            try:
                deltas, squares, weight = self.secure.aggregate({r.node: r.masked for r in valid})
            except (SecAggAbort, ProtocolError) as err:
                self._skip(stats, f"secure aggregation aborted: {err}")
                return None
            stats.secure_aggregation = dict(self.secure.summary)
        else:
            deltas, squares, weight = aggregate.weighted_sums(
                [(r.weight, r.update, aggregate.squares_of(r.metrics)) for r in valid])
        if self.client_dp:  # no per-client statistic is used but the clip count
            mean = self.client_dp.release(deltas, squares.get(protocol.CLIP_BIT, 0.0))
            stats.client_dp["next_clip"] = self.client_dp.clip
            return mean, {}
        if weight <= 0:
            self._skip(stats, "the replies' weights sum to 0")
            return None
        mean = {k: v / weight for k, v in deltas.items()}
        if fed.aggregator != "mean":
            mean = aggregate.robust_mean([r.update for r in valid], fed.aggregator, fed.trim_fraction)
        return mean, {g: s / weight for g, s in squares.items()}

    def _account(self, stats: RoundStats, valid: list[Reply], mean: dict[str, np.ndarray],
                 squares: dict[str, float]) -> None:
        stats.partitions = [r.partition for r in valid]
        stats.contributed = len(valid)
        total = sum(r.weight for r in valid)
        if all("train_loss" in r.metrics for r in valid):  # absent under DP and secure aggregation
            stats.train_loss = float(sum(r.weight * r.metrics["train_loss"] for r in valid) / total)
        shares = np.array([r.weight for r in valid]) / total
        agreement = aggregate.agreement(mean, squares, float((shares ** 2).sum()), self.groups)
        stats.agreement = {protocol.group_name(g): a for g, a in agreement.items()}
        if self.policy is not None:
            self.policy.observe(stats.round, agreement)
        for r in valid:
            self._account_privacy(r, stats)
        if self.client_dp:
            self.client_dp.took_part(stats.partitions)
            stats.client_dp["epsilon_unamplified"] = self.client_dp.unamplified()

    def _account_privacy(self, reply: Reply, stats: RoundStats) -> None:
        """A client's DP accounting as it reports it, recorded under the partition its node declared."""
        m = reply.metrics
        if "epsilon" in m and "dp-steps" in m:
            self.dp_steps[reply.partition] = max(self.dp_steps.get(reply.partition, 0), int(m["dp-steps"]))
            stats.privacy[str(reply.partition)] = {
                "epsilon": m["epsilon"], "delta": m.get("delta"), "noise_multiplier": m.get("noise-multiplier"),
                "sample_rate": m.get("sample-rate"), "steps": m["dp-steps"]}

    def _skip(self, stats: RoundStats, why: str) -> tuple[None, None]:
        logger.warning("round %d: %s (federation.min_replies = %d); the global adapter is kept", stats.round, why,
                       self.config.federation.min_replies)
        stats.skipped = why
        return None, None
