"""DP-SGD's noise against the gradient it hides, per group (head, adapter), for each method at initialisation.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/dp_signal.py [--config configs/demo.toml] [--examples 256]
        [--sample-rate 0.02] [--steps 100] [--epsilon 8] [--clip-head 1.0] [--clip fedtt=0.05 --clip lora=0.2]

For each method, one forward and backward pass (no clipping) over the first ``--examples`` examples of the
largest client gives the mean gradient's norm on the head and on the adapter: the signal a DP-SGD step would
follow. The noise of one step on a group clipped to C is Gaussian with norm about sigma sqrt(k) C sqrt(d) / B
(k clipping groups, d values, B = q n the expected batch; sigma calibrated by Opacus' RDP accountant to the
epsilon over ``--steps`` steps at delta 1e-5); the table prints that norm, its ratio to the signal per step and
the ratio after averaging over the steps (divided by sqrt(steps)). A ratio well above 1 means the group's update
is mostly noise. It ignores clipping's own loss of signal, and gradients change once training starts.
"""

from __future__ import annotations

import argparse
import math

import torch

from fedtt.config import load_config
from fedtt.federated.task import experiment, run_config_for
from fedtt.learning.batches import batch
from fedtt.learning.evaluation import losses
from fedtt.privacy.dp import calibrated_sigma


def group_norms(method: str, config: str | None, examples: int) -> tuple[int, dict[str, tuple[float, int]]]:
    """The largest client's size and, per group, (mean gradient norm, values) at initialisation."""
    cfg = load_config(config, [f"method='{method}'", "task.max_eval_examples=16"])
    exp = experiment(run_config_for(cfg, "/unused"))
    rows = max(exp.partitions, key=len)
    inputs, targets = batch(exp.train, rows[:examples], exp.device)
    exp.model.train()
    losses(cfg.task.kind, exp.model, inputs, targets).mean().backward()
    head = set(exp.model.fedtt_head_keys)
    groups = {"head": [], "adapter": []}
    for name, p in exp.model.named_parameters():
        if p.requires_grad:
            groups["head" if name in head else "adapter"].append(p)
    return len(rows), {g: (math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ps if p.grad is not None)),
                           sum(p.numel() for p in ps)) for g, ps in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--sample-rate", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--clip-head", type=float, default=1.0)
    parser.add_argument("--clip", action="append", default=[], help="METHOD=C_adapter (repeatable)")
    args = parser.parse_args()
    clips = dict(item.split("=") for item in args.clip) or {"fedtt": "0.05", "lora": "0.2"}
    sigma = calibrated_sigma("rdp", args.epsilon, 1e-5, args.sample_rate, args.steps)
    print(f"epsilon {args.epsilon:g}, q {args.sample_rate:g}, {args.steps} steps: sigma {sigma:.3f}")
    print("| method | group | values | mean gradient norm | clip | noise norm per step | noise / signal | "
          f"after {args.steps} steps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method, clip in clips.items():
        n, norms = group_norms(method, args.config, args.examples)
        expected_batch = args.sample_rate * n
        for group, (signal, values) in norms.items():
            c = args.clip_head if group == "head" else float(clip)
            noise = sigma * math.sqrt(2) * c * math.sqrt(values) / expected_batch
            print(f"| {method} | {group} | {values:,} | {signal:.5f} | {c:g} | {noise:.5f} | {noise / signal:.1f} | "
                  f"{noise / signal / math.sqrt(args.steps):.2f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
