"""Dataset row formats, normalised to a list of {"role", "content"} messages.

Formats and the columns they read:
  messages           messages: [{role, content}, ...]                (OpenAI / TRL conversational)
  sharegpt           conversations: [{from, value}, ...]             (human/gpt/system/...)
  alpaca             instruction, output, optional input, optional system
  prompt_completion  prompt, completion (strings, or lists of messages as in TRL)
  question_answer    question, answer                                (GSM8K and the like)
  text               text                                            (raw text, no roles)
"""

from __future__ import annotations

FORMAT_NAMES = ("messages", "sharegpt", "alpaca", "prompt_completion", "question_answer", "text")
_FORMAT_ALIASES = {"openai": "messages", "chat": "messages", "gsm8k": "question_answer",
                   "qa": "question_answer", "completion": "prompt_completion", "raw": "text"}

# Columns whose presence identifies a format, checked in this order.
_SIGNATURES = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("question_answer", ("question", "answer")),
    ("text", ("text",)),
)

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool",
}
_ROLES = ("system", "user", "assistant", "tool")


def canonical_format(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _FORMAT_ALIASES.get(key, key)
    if key not in FORMAT_NAMES:
        raise ValueError(f"unknown dataset format {name!r}; valid formats: {', '.join(FORMAT_NAMES)}")
    return key


def columns_of(dataset) -> list[str]:
    """Column names of a `datasets.Dataset` or of the first row of a list of dicts."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    first = dataset[0]
    if not isinstance(first, dict):
        raise TypeError(f"dataset rows must be dicts, got {type(first).__name__}")
    return list(first)


def detect_format(columns) -> str:
    """The format whose identifying columns are present, or a ValueError listing what is known."""
    present = set(columns)
    for name, needed in _SIGNATURES:
        if set(needed) <= present:
            return name
    known = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in _SIGNATURES)
    raise ValueError(
        f"cannot tell the dataset format from its columns {sorted(present)}; "
        f"expected one of ({known}), or pass format=NAME"
    )


def _require(row, fields, fmt, index):
    missing = [f for f in fields if not isinstance(row, dict) or row.get(f) is None]
    if missing:
        where = f"row {index}" if index is not None else "row"
        raise ValueError(
            f"{where} is missing field(s) {', '.join(repr(f) for f in missing)} needed by the "
            f"{fmt!r} format (row has: {_filled_fields(row)})"
        )


def _filled_fields(row) -> str:
    """The row's fields that hold a value (a column a dataset lacks in this row comes as None)."""
    if not isinstance(row, dict):
        return type(row).__name__
    return str(sorted(k for k, v in row.items() if v is not None))


def _text(value, field, index):
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # CSV readers turn answers such as "42" into numbers
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # Multimodal-style parts: keep the text ones.
        return "".join(p.get("text") or "" for p in value if p.get("type", "text") == "text")
    raise ValueError(f"row {index}: field {field!r} must be a string, got {type(value).__name__}")


def _message(role, content, index):
    if role not in _ROLES:
        raise ValueError(f"row {index}: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
    return {"role": role, "content": _text(content, "content", index)}


def _with_system(row, messages, index):
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        return [_message("system", system, index)] + messages
    return messages


def _from_messages(row, index):
    _require(row, ["messages"], "messages", index)
    return _message_list(row["messages"], "messages", index)


def _message_list(items, field, index):
    if not isinstance(items, list) or not items:
        raise ValueError(f"row {index}: field {field!r} must be a non-empty list of messages")
    out = []
    for turn, item in enumerate(items):
        if not isinstance(item, dict) or item.get("role") is None or item.get("content") is None:
            raise ValueError(
                f"row {index}: {field}[{turn}] is missing field(s) 'role'/'content' "
                f"needed by the 'messages' format (got {item!r:.120})"
            )
        out.append(_message(item["role"], item["content"], index))
    return out


def _from_sharegpt(row, index):
    _require(row, ["conversations"], "sharegpt", index)
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"row {index}: field 'conversations' must be a non-empty list")
    out = []
    for turn, item in enumerate(turns):
        if isinstance(item, dict) and "role" in item and "content" in item:
            out.append(_message(item["role"], item["content"], index))
            continue
        if not isinstance(item, dict) or item.get("from") is None or item.get("value") is None:
            raise ValueError(
                f"row {index}: conversations[{turn}] is missing field(s) 'from'/'value' "
                f"needed by the 'sharegpt' format (got {item!r:.120})"
            )
        speaker = str(item["from"]).lower()
        if speaker not in _SHAREGPT_ROLES:
            raise ValueError(
                f"row {index}: conversations[{turn}] has unknown speaker {item['from']!r}; "
                f"known: {', '.join(sorted(_SHAREGPT_ROLES))}"
            )
        out.append(_message(_SHAREGPT_ROLES[speaker], item["value"], index))
    return out


def _from_alpaca(row, index):
    _require(row, ["instruction", "output"], "alpaca", index)
    instruction = _text(row["instruction"], "instruction", index)
    extra = row.get("input")
    prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    messages = [_message("user", prompt, index), _message("assistant", row["output"], index)]
    return _with_system(row, messages, index)


def _from_prompt_completion(row, index):
    _require(row, ["prompt", "completion"], "prompt_completion", index)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # TRL's conversational prompt-completion
        head = _message_list(prompt, "prompt", index)
        tail = (_message_list(completion, "completion", index) if isinstance(completion, list)
                else [_message("assistant", completion, index)])
        return head + tail
    messages = [_message("user", prompt, index), _message("assistant", completion, index)]
    return _with_system(row, messages, index)


def _from_question_answer(row, index):
    _require(row, ["question", "answer"], "question_answer", index)
    messages = [_message("user", row["question"], index),
                _message("assistant", row["answer"], index)]
    return _with_system(row, messages, index)


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "question_answer": _from_question_answer,
}


def to_messages(row: dict, format: str, index: int | None = None) -> list[dict]:
    """One dataset row as a list of {"role", "content"} messages."""
    fmt = canonical_format(format)
    if fmt == "text":
        raise ValueError("the 'text' format has no roles; use jft.data.chunk_text for raw text")
    return _CONVERTERS[fmt](row, index)


def to_conversations(dataset, format: str | None = None) -> list[list[dict]]:
    """Every row of a dataset (a `datasets.Dataset` or a list of dicts) as messages."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    fmt = canonical_format(format) if format else detect_format(columns_of(dataset))
    return [to_messages(row, fmt, index) for index, row in enumerate(dataset)]


def texts_of(dataset, field: str = "text") -> list[str]:
    """The raw-text column of a dataset, checked row by row."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    out = []
    for index, row in enumerate(dataset):
        _require(row, [field], "text", index)
        out.append(_text(row[field], field, index))
    return out
