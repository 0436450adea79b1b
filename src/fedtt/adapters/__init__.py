"""Adapters with one interface: the tensorized (TT) adapter, and the baselines on peft's tuners (peft_methods)."""

from .config import METHODS, AdapterConfig
from .model import (
                    adapter_state_dict,
                    inject,
                    load_adapter,
                    load_trainable_state_dict,
                    read_adapter_config,
                    save_adapter,
                    trainable_state_dict,
)
from .tensorized import AdaptedLinear, TensorizedAdapter

__all__ = ["METHODS", "AdaptedLinear", "AdapterConfig", "TensorizedAdapter", "adapter_state_dict", "inject",
           "load_adapter", "load_trainable_state_dict", "read_adapter_config", "save_adapter",
           "trainable_state_dict"]
