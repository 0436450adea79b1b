"""``compare``: several methods on one config (same data, splits, seed and local steps), side by side.

Method specs: ``fedtt``, ``fedtt+`` (default policy) or ``fedtt+:<policy>`` (fixed, cyclic, adaptive),
``lora``, ``ffa-lora``, and ``centralized``: FedTT with one client holding all the training data, trained
for ``num_clients x local_steps`` steps per round so it does the same work per round: the reference ceiling.
"""

from __future__ import annotations

from pathlib import Path

from .config import POLICIES, load_config
from .report import write_comparison
from .run import run

DEFAULT_METHODS = ("fedtt", "fedtt+", "lora", "ffa-lora", "centralized")
# A few-minute look per method on 2 CPU cores: 5 rounds, short sequences, a 500-example test subset.
# (Truncating MiniLM to 2 layers is faster but learns Rotten Tomatoes too slowly to tell methods apart.)
QUICK = ("model.max_length=48", "federation.rounds=5", "task.max_eval_examples=500")


def method_overrides(spec: str, base_clients: int, base_steps: int) -> list[str]:
    if spec == "centralized":
        return ["method=fedtt", "federation.num_clients=1", "federation.clients_per_round=0",
                "federation.partition=iid", f"federation.local_steps={base_clients * base_steps}"]
    method, _, policy = spec.partition(":")
    if policy and (method != "fedtt+" or policy not in POLICIES):
        raise ValueError(f"method spec {spec!r} is not valid; policies go with fedtt+ only: "
                         f"{', '.join('fedtt+:' + p for p in POLICIES)}")
    return [f"method={method}"] + ([f"freezing.policy={policy}"] if policy else [])


def compare(config_path: str | None, overrides: list[str], methods: list[str], out_dir: str | Path,
            quick: bool = False, overwrite: bool = False) -> list[dict]:
    out_dir = Path(out_dir)
    base_overrides = [*(QUICK if quick else ()), *overrides]
    base = load_config(config_path, base_overrides)  # validates the shared part once, before any run
    configs = {spec: load_config(config_path, base_overrides + method_overrides(
        spec, base.federation.num_clients, base.federation.local_steps)) for spec in methods}
    runs = []
    for spec, config in configs.items():
        print(f"== {spec} ==", flush=True)
        results = run(config, out_dir / spec.replace(":", "-").replace("+", "plus"), overwrite=overwrite)
        runs.append({**results, "label": spec})
    write_comparison(runs, out_dir)
    return runs
