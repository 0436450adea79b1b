"""In-process Flower engine: a real Strategy and a real ClientApp in one Python process.

No Ray and no SuperLink. ``InProcessGrid`` implements Flower's ``Grid`` ABC
(flwr/serverapp/grid/grid.py) and hands each message straight to the ClientApp, one node
after another, the way Flower's runtimes do (flwr/supernode/runtime/run_clientapp.py for
deployment, flwr/server/superlink/fleet/vce/vce_api.py for simulation). The same ServerApp
and ClientApp therefore run unchanged under ``flwr run``.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.server.utils.validator import validate_message
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

# Node id = NODE_ID_OFFSET + partition id. Flower reserves node id 1 for the SuperLink
# (SUPERLINK_NODE_ID), so 1..n would clash; a distinct range also exposes code that
# confuses node ids with partition ids.
NODE_ID_OFFSET = 1000


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, run sequentially.

    Each node keeps a persistent ``Context`` (``self.contexts[node_id]``) with
    ``node_config = {"partition-id": i, "num-partitions": n}``, the run config and a
    ``state`` RecordDict that survives across rounds, as in Flower's simulation engine.
    Messages to a batch of nodes are executed in ascending node-id order and replies
    come back in that order, so results do not depend on the order the strategy sampled
    the nodes in (FedAvg uses ``random.sample``: seed ``random`` yourself if
    ``fraction_* < 1`` and the sampled *set* must be reproducible).
    """

    def __init__(
        self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None, run_id: int = 1
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        run_config = dict(run_config or {})
        self._run = Run.create_empty(run_id=run_id)
        self._run.override_config = dict(run_config)
        self.contexts: dict[int, Context] = {
            NODE_ID_OFFSET + i: Context(
                run_id=run_id,
                node_id=NODE_ID_OFFSET + i,
                node_config={PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}  # instruction message id -> reply, in arrival order
        self._num_ids = 0
        # `Message(content, dst_node_id, message_type)` (what strategies call) reads run and
        # source node from the process-wide TaskIdentity. This process is the ServerApp, so
        # claim that identity as Flower's own in-process API does
        # (flwr/server/compat/app.py:69-71, flwr/simulation/run_simulation.py:456-458).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    # --- Grid ABC ---------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        if run.run_id != self._run.run_id:  # the node Contexts belong to this run
            raise ValueError(f"InProcessGrid serves run {self._run.run_id}, got run {run.run_id}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))  # a copy, like InMemoryGrid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Validate like the SuperLink, then run the ClientApp for every accepted message.

        Invalid messages (unknown destination, wrong run, ...) are logged and dropped
        without an id, as InMemoryLinkState.store_message_ins does.
        """
        accepted: list[Message] = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = self._new_message_id()  # as InMemoryGrid does
            errors = validate_message(msg, is_reply_message=False)
            if msg.metadata.run_id != self._run.run_id:
                errors.append(f"run_id {msg.metadata.run_id} is not {self._run.run_id}")
            if msg.metadata.dst_node_id not in self.contexts:
                errors.append(f"unknown destination node {msg.metadata.dst_node_id}")
            if errors:
                logger.error("Dropping message to node %s: %s", msg.metadata.dst_node_id, "; ".join(errors))
            else:
                accepted.append(msg)
        # a fixed order, whatever order the sampler chose
        for msg in sorted(accepted, key=lambda m: m.metadata.dst_node_id):
            self._replies[msg.metadata.message_id] = self._deliver(msg)
        return [msg.metadata.message_id for msg in accepted]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        replies = [r for r in self._replies.values() if r.metadata.reply_to_message_id in wanted]
        for reply in replies:  # a reply is handed out once, as with the SuperLink
            del self._replies[reply.metadata.reply_to_message_id]
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Replies are ready as soon as push returns, so `timeout` never has to be waited on.
        return self.pull_messages(self.push_messages(messages))

    # --- delivery -----------------------------------------------------------------------

    def _new_message_id(self) -> str:
        self._num_ids += 1  # deterministic and readable in logs, unlike uuid4
        return str(uuid.UUID(int=self._num_ids))

    def _deliver(self, msg: Message) -> Message:
        """Run the ClientApp on one message; any exception becomes an error reply."""
        node_id = msg.metadata.dst_node_id
        context = self.contexts[node_id]
        # The ClientApp gets copies, as if deserialized: FedAvg shares one RecordDict between
        # all its messages, and a failed call must leave the node's Context untouched
        # (run_clientapp.py: "Don't update/change NodeState"). Array payloads are immutable
        # bytes, so deep copies are cheap.
        work_context = copy.deepcopy(context)
        delivered = copy.deepcopy(msg)
        TaskIdentity.node_id = node_id  # the ClientApp runs "on" its node, as in deployment
        try:
            reply = copy.deepcopy(self.client_app(delivered, work_context))  # server must not alias client state
            reply.metadata.__dict__["_message_id"] = self._new_message_id()  # as the SuperLink does
            problems = validate_message(reply, is_reply_message=True)
            if reply.metadata.reply_to_message_id != msg.metadata.message_id:
                problems.append("reply is not a reply to the delivered message (use `reply_to=msg`)")
            if work_context.run_config != context.run_config:  # DeprecatedRunInfoStore.update_context
                problems.append("the `run_config` field of the `Context` object cannot be modified")
            if problems:
                raise ValueError("Invalid reply from ClientApp: " + "; ".join(problems))
        except Exception as ex:  # a failing client must not crash the run
            logger.error(
                "ClientApp raised on node %d (partition-id %s) for message type %r (group %r): %r",
                node_id, context.node_config[PARTITION_ID_KEY], msg.metadata.message_type,
                msg.metadata.group_id, ex, exc_info=ex,
            )
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"  # Flower's format (run_clientapp.py)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=delivered)
            reply.metadata.__dict__["_message_id"] = self._new_message_id()
        else:
            self.contexts[node_id] = work_context
        finally:
            TaskIdentity.node_id = SUPERLINK_NODE_ID
        return reply


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process copies of ``client_app``.

    The ServerApp is called as Flower's runtime calls it (flwr/server/run_serverapp.py:60,
    ``server_app(grid=grid, context=context)``), with a server Context whose node id is the
    SuperLink's, as in deployment. Note that ``run_config`` is used as given: Flower would
    fuse it over ``[tool.flwr.app.config]`` from pyproject.toml, this engine does not.
    """
    grid = InProcessGrid(client_app, num_nodes, run_config)
    context = Context(
        run_id=grid.run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    server_app(grid=grid, context=context)
