"""Secure aggregation as stages of fedtt's Message-API strategy and ClientApp (the protocol: ``secagg``).

Per round, around the usual train messages::

    server                                   client (ClientApp handlers)
    query.secagg_setup    params, roster  -> fresh key pairs; reply (pk1, pk2, vk)
    query.secagg_share    holders' keys,  -> Shamir shares of the self-mask seed and sk1, sealed to each holder;
                          every vk           a commitment to the seed
    train (+ "secagg")    ciphertexts     -> train; mask [w * update, w * mean square per group, w] -> uint32
    query.secagg_sign     survivors U3    -> a signature on (roster, U3, the weights' scale), once per round
    query.secagg_unmask   signatures      -> the seed shares of survivors, the sk1 shares of dropped nodes

The server sums the masked uploads, unmasks only the sum, and divides by the unmasked sum of the weights (the
last coordinate: w = n_c / the largest example count declared at join, or 1 with uniform weighting). It never
holds an individual update in the clear: a reply's arrays are uint32 masked vectors, checked for their form only;
the sum is range-checked after unmasking. A client refuses a round whose roster or survivor set is smaller than
its own floor (node config ``secagg-min-clients``, else ``privacy.secagg_min_clients``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ..federated import protocol
from ..federated.protocol import ProtocolError
from .secagg import SecAggClient, SecAggParams, SecAggServer

logger = logging.getLogger("fedtt")
STATE = "fedtt-secagg"   # context.state record of a client between the stages of a round
MASKED = "masked"


def round_params(privacy, num_clients: int) -> SecAggParams:
    shares = privacy.secagg_num_shares or num_clients
    holders = min(shares, num_clients)
    threshold = privacy.secagg_threshold or holders // 2 + 1
    return SecAggParams(num_clients=num_clients, num_shares=shares, threshold=threshold,
                        clip_range=privacy.secagg_clip_range, quantization_bits=privacy.secagg_bits)


class SecureRound:
    """The server's side of one round. ``exchange(messages, schema) -> {node: parsed reply}`` sends queries,
    counts their bytes and drops replies that do not parse; ``statistics``: the sorted names of the per-client
    statistics masked after the update (FedTT+ group sizes, adaptive clipping's count); ``examples``: each node's
    count declared at join. A masked vector is [the round's tensors in ``expected``'s order, the statistics, w]."""

    def __init__(self, config, server_round: int, exchange, expected: dict[str, tuple[int, ...]],
                 statistics: list[str], examples: dict[int, int]):
        self.config, self.round, self.exchange, self.examples = config, server_round, exchange, examples
        self.names, self.group_names = list(expected), list(statistics)
        self.shapes = [expected[n] for n in self.names]
        self.length = sum(math.prod(s) for s in self.shapes) + len(self.group_names) + 1
        self.context = f"fedtt|{config.seed}|{server_round}".encode()
        self.server: SecAggServer | None = None
        self.max_weight = 1
        self.summary: dict = {}  # results.json: the round's survivors, signers and threshold

    def setup(self, nodes: list[int]) -> dict[int, ConfigRecord]:
        """Stages 0 and 1; returns each node still in the round its train-message record (forwarded shares)."""
        params = round_params(self.config.privacy, len(nodes))
        self.server = SecAggServer(params, nodes, self.context)
        setup = {"context": self.context, "num-clients": params.num_clients, "num-shares": params.num_shares,
                 "threshold": params.threshold, "clip-range": float(params.clip_range).hex(),
                 "bits": params.quantization_bits, "roster": protocol.pack_ids(nodes)}
        replies = self.exchange([protocol.query(n, "secagg_setup", setup) for n in nodes],
                                protocol.SECAGG_SETUP_REPLY)
        keys = {n: (r["keys"]["pk1"], r["keys"]["pk2"], r["keys"]["vk"]) for n, r in replies.items()}
        if self.config.federation.weighting == "examples":
            self.max_weight = max((self.examples.get(n, 1) for n in keys), default=1)
        requests = self.server.share_keys_requests(keys)
        vks = self.server.verification_keys()
        signing = {"vk-ids": protocol.pack_ids(vks), "vks": protocol.pack_blobs(vks.values())}
        replies = self.exchange([protocol.query(n, "secagg_share", {
            "ids": protocol.pack_ids(holders), "pk1": protocol.pack_blobs(k[0] for k in holders.values()),
            "pk2": protocol.pack_blobs(k[1] for k in holders.values()),
            "vk": protocol.pack_blobs(k[2] for k in holders.values()), **signing})
            for n, holders in requests.items()], protocol.SECAGG_SHARE_REPLY)
        sealed, commitments = {}, {}
        for node, reply in replies.items():
            try:
                sealed[node] = protocol.id_map(reply["shares"]["dst"], reply["shares"]["ct"])
                commitments[node] = reply["shares"]["commit"]
            except ProtocolError as err:
                logger.warning("round %d: node %d's shares are malformed (%s): it drops out", self.round, node, err)
        forward = self.server.masked_input_requests(sealed, commitments)
        return {node: ConfigRecord({"src": protocol.pack_ids(cts), "ct": protocol.pack_blobs(cts.values()),
                                    "max-weight": self.max_weight, "length": self.length})
                for node, cts in forward.items()}

    def masked_vector(self, arrays: ArrayRecord) -> np.ndarray:
        """A reply's masked vector, or ProtocolError: it can only be checked for its form."""
        if list(arrays) != [MASKED]:
            raise ProtocolError("the reply's arrays are not one masked vector")
        try:
            vector = arrays[MASKED].numpy()
        except Exception as err:  # Flower's Array.numpy() on arbitrary bytes raises whatever numpy raises
            raise ProtocolError(f"the masked vector cannot be read ({type(err).__name__})") from None
        if vector.dtype != np.uint32 or tuple(vector.shape) != (self.length,):
            raise ProtocolError(f"masked vector is {vector.dtype}{tuple(vector.shape)}, expected "
                                f"uint32({self.length},)")
        return vector

    def aggregate(self, masked: dict[int, np.ndarray]):
        """Stages 2-4: (sum of w * update per tensor, sum of w * mean square per group, sum of w)."""
        survivors = self.server.sign_requests(masked)
        replies = self.exchange([protocol.query(n, "secagg_sign", {"survivors": protocol.pack_ids(survivors)})
                                 for n in survivors], protocol.SECAGG_SIGN_REPLY)
        requests = self.server.unmask_requests({n: r["consistency"]["signature"] for n, r in replies.items()},
                                               self.max_weight)
        signed = {"signers": protocol.pack_ids(self.server.signatures),
                  "signatures": protocol.pack_blobs(self.server.signatures.values())}
        replies = self.exchange([protocol.query(n, "secagg_unmask", {
            "surviving": protocol.pack_ids(alive), "dropped": protocol.pack_ids(gone), **signed})
            for n, (alive, gone) in requests.items()], protocol.SECAGG_UNMASK_REPLY)
        shares = {}
        for node, reply in replies.items():
            try:
                shares[node] = protocol.id_map(reply["shares"]["owner"], reply["shares"]["share"])
            except ProtocolError as err:
                logger.warning("round %d: node %d's unmask reply is malformed (%s)", self.round, node, err)
        total = self.server.aggregate(shares)
        deltas, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = math.prod(shape)
            deltas[name] = total[start:start + size].reshape(shape)
            start += size
        squares = dict(zip(self.group_names, total[start:-1].tolist()))
        self.summary = {"survivors": len(survivors), "signers": len(self.server.signatures),
                         "threshold": self.server.params.threshold, "num_shares": self.server.params.shares}
        return deltas, squares, float(total[-1])


# ------------------------------------------------------------------------------------------------- client

def client_setup(msg: Message, context, min_clients: int) -> Message:
    cfg = msg.content["config"]
    params = SecAggParams(num_clients=int(cfg["num-clients"]), num_shares=int(cfg["num-shares"]),
                          threshold=int(cfg["threshold"]), clip_range=float.fromhex(str(cfg["clip-range"])),
                          quantization_bits=int(cfg["bits"]))
    if params.num_clients < min_clients:
        raise ValueError(f"secure aggregation over {params.num_clients} clients is below this site's minimum of "
                         f"{min_clients}: refusing to take part")
    client = SecAggClient.setup(context.node_id, params, bytes(cfg["context"]), protocol.ids(cfg["roster"]))
    context.state[STATE] = ConfigRecord(client.to_state())
    pk1, pk2, vk = client.public_keys
    return Message(RecordDict({"keys": ConfigRecord({"pk1": pk1, "pk2": pk2, "vk": vk}),
                               "metrics": MetricRecord({})}), reply_to=msg)


def client_share(msg: Message, context) -> Message:
    cfg = msg.content["config"]
    client = _client(context)
    keys = {i: (a, b, c) for i, a, b, c in zip(protocol.ids(cfg["ids"]), protocol.blobs(cfg["pk1"]),
                                               protocol.blobs(cfg["pk2"]), protocol.blobs(cfg["vk"]))}
    sealed, commit = client.share_keys(keys, protocol.id_map(cfg["vk-ids"], cfg["vks"]))
    context.state[STATE] = ConfigRecord(client.to_state())
    return Message(RecordDict({"shares": ConfigRecord({"dst": protocol.pack_ids(sealed),
                                                       "ct": protocol.pack_blobs(sealed.values()), "commit": commit}),
                               "metrics": MetricRecord({})}), reply_to=msg)


def client_mask(context, secagg: ConfigRecord, update: dict[str, np.ndarray], mean_squares: dict[str, float],
                num_examples: int, uniform: bool, rng: np.random.Generator | None) -> ArrayRecord:
    """The masked upload: [w * update (the round's tensors, in order), w * each statistic (sorted by name), w]."""
    names, group_names = list(update), sorted(mean_squares)
    max_weight = int(secagg["max-weight"])
    weight = 1.0 if uniform else num_examples / max_weight
    x = np.concatenate([update[n].reshape(-1).astype(np.float64) for n in names]
                       + [np.array([mean_squares[g] for g in group_names], dtype=np.float64), np.ones(1)]) * weight
    if len(x) != int(secagg["length"]):
        raise ValueError(f"the round's masked vector has {secagg['length']} values, this client's update {len(x)}")
    client = _client(context)
    masked = client.masked_input(protocol.id_map(secagg["src"], secagg["ct"]), x, max_weight, rng)
    context.state[STATE] = ConfigRecord(client.to_state())
    return ArrayRecord({MASKED: Array(masked)})


def client_sign(msg: Message, context, min_clients: int) -> Message:
    client = _client(context)
    signature = client.sign(protocol.ids(msg.content["config"]["survivors"]), min_clients)
    context.state[STATE] = ConfigRecord(client.to_state())
    return Message(RecordDict({"consistency": ConfigRecord({"signature": signature}), "metrics": MetricRecord({})}),
                   reply_to=msg)


def client_unmask(msg: Message, context) -> Message:
    cfg = msg.content["config"]
    client = _client(context)
    shares = client.unmask(protocol.ids(cfg["surviving"]), protocol.ids(cfg["dropped"]),
                           protocol.id_map(cfg["signers"], cfg["signatures"]))
    context.state[STATE] = ConfigRecord(client.to_state())
    return Message(RecordDict({"shares": ConfigRecord({"owner": protocol.pack_ids(shares),
                                                       "share": protocol.pack_blobs(shares.values())}),
                               "metrics": MetricRecord({})}), reply_to=msg)


def _client(context) -> SecAggClient:
    if STATE not in context.state.config_records:
        raise ValueError("secure aggregation stage out of order: this node has no key setup for the round")
    return SecAggClient.from_state(dict(context.state[STATE]))

