"""Reading and writing .safetensors without torch.

Reading memory-maps each file, so a tensor is only brought into memory when it is used: loading a
model streams tensor by tensor. bf16 and fp8 go through ml_dtypes (a JAX dependency). Writing goes
to a temporary file that is renamed into place, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

from jft.config import read_json

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, or does not fit the model."""


class SafetensorsFile:
    """Lazy read access to one .safetensors file: `f[name]` is a numpy view of the mapped bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise CheckpointError(f"{self.path}: truncated (header of {header_len} bytes, file of {size})")
                header = json.loads(f.read(header_len))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a safetensors file ({e})") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint file not found: {self.path}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._start = 8 + header_len
        for name, e in header.items():
            end = self._start + e["data_offsets"][1]
            if end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {end} but the file has {size} (truncated?)")
            if e["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def keys(self):
        return self.entries.keys()

    def __contains__(self, name):
        return name in self.entries

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def __getitem__(self, name) -> np.ndarray:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        raw = self._map[self._start + begin : self._start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])


def _header(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def atomic_write(path: str | os.PathLike, write_fn, mode: str = "wb") -> None:
    """Calls write_fn(file) on a temp file beside `path`, then renames it into place."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # a fresh name opened exclusively, not mkstemp: its files are private (0600) whatever the umask
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}-{os.path.basename(path)}")
    f = open(tmp, mode.replace("w", "x"))
    try:
        with f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_file(tensors: Mapping[str, np.ndarray], path, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a safetensors file (tensors in the given order) atomically."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header = _header(tensors, metadata if metadata is not None else {"format": "pt"})

    def write(f):
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in tensors.values():
            f.write(t.tobytes())

    atomic_write(path, write)


def save_sharded(tensors: Iterable[tuple[str, np.ndarray]], directory, *, max_shard_bytes: int = 5 * 2**30,
                 prefix: str = "model", metadata: Mapping[str, str] | None = None) -> list[str]:
    """Writes tensors into shards of at most `max_shard_bytes` plus an index json when there are several.

    Tensors are consumed one shard at a time, so at most one shard is held in memory. Weight files of
    an earlier save into `directory` that this one did not write are removed. Returns the written file names.
    """
    names, weight_map, total = [], {}, 0

    def flush(shard, i):
        name = f"{prefix}-{i:05d}.safetensors.partial"
        save_file(shard, os.path.join(directory, name), metadata)
        return name

    written = []
    current, size = {}, 0
    try:
        for name, t in tensors:
            t = np.asarray(t)
            if current and size + t.nbytes > max_shard_bytes:
                written.append((flush(current, len(written) + 1), list(current)))
                current, size = {}, 0
            current[name] = t
            size += t.nbytes
            total += t.nbytes
        if current or not written:
            written.append((flush(current, len(written) + 1), list(current)))
    except BaseException:
        for partial, _ in written:  # nothing half-written is left behind
            os.remove(os.path.join(directory, partial))
        raise

    n = len(written)
    for i, (partial, keys) in enumerate(written, start=1):
        final = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(directory, partial), os.path.join(directory, final))
        names.append(final)
        weight_map.update({k: final for k in keys})
    index_name = f"{prefix}.safetensors.index.json"
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(os.path.join(directory, index_name), lambda f: f.write(json.dumps(index, indent=2)), mode="w")
    _remove_stale_weights(directory, prefix, keep={*names, index_name} if n > 1 else set(names))
    return names


def _remove_stale_weights(directory, prefix: str, keep: set[str]) -> None:
    """Deletes the weight files and index of an earlier save into `directory` that are not in `keep`:
    a loader would mix them in (an old index pointing at old shards even wins over a new single file)."""
    weights = re.compile(rf"{re.escape(prefix)}(-\d+-of-\d+)?\.safetensors")
    for name in os.listdir(directory):
        if (weights.fullmatch(name) or name == f"{prefix}.safetensors.index.json") and name not in keep:
            os.remove(os.path.join(directory, name))


class CheckpointFiles:
    """All safetensors files of a model directory (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike, prefix: str = "model"):
        directory = os.fspath(directory)
        index = os.path.join(directory, f"{prefix}.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no .safetensors files (jft reads safetensors checkpoints only)")
        self.directory = directory
        self.files = {n: SafetensorsFile(os.path.join(directory, n)) for n in files}
        self.where = {}
        for n, f in self.files.items():
            for k in f.keys():
                self.where[k] = f

    def __contains__(self, name):
        return name in self.where

    def keys(self):
        return self.where.keys()

    def get(self, name) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        return self.where[name][name]

    def path_of(self, name) -> str:
        return self.where[name].path if name in self.where else self.directory
