"""Batches for training: packed fixed-length rows, or padded batches bucketed by length.

Every batch is a dict of int32 numpy arrays of shape [B, T]:
  input_ids    token ids, `pad_id` on padding
  labels       the targets aligned with input_ids (NOT shifted; the loss shifts by one), -100 where
               nothing is learned (prompt tokens, padding)
  positions    0, 1, 2, ... restarting at every sample; 0 on padding
  segment_ids  1, 2, 3, ... per sample within a row (always 1 in unpacked batches); 0 on padding
Attention must stay within equal non-zero segment ids.

In packed rows the label of each segment's first token is -100, so a plain shifted loss
(logits[t] against labels[t + 1]) never predicts across two samples. That token could never be
a target of its own sample anyway: nothing precedes it.
"""

from __future__ import annotations

import bisect

import numpy as np

from .tokenization import IGNORE_INDEX

KEYS = ("input_ids", "labels", "positions", "segment_ids")


def _check_examples(examples):
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to batch")
    out = []
    for index, example in enumerate(examples):
        if not isinstance(example, dict) or "input_ids" not in example or "labels" not in example:
            raise ValueError(f"example {index} needs 'input_ids' and 'labels'")
        ids = np.asarray(example["input_ids"], dtype=np.int32).reshape(-1)
        labels = np.asarray(example["labels"], dtype=np.int32).reshape(-1)
        if len(ids) != len(labels):
            raise ValueError(
                f"example {index}: input_ids has {len(ids)} tokens but labels has {len(labels)}"
            )
        if len(ids) == 0:
            raise ValueError(f"example {index} is empty")
        out.append((ids, labels))
    return out


def _check_positive(name, value):
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _split_long(pairs, seq_len):
    """Samples longer than seq_len become consecutive seq_len pieces; others stay whole."""
    pieces = []
    for ids, labels in pairs:
        for start in range(0, len(ids), seq_len):
            pieces.append((ids[start : start + seq_len], labels[start : start + seq_len]))
    return pieces


def _best_fit_decreasing(lengths, capacity):
    """Rows of piece indices: longest first, each into the fullest row it still fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, free = [], []  # free: sorted (remaining capacity, row index)
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            remaining, row = free.pop(slot)
        else:
            remaining, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if remaining - lengths[i] > 0:
            bisect.insort(free, (remaining - lengths[i], row))
    return rows


def empty_rows(count, width, pad_id):
    """count all-padding rows: no label tokens (no effect on a token-mean loss), segment 0."""
    return {
        "input_ids": np.full((count, width), pad_id, dtype=np.int32),
        "labels": np.full((count, width), IGNORE_INDEX, dtype=np.int32),
        "positions": np.zeros((count, width), dtype=np.int32),
        "segment_ids": np.zeros((count, width), dtype=np.int32),
    }


def pack(examples, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pack tokenised examples into rows of exactly seq_len tokens (see the module docstring).

    A sample is never split across rows unless it alone is longer than seq_len; then it is cut
    into seq_len pieces, each its own segment. Rows come out in a deterministic order.
    """
    _check_positive("seq_len", seq_len)
    pieces = _split_long(_check_examples(examples), seq_len)
    rows = _best_fit_decreasing([len(ids) for ids, _ in pieces], seq_len)
    out = empty_rows(len(rows), seq_len, pad_id)
    for r, members in enumerate(rows):
        cursor = 0
        for segment, i in enumerate(members, start=1):
            ids, labels = pieces[i]
            span = slice(cursor, cursor + len(ids))
            out["input_ids"][r, span] = ids
            out["labels"][r, span] = labels
            out["labels"][r, cursor] = IGNORE_INDEX
            out["positions"][r, span] = np.arange(len(ids), dtype=np.int32)
            out["segment_ids"][r, span] = segment
            cursor += len(ids)
    return out


def bucket_length(length: int, buckets=None) -> int:
    """The smallest bucket >= length. buckets=None means 256, 512, 1024, ... without end."""
    if buckets is None:
        size = 256
        while size < length:
            size *= 2
        return size
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(
            f"a batch holds a {length}-token sequence, longer than the largest bucket "
            f"{max(buckets)}; tokenise with max_seq_length <= {max(buckets)} or add a bucket"
        )
    return fitting[0]


def _batch_order(pairs, batch_size, shuffle, seed, group_by_length):
    rng = np.random.default_rng(seed)
    if group_by_length:
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), i))
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if shuffle:
            groups = [groups[g] for g in rng.permutation(len(groups))]
        return groups
    order = rng.permutation(len(pairs)).tolist() if shuffle else list(range(len(pairs)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _padded_batch(members, pairs, batch_size, buckets, pad_id):
    width = bucket_length(max(len(pairs[i][0]) for i in members), buckets)
    out = empty_rows(batch_size, width, pad_id)
    for r, i in enumerate(members):
        ids, labels = pairs[i]
        out["input_ids"][r, : len(ids)] = ids
        out["labels"][r, : len(ids)] = labels
        out["positions"][r, : len(ids)] = np.arange(len(ids), dtype=np.int32)
        out["segment_ids"][r, : len(ids)] = 1
    return out


def batches(examples, batch_size: int, buckets=None, pad_id: int = 0, *, drop_last=False,
            shuffle=False, seed=0, group_by_length=False):
    """Yield padded [batch_size, T] batches, T the smallest bucket that fits the batch.

    buckets: increasing lengths (default 256, 512, 1024, ... doubling) so that only a few shapes
    are ever compiled. A short final batch is filled with all-padding rows (no label tokens, so
    no effect on a token-mean loss) unless drop_last. group_by_length sorts samples by length
    before batching (less padding); shuffle then permutes the batches, else the samples.
    """
    _check_positive("batch_size", batch_size)
    pairs = _check_examples(examples)
    if buckets is not None:
        buckets = tuple(int(b) for b in buckets)
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive lengths, got {buckets}")
    groups = _batch_order(pairs, batch_size, shuffle, seed, group_by_length)
    if drop_last and len(groups[-1]) < batch_size:
        groups = groups[:-1]
    for members in groups:  # fail before yielding anything if a sample fits no bucket
        bucket_length(max(len(pairs[i][0]) for i in members), buckets)
    return (_padded_batch(m, pairs, batch_size, buckets, pad_id) for m in groups)
