"""The Flower "task" module: the experiment every node builds from the run config (data, model, splits).

Client and server both call ``experiment(run_config)``; it is cached per process, so the in-process engine
holds one frozen backbone that the server and every client share (only trainable tensors are swapped), and
each Flower simulation or deployment process builds its own, identical one from the same seeded config.
Every split is tokenised once per process (the train split on first use); rounds only cut batches from the token ids.
The data (datasets) and model (transformers) modules are imported where they are used: Flower starts a process per
message, and one answering a query stage needs neither (~4 s of imports each).
"""

from __future__ import annotations

import shlex
import sys
import tomllib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..adapters import inject, trainable_state_dict
from ..config import Config, config_from_dict, load_config
from ..learning import train as learning
from ..learning.batches import Encoded, encode_classification, encode_instruction
from ..learning.evaluation import Evaluator
from .freezing import factor_groups, num_cores

if TYPE_CHECKING:
    from ..data import TaskData

CONFIG_KEY = "fedtt-config"   # run_config entry holding the resolved experiment config as TOML
OUT_KEY = "out-dir"           # run_config entry: where the ServerApp writes its outputs
FILE_KEY = "config-file"      # else (`flwr run`): an experiment TOML file ...
OVERRIDES_KEY = "overrides"   # ... and space-separated key=value overrides of it
RESUME_KEY = "resume"         # true: continue the run in out-dir from its checkpoint
DATA_PATH_KEY = "data-path"   # node_config entry (deployment): this SuperNode's own training file


@dataclass
class FederatedData:
    """The one data pipeline's output: the task's splits and each client's rows of the training split."""

    config: Config
    task: TaskData

    @cached_property
    def partitions(self) -> list[np.ndarray]:
        """Row indices into the train split, one array per client. Built on first use: a deployment site that
        reads its own file never needs them, and a Dirichlet split costs each app process ~3 s."""
        from ..data import partition

        fed = self.config.federation
        return partition(self.task.train, num_clients=fed.num_clients, kind=fed.partition,
                         seed=self.config.split_seed, alpha=fed.alpha, proportions=fed.proportions or None,
                         min_partition_size=fed.min_partition_size)


@dataclass
class Experiment:
    config: Config
    data: FederatedData
    validation: Encoded                # capped at task.max_eval_examples
    test: Encoded
    model: nn.Module
    tokenizer: object
    device: torch.device
    initial: dict[str, torch.Tensor]   # the seeded initial adapter (CPU): runs sharing a cached backbone start here
    groups: dict[str, object]          # each trainable tensor's FedTT+ group (freezing.factor_groups)

    @property
    def task(self) -> TaskData:
        return self.data.task

    @property
    def partitions(self) -> list[np.ndarray]:
        return self.data.partitions

    @cached_property
    def evaluate(self) -> Evaluator:
        """``evaluate(model, split)``: the task's metrics of a model on a held-out split."""
        return Evaluator(self.task, self.tokenizer, self.device, self.config.task.eval_batch_size,
                         self.config.task.max_new_tokens)

    def train_local(self, data: Encoded, rows: np.ndarray, **step) -> float:
        """``learning.train.train_local`` on this experiment's model, task kind, federation and device."""
        return learning.train_local(self.model, data, rows, kind=self.task.kind, federation=self.config.federation,
                                    device=self.device, **step)

    @cached_property
    def train(self) -> Encoded:
        """The whole train split tokenised, on first use (a deployment site trains on its own file instead)."""
        return encode(self.config, self.task, self.task.train, self.tokenizer)


def run_config_for(config: Config, out_dir: str, resume: bool = False) -> dict:
    return {CONFIG_KEY: config.to_toml(), OUT_KEY: out_dir, RESUME_KEY: resume}


def config_from_run_config(run_config) -> Config:
    """The experiment: ``fedtt-config`` (resolved TOML, by ``fedtt run``) or ``config-file`` + ``overrides``.

    ``config-file`` and ``overrides`` (space-separated ``key=value``, as ``fedtt run --set``) come from
    ``[tool.flwr.app.config]`` / ``flwr run --run-config``. A relative ``config-file`` is looked up in the
    working directory, then in the directories on ``sys.path`` (``flwr run`` puts the app's there).
    """
    if CONFIG_KEY in run_config:
        return config_from_dict(tomllib.loads(str(run_config[CONFIG_KEY])))
    if FILE_KEY not in run_config:
        raise ValueError(f"run config has neither {CONFIG_KEY!r} nor {FILE_KEY!r}; start runs with "
                         "`fedtt run` or `flwr run .`")
    path = Path(str(run_config[FILE_KEY]))
    if not path.is_absolute() and not path.is_file():
        path = next((Path(base) / path for base in sys.path if base and (Path(base) / path).is_file()), path)
    return load_config(path, shlex.split(str(run_config.get(OVERRIDES_KEY, ""))))


def load_task_of(config: Config, name: str | None = None, **overrides) -> TaskData:
    """``config``'s task (or the file ``name`` read with the task's columns), split with the data seed."""
    from ..data import load_task

    t = config.task
    options = dict(kind=t.kind, text_column=t.text_column, label_column=t.label_column,
                   prompt_column=t.prompt_column, response_column=t.response_column, template=t.template,
                   label_words=t.label_words, seed=config.split_seed, validation_fraction=t.validation_fraction,
                   test_fraction=t.test_fraction, max_train_examples=t.max_train_examples)
    return load_task(name or t.name, **{**options, **overrides})


def build_data(config: Config) -> FederatedData:
    """The one data pipeline (every engine and ``fedtt deploy-local``'s site files): load, split, partition."""
    fed = config.federation
    task = load_task_of(config)
    if not task.labelled and fed.partition != "iid":
        raise ValueError(f"federation.partition = {fed.partition!r} splits clients by label, and task "
                         f"{config.task.name!r} has none (open-ended pairs); use federation.partition = 'iid'")
    return FederatedData(config, task)


def encode(config: Config, task: TaskData, split, tokenizer) -> Encoded:
    """A split of ``task`` tokenised once, as the task kind needs it."""
    if task.kind == "classification":
        return encode_classification(split["text"], split["label"], tokenizer, config.model.max_length)
    return encode_instruction(split["prompt"], split["response"], split["label"], tokenizer, config.model.max_length)


def experiment(run_config) -> Experiment:
    return _build_experiment(config_from_run_config(run_config).to_toml())


@lru_cache(maxsize=1)
def _build_experiment(config_toml: str) -> Experiment:
    from ..models import load_backbone, resolve_device, resolve_dtype

    config = config_from_run_config({CONFIG_KEY: config_toml})
    data = build_data(config)
    device = resolve_device(config.model.device)
    model, tokenizer = load_backbone(config.model.name, num_labels=len(data.task.label_names),
                                     num_hidden_layers=config.model.num_hidden_layers,
                                     dtype=resolve_dtype(config.model.dtype, device),
                                     causal_lm=config.task.kind == "instruction", seed=config.seed)
    model = inject(model, config.adapter).to(device)
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    cap = config.task.max_eval_examples

    def held_out(split):
        if 0 < cap < len(split):
            split = split.shuffle(seed=config.split_seed + len(split)).select(range(cap))
        return encode(config, data.task, split, tokenizer)

    if config.method == "fedtt+":
        num_cores(model)  # refused at start unless every adapter TT layer has the same number of cores
    initial = {k: v.to("cpu", torch.float32) for k, v in trainable_state_dict(model).items()}
    return Experiment(config, data, held_out(data.task.validation), held_out(data.task.test), model, tokenizer,
                      device, initial, factor_groups(model))


def site_data(exp: Experiment, path: str) -> Encoded:
    """A SuperNode's own training data (node config ``data-path``): every row of the file, labels by name.

    The file is read like ``task.name`` (CSV/TSV/JSONL/JSON/Parquet, the task's columns, texts stripped and
    de-duplicated) and all of it is used for training: sites do not evaluate, the server evaluates on its own
    splits. Labels are matched to the experiment's label names by name (the CSV value ``positive`` is the task's
    label ``positive``, whatever its position), so a site may hold any subset of the task's labels, one label
    included; a label the task does not have is an error.
    """
    return _site_data(exp.config.to_toml(), str(Path(path).expanduser().resolve()))


@lru_cache(maxsize=2)
def _site_data(config_toml: str, path: str) -> Encoded:
    exp = _build_experiment(config_toml)
    local = load_task_of(exp.config, path, validation_fraction=0.0, test_fraction=0.0, max_train_examples=0,
                         min_labels=1)
    labels = list(local.train["label"])
    if exp.task.labelled:
        index = {name: i for i, name in enumerate(exp.task.label_names)}
        unknown = [name for name in local.label_names if name not in index]
        if unknown:
            raise ValueError(f"data-path {path}: label(s) {unknown} are not labels of task {exp.config.task.name!r} "
                             f"({exp.task.label_names}); every site must use the task's label names")
        labels = [index[local.label_names[y]] for y in labels]
    split = local.train.remove_columns("label").add_column("label", labels)
    if exp.task.kind == "instruction" and exp.task.labelled:  # the responses are the server's label words
        split = split.remove_columns("response").add_column("response", [exp.task.label_words[y] for y in labels])
    return encode(exp.config, exp.task, split, exp.tokenizer)
