"""SecAgg+ (fedtt.privacy.secagg): exact unmasking, dropouts, uniform-looking uploads, the PRG, refusals, state.

Real crypto, no mocks. Every client is serialised through a Flower ConfigRecord before each of its stages, as the
ClientApp will keep it in ``context.state``.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from fedtt.privacy.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    pairwise_mask,
    prg,
    ring_neighbours,
)

CTX = b"run-42|round-3"
FULL = SecAggParams(num_clients=5, num_shares=5, threshold=3, clip_range=1.0, quantization_bits=16)
RING = SecAggParams(num_clients=7, num_shares=3, threshold=2, clip_range=1.0, quantization_bits=16)


def _inputs(params: SecAggParams, length: int = 1000) -> dict[int, np.ndarray]:
    """Inputs of random uint64-sized node ids (Flower's), some values beyond the clip range."""
    rng = np.random.default_rng(7)
    ids = rng.integers(1, 2**64 - 1, size=params.num_clients, dtype=np.uint64)
    return {int(i): rng.normal(0.0, 0.7, length) for i in ids}


def _reload(client: SecAggClient) -> SecAggClient:
    return SecAggClient.from_state(dict(ConfigRecord(client.to_state())))


def _answer(clients, stage, requests, drop, roundtrip, call):
    """Each requested node that has not dropped at this stage answers, after a trip through a ConfigRecord."""
    replies = {}
    for nid, request in requests.items():
        if nid in drop.get(stage, ()):
            continue
        if roundtrip:
            clients[nid] = _reload(clients[nid])
        replies[nid] = call(clients[nid], request)
    return replies


def _to_unmask(params, xs, drop=None, *, rounding_seed=0, roundtrip=True):
    """Stages 0-2; returns the server, the clients, the stage-3 requests and the masked uploads."""
    drop = drop or {}
    server = SecAggServer(params, list(xs), CTX, seed=1)
    clients = {nid: SecAggClient.setup(nid, params, CTX) for nid in xs}

    def masked_input(client, ciphertexts):
        rng = np.random.default_rng([rounding_seed, client.node_id])
        return client.masked_input(ciphertexts, xs[client.node_id], rng)

    keys = _answer(clients, 0, dict.fromkeys(xs), drop, roundtrip, lambda c, _: c.public_keys)
    sealed = _answer(clients, 1, server.share_keys_requests(keys), drop, roundtrip, lambda c, r: c.share_keys(r))
    masked = _answer(clients, 2, server.masked_input_requests(sealed), drop, roundtrip, masked_input)
    return server, clients, server.unmask_requests(masked), masked


def _run(params, xs, drop=None, **kwargs):
    server, clients, requests, masked = _to_unmask(params, xs, drop, **kwargs)
    shares = _answer(clients, 3, requests, drop or {}, kwargs.get("roundtrip", True), lambda c, r: c.unmask(*r))
    return server.aggregate(shares), sorted(masked)


def _clipped_sum(params, xs, nodes):
    return sum(np.clip(xs[n], -params.clip_range, params.clip_range) for n in nodes)


# 1. Exact up to quantisation, reproducible -------------------------------------------------------------------------
@pytest.mark.parametrize("params", [FULL, RING], ids=["secagg-5of5", "secagg+-ring-3of7"])
def test_unmasked_sum_within_bound_and_reproducible(params):
    xs = _inputs(params)
    total, survivors = _run(params, xs)
    assert survivors == sorted(xs)
    error = np.abs(total - _clipped_sum(params, xs, xs))
    assert error.max() <= params.error_bound(len(xs))
    assert error.max() > 0  # the inputs really were quantised
    again, _ = _run(params, xs)  # fresh keys and masks, same rounding seed
    assert np.array_equal(total, again)
    assert not np.array_equal(total, _run(params, xs, rounding_seed=1)[0])


def test_ring_graph_is_a_symmetric_window():
    ids = list(range(100, 111))
    graph = ring_neighbours(ids, 5, seed=3)
    assert all(len(nb) == 4 and nid not in nb for nid, nb in graph.items())
    assert all(nid in graph[other] for nid, nb in graph.items() for other in nb)
    assert graph == ring_neighbours(ids[::-1], 5, seed=3) and graph != ring_neighbours(ids, 5, seed=4)
    assert ring_neighbours(ids, 11, seed=3) == {nid: sorted(set(ids) - {nid}) for nid in ids}


# 2. Dropouts ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_dropout_at_any_stage_is_recovered(stage):
    """Stage 2 is the case that needs the dropped node's sk1 (keys shared, no masked vector)."""
    xs = _inputs(RING)
    dropped = min(xs)
    total, survivors = _run(RING, xs, {stage: {dropped}})
    assert (dropped in survivors) == (stage == 3)  # a stage-3 dropout's vector is already in the sum
    error = np.abs(total - _clipped_sum(RING, xs, survivors))
    assert error.max() <= RING.error_bound(len(survivors))


def test_dropped_node_pairwise_masks_are_removed_with_its_sk1_shares():
    xs = _inputs(FULL)
    dropped = min(xs)
    server, clients, requests, _ = _to_unmask(FULL, xs, {2: {dropped}})
    assert all(requests[n][1] == [dropped] for n in requests)
    shares = {n: clients[n].unmask(*requests[n]) for n in requests}
    assert {len(s[dropped]) for s in shares.values()} == {68}  # a share of the 48-byte scalar sk1
    survivors = sorted(set(xs) - {dropped})
    assert np.abs(server.aggregate(shares) - _clipped_sum(FULL, xs, survivors)).max() <= FULL.error_bound(4)


# 3. Too many dropouts -------------------------------------------------------------------------------------------------
def test_two_adjacent_ring_dropouts_abort_the_round():
    xs = _inputs(RING)
    first = min(xs)
    second = ring_neighbours(list(xs), RING.num_shares, seed=1)[first][0]  # the server's graph (seed=1)
    with pytest.raises(SecAggAbort, match="fewer than threshold=2 live share holders; skip the round"):
        _run(RING, xs, {2: {first, second}})


def test_too_few_unmask_replies_abort_the_round():
    xs = _inputs(FULL)
    silent = set(sorted(xs)[:3])  # every vector is in the sum, but only 2 < 3 holders send shares
    with pytest.raises(SecAggAbort, match=r"fewer than threshold=3 shares for nodes \[.*\]; skip the round"):
        _run(FULL, xs, {3: silent})


# 4. Masked vectors look uniform -------------------------------------------------------------------------------------
def test_masked_vectors_look_uniform_and_uncorrelated_with_inputs():
    length, c = 20_000, FULL.clip_range
    ids = [11, 22, 33, 44, 55]
    ramp = np.linspace(-c, c, length)
    xs = {11: np.full(length, -c), 22: np.full(length, c), 33: ramp, 44: -ramp, 55: np.zeros(length)}
    server, clients, requests, masked = _to_unmask(FULL, xs)
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
    shares = {n: clients[n].unmask(*requests[n]) for n in requests}
    assert np.abs(server.aggregate(shares) - sum(xs.values())).max() <= FULL.error_bound(5)


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
    a, b = (SecAggClient.setup(nid, FULL, CTX) for nid in (5, 9))
    ab = pairwise_mask(a.sk1, b.pk1, 5, 9, CTX, 4096)
    ba = pairwise_mask(b.sk1, a.pk1, 9, 5, CTX, 4096)
    assert not np.any(ab + ba) and np.count_nonzero(ab) > 4000
    assert not np.array_equal(ab, pairwise_mask(a.sk1, b.pk1, 5, 9, CTX + b"!", 4096))


# 6. Validation and refusals -----------------------------------------------------------------------------------------
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
        SecAggServer(RING, [1, 2, 3, 4, 5, 6, 6], CTX, seed=0)


def _masking_client(bad_x):
    xs = _inputs(FULL, 10)
    server = SecAggServer(FULL, list(xs), CTX, seed=0)
    clients = {nid: SecAggClient.setup(nid, FULL, CTX) for nid in xs}
    keys = server.share_keys_requests({nid: c.public_keys for nid, c in clients.items()})
    sealed = server.masked_input_requests({nid: c.share_keys(keys[nid]) for nid, c in clients.items()})
    nid = min(xs)
    with pytest.raises(ValueError) as info:
        clients[nid].masked_input(sealed[nid], bad_x, np.random.default_rng(0))
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


def test_client_refuses_to_reveal_both_shares_of_a_node():
    xs = _inputs(FULL, 10)
    _, clients, requests, _ = _to_unmask(FULL, xs)
    me, other = sorted(xs)[:2]
    client = clients[me]
    with pytest.raises(ValueError, match="both as surviving and as dropped"):
        client.unmask([me, other], [other])
    with pytest.raises(ValueError, match="cannot be dropped"):
        client.unmask([other], [me])
    with pytest.raises(ValueError, match="holds no shares of nodes"):
        client.unmask([me, other, 12345], [])
    surviving, dropped = requests[me]
    assert dropped == [] and client.unmask(surviving, dropped).keys() == set(surviving)
    client = _reload(client)  # the refusal survives the state round trip
    with pytest.raises(ValueError, match=rf"refusing to reveal both the seed and the sk1 shares of nodes \[{other}\]"):
        client.unmask([me] + [n for n in surviving if n not in (me, other)], [other])
    with pytest.raises(ValueError, match="masked_input: expects stage 'shared'"):
        client.masked_input({}, xs[me], np.random.default_rng(0))  # masking twice would leak x - x'


def test_client_checks_the_key_list():
    clients = {nid: SecAggClient.setup(nid, RING, CTX) for nid in range(1, 6)}
    keys = {nid: c.public_keys for nid, c in clients.items()}
    with pytest.raises(ValueError, match="share holders, need threshold=2 <= holders <= 3"):
        clients[1].share_keys(keys)  # 5 holders for a window of 3
    with pytest.raises(ValueError, match="own public keys are missing or altered"):
        clients[1].share_keys({1: keys[2], 2: keys[2]})
    with pytest.raises(ValueError, match="not all distinct"):
        clients[1].share_keys({1: keys[1], 2: keys[2], 3: keys[2]})


# 7. State round trips -----------------------------------------------------------------------------------------------
def test_state_round_trips_through_config_record_and_protobuf_at_every_stage():
    xs = _inputs(FULL, 10)
    server = SecAggServer(FULL, list(xs), CTX, seed=0)
    clients = {nid: SecAggClient.setup(nid, FULL, CTX) for nid in xs}

    def check_all():
        for nid, client in clients.items():
            state = client.to_state()
            assert all(isinstance(v, (bytes, int, str)) or (isinstance(v, list) and all(
                isinstance(e, (int, bytes)) for e in v)) for v in state.values())
            wire = config_record_from_proto(config_record_to_proto(ConfigRecord(state)))
            clients[nid] = SecAggClient.from_state(dict(wire))
            assert clients[nid] == client

    check_all()
    keys = server.share_keys_requests({nid: c.public_keys for nid, c in clients.items()})
    check_all()
    sealed = server.masked_input_requests({nid: c.share_keys(keys[nid]) for nid, c in clients.items()})
    check_all()
    requests = server.unmask_requests(
        {nid: c.masked_input(sealed[nid], xs[nid], np.random.default_rng(nid)) for nid, c in clients.items()})
    check_all()
    shares = {nid: c.unmask(*requests[nid]) for nid, c in clients.items()}
    check_all()
    assert np.abs(server.aggregate(shares) - _clipped_sum(FULL, xs, xs)).max() <= FULL.error_bound(5)


def test_serialising_between_stages_does_not_change_the_result():
    xs = _inputs(RING, 100)
    assert np.array_equal(_run(RING, xs, roundtrip=True)[0], _run(RING, xs, roundtrip=False)[0])
