"""The in-process engine's overhead: a round's wall time against its clients' training and the evaluation.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_overhead.py [--config configs/demo.toml] [--rounds 3]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_overhead.py --demo-before /path/to/old/checkout

One run of the config with the client step (``learning.train.train_local``) and the server's evaluation
(``learning.evaluation.Evaluator``) timed inside the
same process: per round, the strategy's wall time (sampling, payloads, every client, aggregation) against the
sum of the clients' training, and the run's wall time against training + evaluation. What is left is the
engine and the protocol (encoding, decoding, validation, messages). ``--demo-before DIR`` also times
``fedtt run --config configs/demo.toml`` of the checkout in DIR and of this one, one after the other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedtt.config import load_config
from fedtt.learning import evaluation, train
from fedtt.run import run

ROOT = Path(__file__).resolve().parents[1]


def timed(module, name, bucket):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - start)

    setattr(module, name, wrapper)
    return real


def demo_seconds(source: Path) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(source / "src"), "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fedtt.cli", "run", "--config", str(source / "configs" / "demo.toml"),
                        "--out", out], env=env, cwd=source, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--demo-before", metavar="DIR", help="an earlier checkout whose demo to time as well")
    args = parser.parse_args()
    training, evaluating = [], []
    timed(train, "train_local", training)
    timed(evaluation.Evaluator, "__call__", evaluating)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        results = run(load_config(args.config, [f"federation.rounds={args.rounds}"]), out)
        wall = time.perf_counter() - start
    print(f"command: python bench/engine_overhead.py --config {args.config} --rounds {args.rounds}\n")
    print("| round | clients | round wall (s) | clients' training (s) | round / training |")
    print("|--:|--:|--:|--:|--:|")
    per_round = len(training) // len(results["rounds"])
    for r in results["rounds"]:
        spent = sum(training[(r["round"] - 1) * per_round: r["round"] * per_round])
        print(f"| {r['round']} | {r['clients']} | {r['seconds']:.2f} | {spent:.2f} | {r['seconds'] / spent:.3f} |")
    work = sum(training) + sum(evaluating)
    print(f"\nwhole run: wall {wall:.1f} s (model and data set-up included), training {sum(training):.1f} s, "
          f"evaluation {sum(evaluating):.1f} s ({len(evaluating)} evaluations); wall / (training + evaluation) = "
          f"{wall / work:.3f}")
    if args.demo_before:
        before, after = demo_seconds(Path(args.demo_before)), demo_seconds(ROOT)
        print(f"\n`fedtt run --config configs/demo.toml`: before {before:.0f} s ({args.demo_before}), after "
              f"{after:.0f} s (this checkout); after / before = {after / before:.2f}")


if __name__ == "__main__":
    main()
