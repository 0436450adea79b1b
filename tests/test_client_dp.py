"""Client-level DP (fedtt.privacy.client_dp): the accountant against Opacus', calibration, clipping, adaptive
clipping's quantile tracking, the noise each placement adds (through a real SecAgg+ round for the distributed one),
and the config rules. Seeds are fixed here for the statistical tests only; the module draws from OS entropy."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedtt.config import load_config
from fedtt.privacy import client_dp
from fedtt.privacy.client_dp import ClientDP
from fedtt.privacy.secagg import SecAggClient, SecAggParams, SecAggServer

BASE = ["privacy.client_dp=true", "federation.weighting='uniform'"]


def plan(*overrides: str) -> ClientDP:
    return ClientDP.of(load_config(None, [*BASE, *overrides]))


def norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v).sum()) for v in update.values()))


@pytest.mark.parametrize("sigma, q, rounds, delta", [(0.8, 0.05, 100, 1e-5), (1.3, 0.01, 300, 1e-6),
                                                     (2.0, 1.0, 10, 1e-3)])
def test_user_level_epsilon_is_opacus_rdp_accountant_stepped_once_per_round(sigma, q, rounds, delta):
    reference = RDPAccountant()
    for done in range(1, rounds + 1):
        reference.step(noise_multiplier=sigma, sample_rate=q)
        if done in (1, rounds // 2, rounds):
            assert client_dp.epsilon(sigma, q, done, delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    assert client_dp.epsilon(sigma, q, 0, delta) == 0.0


def test_the_plan_reports_the_amplified_epsilon_per_round_and_the_unamplified_one_against_the_server():
    p = plan("federation.num_clients=100", "federation.clients_per_round=10", "federation.rounds=20",
             "privacy.client_dp_noise_multiplier=1.1")
    assert (p.sample_rate, p.delta, p.sigma, p.update_sigma) == (0.1, 1e-5, 1.1, 1.1)
    epsilons = [p.epsilon(r) for r in range(1, 21)]
    assert epsilons == sorted(epsilons) and epsilons[-1] == client_dp.epsilon(1.1, 0.1, 20, 1e-5)
    assert p.epsilon_unamplified(2) == client_dp.epsilon(1.1, 1.0, 2, 1e-5) > p.epsilon(2)


@pytest.mark.parametrize("target, q, rounds", [(8.0, 0.05, 100), (2.0, 0.2, 30)])
def test_calibrate_inverts_epsilon(target, q, rounds):
    sigma = client_dp.calibrate(target, 1e-5, q, rounds)
    assert target - 0.01 <= client_dp.epsilon(sigma, q, rounds, 1e-5) <= target
    assert client_dp.epsilon(sigma * 0.97, q, rounds, 1e-5) > target  # and no much smaller sigma would do
    p = plan("federation.num_clients=1000", f"federation.clients_per_round={round(q * 1000)}",
             f"federation.rounds={rounds}", f"privacy.client_dp_epsilon={target}")
    assert p.sigma == sigma and p.epsilon(rounds) <= target


def test_every_clipped_update_is_within_the_clip_and_small_ones_are_untouched():
    rng = np.random.default_rng(0)
    for scale in np.logspace(-3, 3, 60):
        update = {"core.0": rng.normal(0, scale, (3, 4, 5)).astype(np.float32), "head": rng.normal(0, scale, 7)}
        clipped, indicator = client_dp.clip(update, 1.5)
        assert norm(clipped) <= 1.5 and set(clipped) == set(update)
        if norm(update) <= 1.5:
            assert indicator == 0.5 and all(np.array_equal(clipped[k], update[k]) for k in update)
        else:
            assert indicator == -0.5 and norm(clipped) == pytest.approx(1.5, rel=1e-8)


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clipping_tracks_the_target_quantile_of_the_update_norms(quantile):
    """Norms from a lognormal (median 1): from C = 0.05, C settles near the norms' quantile despite the count's
    noise (sigma_b = clients / 20, the paper's choice)."""
    p = plan("federation.num_clients=1000", "federation.clients_per_round=100", "federation.rounds=300",
             "privacy.client_dp_noise_multiplier=1.0", "privacy.client_dp_adaptive=true",
             f"privacy.client_dp_target_quantile={quantile}", "privacy.client_dp_clip=0.05")
    assert p.count_noise == 5.0 and p.update_sigma ** -2 + (2 * p.count_noise) ** -2 == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    clip, history = p.clip, []
    for _ in range(p.rounds):
        norms = rng.lognormal(0.0, 0.5, p.expected_clients)
        count = sum(client_dp.clip({"w": np.array([n])}, clip)[1] for n in norms)
        clip = p.next_clip(clip, count + rng.normal(0.0, p.count_noise_std()))
        history.append(clip)
    truth = math.exp(0.5 * {0.5: 0.0, 0.9: 1.2815516}[quantile])
    assert abs(np.exp(np.mean(np.log(history[150:]))) / truth - 1) < 0.08


def test_server_placement_adds_one_draw_of_the_stated_std_from_os_entropy():
    p = plan("federation.num_clients=100", "federation.clients_per_round=10", "privacy.client_dp_noise_multiplier=0.7",
             "privacy.client_dp_clip=2.0")
    assert p.parties == 1 and p.noise_std(2.0) == p.sum_std(2.0) == pytest.approx(1.4)
    total = {"a": np.zeros(150_000), "b": np.zeros((50, 1000))}
    noised = client_dp.add_noise(total, p.noise_std(2.0), np.random.default_rng(2))
    values = np.concatenate([v.ravel() for v in noised.values()])
    assert abs(values.std() / 1.4 - 1) < 0.01 and abs(values.mean()) < 0.01
    assert not np.array_equal(client_dp.add_noise(total, 1.0)["a"], client_dp.add_noise(total, 1.0)["a"])


def test_distributed_noise_shares_sum_to_the_stated_variance_and_more_survivors_only_add_noise():
    p = plan("federation.num_clients=200", "federation.clients_per_round=20", "federation.min_replies=8",
             "privacy.secure_aggregation=true", "privacy.secagg_clip_range=4.0",
             "privacy.client_dp_placement='distributed'", "privacy.client_dp_noise_multiplier=0.9")
    assert p.parties == 8 and p.noise_std(1.0) == pytest.approx(0.9 / math.sqrt(8))
    rng = np.random.default_rng(3)
    for survivors in (8, 16):
        total = sum(client_dp.add_noise({"x": np.zeros(100_000)}, p.noise_std(1.0), rng)["x"] for _ in range(survivors))
        assert abs(total.var() / (survivors / 8 * p.sum_std(1.0) ** 2) - 1) < 0.02


def test_under_distributed_dp_the_server_unmasks_only_a_noised_sum_of_the_stated_variance():
    """A real SecAgg+ round: 5 clients clip their updates and add their shares before masking; the server holds
    only uint32 masked vectors, and the unmasked sum minus the clipped updates' sum is noise of variance z^2 C^2."""
    p = plan("federation.num_clients=50", "federation.clients_per_round=5", "federation.min_replies=5",
             "privacy.secure_aggregation=true", "privacy.secagg_clip_range=4.0",
             "privacy.client_dp_placement='distributed'", "privacy.client_dp_noise_multiplier=1.0")
    params = SecAggParams(num_clients=5, num_shares=5, threshold=3, clip_range=4.0, quantization_bits=22)
    rng = np.random.default_rng(4)
    ids = [11, 22, 33, 44, 55]
    updates = {i: client_dp.clip({"core": rng.normal(0, 0.05, 40_000)}, p.clip)[0]["core"] for i in ids}
    context = b"fedtt|test|1"
    server = SecAggServer(params, ids, context)
    clients = {i: SecAggClient.setup(i, params, context, ids) for i in ids}
    forwarded = server.share_keys_requests({i: c.public_keys for i, c in clients.items()})
    shared = {i: clients[i].share_keys(forwarded[i], server.verification_keys()) for i in ids}
    cts = server.masked_input_requests({i: s[0] for i, s in shared.items()}, {i: s[1] for i, s in shared.items()})
    masked = {i: clients[i].masked_input(cts[i], client_dp.add_noise({"x": updates[i]}, p.noise_std(p.clip),
                                                                     rng)["x"], rng=rng) for i in ids}
    assert all(v.dtype == np.uint32 and v.shape == (40_000,) for v in masked.values())
    survivors = server.sign_requests(masked)
    requests = server.unmask_requests({i: clients[i].sign(survivors) for i in survivors}, 1)
    total = server.aggregate({i: clients[i].unmask(*requests[i], server.signatures) for i in requests})
    noise = total - sum(updates.values())
    assert abs(noise.var() / p.sum_std(p.clip) ** 2 - 1) < 0.03 and abs(noise.mean()) < 0.02


def test_poisson_sampling_draws_each_client_independently_at_rate_q():
    sizes = [len(client_dp.poisson_sample(range(1000), 0.05, random.Random(s))) for s in range(200)]
    assert abs(np.mean(sizes) / 50 - 1) < 0.03
    assert np.std(sizes) == pytest.approx(math.sqrt(1000 * 0.05 * 0.95), rel=0.15)  # binomial, not a fixed size
    assert client_dp.poisson_sample(range(7), 1.0, random.Random(0)) == list(range(7))


@pytest.mark.parametrize("overrides, key", [
    (["privacy.client_dp=true"], "privacy.client_dp_epsilon"),
    (["privacy.client_dp=true", "privacy.client_dp_epsilon=8.0", "privacy.client_dp_noise_multiplier=1.0"],
     "privacy.client_dp_noise_multiplier"),
    (["privacy.client_dp_epsilon=8.0"], "privacy.client_dp = false"),
    (["privacy.client_dp=true", "privacy.client_dp_epsilon=8.0", "privacy.client_dp_placement='distributed'"],
     "privacy.secure_aggregation"),
])
def test_config_rules_are_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["federation.num_clients=10", "privacy.client_dp_delta=0.1"], "privacy.client_dp_delta"),
    (["federation.weighting='examples'"], "federation.weighting"),
    (["federation.aggregator='median'"], "federation.aggregator"),
    (["method='fedtt+'", "freezing.policy='adaptive'"], "freezing.policy"),
    (["privacy.client_dp_adaptive=true", "privacy.client_dp_count_noise=0.1"], "privacy.client_dp_count_noise"),
    (["privacy.secure_aggregation=true", "federation.min_replies=3", "privacy.client_dp_placement='distributed'"],
     "privacy.secagg_clip_range"),
])
def test_federations_the_mechanism_does_not_fit_are_refused_naming_the_key(overrides, key):
    """The mechanism's own rules (ClientDP.of) fail when the config loads, before any round."""
    with pytest.raises(ValueError, match=key) as err:
        load_config(None, [*BASE, "privacy.client_dp_noise_multiplier=1.0", *overrides])
    assert "\n" not in str(err.value)


def test_client_dp_composes_with_example_level_dp_and_fedtt_plus_with_a_fixed_schedule():
    config = load_config(None, [*BASE, "privacy.client_dp_noise_multiplier=1.0", "privacy.dp=true",
                                "privacy.target_epsilon=3.0", "method='fedtt+'", "freezing.policy='cyclic'"])
    p = ClientDP.of(config)
    assert p.sample_rate == 1.0 and p.parties == 1 and p.clip_ceiling == math.inf
