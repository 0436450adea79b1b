"""``fedtt`` command line: run, predict, info."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXAMPLES = """examples:
  fedtt run --config configs/demo.toml --out runs/demo
  fedtt run --set method=lora --set federation.rounds=5 --out runs/lora
  fedtt run --out runs/demo --resume                      # continue a killed run
  fedtt compare --config configs/demo.toml --quick --out runs/compare
  fedtt predict --adapter runs/demo/adapter --text "a gripping, beautifully acted film"
  fedtt deploy-local --config configs/demo.toml --nodes 3 --set federation.rounds=2 --out runs/deploy
"""


def cmd_run(args) -> None:
    from .config import load_config
    from .run import run

    out = args.out or f"runs/{Path(args.config).stem if args.config else 'run'}"
    base = args.config or (Path(out) / "config.toml" if args.resume else None)  # resume: the run's own config
    config = load_config(base, args.set)
    results = run(config, out, overwrite=args.overwrite, resume=args.resume)
    final = results.get("final", {})
    print(f"done: final accuracy {final.get('accuracy', float('nan')):.4f}, best "
          f"{results['best']['accuracy']:.4f} (round {results['best']['round']}), "
          f"{results['total_bytes'] / 1e6:.2f} MB communicated, {results['wall_seconds']:.0f} s; outputs in {out}/")


def cmd_compare(args) -> None:
    from .compare import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = args.out or f"runs/compare-{Path(args.config).stem if args.config else 'default'}"
    runs = compare(args.config, args.set, methods, out, quick=args.quick, overwrite=args.overwrite)
    print((Path(out) / "comparison.md").read_text())
    print(f"{len(runs)} runs; outputs in {out}/ (comparison.md, comparison.csv, comparison.png)")


def cmd_predict(args) -> None:
    import torch

    from .adapters import load_adapter, read_adapter_config
    from .models import load_backbone

    saved = read_adapter_config(args.adapter)
    labels = saved["label_names"]
    model, tokenizer = load_backbone(saved["model"], num_labels=len(labels),
                                     num_hidden_layers=saved.get("num_hidden_layers", 0))
    load_adapter(model, args.adapter)
    batch = tokenizer(args.text, padding=True, truncation=True, max_length=saved.get("max_length", 64),
                      return_tensors="pt")
    with torch.no_grad():
        probabilities = model.eval()(**batch).logits.softmax(-1)
    for text, p in zip(args.text, probabilities):
        print(f"{labels[int(p.argmax())]}\t{p.max():.3f}\t{text}")


def cmd_deploy_local(args) -> None:
    import signal

    from .engines.deployment import DeploymentError, deploy_local

    def stop(signum, frame):  # SIGTERM / SIGHUP: unwind, so every process started is stopped
        raise SystemExit(128 + signum)

    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        results = deploy_local(args.config, args.set, args.out, nodes=args.nodes, workdir=args.workdir,
                               data_paths=args.data_path or None, partition_ids=args.partition_ids,
                               overwrite=args.overwrite, timeout=args.timeout)
    except DeploymentError as err:  # everything started is already stopped
        print(f"fedtt: deployment failed: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("fedtt: interrupted; every process started was stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    rounds = results["rounds"]
    print(f"done: {len(rounds)} rounds, clients per round {[r['clients'] for r in rounds]}, final accuracy "
          f"{results.get('final', {}).get('accuracy', float('nan')):.4f}; outputs in {args.out}/")


def cmd_info(args) -> None:
    from .data import BUNDLED_TASKS
    from .models import BUNDLED_MODELS

    print("bundled models (model.name):")
    for name, description in BUNDLED_MODELS.items():
        print(f"  {name:16s} {description}")
    print("bundled tasks (task.name; or a CSV/JSONL/Parquet path, or a hub dataset):")
    for name, description in BUNDLED_TASKS.items():
        print(f"  {name:16s} {description}")
    print("methods: fedtt, fedtt+, lora, ffa-lora")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedtt", description="Federated fine-tuning with tensor-train adapters.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and library logs")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("run", help="run one federated experiment")
    p.add_argument("--config", help="experiment TOML (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. federation.rounds=5 (repeatable)")
    p.add_argument("--out", help="output directory (default: runs/<config name>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out after its last finished round (its config.toml unless --config; "
                        "--set federation.rounds=N extends a finished run)")
    p.set_defaults(func=cmd_run)

    from .compare import DEFAULT_METHODS

    p = commands.add_parser("compare", help="run several methods on one config and compare them")
    p.add_argument("--config", help="experiment TOML shared by every method")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: fedtt, fedtt+[:fixed|cyclic|adaptive], lora, ffa-lora, centralized "
                        "(default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--quick", action="store_true",
                   help="a few-minute-per-method profile: 5 rounds, 48-token sequences, 500 test examples")
    p.add_argument("--out", help="output directory (default: runs/compare-<config name>)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("predict", help="classify texts with an exported adapter")
    p.add_argument("--adapter", required=True, help="the adapter/ directory of a run")
    p.add_argument("--text", required=True, action="append", help="text to classify (repeatable)")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("deploy-local", help="run on Flower's deployment engine on this machine (TLS, "
                                                 "SuperNode authentication): see docs/deployment.md")
    p.add_argument("--config", help="experiment TOML")
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes (sets federation.num_clients; default: 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", required=True, help="output directory (results.json, adapter/, ...)")
    p.add_argument("--workdir", help="credentials, logs and FLWR_HOME (default: a new temp directory)")
    p.add_argument("--data-path", action="append", metavar="FILE",
                   help="a site's training file, once per node (default: the config's partitions, written to "
                        "<workdir>/sites/)")
    p.add_argument("--partition-ids", action="store_true",
                   help="give nodes partition-id=i num-partitions=N instead of data files")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (default: no limit)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.set_defaults(func=cmd_deploy_local)

    p = commands.add_parser("info", help="list bundled models, tasks and methods")
    p.set_defaults(func=cmd_info)

    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.verbose:
        for noisy in ("flwr", "transformers", "datasets", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fedtt: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
