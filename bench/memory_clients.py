"""Peak memory and time per round of the in-process engine vs the number of clients, up to 10,000.

    python bench/memory_clients.py [--layers 6] [--rounds 3]

Each configuration runs in its own Python process (so peaks do not mix), one after another; the script prints
each peak RSS, its ratio to the single-client run, and the median wall time of rounds 2.. (round 1 also asks
every node its partition once). Every setup trains the same number of clients per round (10, or all when
fewer), on the same data: Rotten Tomatoes with 5% validation and 5% test, so that the 11.5k training examples
cover 10,000 clients. The in-process engine keeps one frozen backbone and swaps only the trainable tensors, a
partition is an index array and a node's context is small, so memory and time per round should stay flat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys
from fedtt.config import load_config
from fedtt.run import run
results = run(load_config(None, sys.argv[2:]), sys.argv[1], overwrite=True)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "clients": [r["clients"] for r in results["rounds"]],
                  "seconds": [r["seconds"] for r in results["rounds"]], "wall": results["wall_seconds"]}))
"""


def measure(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", CHILD, out, *overrides], capture_output=True, text=True,
                              check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    common = [f"model.num_hidden_layers={args.layers}", f"federation.rounds={args.rounds}",
              "federation.local_steps=2", "federation.batch_size=8", "task.max_eval_examples=100",
              "federation.partition=iid", "task.validation_fraction=0.05", "task.test_fraction=0.05"]
    setups = {"1 client": ["federation.num_clients=1"],
              "10 clients (cross-silo)": ["federation.num_clients=10"],
              "1,000 clients, 10 per round": ["federation.num_clients=1000", "federation.clients_per_round=10"],
              "10,000 clients, 10 per round": ["federation.num_clients=10000", "federation.clients_per_round=10"]}
    print(f"command: python bench/memory_clients.py --layers {args.layers} --rounds {args.rounds}\n")
    print("| setup | clients per round | peak RSS (MB) | vs 1 client | round time, rounds 2.. (s) | wall (s) |")
    print("|---|--:|--:|--:|--:|--:|")
    base = None
    for name, overrides in setups.items():
        result = measure(common + overrides)
        base = base if base is not None else result["peak_rss_mb"]
        later = result["seconds"][1:] or result["seconds"]
        print(f"| {name} | {result['clients'][0]} | {result['peak_rss_mb']:.0f} | "
              f"{result['peak_rss_mb'] / base:.3f}x | {statistics.median(later):.2f} | {result['wall']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
