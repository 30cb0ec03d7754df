"""Saving a fine-tuned vision-language model: PEFT adapters and merged 16-bit checkpoints.

Module paths are transformers' current layout (`model.language_model.layers.N...`,
`model.visual.blocks.N...`); `target_modules` is a regular expression so that only those decoder
and vision-block projections match (a plain list would also catch e.g. the patch embedding's `proj`).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jft.convert.hf import layer_modules
from jft.convert.safetensors_io import atomic_write, save_file
from jft.convert.vlm import save_vlm_params, vision_module
from jft.lora import merge_params
from jft.nn.layers import dense

_LANGUAGE = "model.language_model.layers"
_VISION = "model.visual.blocks"
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "vocab.json", "merges.txt")


def _target_regex(config, lora) -> str:
    language = sorted({layer_modules(config.text)[t] for t in lora.weights["layers"]})
    vision = sorted({vision_module(t) for t in lora.weights.get("vision", {})})
    parts = []
    if language:
        parts.append(rf"model\.language_model\.layers\.\d+\.({'|'.join(re.escape(m) for m in language)})")
    if vision:
        parts.append(rf"model\.visual\.blocks\.\d+\.({'|'.join(re.escape(m) for m in vision)})")
    return "|".join(parts)


def adapter_tensors(model, lora) -> dict[str, np.ndarray]:
    config = model.config
    w = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), lora.weights)
    layers = lora.config.layers if lora.config.layers is not None else range(config.text.num_layers)
    tensors = {}
    for target, ab in w["layers"].items():
        module = layer_modules(config.text)[target]
        for i in layers:
            tensors[f"base_model.model.{_LANGUAGE}.{i}.{module}.lora_A.weight"] = ab["a"][i]
            tensors[f"base_model.model.{_LANGUAGE}.{i}.{module}.lora_B.weight"] = ab["b"][i]
    for target, ab in w.get("vision", {}).items():
        module = vision_module(target)
        for i in range(config.vision.depth):
            tensors[f"base_model.model.{_VISION}.{i}.{module}.lora_A.weight"] = ab["a"][i]
            tensors[f"base_model.model.{_VISION}.{i}.{module}.lora_B.weight"] = ab["b"][i]
    return tensors


def save_lora(model, lora, directory) -> None:
    """A PEFT adapter directory for Qwen2[_5]_VLForConditionalGeneration (`PeftModel.from_pretrained`)."""
    if "embed" in lora.weights or "lm_head" in lora.weights:
        raise ValueError("save_lora for vision-language models does not write trained embeddings")
    lc = lora.config
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lc.r, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
           "target_modules": _target_regex(model.config, lora), "bias": "none", "use_rslora": lc.use_rslora,
           "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "layers_to_transform": None,
           "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True,
           "base_model_name_or_path": model.hf_config.get("_name_or_path") or model.path or ""}
    if lc.layers is not None:
        raise ValueError("save_lora for vision-language models needs a LoRA on every language layer")
    os.makedirs(directory, exist_ok=True)
    save_file(adapter_tensors(model, lora), os.path.join(directory, "adapter_model.safetensors"), {"format": "pt"})
    atomic_write(os.path.join(directory, "adapter_config.json"), lambda f: f.write(json.dumps(cfg, indent=2)), mode="w")


def merged_params(model, lora, dtype) -> dict:
    """Dense params of `dtype` with the language and vision LoRA deltas added."""
    dtype = jnp.dtype(dtype)
    text = {k: v for k, v in model.params.items() if k != "vision"}
    if lora is not None:
        text = merge_params(text, lora, dtype=jnp.float32)
    text = jax.tree.map(lambda x: dense(x, dtype), text, is_leaf=lambda x: hasattr(x, "dequantize"))
    vision = jax.tree.map(lambda x: x.astype(jnp.float32), model.params["vision"])
    if lora is not None:
        scale = lora.config.scaling()
        blocks = dict(vision["blocks"])
        for target, ab in lora.weights.get("vision", {}).items():
            blocks[target] = blocks[target] + jnp.einsum("lor,lri->loi", ab["b"], ab["a"]) * scale
        vision = {**vision, "blocks": blocks}
    return {**text, "vision": jax.tree.map(lambda x: x.astype(dtype), vision)}


def save_merged(model, lora, directory, *, dtype="bfloat16", max_shard_size: int = 5 * 2**30) -> None:
    """Base + LoRA as `dtype` safetensors that transformers loads as the original VL model class."""
    save_vlm_params(directory, model.config, merged_params(model, lora, dtype), model.hf_config,
                    max_shard_size=max_shard_size)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    if model.image_processor is not None and not os.path.exists(os.path.join(directory, "preprocessor_config.json")):
        processor = model.image_processor.to_dict()
        atomic_write(os.path.join(directory, "preprocessor_config.json"),
                     lambda f: f.write(json.dumps(processor, indent=2)), mode="w")
    for name in _SIDE_FILES:
        src = os.path.join(model.path or "", name)
        if model.path and os.path.isfile(src) and not os.path.exists(os.path.join(directory, name)):
            shutil.copyfile(src, os.path.join(directory, name))
