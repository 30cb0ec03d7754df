"""From a loaded dataset to tokenised training examples in one call."""

from __future__ import annotations

import warnings

import numpy as np

from .formats import canonical_format, columns_of, detect_format, texts_of, to_messages
from .tokenization import IGNORE_INDEX, chunk_text, tokenize_many


def _drop_unlabelled(examples):
    kept = [e for e in examples if np.any(e["labels"] != IGNORE_INDEX)]
    if len(kept) < len(examples):
        warnings.warn(
            f"dropped {len(examples) - len(kept)} example(s) with no label tokens (no assistant "
            "turn, or every assistant token was truncated away)",
            stacklevel=3,
        )
    if not kept:
        raise ValueError("no example has any label token left to train on")
    return kept


def prepare(dataset, tokenizer, max_seq_length: int, *, format: str | None = None,
            template: str | None = None, responses_only: bool = True, truncation: str = "warn",
            stride: int = 0) -> list[dict]:
    """A dataset (`datasets.Dataset` or list of dicts) -> list of {"input_ids", "labels"}.

    The format is detected from the columns unless named. Chat formats are rendered with
    `template` (a name or Jinja; default the tokenizer's own) and labelled responses-only if
    asked; the "text" format is chunked into max_seq_length windows overlapping by `stride`.
    Examples left without any label token are dropped with a warning.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    fmt = canonical_format(format) if format else detect_format(columns_of(dataset))
    if fmt == "text":
        return _drop_unlabelled(chunk_text(texts_of(dataset), tokenizer, max_seq_length, stride))
    conversations = [to_messages(row, fmt, index) for index, row in enumerate(dataset)]
    examples = tokenize_many(conversations, tokenizer, max_seq_length,
                             responses_only=responses_only, truncation=truncation,
                             template=template)
    return _drop_unlabelled(examples)
