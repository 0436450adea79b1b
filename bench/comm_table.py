"""Trainable and per-round communicated parameters and bytes of every method at paper scale (meta device, no weights).

    python bench/comm_table.py

Per client and round, "up" is what a client sends, "down" what it receives; the task head (a 2-class
classifier) is trained and sent by every method. Bytes are the tensor payload of the two messages as fedtt's codec
packs them in float32 (``federated/codec.py``: the values and the message index, without the round's config and
metrics), as Flower counts them. Frozen adapter tensors (FFA-LoRA's A, VeRA's shared projections, Fed-SB's A and
B) come from the seed on every client and are never sent. Methods run with fedtt's defaults (``fedtt.defaults``;
the TT adapter's LoRETTA shapes) unless the row gives the size; at RoBERTa-large and LLaMA-2-7B each method runs over
its size knob (``SIZES``). FedTT+ is counted for its default policy in
the steady state of a cross-silo federation: a round trains the policy's groups (up), and a node receives them
plus what changed in the round before (down). A policy whose choice depends on the data (adaptive) is shown by
its bounds: the smallest and the largest round it can produce; a fixed rotation (cyclic) by its mean over one
cycle and its largest round. RoBERTa-large's dense head (``classifier.dense``, 1,024 x 1,024) is counted as
trained; with ``adapter.head = "tensorized"`` it stays frozen and a TT layer beside it trains instead.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import fedtt
from fedtt.config import FreezingConfig, load_config
from fedtt.federated.codec import pack
from fedtt.federated.freezing import FreezingPolicy, factor_groups, num_cores, round_keys
from fedtt.frontier import SIZES as FRONTIER_SIZES

GEOMETRIES = {
    "BERT-base": (BertForSequenceClassification, BertConfig(num_labels=2)),
    "RoBERTa-large": (RobertaForSequenceClassification, RobertaConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, num_labels=2)),
    "LLaMA-2-7B": (LlamaForSequenceClassification, LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)),
    "LLaMA-2-13B": (LlamaForSequenceClassification, LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000)),
}
SWEPT = ("RoBERTa-large", "LLaMA-2-7B")
LABELS = {"lora": "LoRA q,v", "ffa-lora": "FFA-LoRA q,v", "fedtt": "FedTT, cores", "vera": "VeRA q,v",
          "ia3": "(IA)^3", "fed-sb": "Fed-SB q,v"}
# method -> (label, the adapter.rank values swept there: `fedtt frontier`'s; elsewhere the method's default).
# (IA)^3 has no size.
SIZES = {method: (label, list(FRONTIER_SIZES[method][1])) for method, label in LABELS.items()}


def model_with(cls, geometry, method: str, **options):
    with torch.device("meta"):
        model = cls(geometry)
    defaults = load_config(None, [f"method={method}"]).adapter.model_dump()
    return fedtt.inject(model, fedtt.AdapterConfig(**{**defaults, **options}))


def shapes_of(model) -> dict[str, tuple[int, ...]]:
    params = dict(model.named_parameters())
    return {n: tuple(params[n].shape) for n in model.fedtt_trainable}


def wire_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """The bytes of one message carrying these tensors, packed by the codec in float32."""
    arrays, index = pack({n: np.zeros(shape, np.float32) for n, shape in shapes.items()}, "float32")
    return arrays.count_bytes() + index.count_bytes()


def plain(cls, geometry, method, **options) -> tuple[int, int, int, int]:
    """(trainable, up, down, bytes up + down) of a method that sends everything it trains, both ways."""
    shapes = shapes_of(model_with(cls, geometry, method, **options))
    trainable = sum(int(np.prod(s)) for s in shapes.values())
    return trainable, trainable, trainable, 2 * wire_bytes(shapes)


def fedtt_plus(cls, geometry, freezing: FreezingConfig, **options) -> list[tuple[int, int, int, int]]:
    """(trainable, up, down, bytes up + down) of each steady-state round the policy can produce (see the module
    docstring)."""
    model = model_with(cls, geometry, "fedtt+", **options)
    shapes, groups = shapes_of(model), factor_groups(model)
    sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
    extras = sorted({g for g in groups.values() if isinstance(g, str)})
    policy = FreezingPolicy(freezing, num_cores(model), extras)
    if freezing.policy == "adaptive":  # any non-empty set of at most max_groups of the scheduled groups
        limit = freezing.max_groups or len(policy.order)
        choices = [list(c) + policy.always for k in range(1, limit + 1)
                   for c in itertools.combinations(policy.order, k)]
        pairs = [(a, b) for a in choices for b in choices]  # (this round, the round before)
    else:
        schedule = [policy.trainable(t) for t in range(1, 2 * len(policy.order) + 2)]
        pairs = list(zip(schedule[len(policy.order) + 1:], schedule[len(policy.order):]))
    total = sum(sizes.values())
    rounds = []
    for now, before in pairs:
        up = set(round_keys(groups, now))
        down = up | set(round_keys(groups, before))
        rounds.append((total, sum(sizes[k] for k in up), sum(sizes[k] for k in down),
                       wire_bytes({k: shapes[k] for k in up}) + wire_bytes({k: shapes[k] for k in down})))
    return rounds


def main() -> None:
    default = load_config(None, ["method=fedtt+"]).freezing
    print(f"FedTT+ default policy: {default.policy} (extras {default.extras}, max_groups {default.max_groups}, "
          f"threshold {default.threshold}, patience {default.patience})\n")
    print("| model | method | trainable | up / client / round | down / client / round | MB up+down / client / round "
          "(fp32) | LoRA r=8's bytes / these |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for name, (cls, geometry) in GEOMETRIES.items():
        rows = []
        for method, (label, ranks) in SIZES.items():
            for rank in ranks if name in SWEPT else [load_config(None, [f"method={method}"]).adapter.rank]:
                size = f" (r={rank})" if rank else ""
                rows.append((f"{label}{size} + head", plain(cls, geometry, method, rank=rank)))
        rows.append(("FedTT (r=5), with biases and norms (LoRETTA's set)",
                     plain(cls, geometry, "fedtt", train_biases=True, train_norms=True)))
        if name.startswith("RoBERTa"):
            rows.append(("FedTT (r=5), defaults + tensorized head", plain(cls, geometry, "fedtt", head="tensorized")))
        lora = plain(cls, geometry, "lora", rank=8)[3]
        for policy, label, options in (
                (default, f"FedTT+ default ({default.policy})", {}),
                (FreezingConfig(policy="cyclic"), "FedTT+ cyclic, one core per round", {}),
                (FreezingConfig(policy="cyclic"), "FedTT+ cyclic over cores and adapter biases",
                 {"train_biases": True})):
            rounds = fedtt_plus(cls, geometry, policy, **options)
            worst = max(rounds, key=lambda r: r[3])
            best = min(rounds, key=lambda r: r[3])
            if policy.policy == "adaptive":
                rows += [(f"{label}: smallest round", best), (f"{label}: largest round", worst)]
            else:
                mean = tuple(round(sum(r[i] for r in rounds) / len(rounds)) for i in range(4))
                rows += [(f"{label}: mean over a cycle", mean), (f"{label}: largest round", worst)]
        for label, (trainable, up, down, wire) in rows:
            print(f"| {name} | {label} | {trainable:,} | {up:,} | {down:,} | {wire / 1e6:.3f} | "
                  f"{lora / wire:.1f} |")


if __name__ == "__main__":
    main()
