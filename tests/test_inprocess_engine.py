"""InProcessGrid / run_inprocess with real Flower (FedAvg + ClientApp), no mocks.

Task: 2-parameter linear regression y = 2x - 1 + noise, one non-IID partition per node.
"""

import logging
import random
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedtt.engines.inprocess import NODE_ID_OFFSET, InProcessGrid, run_inprocess

TRUE_W, TRUE_B = 2.0, -1.0
NUM_NODES, NUM_ROUNDS = 3, 3


def partition_data(pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(pid)
    n = 32 + 16 * pid  # unequal sizes exercise FedAvg's weighting
    x = torch.rand(n, 1, generator=g) * 2 - 1 + 0.5 * pid  # shifted per partition: non-IID
    return x, TRUE_W * x + TRUE_B + 0.05 * torch.randn(n, 1, generator=g)


def model_from(msg: Message) -> torch.nn.Linear:
    model = torch.nn.Linear(1, 1)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def make_client_app(calls: list, fail_partition: int | None = None) -> ClientApp:
    """`calls` collects (server-round, partition-id, node-id, train calls seen in context.state)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = context.node_config["partition-id"]
        # Persistent per-node state: count the train calls this node has handled.
        seen = context.state.get("seen", ConfigRecord({"train": 0}))
        seen["train"] = int(seen["train"]) + 1
        context.state["seen"] = seen
        calls.append((msg.content["config"]["server-round"], pid, context.node_id, seen["train"]))
        if pid == fail_partition:
            raise RuntimeError(f"simulated failure on partition {pid}")
        model, (x, y) = model_from(msg), partition_data(pid)
        opt = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        metrics = MetricRecord({"train_loss": loss.item(), "num-examples": len(x)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        x, y = partition_data(context.node_config["partition-id"])
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(model_from(msg)(x), y).item()
        return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": len(x)})}),
                       reply_to=msg)

    @app.query()
    def whoami(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"me": ConfigRecord(dict(context.node_config))}), reply_to=msg)

    return app


def make_server_app(results: list, min_nodes: int = 2) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        init = torch.nn.Linear(1, 1)
        torch.nn.init.zeros_(init.weight), torch.nn.init.zeros_(init.bias)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_nodes,
                          min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
        results.append(strategy.start(
            grid=grid, initial_arrays=ArrayRecord(init.state_dict()), num_rounds=context.run_config["num-rounds"],
            train_config=ConfigRecord({"lr": context.run_config["lr"]}),
        ))

    return app


def run(fail_partition: int | None = None) -> tuple:
    calls, results = [], []
    t0 = time.perf_counter()
    run_inprocess(make_server_app(results), make_client_app(calls, fail_partition), NUM_NODES,
                  {"num-rounds": NUM_ROUNDS, "lr": 0.3})
    return results[0], calls, time.perf_counter() - t0


def test_fedavg_converges_deterministic_and_fast():
    random.seed(0)  # FedAvg samples with `random`: each run below visits the nodes in a different order
    result, calls, seconds = run()
    assert seconds < 5.0, f"3 in-process rounds took {seconds:.2f}s"

    # Every node trained in every round, each in its own persistent Context.
    for rnd in range(1, NUM_ROUNDS + 1):
        assert sorted((p, n) for r, p, n, _ in calls if r == rnd) == [
            (p, NODE_ID_OFFSET + p) for p in range(NUM_NODES)]
    assert all(seen == rnd for rnd, _, _, seen in calls)  # context.state survived across rounds

    eval_loss = [result.evaluate_metrics_clientapp[r]["eval_loss"] for r in range(1, NUM_ROUNDS + 1)]
    train_loss = [result.train_metrics_clientapp[r]["train_loss"] for r in range(1, NUM_ROUNDS + 1)]
    assert eval_loss == sorted(eval_loss, reverse=True) and eval_loss[-1] < eval_loss[0] / 5, eval_loss
    assert train_loss == sorted(train_loss, reverse=True), train_loss
    sd = result.arrays.to_torch_state_dict()
    assert abs(sd["weight"].item() - TRUE_W) < 0.1 and abs(sd["bias"].item() - TRUE_B) < 0.1, sd

    random.seed(1)
    again, _, _ = run()
    assert again == result  # bit-identical arrays and per-round metrics despite another sampling order


def test_failing_client_is_reported_and_run_finishes(caplog):
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="flwr"):
        result, calls, _ = run(fail_partition=1)

    failed_node = NODE_ID_OFFSET + 1
    ours = [r for r in caplog.records if r.name == "fedtt.engines.inprocess" and r.levelno == logging.ERROR]
    assert len(ours) == NUM_ROUNDS and all("partition-id 1" in r.getMessage() for r in ours)
    assert all(f"node {failed_node}" in r.getMessage() for r in ours)
    assert caplog.text.count("aggregate_train: Received 2 results and 1 failures") == NUM_ROUNDS
    assert f"Received error in reply from node {failed_node}" in caplog.text  # FedAvg's own log line
    assert "simulated failure on partition 1" in caplog.text

    # The other two clients carried every round; evaluation still used all three.
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2, 3]
    # A failed call leaves the node's Context untouched, as in Flower: its counter never advances.
    assert [seen for _, p, _, seen in calls if p == 1] == [1] * NUM_ROUNDS


def test_grid_routes_to_destination_and_sets_reply_metadata():
    grid = InProcessGrid(make_client_app([]), num_nodes=4, run_config={"a": 1}, run_id=7)
    assert list(grid.get_node_ids()) == [NODE_ID_OFFSET + i for i in range(4)]
    assert grid.run.run_id == 7
    assert grid.contexts[NODE_ID_OFFSET + 3].run_config == {"a": 1}

    msgs = [Message(RecordDict(), dst, "query") for dst in (NODE_ID_OFFSET + 2, NODE_ID_OFFSET, 999)]
    replies = list(grid.send_and_receive(msgs))
    assert len(replies) == 2  # the unknown node 999 is dropped, like the SuperLink does
    by_src = {r.metadata.src_node_id: r for r in replies}
    assert by_src[NODE_ID_OFFSET + 2].content["me"]["partition-id"] == 2
    assert by_src[NODE_ID_OFFSET].content["me"]["num-partitions"] == 4
    for msg in msgs[:2]:
        reply = by_src[msg.metadata.dst_node_id]
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert reply.metadata.run_id == 7 and reply.metadata.dst_node_id == 1  # back to the SuperLink
    assert list(grid.pull_messages([m.metadata.message_id for m in msgs])) == []  # handed out once

    # An unregistered message type is a ClientApp error, returned as an error reply.
    (err,) = grid.send_and_receive([Message(RecordDict(), NODE_ID_OFFSET + 1, "query.nope")])
    assert err.has_error() and "No query function registered" in err.error.reason
