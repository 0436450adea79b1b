"""Client-level (user-level) differential privacy for federated averaging: DP-FedAvg (McMahan et al. 2018) with
fixed or adaptive clipping (Andrew et al. 2021), the noise added by the server or split among the clients under
secure aggregation. Free of Flower: the strategy and the ClientApp call it.

The guarantee is (epsilon, delta)-DP of the sequence of global adapters the run releases, with respect to adding or
removing one *user* (a client's whole dataset), for the whole run. Each round every sampled client clips its update
(trained minus received, over the round's tensors jointly: with FedTT+ only the round's groups) to L2 norm C; the
sum of the clipped updates gets Gaussian noise of std ``z * C``; the server divides by the expected number of
clients per round (a public constant, McMahan et al.'s fixed denominator), so a user's presence moves the released
mean only through the clipped, noised sum.

Accounting: Opacus' RDP accountant for the sampled Gaussian mechanism with sample rate q = clients_per_round /
num_clients, one step per round (every round counts, a skipped one too: whether a round is skipped depends on who
was sampled). Its analysis assumes **Poisson** sampling (each client in each round independently with probability
q), so under client-level DP the server must sample that way (``poisson_sample``), not a fixed-size subset.
Amplification by sampling holds only against a party that does not know who was sampled. fedtt's server samples
with a generator seeded from the config's ``seed`` (for reproducibility): the server knows the sample, and so does
anyone holding the config (``config.toml`` is written next to the results) or results.json (it lists each round's
partitions). Against them the guarantee is the unamplified one: q = 1 over the rounds the user took part in
(``ClientDP.epsilon_unamplified``). A server that chooses clients itself (for example the same client every
round) cancels amplification: the amplified epsilon trusts the server to sample as configured.

Placement. ``server``: the server adds one Gaussian draw (its OS entropy) to the unmasked or plain sum; it sees
the clean sum (and, without secure aggregation, each clipped update), so the guarantee holds against whoever
sees the released adapters, not against the server. ``distributed``: each client adds its own share
N(0, z^2 C^2 / m') before secure aggregation masks its vector, m' being the fewest survivors a round may be
unmasked with (``federation.min_replies``, at least the SecAgg floor; every client refuses to unmask fewer). A
sum over s >= m' survivors then carries noise of variance (s / m') z^2 C^2 >= the stated z^2 C^2; m' = the minimum,
not the expected count, so a round with many drop-outs is never under-noised (it costs noise when all survive).
Shares of clients that collude with the server do not count: against the server and c colluding clients the
noise multiplier is z * sqrt((s - c) / m').

Caveat of the distributed placement: secure aggregation clips each value to +-``secagg_clip_range`` and rounds it
stochastically to 2**bits levels, so the sum the server unmasks carries a sum of *rounded* Gaussians (a discrete
distribution) of a slightly rounded update; the stated epsilon is that of the continuous Gaussian mechanism. A
rigorous discrete guarantee needs the distributed discrete Gaussian (Kairouz et al. 2021) or Skellam (Agarwal et
al. 2021) mechanisms, which fedtt does not implement. ``ClientDP.of`` requires a clip range that leaves 6 share
standard deviations of headroom above C (adaptive C is capped to keep it), so value clipping practically never
acts.

Adaptive clipping (Andrew et al. 2021): each client also reports b_i - 1/2, b_i = 1 if its update's norm was
within C (centred so that adding or removing a user moves the count's sum by 1/2); the sum gets noise of std
sigma_b, and C <- C * exp(-eta * (b~ - gamma)) with b~ = 1/2 + noised sum / m moves C towards the gamma-quantile
of the norms. So that the whole round is the stated mechanism, the update noise uses the paper's adjusted
multiplier z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Theorem 1): releasing both costs what one Gaussian step with
multiplier z costs.
"""

from __future__ import annotations

import math
import random
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# A hair under 1: float rounding of the rescaled values must never leave a clipped norm above the clip.
CLIP_SAFETY = 1.0 - 1e-9
# Distributed placement: the SecAgg clip range must exceed C by this many share standard deviations.
HEADROOM_SDS = 6.0


def default_delta(num_clients: int) -> float:
    """Below 1 / (number of users), as a user-level delta must be: 1e-5, or 1 / (10 N) for larger federations."""
    return min(1e-5, 1.0 / (10 * num_clients))


def epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """User-level epsilon at ``delta`` after ``rounds`` steps of the sampled Gaussian mechanism (Opacus' RDP)."""
    if rounds == 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, q, rounds)]
    return float(accountant.get_epsilon(delta=delta))


@lru_cache(maxsize=64)
def calibrate(epsilon: float, delta: float, q: float, rounds: int) -> float:
    """The noise multiplier z whose ``rounds`` steps spend at most ``epsilon`` (Opacus' bisection, within 0.01
    below the target); ValueError when no z up to 1e6 reaches it."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=rounds,
                                          accountant="rdp", epsilon_tolerance=0.01))


def poisson_sample(population: Sequence[int], q: float, rng: random.Random) -> list[int]:
    """Each member independently with probability q: the sampling the accountant's amplification assumes."""
    return [member for member in population if rng.random() < q]


def clip(update: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """(the update scaled to L2 norm <= ``clip_norm`` over all its tensors jointly, in float64; the centred
    clipped-count contribution b - 1/2 of adaptive clipping: +1/2 if the update was within the clip, else -1/2)."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in update.items()}
    norm = math.sqrt(sum(float(np.square(v).sum()) for v in arrays.values()))
    if norm <= clip_norm:
        return arrays, 0.5
    scale = clip_norm / norm * CLIP_SAFETY
    return {k: v * scale for k, v in arrays.items()}, -0.5


def add_noise(arrays: dict[str, np.ndarray], std: float,
              rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """``arrays`` plus independent N(0, std^2) on every value, in float64. Without ``rng`` the draw comes from
    128 fresh bits of the OS's entropy, so nothing in the config reproduces (or subtracts) it."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    return {k: np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, np.shape(v)) for k, v in arrays.items()}


def update_noise_multiplier(sigma: float, count_noise: float) -> float:
    """Andrew et al.'s Theorem 1: the update's multiplier such that (update sum, clipped count) together cost one
    Gaussian step with multiplier ``sigma``; the count's sensitivity is 1/2 (centred indicators)."""
    rest = sigma ** -2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"adaptive clipping needs count noise > noise multiplier / 2 = {sigma / 2:.4g}, got "
                         f"{count_noise:g}")
    return rest ** -0.5


def next_clip(clip_norm: float, noised_count: float, expected_clients: float, target_quantile: float,
              lr: float) -> float:
    """The geometric update of Andrew et al.: C * exp(-lr * (b~ - gamma)), b~ the noised fraction of clients
    within the clip (``noised_count``: the noised sum of the centred indicators b_i - 1/2)."""
    fraction = 0.5 + noised_count / expected_clients
    return clip_norm * math.exp(-lr * (fraction - target_quantile))


@dataclass(frozen=True)
class ClientDP:
    """The run's client-level DP plan, fixed before round 1 (``ClientDP.of(config)``)."""

    sigma: float              # z: the noise multiplier the accountant composes
    update_sigma: float       # the update sum's multiplier (= sigma with fixed clipping)
    count_noise: float        # sigma_b, std of the noise on the clipped count's sum (0: fixed clipping)
    sample_rate: float        # q
    rounds: int
    delta: float
    expected_clients: int     # m = q * num_clients: the mean's fixed denominator
    parties: int              # who adds the noise: 1 (server) or m' (each client a share; distributed)
    clip: float               # C of round 1
    clip_ceiling: float       # adaptive C stays below it (distributed: what the SecAgg clip range can carry)
    target_quantile: float
    clip_lr: float

    @classmethod
    def of(cls, config) -> ClientDP:
        """The plan of a config with ``privacy.client_dp``; ValueError (one line, naming the key) for a federation
        the mechanism does not fit."""
        p, fed = config.privacy, config.federation
        n, m = fed.num_clients, config.clients_per_round
        delta = p.client_dp_delta if p.client_dp_delta is not None else default_delta(n)
        if delta >= 1 / n:
            raise ValueError(f"privacy.client_dp_delta = {delta:g} must be below 1 / federation.num_clients = "
                             f"{1 / n:g} (a delta of 1/N allows releasing one user's data outright)")
        if fed.weighting != "uniform":
            raise ValueError("privacy.client_dp needs federation.weighting = 'uniform' (an example-count weight "
                             "would scale a client's contribution past the clip)")
        if fed.aggregator != "mean":
            raise ValueError(f"privacy.client_dp needs federation.aggregator = 'mean', not {fed.aggregator!r} (the "
                             "noise is calibrated to the sum)")
        if config.method == "fedtt+" and config.freezing.policy == "adaptive":
            raise ValueError("privacy.client_dp with method = 'fedtt+' needs freezing.policy = 'fixed' or 'cyclic' "
                             "(the adaptive policy chooses groups from un-noised per-client update sizes)")
        q = m / n
        if p.client_dp_noise_multiplier is not None:
            sigma = p.client_dp_noise_multiplier
        else:
            try:
                sigma = calibrate(p.client_dp_epsilon, delta, q, fed.rounds)
            except ValueError:
                raise ValueError(f"privacy.client_dp_epsilon = {p.client_dp_epsilon:g} cannot be met over "
                                 f"{fed.rounds} rounds at delta {delta:g} (noise multiplier above 1e6)") from None
        count_noise, update_sigma = 0.0, sigma
        if p.client_dp_adaptive:
            count_noise = p.client_dp_count_noise if p.client_dp_count_noise is not None else m / 20  # the paper's
            try:
                update_sigma = update_noise_multiplier(sigma, count_noise)
            except ValueError as err:
                raise ValueError(f"privacy.client_dp_count_noise: {err}") from None
        parties, ceiling = 1, math.inf
        if p.client_dp_placement == "distributed":
            parties = max(fed.min_replies, p.secagg_min_clients, 3)
            # every masked value (an update value <= C, or the centred count) plus its share stays in the range
            headroom = 1 + HEADROOM_SDS * update_sigma / math.sqrt(parties)
            ceiling = p.secagg_clip_range / headroom
            needed = max(p.client_dp_clip * headroom, 0.5 + HEADROOM_SDS * count_noise / math.sqrt(parties))
            if p.secagg_clip_range < needed:
                raise ValueError(f"privacy.secagg_clip_range = {p.secagg_clip_range:g} would clip the noised "
                                 f"values of client-level DP; use at least {needed:.4g} (the value's bound + "
                                 f"{HEADROOM_SDS:g} noise-share standard deviations)")
        return cls(sigma=sigma, update_sigma=update_sigma, count_noise=count_noise, sample_rate=q,
                   rounds=fed.rounds, delta=delta, expected_clients=m, parties=parties, clip=p.client_dp_clip,
                   clip_ceiling=ceiling, target_quantile=p.client_dp_target_quantile, clip_lr=p.client_dp_clip_lr)

    def sum_std(self, clip_norm: float) -> float:
        """The std of the noise the round's sum of clipped updates carries (per value)."""
        return self.update_sigma * clip_norm

    def noise_std(self, clip_norm: float) -> float:
        """The std each noising party adds per value: the server's one draw, or each client's share."""
        return self.sum_std(clip_norm) / math.sqrt(self.parties)

    def count_noise_std(self) -> float:
        """The std each noising party adds to the clipped count's sum (adaptive clipping)."""
        return self.count_noise / math.sqrt(self.parties)

    def next_clip(self, clip_norm: float, noised_count: float) -> float:
        """Next round's C from this round's noised count (post-processing: capping it costs no privacy)."""
        return min(self.clip_ceiling,
                   next_clip(clip_norm, noised_count, self.expected_clients, self.target_quantile, self.clip_lr))

    def epsilon(self, rounds_done: int) -> float:
        """The user-level epsilon after ``rounds_done`` rounds, amplified by sampling (see the module's caveats)."""
        return epsilon(self.sigma, self.sample_rate, rounds_done, self.delta)

    def epsilon_unamplified(self, participations: int) -> float:
        """Against whoever knows the sample (the server, the config's holders): q = 1 over the rounds the user
        took part in."""
        return epsilon(self.sigma, 1.0, participations, self.delta)


class ServerClientDP:
    """The server's side of a run's client-level DP: the current clip (adaptive clipping moves it), how often each
    user took part, and the round's release: the clipped sum plus its noise over the expected clients."""

    def __init__(self, plan: ClientDP, server_noise: bool):
        self.plan, self.server_noise = plan, server_noise
        self.clip = plan.clip
        self.participations: dict[int, int] = {}

    def record(self, server_round: int) -> dict:
        """What results.json says of the round (every round counts, a skipped one too: who was sampled decides it)."""
        return {"epsilon": self.plan.epsilon(server_round), "clip": self.clip,
                "noise_std": self.plan.sum_std(self.clip), "epsilon_unamplified": self.unamplified()}

    def release(self, total: dict[str, np.ndarray], count: float) -> dict[str, np.ndarray]:
        """The round's mean update from the sum of clipped updates (its noise added here with the server
        placement; already in from the clients' shares otherwise) and the summed clip indicators."""
        plan = self.plan
        if self.server_noise:
            total = add_noise(total, plan.noise_std(self.clip))
        if plan.count_noise:
            if self.server_noise:
                count = float(add_noise({"count": np.array(count)}, plan.count_noise_std())["count"])
            self.clip = plan.next_clip(self.clip, count)
        return {k: v / plan.expected_clients for k, v in total.items()}

    def took_part(self, partitions: Sequence[int]) -> None:
        for p in partitions:
            self.participations[p] = self.participations.get(p, 0) + 1

    def unamplified(self) -> float:
        """Against whoever knows the sample: the most-sampled user's epsilon at q = 1."""
        return self.plan.epsilon_unamplified(max(self.participations.values(), default=0))

    def state_dict(self) -> dict:
        return {"clip": self.clip, "participations": {str(k): v for k, v in self.participations.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.clip = float(state["clip"])
        self.participations = {int(k): int(v) for k, v in state["participations"].items()}
