"""FedTT+: which factor groups every client trains in a round (the others are frozen and not sent).

The paper says FedTT+ "adaptively freezes portions of tensor factors"; its exact rule is unknown
(../shared/notes/paper.md §5), so the rule is a small named policy over *groups*. A group is one core index
across every adapter TT layer (core ``j`` of every down and up projection), or, with ``freezing.extras =
"scheduled"``, all adapter biases (``"bias"``) or all norm weights (``"norm"``); the task head is trained every
round. All clients of a round train the same groups. With one core group the TT map is linear in it, so
averaging that core is exactly averaging the clients' adapters (no "aggregation discordance"); biases and norms
are additive, so their average is exact too.

- ``fixed``: the listed groups every round (default: the last core).
- ``cyclic``: ``cores_per_round`` groups per round, starting at the last core and rotating backwards (then the
  biases and norms when scheduled), one step every ``period`` rounds.
- ``adaptive``: starts with every group and, after each round, freezes the groups whose clients disagreed:
  a group's *agreement* is ``||sum_c p_c dG_c||^2 / sum_c p_c ||dG_c||^2``, 1 when every client moved it the
  same way and ``sum_c p_c^2`` (1/N for N equal clients) for unrelated moves, rescaled so that chance is 0
  (negative: the moves cancel more than chance). It is computed from the aggregate and the squared update
  sizes the clients report, so it works under secure aggregation too. A group whose agreement falls below ``threshold``
  is frozen; after ``patience`` rounds it is tried again (unfrozen), because the other groups have moved.
  ``max_groups`` > 0 trains at most that many groups per round, the most agreeing first (untried groups count
  as agreeing fully). At least one group always trains.

By default (``extras = "scheduled"``, adaptive ``max_groups = 1``) every policy trains one group per round:
FedTT+'s policies then differ only in *which* group they train, at the same traffic, and every round's
average is exact; FedTT is the reference that trains every group every round.

Why start at the last core: with the identity init the up projection's last core is zero, and the gradient of
any other core (and of the down projection) goes through it, so until it has moved no other core can learn.
Why agreement: under heterogeneity clients pull a factor in different directions; the average of such updates
mostly cancels, so sending them costs traffic for little progress and, with several factors trained at once,
the averaged factors' product drifts from the clients' products. Agreement is scale-free: unlike the size of
an update, it does not rank groups by their norm under Adam (whose step size hardly depends on the gradient).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..adapters.placement import is_norm
from ..config import Config, FreezingConfig
from ..tt import TTLinear

ADAPTER_TT = re.compile(r"\.adapter\.(down|up)\.(core_(\d+)|bias)$")
Group = int | str


def factor_groups(model: nn.Module) -> dict[str, Group | None]:
    """Each trainable tensor's group: its core index, "bias", "norm", or None (the head: always trained)."""
    norms = {f"{name}.{p}" for name, m in model.named_modules() if is_norm(m) for p, _ in m.named_parameters()}
    groups = {}
    for name in model.fedtt_trainable:
        match = ADAPTER_TT.search(name)
        if match:
            groups[name] = int(match.group(3)) if match.group(3) is not None else "bias"
        else:
            groups[name] = "norm" if name in norms else None
    return groups


def num_cores(model: nn.Module) -> int:
    """The core count of the adapters' TT layers, which FedTT+ needs to be the same for all of them."""
    counts = {len(m.shape) for name, m in model.named_modules() if isinstance(m, TTLinear) and ".adapter." in name}
    if len(counts) != 1:
        raise ValueError(f"method = 'fedtt+' needs every adapter TT layer to have the same number of cores, the "
                         f"model has {sorted(counts) or 'no TT layers'}; set adapter.tt_shape (or use fedtt)")
    return counts.pop()


def round_keys(groups: dict[str, Group | None], active: list[Group] | None, head_only: Iterable[str] = ()) -> list[str]:
    """The tensors trained in a round, and so sent both ways: the head and every tensor of an active group (None:
    all groups); in a head-only round (``federation.head_only_rounds``) the head's tensors, ``head_only``, alone."""
    if head_only:
        head = set(head_only)
        return [k for k in groups if k in head]
    return [k for k, g in groups.items() if active is None or g is None or g in active]


def head_only_round(config: Config, server_round: int) -> bool:
    return server_round <= config.federation.head_only_rounds


def nodes_keep_state(config: Config) -> bool:
    """Whether a node merges partial payloads into a global state it keeps (``client_app.merge_synced``, and
    ``sync.Sync`` on the server): under FedTT+ only, whose frozen groups change between a node's rounds."""
    return config.method == "fedtt+"


class FreezingPolicy:
    def __init__(self, config: FreezingConfig, num_cores: int, extras: list[str]):
        """``extras``: the non-core groups the model trains ("bias", "norm"); scheduled only if configured."""
        self.config, self.num_cores = config, num_cores
        scheduled = [e for e in extras if config.extras == "scheduled"]
        self.order: list[Group] = [*range(num_cores - 1, -1, -1), *scheduled]  # last core first
        self.always = [e for e in extras if e not in scheduled]
        if config.policy == "fixed":
            bad = [g for g in config.cores if not (isinstance(g, int) and -num_cores <= g < num_cores
                                                   or g in scheduled)]
            if bad:
                raise ValueError(f"freezing.cores = {config.cores} is not valid: {bad[0]!r} is not a group of this "
                                 f"model; use core indices 0..{num_cores - 1} (or -1 for the last)"
                                 + (f" or {', '.join(map(repr, scheduled))}" if scheduled else ""))
        if config.cores_per_round > len(self.order):
            raise ValueError(f"freezing.cores_per_round = {config.cores_per_round} is more than the "
                             f"{len(self.order)} groups; use 1..{len(self.order)}")
        self.agreement: dict[Group, float] = {}     # adaptive: the last measured agreement of each group
        self.frozen_at: dict[Group, int] = {}       # adaptive: the round after which a group was frozen

    def trainable(self, server_round: int) -> list[Group]:
        """The groups trained in ``server_round`` (1-based) and the always-trained extras; a pure function of
        the round and the observed history."""
        cfg = self.config
        if cfg.policy == "fixed":
            chosen = {g % self.num_cores if isinstance(g, int) else g for g in cfg.cores}
        elif cfg.policy == "cyclic":
            start = (server_round - 1) // cfg.period * cfg.cores_per_round
            chosen = {self.order[(start + i) % len(self.order)] for i in range(cfg.cores_per_round)}
        else:
            chosen = self._adaptive(server_round)
        return [g for g in self.order if g in chosen] + self.always

    def _adaptive(self, server_round: int) -> set[Group]:
        cfg = self.config
        thawed = {g for g, at in self.frozen_at.items() if server_round - at > cfg.patience}
        for g in thawed:
            del self.frozen_at[g]
            self.agreement.pop(g, None)  # tried again as if new
        live = [g for g in self.order if g not in self.frozen_at]
        live.sort(key=lambda g: -self.agreement.get(g, 1.0))  # stable: ties keep the last-core-first order
        return set(live[: cfg.max_groups] if cfg.max_groups else live)

    def observe(self, server_round: int, agreement: dict[Group, float]) -> None:
        """Adaptive: freeze the trained groups whose clients disagreed in the round just aggregated."""
        if self.config.policy != "adaptive":
            return
        agreement = {g: a for g, a in agreement.items() if g in self.order}  # not the always-trained extras
        self.agreement.update(agreement)
        low = [g for g, a in agreement.items() if a < self.config.threshold]
        live = [g for g in self.order if g not in self.frozen_at]
        if len(low) >= len(live):  # keep the most agreeing one
            low.remove(max(low, key=lambda g: (agreement[g], -self.order.index(g))))
        for g in low:
            self.frozen_at[g] = server_round

    def state_dict(self) -> dict:
        return {"agreement": [[g, a] for g, a in self.agreement.items()],
                "frozen_at": [[g, r] for g, r in self.frozen_at.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.agreement = {g: float(a) for g, a in state["agreement"]}
        self.frozen_at = {g: int(r) for g, r in state["frozen_at"]}
