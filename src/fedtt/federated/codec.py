"""The wire format: every tensor of a message in one packed array, plus a small compressed index.

One record per tensor costs each tensor a 128-byte ``.npy`` header and its key, which falls hardest on the TT
adapter (172 small tensors on MiniLM, against LoRA's 26). Packed, a message holds one ``packed`` array of
all values back to back, in ``federation.wire_dtype`` (bfloat16 travels as its uint16 bit pattern), and an
``index``: the tensor names and shapes, zlib-compressed JSON (names share long prefixes). Senders and
receivers decode to float32; the server aggregates in float64. The same format serves every method.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

PACKED, INDEX = "packed", "index"
WIRE_DTYPES = ("float32", "float16", "bfloat16")
# Largest relative rounding error of one value (half a unit in the last place), for finite normal values.
MAX_INDEX = 1 << 22  # bytes an index may expand to (about 30,000 tensor names)
RELATIVE_ERROR = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def pack(tensors: dict[str, np.ndarray | torch.Tensor], dtype: str) -> tuple[ArrayRecord, ConfigRecord]:
    """``tensors`` (any float dtype) as one ``packed`` array in ``dtype`` and its index."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    names = list(tensors)
    flat = [_numpy32(tensors[n]).reshape(-1) for n in names]
    values = np.concatenate(flat) if flat else np.zeros(0, np.float32)
    encoded = _encode(values, dtype)
    index = {"dtype": dtype, "tensors": [[n, list(_numpy32(tensors[n]).shape)] for n in names]}
    return (ArrayRecord({PACKED: Array(encoded)}),
            ConfigRecord({INDEX: zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)}))


def unpack(arrays: ArrayRecord, index: ConfigRecord) -> dict[str, np.ndarray]:
    """The float32 tensors of a packed message; a malformed or hostile one (any bytes at all) is a ``ValueError``
    saying what is wrong. Decoding is bounded: the index expands to at most ``MAX_INDEX`` bytes and is a flat
    list, and the sizes it declares must add up to the values that arrived."""
    if PACKED not in arrays or INDEX not in index or len(arrays) != 1:
        raise ValueError("not a packed message: exactly one 'packed' array and its 'index' are expected")
    entries, dtype = _read_index(index[INDEX])
    try:
        raw = arrays[PACKED].numpy()
    except Exception as err:  # Flower's Array.numpy() on arbitrary bytes raises whatever numpy raises
        raise ValueError(f"the packed array cannot be read ({type(err).__name__})") from None
    values = _decode(raw, dtype)
    sizes = [math.prod(shape) for _, shape in entries]
    if values.ndim != 1 or len(values) != sum(sizes):
        raise ValueError(f"the packed array has {values.size} values, its index describes {sum(sizes)}")
    out, start = {}, 0
    for (name, shape), size in zip(entries, sizes):
        out[name] = values[start:start + size].reshape(shape)
        start += size
    return out


def _read_index(data) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    """(name, shape) per tensor and the wire dtype, from the compressed JSON index."""
    if not isinstance(data, bytes):
        raise ValueError("the message index is not bytes")
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(data, MAX_INDEX)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError(f"it expands beyond {MAX_INDEX} bytes or is truncated")
        meta = json.loads(text)
        dtype, tensors = meta["dtype"], meta["tensors"]
        entries = [(name, tuple(shape)) for name, shape in tensors]
    except (zlib.error, ValueError, KeyError, TypeError, RecursionError) as err:
        raise ValueError(f"the message index cannot be read ({type(err).__name__}: {str(err)[:80]})") from None
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"the message index names wire dtype {str(dtype)[:20]!r}")
    for name, shape in entries:
        if not isinstance(name, str) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                                                for d in shape) or len(shape) > 8:
            raise ValueError("the message index has an entry that is not [name, [dims...]]")
    if len({name for name, _ in entries}) != len(entries):
        raise ValueError("the message index names a tensor twice")
    return entries, dtype


def num_values(arrays: ArrayRecord) -> int:
    """The number of values a message carries (what ``params_up`` / ``params_down`` count), packed or masked."""
    return sum(int(np.prod(array.shape)) for array in arrays.values())


def _numpy32(tensor) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to("cpu", torch.float32).numpy()
    return np.asarray(tensor, dtype=np.float32)


def _encode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # reported below, in words
            encoded = values.astype(np.float16)
        if not np.isfinite(encoded[np.isfinite(values)]).all():
            raise ValueError("a value is too large for federation.wire_dtype = 'float16' (|x| > 65504); use "
                             "'bfloat16' or 'float32'")
        return encoded
    # bfloat16: round to nearest even in torch, send the bit pattern
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _decode(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32" and values.dtype == np.float32:
        return values
    if dtype == "float16" and values.dtype == np.float16:
        return values.astype(np.float32)
    if dtype == "bfloat16" and values.dtype == np.uint16:
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    raise ValueError(f"the packed array is {values.dtype}, its index says {dtype!r}")
