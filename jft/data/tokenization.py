"""Conversations to token ids with train-on-responses-only labels.

Label convention (shared with jft.train): `labels` is a copy of `input_ids` in which every token
that must not be learned is IGNORE_INDEX (-100). Labels are NOT shifted: labels[t] belongs to the
token at t, and the loss shifts by one (logits[t] predicts labels[t + 1]), as transformers does.

With `responses_only=True` the labelled tokens of each assistant turn are its content plus the
template's end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...), so the model learns to
stop; whitespace the template writes after that marker is not labelled. Everything else (system,
user, tool turns, role headers, the generation prompt) is -100.

Assistant spans are found without knowing the template. For templates with `{% generation %}`
tags the spans come from `apply_chat_template(return_assistant_tokens_mask=True)`. Otherwise, for
assistant message i, the turn starts where the rendering of messages[:i] with the generation
prompt ends, and it ends where the rendering of messages[:i+1] stops agreeing with the full
conversation. Templates that render history differently from the last turn (Qwen 3 drops past
reasoning) fall back to locating the turn's content in the text.
"""

from __future__ import annotations

import warnings

import numpy as np

from .templates import has_generation_tags, render, resolve_template

IGNORE_INDEX = -100
TRUNCATION_MODES = ("warn", "error")


def _common_prefix_length(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    lo, hi = 0, limit
    # Binary search on equal prefixes: O(log n) slice comparisons, fast for long conversations.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _content_key(content: str) -> str:
    """The part of an assistant message a template is sure to write verbatim."""
    return content.split("</think>")[-1].strip() if "</think>" in content else content.strip()


def _locate_turn(full, message, prompt, turn, search_from):
    """(start, end) characters of one assistant turn inside the full rendering."""
    key = _content_key(message["content"])
    start = len(prompt) if prompt and full.startswith(prompt) else -1
    if start < 0:
        found = full.find(key, max(search_from, _common_prefix_length(prompt, full)))
        if found < 0:
            return None
        start = found
    end = _common_prefix_length(turn, full)
    if end > start and key in full[start:end]:
        return start, end
    found = full.find(key, start)
    if found < 0:
        return None
    end = found + len(key)
    # Extend over what the template writes after the content (the end-of-turn marker).
    tail = turn[turn.rfind(key) + len(key):] if key else turn[len(prompt):]
    end += _common_prefix_length(tail, full[end:])
    return start, end


def _back_out_of_token(text: str, start: int, end: int, added_tokens) -> int:
    """Move `end` to the start of an added token (e.g. <|user|>) it would cut in two.

    Two renderings can agree on a few characters of different control tokens ("<|" of
    "<|user|>" and of "<|endoftext|>"), which must not pull the next token into the span.
    """
    for token in added_tokens:
        first = text.find(token, max(start, end - len(token) + 1), end + len(token) - 1)
        if 0 <= first < end < first + len(token):
            return first
    return end


def _strip_trailing_space(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def assistant_char_spans(messages, tokenizer, template: str | None = None):
    """The full rendering and the [start, end) character span of every assistant turn."""
    jinja = resolve_template(tokenizer, template)
    full = render(messages, tokenizer, jinja)
    added_tokens = [t for t in tokenizer.get_added_vocab() if len(t) > 1 and t in full]
    spans, search_from = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenizer, jinja, add_generation_prompt=True) if i else ""
        turn = render(messages[: i + 1], tokenizer, jinja)
        located = _locate_turn(full, message, prompt, turn, search_from)
        if located is None:
            raise ValueError(
                f"could not find assistant message {i} in the rendered conversation; the chat "
                "template rewrites assistant content (render it with jft.data.render to inspect)"
            )
        start, end = located
        end = _back_out_of_token(full, start, end, added_tokens)
        end = _strip_trailing_space(full, start, end)
        if end > start:
            spans.append((start, end))
        search_from = end
    return full, spans


def _labels_from_spans(input_ids, offsets, spans) -> np.ndarray:
    """-100 except on tokens overlapping a character span (as transformers' assistant mask)."""
    ids = np.asarray(input_ids, dtype=np.int32)
    labels = np.full_like(ids, IGNORE_INDEX)
    if not spans or len(ids) == 0:
        return labels
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    real = offsets[:, 1] > offsets[:, 0]
    for start, end in spans:
        overlapping = np.nonzero(real & (offsets[:, 1] > start) & (offsets[:, 0] < end))[0]
        if len(overlapping):
            first, last = overlapping[0], overlapping[-1]
            labels[first : last + 1] = ids[first : last + 1]
    return labels


def _check_truncation_mode(truncation):
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")


def _fit(example, max_seq_length, truncation, where):
    """Cut an example to max_seq_length; returns (example, was_truncated)."""
    n = len(example["input_ids"])
    if n <= max_seq_length:
        return example, False
    if truncation == "error":
        raise ValueError(
            f"{where} has {n} tokens, more than max_seq_length={max_seq_length} "
            "(use truncation='warn' to cut it instead)"
        )
    return {k: v[:max_seq_length] for k, v in example.items()}, True


def _check_max_len(max_seq_length):
    if not isinstance(max_seq_length, (int, np.integer)) or max_seq_length < 1:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")


def _encode_texts(tokenizer, texts):
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "jft.data needs a fast (Rust `tokenizers`) tokenizer for character offsets; got "
            f"{type(tokenizer).__name__}"
        )
    return tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)


def _tokenize_with_generation_tags(conversations, tokenizer, jinja, responses_only, first_index):
    out = []
    for offset, messages in enumerate(conversations):
        try:
            enc = tokenizer.apply_chat_template(
                messages, chat_template=jinja, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True,
            )
        except Exception as err:
            raise ValueError(f"row {first_index + offset}: {err}") from err
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        mask = np.asarray(enc["assistant_masks"], dtype=bool)
        labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32) if responses_only else ids.copy()
        out.append({"input_ids": ids, "labels": labels})
    return out


def _tokenize_by_prefixes(conversations, tokenizer, jinja, responses_only, first_index):
    texts, all_spans = [], []
    for offset, messages in enumerate(conversations):
        try:
            if responses_only:
                text, spans = assistant_char_spans(messages, tokenizer, jinja)
            else:
                text, spans = render(messages, tokenizer, jinja), []
        except Exception as err:
            raise ValueError(f"row {first_index + offset}: {err}") from err
        texts.append(text)
        all_spans.append(spans)
    encoded = _encode_texts(tokenizer, texts)
    out = []
    for ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans):
        ids = np.asarray(ids, dtype=np.int32)
        labels = _labels_from_spans(ids, offsets, spans) if responses_only else ids.copy()
        out.append({"input_ids": ids, "labels": labels})
    return out


def _validate_messages(messages, where):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: a conversation must be a non-empty list of messages")
    for turn, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {turn} needs 'role' and 'content', got {m!r:.120}")


def tokenize_many(conversations, tokenizer, max_seq_length, *, responses_only=True,
                  truncation="warn", template=None, batch_size=512):
    """Tokenise many conversations; warns once with the count of truncated ones."""
    _check_max_len(max_seq_length)
    _check_truncation_mode(truncation)
    conversations = list(conversations)
    for index, messages in enumerate(conversations):
        _validate_messages(messages, f"row {index}")
    jinja = resolve_template(tokenizer, template)
    out, truncated = [], []
    for first in range(0, len(conversations), batch_size):
        chunk = conversations[first : first + batch_size]
        if has_generation_tags(jinja):
            examples = _tokenize_with_generation_tags(chunk, tokenizer, jinja, responses_only, first)
        else:
            examples = _tokenize_by_prefixes(chunk, tokenizer, jinja, responses_only, first)
        for offset, example in enumerate(examples):
            example, cut = _fit(example, max_seq_length, truncation, f"row {first + offset}")
            if cut:
                truncated.append(first + offset)
            out.append(example)
    if truncated:
        warnings.warn(
            f"{len(truncated)} sequence(s) longer than max_seq_length={max_seq_length} were "
            f"truncated (rows {truncated[:5]}{' ...' if len(truncated) > 5 else ''})",
            stacklevel=2,
        )
    return out


def tokenize(messages, tokenizer, max_seq_length, responses_only=True, truncation="warn",
             template=None) -> dict:
    """One conversation -> {"input_ids", "labels"} int32 arrays of equal length.

    `template`: a named template or Jinja source; default the tokenizer's own chat_template.
    Longer than max_seq_length: cut with a warning (truncation="warn") or raise ("error").
    """
    _validate_messages(messages, "conversation")
    [example] = tokenize_many([messages], tokenizer, max_seq_length, responses_only=responses_only,
                              truncation=truncation, template=template)
    return example


def chunk_text(texts, tokenizer, max_len, stride=0) -> list[dict]:
    """Raw text documents -> windows of at most `max_len` tokens, every token labelled once.

    Each document is encoded with the tokenizer's own special tokens (bos if it adds one) and
    closed with eos. Consecutive windows overlap by `stride` tokens (as the tokenizers'
    `stride`); overlapping tokens serve as context and are -100 in the later window.
    """
    _check_max_len(max_len)
    if not 0 <= stride < max_len:
        raise ValueError(f"stride must satisfy 0 <= stride < max_len={max_len}, got {stride}")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to chunk")
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    out = []
    for ids in encoded:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.extend(_windows(np.asarray(ids, dtype=np.int32), max_len, stride))
    return out


def _windows(ids, max_len, stride):
    step, start, out = max_len - stride, 0, []
    while True:
        window = ids[start : start + max_len]
        labels = window.copy()
        if start > 0:
            labels[:stride] = IGNORE_INDEX
        out.append({"input_ids": window, "labels": labels})
        if start + max_len >= len(ids):
            return out
        start += step
