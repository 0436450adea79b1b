"""The FedTT ServerApp: runs the strategy, evaluates the global adapter every round, writes the run's outputs.

Outputs (``<out>/``): ``results.json`` (rewritten after every round), ``checkpoint.safetensors`` (after every
round: a killed run continues with ``fedtt run --resume``), ``results.md``, ``curves.png``, ``config.toml``
(the resolved config) and ``adapter/`` (the final global adapter, loadable onto the same backbone with
``fedtt.load_adapter`` or ``fedtt predict``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from ..adapters import load_trainable_state_dict, save_adapter
from ..data import label_histograms
from ..report import round_summary, write_results
from ..tt import TTLinear
from .checkpoint import Checkpoint, check_resumable, read_checkpoint, save_checkpoint
from .freezing import FreezingPolicy
from .strategy import FedTTStrategy
from .task import OUT_KEY, RESUME_KEY, Experiment, evaluate, experiment

app = ServerApp()
logger = logging.getLogger("fedtt")


class RunRecorder:
    """Evaluates the global adapter after each round and keeps results.json up to date."""

    def __init__(self, exp: Experiment, strategy: FedTTStrategy, out_dir: Path, engine: str):
        self.exp, self.strategy, self.out_dir = exp, strategy, out_dir
        cfg = exp.config
        histograms = label_histograms(exp.partitions, len(exp.task.label_names))
        for pid, histogram in enumerate(histograms):
            logger.info("client %d: %d examples, labels %s", pid, sum(histogram),
                        dict(zip(exp.task.label_names, histogram)))
        partition = {"kind": cfg.federation.partition}
        partition.update({"alpha": cfg.federation.alpha} if cfg.federation.partition == "dirichlet" else {})
        partition.update({"proportions": cfg.federation.proportions} if cfg.federation.proportions else {})
        self.results = {
            "method": cfg.method, "model": cfg.model.name, "task": cfg.task.name, "engine": engine,
            "seed": cfg.seed, "num_clients": cfg.federation.num_clients, "clients_per_round": cfg.clients_per_round,
            "partition": partition, "label_names": exp.task.label_names, "client_label_histograms": histograms,
            "trainable_params": sum(int(t.numel()) for t in exp.initial.values()),
            "rounds": [], "total_bytes": 0,
        }
        self.start = time.time()
        self.progress = tqdm(total=cfg.federation.rounds, desc="rounds", disable=None)

    def resume(self, checkpoint: Checkpoint) -> None:
        self.results = checkpoint.results
        self.start = time.time() - self.results["wall_seconds"]
        self.progress.update(checkpoint.round)
        logger.info("resuming after round %d of %d", checkpoint.round, self.exp.config.federation.rounds)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round += self.strategy.resumed_from
        if server_round == self.strategy.resumed_from > 0:  # the checkpoint's round: evaluated before the stop
            return MetricRecord(self.results["rounds"][-1]["eval"])
        load_trainable_state_dict(self.exp.model, arrays.to_torch_state_dict())
        metrics = evaluate(self.exp, self.exp.eval_set)
        if server_round == 0:
            self.results["initial"] = metrics
            tqdm.write(f"round  0/{self.exp.config.federation.rounds}  acc {metrics['accuracy']:.4f}  "
                       f"loss {metrics['loss']:.4f}  (before training)")
        else:
            stats = self.strategy.rounds[server_round]
            entry = {"round": server_round, "clients": stats["contributed"], "sampled": stats["clients"],
                     "train_loss": stats["train_loss"], "eval": metrics,
                     **{k: stats[k] for k in ("params_up", "params_down", "bytes_up", "bytes_down")},
                     **{k: stats[k] for k in ("partitions", "trainable_cores", "core_updates", "dropped")}}
            self.results["rounds"].append(entry)
            self.results["total_bytes"] += entry["bytes_up"] + entry["bytes_down"]
            self.progress.update(1)
            tqdm.write(round_summary(entry, self.exp.config.federation.rounds, self.results["total_bytes"]))
        self._write_json()
        if server_round > 0:
            save_checkpoint(self.out_dir, server_round, arrays, self.strategy.state_dict(), self.results,
                            self.exp.config)
        return MetricRecord(metrics)

    def _write_json(self) -> None:
        rounds = self.results["rounds"]
        if rounds:
            best = max(rounds, key=lambda r: r["eval"]["accuracy"])
            self.results["best"] = {"round": best["round"], "accuracy": best["eval"]["accuracy"]}
            self.results["final"] = dict(rounds[-1]["eval"])
        self.results["wall_seconds"] = round(time.time() - self.start, 2)
        tmp = self.out_dir / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2))
        tmp.replace(self.out_dir / "results.json")

    def finish(self, arrays: ArrayRecord) -> None:
        self.progress.close()
        cfg = self.exp.config
        load_trainable_state_dict(self.exp.model, arrays.to_torch_state_dict())
        save_adapter(self.exp.model, self.out_dir / "adapter", metadata={
            "model": cfg.model.name, "num_hidden_layers": cfg.model.num_hidden_layers,
            "max_length": cfg.model.max_length, "task": cfg.task.name, "label_names": self.exp.task.label_names})
        self._write_json()
        write_results(self.results, self.out_dir)


def num_tt_cores(exp: Experiment) -> int:
    return next(len(m.shape) for m in exp.model.modules() if isinstance(m, TTLinear))


@app.main()
def main(grid: Grid, context: Context) -> None:
    exp = experiment(context.run_config)
    cfg = exp.config
    out_dir = Path(str(context.run_config[OUT_KEY]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(cfg.to_toml())  # `fedtt run --config <out>/config.toml` repeats the run
    policy = FreezingPolicy(cfg.freezing, num_tt_cores(exp)) if cfg.method == "fedtt+" else None
    strategy = FedTTStrategy(cfg, exp.model.fedtt_trainable, policy)
    recorder = RunRecorder(exp, strategy, out_dir, engine=str(context.run_config.get("engine", "inprocess")))
    initial = ArrayRecord(exp.initial)
    if context.run_config.get(RESUME_KEY, False):
        checkpoint = read_checkpoint(out_dir)
        check_resumable(checkpoint, cfg, out_dir)
        initial = checkpoint.arrays
        strategy.load_state_dict(checkpoint.strategy, completed_rounds=checkpoint.round)
        recorder.resume(checkpoint)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.federation.rounds - strategy.resumed_from,
                            train_config=ConfigRecord(), evaluate_fn=recorder.evaluate,
                            timeout=cfg.federation.round_timeout)  # then the round goes on with the replies in
    recorder.finish(result.arrays if len(result.arrays) else initial)  # empty: no round was aggregated
