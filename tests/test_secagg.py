"""SecAgg+ (fedtt.privacy.secagg): exact unmasking, dropouts, uniform-looking uploads, the PRG, the consistency round
against a server that lies about who dropped, refusals, robustness to bad shares and vectors, state.

Real crypto, no mocks. Unless a test says otherwise every client is serialised through a Flower ConfigRecord before
each of its stages, as the ClientApp keeps it in ``context.state``.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from fedtt.privacy.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    commitment,
    pairwise_mask,
    prg,
    public_key_of,
    ring_neighbours,
    survivors_statement,
)

CTX = b"run-42|round-3"
FULL = SecAggParams(num_clients=5, num_shares=5, threshold=3, clip_range=1.0, quantization_bits=16)
RING = SecAggParams(num_clients=7, num_shares=3, threshold=2, clip_range=1.0, quantization_bits=16)
NINE = SecAggParams(num_clients=9, num_shares=5, threshold=3, clip_range=1.0, quantization_bits=16)


def _inputs(params: SecAggParams, length: int = 1000) -> dict[int, np.ndarray]:
    """Inputs of random uint64-sized node ids (Flower's), some values beyond the clip range."""
    rng = np.random.default_rng(7)
    ids = rng.integers(1, 2**64 - 1, size=params.num_clients, dtype=np.uint64)
    return {int(i): rng.normal(0.0, 0.7, length) for i in ids}


def _reload(client: SecAggClient) -> SecAggClient:
    return SecAggClient.from_state(dict(ConfigRecord(client.to_state())))


def _clipped_sum(params, xs, nodes):
    return sum(np.clip(xs[n], -params.clip_range, params.clip_range) for n in nodes)


class _Round:
    """One round of real clients and the (honest) server. ``drop[stage]``: the nodes that stop replying at that
    stage (0 keys, 1 shares, 2 masked vector, 3 signature, 4 unmask shares)."""

    def __init__(self, params, xs, drop=None, *, rounding_seed=0, roundtrip=True, max_weight=1):
        self.params, self.xs, self.drop = params, xs, drop or {}
        self.rounding_seed, self.roundtrip, self.max_weight = rounding_seed, roundtrip, max_weight
        self.server = SecAggServer(params, list(xs), CTX)
        self.clients = {nid: SecAggClient.setup(nid, params, CTX, list(xs)) for nid in xs}
        self.masked: dict[int, np.ndarray] = {}

    def answer(self, stage, requests, call):
        """Each requested node that has not dropped at this stage answers, after a trip through a ConfigRecord."""
        replies = {}
        for nid, request in requests.items():
            if nid in self.drop.get(stage, ()):
                continue
            if self.roundtrip:
                self.clients[nid] = _reload(self.clients[nid])
            replies[nid] = call(self.clients[nid], request)
        return replies

    def to_mask(self) -> dict[int, dict[int, bytes]]:
        """Stages 0-1; returns the stage-2 requests (the forwarded ciphertexts)."""
        keys = self.answer(0, dict.fromkeys(self.xs), lambda c, _: c.public_keys)
        vks = self.server.share_keys_requests(keys), self.server.verification_keys()
        shared = self.answer(1, vks[0], lambda c, r: c.share_keys(r, vks[1]))
        return self.server.masked_input_requests({n: s[0] for n, s in shared.items()},
                                                 {n: s[1] for n, s in shared.items()})

    def masked_input(self, client, ciphertexts):
        rng = np.random.default_rng([self.rounding_seed, client.node_id])
        return client.masked_input(ciphertexts, self.xs[client.node_id], self.max_weight, rng=rng)

    def to_sign(self) -> list[int]:
        """Stages 0-2; returns the survivor set U3 the server asks the survivors to sign."""
        requests = self.to_mask()
        self.masked = self.answer(2, requests, self.masked_input)
        return self.server.sign_requests(self.masked)

    def to_unmask(self) -> dict[int, tuple[list[int], list[int]]]:
        """Stages 0-3; returns the stage-4 requests {holder: (surviving, dropped)}."""
        survivors = self.to_sign()
        signatures = self.answer(3, dict.fromkeys(survivors, survivors), lambda c, u3: c.sign(u3))
        return self.server.unmask_requests(signatures, self.max_weight)

    def unmask(self, client, request):
        return client.unmask(*request, self.server.signatures)

    def run(self) -> np.ndarray:
        requests = self.to_unmask()
        return self.server.aggregate(self.answer(4, requests, self.unmask))


def _run(params, xs, drop=None, **kwargs):
    """A whole round; returns the unmasked sum and the survivors (the nodes whose vectors are in it)."""
    rnd = _Round(params, xs, drop, **kwargs)
    total = rnd.run()
    return total, sorted(rnd.masked)


def _is_ring_window(graph: dict[int, list[int]], k: int) -> bool:
    """Whether each node's neighbours are its k - 1 nearest (k // 2 either side) on some cyclic order of the nodes."""
    nodes, half = sorted(graph), k // 2

    def extend(order):
        if len(order) == len(nodes):
            n = len(order)
            return all(sorted(order[(i + o) % n] for o in range(-half, half + 1) if o) == graph[v]
                       for i, v in enumerate(order))
        return any(extend(order + [v]) for v in graph[order[-1]]
                   if v not in order and all(v in graph[w] for w in order[-half:]))

    return extend([nodes[0]])


# 1. Exact up to quantisation, reproducible -------------------------------------------------------------------------
@pytest.mark.parametrize("params", [FULL, RING], ids=["secagg-5of5", "secagg+-ring-3of7"])
def test_unmasked_sum_within_bound_and_reproducible(params):
    xs = _inputs(params)
    total, survivors = _run(params, xs)
    assert survivors == sorted(xs)
    error = np.abs(total - _clipped_sum(params, xs, xs))
    assert error.max() <= params.error_bound(len(xs))
    assert error.max() > 0  # the inputs really were quantised
    again, _ = _run(params, xs)  # fresh keys, masks and graph, same rounding seed
    assert np.array_equal(total, again)
    assert not np.array_equal(total, _run(params, xs, rounding_seed=1)[0])


def test_ring_graph_is_a_symmetric_window_drawn_afresh():
    ids = list(range(100, 111))
    graph = ring_neighbours(ids, 5)
    assert all(len(nb) == 4 and nid not in nb for nid, nb in graph.items())
    assert all(nid in graph[other] for nid, nb in graph.items() for other in nb)
    assert _is_ring_window(graph, 5) and _is_ring_window(ring_neighbours(ids, 3), 3)
    # 11! / 22 rings: five draws from the OS's entropy are all the same with probability ~1e-25
    draws = {tuple(sorted((v, tuple(nb)) for v, nb in ring_neighbours(ids, 5).items())) for _ in range(5)}
    assert len(draws) > 1
    assert ring_neighbours(ids, 11) == {nid: sorted(set(ids) - {nid}) for nid in ids}
    assert _is_ring_window(SecAggServer(NINE, ids[:9], CTX).neighbours, 5)


# 2. Dropouts ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_one_dropout_at_any_stage_is_recovered(stage):
    """Stage 2 is the case that needs the dropped node's sk1 (keys shared, no masked vector)."""
    xs = _inputs(RING)
    dropped = min(xs)
    total, survivors = _run(RING, xs, {stage: {dropped}})
    assert (dropped in survivors) == (stage >= 3)  # a stage-3 or -4 dropout's vector is already in the sum
    error = np.abs(total - _clipped_sum(RING, xs, survivors))
    assert error.max() <= RING.error_bound(len(survivors))


def test_dropped_node_pairwise_masks_are_removed_with_its_sk1_shares():
    xs = _inputs(FULL)
    dropped = min(xs)
    rnd = _Round(FULL, xs, {2: {dropped}})
    requests = rnd.to_unmask()
    assert all(requests[n][1] == [dropped] for n in requests)
    shares = {n: rnd.unmask(rnd.clients[n], requests[n]) for n in requests}
    assert {len(s[dropped]) for s in shares.values()} == {68}  # a share of the 48-byte scalar sk1
    survivors = sorted(set(xs) - {dropped})
    assert np.abs(rnd.server.aggregate(shares) - _clipped_sum(FULL, xs, survivors)).max() <= FULL.error_bound(4)


@pytest.mark.parametrize("stages", [(2, 3), (2, 4), (3, 4)])
def test_dropouts_after_key_sharing_still_unmask_the_right_sum(stages):
    """SecAgg+ with n=9, k=5, t=3: one node drops at each of two stages after key sharing."""
    xs = _inputs(NINE)
    first, second = min(xs), max(xs)
    total, survivors = _run(NINE, xs, {stages[0]: {first}, stages[1]: {second}})
    assert survivors == sorted(set(xs) - {n for n, s in zip((first, second), stages) if s == 2})
    assert np.abs(total - _clipped_sum(NINE, xs, survivors)).max() <= NINE.error_bound(len(survivors))


# 3. Too many dropouts -------------------------------------------------------------------------------------------------
def test_two_adjacent_ring_dropouts_abort_the_round():
    xs = _inputs(RING)
    rnd = _Round(RING, xs)
    first = min(xs)
    rnd.drop = {2: {first, rnd.server.neighbours[first][0]}}  # the server's graph
    with pytest.raises(SecAggAbort, match="fewer than threshold=2 live share holders; skip the round"):
        rnd.run()


def test_too_few_unmask_replies_abort_the_round():
    xs = _inputs(FULL)
    silent = set(sorted(xs)[:3])  # every vector is in the sum, but only 2 < 3 holders send shares
    with pytest.raises(SecAggAbort, match=r"fewer than threshold=3 shares for nodes \[.*\]; skip the round"):
        _run(FULL, xs, {4: silent})


def test_too_few_signatures_abort_the_round():
    xs = _inputs(FULL)
    silent = set(sorted(xs)[:3])  # 2 of the 5 nodes sign: not a strict majority of the roster
    with pytest.raises(SecAggAbort, match="2 valid signatures on the survivor set: need a strict majority"):
        _run(FULL, xs, {3: silent})


def test_server_counts_only_valid_signatures():
    xs = _inputs(FULL, 100)
    rnd = _Round(FULL, xs, roundtrip=False)
    survivors = rnd.to_sign()
    signatures = {n: rnd.clients[n].sign(survivors) for n in survivors}
    forger = min(xs)
    signatures[forger] = bytes(64)  # does not verify: the node is treated as dropped after stage 2
    requests = rnd.server.unmask_requests(signatures, 1)
    assert forger not in requests and forger not in rnd.server.signatures and len(rnd.server.signatures) == 4
    shares = {n: rnd.unmask(rnd.clients[n], requests[n]) for n in requests}
    assert np.abs(rnd.server.aggregate(shares) - _clipped_sum(FULL, xs, xs)).max() <= FULL.error_bound(5)

    other = _Round(FULL, xs, roundtrip=False)  # signatures on another weight scale than the server's
    survivors = other.to_sign()
    signatures = {n: other.clients[n].sign(survivors) for n in survivors}
    with pytest.raises(SecAggAbort, match="0 valid signatures on the survivor set"):
        other.server.unmask_requests(signatures, 2)


# 4. Masked vectors look uniform -------------------------------------------------------------------------------------
def test_masked_vectors_look_uniform_and_uncorrelated_with_inputs():
    length, c = 20_000, FULL.clip_range
    ids = [11, 22, 33, 44, 55]
    ramp = np.linspace(-c, c, length)
    xs = {11: np.full(length, -c), 22: np.full(length, c), 33: ramp, 44: -ramp, 55: np.zeros(length)}
    rnd = _Round(FULL, xs, roundtrip=False)
    requests = rnd.to_unmask()
    masked = rnd.masked
    uniform_mean, uniform_std = 2**31, 2**32 / np.sqrt(12)
    for nid in ids:
        v = masked[nid].astype(np.float64)
        assert abs(v.mean() / uniform_mean - 1) < 0.03 and abs(v.std() / uniform_std - 1) < 0.03
        counts = np.bincount(masked[nid] >> 28, minlength=16)  # 16 equal bins over [0, 2**32)
        chi2 = ((counts - length / 16) ** 2 / (length / 16)).sum()
        assert chi2 < 50  # 15 degrees of freedom: p(chi2 > 50) ~ 1e-5
    assert abs(np.corrcoef(masked[11].astype(float), masked[22].astype(float))[0, 1]) < 0.05
    for nid in (33, 44):
        assert abs(np.corrcoef(masked[nid].astype(float), xs[nid])[0, 1]) < 0.05
    shares = {n: rnd.unmask(rnd.clients[n], requests[n]) for n in requests}
    assert np.abs(rnd.server.aggregate(shares) - sum(xs.values())).max() <= FULL.error_bound(5)


# 5. PRG -----------------------------------------------------------------------------------------------------------
def test_prg_is_deterministic_and_context_separated():
    secret = bytes(range(32))
    stream = prg(secret, b"self" + CTX, 1000)
    assert stream.dtype == np.uint32 and stream.shape == (1000,)
    assert np.array_equal(stream, prg(secret, b"self" + CTX, 1000))
    assert np.array_equal(stream[:10], prg(secret, b"self" + CTX, 10))  # a CTR stream: prefixes agree
    assert (stream != prg(secret, b"self" + CTX + b"x", 1000)).mean() > 0.99
    assert (stream != prg(secret, b"pair" + CTX, 1000)).mean() > 0.99
    assert (stream != prg(bytes(32), b"self" + CTX, 1000)).mean() > 0.99


def test_pairwise_masks_cancel():
    a, b = (SecAggClient.setup(nid, FULL, CTX, [1, 2, 3, 5, 9]) for nid in (5, 9))
    ab = pairwise_mask(a.sk1, b.pk1, 5, 9, CTX, 4096)
    ba = pairwise_mask(b.sk1, a.pk1, 9, 5, CTX, 4096)
    assert not np.any(ab + ba) and np.count_nonzero(ab) > 4000
    assert not np.array_equal(ab, pairwise_mask(a.sk1, b.pk1, 5, 9, CTX + b"!", 4096))


# 6. A server that lies about who dropped ----------------------------------------------------------------------------
def _malicious_server_split():
    """n=9, k=5, t=3; stages 0-2 honest, all survive. Returns the round, the target u and its neighbours N(u)."""
    xs = _inputs(NINE, 2000)
    rnd = _Round(NINE, xs, roundtrip=False)
    assert rnd.to_sign() == sorted(xs)
    u = min(xs)
    return rnd, u, set(rnd.server.neighbours[u])


def test_a_server_lying_about_who_dropped_cannot_unmask_one_client():
    """The attack of the security review: u and N(u) are told "everyone survived" (story A), the other nodes that
    N(u) dropped (story B), so that the holders of N(u)'s shares send sk1 shares while u's send seed shares. Each
    node signs only its own story, so B is signed by 4 of 9 nodes and its holders refuse to unmask."""
    rnd, u, near = _malicious_server_split()
    server, clients, xs = rnd.server, rnd.clients, rnd.xs
    story_a, story_b = frozenset(xs), frozenset(xs) - near
    told = {h: story_a if h in near | {u} else story_b for h in xs}
    signatures = {h: clients[h].sign(sorted(told[h])) for h in xs}  # each node signs once, what it is told
    signed = {story: {h: sig for h, sig in signatures.items() if told[h] == story} for story in (story_a, story_b)}
    assert len(signed[story_a]) == 5 and len(signed[story_b]) == 4
    held = {h: {h, *server.neighbours[h]} for h in xs}
    assert all(set(clients[h].share_ids) == held[h] for h in xs)

    revealed: dict[int, dict[int, bytes]] = {}
    for h in sorted(xs):
        story = told[h]
        alive, dropped = sorted(held[h] & story), sorted(held[h] - story)
        if story == story_a:  # the honest-looking half: seed shares of everything held
            revealed[h] = clients[h].unmask(alive, dropped, signed[story_a])
            assert dropped == [] and revealed[h].keys() == held[h]
            continue
        assert dropped and set(dropped) <= near  # h holds sk1 shares the server wants
        with pytest.raises(ValueError, match=r"unmask: 4 valid signatures on this node's survivor set, need a strict "
                                             r"majority of the 9 nodes"):
            clients[h].unmask(alive, dropped, signed[story_b])
        with pytest.raises(ValueError, match="unmask: 4 valid signatures"):  # A's signatures do not count for B
            clients[h].unmask(alive, dropped, signatures)
        with pytest.raises(ValueError, match="not the held nodes in / out of the survivor set this node signed"):
            clients[h].unmask(sorted(held[h]), [], signed[story_a])  # nor can h be told story A now
    assert set(revealed) == near | {u}

    # The server has no sk1 share of any node of N(u): only seed shares, which rebuild seeds, not sk1.
    t = NINE.threshold
    for v in near:
        got = [shares[v] for shares in revealed.values() if v in shares]
        seed_shares = {c.seed_shares[c.share_ids.index(v)] for c in clients.values() if v in c.share_ids}
        sk1_shares = {c.sk1_shares[c.share_ids.index(v)] for c in clients.values() if v in c.share_ids}
        assert set(got) <= seed_shares and not set(got) & sk1_shares
        assert all(public_key_of(combine_shares(list(s))) != clients[v].pk1 for s in itertools.combinations(got, t))
    # ... so it rebuilds u's seed, but u's vector stays hidden under its pairwise masks with N(u).
    got_u = [shares[u] for shares in revealed.values()]
    seed_u = combine_shares(got_u[:t])
    assert commitment(seed_u, CTX) == commitment(clients[u].seed, CTX)
    view = rnd.masked[u] - prg(seed_u, b"self" + CTX, xs[u].size)
    assert abs(np.corrcoef(view.astype(float), xs[u])[0, 1]) < 0.1
    assert abs(view.astype(float).mean() / 2**31 - 1) < 0.08  # 6 sigma for 2000 uniform values
    # (with N(u)'s sk1, which only the clients have, that view would be u's quantised input)
    for v in near:
        view += pairwise_mask(clients[v].sk1, clients[u].pk1, v, u, CTX, xs[u].size)
    assert np.abs(view * NINE.quantum - NINE.clip_range - np.clip(xs[u], -1, 1)).max() <= NINE.quantum

    # Neither story gives an aggregate: the server's own stage 3 takes no signature on B (the survivors it announced
    # are A), and with A's 5 signers alone the nodes far from u keep fewer than t live holders.
    with pytest.raises(SecAggAbort, match="fewer than threshold=3 live share holders"):
        copy.deepcopy(server).unmask_requests(signed[story_a], 1)
    with pytest.raises(SecAggAbort, match="0 valid signatures on the survivor set"):
        server.unmask_requests(signed[story_b], 1)


def test_a_server_cannot_forge_the_signatures_of_non_neighbours():
    """Every holder pins every node's verification key at key agreement (stage 1). The server gives each holder h
    a story signed by h itself and by h's 4 non-neighbours under keys of its own making (5 of 9, a strict
    majority), in which u survived and u's neighbours dropped: the forged signatures do not verify, so no holder
    reveals anything for it."""
    rnd, u, near = _malicious_server_split()
    server, clients, xs = rnd.server, rnd.clients, rnd.xs
    fake = {h: ed25519.Ed25519PrivateKey.generate() for h in xs}
    revealed: dict[int, dict[int, bytes]] = {}
    for h in sorted(xs):
        held, strangers = {h, *server.neighbours[h]}, set(xs) - {h, *server.neighbours[h]}
        story = sorted({h} | strangers | (held - near))
        statement = survivors_statement(CTX, sorted(xs), story, 1)
        signatures = {h: clients[h].sign(story)} | {i: fake[i].sign(statement) for i in strangers}
        with pytest.raises(ValueError, match="valid signatures"):
            clients[h].unmask(sorted(held & set(story)), sorted(held - set(story)), signatures)
        revealed[h] = {}
    assert not any(revealed.values())  # nothing was revealed: u's input stays masked


# 7. Validation and refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"num_clients": 2, "num_shares": 2, "threshold": 1}, "num_clients"),
    ({"num_shares": 4}, "num_shares"),
    ({"num_shares": 1}, "num_shares"),
    ({"threshold": 1}, "threshold"),
    ({"threshold": 3}, "threshold"),  # = num_shares: no dropout tolerated
    ({"num_shares": 5, "threshold": 2}, "threshold"),  # not a majority of 5
    ({"clip_range": 0.0}, "clip_range"),
    ({"clip_range": float("nan")}, "clip_range"),
    ({"clip_range": float("inf")}, "clip_range"),
    ({"quantization_bits": 30}, "quantization_bits"),  # 7 * 2**30 >= 2**32
    ({"quantization_bits": 0}, "quantization_bits"),
])
def test_bad_parameters_are_one_line_value_errors(kwargs, name):
    base = {"num_clients": 7, "num_shares": 3, "threshold": 2, "clip_range": 1.0, "quantization_bits": 16}
    with pytest.raises(ValueError, match=f"^{name}=") as info:
        SecAggParams(**(base | kwargs))
    assert "\n" not in str(info.value)


def test_edge_parameters_are_accepted():
    assert SecAggParams(7, 100, 6, 1.0, 29).shares == 7  # num_shares >= num_clients: full SecAgg
    assert SecAggParams(3, 3, 2, 0.5).quantization_bits == 22
    with pytest.raises(ValueError, match="^node_ids: need num_clients=7"):
        SecAggServer(RING, [1, 2, 3, 4, 5, 6, 6], CTX)


@pytest.mark.parametrize("roster", [[1, 2, 3, 4, 6], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [1, 1, 2, 3, 4]])
def test_setup_checks_the_roster(roster):
    with pytest.raises(ValueError, match="^setup: the roster has .* must include this node$"):
        SecAggClient.setup(5, FULL, CTX, roster)


def _masking_client(bad_x):
    xs = _inputs(FULL, 10)
    rnd = _Round(FULL, xs, roundtrip=False)
    sealed = rnd.to_mask()
    nid = min(xs)
    with pytest.raises(ValueError) as info:
        rnd.clients[nid].masked_input(sealed[nid], bad_x, rng=np.random.default_rng(0))
    return str(info.value)


@pytest.mark.parametrize("bad_x, message", [
    (np.array([0.1, np.nan, 0.2]), "non-finite"),
    (np.array([0.1, np.inf]), "non-finite"),
    (np.array([-np.inf], dtype=np.float32), "non-finite"),
    (np.zeros((2, 2)), "1-D"),
])
def test_non_finite_or_bad_shaped_inputs_are_refused_before_masking(bad_x, message):
    error = _masking_client(bad_x)
    assert error.startswith("masked_input: ") and message in error and "\n" not in error


def test_client_unmasks_only_the_split_of_the_set_it_signed():
    xs = _inputs(FULL, 10)
    rnd = _Round(FULL, xs)
    requests = rnd.to_unmask()
    signatures = rnd.server.signatures
    me, other = sorted(xs)[:2]
    client = rnd.clients[me]
    surviving, dropped = requests[me]
    assert surviving == sorted(xs) and dropped == []
    split = "not the held nodes in / out of the survivor set this node signed"
    with pytest.raises(ValueError, match=split):
        client.unmask([n for n in surviving if n != other], [other], signatures)  # other survived
    with pytest.raises(ValueError, match=split):
        client.unmask(surviving, [other], signatures)  # both as surviving and as dropped
    with pytest.raises(ValueError, match=split):
        client.unmask(surviving + [12345], [], signatures)  # a node it holds no shares of
    with pytest.raises(ValueError, match=split):
        client.unmask(surviving[:-1], [], signatures)  # a held node left out
    valid = "valid signatures on this node's survivor set, need a strict majority of the 5 nodes"
    with pytest.raises(ValueError, match="unmask: 1 " + valid):
        client.unmask(surviving, dropped, {me: signatures[me]})
    with pytest.raises(ValueError, match="unmask: 2 " + valid):
        client.unmask(surviving, dropped, dict(sorted(signatures.items())[:2]))
    # forged signatures under keys of the server's making: a neighbour's key is the one of key agreement
    fake = ed25519.Ed25519PrivateKey.generate()
    statement = survivors_statement(CTX, sorted(xs), sorted(xs), 1)
    forged = {n: fake.sign(statement) for n in xs if n != me}
    with pytest.raises(ValueError, match="unmask: 1 " + valid):
        client.unmask(surviving, dropped, forged | {me: signatures[me]})
    a, b, c = sorted(xs)[:3]  # three signatures rotated: none verifies under its node's key
    with pytest.raises(ValueError, match="unmask: 2 " + valid):
        client.unmask(surviving, dropped, signatures | {a: signatures[b], b: signatures[c], c: signatures[a]})
    shares = client.unmask(surviving, dropped, signatures)
    assert shares.keys() == set(surviving)
    client = _reload(client)  # the same request again, after a state round trip: the same shares
    assert client.unmask(surviving, dropped, signatures) == shares
    with pytest.raises(ValueError, match="sign: expects stage 'masked', the client is at stage 'signed'"):
        client.sign(sorted(xs))  # once per round
    with pytest.raises(ValueError, match="masked_input: expects stage 'shared'"):
        client.masked_input({}, xs[me], rng=np.random.default_rng(0))  # masking twice would leak x - x'


def test_client_refuses_to_reveal_both_shares_of_a_node_even_across_calls():
    """Defence in depth: were a client's signed set swapped after it revealed seed shares (it cannot be through
    the API), its record of what it revealed still stops the sk1 share of the same node."""
    xs = _inputs(FULL, 10)
    rnd = _Round(FULL, xs, roundtrip=False)
    requests = rnd.to_unmask()
    me, other = sorted(xs)[:2]
    rnd.unmask(rnd.clients[me], requests[me])
    story = sorted(set(xs) - {other})
    statement = survivors_statement(CTX, sorted(xs), story, 1)
    signatures = {n: ed25519.Ed25519PrivateKey.from_private_bytes(rnd.clients[n].sk3).sign(statement) for n in story}
    state = rnd.clients[me].to_state() | {"signed": story}
    with pytest.raises(ValueError, match=rf"refusing to reveal both the seed and the sk1 shares of nodes \[{other}\]"):
        SecAggClient.from_state(dict(ConfigRecord(state))).unmask(story, [other], signatures)


@pytest.mark.parametrize("params, pick, min_clients, message", [
    (SecAggParams(3, 3, 2, 1.0, 16), lambda ids, me: [me, ids[1]], 3, "2 survivors of 3: need a strict majority "
                                                                         "and at least 3"),
    (NINE, lambda ids, me: ids[:4], 3, "4 survivors of 9: need a strict majority"),  # a minority of the roster
    (NINE, lambda ids, me: ids[1:6], 3, "must include this node"),
    (NINE, lambda ids, me: ids[:5] + [12345], 3, "lie in the round's roster"),
    (NINE, lambda ids, me: ids[:5], 6, "5 survivors of 9: need a strict majority and at least 6"),  # site floor
])
def test_sign_refuses_small_minority_or_foreign_survivor_sets(params, pick, min_clients, message):
    xs = _inputs(params, 10)
    rnd = _Round(params, xs, roundtrip=False)
    rnd.to_sign()
    ids = sorted(xs)
    me = ids[0]
    with pytest.raises(ValueError, match="^sign: .*" + message):
        rnd.clients[me].sign(pick(ids, me), min_clients)
    assert rnd.clients[me].stage == "masked"  # a refusal signs nothing: it can still sign a good set
    assert len(rnd.clients[me].sign(ids[:5] if params is NINE else ids)) == 64


def test_client_checks_the_key_list():
    roster = list(range(1, 8))
    clients = {nid: SecAggClient.setup(nid, RING, CTX, roster) for nid in range(1, 6)}
    keys = {nid: c.public_keys for nid, c in clients.items()}
    with pytest.raises(ValueError, match="share holders, need threshold=2 <= holders <= 3"):
        clients[1].share_keys(keys)  # 5 holders for a window of 3
    with pytest.raises(ValueError, match="own public keys are missing or altered"):
        clients[1].share_keys({1: keys[2], 2: keys[2]})
    with pytest.raises(ValueError, match="not all distinct"):
        clients[1].share_keys({1: keys[1], 2: keys[2], 3: keys[2]})
    with pytest.raises(ValueError, match="all in the round's roster"):
        clients[1].share_keys({1: keys[1], 99: keys[2]})


# 8. Bad vectors and bad shares --------------------------------------------------------------------------------------
def test_an_out_of_range_vector_aborts_the_round():
    xs = _inputs(FULL, 100)
    rnd = _Round(FULL, xs, roundtrip=False)
    cheat = min(xs)
    honest = rnd.masked_input

    def masked_input(client, ciphertexts):
        vector = honest(client, ciphertexts)
        return vector + np.uint32(2**31) if client.node_id == cheat else vector  # wraps mod 2**32

    rnd.masked_input = masked_input
    requests = rnd.to_unmask()
    shares = {n: rnd.unmask(rnd.clients[n], requests[n]) for n in requests}
    with pytest.raises(SecAggAbort, match="a client sent an out-of-range vector; skip the round"):
        rnd.server.aggregate(shares)


def _flip(share: bytes, at: int) -> bytes:
    return share[:at] + bytes([share[at] ^ 0x01]) + share[at + 1:]


@pytest.mark.parametrize("at", [0, 10, -1], ids=["index", "body", "last"])
@pytest.mark.parametrize("dropout", [False, True], ids=["seed", "sk1"])
def test_one_flipped_share_is_outvoted(dropout, at):
    """FULL (5 holders, t=3): one holder flips a byte of the share of one node (a survivor's seed share, or the
    sk1 share of a node that dropped at stage 2); the checked reconstruction finds the other shares."""
    xs = _inputs(FULL, 100)
    owner = min(xs)
    rnd = _Round(FULL, xs, {2: {owner}} if dropout else None, roundtrip=False)
    requests = rnd.to_unmask()
    shares = {n: rnd.unmask(rnd.clients[n], requests[n]) for n in requests}
    liar = max(requests)
    shares[liar] = shares[liar] | {owner: _flip(shares[liar][owner], at)}
    survivors = sorted(rnd.masked)
    assert (owner in survivors) != dropout
    total = rnd.server.aggregate(shares)
    assert np.abs(total - _clipped_sum(FULL, xs, survivors)).max() <= FULL.error_bound(len(survivors))


def test_a_duplicated_share_is_outvoted():
    """One holder returns a copy of another holder's share: deduplicated, and the other shares suffice."""
    xs = _inputs(FULL, 100)
    rnd = _Round(FULL, xs, roundtrip=False)
    requests = rnd.to_unmask()
    shares = {n: rnd.unmask(rnd.clients[n], requests[n]) for n in requests}
    owner, (a, b) = min(xs), sorted(requests)[-2:]
    shares[b] = shares[b] | {owner: shares[a][owner]}
    assert np.abs(rnd.server.aggregate(shares) - _clipped_sum(FULL, xs, xs)).max() <= FULL.error_bound(5)


def test_a_duplicate_does_not_count_twice_towards_the_threshold():
    xs = _inputs(FULL, 100)
    rnd = _Round(FULL, xs, {4: set(sorted(xs)[:2])}, roundtrip=False)  # 3 holders reply: exactly t
    requests = rnd.to_unmask()
    shares = rnd.answer(4, requests, rnd.unmask)
    owner, (a, b) = min(xs), sorted(shares)[-2:]
    shares[b] = shares[b] | {owner: shares[a][owner]}
    with pytest.raises(SecAggAbort, match=rf"fewer than threshold=3 shares for nodes \[{owner}\]"):
        rnd.server.aggregate(shares)


# 9. State round trips -----------------------------------------------------------------------------------------------
def test_state_round_trips_through_config_record_and_protobuf_at_every_stage():
    xs = _inputs(FULL, 10)
    server = SecAggServer(FULL, list(xs), CTX)
    clients = {nid: SecAggClient.setup(nid, FULL, CTX, list(xs)) for nid in xs}
    stages = []

    def check_all():
        for nid, client in clients.items():
            state = client.to_state()
            assert all(isinstance(v, (bytes, int, str)) or (isinstance(v, list) and all(
                isinstance(e, (int, bytes)) for e in v)) for v in state.values())
            wire = config_record_from_proto(config_record_to_proto(ConfigRecord(state)))
            clients[nid] = SecAggClient.from_state(dict(wire))
            assert clients[nid] == client
        stages.append({c.stage for c in clients.values()})

    check_all()
    keys = server.share_keys_requests({nid: c.public_keys for nid, c in clients.items()})
    check_all()
    shared = {nid: c.share_keys(keys[nid]) for nid, c in clients.items()}
    sealed = server.masked_input_requests({n: s[0] for n, s in shared.items()}, {n: s[1] for n, s in shared.items()})
    check_all()
    survivors = server.sign_requests({nid: c.masked_input(sealed[nid], xs[nid], rng=np.random.default_rng(nid))
                                      for nid, c in clients.items()})
    check_all()
    requests = server.unmask_requests({nid: c.sign(survivors) for nid, c in clients.items()}, 1)
    check_all()
    signatures = server.signatures
    shares = {nid: c.unmask(*requests[nid], signatures) for nid, c in clients.items()}
    check_all()
    assert stages == [{"setup"}, {"setup"}, {"shared"}, {"masked"}, {"signed"}, {"signed"}]
    assert all(c.revealed_seed == sorted(xs) for c in clients.values())
    assert np.abs(server.aggregate(shares) - _clipped_sum(FULL, xs, xs)).max() <= FULL.error_bound(5)


def test_serialising_between_stages_does_not_change_the_result():
    xs = _inputs(RING, 100)
    assert np.array_equal(_run(RING, xs, roundtrip=True)[0], _run(RING, xs, roundtrip=False)[0])
