import os

import pytest
from flwr.clientapp import ClientApp

# Tests never reach a model hub; bundled weights load from site-packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist each worker takes its share of the cores: torch's default (every core in every process)
# oversubscribes them, several times slower than one process after the other.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

# The settings every short federation in the suite starts from (later --set style overrides win). Under DP they keep
# these small batches: the DP defaults' Poisson rate 0.1 would train a tenth of each client per step.
FAST = ["model.num_hidden_layers=2", "model.max_length=32", "task.max_eval_examples=60", "federation.batch_size=8",
        "federation.local_steps=2", "federation.partition='iid'", "privacy.dp_defaults=false"]


def head_values(adapter) -> int:
    """How many values the task head of MiniLM with ``adapter`` (an AdapterConfig) has: what a head-only round sends
    each way per client."""
    import fedtt
    from fedtt.models import load_backbone

    model = fedtt.inject(load_backbone("minilm", num_labels=2)[0], adapter)
    return sum(p.numel() for n, p in model.named_parameters() if n in model.fedtt_head_keys)


def client_app_with(train) -> ClientApp:
    """The real ClientApp with its ``train`` handler replaced by ``train`` (which may call the real one): a
    client that fails, drops or lies in training, and answers every query stage as the real one does."""
    from fedtt.federated import client_app as real
    from fedtt.federated.protocol import QUERIES

    app = ClientApp()
    app.train()(train)
    for action in QUERIES:
        app.query(action)(getattr(real, action))
    return app


@pytest.fixture
def server_inbox(monkeypatch) -> list:
    """Every reply's content that reaches the server in an in-process run (error replies left out): what the
    server sees, for the tests of docs/privacy.md's table."""
    from fedtt.engines import inprocess

    seen = []
    real = inprocess.InProcessGrid.pull_messages

    def spy(self, ids):
        replies = list(real(self, ids))
        seen.extend(r.content for r in replies if not r.has_error())
        return replies

    monkeypatch.setattr(inprocess.InProcessGrid, "pull_messages", spy)
    return seen


def flip_test_labels(monkeypatch) -> None:
    """Every task loaded from now on has its test labels flipped (binary tasks): no choice may change."""
    from fedtt import data as data_module
    from fedtt.federated import task as task_module

    real = data_module.load_task  # task.py imports it where it loads a task

    def flipped(*args, **kwargs):
        data = real(*args, **kwargs)
        data.test = data.test.map(lambda row: {"label": 1 - row["label"]})
        return data

    monkeypatch.setattr(data_module, "load_task", flipped)
    task_module._build_experiment.cache_clear()


def pytest_collection_modifyitems(items):
    """``pytest -m "not slow"``: the everyday loop leaves out tests that start processes (Ray, SuperLink)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if item.path.name in ("test_deployment.py", "test_engines.py") or "spam_run" in fixtures:
            item.add_marker(pytest.mark.slow)
