"""Image+text chat data -> training batches for the vision-language model.

An example is {"messages": [...]} (or the message list itself). A message's content is a string or a
list of items {"type": "image", "image": <path | bytes | PIL | {"bytes"/"path"}>} and
{"type": "text", "text": ...}. The chat template renders each image as
<|vision_start|><|image_pad|><|vision_end|>; the single <|image_pad|> is then expanded to one token
per merged patch of that image. Labels cover assistant text only (through the end-of-turn token);
image tokens are never labelled. Images of different sizes are concatenated as patches; the patch
count is padded to a bucket so a run compiles a handful of shapes.
"""

from __future__ import annotations

import numpy as np

from jft.nn.generate import bucket
from jft.vlm.model import VisionInputError, make_batch
from jft.vlm.processor import ImageProcessor

IGNORE = -100
IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

# Qwen-VL's chatml layout, for tokenizers that come without a chat template (tiny test models).
QWEN_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def _messages_of(example) -> list[dict]:
    messages = example.get("messages", example.get("conversations")) if isinstance(example, dict) else example
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"an example must be a non-empty list of messages or a dict with 'messages'; got "
                         f"{type(example).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'; got {m!r:.80}")
    return messages


def _images_of(messages) -> list:
    return [item.get("image", item.get("path")) for m in messages if isinstance(m["content"], list)
            for item in m["content"] if isinstance(item, dict) and item.get("type") == "image"]


def _template_view(messages) -> list[dict]:
    """Messages as the chat template sees them: image items without their (possibly large) payload."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if isinstance(it, dict) and it.get("type") == "image" else it for it in content]
        out.append({**m, "content": content})
    return out


class VisionCollator:
    """Callable: a list of examples -> a training batch (numpy arrays) for `jft.vlm.train`.

    model: a `VLModel` (its tokenizer, image processor and config are used). responses_only: labels
    only on assistant turns (else on every non-image token). max_seq_length: longer examples lose text
    at the end; an example whose image tokens would be cut raises.
    """

    def __init__(self, model, processor: ImageProcessor | None = None, *, max_seq_length: int | None = None,
                 responses_only: bool = True, patch_bucket: int = 256):
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; load it with tokenizer=True")
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.processor = processor or model.image_processor or ImageProcessor.from_vision_config(model.config.vision)
        self.max_seq_length = max_seq_length
        self.responses_only = responses_only
        self.patch_bucket = patch_bucket
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if image_id != self.config.image_token_id:
            raise ValueError(f"the tokenizer's {IMAGE_PAD} is id {image_id} but the model's image_token_id is "
                             f"{self.config.image_token_id}")

    # --- rendering -------------------------------------------------------------------------------

    def _render(self, messages, add_generation_prompt=False) -> str:
        template = self.tokenizer.chat_template or QWEN_VL_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(_template_view(messages), chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @staticmethod
    def _expand(text: str, counts: list[int]) -> str:
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 > len(counts):
            raise VisionInputError(f"the rendered chat has {len(parts) - 1} image placeholders but only {len(counts)} "
                                   "images were given")
        return "".join(p + (IMAGE_PAD * counts[i] if i < len(parts) - 1 else "") for i, p in enumerate(parts))

    def _assistant_spans(self, messages, counts) -> list[tuple[int, int]]:
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self._expand(self._render(messages[:i], add_generation_prompt=True), counts))
            end = len(self._expand(self._render(messages[: i + 1]), counts))
            spans.append((start, end))
        return spans

    # --- encoding --------------------------------------------------------------------------------

    def _images(self, messages):
        images = _images_of(messages)
        if not images:
            return None, []
        processed = self.processor(images)
        counts = [self.processor.num_image_tokens(g) for g in processed["image_grid_thw"]]
        return processed, counts

    def encode(self, example, add_generation_prompt: bool = False) -> dict:
        """One example -> {"input_ids", "labels" (lists), "pixel_values", "image_grid_thw" (or None)}."""
        messages = _messages_of(example)
        processed, counts = self._images(messages)
        text = self._render(messages, add_generation_prompt)
        n_placeholders = text.count(IMAGE_PAD)
        if n_placeholders != len(counts):
            raise VisionInputError(f"the rendered chat has {n_placeholders} image placeholders but the messages hold "
                                   f"{len(counts)} images")
        full = self._expand(text, counts)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int64)
        if int(np.sum(ids == self.config.image_token_id)) != sum(counts):
            raise VisionInputError("tokenizing the expanded image placeholders did not give one image token each; "
                                   f"is {IMAGE_PAD} a special token of this tokenizer?")
        labels = np.full_like(ids, IGNORE)
        if self.responses_only:
            offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
            for start, end in self._assistant_spans(messages, counts):
                end = len(full[:end].rstrip())
                inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
                labels[inside] = ids[inside]
        else:
            labels = ids.copy()
        labels[ids == self.config.image_token_id] = IGNORE
        if self.max_seq_length is not None and len(ids) > self.max_seq_length:
            if np.any(ids[self.max_seq_length:] == self.config.image_token_id):
                raise VisionInputError(f"an example of {len(ids)} tokens has image tokens beyond max_seq_length="
                                       f"{self.max_seq_length}; raise max_seq_length or lower the image max_pixels")
            ids, labels = ids[: self.max_seq_length], labels[: self.max_seq_length]
        return {"input_ids": ids.tolist(), "labels": labels.tolist(),
                "pixel_values": None if processed is None else processed["pixel_values"],
                "image_grid_thw": None if processed is None else processed["image_grid_thw"]}

    def prompts(self, conversations) -> dict:
        """Generation prompts: {"input_ids": [lists], "pixel_values", "image_grid_thw"} for `jft.vlm.generate`."""
        encoded = [self.encode(c, add_generation_prompt=True) for c in conversations]
        return {"input_ids": [e["input_ids"] for e in encoded], **_stack_images(encoded)}

    def __call__(self, examples, seq_len: int | None = None) -> dict:
        """Right-padded batch: input_ids, labels, positions, segment_ids, rope_positions, pixel patches + metadata."""
        if not examples:
            raise ValueError("an empty list of examples")
        return self.collate_encoded([self.encode(e) for e in examples], seq_len)

    def collate_encoded(self, encoded: list[dict], seq_len: int | None = None) -> dict:
        """Batches examples already passed through `encode`."""
        longest = max(len(e["input_ids"]) for e in encoded)
        seq_len = seq_len or bucket(longest)
        if longest > seq_len:
            raise ValueError(f"an example has {longest} tokens, more than seq_len={seq_len}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((len(encoded), seq_len), pad, np.int32)
        labels = np.full((len(encoded), seq_len), IGNORE, np.int32)
        mask = np.zeros((len(encoded), seq_len), np.int32)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = e["input_ids"], e["labels"], 1
        images = _stack_images(encoded)
        pad_to = None
        if images["pixel_values"] is not None:
            n = images["pixel_values"].shape[0]
            pad_to = -(-n // self.patch_bucket) * self.patch_bucket
        batch = make_batch(self.config, ids, mask, images["pixel_values"], images["image_grid_thw"], pad_patches_to=pad_to)
        batch["labels"] = labels
        batch.pop("rope_deltas")
        return batch


def _stack_images(encoded) -> dict:
    with_images = [e for e in encoded if e["pixel_values"] is not None]
    if not with_images:
        return {"pixel_values": None, "image_grid_thw": None}
    return {"pixel_values": np.concatenate([e["pixel_values"] for e in with_images]),
            "image_grid_thw": np.concatenate([e["image_grid_thw"] for e in with_images])}
