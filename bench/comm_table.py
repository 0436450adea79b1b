"""Trainable and per-round communicated parameters of every method at paper scale (meta device, no weights).

    python bench/comm_table.py

Per client and round, "up" is what a client sends, "down" what it receives. FedTT+ trains one core per TT
layer per round (cyclic policy): up = that core (+ biases, norms); down additionally carries the core
trained last round once more (its aggregate), so steady-state down = two cores' worth. LoRA / FFA-LoRA
send everything they train both ways. The task head is excluded (it is the same for every method) and
LayerNorm/RMSNorm weights and adapter biases are trained and sent by the TT methods in LoRETTA's published
setting (fedtt's default); the "cores only" rows freeze them (adapter.train_biases / train_norms = false).
"""

from __future__ import annotations

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
from fedtt.federated.freezing import round_keys

GEOMETRIES = {
    "BERT-base": (BertForSequenceClassification, BertConfig(num_labels=2)),
    "RoBERTa-large": (RobertaForSequenceClassification, RobertaConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, num_labels=2)),
    "LLaMA-2-7B": (LlamaForSequenceClassification, LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)),
    "LLaMA-2-13B": (LlamaForSequenceClassification, LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000)),
}
CORES_ONLY = {"train_biases": False, "train_norms": False}
METHODS = [("FedTT (r=5): cores + biases + norms", "fedtt", {}),
           ("FedTT+ 1 core/round: + biases + norms", "fedtt+", {}),
           ("FedTT (r=5): cores only", "fedtt", CORES_ONLY),
           ("FedTT+ 1 core/round: cores only", "fedtt+", CORES_ONLY),
           ("LoRA q,v (r=8)", "lora", {}), ("FFA-LoRA q,v (r=8)", "ffa-lora", {})]


def counts(cls, geometry, method: str, options: dict) -> tuple[int, int, int]:
    with torch.device("meta"):
        model = cls(geometry)
    adapter_method = "fedtt" if method == "fedtt+" else method
    fedtt.inject(model, fedtt.AdapterConfig(method=adapter_method, train_head=False, **options))
    sizes = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    trainable = sum(sizes.values())
    if method != "fedtt+":
        return trainable, trainable, trainable
    up = sum(sizes[k] for k in round_keys(list(sizes), [1]))
    down = sum(sizes[k] for k in set(round_keys(list(sizes), [1])) | set(round_keys(list(sizes), [0])))
    return trainable, up, down


def main() -> None:
    print("| model | method | trainable | up / client / round | down / client / round | "
          "up+down vs LoRA | MB per client-round (fp32) |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for name, (cls, geometry) in GEOMETRIES.items():
        rows = [(label, *counts(cls, geometry, method, options)) for label, method, options in METHODS]
        lora_total = next(up + down for label, _, up, down in rows if label.startswith("LoRA"))
        for label, trainable, up, down in rows:
            print(f"| {name} | {label} | {trainable:,} | {up:,} | {down:,} | {lora_total / (up + down):.1f}x less | "
                  f"{4 * (up + down) / 1e6:.2f} |")


if __name__ == "__main__":
    main()
