"""Pretrained backbones (bundled offline MiniLM / SmolLM2, or any Hugging Face model) with a classification head."""

from fedtt.models.backbones import BUNDLED_MODELS, cache_dir, load_backbone

__all__ = ["BUNDLED_MODELS", "cache_dir", "load_backbone"]
