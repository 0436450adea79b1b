"""``AdapterConfig``: which adapter method, its hyper-parameters, and what else is trained."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..defaults import method_default
from .peft_methods import PEFT_METHODS

METHODS = ("fedtt", *PEFT_METHODS)  # the tensorized adapter, then the baselines from peft
PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class AdapterConfig(BaseModel):
    """Validated on construction (a bad value is a ``ValueError`` naming the key); ``None`` fields take the
    method's default from ``fedtt.defaults``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    method: Literal[METHODS] = "fedtt"
    # the size knob: TT rank; LoRA / FFA-LoRA / Fed-SB r; VeRA's shared-matrix rank; (IA)^3 has none (unused)
    rank: PositiveInt | None = None
    bottleneck: PositiveInt = 64              # tensorized adapter: hidden -> bottleneck -> hidden
    nonlinearity: Literal["relu", "gelu", "tanh", "silu", "identity"] = "relu"
    scale: Annotated[float, Field(gt=0.0)] = 1.0
    dropout: Fraction = 0.0
    # "identity": the up projection's last core and the adapter biases start at zero, so the adapted model
    # equals the backbone at round 0 (as LoRA's B = 0); "loretta": LoRETTA's random cores and biases.
    init: Literal["identity", "loretta"] = "identity"
    tt_shape: Annotated[list[PositiveInt], Field(min_length=2)] | None = None  # down projection; up: reversed
    # module-name suffixes; None: the model family's placement; ["all-linear"] (LoRA): every linear but the head
    target_modules: Annotated[list[str], Field(min_length=1)] | None = None
    position: Literal["output", "input"] = "output"   # for explicit target_modules: adapter after / before
    lora_alpha: Annotated[float, Field(gt=0.0)] = 16.0
    lora_dropout: Fraction = 0.0
    train_biases: bool | None = None          # the tensorized adapter's biases
    train_norms: bool | None = None           # LayerNorm / RMSNorm weights (any method)
    train_head: bool = True                   # the task head (classifier / score); saved with the adapter either way
    # "tensorized": the head's hidden x hidden dense (BERT pooler.dense, RoBERTa classifier.dense) stays frozen
    # and a TT layer beside it, starting at zero, is trained (the paper's Figure 1(c)); "dense": it stays as is
    head: Literal["dense", "tensorized"] = "dense"
    seed: Annotated[int, Field(ge=0)] = 0     # adapter init: every client of a federation starts identical

    @model_validator(mode="after")
    def _method_defaults(self) -> AdapterConfig:
        for key in ("rank", "train_biases", "train_norms"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, method_default(self.method, f"adapter.{key}"))
        if self.train_biases is None:  # the PEFT methods have no adapter biases
            object.__setattr__(self, "train_biases", False)
        if self.head == "tensorized" and self.method != "fedtt":
            raise ValueError("adapter.head = 'tensorized' goes with the TT methods (fedtt, fedtt+); the PEFT "
                             "methods keep a dense head (PEFT could not load a TT head)")
        return self
