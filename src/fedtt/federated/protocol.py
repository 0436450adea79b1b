"""Every message the ServerApp and the ClientApp exchange, declared once: its stage, its records, their keys,
types, sizes and ranges.

The server trusts no reply's bytes: it reads a reply only through ``parse`` (or ``ids`` / ``blobs`` for the
packed lists inside one), which returns plain validated values or raises ``ProtocolError`` with a one-line reason;
the strategy drops that reply with its node, stage and reason, and the round goes on. Nothing here raises
anything else on any input. Clients parse the server's messages the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

MAX_ID = 2**64 - 1          # Flower node ids are unsigned 64-bit
MAX_PARTITION = 2**31 - 1
MAX_BYTES = 1 << 20         # any one bytes value (keys, shares, signatures, id lists)
SQ = "sq:"                  # metric key prefix: a client's squared update size per FedTT+ group
CLIP_BIT = "clip-bit"       # client-level DP, adaptive clipping: b - 1/2, carried like a group's statistic


class ProtocolError(ValueError):
    """A message that does not follow its schema; the text says what is wrong."""


# ---------------------------------------------------------------------------------------------- stages

TRAIN = MessageType.TRAIN
QUERIES = ("partition", "synced", "secagg_setup", "secagg_share", "secagg_sign", "secagg_unmask")


def query_type(action: str) -> str:
    return f"{MessageType.QUERY}.{action}"


def query(node: int, action: str, config: dict | None = None) -> Message:
    """A query message (``action`` one of ``QUERIES``) to ``node``."""
    return Message(RecordDict({"config": ConfigRecord(config or {})}), message_type=query_type(action),
                   dst_node_id=node)


# ----------------------------------------------------------------------------------------------- schemas

@dataclass(frozen=True)
class Field:
    """One value of a record: its key (or key prefix), its Python type, and bounds (a number's range, a bytes or
    str value's length, a list's length)."""

    key: str
    kind: type
    low: float = -math.inf
    high: float = math.inf
    required: bool = True
    prefix: bool = False     # the field stands for every key that starts with ``key``
    unbounded: bool = False  # a float that may be +-inf (never NaN)

    def check(self, key: str, value) -> object:
        kind = self.kind
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ProtocolError(f"{key!r} is {_kind(value)}, expected an integer")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProtocolError(f"{key!r} is {_kind(value)}, expected a number")
            value = float(value)
            if math.isnan(value) or (math.isinf(value) and not self.unbounded):
                raise ProtocolError(f"{key!r} is {value}, expected a finite number")
        if kind in (int, float) and not self.low <= value <= self.high:
            raise ProtocolError(f"{key!r} = {value} is outside [{self.low}, {self.high}]")
        if kind in (bytes, str, bool) and not isinstance(value, kind):
            raise ProtocolError(f"{key!r} is {_kind(value)}, expected {kind.__name__}")
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProtocolError(f"{key!r} is {_kind(value)}, expected a list of strings")
        if kind in (bytes, str, list) and not self.low <= len(value) <= self.high:
            raise ProtocolError(f"{key!r} has length {len(value)}, outside [{max(self.low, 0):g}, {self.high:g}]")
        return value


def _kind(value) -> str:
    return type(value).__name__


@dataclass(frozen=True)
class Schema:
    """A message's content: per record name, the record's kind and its fields. Records not listed, and keys not
    listed in a record, are errors: a message carries exactly what its schema says."""

    stage: str
    records: dict[str, tuple[str, tuple[Field, ...]]]   # name -> ("config" | "metrics" | "arrays", fields)
    optional: frozenset[str] = frozenset()                 # records that may be absent

    def parse(self, content: RecordDict) -> dict[str, dict]:
        """``{record: {key: value}}`` (arrays records as they are), or ProtocolError."""
        if not isinstance(content, RecordDict):
            raise ProtocolError(f"{self.stage}: the content is {_kind(content)}, expected a RecordDict")
        extra = sorted(set(content) - set(self.records))
        if extra:
            raise ProtocolError(f"{self.stage}: unexpected record {extra[0]!r}")
        out: dict[str, dict] = {}
        for name, (kind, fields) in self.records.items():
            if name not in content:
                if name in self.optional:
                    continue
                raise ProtocolError(f"{self.stage}: the {name!r} record is missing")
            record = content[name]
            expected = {"config": ConfigRecord, "metrics": MetricRecord}.get(kind)
            if expected is None:  # arrays: checked by whoever decodes them (codec, masked vector)
                out[name] = record
                continue
            if not isinstance(record, expected):
                raise ProtocolError(f"{self.stage}: the {name!r} record is {_kind(record)}, expected {kind}")
            out[name] = _fields(self.stage, name, dict(record), fields)
        return out


def _fields(stage: str, name: str, record: dict, fields: tuple[Field, ...]) -> dict:
    values = {}
    for key, value in record.items():
        field = next((f for f in fields if key == f.key or (f.prefix and key.startswith(f.key))), None)
        if field is None:
            raise ProtocolError(f"{stage}: unexpected key {key!r} in the {name!r} record")
        values[key] = field.check(key, value)
    missing = [f.key for f in fields if f.required and not f.prefix and f.key not in values]
    if missing:
        raise ProtocolError(f"{stage}: the {name!r} record lacks {missing[0]!r}")
    return values


def _config(*fields: Field) -> tuple[str, tuple[Field, ...]]:
    return "config", fields


def _metrics(*fields: Field) -> tuple[str, tuple[Field, ...]]:
    return "metrics", fields


ARRAYS = ("arrays", ())
COUNT = Field("num-examples", int, 1, 2**53)
BLOB = (0, MAX_BYTES)

# A training round's DP accounting, reported by a client that trains with DP-SGD (epsilon inf: clipping without
# noise, privacy.noise_multiplier = 0, the reference run that has no guarantee).
DP_FIELDS = (Field("epsilon", float, 0.0, required=False, unbounded=True),
             Field("delta", float, 0.0, 1.0, required=False), Field("dp-steps", int, 0, 2**53, required=False),
             Field("noise-multiplier", float, 0.0, required=False),
             Field("sample-rate", float, 0.0, 1.0, required=False))

# server -> client
TRAIN_INS = Schema(TRAIN, {
    "arrays": ARRAYS, "wire": _config(Field("index", bytes, *BLOB)),
    "config": _config(Field("server-round", int, 1, 2**31), Field("lr", float, 0.0),
                      Field("groups", list, 0, 4096, required=False), Field("full", bool),
                      Field("base-round", int, 0, 2**31), Field("sync-round", int, 0, 2**31),
                      Field("dp-prior-steps", int, 0, 2**53), Field("client-dp-clip", float, 0.0, required=False)),
    "secagg": _config(Field("src", bytes, *BLOB), Field("ct", bytes, *BLOB), Field("max-weight", int, 1, 2**53),
                      Field("length", int, 1, 2**40))}, optional=frozenset({"secagg"}))

# client -> server
TRAIN_REPLY = Schema(TRAIN, {
    "arrays": ARRAYS, "wire": _config(Field("index", bytes, *BLOB)),
    "metrics": _metrics(COUNT, Field("synced-round", int, 0, 2**31), Field("train_loss", float, required=False),
                        Field(SQ + CLIP_BIT, float, -0.5, 0.5, required=False), Field(SQ, float, 0.0, prefix=True),
                        *DP_FIELDS)}, optional=frozenset({"wire"}))
PARTITION_REPLY = Schema(query_type("partition"), {"metrics": _metrics(Field("partition-id", int, 0, MAX_PARTITION),
                                                                       COUNT)})
SYNCED_REPLY = Schema(query_type("synced"), {"metrics": _metrics(Field("synced-round", int, 0, 2**31))})
SECAGG_SETUP_REPLY = Schema(query_type("secagg_setup"), {
    "keys": _config(Field("pk1", bytes, 1, 256), Field("pk2", bytes, 1, 256), Field("vk", bytes, 1, 256)),
    "metrics": _metrics()})
SECAGG_SHARE_REPLY = Schema(query_type("secagg_share"), {
    "shares": _config(Field("dst", bytes, *BLOB), Field("ct", bytes, *BLOB), Field("commit", bytes, 32, 32)),
    "metrics": _metrics()})
SECAGG_SIGN_REPLY = Schema(query_type("secagg_sign"), {
    "consistency": _config(Field("signature", bytes, 1, 256)), "metrics": _metrics()})
SECAGG_UNMASK_REPLY = Schema(query_type("secagg_unmask"), {
    "shares": _config(Field("owner", bytes, *BLOB), Field("share", bytes, *BLOB)), "metrics": _metrics()})


# --------------------------------------------------------------------------- packed lists inside a bytes value

# Lists cross as one bytes value each, led by a tag byte: Flower's ConfigRecord.count_bytes cannot count an
# empty list, an empty bytes value, or node ids above 2**63 in an int list.
def pack_ids(values: Iterable[int]) -> bytes:
    return b"i" + np.asarray(list(values), dtype=">u8").tobytes()


def ids(data: bytes) -> list[int]:
    """The node ids of ``pack_ids``; a malformed value is a ProtocolError."""
    if not isinstance(data, bytes) or data[:1] != b"i" or (len(data) - 1) % 8:
        raise ProtocolError("an id list is not b'i' followed by 8-byte ids")
    values = [int(i) for i in np.frombuffer(data[1:], dtype=">u8")]
    if len(set(values)) != len(values):
        raise ProtocolError("an id list repeats an id")
    return values


def pack_blobs(values: Iterable[bytes]) -> bytes:
    return b"b" + b"".join(len(v).to_bytes(4, "big") + bytes(v) for v in values)


def blobs(data: bytes) -> list[bytes]:
    """The byte strings of ``pack_blobs``; a malformed value is a ProtocolError."""
    if not isinstance(data, bytes) or data[:1] != b"b":
        raise ProtocolError("a blob list is not b'b' followed by length-prefixed values")
    out, at = [], 1
    while at < len(data):
        size = int.from_bytes(data[at:at + 4], "big")
        if at + 4 + size > len(data):
            raise ProtocolError("a blob list is truncated")
        out.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return out


def id_map(id_data: bytes, blob_data: bytes) -> dict[int, bytes]:
    """``{id: blob}`` from an id list and a blob list of the same length."""
    keys, values = ids(id_data), blobs(blob_data)
    if len(keys) != len(values):
        raise ProtocolError(f"{len(keys)} ids but {len(values)} values")
    return dict(zip(keys, values))


# ---------------------------------------------------------------------------------------- FedTT+ group ids

def group_name(group) -> str:
    """A FedTT+ group (a core index or "bias" / "norm") as it crosses the wire and keys results.json."""
    return str(group)


def group_of(name: str):
    return int(name) if name.lstrip("-").isdigit() else name
