"""The vision-language model handle and its loader."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax.numpy as jnp

from jft.config import read_json
from jft.convert.vlm import load_vlm_params
from jft.model import _load_tokenizer, resolve_path
from jft.vlm.config import VLMConfig, load_vlm_config
from jft.vlm.processor import ImageProcessor


@dataclasses.dataclass
class VLModel:
    """A loaded Qwen2-VL / Qwen2.5-VL: config, params (text layout + "vision"), tokenizer, image processor."""

    config: VLMConfig
    params: dict
    tokenizer: Any = None
    image_processor: ImageProcessor | None = None
    path: str | None = None
    hf_config: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        c = self.config
        return (f"VLModel({c.model_type}, layers={c.text.num_layers}, hidden={c.text.hidden_size}, "
                f"vision_depth={c.vision.depth}, path={self.path!r})")


def load(path_or_id, *, dtype="bfloat16", quantize: str | None = None, tokenizer: bool = True,
         progress: bool = True) -> VLModel:
    """Loads a Qwen2-VL / Qwen2.5-VL checkpoint. quantize="nf4" (or "fp8") quantizes the language
    model's linear weights on load; the vision tower stays in `dtype`."""
    path = resolve_path(path_or_id)
    config, raw = load_vlm_config(path)
    if raw.get("quantization_config"):
        raise ValueError(f"{path}: pre-quantized vision-language checkpoints are not supported; load the 16-bit "
                         "checkpoint with quantize='nf4'")
    quantizer = None
    if quantize is not None:
        from jft import quant

        if quantize not in quant.METHODS:
            raise ValueError(f"unknown quantize={quantize!r}; choose one of {quant.METHODS}")
        quantizer = functools.partial(quant.quantize, method=quantize, dtype=jnp.dtype(dtype))
    params = load_vlm_params(path, config, dtype=jnp.dtype(dtype), quantize=quantizer, progress=progress)
    tok = _load_tokenizer(path) if tokenizer else None
    processor = ImageProcessor.from_pretrained(path, config.vision)
    return VLModel(config, params, tok, processor, path, raw)


def is_vlm_dir(path) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    return read_json(cfg).get("model_type") in ("qwen2_vl", "qwen2_5_vl")
