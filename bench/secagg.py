"""Secure aggregation's cost: round time and bytes of SecAgg+ against plain aggregation, side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/secagg.py [--clients 3,10] [--rounds 2] [--layers 6]

For each client count, the same federation (MiniLM, Rotten Tomatoes, iid, FedTT defaults, one seed) runs plain
and under ``privacy.secure_aggregation`` (every sampled client a share holder: SecAgg), one right after the
other in this process. Reported per round (medians over the rounds): wall time from sampling to the merged
adapter (every SecAgg stage included) and the bytes up and down as Flower counts them (keys, shares and
ciphertexts included). The uploads are uint32 masked vectors: as many values as the plain float32 update, plus
one per FedTT+ group size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from fedtt.config import load_config
from fedtt.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="3,10")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    common = [f"model.num_hidden_layers={args.layers}", f"federation.rounds={args.rounds}", "federation.local_steps=5",
              "federation.batch_size=16", "model.max_length=48", "task.max_eval_examples=100",
              "federation.partition=iid"]
    print(f"command: python bench/secagg.py --clients {args.clients} --rounds {args.rounds} --layers {args.layers}\n")
    print("| clients | aggregation | round time (s) | bytes up / round | bytes down / round | "
          "time vs plain | bytes up vs plain |")
    print("|--:|---|--:|--:|--:|--:|--:|")
    for n in (int(c) for c in args.clients.split(",")):
        measured = {}
        for name, extra in (("plain", []), ("SecAgg+", ["privacy.secure_aggregation=true",
                                                        "federation.min_replies=2"])):
            with tempfile.TemporaryDirectory() as out:
                results = run(load_config(None, common + [f"federation.num_clients={n}", *extra]), out)
            rounds = results["rounds"][1:] or results["rounds"]  # round 1 also asks every node its partition
            measured[name] = {k: statistics.median(r[k] for r in rounds) for k in ("seconds", "bytes_up",
                                                                                  "bytes_down")}
        plain = measured["plain"]
        for name, m in measured.items():
            print(f"| {n} | {name} | {m['seconds']:.2f} | {m['bytes_up']:,.0f} | {m['bytes_down']:,.0f} | "
                  f"{m['seconds'] / plain['seconds']:.2f} | {m['bytes_up'] / plain['bytes_up']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
