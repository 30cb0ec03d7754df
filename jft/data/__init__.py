"""jft.data: load datasets, normalise formats to messages, chat templates, responses-only labels,
packing and bucketed batches. See docs/data.md."""

from .formats import FORMAT_NAMES, detect_format, to_conversations, to_messages
from .loading import load
from .packing import batches, bucket_length, pack
from .pipeline import prepare
from .templates import (
    TEMPLATE_NAMES,
    apply_template,
    end_of_turn,
    get_template,
    render,
    template_info,
)
from .tokenization import IGNORE_INDEX, assistant_char_spans, chunk_text, tokenize, tokenize_many

__all__ = [
    "FORMAT_NAMES", "IGNORE_INDEX", "TEMPLATE_NAMES", "apply_template", "assistant_char_spans",
    "batches", "bucket_length", "chunk_text", "detect_format", "end_of_turn", "get_template",
    "load", "pack", "prepare", "render", "template_info", "to_conversations", "to_messages",
    "tokenize", "tokenize_many",
]
