"""The baselines, each a ``peft`` tuner: LoRA, FFA-LoRA, VeRA, (IA)^3, and Fed-SB on PEFT's LoRA layers.

One class per method, as PEFT has one tuner per method: the PEFT config it builds, which of the tensors it
adds stay frozen, and how its tensors map to a standard PEFT adapter file and back. Frozen adapter tensors
(FFA-LoRA's A, VeRA's shared projections, Fed-SB's A and B) are drawn from the run's seed, so every client
builds the same ones and none is ever sent: only the trainable tensors travel.

A tensor's key in the adapter file is its model name without the adapter name (``default``), under
``base_model.model.`` (what ``peft.PeftModel.save_pretrained`` writes).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .placement import IA3_TARGETS, LORA_TARGETS

PEFT_PREFIX, ADAPTER = "base_model.model.", "default"


def peft_key(name: str) -> str:
    """The adapter-file key of a model tensor name (``q.lora_A.default.weight`` -> ``...q.lora_A.weight``)."""
    return PEFT_PREFIX + re.sub(rf"\.{ADAPTER}(?=\.|$)", "", name)


def _peft_targets(targets: list[str]) -> list[str] | str:
    return "all-linear" if targets == ["all-linear"] else targets  # PEFT's shorthand is a string


class Lora:
    """LoRA (Hu et al. 2022): W + (alpha / r) B A on the targets, A random and B = 0; both train and are sent."""

    # Opacus (DP-SGD) computes per-example gradients in hooks on the modules that own the trainable parameters,
    # which the forward pass must call (LoRA's nn.Linear factors, the TT layers); VeRA's and (IA)^3's vectors
    # live in PEFT ParameterDicts, which no forward pass calls
    per_example_gradients = True

    def peft_config(self, config, family: str | None, task_type: str):
        from peft import LoraConfig

        return LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=_peft_targets(config.target_modules or LORA_TARGETS[family]),
                          task_type=task_type)

    def inject(self, model: nn.Module, config, family: str | None, task_type: str) -> None:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(config.seed)
            self._inject(model, self.peft_config(config, family, task_type))

    def _inject(self, model: nn.Module, peft_config) -> None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(peft_config, model)

    def frozen(self, name: str) -> bool:
        """Whether the added parameter ``name`` keeps its seeded value (neither trained nor sent)."""
        return False

    def to_file(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter file's tensors from the model's (keyed by ``peft_key``)."""
        return tensors

    def from_file(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``to_file``."""
        return tensors


class FfaLora(Lora):
    """FFA-LoRA (Sun et al. 2024): LoRA with A frozen at its seeded init; only B trains, so averaging B is exactly
    averaging the clients' adapters."""

    def frozen(self, name: str) -> bool:
        return ".lora_A." in name


class Vera(Lora):
    """VeRA (Kopiczko et al. 2024): W + diag(b) B diag(d) A, where A (r x in) and B (out x r) are random, frozen and
    shared by every layer (drawn from ``projection_prng_key`` = the run's seed); each layer trains d (r values) and
    b (out values). b starts at 0, so the model is the backbone at init. ``adapter.rank`` is A and B's rank."""

    per_example_gradients = False

    def peft_config(self, config, family: str | None, task_type: str):
        from peft import VeraConfig

        return VeraConfig(r=config.rank, target_modules=_peft_targets(config.target_modules or LORA_TARGETS[family]),
                          projection_prng_key=config.seed, task_type=task_type)

    def _inject(self, model: nn.Module, peft_config) -> None:
        from peft import VeraModel

        # inject_adapter_in_model refuses tuners with shared state; the tuner object is dropped here, which is
        # fine because every VeRA layer holds a reference to the shared projections
        VeraModel(model, peft_config, ADAPTER)

    def to_file(self, model, tensors):
        from peft.tuners.vera import VeraLayer

        layer = next(m for m in model.modules() if isinstance(m, VeraLayer))
        # PEFT's layout (save_projection = True): the projections once, outside the model's keys
        return {**tensors, "base_model.vera_A": layer.vera_A[ADAPTER], "base_model.vera_B": layer.vera_B[ADAPTER]}

    def from_file(self, model, tensors):
        # the projections are rebuilt from the seed by inject; the file's copy is for PEFT
        return {k: v for k, v in tensors.items() if k not in ("base_model.vera_A", "base_model.vera_B")}


class IA3(Lora):
    """(IA)^3 (Liu et al. 2022): learned vectors rescale the outputs of the attention keys and values and the input
    of the feed-forward output projection (PEFT's placement); they start at 1, so the model is the backbone at init.
    It has no size knob. With ``adapter.target_modules`` every listed layer's output is rescaled."""

    per_example_gradients = False

    def peft_config(self, config, family: str | None, task_type: str):
        from peft import IA3Config

        targets, feedforward = (config.target_modules, []) if config.target_modules else IA3_TARGETS[family]
        return IA3Config(target_modules=_peft_targets(targets), feedforward_modules=feedforward, task_type=task_type)


class SharedBasis(nn.Module):
    """Fed-SB's up projection in place of PEFT's ``lora_B``: the frozen basis B (out x r) after the trained r x r
    matrix R. ``weight`` is their product B R, so PEFT's merging and delta-weight code see an ordinary LoRA B."""

    def __init__(self, basis: nn.Linear):
        super().__init__()
        self.basis = basis
        self.R = nn.Linear(basis.in_features, basis.in_features, bias=False, device=basis.weight.device)
        nn.init.zeros_(self.R.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.basis.weight @ self.R.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.basis(self.R(x))


class FedSB(Lora):
    """Fed-SB (Singhal et al. 2025, arXiv 2502.15436; federated LoRA-SB): W + (alpha / r) B R A on LoRA's targets with
    A and B frozen; only the r x r matrix R trains and is sent. The adapter is linear in R, so the server's average
    of the clients' R is exactly the average of their adapters, and a round costs r^2 values per layer whatever the
    layer's width.

    Initialisation differs from the paper: LoRA-SB derives A and B from a truncated SVD of a first gradient estimate
    (data the server would have to gather and factors it would have to send). Here A and B are random orthonormal
    factors drawn from the run's seed, identical on every client without being sent, and R = 0, so the model is the
    backbone at init.

    The saved adapter is the LoRA adapter it equals (``lora_B`` = B R): a standard PEFT LoRA directory. fedtt loads it
    back with B R as the basis and R = I, the same function.
    """

    def inject(self, model: nn.Module, config, family: str | None, task_type: str) -> None:
        from peft.tuners.lora import LoraLayer

        super().inject(model, config, family, task_type)
        generator = torch.Generator().manual_seed(config.seed)
        for layer in [m for m in model.modules() if isinstance(m, LoraLayer)]:
            down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            with torch.no_grad():
                down.weight.copy_(_orthonormal(*down.weight.shape, generator))
                up.weight.copy_(_orthonormal(*up.weight.shape, generator))
            layer.lora_B[ADAPTER] = SharedBasis(up)

    def frozen(self, name: str) -> bool:
        return not name.endswith(".R.weight")

    def to_file(self, model, tensors):
        tensors = {k: v for k, v in tensors.items() if not k.endswith((".basis.weight", ".R.weight"))}
        for name, module in model.named_modules():
            if isinstance(module, SharedBasis):
                tensors[peft_key(name) + ".weight"] = module.weight.detach()
        return tensors

    def from_file(self, model, tensors):
        tensors = dict(tensors)
        for name, module in model.named_modules():
            if isinstance(module, SharedBasis):
                tensors[peft_key(name) + ".basis.weight"] = tensors.pop(peft_key(name) + ".weight")
                tensors[peft_key(name) + ".R.weight"] = torch.eye(module.R.in_features)
        return tensors


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns (or rows, when it is wide), from ``generator``."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=generator))
    return q if rows >= cols else q.T


# method name -> its tuner; the TT method ("fedtt") is fedtt's own (tensorized.py)
PEFT_METHODS = {"lora": Lora(), "ffa-lora": FfaLora(), "vera": Vera(), "ia3": IA3(), "fed-sb": FedSB()}


def per_example_gradients(method: str) -> bool:
    """Whether local DP-SGD (Opacus) can train the adapter method (``fedtt``'s TT layers: yes)."""
    return method not in PEFT_METHODS or PEFT_METHODS[method].per_example_gradients
