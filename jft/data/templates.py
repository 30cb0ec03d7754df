"""Named chat templates for base models, and rendering through the tokenizer.

Every template is plain Jinja for `tokenizer.apply_chat_template`, written from the documented
prompt format of its model family. They are deliberately free of `{% generation %}` tags so they
stay portable to other runtimes (llama.cpp, Ollama, vLLM); `jft.data.tokenize` finds the assistant
spans by rendering conversation prefixes instead.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    jinja: str
    end_of_turn: str  # the marker that closes an assistant turn ("eos" means the tokenizer's eos)
    markers: tuple[str, ...]  # literal control strings the format uses


# Shared Jinja fragments. Output goes only through {{- -}} so that template layout adds no text.
_BOS = "{{- bos_token if bos_token is defined and bos_token else '' -}}"
_EOS = "(eos_token if eos_token is defined and eos_token else '')"
_SPLIT_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
)
_ALTERNATION_CHECK = (
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('{family}: after an optional system message, roles must alternate "
    "user/assistant/user/...') -}}{%- endif -%}"
)

_CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA3_TURNS = (
    "{%- for message in turns -%}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_LLAMA3 = _BOS + "{%- set turns = messages -%}" + _LLAMA3_TURNS

# Llama 3.1 always opens with a system header carrying the knowledge cutoff and the date.
_LLAMA31 = (
    _BOS
    + _SPLIT_SYSTEM
    + "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' -}}"
    "{{- 'Today Date: ' + (date_string if date_string is defined else '26 Jul 2024') + '\\n\\n' -}}"
    "{{- system | trim + '<|eot_id|>' -}}"
    + _LLAMA3_TURNS
)

# Mistral instruct has no system role: the system text is folded into the first user turn.
_MISTRAL = (
    _BOS
    + _SPLIT_SYSTEM
    + "{%- for message in turns -%}"
    + _ALTERNATION_CHECK.replace("{family}", "mistral")
    + "{%- if message['role'] == 'user' -%}"
    "{%- set text = system + '\\n\\n' + message['content'] if loop.first and system"
    " else message['content'] -%}"
    "{{- '[INST] ' + text + ' [/INST]' -}}"
    "{%- else -%}{{- message['content'] + " + _EOS + " -}}{%- endif -%}"
    "{%- endfor -%}"
)


def _gemma(content_expr: str) -> str:
    """Gemma turns; the system text is folded into the first user turn, as Gemma 3 does."""
    return (
        _BOS
        + _SPLIT_SYSTEM
        + "{%- for message in turns -%}"
        + _ALTERNATION_CHECK.replace("{family}", "gemma")
        + "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        + "{%- set content = " + content_expr + " -%}"
        "{%- set content = system + '\\n\\n' + content if loop.first and system else content -%}"
        "{{- '<start_of_turn>' + role + '\\n' + content | trim + '<end_of_turn>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
    )


_GEMMA = _gemma("message['content']")
# Gemma 3 messages may carry a list of typed parts; only the text parts are rendered here.
_GEMMA3 = _gemma(
    "message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')"
)

_QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_QWEN25 = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + _QWEN25_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}" + _CHATML
)

# Qwen 3: reasoning lives in <think>...</think>. Assistant turns before the last user query lose
# their reasoning; later turns show it, and the final turn always carries a (possibly empty) block.
_QWEN3 = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string"
    " else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}{{- content -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

_PHI3 = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}"
    "{%- else -%}{{- " + _EOS + " -}}{%- endif -%}"
)

_PHI4 = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant<|im_sep|>' -}}{%- endif -%}"
)

_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_ALPACA = (
    _BOS
    + _SPLIT_SYSTEM
    + "{{- (system if system else '" + _ALPACA_SYSTEM + "') + '\\n\\n' -}}"
    "{%- for message in turns -%}"
    + _ALTERNATION_CHECK.replace("{family}", "alpaca")
    + "{%- if message['role'] == 'user' -%}"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
    "{%- else -%}{{- '### Response:\\n' + message['content'] + " + _EOS + " + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

_ZEPHYR = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + " + _EOS + " + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Vicuna v1.1: "SYSTEM USER: ... ASSISTANT: ...</s>USER: ...". The generation prompt ends at the
# colon, so the space before the answer belongs to the answer, as in FastChat.
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
_VICUNA = (
    _BOS
    + _SPLIT_SYSTEM
    + '{{- (system if system else "' + _VICUNA_SYSTEM + '") + " " -}}'
    "{%- for message in turns -%}"
    + _ALTERNATION_CHECK.replace("{family}", "vicuna")
    + "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + message['content'] + " + _EOS + " -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

_CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
_LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_GEMMA_MARKERS = ("<start_of_turn>", "<end_of_turn>")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("chatml", _CHATML, "<|im_end|>", _CHATML_MARKERS),
        Template("llama-3", _LLAMA3, "<|eot_id|>", _LLAMA3_MARKERS),
        Template("llama-3.1", _LLAMA31, "<|eot_id|>", _LLAMA3_MARKERS),
        Template("mistral", _MISTRAL, "eos", ("[INST]", "[/INST]")),
        Template("gemma", _GEMMA, "<end_of_turn>", _GEMMA_MARKERS),
        Template("gemma2", _GEMMA, "<end_of_turn>", _GEMMA_MARKERS),
        Template("gemma-3", _GEMMA3, "<end_of_turn>", _GEMMA_MARKERS),
        Template("qwen-2.5", _QWEN25, "<|im_end|>", _CHATML_MARKERS),
        Template("qwen-3", _QWEN3, "<|im_end|>", _CHATML_MARKERS),
        Template("phi-3", _PHI3, "<|end|>", ("<|user|>", "<|assistant|>", "<|end|>")),
        Template("phi-4", _PHI4, "<|im_end|>", _CHATML_MARKERS + ("<|im_sep|>",)),
        Template("alpaca", _ALPACA, "eos", ("### Instruction:", "### Response:")),
        Template("zephyr", _ZEPHYR, "eos", ("<|user|>", "<|assistant|>")),
        Template("vicuna", _VICUNA, "eos", ("USER:", "ASSISTANT:")),
    )
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)

_ALIASES = {
    "llama3": "llama-3", "llama-3-instruct": "llama-3", "llama3.1": "llama-3.1",
    "llama-31": "llama-3.1", "gemma-2": "gemma2", "gemma2": "gemma2", "gemma-1": "gemma",
    "gemma3": "gemma-3", "qwen2.5": "qwen-2.5", "qwen-25": "qwen-2.5", "qwen2": "qwen-2.5",
    "qwen3": "qwen-3", "phi3": "phi-3", "phi4": "phi-4", "vicuna-1.1": "vicuna",
}


def _canonical_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def template_info(name: str) -> Template:
    """The registered `Template` for a name (aliases such as 'llama3' or 'qwen2.5' accepted)."""
    if not isinstance(name, str):
        raise TypeError(f"template name must be a string, got {type(name).__name__}")
    key = _canonical_name(name)
    if key not in TEMPLATES:
        raise ValueError(
            f"unknown chat template {name!r}; valid names: {', '.join(TEMPLATE_NAMES)}"
        )
    return TEMPLATES[key]


def get_template(name: str) -> str:
    """The Jinja source of a named chat template."""
    return template_info(name).jinja


def _looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def resolve_template(tokenizer, template: str | None = None) -> str:
    """The Jinja to render with: `template` (a name or Jinja source), else the tokenizer's own."""
    if template is not None:
        return template if _looks_like_jinja(template) else get_template(template)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # tokenizers that store several named templates
        own = own.get("default")
    if not own:
        raise ValueError(
            "the tokenizer has no chat_template; pass template=NAME or call "
            f"jft.data.apply_template(tokenizer, NAME) with one of: {', '.join(TEMPLATE_NAMES)}"
        )
    return own


def _missing_markers(tokenizer, markers: tuple[str, ...]) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [m for m in markers if m.startswith("<") and m not in vocab]


def apply_template(tokenizer, name: str):
    """Set a named template (or Jinja source) as `tokenizer.chat_template`; returns the tokenizer.

    Warns when the family's control markers are not single tokens in the vocabulary: they will
    then be tokenised as ordinary text, which works but costs tokens and is not what the family's
    own checkpoints saw.
    """
    if _looks_like_jinja(name):
        tokenizer.chat_template = name
        return tokenizer
    info = template_info(name)
    tokenizer.chat_template = info.jinja
    missing = _missing_markers(tokenizer, info.markers)
    if missing:
        warnings.warn(
            f"chat template {info.name!r}: markers {missing} are not tokens of this tokenizer's "
            "vocabulary and will be split into ordinary text tokens",
            stacklevel=2,
        )
    return tokenizer


def end_of_turn(name: str, tokenizer=None) -> str:
    """The string that closes an assistant turn in a named template (its stop string)."""
    marker = template_info(name).end_of_turn
    if marker != "eos":
        return marker
    if tokenizer is None or not tokenizer.eos_token:
        raise ValueError(f"template {name!r} ends turns with the eos token; pass the tokenizer")
    return tokenizer.eos_token


def render(messages, tokenizer, template: str | None = None, add_generation_prompt=False, **kw):
    """The conversation as text, exactly as `tokenizer.apply_chat_template(tokenize=False)`."""
    return tokenizer.apply_chat_template(
        list(messages),
        chat_template=resolve_template(tokenizer, template),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kw,
    )


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_tags(jinja: str) -> bool:
    return bool(_GENERATION_TAG.search(jinja))
