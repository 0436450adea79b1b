"""The Flower "task" module: the experiment every node builds from the run config, local training, evaluation.

Client and server both call ``experiment(run_config)``; it is cached per process, so the in-process engine
holds one frozen backbone that the server and every client share (only trainable tensors are swapped), and
each Flower simulation or deployment process builds its own, identical one from the same seeded config.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import tomllib
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import inject, trainable_state_dict
from ..config import Config, config_from_dict, load_config
from ..data import TaskData, load_task, partition
from ..models import load_backbone

CONFIG_KEY = "fedtt-config"   # run_config entry holding the resolved experiment config as TOML
OUT_KEY = "out-dir"           # run_config entry: where the ServerApp writes its outputs
FILE_KEY = "config-file"      # else (`flwr run`): an experiment TOML file ...
OVERRIDES_KEY = "overrides"   # ... and space-separated key=value overrides of it
RESUME_KEY = "resume"         # true: continue the run in out-dir from its checkpoint
DATA_PATH_KEY = "data-path"   # node_config entry (deployment): this SuperNode's own training file
EVAL_BATCH_SIZE = 64


@dataclass
class Experiment:
    config: Config
    task: TaskData
    partitions: list[datasets.Dataset]
    eval_set: datasets.Dataset
    model: nn.Module
    tokenizer: object
    initial: dict[str, torch.Tensor]   # the seeded initial adapter: runs sharing a cached backbone start here


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


def experiment(run_config) -> Experiment:
    return _build_experiment(config_from_run_config(run_config).to_toml())


@lru_cache(maxsize=1)
def _build_experiment(config_toml: str) -> Experiment:
    config = config_from_run_config({CONFIG_KEY: config_toml})
    t, fed = config.task, config.federation
    data = load_task(t.name, text_column=t.text_column, label_column=t.label_column, seed=config.seed,
                     validation_fraction=t.validation_fraction, test_fraction=t.test_fraction,
                     max_train_examples=t.max_train_examples)
    parts = partition(data.train, num_clients=fed.num_clients, kind=fed.partition, seed=config.seed,
                      alpha=fed.alpha, proportions=fed.proportions or None,
                      min_partition_size=fed.min_partition_size)
    eval_set = data.test
    if 0 < t.max_eval_examples < len(eval_set):
        eval_set = eval_set.shuffle(seed=config.seed).select(range(t.max_eval_examples))
    torch.manual_seed(config.seed)  # the task head's init: identical on every node
    model, tokenizer = load_backbone(config.model.name, num_labels=len(data.label_names),
                                     num_hidden_layers=config.model.num_hidden_layers)
    model = inject(model, config.adapter)
    return Experiment(config, data, parts, eval_set, model, tokenizer, trainable_state_dict(model))


def site_dataset(exp: Experiment, path: str) -> datasets.Dataset:
    """A SuperNode's own training data (node config ``data-path``): every row of the file, labels by name.

    The file is read like ``task.name`` (CSV/TSV/JSONL/JSON/Parquet, ``task.text_column`` and
    ``task.label_column``, texts stripped and de-duplicated) and all of it is used for training: sites do
    not evaluate, the server evaluates on its own test split. Labels are matched to the experiment's label
    names by name (the CSV value ``positive`` is the task's label ``positive``, whatever its position), so a
    site may hold any subset of the task's labels (at least two); a label the task does not have is an error.
    """
    return _site_dataset(exp.config.to_toml(), tuple(exp.task.label_names), str(path))


@lru_cache(maxsize=2)
def _site_dataset(config_toml: str, label_names: tuple[str, ...], path: str) -> datasets.Dataset:
    config = config_from_run_config({CONFIG_KEY: config_toml})
    t = config.task
    local = load_task(path, text_column=t.text_column, label_column=t.label_column, seed=config.seed,
                      validation_fraction=0.0, test_fraction=0.0)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = [name for name in local.label_names if name not in index]
    if unknown:
        raise ValueError(f"data-path {path}: label(s) {unknown} are not labels of task {t.name!r} "
                         f"({list(label_names)}); every site must use the task's label names")
    ids = [index[name] for name in local.label_names]
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(label_names))})
    return datasets.Dataset.from_dict({"text": list(local.train["text"]),
                                       "label": [ids[y] for y in local.train["label"]]}, features=features)


def _tokenize(texts: list[str], labels: list[int], indices: list[int], tokenizer, max_length: int):
    batch = tokenizer([texts[i] for i in indices], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return batch, torch.tensor([labels[i] for i in indices])


def local_batches(num_examples: int, *, steps: int, epochs: int, batch_size: int, seed: int) -> list[list[int]]:
    """Index batches for one round: ``epochs`` passes, else ``steps`` batches over reshuffled passes."""
    generator = torch.Generator().manual_seed(seed)
    num_batches = epochs * math.ceil(num_examples / batch_size) if epochs > 0 else steps
    order: list[int] = []
    batches = []
    while len(batches) < num_batches:
        if len(order) < batch_size:
            order += torch.randperm(num_examples, generator=generator).tolist()
        take = min(batch_size, len(order)) if epochs > 0 else batch_size
        batches.append(order[:take])
        order = order[take:]
    return batches


def train_local(exp: Experiment, dataset: datasets.Dataset, *, seed: int, desc: str = "") -> float:
    """Train the model's currently trainable tensors on ``dataset`` with a fresh AdamW; mean loss."""
    cfg, fed = exp.config, exp.config.federation
    model = exp.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=fed.lr,
                                  weight_decay=fed.weight_decay)
    texts, labels = dataset["text"], dataset["label"]
    batches = local_batches(len(dataset), steps=fed.local_steps, epochs=fed.local_epochs,
                            batch_size=fed.batch_size, seed=seed)
    torch.manual_seed(seed)  # dropout masks
    model.train()
    losses = []
    for indices in tqdm(batches, desc=desc, leave=False, disable=None):
        inputs, targets = _tokenize(texts, labels, indices, exp.tokenizer, cfg.model.max_length)
        loss = F.cross_entropy(model(**inputs).logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate(exp: Experiment, dataset: datasets.Dataset) -> dict[str, float]:
    """Accuracy, mean cross-entropy and macro-F1 of the model on ``dataset``."""
    model, num_labels = exp.model.eval(), len(exp.task.label_names)
    texts, labels = dataset["text"], dataset["label"]
    loss_sum, predictions = 0.0, []
    for start in range(0, len(dataset), EVAL_BATCH_SIZE):
        indices = list(range(start, min(start + EVAL_BATCH_SIZE, len(dataset))))
        inputs, targets = _tokenize(texts, labels, indices, exp.tokenizer, exp.config.model.max_length)
        logits = model(**inputs).logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        predictions += logits.argmax(-1).tolist()
    truth = torch.tensor(labels)
    pred = torch.tensor(predictions)
    f1s = []
    for c in range(num_labels):
        tp = ((pred == c) & (truth == c)).sum().item()
        denom = (pred == c).sum().item() + (truth == c).sum().item()
        if (truth == c).any():
            f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": (pred == truth).float().mean().item(), "loss": loss_sum / len(dataset),
            "macro_f1": sum(f1s) / len(f1s)}
