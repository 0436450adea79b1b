"""Where adapters go in each model family (LoRETTA's mapping), and which modules are norms or task heads."""

from __future__ import annotations

from torch import nn

# model_type -> family; the module names below are shared by every architecture of a family.
FAMILIES = {
    "bert": ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "camembert", "mpnet"),
    "llama": ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite"),
}
# Tensorized adapters: (module-name suffix, position). BERT: Houlsby-style after the attention output
# dense and after the FFN output dense (the suffix "output.dense" names both); LLaMA: before gate_proj and
# before up_proj (two separate adapters), after down_proj.
TT_TARGETS = {
    "bert": [("output.dense", "output")],
    "llama": [("mlp.gate_proj", "input"), ("mlp.up_proj", "input"), ("mlp.down_proj", "output")],
}
# LoRA, FFA-LoRA, VeRA and Fed-SB: the attention query and value (LoRA's and VeRA's papers)
LORA_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
# (IA)^3: (targets, the feed-forward ones among them, whose input is rescaled instead of their output), PEFT's
# defaults for bert and llama. BERT's suffix "output.dense" also names the attention output dense.
IA3_TARGETS = {"bert": (["key", "value", "output.dense"], ["output.dense"]),
               "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"])}
HEAD_NAMES = ("classifier", "score")
# The head's hidden x hidden dense, tensorized with adapter.head = "tensorized": BERT/DeBERTa pool through
# pooler.dense (pretrained), RoBERTa-style heads have classifier.dense (new); LLaMA's score has none.
HEAD_DENSE = ("pooler.dense", "classifier.dense")


def family_of(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f, types in FAMILIES.items() if model_type in types), None)


def unsupported(model: nn.Module) -> ValueError:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    supported = "; ".join(f"{f}: {', '.join(t)}" for f, t in FAMILIES.items())
    return ValueError(f"no default adapter placement for model type {model_type!r} (supported families: "
                      f"{supported}); pass adapter.target_modules = [module-name suffixes]")


def matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm") or name.endswith("RMSNorm")


def is_head(name: str) -> bool:
    return any(matches(name, head) for head in HEAD_NAMES)


def head_dense(model: nn.Module) -> list[str]:
    """Names of the hidden x hidden head dense layers the model has (one, or none for a LLaMA score head)."""
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(matches(name, d) for d in HEAD_DENSE)
             and module.in_features == module.out_features]
    return found[:1]
