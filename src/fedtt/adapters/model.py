"""The adapter interface every method shares: inject, trainable tensors with stable names, save / load.

``inject`` freezes the backbone, adds the adapters in place and records on the model which tensors the
method trains (``fedtt_trainable``) and which tensors make up the adapter file (``fedtt_adapter_keys``:
the trainable ones plus frozen adapter tensors such as FFA-LoRA's A, and the task head). Names are the
model's own ``named_parameters`` names, so they are stable across processes and machines.

A saved adapter is a directory in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``, and
``fedtt.json`` (what fedtt needs to rebuild the model: the adapter config, the backbone, the task). The
baselines' directories (``peft_methods``) are standard PEFT adapters (``peft.PeftModel.from_pretrained(base,
directory)`` loads them without fedtt; the head and trained norms are ``modules_to_save``). The TT adapter's
``adapter_config.json`` describes a fedtt method PEFT does not know (registering one would mean adding a
member to PEFT's ``PeftType`` enum, i.e. patching PEFT): it loads with ``fedtt.load_adapter(model, directory)``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .peft_methods import PEFT_METHODS, peft_key
from .placement import TT_TARGETS, family_of, head_dense, is_head, is_norm, matches, unsupported
from .tensorized import AdaptedLinear, TensorizedAdapter, TensorizedHead

WEIGHTS_FILE, CONFIG_FILE, FEDTT_FILE = "adapter_model.safetensors", "adapter_config.json", "fedtt.json"


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze ``model``, add ``config``'s adapters in place and mark what the method trains."""
    if hasattr(model, "fedtt_config"):
        raise ValueError("this model already has fedtt adapters; load a fresh backbone to inject again")
    model.requires_grad_(False)
    backbone = {id(p) for p in model.parameters()}  # by identity: peft renames wrapped weights
    if config.method == "fedtt":
        _inject_tensorized(model, config)
    else:
        _inject_peft(model, config)
    if config.head == "tensorized":
        _tensorize_head(model, config)
    added = {name for name, p in model.named_parameters() if id(p) not in backbone}
    heads = [name for name, _ in model.named_modules() if is_head(name)]
    for name, module in model.named_modules():
        if (config.train_norms and is_norm(module)) or (config.train_head and name in heads):
            module.requires_grad_(True)
    params = dict(model.named_parameters())
    for name in added:  # adapter tensors train, except those a method keeps at their seeded init and unwanted biases
        frozen = (not config.train_biases and name.endswith(".bias") if config.method == "fedtt"
                  else PEFT_METHODS[config.method].frozen(name))
        params[name].requires_grad_(not frozen)
    for module in model.modules():  # a tensorized head's dense stays as it was
        if isinstance(module, TensorizedHead):
            module.base_layer.requires_grad_(False)
    model.fedtt_config = config
    model.fedtt_trainable = [n for n, p in params.items() if p.requires_grad]
    # The adapter file: what trains, frozen adapter tensors (e.g. FFA-LoRA's A) and the task head even when it is
    # frozen (its seeded init is not in the backbone's checkpoint).
    in_head = tuple(f"{h}." for h in heads)
    model.fedtt_adapter_keys = [n for n, p in params.items() if n in added or p.requires_grad or n.startswith(in_head)]
    model.fedtt_head_keys = [n for n in params if n.startswith(in_head)]  # DP clips the head on its own
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


def _tensorize_head(model: nn.Module, config: AdapterConfig) -> None:
    names = head_dense(model)
    if not names:
        raise ValueError(f"adapter.head = 'tensorized': {type(model).__name__} has no hidden x hidden head dense "
                         "(pooler.dense or classifier.dense); use adapter.head = 'dense'")
    parent_name, _, child = names[0].rpartition(".")
    parent = model.get_submodule(parent_name)
    generator = torch.Generator().manual_seed(config.seed + 1)  # not the adapters' stream: same adapters either way
    setattr(parent, child, TensorizedHead(getattr(parent, child), config, generator))


def _inject_peft(model: nn.Module, config: AdapterConfig) -> None:
    # peft is imported here, not at the top: ~1 s more for every Flower app process, and TT runs never use it
    from peft.tuners.tuners_utils import cast_adapter_dtype

    family = family_of(model)
    if config.target_modules is None and family is None:
        raise unsupported(model)
    # PEFT keeps the task head out of "all-linear" only for SEQ_CLS, and needs the task type in the saved config
    task_type = "SEQ_CLS" if any(is_head(n) for n, _ in model.named_modules()) else "CAUSAL_LM"
    PEFT_METHODS[config.method].inject(model, config, family, task_type)
    cast_adapter_dtype(model, adapter_name="default")  # fp32 adapters on a half-precision backbone, as PeftModel does


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
    """Everything an adapter file needs: the trainable tensors and frozen adapter parameters (e.g. FFA-LoRA's A)."""
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
    """Write the adapter directory (PEFT's layout; see the module docstring). ``metadata`` goes into fedtt.json."""
    config = _injected(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config.method == "fedtt":
        tensors = adapter_state_dict(model)
        peft_config = {"peft_type": "FEDTT_TENSOR_TRAIN", "library": "fedtt", "base_model_name_or_path":
                       (metadata or {}).get("model") or getattr(model, "name_or_path", None),
                       **config.model_dump(mode="json")}
        (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
    else:
        tensors = _peft_tensors(model)
        peft_config = copy.deepcopy(model.peft_config["default"])
        peft_config.modules_to_save = _saved_modules(model) or None
        peft_config.base_model_name_or_path = (metadata or {}).get("model_path") or getattr(model, "name_or_path", None)
        peft_config.inference_mode = True
        peft_config.save_pretrained(str(directory))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, directory / WEIGHTS_FILE,
              metadata={"format": "pt"})
    (directory / FEDTT_FILE).write_text(json.dumps({"adapter": config.model_dump(mode="json"), **(metadata or {})},
                                                   indent=2))
    return directory


def _saved_modules(model: nn.Module) -> list[str]:
    """Backbone modules a PEFT adapter carries whole (PEFT's modules_to_save): the head and trained norms."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    return sorted({n.rpartition(".")[0] for n in model.fedtt_adapter_keys if not n.startswith(tuned)})


def _peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {peft_key(name): tensor for name, tensor in adapter_state_dict(model).items()}
    for module in _saved_modules(model):  # the whole state dict: PEFT's loader maps every key of the module
        tensors.update({peft_key(f"{module}.{k}"): v for k, v in model.get_submodule(module).state_dict().items()})
    return PEFT_METHODS[model.fedtt_config.method].to_file(model, tensors)


def read_adapter_config(directory: str | Path) -> dict:
    """fedtt.json of a saved adapter: ``{"adapter": AdapterConfig fields, "model": ..., ...}``."""
    path = Path(directory) / FEDTT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no fedtt adapter at {directory}: {FEDTT_FILE} not found (pass the directory that "
                                "fedtt run wrote as <out>/adapter)")
    return json.loads(path.read_text())


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the saved adapter config into a fresh backbone (if needed) and load the saved tensors."""
    saved = read_adapter_config(directory)
    if not hasattr(model, "fedtt_config"):
        inject(model, AdapterConfig(**saved["adapter"]))
    tensors = load_file(Path(directory) / WEIGHTS_FILE)
    if (method := model.fedtt_config.method) != "fedtt":  # PEFT keys -> the model's names
        tensors = PEFT_METHODS[method].from_file(model, tensors)
        tensors = {name: tensors[key] for name in model.fedtt_adapter_keys if (key := peft_key(name)) in tensors}
    load_trainable_state_dict(model, tensors, allowed=model.fedtt_adapter_keys)
    return model
