"""The FedTT ServerApp: runs the strategy, evaluates the global adapter, writes the run's outputs.

The global model is evaluated on the validation split (where choices are made) and on the test split (what is
reported) before training, after every ``federation.eval_every``-th round and after the last; the selected round
is the best evaluated one on validation, and results.json reports the test metrics there and at the final round.
Every round, evaluated or not, is recorded (bytes, clients, loss) and checkpointed. Outputs (``<out>/``):
``results.json`` (rewritten after every round), ``checkpoint.safetensors`` (after every round: a killed run
continues with ``fedtt run --resume``), ``results.md``, ``curves.png``, ``config.toml`` (the resolved config) and
``adapter/`` (the final global adapter, a PEFT-layout directory: ``fedtt.load_adapter``, ``fedtt predict``,
``fedtt generate``).
A run in which no round could be aggregated is recorded as ``"status": "failed"`` with the first reason.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from ..adapters import load_trainable_state_dict, save_adapter
from ..data import label_histograms
from ..files import atomic_write, prepare_out_dir, replace_dir
from ..learning.evaluation import GENERATION, selection_metric
from ..report import code_version, round_summary, write_results
from .checkpoint import Checkpoint, check_resumable, read_checkpoint, save_checkpoint
from .freezing import FreezingPolicy, num_cores
from .strategy import FedTTStrategy
from .task import CONFIG_KEY, OUT_KEY, RESUME_KEY, Experiment, experiment

app = ServerApp()
logger = logging.getLogger("fedtt")
REPRODUCIBLE_WARNING = ("privacy.reproducible_noise = true: every client's DP noise and Poisson batches follow from "
                        "the run seed, which the server knows, so the DP guarantee does NOT hold against the server")


def select(rounds: list[dict], metric: str, higher: bool) -> dict | None:
    """The evaluated round with the best validation ``metric`` (the earliest of ties); test labels play no part."""
    scored = [r for r in rounds if r.get("validation")]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r["validation"][metric] if higher else -r["validation"][metric], -r["round"]))
    return {"round": best["round"], "metric": metric, "validation": best["validation"], "test": best["eval"]}


class RunRecorder:
    """Evaluates the global adapter after each round and keeps results.json up to date."""

    def __init__(self, exp: Experiment, strategy: FedTTStrategy, out_dir: Path, engine: str):
        self.exp, self.strategy, self.out_dir = exp, strategy, out_dir
        cfg = exp.config
        histograms = label_histograms(exp.task.train["label"], exp.partitions, len(exp.task.label_names)) \
            if exp.task.labelled else [[len(p)] for p in exp.partitions]
        for pid, histogram in enumerate(histograms[:20]):
            logger.info("client %d: %d examples, labels %s", pid, sum(histogram),
                        dict(zip(exp.task.label_names, histogram)) if exp.task.labelled else "-")
        partition = {"kind": cfg.federation.partition}
        partition.update({"alpha": cfg.federation.alpha} if cfg.federation.partition == "dirichlet" else {})
        partition.update({"proportions": cfg.federation.proportions} if cfg.federation.proportions else {})
        self.metric, self.higher = selection_metric(exp.task)
        self.results = {
            "method": cfg.method, "model": cfg.model.name, "task": cfg.task.name, "kind": cfg.task.kind,
            "engine": engine, "seed": cfg.seed, "data_seed": cfg.split_seed,
            "num_clients": cfg.federation.num_clients, "clients_per_round": cfg.clients_per_round,
            "partition": partition, "label_names": exp.task.label_names, "client_label_histograms": histograms,
            "trainable_params": sum(int(t.numel()) for t in exp.initial.values()),
            "selection": {"split": "validation", "metric": self.metric, "higher_is_better": self.higher},
            "validation_examples": len(exp.validation), "test_examples": len(exp.test),
            "rounds": [], "total_bytes": 0, "status": "running", "code": [code_version()],
        }
        if cfg.task.kind == "instruction":
            self.results["generation"] = {**GENERATION, "max_new_tokens": cfg.task.max_new_tokens}
        if cfg.privacy.dp or cfg.privacy.secure_aggregation:
            self.results["privacy"] = {"dp": cfg.privacy.dp, "secure_aggregation": cfg.privacy.secure_aggregation}
        if cfg.privacy.dp and cfg.privacy.reproducible_noise:
            self.results["privacy"]["warning"] = REPRODUCIBLE_WARNING
            logger.warning(REPRODUCIBLE_WARNING)
        self.start = time.time()
        self.progress = tqdm(total=cfg.federation.rounds, desc="rounds", disable=None)

    def resume(self, checkpoint: Checkpoint) -> None:
        self.results = checkpoint.results
        codes = self.results.setdefault("code", [])  # one entry per code that trained some of the rounds
        if codes[-1:] != [code := code_version()]:
            codes.append(code)
        self.start = time.time() - self.results["wall_seconds"]
        self.progress.update(checkpoint.round)
        logger.info("resuming after round %d of %d", checkpoint.round, self.exp.config.federation.rounds)

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` is evaluated: round 0, every ``eval_every``-th, the last."""
        fed = self.exp.config.federation
        return server_round % fed.eval_every == 0 or server_round == fed.rounds

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = self.strategy.global_round(server_round)
        if server_round == self.strategy.resumed_from > 0:  # the checkpoint's round: recorded before the stop
            return None
        if not self.evaluates(server_round):  # recorded and checkpointed all the same
            self._record(server_round, None, None)
            self._save(arrays, server_round)
            return None
        load_trainable_state_dict(self.exp.model, arrays.to_torch_state_dict())
        validation, test = (self.exp.evaluate(self.exp.model, split) for split in (self.exp.validation, self.exp.test))
        total = self.exp.config.federation.rounds
        if server_round == 0:
            self.results["initial"] = {"validation": validation, "test": test}
            tqdm.write(f"round  0/{total}  val {self.metric} {validation[self.metric]:.4f}  test {self.metric} "
                       f"{test[self.metric]:.4f}  (before training)")
        else:
            self._record(server_round, validation, test)
        self._save(arrays if server_round > 0 else None, server_round)
        return MetricRecord(test)

    def _record(self, server_round: int, validation: dict | None, test: dict | None) -> None:
        stats = self.strategy.rounds[server_round]
        entry = {"round": server_round, **stats.entry()}
        if validation is not None:  # a round between evaluations has neither key
            entry.update(validation=validation, eval=test)
        if self.exp.config.privacy.dp:
            self._account_privacy(entry, stats.privacy)
        self.results["rounds"].append(entry)
        self.results["total_bytes"] += entry["bytes_up"] + entry["bytes_down"]
        self.progress.update(1)
        tqdm.write(round_summary(entry, self.exp.config.federation.rounds, self.results["total_bytes"], self.metric))

    def _account_privacy(self, entry: dict, spent: dict) -> None:
        """Per round: the epsilon of every client that trained; overall: every client's latest (its whole run)."""
        summary = self.results["privacy"]
        summary.setdefault("epsilon", {}).update({pid: s["epsilon"] for pid, s in spent.items()})
        summary.setdefault("noise_multiplier", {}).update({pid: s["noise_multiplier"] for pid, s in spent.items()})
        summary.setdefault("sample_rate", {}).update({pid: s["sample_rate"] for pid, s in spent.items()})
        summary.setdefault("delta", {}).update({pid: s["delta"] for pid, s in spent.items()})  # as each client says
        privacy = self.exp.config.privacy
        summary.update(max_grad_norm=privacy.max_grad_norm, accountant=privacy.accountant,
                       target_epsilon=privacy.target_epsilon,
                       epsilon_max=max(summary["epsilon"].values(), default=0.0))
        entry["epsilon"] = {pid: s["epsilon"] for pid, s in spent.items()}
        entry["epsilon_max"] = summary["epsilon_max"]

    def _save(self, arrays: ArrayRecord | None, server_round: int) -> None:
        evaluated = [r for r in self.results["rounds"] if "eval" in r]
        if evaluated:  # "final": the last evaluated round (once the run ends, the last round)
            self.results["selected"] = select(evaluated, self.metric, self.higher)
            self.results["final"] = dict(evaluated[-1]["eval"])
            self.results["final_validation"] = dict(evaluated[-1]["validation"])
        self.results["wall_seconds"] = round(time.time() - self.start, 2)
        write_results(self.results, self.out_dir, tables=False)
        if arrays is not None:
            save_checkpoint(self.out_dir, server_round, arrays, self.strategy.state_dict(), self.results,
                            self.exp.config, self.strategy.state_tensors())

    def finish(self, arrays: ArrayRecord) -> None:
        self.progress.close()
        cfg = self.exp.config
        if self.strategy.aggregated == 0:
            self.results["status"] = "failed"
            self.results["error"] = (f"no round could be aggregated; first problem: {self.strategy.first_error}"
                                     if self.strategy.first_error else "no round could be aggregated")
        else:
            self.results["status"] = "finished"
        load_trainable_state_dict(self.exp.model, arrays.to_torch_state_dict())
        metadata = {
            "model": cfg.model.name, "num_hidden_layers": cfg.model.num_hidden_layers,
            "max_length": cfg.model.max_length, "task": cfg.task.name, "kind": cfg.task.kind,
            "label_names": self.exp.task.label_names, "label_words": self.exp.task.label_words,
            "template": self.exp.task.template,
            "max_new_tokens": cfg.task.max_new_tokens, "model_path": getattr(self.exp.model, "name_or_path", None)}
        replace_dir(self.out_dir / "adapter", lambda tmp: save_adapter(self.exp.model, tmp, metadata=metadata))
        self.results["wall_seconds"] = round(time.time() - self.start, 2)
        write_results(self.results, self.out_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    exp = experiment(context.run_config)
    cfg = exp.config
    out_dir = Path(str(context.run_config[OUT_KEY]))
    if CONFIG_KEY not in context.run_config and not context.run_config.get(RESUME_KEY, False):
        # started by `flwr run` (fedtt run and deploy-local prepare the directory first): never over a finished run
        prepare_out_dir(out_dir, overwrite=bool(context.run_config.get("overwrite", False)))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "config.toml", cfg.to_toml())  # `fedtt run --config <out>/config.toml` repeats the run
    policy = None
    if cfg.method == "fedtt+":
        extras = sorted({g for g in exp.groups.values() if isinstance(g, str)})
        policy = FreezingPolicy(cfg.freezing, num_cores(exp.model), extras)
    shapes = {k: tuple(v.shape) for k, v in exp.initial.items()}
    strategy = FedTTStrategy(cfg, exp.groups, shapes, policy, exp.model.fedtt_head_keys)
    recorder = RunRecorder(exp, strategy, out_dir, engine=str(context.run_config.get("engine", "inprocess")))
    initial = ArrayRecord({k: Array(v.numpy()) for k, v in exp.initial.items()})
    if context.run_config.get(RESUME_KEY, False):
        checkpoint = read_checkpoint(out_dir)
        check_resumable(checkpoint, cfg, out_dir)
        planned = checkpoint.config["federation"]["rounds"]
        if planned != cfg.federation.rounds and cfg.federation.lr_schedule != "constant":
            logger.warning("extending a run planned for %d rounds to %d: its %s learning-rate decay is stretched "
                           "from here on, so it will not equal a fresh %d-round run", planned,
                           cfg.federation.rounds, cfg.federation.lr_schedule, cfg.federation.rounds)
        initial = checkpoint.arrays
        strategy.load_state_dict(checkpoint.strategy, completed_rounds=checkpoint.round, tensors=checkpoint.tensors)
        recorder.resume(checkpoint)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.federation.rounds - strategy.resumed_from,
                            train_config=ConfigRecord(), evaluate_fn=recorder.evaluate,
                            timeout=cfg.federation.round_timeout)  # then the round goes on with the replies in
    recorder.finish(result.arrays if len(result.arrays) else initial)  # empty: no round was aggregated this run
