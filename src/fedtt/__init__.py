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

__version__ = "0.1.0"
__all__ = ["AdapterConfig", "adapter_state_dict", "inject", "load_adapter", "load_trainable_state_dict",
           "save_adapter", "trainable_state_dict"]
