"""fedtt: federated fine-tuning of language models with tensor-train adapters (FedTT, FedTT+)."""

from .adapters import (
                       AdapterConfig,
                       adapter_state_dict,
                       inject,
                       load_adapter,
                       load_trainable_state_dict,
                       save_adapter,
                       trainable_state_dict,
)
from .pretrained import load_pretrained

__version__ = "0.2.0"
__all__ = ["AdapterConfig", "adapter_state_dict", "inject", "load_adapter", "load_pretrained",
           "load_trainable_state_dict", "save_adapter", "trainable_state_dict"]
