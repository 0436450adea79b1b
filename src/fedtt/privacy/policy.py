"""A site's own privacy floor: what it requires of any run it takes part in, whatever the server's config says.

The server proposes a run config; each site declares its floor in its own node config (``flower-supernode
--node-config "require-dp=true max-epsilon=3.0 ..."``, or ``fedtt deploy-local``'s site files) and refuses, with
a one-line reason the server records, a run that is weaker. Keys (all optional):

    require-dp          true: the run must use DP-SGD
    max-epsilon         the largest run-wide epsilon it accepts (the run must set privacy.target_epsilon <= it)
    max-delta           the largest delta it accepts
    require-secagg      true: the run must use secure aggregation
    secagg-min-clients  the smallest number of clients it will be securely aggregated with
    site                a name for the site in the server's log (default: its partition id)
"""

from __future__ import annotations

from dataclasses import dataclass


class PolicyRefused(ValueError):
    pass


@dataclass(frozen=True)
class SitePolicy:
    name: str
    require_dp: bool = False
    max_epsilon: float | None = None
    max_delta: float | None = None
    require_secagg: bool = False
    secagg_min_clients: int = 0

    @classmethod
    def of(cls, node_config) -> SitePolicy:
        def get(key, kind):
            if key not in node_config:
                return None
            value = node_config[key]
            if kind is bool:
                return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            return kind(value)

        name = node_config.get("site", f"partition {node_config.get('partition-id', '?')}")
        return cls(str(name), bool(get("require-dp", bool)), get("max-epsilon", float), get("max-delta", float),
                   bool(get("require-secagg", bool)), get("secagg-min-clients", int) or 0)

    def check(self, config) -> None:
        """PolicyRefused naming the site and the floor, if ``config`` is weaker than this site accepts."""
        privacy = config.privacy
        guarded = self.require_dp or self.max_epsilon is not None
        if guarded and not privacy.dp:
            self._refuse("it requires DP-SGD (privacy.dp = true)")
        if guarded and privacy.reproducible_noise:
            self._refuse("privacy.reproducible_noise lets the server reproduce its DP noise")
        budget = privacy.target_epsilon
        if self.max_epsilon is not None and (budget is None or budget > self.max_epsilon):
            self._refuse(f"it accepts epsilon <= {self.max_epsilon:g}, the run's privacy.target_epsilon is "
                         f"{privacy.target_epsilon}")
        if self.max_delta is not None and privacy.delta is not None and privacy.delta > self.max_delta:
            self._refuse(f"it accepts delta <= {self.max_delta:g}, the run's privacy.delta is {privacy.delta:g}")
        if self.require_secagg and not privacy.secure_aggregation:
            self._refuse("it requires secure aggregation (privacy.secure_aggregation = true)")

    def min_clients(self, config) -> int:
        """The smallest secure-aggregation round this site takes part in: its own floor or the run's, the larger."""
        return max(self.secagg_min_clients, config.privacy.secagg_min_clients)

    def _refuse(self, why: str) -> None:
        raise PolicyRefused(f"site {self.name} refuses the run: {why} (its node config's privacy floor)")
