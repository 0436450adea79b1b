"""``AdapterConfig``: which adapter method, its hyper-parameters, and what else is trained."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("fedtt", "lora", "ffa-lora")
NONLINEARITIES = ("relu", "gelu", "tanh", "silu", "identity")
INITS = ("loretta", "identity")
POSITIONS = ("output", "input")
DEFAULT_RANK = {"fedtt": 5, "lora": 8, "ffa-lora": 8}


@dataclass
class AdapterConfig:
    method: str = "fedtt"
    rank: int | None = None                # TT rank (LoRETTA default 5) or LoRA r (default 8)
    bottleneck: int = 64                   # tensorized adapter: hidden -> bottleneck -> hidden
    nonlinearity: str = "relu"
    scale: float = 1.0
    dropout: float = 0.0
    init: str = "loretta"                  # "identity": the up projection's last core starts at zero
    tt_shape: list[int] | None = None      # down projection's TT shape; the up projection uses it reversed
    target_modules: list[str] | None = None  # module-name suffixes; None: the model family's placement
    position: str = "output"               # for explicit target_modules: adapter "output" (after) / "input"
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    train_biases: bool = True              # the tensorized adapter's biases
    train_norms: bool | None = None        # LayerNorm / RMSNorm weights; None: on for fedtt, off for LoRA
    train_head: bool = True                # the task head (classifier / score)
    seed: int = 0                          # adapter init: every client of a federation starts identical

    def __post_init__(self):
        def bad(key: str, value, allowed) -> ValueError:
            return ValueError(f"adapter.{key} = {value!r} is not valid; use one of: {', '.join(map(str, allowed))}")

        if self.method not in METHODS:
            raise bad("method", self.method, METHODS)
        if self.nonlinearity not in NONLINEARITIES:
            raise bad("nonlinearity", self.nonlinearity, NONLINEARITIES)
        if self.init not in INITS:
            raise bad("init", self.init, INITS)
        if self.position not in POSITIONS:
            raise bad("position", self.position, POSITIONS)
        if self.rank is None:
            self.rank = DEFAULT_RANK[self.method]
        for key in ("rank", "bottleneck"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"adapter.{key} = {getattr(self, key)!r} is not valid; use a positive integer")
        if self.train_norms is None:
            self.train_norms = self.method == "fedtt"
