"""Bytes of one MiniLM client message, per method and wire dtype: one record per tensor vs the packed format.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/wire_bytes.py [--layers 0]

"per tensor" is the earlier format (an ArrayRecord of one ``.npy`` array per tensor: 128-byte header + key
each); "packed" is fedtt's wire format (``federated/codec.py``: all values in one array, plus the
zlib-compressed index of names and shapes). Counted as Flower counts them (``count_bytes()`` of the
records), for the tensors a client uploads each round with each method's defaults. Deterministic: no timing.
"""

from __future__ import annotations

import argparse

import numpy as np
from flwr.app import Array, ArrayRecord

import fedtt
from fedtt.config import load_config
from fedtt.federated.codec import WIRE_DTYPES, pack
from fedtt.models import load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=0, help="MiniLM layers; 0 = all 6")
    args = parser.parse_args()
    backbone, _ = load_backbone("minilm", num_labels=2, num_hidden_layers=args.layers, seed=0)
    print(f"command: python bench/wire_bytes.py --layers {args.layers}\n")
    print("| method | tensors | values | per tensor, float32 (B) | packed float32 (B) | packed float16 (B) | "
          "packed bfloat16 (B) | per tensor / packed float32 |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for method in ("fedtt", "lora", "ffa-lora"):
        config = load_config(None, [f"method={method}"])
        model = fedtt.inject(__import__("copy").deepcopy(backbone), config.adapter)
        tensors = {k: v.numpy() for k, v in fedtt.trainable_state_dict(model).items()}
        values = sum(v.size for v in tensors.values())
        per_tensor = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()}).count_bytes()
        packed = {d: sum(r.count_bytes() for r in pack(tensors, d)) for d in WIRE_DTYPES}
        print(f"| {method} | {len(tensors)} | {values:,} | {per_tensor:,} | {packed['float32']:,} | "
              f"{packed['float16']:,} | {packed['bfloat16']:,} | {per_tensor / packed['float32']:.2f} |")


if __name__ == "__main__":
    main()
