"""Reward functions: plain callables `(prompts, completions, **dataset_columns) -> list[float]` (TRL's
convention), their weighted combination, and built-ins for GSM8K-style reasoning tasks.

A completion is a string, or (for chat-message prompts) a list holding one assistant message; a
reward function may return None for a completion it does not judge (it is then left out of that
function's mean and counts 0 in the weighted sum).
"""

from __future__ import annotations

import functools
import re

import numpy as np

GSM8K_SYSTEM_PROMPT = (
    "Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n"
    "<answer>\n...\n</answer>"
)

_LAYOUT = re.compile(r"^\s*<reasoning>.+?</reasoning>\s*<answer>.+?</answer>\s*$", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of a [{"role": "assistant", ...}] list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def parse_number(text: str) -> float | None:
    """The last number in `text` ("1,234", "-3.5", "$12"), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def gsm8k_reference(answer: str) -> float | None:
    """The number after GSM8K's '#### ' marker (the whole string when it has none)."""
    tail = answer.split("####")[-1] if "####" in answer else answer
    return parse_number(tail)


def extract_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer> block, or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def gsm8k_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion is exactly a <reasoning>...</reasoning> block then an <answer>...</answer> block."""
    return [1.0 if _LAYOUT.match(completion_text(c)) else 0.0 for c in completions]


def gsm8k_answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the number in the <answer> block equals the reference ('#### N' in the `answer` column)."""
    out = []
    for c, ref in zip(completions, answer):
        target = gsm8k_reference(str(ref))
        given = extract_answer(completion_text(c))
        value = parse_number(given) if given is not None else None
        out.append(1.0 if target is not None and value is not None and abs(value - target) < 1e-6 else 0.0)
    return out


def gsm8k_prompts(rows, system_prompt: str = GSM8K_SYSTEM_PROMPT) -> list[dict]:
    """GSM8K rows {"question", "answer"} -> GRPO rows {"prompt": [system, user], "answer"}."""
    out = []
    for r in rows:
        if "question" not in r or "answer" not in r:
            raise ValueError(f"a GSM8K row needs 'question' and 'answer', got {sorted(r)}")
        out.append({"prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": r["question"]}],
                    "answer": r["answer"]})
    return out


BUILTIN = {"gsm8k": (gsm8k_format_reward, gsm8k_answer_reward),
           "gsm8k_format": (gsm8k_format_reward,), "gsm8k_answer": (gsm8k_answer_reward,)}


def reward_name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def compute_rewards(reward_fns, weights, prompts, completions, completion_ids, columns: dict):
    """Calls every reward function; returns (weighted sum [B], per-function rewards [F, B] with NaN for None)."""
    b = len(completions)
    per_fn = np.full((len(reward_fns), b), np.nan, np.float32)
    for i, fn in enumerate(reward_fns):
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        values = list(values)
        if len(values) != b:
            raise ValueError(f"reward function {reward_name(fn)} returned {len(values)} rewards for {b} completions")
        per_fn[i] = [np.nan if v is None else float(v) for v in values]
    weighted = np.asarray(weights, np.float32)[:, None] * per_fn
    total = np.where(np.isnan(per_fn), 0.0, weighted).sum(axis=0)
    return total.astype(np.float32), per_fn
