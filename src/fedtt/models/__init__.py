"""Pretrained backbones (bundled offline MiniLM / SmolLM2, or any Hugging Face model): a classification head or
a causal LM, on the configured device and dtype."""

from fedtt.models.backbones import (
                                    BUNDLED_MODELS,
                                    cache_dir,
                                    hidden_size,
                                    load_backbone,
                                    resolve_device,
                                    resolve_dtype,
)

__all__ = ["BUNDLED_MODELS", "cache_dir", "hidden_size", "load_backbone", "resolve_device", "resolve_dtype"]
