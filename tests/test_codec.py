"""The packed wire format: exact in float32, within its rounding bound in half precision, bytes as the formula says."""

import json
import zlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedtt.federated.codec import RELATIVE_ERROR, num_values, pack, unpack


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"bert.encoder.layer.0.attention.output.dense.adapter.down.core_0": rng.normal(size=(1, 8, 5)),
            "bert.encoder.layer.0.attention.output.dense.adapter.down.bias": rng.normal(size=64) * 1e-3,
            "classifier.weight": rng.normal(size=(2, 384)) * 30, "empty": np.zeros((0, 3)),
            "scalar-ish": torch.tensor([[2.5]])}


def test_float32_round_trip_is_exact():
    sent = tensors()
    received = unpack(*pack(sent, "float32"))
    assert list(received) == list(sent)
    for name, value in sent.items():
        expected = np.asarray(value, dtype=np.float32)
        assert received[name].dtype == np.float32 and received[name].shape == expected.shape
        assert np.array_equal(received[name], expected), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip_is_within_its_rounding_bound(dtype):
    sent = {k: np.asarray(v, dtype=np.float32) for k, v in tensors().items()}
    received = unpack(*pack(sent, dtype))
    for name, value in sent.items():
        normal = np.abs(value) > (6.2e-5 if dtype == "float16" else 1.2e-38)  # below: subnormal, absolute error
        error = np.abs(received[name] - value)
        assert (error[normal] <= RELATIVE_ERROR[dtype] * np.abs(value[normal])).all(), name
        assert (error[~normal] <= 6e-8).all(), name
    big = {"x": np.full(3, 1e5, dtype=np.float32)}
    with pytest.raises(ValueError, match="too large for federation.wire_dtype = 'float16'"):
        pack(big, "float16")
    assert np.allclose(unpack(*pack(big, "bfloat16"))["x"], 1e5, rtol=RELATIVE_ERROR["bfloat16"])


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_bytes_are_one_npy_header_plus_the_values_plus_the_index(dtype, itemsize):
    sent = tensors()
    arrays, index = pack(sent, dtype)
    values = sum(int(np.prod(np.shape(v))) for v in sent.values())
    assert num_values(arrays) == values
    npy = Array(np.zeros(values, dtype=np.float32)).data  # the header of a 1-D array
    header = len(npy) - 4 * values
    assert arrays.count_bytes() == header + itemsize * values + len("packed")
    names = json.loads(zlib.decompress(index["index"]))["tensors"]
    assert [n for n, _ in names] == list(sent)
    assert index.count_bytes() == len(index["index"]) + len("index")
    # far smaller than one .npy record per tensor once there are many tensors (the TT adapter has 172 on MiniLM)
    many = {f"bert.encoder.layer.{i}.output.dense.adapter.up.core_{j}": np.zeros((5, 8, 5), np.float32)
            for i in range(12) for j in range(5)}
    packed = sum(r.count_bytes() for r in pack(many, "float32"))
    per_tensor = ArrayRecord({k: Array(v) for k, v in many.items()}).count_bytes()
    assert packed < per_tensor - 60 * 100


def test_a_malformed_message_is_a_clear_error():
    arrays, index = pack(tensors(), "float32")
    with pytest.raises(ValueError, match="exactly one 'packed' array and its 'index' are expected"):
        unpack(ArrayRecord(), index)
    with pytest.raises(ValueError, match="index cannot be read"):
        unpack(arrays, ConfigRecord({"index": b"not zlib"}))
    short = ArrayRecord({"packed": Array(np.zeros(3, np.float32))})
    with pytest.raises(ValueError, match="has 3 values, its index describes"):
        unpack(short, index)
    half = ArrayRecord({"packed": Array(np.zeros(num_values(arrays), np.float16))})
    with pytest.raises(ValueError, match="float16, its index says 'float32'"):
        unpack(half, index)


@pytest.mark.parametrize("index, reason", [
    (zlib.compress(b"[" * 200_000), "cannot be read"),                              # nesting: RecursionError
    (zlib.compress(b" " * (1 << 23)), "expands beyond"),                           # a zlib bomb
    (zlib.compress(b'{"dtype": "float32", "tensors": [["a", [-3]]]}'), "that is not"),
    (zlib.compress(b'{"dtype": "float32", "tensors": [["a", [3]], ["a", [3]]]}'), "names a tensor twice"),
    (zlib.compress(b'{"dtype": "int8", "tensors": []}'), "wire dtype"),
    (zlib.compress(b'{"dtype": "float32", "tensors": [["a", [1e30]]]}'), "that is not"),
    (b"x" * 100, "cannot be read"),
])
def test_hostile_indexes_are_bounded_value_errors(index, reason):
    arrays, _ = pack(tensors(), "float32")
    with pytest.raises(ValueError, match=reason):
        unpack(arrays, ConfigRecord({"index": index}))
