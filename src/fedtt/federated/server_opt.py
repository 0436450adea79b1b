"""Server-side optimisers: how the server turns a round's mean update into the step it adds to the global adapter.

The mean of the clients' updates (``aggregate - current global``, Reddi et al. 2021's pseudo-gradient, with the
sign of an update rather than of a gradient) is treated as one optimiser step's input, with the update rules of
Flower's strategies (flwr 1.41, ``flwr/serverapp/strategy``), so a fedtt run can be compared with theirs:

- ``sgd`` (FedAvg; FedAvgM without momentum): ``x += lr * delta``. With ``lr = 1`` the step *is* the mean, bit
  for bit, so the default is plain FedAvg.
- ``momentum`` (FedAvgM, Hsu et al. 2019; PyTorch's SGD convention, no dampening): ``m = mu * m + delta``,
  ``x += lr * m``.
- ``adam`` (FedAdam): ``m = b1 m + (1 - b1) delta``, ``v = b2 v + (1 - b2) delta^2``,
  ``x += lr * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) * m / (sqrt(v) + tau)``.
- ``yogi`` (FedYogi): ``m`` as Adam's, ``v -= (1 - b2) delta^2 sign(v - delta^2)``, ``x += lr * m / (sqrt(v) +
  tau)`` (no bias correction, as Flower's).

State is kept per tensor, and only the tensors a round aggregated take a step: a FedTT+ group frozen this round
must not change (the nodes hold it and it is not sent), so its moments wait as they are; Adam's ``t`` is the
tensor's own count of steps, which equals Flower's round number for a tensor trained every round. Moments are
float64 and saved with the server checkpoint (``tensors``), so a resumed run takes the same steps. Under
client-level DP the input is the noised mean: the optimiser is post-processing and spends no privacy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Flower's defaults for what a config leaves out (FedAvgM's momentum is 0, which is plain FedAvg: 0.9 here, the
# value Hsu et al. 2019 mostly use).
DEFAULTS = {
    "sgd": {"lr": 1.0},
    "momentum": {"lr": 1.0, "momentum": 0.9},
    "adam": {"lr": 1e-1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "yogi": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}
PREFIX = "server_opt:"  # checkpoint tensor names of the moments; no trainable tensor's name has a colon


@dataclass
class Moments:
    """One tensor's optimiser state: first and second moments (None where unused) and the steps it took."""

    m: np.ndarray | None = None
    v: np.ndarray | None = None
    steps: int = 0


def settings(federation) -> dict[str, float]:
    """The optimiser's hyper-parameters: the config's ``server_*`` keys, Flower's defaults where unset."""
    kind = federation.server_optimizer
    given = {"lr": federation.server_lr, "momentum": federation.server_momentum,
             "beta1": federation.server_beta1, "beta2": federation.server_beta2, "tau": federation.server_tau}
    return {key: value if (value := given[key]) is not None else default
            for key, default in DEFAULTS[kind].items()}


def unused_keys(federation) -> list[str]:
    """The ``server_*`` keys a config sets that its ``server_optimizer`` does not use (a config error)."""
    used = DEFAULTS[federation.server_optimizer]
    return [f"server_{key}" for key in ("momentum", "beta1", "beta2", "tau")
            if getattr(federation, f"server_{key}") is not None and key not in used]


def _zero_moments(state: Moments) -> tuple[np.ndarray | float, np.ndarray | float]:
    """(m, v), 0 for a tensor that has taken no step yet (Flower's FedOpt starts both at zeros)."""
    return (0.0 if state.m is None else state.m), (0.0 if state.v is None else state.v)


class ServerOptimizer:
    def __init__(self, kind: str, hyper: dict[str, float]):
        self.kind, self.hyper = kind, hyper
        self.state: dict[str, Moments] = {}

    @classmethod
    def of(cls, federation) -> ServerOptimizer:
        return cls(federation.server_optimizer, settings(federation))

    def step(self, mean: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Moments]]:
        """(the step to add to the global adapter, the state after it) for the round's ``mean`` update; nothing
        changes until ``accept`` (a round whose merge fails keeps the optimiser as it was)."""
        if self.kind == "sgd":
            lr = self.hyper["lr"]
            return (mean if lr == 1.0 else {k: lr * v for k, v in mean.items()}), {}
        rule = {"momentum": self._momentum, "adam": self._adam, "yogi": self._yogi}[self.kind]
        new = {name: rule(np.asarray(delta, dtype=np.float64), self.state.get(name, Moments()))
               for name, delta in mean.items()}
        return {name: step for name, (step, _) in new.items()}, {name: state for name, (_, state) in new.items()}

    def accept(self, state: dict[str, Moments]) -> None:
        self.state.update(state)

    def _momentum(self, delta: np.ndarray, old: Moments) -> tuple[np.ndarray, Moments]:
        m = delta if old.m is None else self.hyper["momentum"] * old.m + delta  # Flower: the first m is delta
        return self.hyper["lr"] * m, Moments(m, None, old.steps + 1)

    def _adam(self, delta: np.ndarray, old: Moments) -> tuple[np.ndarray, Moments]:
        h, t, (m, v) = self.hyper, old.steps + 1, _zero_moments(old)
        m = h["beta1"] * m + (1 - h["beta1"]) * delta
        v = h["beta2"] * v + (1 - h["beta2"]) * delta ** 2
        # Flower's bias correction uses server_round + 1 (round 1 corrects with beta^2): kept, to match FedAdam.
        lr = h["lr"] * np.sqrt(1 - h["beta2"] ** (t + 1)) / (1 - h["beta1"] ** (t + 1))
        return lr * m / (np.sqrt(v) + h["tau"]), Moments(m, v, t)

    def _yogi(self, delta: np.ndarray, old: Moments) -> tuple[np.ndarray, Moments]:
        h, (m, v) = self.hyper, _zero_moments(old)  # Flower starts v at 0 (the paper at tau^2)
        m = h["beta1"] * m + (1 - h["beta1"]) * delta
        v = v - (1 - h["beta2"]) * delta ** 2 * np.sign(v - delta ** 2)
        return h["lr"] * m / (np.sqrt(v) + h["tau"]), Moments(m, v, old.steps + 1)

    # ------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """The JSON part of the state (each tensor's step count); the moments travel as ``tensors()``."""
        return {"kind": self.kind, "steps": {name: s.steps for name, s in self.state.items()}}

    def tensors(self) -> dict[str, np.ndarray]:
        return {f"{PREFIX}{part}:{name}": value for name, s in self.state.items()
                for part, value in (("m", s.m), ("v", s.v)) if value is not None}

    def load_state_dict(self, state: dict | None, tensors: dict[str, np.ndarray]) -> None:
        """Restore ``state_dict()`` and ``tensors()`` (None: a checkpoint from before server optimisers: sgd)."""
        self.state = {}
        for name, steps in (state or {}).get("steps", {}).items():
            self.state[name] = Moments(tensors.get(f"{PREFIX}m:{name}"), tensors.get(f"{PREFIX}v:{name}"), int(steps))
