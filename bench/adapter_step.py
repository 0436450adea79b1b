"""Training-step time and trainable-parameter count: TT adapter (FedTT) vs LoRA vs FFA-LoRA on MiniLM.

One run loads the bundled MiniLM (real weights) once, deep-copies it three times (same seeded
classification head), injects one adapter method into each copy and times a full local training step
(forward + backward + AdamW step) on the same batch of real Rotten Tomatoes sentences. The methods are
interleaved step by step (TT, LoRA, FFA-LoRA, TT, LoRA, ...) so that machine noise (other processes,
frequency changes) hits all three alike; the step times are summarised by median and IQR.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/adapter_step.py [--steps 12 --warmup 3 --batch-size 32 ...]

Prints a Markdown report (command line, settings, table, ratios) to stdout.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import transformers

import fedtt
from fedtt import AdapterConfig
from fedtt.data import load_task
from fedtt.models import load_backbone

# (label, config): the library defaults for each method, spelled out so the table says what was run.
METHODS = [
    ("TT adapter (fedtt)", AdapterConfig(method="fedtt", rank=5)),
    ("LoRA", AdapterConfig(method="lora", rank=8)),
    ("FFA-LoRA", AdapterConfig(method="ffa-lora", rank=8)),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per method (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per step (default 32)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence, padded (default 64)")
    p.add_argument("--layers", type=int, default=0, help="MiniLM layers to keep; 0 = all 6 (default 0)")
    p.add_argument("--seed", type=int, default=0, help="head and adapter init seed (default 0)")
    args = p.parse_args(argv)
    for key in ("steps", "batch_size", "max_length"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.layers < 0:
        p.error("--warmup and --layers must be >= 0")
    return args


def command_line() -> str:
    """The command as invoked (interpreter included), with HF_HUB_OFFLINE if it was set."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    env = f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']} " if "HF_HUB_OFFLINE" in os.environ else ""
    return env + shlex.join(argv)


def build(backbone: torch.nn.Module, config: AdapterConfig, seed: int):
    """A deep copy of ``backbone`` with ``config``'s adapters, its optimizer and its parameter counts."""
    model = copy.deepcopy(backbone)
    before = {id(p) for p in model.parameters()}
    config = copy.deepcopy(config)
    config.seed = seed
    fedtt.inject(model, config)
    model.train()  # dropout on, as in local training
    params = [p for p in model.parameters() if p.requires_grad]
    counts = {
        "tensors": len(params),
        "trainable": sum(p.numel() for p in params),
        "adapter": sum(p.numel() for p in params if id(p) not in before),  # the rest: head (+ norms for TT)
        # what a client uploads each round: exactly the trainable tensors
        "communicated": sum(t.numel() for t in fedtt.trainable_state_dict(model).values()),
    }
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    return model, optimizer, params, counts


def train_step(model, optimizer, batch: dict, labels: torch.Tensor) -> tuple[float, float]:
    """Wall and process-CPU seconds of one forward + backward + AdamW step (gradients are cleared before
    the clocks start). CPU / wall is the number of cores the step actually got: about the torch thread
    count on an idle machine, less when other processes compete for the cores."""
    optimizer.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the classification head is drawn from the global RNG at load time
    backbone, tokenizer = load_backbone("minilm", num_labels=2, num_hidden_layers=args.layers)
    n_layers = backbone.config.num_hidden_layers

    train = load_task("rotten_tomatoes").train
    if len(train) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} > {len(train)} training sentences")
    rows = train.select(range(args.batch_size))
    batch = dict(tokenizer(list(rows["text"]), padding="max_length", truncation=True,
                           max_length=args.max_length, return_tensors="pt"))
    labels = torch.tensor(list(rows["label"]))
    real_tokens = int(batch["attention_mask"].sum())

    runs = []
    for label, config in METHODS:
        model, optimizer, params, counts = build(backbone, config, args.seed)
        runs.append({"label": label, "config": config, "model": model, "opt": optimizer, "params": params,
                     "counts": counts, "times": [], "cores": []})
    del backbone

    load_before = os.getloadavg()[0]
    # Round-robin: every round runs each method once, so slow phases of the machine are shared.
    for step in range(args.warmup + args.steps):
        for run in runs:
            seconds, cpu_seconds = train_step(run["model"], run["opt"], batch, labels)
            if step == 0:  # sanity: the backward reached every trainable tensor
                missing = [i for i, p in enumerate(run["params"]) if p.grad is None]
                if missing:
                    raise RuntimeError(f"{run['label']}: {len(missing)} trainable tensors got no gradient")
            if step >= args.warmup:
                run["times"].append(seconds)
                run["cores"].append(cpu_seconds / seconds)
    load_after = os.getloadavg()[0]

    tt, lora, ffa = runs
    for run in runs:
        run["q"] = quartiles([t * 1e3 for t in run["times"]])

    def med(run):
        return run["q"][1]

    def n(run):
        return run["counts"]["trainable"]

    out = [
        "Command:",
        "",
        "```",
        command_line(),
        "```",
        "",
        f"Settings: MiniLM (all-MiniLM-L6-v2, {n_layers} layers, hidden {tt['model'].config.hidden_size}), "
        f"batch {args.batch_size} x {args.max_length} tokens (rotten_tomatoes train[:{args.batch_size}], "
        f"{real_tokens} non-pad tokens), {args.warmup} warm-up + {args.steps} timed steps per method, "
        f"round-robin; AdamW; seed {args.seed}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; 1-min load average "
        f"{load_before:.2f} before / {load_after:.2f} after the timed loop.",
        "",
        "| method | rank | trainable params | of which adapter | trainable tensors | communicated / round | "
        "step median (ms) | IQR (ms) [Q1-Q3] | CPU / wall |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in runs:
        c, (q1, q2, q3) = run["counts"], run["q"]
        out.append(f"| {run['label']} | {run['config'].rank} | {c['trainable']:,} | {c['adapter']:,} | "
                   f"{c['tensors']} | {c['communicated']:,} | {q2:.1f} | {q3 - q1:.1f} [{q1:.1f}-{q3:.1f}] | "
                   f"{statistics.median(run['cores']):.2f} |")
    out += [
        "",
        "| ratio | value |",
        "|---|--:|",
        f"| step time TT / LoRA (medians) | {med(tt) / med(lora):.2f} |",
        f"| step time TT / FFA-LoRA (medians) | {med(tt) / med(ffa):.2f} |",
        f"| trainable params LoRA / TT | {n(lora) / n(tt):.2f} |",
        f"| trainable params FFA-LoRA / TT | {n(ffa) / n(tt):.2f} |",
        "",
        "Trainable = communicated: each round a client sends exactly the trainable tensors. Non-adapter "
        "trainable params are the classification head (all methods) plus the LayerNorm weights and biases "
        "(TT adapter only, AdapterConfig.train_norms default). CPU / wall: median over the timed steps of "
        "process CPU time / wall time, i.e. the cores a step got (well below the torch thread count means "
        "other processes were competing for the CPU).",
    ]
    print("\n".join(out))


if __name__ == "__main__":
    main()
