"""What each site holds in a loopback deployment: its training file and its node config.

``fedtt sites`` writes the config's partitions as one CSV per site (what a real site would hold, read through
``data-path`` in its node config); ``fedtt deploy-local`` uses the same files. Written 0600 in a 0700 directory:
they are the sites' private data.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_site_files(config, directory: Path) -> list[Path]:
    """One CSV per client: the config's partition i of the task's train split (``task.build_data``, the pipeline
    every engine uses), labels written by name; open-ended instruction pairs as prompt/response.

    Columns are the task's own (``task.text_column`` / ``task.label_column``, or the prompt/response columns),
    so the ClientApp reads them like ``task.name``.
    """
    import pandas as pd

    from ..federated.task import build_data

    data = build_data(config)
    t, task = config.task, data.task
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for i, rows in enumerate(data.partitions):
        part = task.train.select(rows)
        if task.labelled:
            frame = {t.text_column: part["text"], t.label_column: [task.label_names[y] for y in part["label"]]}
        else:
            frame = {t.prompt_column: part["prompt"], t.response_column: part["response"]}
        path = directory / f"site-{i}.csv"
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", newline="") as f:
            pd.DataFrame(frame).to_csv(f, index=False)
        paths.append(path)
    return paths


def node_configs(config, workdir: Path, data_paths: list[str] | None, partition_ids: bool) -> list[str] | None:
    """Each SuperNode's ``--node-config``: its own file (``data_paths``, else the config's partitions written to
    ``<workdir>/sites``), or None for ``partition-id=i num-partitions=N`` (``partition_ids``)."""
    if partition_ids:
        return None
    paths = [Path(p).resolve() for p in data_paths] if data_paths else write_site_files(config, workdir / "sites")
    return [f"data-path={toml_str(str(p))} partition-id={i}" for i, p in enumerate(paths)]


def toml_str(value: str) -> str:
    """A --node-config string value: Flower's parser takes '...' or "..." without escapes."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"path {value!r} contains both quote characters; rename it")
