"""Secure aggregation as stages of fedtt's Message-API strategy and ClientApp (the protocol: ``secagg``).

Per round, around the usual train messages::

    server                                   client (ClientApp handlers)
    query.secagg_setup    params, context -> fresh key pairs; reply (pk1, pk2) and num-examples
    query.secagg_share    holders' keys   -> Shamir shares of the self-mask seed and sk1, sealed to each holder
    train (+ "secagg")    ciphertexts     -> train; mask [w * update, w * mean square per group] -> uint32
    query.secagg_unmask   survivors/dropped -> the seed shares of survivors, the sk1 shares of dropped nodes

The server sums the masked uploads, unmasks only the sum, and divides by the sum of the weights (w = n_c / the
largest n of the round, or 1 with uniform weighting; n_c is sent in plaintext, as in Flower's SecAgg+). It
never holds an individual update in the clear: a reply's arrays are uint32 masked vectors, checked for their
form only; the aggregate is checked after unmasking. Clients check their own update before masking and refuse
a round smaller than ``privacy.secagg_min_clients`` (the server picks the sample, so the client must guard).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from .secagg import SecAggClient, SecAggParams, SecAggServer

logger = logging.getLogger("fedtt")
STATE = "fedtt-secagg"   # context.state record of a client between the stages of a round
MASKED = "masked"


# Lists cross as one bytes value each, led by a tag byte: Flower's ConfigRecord.count_bytes cannot count an
# empty list, an empty bytes value, or node ids above 2**63 in an int list.
def _ids(ids) -> bytes:
    return b"i" + np.asarray(list(ids), dtype=">u8").tobytes()


def _from_ids(data) -> list[int]:
    return [int(i) for i in np.frombuffer(bytes(data)[1:], dtype=">u8")]


def _blobs(values) -> bytes:
    return b"b" + b"".join(len(v).to_bytes(4, "big") + bytes(v) for v in values)


def _from_blobs(data) -> list[bytes]:
    data, out, at = bytes(data), [], 1
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        out.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return out


def layout(expected: dict[str, tuple[int, ...]], groups: dict[str, object]) -> tuple[list[str], list[str]]:
    """The order of a masked vector: every tensor of the round (flattened), then each group's mean square."""
    names = list(expected)
    return names, sorted({str(groups[n]) for n in names if groups.get(n) is not None})


def round_params(privacy, num_clients: int) -> SecAggParams:
    shares = privacy.secagg_num_shares or num_clients
    holders = min(shares, num_clients)
    threshold = privacy.secagg_threshold or holders // 2 + 1
    return SecAggParams(num_clients=num_clients, num_shares=shares, threshold=threshold,
                        clip_range=privacy.secagg_clip_range, quantization_bits=privacy.secagg_bits)


class SecureRound:
    """The server's side of one round; ``exchange(messages) -> replies`` sends queries and counts their bytes."""

    def __init__(self, config, server_round: int, exchange, expected: dict[str, tuple[int, ...]],
                 groups: dict[str, object]):
        self.config, self.round, self.exchange = config, server_round, exchange
        self.names, self.group_names = layout(expected, groups)
        self.shapes = [expected[n] for n in self.names]
        self.length = sum(math.prod(s) for s in self.shapes) + len(self.group_names)
        self.context = f"fedtt|{config.seed}|{server_round}".encode()
        self.server: SecAggServer | None = None
        self.max_weight = 1

    def setup(self, nodes: list[int]) -> dict[int, ConfigRecord]:
        """Stages 0 and 1; returns each node still in the round its train-message record (forwarded shares)."""
        params = round_params(self.config.privacy, len(nodes))
        self.server = SecAggServer(params, nodes, self.context, seed=self.config.seed * 1_000_003 + self.round)
        setup = ConfigRecord({"context": self.context, "num-clients": params.num_clients,
                              "num-shares": params.num_shares, "threshold": params.threshold,
                              "clip-range": float(params.clip_range).hex(), "bits": params.quantization_bits})
        replies = self._ask("secagg_setup", {node: setup for node in nodes})
        keys = {node: (bytes(r["keys"]["pk1"]), bytes(r["keys"]["pk2"])) for node, r in replies.items()}
        if self.config.federation.weighting == "examples":
            self.max_weight = max(int(r["metrics"]["num-examples"]) for r in replies.values()) if replies else 1
        requests = self.server.share_keys_requests(keys)
        replies = self._ask("secagg_share", {node: ConfigRecord({
            "ids": _ids(holders), "pk1": _blobs(k[0] for k in holders.values()),
            "pk2": _blobs(k[1] for k in holders.values())}) for node, holders in requests.items()})
        sealed = {node: dict(zip(_from_ids(r["shares"]["dst"]), _from_blobs(r["shares"]["ct"])))
                  for node, r in replies.items()}
        forward = self.server.masked_input_requests(sealed)
        return {node: ConfigRecord({"src": _ids(cts), "ct": _blobs(cts.values()), "max-weight": self.max_weight,
                                    "length": self.length}) for node, cts in forward.items()}

    def check_masked(self, content: RecordDict) -> str | None:
        arrays = content["arrays"]
        if MASKED not in arrays:
            return "reply lacks its masked vector"
        vector = arrays[MASKED]
        if vector.dtype != "uint32" or tuple(vector.shape) != (self.length,):
            return f"masked vector is {vector.dtype}{tuple(vector.shape)}, expected uint32({self.length},)"
        return None

    def aggregate(self, contents: dict[int, RecordDict], weights: dict[int, float]):
        """Stages 2 and 3: (sum of w * update per tensor, sum of w * mean square per group, sum of w)."""
        masked = {node: content["arrays"][MASKED].numpy() for node, content in contents.items()}
        requests = self.server.unmask_requests(masked)
        replies = self._ask("secagg_unmask", {node: ConfigRecord({"surviving": _ids(alive), "dropped": _ids(gone)})
                                              for node, (alive, gone) in requests.items()})
        shares = {node: dict(zip(_from_ids(r["shares"]["owner"]), _from_blobs(r["shares"]["share"])))
                  for node, r in replies.items()}
        total = self.server.aggregate(shares)
        deltas, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            deltas[name] = total[start:start + size].reshape(shape)
            start += size
        squares = dict(zip(self.group_names, total[start:].tolist()))
        weight = sum(weights[node] for node in masked) / self.max_weight
        return deltas, squares, weight

    def _ask(self, action: str, configs: dict[int, ConfigRecord]) -> dict[int, RecordDict]:
        messages = [Message(RecordDict({"config": c}), message_type=f"{MessageType.QUERY}.{action}", dst_node_id=node)
                    for node, c in configs.items()]
        return {reply.metadata.src_node_id: reply.content for reply in self.exchange(messages)}


# ------------------------------------------------------------------------------------------------- client

def client_setup(msg: Message, context, num_examples: int, min_clients: int) -> Message:
    cfg = msg.content["config"]
    params = SecAggParams(num_clients=int(cfg["num-clients"]), num_shares=int(cfg["num-shares"]),
                          threshold=int(cfg["threshold"]), clip_range=float.fromhex(str(cfg["clip-range"])),
                          quantization_bits=int(cfg["bits"]))
    if params.num_clients < min_clients:
        raise ValueError(f"secure aggregation over {params.num_clients} clients is below this client's minimum "
                         f"privacy.secagg_min_clients = {min_clients}: refusing to take part")
    client = SecAggClient.setup(context.node_id, params, bytes(cfg["context"]))
    context.state[STATE] = ConfigRecord(client.to_state())
    pk1, pk2 = client.public_keys
    return Message(RecordDict({"keys": ConfigRecord({"pk1": pk1, "pk2": pk2}),
                               "metrics": MetricRecord({"num-examples": num_examples})}), reply_to=msg)


def client_share(msg: Message, context) -> Message:
    cfg = msg.content["config"]
    client = _client(context)
    keys = {i: (a, b) for i, a, b in zip(_from_ids(cfg["ids"]), _from_blobs(cfg["pk1"]), _from_blobs(cfg["pk2"]))}
    sealed = client.share_keys(keys)
    context.state[STATE] = ConfigRecord(client.to_state())
    return Message(RecordDict({"shares": ConfigRecord({"dst": _ids(sealed), "ct": _blobs(sealed.values())}),
                               "metrics": MetricRecord({})}), reply_to=msg)


def client_mask(context, secagg: ConfigRecord, update: dict[str, np.ndarray], mean_squares: dict[str, float],
                num_examples: int, uniform: bool, seed: int) -> ArrayRecord:
    """The masked upload: [w * update (the round's tensors, in order), w * mean square per group] as uint32."""
    names, group_names = list(update), sorted(mean_squares)
    weight = 1.0 if uniform else num_examples / int(secagg["max-weight"])
    x = np.concatenate([update[n].reshape(-1).astype(np.float64) for n in names]
                       + [np.array([mean_squares[g] for g in group_names], dtype=np.float64)]) * weight
    if len(x) != int(secagg["length"]):
        raise ValueError(f"the round's masked vector has {secagg['length']} values, this client's update {len(x)}")
    client = _client(context)
    masked = client.masked_input(dict(zip(_from_ids(secagg["src"]), _from_blobs(secagg["ct"]))), x,
                                 np.random.default_rng(seed))
    context.state[STATE] = ConfigRecord(client.to_state())
    return ArrayRecord({MASKED: Array(masked)})


def client_unmask(msg: Message, context) -> Message:
    cfg = msg.content["config"]
    client = _client(context)
    shares = client.unmask(_from_ids(cfg["surviving"]), _from_ids(cfg["dropped"]))
    context.state[STATE] = ConfigRecord(client.to_state())
    return Message(RecordDict({"shares": ConfigRecord({"owner": _ids(shares), "share": _blobs(shares.values())}),
                               "metrics": MetricRecord({})}), reply_to=msg)


def _client(context) -> SecAggClient:
    if STATE not in context.state.config_records:
        raise ValueError("secure aggregation stage out of order: this node has no key setup for the round")
    return SecAggClient.from_state(dict(context.state[STATE]))
