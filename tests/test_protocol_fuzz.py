"""A reply fuzzer: generated malformed and hostile replies at every stage, against the real strategy and the real
secure-aggregation server. The server must raise on none, drop each with a reason, and aggregate exactly what the
valid replies alone give (or, under secure aggregation, nothing at all: never a wrong sum).

The clients here are the adversary, so they are written out: a small honest client plus one hostile node per
case; the strategy, the Flower grid (in-process engine), the codec and the SecAgg+ protocol are the real ones.
"""

from __future__ import annotations

import random
import time
import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtt.config import load_config
from fedtt.engines.inprocess import NODE_ID_OFFSET, InProcessGrid
from fedtt.federated import protocol
from fedtt.federated.codec import pack, unpack
from fedtt.federated.strategy import FedTTStrategy
from fedtt.privacy import secure_aggregation as secure
from fedtt.privacy.secagg import SecAggAbort

SHAPES = {"layer.core_0": (1, 3, 2), "layer.core_1": (2, 4, 1), "head.weight": (2, 5)}
GROUPS = {"layer.core_0": 0, "layer.core_1": 1, "head.weight": None}
NODES = 4
CONFIG = load_config(None, [f"federation.num_clients={NODES}", "federation.min_replies=1", "federation.rounds=3",
                            "federation.max_update_norm=1000.0", "federation.norm_bound='reject'"])


def honest_update(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}


def count(partition: int) -> int:
    return 10 + 5 * partition


def joining_app(hostile_partition=None) -> ClientApp:
    """Nodes answer the partition query honestly, except ``hostile_partition(pid) -> metrics`` for node 0."""
    app = ClientApp()

    @app.query("partition")
    def partition(msg, context):
        pid = int(context.node_config["partition-id"])
        metrics = {"partition-id": pid, "num-examples": count(pid)}
        if hostile_partition is not None and pid == 0:
            metrics = hostile_partition(pid)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def train_reply(message: Message, update: dict, examples: int, extra=None) -> Message:
    arrays, index = pack(update, "float32")
    metrics = {"num-examples": examples, "synced-round": 0, "train_loss": 0.5, **(extra or {})}
    return Message(RecordDict({"arrays": arrays, "wire": index, "metrics": MetricRecord(metrics)}), reply_to=message)


def packed_index(entries, dtype="float32") -> bytes:
    import json
    return zlib.compress(json.dumps({"dtype": dtype, "tensors": entries}).encode())


# Each mutation turns node 0's valid train reply into a hostile one (a new Message, or a list of them).
def _content(reply: Message, **records) -> RecordDict:
    content = {k: v for k, v in reply.content.items()}
    content.update(records)
    return RecordDict({k: v for k, v in content.items() if v is not None})


def _with(reply, message, **records):
    return Message(_content(reply, **records), reply_to=message)


def _metrics(reply, message, **changes):
    metrics = dict(reply.content["metrics"])
    metrics.update(changes)
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return _with(reply, message, metrics=MetricRecord(metrics))


def _update(reply, message, change):
    update = unpack(reply.content["arrays"], reply.content["wire"])
    return train_reply(message, change(update), count(0))


MUTATIONS = {
    "random index bytes": lambda r, m, g: _with(r, m, wire=ConfigRecord({"index": g.randbytes(g.randint(0, 300))})),
    "truncated index": lambda r, m, g: _with(r, m, wire=ConfigRecord({"index": r.content["wire"]["index"][:-3]})),
    "deeply nested index": lambda r, m, g: _with(r, m, wire=ConfigRecord({"index": zlib.compress(b"[" * 100_000)})),
    "index bomb": lambda r, m, g: _with(r, m, wire=ConfigRecord({"index": zlib.compress(b" " * (1 << 23))})),
    "index of wrong shapes": lambda r, m, g: _with(r, m, wire=ConfigRecord({"index": packed_index(
        [[k, [int(np.prod(s))]] for k, s in SHAPES.items()])})),
    "index naming foreign tensors": lambda r, m, g: _with(r, m, wire=ConfigRecord({"index": packed_index(
        [[f"x{i}", list(s)] for i, s in enumerate(SHAPES.values())])})),
    "index with huge dims": lambda r, m, g: _with(r, m, wire=ConfigRecord({"index": packed_index(
        [["layer.core_0", [2**39, 2**39]]])})),
    "index of another dtype": lambda r, m, g: _with(r, m, wire=ConfigRecord({"index": packed_index(
        [[k, list(s)] for k, s in SHAPES.items()], "float16")})),
    "packed array of float64": lambda r, m, g: _with(r, m, arrays=ArrayRecord({"packed": Array(
        np.zeros(sum(int(np.prod(s)) for s in SHAPES.values()), np.float64))})),
    "packed array of garbage bytes": lambda r, m, g: _with(r, m, arrays=ArrayRecord({"packed": Array(
        dtype="float32", shape=(3,), stype="numpy.ndarray", data=g.randbytes(g.randint(0, 40)))})),
    "truncated packed array": lambda r, m, g: _with(r, m, arrays=ArrayRecord({"packed": Array(
        r.content["arrays"]["packed"].numpy()[:-1])})),
    "two arrays": lambda r, m, g: _with(r, m, arrays=ArrayRecord({"packed": r.content["arrays"]["packed"],
                                                                  "extra": Array(np.zeros(2, np.float32))})),
    "NaN update": lambda r, m, g: _update(r, m, lambda u: {**u, "head.weight": np.full((2, 5), np.nan, np.float32)}),
    "inf update": lambda r, m, g: _update(r, m, lambda u: {**u, "layer.core_1": np.full((2, 4, 1), np.inf,
                                                                                          np.float32)}),
    "huge finite update": lambda r, m, g: _update(r, m, lambda u: {k: np.full_like(v, 3e38) for k, v in u.items()}),
    "missing tensor": lambda r, m, g: _update(r, m, lambda u: {k: v for k, v in u.items() if k != "head.weight"}),
    "extra tensor": lambda r, m, g: _update(r, m, lambda u: {**u, "other": np.zeros(3, np.float32)}),
    "no arrays": lambda r, m, g: Message(RecordDict({"wire": r.content["wire"], "metrics": r.content["metrics"]}),
                                         reply_to=m),
    "no wire": lambda r, m, g: Message(RecordDict({"arrays": r.content["arrays"], "metrics": r.content["metrics"]}),
                                       reply_to=m),
    "no metrics": lambda r, m, g: Message(RecordDict({"arrays": r.content["arrays"], "wire": r.content["wire"]}),
                                          reply_to=m),
    "empty content": lambda r, m, g: Message(RecordDict({}), reply_to=m),
    "extra record": lambda r, m, g: _with(r, m, secagg=ConfigRecord({"x": 1})),
    "metrics without num-examples": lambda r, m, g: _metrics(r, m, **{"num-examples": None}),
    "metrics without synced-round": lambda r, m, g: _metrics(r, m, **{"synced-round": None}),
    "foreign partition id": lambda r, m, g: _metrics(r, m, **{"partition-id": 2}),
    "foreign DP record": lambda r, m, g: _metrics(r, m, **{"dp-prior-sigma": 1e-6}),
    "huge num-examples": lambda r, m, g: _metrics(r, m, **{"num-examples": 10**12}),
    "more examples than declared": lambda r, m, g: _metrics(r, m, **{"num-examples": count(0) + 1}),
    "zero num-examples": lambda r, m, g: _metrics(r, m, **{"num-examples": 0}),
    "negative num-examples": lambda r, m, g: _metrics(r, m, **{"num-examples": -5}),
    "float num-examples": lambda r, m, g: _metrics(r, m, **{"num-examples": 12.5}),
    "NaN train loss": lambda r, m, g: _metrics(r, m, train_loss=float("nan")),
    "inf train loss": lambda r, m, g: _metrics(r, m, train_loss=float("inf")),
    "negative square": lambda r, m, g: _metrics(r, m, **{"sq:0": -1.0}),
    "NaN square": lambda r, m, g: _metrics(r, m, **{"sq:1": float("nan")}),
    "NaN epsilon": lambda r, m, g: _metrics(r, m, epsilon=float("nan")),
    "negative synced round": lambda r, m, g: _metrics(r, m, **{"synced-round": -1}),
    "list metric": lambda r, m, g: _metrics(r, m, **{"num-examples": [1, 2]}),
    "error reply": lambda r, m, g: Message(Error(code=0, reason=g.choice(["boom", "<class 'x.Y'>:<'z'>", ""])),
                                           reply_to=m),
    "reply to a past round": "past",
    "duplicated reply": "duplicate",
    "no reply": "silent",
}


def _strategy(grid, hostile_partition=None):
    strategy = FedTTStrategy(CONFIG, GROUPS, SHAPES)
    arrays = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    for i, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"round-1-{i}"  # as the grid does when it pushes them
    return strategy, messages


def _expected(strategy, updates: dict[int, dict], weights: dict[int, float]) -> dict[str, np.ndarray]:
    total = sum(weights.values())
    return {k: sum(weights[n] * updates[n][k].astype(np.float64) for n in updates) / total for k in SHAPES}


def _check_plain_case(name, mutate, seed, grid_app):
    rng, g = np.random.default_rng(seed), random.Random(seed)
    grid = InProcessGrid(grid_app, NODES)
    strategy, messages = _strategy(grid)
    updates = {m.metadata.dst_node_id: honest_update(rng) for m in messages}
    replies = {m.metadata.dst_node_id: train_reply(m, updates[m.metadata.dst_node_id],
                                                   count(m.metadata.dst_node_id - NODE_ID_OFFSET)) for m in messages}
    target = NODE_ID_OFFSET
    message = next(m for m in messages if m.metadata.dst_node_id == target)
    if mutate == "past":
        old = Message(RecordDict(), dst_node_id=target, message_type=protocol.TRAIN)
        old.metadata.__dict__["_message_id"] = "round-0-x"
        sent = [r for n, r in replies.items() if n != target] + [train_reply(old, updates[target], count(0))]
    elif mutate == "duplicate":
        sent = list(replies.values()) + [train_reply(message, honest_update(rng), count(0))]
    elif mutate == "silent":
        sent = [r for n, r in replies.items() if n != target]
    else:
        hostile = mutate(replies[target], message, g)
        sent = [r for n, r in replies.items() if n != target] + [hostile]
    arrays, _ = strategy.aggregate_train(1, sent)  # must not raise
    stats = strategy.rounds[1]
    assert [d["node"] for d in stats.dropped] == [target], (name, stats.dropped)
    assert stats.dropped[0]["reason"] and "\n" not in stats.dropped[0]["reason"], name
    valid = {n: u for n, u in updates.items() if n != target}
    expected = _expected(strategy, valid, {n: float(count(n - NODE_ID_OFFSET)) for n in valid})
    assert arrays is not None, (name, stats.skipped)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), expected[k].astype(np.float32), rtol=1e-6, atol=1e-7)
    assert stats.partitions == [1, 2, 3]


HOSTILE_JOINS = {
    "duplicate partition": lambda pid: {"partition-id": 1, "num-examples": count(1)},
    "no partition id": lambda pid: {"num-examples": count(0)},
    "no count": lambda pid: {"partition-id": pid},
    "negative partition": lambda pid: {"partition-id": -1, "num-examples": count(0)},
    "huge partition": lambda pid: {"partition-id": 2**40, "num-examples": count(0)},
    "float partition": lambda pid: {"partition-id": 0.5, "num-examples": count(0)},
    "huge count": lambda pid: {"partition-id": pid, "num-examples": 2**60},
    "extra key": lambda pid: {"partition-id": pid, "num-examples": count(0), "admin": 1},
}


def test_a_thousand_hostile_train_and_query_replies_never_crash_the_server_and_never_bend_the_aggregate():
    start, cases = time.perf_counter(), 0
    honest_app = joining_app()
    for round_ in range(23):
        for name, mutate in MUTATIONS.items():
            _check_plain_case(name, mutate, seed=round_ * 1000 + cases, grid_app=honest_app)
            cases += 1
    for _ in range(10):
        for name, join in HOSTILE_JOINS.items():
            grid = InProcessGrid(joining_app(join), NODES)
            strategy, messages = _strategy(grid)
            stats = strategy.rounds[1]
            dropped = [d for d in stats.dropped if d["stage"] == protocol.query_type("partition")]
            # node 0 is refused with its reason (a duplicate claim: the later claimant, whichever it is)
            assert len(dropped) == 1 and dropped[0]["reason"], (name, stats.dropped)
            assert len(messages) == NODES - 1, name
            cases += 1
    assert cases >= 1000
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------------------------------- secure aggregation

SECAGG_STAGES = ("secagg_setup", "secagg_share", "secagg_sign", "secagg_unmask")


def _secagg_hostile(stage: str, g: random.Random):
    """A mutation of one node's reply to ``stage`` (its parsed record dict, by record name)."""
    def flip(data: bytes) -> bytes:
        if not data:
            return b"\x01"
        i = g.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << g.randrange(8))]) + data[i + 1:]

    options = {
        "secagg_setup": [lambda c: c.__setitem__("keys", ConfigRecord({"pk1": b"", "pk2": b"x", "vk": b"y"})),
                         lambda c: c.__setitem__("keys", ConfigRecord({"pk1": 5})),
                         lambda c: c.pop("keys"),
                         lambda c: c["keys"].__setitem__("pk1", flip(bytes(c["keys"]["pk1"])))],
        "secagg_share": [lambda c: c["shares"].__setitem__("dst", flip(bytes(c["shares"]["dst"]))),
                         lambda c: c["shares"].__setitem__("ct", bytes(c["shares"]["ct"])[:-7]),
                         lambda c: c["shares"].__setitem__("commit", b"short"),
                         lambda c: c.pop("shares")],
        "secagg_sign": [lambda c: c["consistency"].__setitem__("signature", flip(bytes(c["consistency"]["signature"]))),
                        lambda c: c["consistency"].__setitem__("signature", b""),
                        lambda c: c.pop("consistency")],
        "secagg_unmask": [lambda c: c["shares"].__setitem__("share", flip(bytes(c["shares"]["share"]))),
                          lambda c: c["shares"].__setitem__("share", bytes(c["shares"]["share"])[:-1]),
                          lambda c: c["shares"].__setitem__("owner", b"i" + b"\x00" * 7),
                          lambda c: c.pop("shares")],
    }
    return g.choice(options[stage])


def _secure_round(seed: int, stage: str | None, masked_offset: bool = False):
    """One SecAgg round over NODES real clients (their handlers and state), node 0 hostile at ``stage``."""
    g, rng = random.Random(seed), np.random.default_rng(seed)
    InProcessGrid(ClientApp(), NODES)  # messages are made as the ServerApp's (Flower's task identity)
    cfg = load_config(None, [f"federation.num_clients={NODES}", "federation.min_replies=3",
                             "privacy.secure_aggregation=true", "federation.weighting='uniform'"])
    nodes = [NODE_ID_OFFSET + i for i in range(NODES)]
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
    handlers = {"secagg_setup": lambda m, c: secure.client_setup(m, c, 3),
                "secagg_share": secure.client_share, "secagg_sign": lambda m, c: secure.client_sign(m, c, 3),
                "secagg_unmask": secure.client_unmask}
    mutate = _secagg_hostile(stage, g) if stage else None

    def exchange(messages, schema):
        parsed = {}
        for message in messages:
            node, action = message.metadata.dst_node_id, message.metadata.message_type.split(".", 1)[1]
            try:
                reply = handlers[action](message, contexts[node])
            except ValueError:
                continue  # an honest client refusing is a dropout
            content = {k: v for k, v in reply.content.items()}
            if node == nodes[0] and action == stage:
                mutate(content)
            try:
                parsed[node] = schema.parse(RecordDict(content))
            except protocol.ProtocolError:
                continue
        return parsed

    expected = {k: (s, None) for k, s in SHAPES.items()}
    round_ = secure.SecureRound(cfg, 1, exchange, {k: s for k, (s, _) in expected.items()}, ["0", "1"],
                                {n: 10 for n in nodes})
    inputs = {}
    try:
        extra = round_.setup(nodes)
        masked = {}
        for node, record in extra.items():
            update = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SHAPES.items()}
            squares = {"0": 0.1, "1": 0.2}
            arrays = secure.client_mask(contexts[node], record, update, squares, 10, True, None)
            vector = arrays["masked"].numpy()
            if masked_offset and node == nodes[0]:
                vector = vector + np.uint32(2**31)
            masked[node], inputs[node] = vector, update
        deltas, _, weight = round_.aggregate(masked)
    except (SecAggAbort, protocol.ProtocolError, ValueError) as err:  # what the strategy turns into a skipped round
        assert str(err) and "\n" not in str(err)
        return None
    survivors = round_.server._survivors
    bound = round_.server.params.error_bound(len(survivors)) + 1e-9
    assert weight == pytest.approx(len(survivors), abs=bound)
    for k in SHAPES:
        assert np.abs(deltas[k] - sum(inputs[n][k] for n in survivors)).max() <= bound
    return survivors


def test_hostile_secure_aggregation_replies_abort_or_sum_exactly_the_survivors():
    start, outcomes = time.perf_counter(), []
    for seed in range(60):
        stage = SECAGG_STAGES[seed % len(SECAGG_STAGES)]
        outcomes.append(_secure_round(seed, stage))
    assert _secure_round(999, None) is not None  # the honest round sums everyone
    # a hostile node is dropped at its stage and the round goes on with the three others (a majority of four)
    assert sum(o is not None for o in outcomes) >= 50
    assert time.perf_counter() - start < 60


def test_an_out_of_range_masked_vector_aborts_the_round_instead_of_bending_the_sum():
    assert _secure_round(5, None, masked_offset=True) is None


HOSTILE_SYNCED = [{"synced-round": -1}, {"synced-round": 2**40}, {"synced-round": 1.5}, {}, {"synced-round": "1"},
                  {"synced-round": 0, "extra": 1}, {"synced-round": True}]


@pytest.mark.parametrize("metrics", HOSTILE_SYNCED + [{"synced-round": 7}])
def test_hostile_fedtt_plus_handshake_replies_drop_the_node_or_resync_it(metrics):
    """The ``synced`` stage: a malformed answer drops the node from the round; a well-formed one claiming a state
    the server never sent (round 7 of 0) gets everything, never a partial payload built on what it claims."""
    from fedtt.federated.roster import Roster
    from fedtt.federated.rounds import RoundStats
    from fedtt.federated.sync import Sync

    app = joining_app()

    @app.query("synced")
    def synced(msg, context):
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord(metrics if pid == 0 else {"synced-round": 0})}),
                       reply_to=msg)

    grid, stats = InProcessGrid(app, NODES), RoundStats(1)
    roster, sync = Roster(CONFIG, 1.0), Sync(list(SHAPES), keeps_state=True)
    nodes = roster.sample(grid, stats)
    sync.handshake(grid, roster, nodes, {"layer.core_0"}, stats)  # a partial round: only core 0 trains
    target = NODE_ID_OFFSET
    if metrics == {"synced-round": 7}:
        assert not stats.dropped and sync.payload(target, {"layer.core_0"}) == list(SHAPES)
    else:
        assert [d["node"] for d in stats.dropped] == [target] and stats.dropped[0]["stage"] == "query.synced"
    assert all(sync.payload(n, {"layer.core_0"}) == ["layer.core_0"] for n in nodes if n != target)


def test_nodes_that_keep_no_state_are_never_asked_and_get_every_tensor_changed_since_init():
    """Head-only rounds of a method other than FedTT+ send partial payloads to nodes that keep no synced state: no
    node is asked which state it holds (a handshake would warn each round that every node had restarted), and each
    payload carries the round's tensors plus every tensor a round has changed."""
    from fedtt.federated.sync import Sync

    sync, node, head = Sync(list(SHAPES), keeps_state=False), NODE_ID_OFFSET, {"head.weight"}
    for _ in range(3):  # head-only rounds
        sync.handshake(None, None, [node], head, None)  # asking would need the grid and the roster
        assert sync.payload(node, head) == ["head.weight"]
        sync.sent(node)
        sync.received(node)
        sync.applied(["head.weight"])
    sync.applied(["layer.core_1"])  # a round that trained the adapter: a later head-only payload must carry it
    assert sync.payload(node, head) == ["layer.core_1", "head.weight"]
