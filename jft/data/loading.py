"""Loading datasets from local files or the Hugging Face hub (through `datasets`)."""

from __future__ import annotations

import json
import os

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder_for(path: str) -> str:
    lower = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
    ext = os.path.splitext(lower)[1]
    if ext not in _BUILDERS:
        raise ValueError(
            f"cannot load {path!r}: unsupported file type {ext or '(none)'}; "
            f"supported: {', '.join(_BUILDERS)}"
        )
    return _BUILDERS[ext]


def _looks_like_path(source: str) -> bool:
    """A string meant as a local path rather than a hub id such as 'openai/gsm8k'."""
    if source.startswith((".", "~", os.sep)):
        return True
    ext = os.path.splitext(source.lower().removesuffix(".gz"))[1]
    return ext in _BUILDERS


def _check_not_empty(dataset, source):
    if len(dataset) == 0:
        raise ValueError(f"dataset {source!r} has no rows")
    return dataset


def _json_syntax_error(path: str) -> str | None:
    """Where an uncompressed .json/.jsonl file stops being JSON ("line N, column M: ..."), or None.
    A .jsonl file, or a .json file whose first line is a value by itself, holds one value per line."""
    ext = os.path.splitext(path.lower())[1]
    if ext not in (".json", ".jsonl"):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.splitlines()
    if ext == ".json" and not _is_json(lines[0] if lines else ""):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: {e.msg}"
        return None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}, column {e.colno}: {e.msg}"
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _load_file(path, split):
    import datasets

    if os.path.getsize(path) == 0:
        raise ValueError(f"dataset file {path!r} is empty")
    builder = _builder_for(path)
    try:
        return datasets.load_dataset(builder, data_files={"train": path}, split=split)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        # `datasets` words a file without rows as a split "corresponding to no data".
        if "no data" in str(err):
            raise ValueError(f"dataset {path!r} has no rows") from err
        where = _json_syntax_error(path)  # `datasets` names neither the file nor the line
        if where:
            raise ValueError(f"dataset file {path!r} is not valid JSON at {where}") from None
        raise ValueError(f"cannot load dataset file {path!r}: {err.__cause__ or err}") from err


def _load_directory(path, split):
    import datasets

    if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
        os.path.join(path, "state.json")
    ):
        loaded = datasets.load_from_disk(path)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(path, split=split)


def _load_hub(name, split, kwargs):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{name!r} is neither a local file nor a dataset found on the Hugging Face hub: {err}"
        ) from err


def load(path_or_id, split: str = "train", **kwargs):
    """A `datasets.Dataset` from a .jsonl/.json/.parquet/.csv file, a dataset folder, or a hub id.

    Local files have a single split, "train" (slices such as "train[:90%]" work); `kwargs` go to
    `datasets.load_dataset` for hub ids (e.g. name="main" for GSM8K's config).
    Raises FileNotFoundError for a missing path and ValueError for an empty dataset.
    """
    source = os.path.expanduser(os.fspath(path_or_id))
    if os.path.isfile(source):
        dataset = _load_file(source, split)
    elif os.path.isdir(source):
        dataset = _load_directory(source, split)
    elif _looks_like_path(source):
        raise FileNotFoundError(f"dataset file not found: {source!r}")
    else:
        dataset = _load_hub(source, split, kwargs)
    return _check_not_empty(dataset, source)
