"""A tiny byte-level BPE tokenizer built locally (no network, no torch), and tiny sum problems with a
digit-counting reward: the data of tests and functional checks."""

from __future__ import annotations

import os
import shutil
import tempfile

from .templates import TEMPLATES, apply_template, template_info

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# Every control marker of the named templates is a single special token, so any of them renders
# compactly; the reserved set is fixed so ids do not depend on the chosen template.
_TEMPLATE_MARKERS = sorted({m for t in TEMPLATES.values() for m in t.markers if m.startswith(("<", "["))})
SPECIAL_TOKENS = tuple(
    dict.fromkeys([PAD, BOS, EOS, UNK, "<|begin_of_text|>", "<|endoftext|>", *_TEMPLATE_MARKERS,
                   "<|system|>", "<think>", "</think>"])
)

_WORDS = (
    "the a an of to and in is was for on with as by at from that this it he she they we you "
    "how many much what which who when where why does did do has have had will would can could "
    "there their then than more less each every total left after before per times half twice "
    "apples books coins dollars hours minutes days weeks miles cookies students friends pages "
    "buys sells gives eats reads earns pays spends makes needs has gets saves shares costs "
    "answer question problem step first second third next finally so therefore because "
    "user assistant system instruction response input output hello thanks please sure yes no"
).split()


def _builtin_corpus(lines: int = 600) -> list[str]:
    """Deterministic English-and-arithmetic sentences, enough for a small BPE to learn from."""
    out = []
    for i in range(lines):
        a, b = (7 * i + 3) % 97, (13 * i + 5) % 89
        words = " ".join(_WORDS[(i * k + 11) % len(_WORDS)] for k in range(1, 9))
        out.append(f"{words.capitalize()}? {a} + {b} = {a + b}. {a} * {b} = {a * b}.\n"
                   f"#### {a - b} ({i}) {words.upper()}!")
    return out


def _end_of_turn_token(template_name):
    """The named template's end-of-turn marker, used as eos so generation stops there."""
    if template_name is None or "{" in template_name:
        return EOS
    marker = template_info(template_name).end_of_turn
    return marker if marker in SPECIAL_TOKENS else EOS


def _train_bpe(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _save_atomically(tokenizer, path):
    os.makedirs(path, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tokenizer-", dir=path)
    try:
        tokenizer.save_pretrained(staging)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_tiny_tokenizer(path=None, vocab_size: int = 512, chat_template: str | None = "chatml",
                        texts=None):
    """Train a byte-level BPE and wrap it as a transformers fast tokenizer.

    `chat_template`: a named template (see jft.data.TEMPLATE_NAMES), Jinja source, or None.
    Special tokens: bos "<s>", pad "<pad>", unk "<unk>", and every named template's markers
    (<|im_start|>, <|eot_id|>, <start_of_turn>, ...). eos is the named template's end-of-turn
    token when it has one (chatml: <|im_end|>, llama-3: <|eot_id|>), else "</s>", so that
    generation stops at the end of an assistant turn.
    `texts`: training text (default: a built-in synthetic corpus). `path`: also save there.
    """
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + special tokens)")
    texts = list(texts) if texts is not None else _builtin_corpus()
    if not texts:
        raise ValueError("texts is empty")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(texts, vocab_size),
        bos_token=BOS,
        eos_token=_end_of_turn_token(chat_template),
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD, UNK)],
    )
    if chat_template is not None:
        apply_template(tokenizer, chat_template)
    if path is not None:
        _save_atomically(tokenizer, os.fspath(path))
    return tokenizer


def sum_questions(n: int = 8) -> list[dict]:
    """{"question": "What is a plus b?", "answer": "#### a+b"} for a, b < n: tiny SFT rows."""
    return [{"question": f"What is {a} plus {b}?", "answer": f"#### {a + b}"} for a in range(n) for b in range(n)]


def sum_prompts(n: int = 8) -> list[dict]:
    """{"prompt": "a+b="} for a, b < n: tiny GRPO prompts."""
    return [{"prompt": f"{a}+{b}="} for a in range(n) for b in range(n)]


def digit_count_reward(prompts, completions, **kw) -> list[float]:
    """A GRPO reward for checks: the number of digits in each completion."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]
