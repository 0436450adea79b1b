"""FedTT+: which TT cores every client trains in a round (the others are frozen and not sent).

The paper says FedTT+ "adaptively freezes portions of tensor factors"; its exact rule is unknown
(../shared/notes/paper.md §5), so the rule is a small named policy. All clients of a round train the same
core indices, in every TT layer. With one trainable core per layer the TT map is linear in it, so averaging
that core is exactly averaging the clients' adapters (no "aggregation discordance").

- ``fixed``: the given core indices (negative ones count from the end), every round; default: the last core.
- ``cyclic``: ``cores_per_round`` consecutive cores, starting at the last core and rotating backwards by that
  many every ``period`` rounds.
- ``adaptive``: start with every core; after each round freeze the cores whose relative aggregated update
  ``||dG|| / ||G||`` (over all TT layers) fell below ``threshold`` times the largest one of that round;
  never freeze the last one.

Why start at the last core: the identity init sets the up-projection's last core to zero, and the gradient of
any other core goes through it, so until the last core has moved no other core can learn (a policy that trained
core 0 first would train only biases, norms and the head). Trained alone, the last core is FFA-LoRA's recipe in
TT form: the other cores act as a fixed random projection and the zero-initialised factor learns.

Why these: ``fixed`` with one core is the exact-aggregation case and the smallest payload; ``cyclic`` keeps
that exactness every round while still moving every core over time (a block-coordinate method over the
cores); ``adaptive`` follows the paper's wording ("adaptively freezing") with a signal the server already
has, the size of each core's aggregated update, so clients report nothing extra. The threshold is relative to
the round's largest update because with Adam the absolute size hardly decays: it is about lr x steps / |G|
(MiniLM, lr 2e-3, 20 steps: 1-4% per round in every round; results.json records it as ``core_updates``), so an
absolute threshold either freezes a core at once or never. Biases, norms and the head are not TT cores and are
trained every round (additive, so their average is exact too). Frozen cores are not sent: the strategy sends a
node only what it trains plus what changed since that node last synced.
"""

from __future__ import annotations

import re

from ..config import FreezingConfig

CORE = re.compile(r"\.core_(\d+)$")


def core_index(name: str) -> int | None:
    match = CORE.search(name)
    return int(match.group(1)) if match else None


def round_keys(trainable: list[str], cores: list[int] | None) -> list[str]:
    """The tensors trained in a round: everything but the TT cores outside ``cores`` (None: all cores)."""
    return [k for k in trainable if cores is None or core_index(k) is None or core_index(k) in cores]


class FreezingPolicy:
    def __init__(self, config: FreezingConfig, num_cores: int):
        self.config, self.num_cores = config, num_cores
        bad = [c for c in config.cores if not -num_cores <= c < num_cores]
        if config.policy == "fixed" and (not config.cores or bad):
            raise ValueError(f"freezing.cores = {config.cores} is not valid for TT layers with {num_cores} cores; "
                             f"give core indices in 0..{num_cores - 1} (or -1 for the last)")
        if not 1 <= config.cores_per_round <= num_cores or config.period < 1:
            raise ValueError(f"freezing.cores_per_round must be in 1..{num_cores} and freezing.period >= 1")
        self.active = list(range(num_cores))  # adaptive: the cores not frozen yet

    def trainable_cores(self, server_round: int) -> list[int]:
        """Core indices trained in ``server_round`` (1-based); a pure function of the round and the history."""
        cfg = self.config
        if cfg.policy == "fixed":
            return sorted({c % self.num_cores for c in cfg.cores})
        if cfg.policy == "cyclic":
            start = (server_round - 1) // cfg.period * cfg.cores_per_round
            return sorted({(self.num_cores - 1 - start - i) % self.num_cores for i in range(cfg.cores_per_round)})
        return list(self.active)

    def observe(self, relative_updates: dict[int, float]) -> None:
        """Adaptive: freeze the cores whose aggregated update was small in the round just aggregated."""
        if self.config.policy != "adaptive" or not relative_updates:
            return
        largest = max(relative_updates.get(c, 0.0) for c in self.active)
        keep = [c for c in self.active if relative_updates.get(c, 0.0) >= self.config.threshold * largest]
        self.active = keep or [max(self.active, key=lambda c: relative_updates.get(c, 0.0))]
