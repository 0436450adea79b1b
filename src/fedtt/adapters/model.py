"""The adapter interface every method shares: inject, trainable tensors with stable names, save / load.

``inject`` freezes the backbone, adds the adapters in place and records on the model which tensors the
method trains (``fedtt_trainable``) and which tensors make up the adapter file (``fedtt_adapter_keys``:
the trainable ones plus frozen adapter tensors such as FFA-LoRA's A). Names are the model's own
``named_parameters`` names, so they are stable across processes and machines.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .placement import LORA_TARGETS, TT_TARGETS, family_of, is_head, is_norm, matches, unsupported
from .tensorized import AdaptedLinear, TensorizedAdapter

WEIGHTS_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze ``model``, add ``config``'s adapters in place and mark what the method trains."""
    if hasattr(model, "fedtt_config"):
        raise ValueError("this model already has fedtt adapters; load a fresh backbone to inject again")
    model.requires_grad_(False)
    backbone = {id(p) for p in model.parameters()}  # by identity: peft renames wrapped weights
    if config.method == "fedtt":
        _inject_tensorized(model, config)
    else:
        _inject_lora(model, config)
    added = {name for name, p in model.named_parameters() if id(p) not in backbone}
    for name, module in model.named_modules():
        if (config.train_norms and is_norm(module)) or (config.train_head and is_head(name)):
            module.requires_grad_(True)
    params = dict(model.named_parameters())
    if config.method == "ffa-lora":  # FFA-LoRA: A stays at its (seeded) random init, only B trains
        for name in added:
            params[name].requires_grad_("lora_A" not in name)
    if config.method == "fedtt" and not config.train_biases:
        for name in added:
            params[name].requires_grad_(not name.endswith(".bias"))
    model.fedtt_config = config
    model.fedtt_trainable = [n for n, p in params.items() if p.requires_grad]
    model.fedtt_adapter_keys = [n for n, p in params.items() if n in added or p.requires_grad]
    return model


def _inject_tensorized(model: nn.Module, config: AdapterConfig) -> None:
    if config.target_modules:
        targets = [(suffix, config.position) for suffix in config.target_modules]
    elif (family := family_of(model)) is not None:
        targets = TT_TARGETS[family]
    else:
        raise unsupported(model)
    generator = torch.Generator().manual_seed(config.seed)
    replaced = 0
    for name, module in list(model.named_modules()):
        position = next((pos for suffix, pos in targets if matches(name, suffix)), None)
        if position is None or not isinstance(module, nn.Linear):
            continue
        hidden = module.out_features if position == "output" else module.in_features
        adapter = TensorizedAdapter(hidden, config, generator).to(module.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, AdaptedLinear(module, adapter, position))
        replaced += 1
    if replaced == 0:
        raise ValueError(f"adapter.target_modules {[t for t, _ in targets]} matched no nn.Linear in the model; "
                         "pass module-name suffixes that exist (see model.named_modules())")


def _inject_lora(model: nn.Module, config: AdapterConfig) -> None:
    family = family_of(model)
    if config.target_modules is None and family is None:
        raise unsupported(model)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules or LORA_TARGETS[family])
    with torch.random.fork_rng(devices=[]):  # seeded A (and B) init without touching the global RNG
        torch.manual_seed(config.seed)
        inject_adapter_in_model(lora, model)


def _injected(model: nn.Module) -> AdapterConfig:
    if not hasattr(model, "fedtt_config"):
        raise ValueError("the model has no fedtt adapters; call fedtt.inject(model, AdapterConfig(...)) first")
    return model.fedtt_config


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the tensors the method trains, by stable name."""
    _injected(model)
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in model.fedtt_trainable}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything an adapter file needs: the trainable tensors and frozen adapter tensors (FFA-LoRA's A)."""
    _injected(model)
    params = dict(model.named_parameters())
    return {name: params[name].detach().clone() for name in model.fedtt_adapter_keys}


def load_trainable_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool = True,
                              allowed: list[str] | None = None) -> None:
    """Copy ``tensors`` into the model. Unknown names and wrong shapes are errors; with ``strict`` every
    name in ``allowed`` (default: the trainable set) must be present, else a subset is fine."""
    _injected(model)
    allowed = model.fedtt_trainable if allowed is None else allowed
    unknown = sorted(set(tensors) - set(allowed))
    missing = sorted(set(allowed) - set(tensors)) if strict else []
    if unknown or missing:
        raise ValueError(f"adapter tensors do not match the model: {len(unknown)} unknown {unknown[:2]}, "
                         f"{len(missing)} missing {missing[:2]}; same backbone and adapter config?")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(params[name].shape)}: same backbone and adapter config?")
            params[name].copy_(tensor)


def save_adapter(model: nn.Module, directory: str | Path, metadata: dict | None = None) -> Path:
    """``adapter.safetensors`` + ``adapter_config.json`` (the adapter config and ``metadata``)."""
    config = _injected(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({"adapter": asdict(config), **(metadata or {})}, indent=2))
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapter at {directory}: {CONFIG_FILE} not found (pass the directory that "
                                "fedtt run wrote as <out>/adapter)")
    return json.loads(path.read_text())


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the saved adapter config into a fresh backbone (if needed) and load the saved tensors."""
    saved = read_adapter_config(directory)
    if not hasattr(model, "fedtt_config"):
        inject(model, AdapterConfig(**saved["adapter"]))
    load_trainable_state_dict(model, load_file(Path(directory) / WEIGHTS_FILE), allowed=model.fedtt_adapter_keys)
    return model
