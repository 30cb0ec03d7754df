"""Qwen2-VL / Qwen2.5-VL safetensors <-> jft's VLM params.

The language model is read and written by `jft.convert.hf` (it is a Qwen2 decoder under
`model.language_model.` or, in the older hub layout, `model.`); this file adds the vision tower
(`model.visual.` or `visual.`). Tensors stream from memory-mapped files one at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jft.convert.hf import _DTYPE_NAMES, hf_tensors, load_params
from jft.convert.safetensors_io import CheckpointError, CheckpointFiles, atomic_write, save_sharded
from jft.nn.vision import vision_param_shapes

_VISION_PREFIXES = ("model.visual.", "visual.")
_BLOCK_TENSORS = {
    "norm1": "norm1.weight", "norm1_bias": "norm1.bias", "norm2": "norm2.weight", "norm2_bias": "norm2.bias",
    "qkv": "attn.qkv.weight", "qkv_bias": "attn.qkv.bias", "proj": "attn.proj.weight", "proj_bias": "attn.proj.bias",
    "fc1": "mlp.fc1.weight", "fc1_bias": "mlp.fc1.bias", "fc2": "mlp.fc2.weight", "fc2_bias": "mlp.fc2.bias",
    "gate": "mlp.gate_proj.weight", "gate_bias": "mlp.gate_proj.bias", "up": "mlp.up_proj.weight",
    "up_bias": "mlp.up_proj.bias", "down": "mlp.down_proj.weight", "down_bias": "mlp.down_proj.bias",
}
_MERGER_TENSORS = {"norm": "ln_q.weight", "norm_bias": "ln_q.bias", "fc1": "mlp.0.weight", "fc1_bias": "mlp.0.bias",
                   "fc2": "mlp.2.weight", "fc2_bias": "mlp.2.bias"}


def vision_module(name: str) -> str:
    """HF module path inside `blocks.N` of a canonical vision linear (qkv -> attn.qkv)."""
    return _BLOCK_TENSORS[name].removesuffix(".weight")


def _vision_prefix(files: CheckpointFiles) -> str:
    for prefix in _VISION_PREFIXES:
        if f"{prefix}patch_embed.proj.weight" in files:
            return prefix
    raise CheckpointError(f"{files.directory}: no visual.patch_embed.proj.weight; is this a Qwen2-VL checkpoint?")


def _read(files, name, shape, dtype):
    t = files.get(name)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{files.path_of(name)}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return np.asarray(t).astype(dtype)


def load_vision_params(directory, vc, dtype=jnp.bfloat16) -> dict:
    files = CheckpointFiles(directory)
    prefix = _vision_prefix(files)
    shapes = vision_param_shapes(vc)
    dtype = np.dtype(jnp.dtype(dtype))
    patch = files.get(f"{prefix}patch_embed.proj.weight")
    expected = (vc.hidden_size, vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
    if tuple(patch.shape) != expected:
        raise CheckpointError(f"{files.path_of(prefix + 'patch_embed.proj.weight')}: patch_embed has shape "
                              f"{tuple(patch.shape)}, expected {expected}")
    params = {"patch_embed": jnp.asarray(np.asarray(patch).astype(dtype).reshape(shapes["patch_embed"])),
              "blocks": {}, "merger": {}}
    for name, shape in shapes["blocks"].items():
        stacked = np.empty(shape, dtype)
        for i in range(vc.depth):
            stacked[i] = _read(files, f"{prefix}blocks.{i}.{_BLOCK_TENSORS[name]}", shape[1:], dtype)
        params["blocks"][name] = jnp.asarray(stacked)
    for name, shape in shapes["merger"].items():
        params["merger"][name] = jnp.asarray(_read(files, f"{prefix}merger.{_MERGER_TENSORS[name]}", shape, dtype))
    return params


def load_vlm_params(directory, config, dtype=jnp.bfloat16, quantize: Callable | None = None, progress: bool = True) -> dict:
    """Language model (optionally quantized tensor by tensor) plus the dense vision tower."""
    params = load_params(directory, config.text, dtype=dtype, quantize=quantize, progress=progress)
    params["vision"] = load_vision_params(directory, config.vision, dtype=dtype)
    return params


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def vision_hf_tensors(vc, vision_params: dict, prefix: str = "model.visual.") -> Iterator[tuple[str, np.ndarray]]:
    v = vision_params
    patch = _host(v["patch_embed"]).reshape(vc.hidden_size, vc.in_channels, vc.temporal_patch_size, vc.patch_size,
                                            vc.patch_size)
    yield f"{prefix}patch_embed.proj.weight", patch
    for i in range(vc.depth):
        for name, value in v["blocks"].items():
            yield f"{prefix}blocks.{i}.{_BLOCK_TENSORS[name]}", _host(value[i])
    for name, value in v["merger"].items():
        yield f"{prefix}merger.{_MERGER_TENSORS[name]}", _host(value)


def vlm_hf_tensors(config, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor in transformers' current layout (model.visual., model.language_model., lm_head)."""
    yield from vision_hf_tensors(config.vision, params["vision"])
    yield from hf_tensors(config.text, {k: v for k, v in params.items() if k != "vision"}, prefix="model.language_model.")


def save_vlm_params(directory, config, params: dict, raw_config: dict, *, max_shard_size: int = 5 * 2**30) -> None:
    """Writes dense params as a checkpoint transformers loads (Qwen2[_5]_VLForConditionalGeneration)."""
    os.makedirs(directory, exist_ok=True)
    dtype_name = _DTYPE_NAMES.get(np.dtype(params["embed"].dtype), "float32")
    config_out = {k: v for k, v in raw_config.items() if k not in ("quantization_config", "torch_dtype")}
    config_out["dtype"] = dtype_name
    save_sharded(vlm_hf_tensors(config, params), directory, max_shard_bytes=max_shard_size)
    atomic_write(os.path.join(directory, "config.json"), lambda f: f.write(json.dumps(config_out, indent=2)), mode="w")
