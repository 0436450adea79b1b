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

__version__ = "0.2.0"
__all__ = ["AdapterConfig", "adapter_state_dict", "inject", "load_adapter", "load_pretrained",
           "load_trainable_state_dict", "save_adapter", "trainable_state_dict"]


def __getattr__(name: str):
    # load_pretrained brings in transformers (~3 s): imported on first use, so a Flower app process that only
    # answers a query stage (it imports this package) does without it
    if name == "load_pretrained":
        from .pretrained import load_pretrained
        return load_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
