"""``fedtt`` command line: run, compare, tune, frontier, predict, generate, deploy-local, sites, info."""

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
  fedtt compare --config configs/demo.toml --quick --seeds 0,1,2 --out runs/compare
  fedtt tune --config configs/demo.toml --quick --methods fedtt,lora --grid federation.lr=1e-3,3e-3 --out runs/tune
  fedtt frontier --config configs/demo.toml --quick --methods fedtt,fedtt+,lora --seeds 0,1 --out runs/frontier
  fedtt predict --adapter runs/demo/adapter --text "a gripping, beautifully acted film"
  fedtt generate --adapter runs/smollm2/adapter --prompt "Question: Who wrote Hamlet?"
  fedtt deploy-local --config configs/demo.toml --nodes 3 --set federation.rounds=2 --out runs/deploy
"""


def cmd_run(args) -> None:
    from .config import load_config
    from .run import run

    out = args.out or f"runs/{Path(args.config).stem if args.config else 'run'}"
    base = args.config or (Path(out) / "config.toml" if args.resume else None)  # resume: the run's own config
    config = load_config(base, args.set)
    results = run(config, out, overwrite=args.overwrite, resume=args.resume)
    metric, final, selected = results["selection"]["metric"], results["final"], results["selected"]
    print(f"done: test {metric} {final[metric]:.4f} at the final round, {selected['test'][metric]:.4f} at round "
          f"{selected['round']} (best validation {metric} {selected['validation'][metric]:.4f}); "
          f"{results['total_bytes'] / 1e6:.2f} MB communicated, {results['wall_seconds']:.0f} s; outputs in {out}/")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: give distinct non-negative integers, e.g. 0,1,2")
    return seeds


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _sweep(args) -> tuple[str, dict]:
    """A sweep command's output directory and the options every sweep takes."""
    out = args.out or f"runs/{args.command}-{Path(args.config).stem if args.config else 'default'}"
    return out, {"quick": args.quick, "overwrite": args.overwrite, "seeds": _seeds(args.seeds), "resume": args.resume,
                 "tune_seeds": args.tune_seeds}


def cmd_compare(args) -> None:
    from .compare import compare, read_tuned

    out, sweep = _sweep(args)
    tuned = read_tuned(args.tuned) if args.tuned else None
    runs = compare(args.config, args.set, _list(args.methods), out, tuned=tuned, tune_lr=not args.no_tune, **sweep)
    print((Path(out) / "comparison.md").read_text())
    print(f"{len(runs)} runs; outputs in {out}/ (comparison.md, comparison.csv, comparison.png)")


def cmd_frontier(args) -> None:
    from .compare import parse_grid
    from .frontier import frontier

    out, sweep = _sweep(args)
    sizes = parse_grid(args.sizes, "--sizes", "lora=1,8")
    rows = frontier(args.config, args.set, _list(args.methods), out, sizes=sizes, wire_dtypes=_list(args.wire_dtypes),
                    fraction=args.target, tune_lr=not args.no_tune, tuned_dir=args.tuned, **sweep)
    print((Path(out) / "frontier.md").read_text())
    print(f"{len(rows)} points; outputs in {out}/ (frontier.md, frontier.csv, frontier.png)")


def cmd_tune(args) -> None:
    from .compare import parse_grid, tune

    out, sweep = _sweep(args)
    chosen = tune(args.config, args.set, _list(args.methods), parse_grid(args.grid) or None, out, by=args.by,
                  **sweep)
    print((Path(out) / "tune.md").read_text())
    for method, values in chosen.items():
        print(f"{method}: {' '.join(values)}")
    print(f"outputs in {out}/ (tune.md, tune.csv, tuned.json: `fedtt compare --tuned {out}`)")


def _texts(values: list[str] | None, path: str | None, what: str) -> list[str]:
    texts = list(values or [])
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"--file {path}: no such file (one {what} per line)")
        texts += [line for line in file.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"give at least one {what}: --{what} TEXT (repeatable) or --file FILE (one per line)")
    return texts


def cmd_predict(args) -> None:
    from .pretrained import load_pretrained

    model = load_pretrained(args.adapter, device=args.device)
    for text, (label, probability) in zip(texts := _texts(args.text, args.file, "text"), model.classify(texts)):
        print(f"{label}\t{probability:.3f}\t{text}")


def cmd_generate(args) -> None:
    from .pretrained import load_pretrained

    model = load_pretrained(args.adapter, device=args.device)
    prompts = _texts(args.prompt, args.file, "prompt")
    for prompt, answer in zip(prompts, model.generate(prompts, max_new_tokens=args.max_new_tokens)):
        print(f"{prompt}\t{answer}")


def cmd_deploy_local(args) -> None:
    import signal

    from .engines.deployment import DeploymentError, deploy_local

    def stop(signum, frame):  # SIGTERM / SIGHUP: unwind, so every process started is stopped
        raise SystemExit(128 + signum)

    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # a parent that ignores SIGINT (a shell's background job) passes the ignoring on: Ctrl-C / kill -INT
    # must still stop the processes this command started
    saved[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
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
    rounds, metric = results["rounds"], results["selection"]["metric"]
    print(f"done: {len(rounds)} rounds, clients per round {[r['clients'] for r in rounds]}, final {metric} "
          f"{results.get('final', {}).get(metric, float('nan')):.4f}; outputs in {args.out}/")


def cmd_sites(args) -> None:
    from .config import load_config
    from .engines.sites import write_site_files

    for path in write_site_files(load_config(args.config, args.set), Path(args.out)):
        print(path)


def cmd_info(args) -> None:
    from .config import METHODS
    from .data import BUNDLED_TASKS
    from .models import BUNDLED_MODELS

    print("bundled models (model.name):")
    for name, description in BUNDLED_MODELS.items():
        print(f"  {name:16s} {description}")
    print("bundled tasks (task.name; or a CSV/JSONL/Parquet path, or a hub dataset):")
    for name, description in BUNDLED_TASKS.items():
        print(f"  {name:16s} {description}")
    print(f"methods (method): {', '.join(METHODS)}")


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

    from .adapters import METHODS as ADAPTER_METHODS
    from .compare import DEFAULT_METHODS, LR_EXTENSIONS, LR_STEP
    from .config import METHODS, POLICIES
    from .frontier import SIZES, TARGET_FRACTION

    specs = (f"{', '.join(METHODS)}, fedtt+:<{'|'.join(POLICIES)}>, centralized[:<{'|'.join(ADAPTER_METHODS)}>] "
             "(default: %(default)s)")
    search = (f"each method's learning rate is chosen on validation: its own x 1/{LR_STEP:g}, 1, {LR_STEP:g}, one "
              f"step further past an edge that holds the best, at most {LR_EXTENSIONS} times")
    for name, about, methods, quick in (
            ("compare", "run several methods on one config and compare them, over seeds (each at its learning rate "
             "chosen on validation)", DEFAULT_METHODS, ""),
            ("tune", "choose each method's settings on validation: a grid per method over seeds", DEFAULT_METHODS, ""),
            ("frontier", "accuracy against communication: each method over its size knob, each point at its "
             "learning rate chosen on validation", SIZES, "; the two smallest sizes of each method, float32 only")):
        p = commands.add_parser(name, help=about)
        p.add_argument("--config", help="experiment TOML shared by every method")
        p.add_argument("--methods", default=",".join(methods), help="comma-separated: " + (
            specs if name != "frontier" else f"{', '.join(SIZES)} (default: all)"))
        p.add_argument("--seeds", default="0", help="comma-separated training seeds, e.g. 0,1,2 (the data seed "
                                                    "follows unless the config sets data_seed; default: 0)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--quick", action="store_true",
                       help="a few-minute-per-run profile: 5 rounds at a constant learning rate, 48-token "
                            "sequences, 500 validation and 500 test examples" + quick)
        p.add_argument("--out", help=f"output directory (default: runs/{name}-<config name>)")
        p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
        p.add_argument("--resume", action="store_true", help="continue a killed sweep: reuse the runs in --out "
                                                             "that finished, resume those that stopped")
        p.add_argument("--tune-seeds", type=int, default=0 if name == "tune" else 1, metavar="N",
                       help="choose on the first N seeds only, then run the chosen values on the rest "
                            "(0: every seed; default: %(default)s)")
        if name != "tune":
            p.add_argument("--no-tune", action="store_true",
                           help=f"by default {search}; --no-tune runs each method at its own rate")
        if name == "compare":
            p.add_argument("--tuned", metavar="DIR", help="each method's settings chosen by `fedtt tune --out DIR`")
            p.set_defaults(func=cmd_compare)
        elif name == "tune":
            p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                           help=f"values to try for a config key (repeatable: the grid is their product; default: "
                                f"{search})")
            p.add_argument("--by", choices=("selected", "final"), default="selected",
                           help="score a grid point by the validation metric at each run's validation-selected "
                                "round (default) or at its final round (the adapter a run saves)")
            p.set_defaults(func=cmd_tune)
        else:
            p.add_argument("--sizes", action="append", default=[], metavar="METHOD=V1,V2",
                           help="the sizes of a method (repeatable), e.g. lora=1,8; default: "
                                + "; ".join(f"{m} {k} {','.join(map(str, v))}" for m, (k, v) in SIZES.items() if k)
                                + " (freezing.max_groups 0: every group)")
            p.add_argument("--wire-dtypes", default="", help="comma-separated federation.wire_dtype values; the "
                           "learning rate is chosen at the first (default: float32,float16)")
            p.add_argument("--tuned", metavar="DIR", help="take each point's rate from the search of an earlier "
                           "`fedtt frontier --out DIR` (e.g. at the --quick budget); a point without one runs at its "
                           "method's own rate")
            p.add_argument("--target", type=float, default=TARGET_FRACTION,
                           help="MB to target: the target is this fraction of the best mean validation metric of "
                                "any point (default: %(default)s)")
            p.set_defaults(func=cmd_frontier)

    p = commands.add_parser("predict", help="classify texts with a run's adapter (classification, or a templated "
                                            "instruction task by label likelihood)")
    p.add_argument("--adapter", required=True, help="the adapter/ directory of a run")
    p.add_argument("--text", action="append", help="text to classify (repeatable)")
    p.add_argument("--file", help="a file of texts, one per line")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("generate", help="generate answers with a decoder run's adapter (greedy)")
    p.add_argument("--adapter", required=True, help="the adapter/ directory of an instruction-tuning run")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="a file of prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's task.max_new_tokens")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=cmd_generate)

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

    p = commands.add_parser("sites", help="write the config's partition i to <out>/site-<i>.csv (a site's data "
                                          "file for a deployment: docs/deployment.md)")
    p.add_argument("--config", help="experiment TOML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_sites)

    p = commands.add_parser("info", help="list bundled models, tasks and methods")
    p.set_defaults(func=cmd_info)

    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # force: a library imported earlier (Opacus does at import) may have configured the root logger already
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    if not args.verbose:
        for noisy in ("flwr", "transformers", "datasets", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    from .run import RunFailed

    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fedtt: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"fedtt: the run did not train: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
