"""A GGUF v3 writer: metadata key/values, tensor infos, then aligned tensor data.

Tensors stream to disk one at a time. Given a list, the header is written from the names, types
and shapes alone (a tensor's data may be a zero-argument callable that produces it only when its
turn comes); given a one-shot iterator, each tensor's bytes are spooled to a temporary file as they
arrive and copied after the header. The file is written under a temporary name and renamed into
place only when complete: after any error nothing is left under the final name.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np

from jft.convert.safetensors_io import atomic_write

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_DTYPES = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}

# ggml_type -> (values per block, bytes per block), for every type this writer accepts.
GGML_BLOCKS = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    30: (1, 2),  # BF16
}


class GGUFWriteError(ValueError):
    """Bad input for a GGUF file: an unknown type, a value that does not fit, a size mismatch."""


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor to write. `data` holds its encoded bytes (any dtype, viewed as raw bytes) or is
    a zero-argument callable returning them; `shape` is the logical numpy shape (rows last)."""

    name: str
    data: np.ndarray | Callable[[], np.ndarray]
    ggml_type: int
    shape: tuple[int, ...]


def tensor_nbytes(ggml_type: int, shape: Sequence[int]) -> int:
    """Bytes a tensor of logical `shape` takes in `ggml_type`."""
    if int(ggml_type) not in GGML_BLOCKS:
        raise GGUFWriteError(f"unsupported ggml type {ggml_type}; known: {sorted(GGML_BLOCKS)}")
    block, size = GGML_BLOCKS[int(ggml_type)]
    if not shape:
        raise GGUFWriteError("a tensor needs at least one dimension")
    if shape[-1] % block:
        raise GGUFWriteError(f"row length {shape[-1]} is not a multiple of the block size {block} of ggml type {ggml_type}")
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


# --------------------------------------------------------------------------- encoding


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _scalar(vtype: GGUFValueType, value: Any) -> bytes:
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            raise GGUFWriteError(f"expected a string, got {type(value).__name__}")
        return _string(value)
    if vtype == GGUFValueType.BOOL:
        return struct.pack("<?", bool(value))
    dtype = np.dtype(_SCALAR_DTYPES[vtype])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not isinstance(value, (int, np.integer)) or not info.min <= int(value) <= info.max:
            raise GGUFWriteError(f"{value!r} does not fit {vtype.name}")
    return np.asarray(value, dtype=dtype).tobytes()


def _array(elem_type: GGUFValueType, values: Sequence[Any]) -> bytes:
    head = struct.pack("<IQ", elem_type, len(values))
    if elem_type == GGUFValueType.STRING:
        return head + b"".join(_string(v) for v in values)
    if elem_type == GGUFValueType.ARRAY:
        raise GGUFWriteError("nested arrays are not supported")
    if elem_type == GGUFValueType.BOOL:
        return head + np.asarray(values, dtype=bool).astype("<u1").tobytes()
    dtype = np.dtype(_SCALAR_DTYPES[elem_type])
    arr = np.asarray(values)
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.dtype.kind not in "iub" or arr.min() < info.min or arr.max() > info.max:
            raise GGUFWriteError(f"array values do not fit {elem_type.name}")
    return head + arr.astype(dtype).tobytes()


def encode_kv(key: str, vtype: int, value: Any) -> bytes:
    """One metadata entry. For arrays, `value` is `(element_type, values)`."""
    try:
        vtype = GGUFValueType(vtype)
    except ValueError:
        raise GGUFWriteError(f"{key}: unknown GGUF value type {vtype!r}") from None
    try:
        if vtype == GGUFValueType.ARRAY:
            if not (isinstance(value, tuple) and len(value) == 2):
                raise GGUFWriteError("an ARRAY value must be (element_type, values)")
            body = _array(GGUFValueType(value[0]), value[1])
        else:
            body = _scalar(vtype, value)
    except GGUFWriteError as e:
        raise GGUFWriteError(f"{key}: {e}") from None
    return _string(key) + struct.pack("<I", vtype) + body


def _tensor_info(t: GGUFTensor, offset: int) -> bytes:
    dims = tuple(reversed(t.shape))  # ggml lists the fastest-varying dimension first
    return (
        _string(t.name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", t.ggml_type, offset)
    )


def _padding(n: int, alignment: int) -> int:
    return -n % alignment


def _as_tensor(entry: Any) -> GGUFTensor:
    if isinstance(entry, GGUFTensor):
        t = entry
    else:
        try:
            name, data, ggml_type, shape = entry
        except (TypeError, ValueError):
            raise GGUFWriteError(
                f"a tensor entry must be (name, data, ggml_type, shape), got {type(entry).__name__}"
            ) from None
        t = GGUFTensor(str(name), data, int(ggml_type), tuple(int(s) for s in shape))
    tensor_nbytes(t.ggml_type, t.shape)  # validates type and shape early
    return t


def _tensor_bytes(t: GGUFTensor) -> memoryview:
    data = t.data() if callable(t.data) else t.data
    arr = np.ascontiguousarray(data)
    expected = tensor_nbytes(t.ggml_type, t.shape)
    if arr.nbytes != expected:
        raise GGUFWriteError(
            f"tensor {t.name}: got {arr.nbytes} bytes ({arr.dtype}{list(arr.shape)}), but ggml type "
            f"{t.ggml_type} with shape {list(t.shape)} needs {expected}"
        )
    return memoryview(arr.reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------- writing


class _Progress:
    """A byte-count tqdm bar, opened only once a write has grown big enough to be worth watching."""

    THRESHOLD = 256 << 20

    def __init__(self, total: int | None, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.done = 0
        self.bar = None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is None and self.enabled and (self.total or self.done) >= self.THRESHOLD:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=self.label)
            self.bar.update(self.done - n)
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _header(kv_blob: bytes, n_kv: int, infos: list[bytes]) -> bytes:
    return GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(infos), n_kv) + kv_blob + b"".join(infos)


def _write_padded(f: BinaryIO, payload: memoryview, alignment: int) -> int:
    f.write(payload)
    pad = _padding(len(payload), alignment)
    f.write(b"\0" * pad)
    return len(payload) + pad


def _encode_metadata(kv: Iterable[tuple[str, int, Any]], alignment: int) -> tuple[bytes, int]:
    entries = list(kv)
    keys = [k for k, _, _ in entries]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise GGUFWriteError(f"duplicate metadata keys: {duplicates}")
    if "general.alignment" not in keys:
        entries.append(("general.alignment", GGUFValueType.UINT32, alignment))
    else:
        given = next(v for k, _, v in entries if k == "general.alignment")
        if given != alignment:
            raise GGUFWriteError(f"general.alignment={given} but alignment={alignment}")
    return b"".join(encode_kv(*e) for e in entries), len(entries)


def _check_names(tensors: Sequence[GGUFTensor]) -> None:
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise GGUFWriteError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})}")


def _offsets(tensors: Sequence[GGUFTensor], alignment: int) -> list[int]:
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        n = tensor_nbytes(t.ggml_type, t.shape)
        pos += n + _padding(n, alignment)
    return offsets


def _write_from_sequence(f, kv_blob, n_kv, tensors, alignment, bar: _Progress) -> None:
    _check_names(tensors)
    infos = [_tensor_info(t, off) for t, off in zip(tensors, _offsets(tensors, alignment))]
    head = _header(kv_blob, n_kv, infos)
    f.write(head + b"\0" * _padding(len(head), alignment))
    bar.total = sum(tensor_nbytes(t.ggml_type, t.shape) for t in tensors)
    for t in tensors:
        payload = _tensor_bytes(t)
        _write_padded(f, payload, alignment)
        bar.update(len(payload))


def _write_from_iterator(f, kv_blob, n_kv, tensors: Iterator[Any], alignment, bar: _Progress, directory) -> None:
    with tempfile.TemporaryFile(dir=directory) as spool:
        seen: list[GGUFTensor] = []
        for entry in tensors:
            t = _as_tensor(entry)
            payload = _tensor_bytes(t)
            _write_padded(spool, payload, alignment)
            bar.update(len(payload))
            seen.append(dataclasses.replace(t, data=np.empty(0, np.uint8)))
        _check_names(seen)
        infos = [_tensor_info(t, off) for t, off in zip(seen, _offsets(seen, alignment))]
        head = _header(kv_blob, n_kv, infos)
        f.write(head + b"\0" * _padding(len(head), alignment))
        spool.seek(0)
        shutil.copyfileobj(spool, f, 16 << 20)


def write_gguf(
    path: str | os.PathLike,
    kv: Iterable[tuple[str, int, Any]],
    tensors: Iterable[Any],
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    progress: bool = True,
) -> None:
    """Write a GGUF v3 file atomically.

    kv: `(key, GGUFValueType, value)` triples, arrays as `(key, ARRAY, (element_type, values))`;
    `general.alignment` is added when absent. tensors: `GGUFTensor`s or `(name, data, ggml_type,
    shape)` tuples in file order, where `data` is the encoded bytes (an array of any dtype) or a
    callable producing them, and `shape` is the logical numpy shape.
    """
    if alignment <= 0 or alignment % 8:
        raise GGUFWriteError(f"alignment must be a positive multiple of 8, got {alignment}")
    path = os.fspath(path)
    kv_blob, n_kv = _encode_metadata(kv, alignment)
    directory = os.path.dirname(os.path.abspath(path))
    bar = _Progress(None, os.path.basename(path), progress)

    def write(f):
        if isinstance(tensors, Sequence):
            _write_from_sequence(f, kv_blob, n_kv, [_as_tensor(t) for t in tensors], alignment, bar)
        else:
            _write_from_iterator(f, kv_blob, n_kv, iter(tensors), alignment, bar, directory)
        f.flush()
        os.fsync(f.fileno())

    try:
        atomic_write(path, write)
    finally:
        bar.close()
