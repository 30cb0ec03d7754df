"""LoRA merged into the base weights, written as an HF checkpoint transformers loads.

Merging streams layer by layer: each layer's weight is dequantized, has its LoRA delta added, is
cast and written before the next is computed, so an 8B model never needs two full copies in memory.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jft.convert.hf import save_params
from jft.nn.layers import dense

_COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "chat_template.jinja")


class _MergedLayers:
    """Per-layer view of one stacked weight: `view[i]` is layer i merged, as a host array of `dtype`."""

    def __init__(self, base, lora=None, target=None, dtype=np.float32):
        self.base, self.lora, self.target, self.dtype = base, lora, target, dtype

    def __getitem__(self, i):
        w = _layer(self.base, i)
        if self.lora is not None and self.target in self.lora.weights["layers"]:
            lw = self.lora.weights["layers"][self.target]
            on = float(self.lora.config.layer_mask(self.base.shape[0])[i])
            w = w + (np.asarray(lw["b"][i]) @ np.asarray(lw["a"][i])) * (self.lora.config.scaling(self.target) * on)
        return w.astype(self.dtype)


def _layer(stacked, i) -> np.ndarray:
    """Layer i of a stacked leaf as fp32 host memory (quantized leaves dequantize just that layer)."""
    if hasattr(stacked, "dequantize"):
        return np.asarray(jax.tree.map(lambda x: x[i], stacked).dequantize(jnp.float32))
    return np.asarray(stacked[i], np.float32)


def merged_params_view(params: dict, lora, dtype) -> dict:
    """Params whose layer leaves are lazy merged views and whose other leaves are cast to dtype."""
    dtype = np.dtype(jnp.dtype(dtype))
    out = {k: np.asarray(dense(v, jnp.float32)).astype(dtype) for k, v in params.items() if k != "layers"}
    for name in ("embed", "lm_head"):
        if lora is not None and name in lora.weights:
            out[name] = np.asarray(lora.weights[name], np.float32).astype(dtype)
    out["layers"] = {name: _MergedLayers(v, lora, name, dtype) for name, v in params["layers"].items()}
    return out


def _as_bnb_nf4(name: str, w: np.ndarray):
    """A decoder layer's linear weight -> its bitsandbytes NF4 tensors; anything else unchanged."""
    from jft.convert.bnb import nf4_to_bnb
    from jft.quant import quantize_nf4

    if ".layers." not in name or w.ndim != 2 or not name.endswith(".weight") or name.endswith("norm.weight"):
        yield name, w
        return
    leaf = quantize_nf4(jnp.asarray(w, jnp.float32), double_quant=True, dtype=jnp.dtype(w.dtype))
    for suffix, t in nf4_to_bnb(leaf).items():
        yield name[: -len("weight")] + suffix, t


def save_merged(model, lora, directory, *, dtype="bfloat16", quantize: str | None = None,
                max_shard_size: int = 5 * 2**30) -> None:
    """Writes base + LoRA as `dtype` HF safetensors (sharded, with index), config and tokenizer files.

    quantize="nf4" writes the decoder's linear weights in the bitsandbytes 4-bit layout (double
    quantization), which transformers loads as a `*-bnb-4bit` checkpoint.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"save_merged: quantize must be None or 'nf4', got {quantize!r}")
    params = merged_params_view(model.params, lora, dtype)
    extra = {}
    if quantize == "nf4":
        from jft.convert.bnb import bnb_quantization_config

        extra = dict(transform=_as_bnb_nf4, quantization_config=bnb_quantization_config())
    save_params(directory, model.config, params, model.hf_config, max_shard_size=max_shard_size, **extra)
    copy_side_files(model, directory)


def copy_side_files(model, directory) -> None:
    """Generation config and tokenizer files beside the weights."""
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
    for name in _COPIED_FILES:
        src = os.path.join(model.path or "", name)
        if model.path and os.path.isfile(src) and not os.path.exists(os.path.join(directory, name)):
            shutil.copyfile(src, os.path.join(directory, name))

