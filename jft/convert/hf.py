"""Hugging Face safetensors checkpoints <-> jft's canonical params (layers stacked on axis 0).

One table (`layer_modules`) maps canonical names to HF module paths and drives loading, saving,
and the module names PEFT adapters use. Loading streams tensor by tensor from memory-mapped files,
casting (or quantizing) each as it is read, so the host holds about one copy of the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jft.config import Config
from jft.convert.safetensors_io import CheckpointError, CheckpointFiles, atomic_write, save_sharded
from jft.nn.transformer import is_norm, param_shapes

_EMBED_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def layer_modules(config: Config) -> dict[str, str]:
    """Canonical per-layer name -> HF module path inside `layers.N` (weights append `.weight`)."""
    mlp_norm = "pre_feedforward_layernorm" if config.sandwich_norm else "post_attention_layernorm"
    names = {
        "attn_norm": "input_layernorm",
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "q_norm": "self_attn.q_norm",
        "k_norm": "self_attn.k_norm",
        "mlp_norm": mlp_norm,
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    return names


def _tensor_name(config: Config, name: str) -> str:
    """HF tensor name (without the model prefix) of a canonical per-layer leaf, e.g. q_bias -> ...q_proj.bias."""
    if name.endswith("_bias"):
        return layer_modules(config)[name.removesuffix("_bias")] + ".bias"
    return layer_modules(config)[name] + ".weight"


# Phi-3 stores q/k/v and gate/up fused; these give the row ranges of each part.
def _fused_parts(config: Config) -> dict[str, tuple[str, int, int]]:
    q, kv, f = config.q_dim, config.kv_dim, config.intermediate_size
    return {
        "q": ("self_attn.qkv_proj.weight", 0, q),
        "k": ("self_attn.qkv_proj.weight", q, q + kv),
        "v": ("self_attn.qkv_proj.weight", q + kv, q + 2 * kv),
        "gate": ("mlp.gate_up_proj.weight", 0, f),
        "up": ("mlp.gate_up_proj.weight", f, 2 * f),
    }


def _fused(config: Config) -> bool:
    return config.model_type == "phi3"


def _model_prefix(files: CheckpointFiles) -> str:
    for prefix in _EMBED_PREFIXES:
        if f"{prefix}embed_tokens.weight" in files:
            return prefix
    raise CheckpointError(f"{files.directory}: no embed_tokens.weight found; is this a decoder-only LM checkpoint?")


def _read(files: CheckpointFiles, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> np.ndarray:
    t = files.get(name)
    if rows is not None:
        t = t[rows[0] : rows[1]]
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{files.path_of(name)}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _to_jax(arrays: list, transform: Callable) -> object:
    """Applies `transform` (cast or quantize) per array and stacks the results along a new axis 0."""
    done = [transform(a) for a in arrays]
    if len(done) == 1:
        return done[0]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *done)


def _prequantized_reader(files: CheckpointFiles, qc: dict, dtype) -> Callable[[str], object]:
    """For a checkpoint saved quantized (bnb-4bit, fp8, fbgemm_fp8): HF weight name -> quantized leaf."""
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        if not qc.get("load_in_4bit") or qc.get("bnb_4bit_quant_type", "nf4") != "nf4":
            raise CheckpointError(f"{files.directory}: only 4-bit NF4 bitsandbytes checkpoints are supported, "
                                  f"got {qc}")
        from jft.convert.bnb import nf4_from_bnb

        def read_bnb(name):
            stem = name[: -len("weight")]
            parts = {k[len(stem):]: files.get(k) for k in files.keys() if k.startswith(name)}
            try:
                return nf4_from_bnb(parts, dtype=dtype)
            except ValueError as e:
                raise CheckpointError(f"{files.path_of(name)}: {name}: {e}") from None

        return read_bnb
    if method in ("fp8", "fbgemm_fp8"):
        from jft.convert.fp8 import fp8_from_hf

        block = qc.get("weight_block_size")

        def read_fp8(name):
            stem = name[: -len("weight")]
            parts = {s: files.get(stem + s) for s in ("weight", "weight_scale", "weight_scale_inv") if stem + s in files}
            try:
                return fp8_from_hf(parts, dtype=dtype, block=block)
            except ValueError as e:
                raise CheckpointError(f"{files.path_of(name)}: {name}: {e}") from None

        return read_fp8
    raise CheckpointError(f"{files.directory}: quantization method {method!r} is not supported (bitsandbytes nf4, fp8, fbgemm_fp8 are)")


def _is_linear(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and not is_norm(name) and not name.endswith("_bias")


def load_params(directory, config: Config, dtype=jnp.bfloat16, quantize: Callable | None = None,
                quantization_config: dict | None = None, progress: bool = True) -> dict:
    """Reads a checkpoint directory into canonical params.

    `quantize(w)` may turn a per-layer [out, in] matrix into a quantized leaf; it is called one
    tensor at a time, so a model that does not fit in host memory at 16 bits can still be loaded.
    A checkpoint saved quantized (its config's `quantization_config`) loads straight into quantized
    leaves, without dequantizing.
    """
    files = CheckpointFiles(directory)
    prefix = _model_prefix(files)
    shapes = param_shapes(config)
    dtype = jnp.dtype(dtype)

    def cast(a):
        return jnp.asarray(np.asarray(a).astype(dtype))

    params = {
        "embed": cast(_read(files, f"{prefix}embed_tokens.weight", shapes["embed"])),
        "final_norm": cast(_read(files, f"{prefix}norm.weight", shapes["final_norm"])),
        "layers": {},
    }
    if "lm_head" in shapes:
        params["lm_head"] = cast(_read(files, "lm_head.weight", shapes["lm_head"]))

    fused = _fused_parts(config) if _fused(config) else {}
    layer_shapes = shapes["layers"]
    read_quantized = _prequantized_reader(files, quantization_config, dtype) if quantization_config else None
    if read_quantized is not None and fused:
        raise CheckpointError(f"{directory}: pre-quantized {config.model_type} checkpoints (fused projections) are not "
                              "supported; load the 16-bit checkpoint with quantize='nf4' instead")
    for name in tqdm(layer_shapes, desc="loading", disable=not progress, leave=False):
        per_layer = layer_shapes[name][1:]
        if read_quantized is not None and _is_linear(name, layer_shapes[name]):
            leaves = [read_quantized(f"{prefix}layers.{i}.{_tensor_name(config, name)}") for i in range(config.num_layers)]
            for i, leaf in enumerate(leaves):
                if tuple(leaf.shape) != tuple(per_layer):
                    raise CheckpointError(f"{directory}: layer {i} {name} has shape {tuple(leaf.shape)}, expected {per_layer}")
            params["layers"][name] = _to_jax(leaves, lambda x: x)
            continue
        arrays = []
        for i in range(config.num_layers):
            base = f"{prefix}layers.{i}."
            if name in fused:
                tensor, lo, hi = fused[name]
                arrays.append(_read(files, base + tensor, per_layer, rows=(lo, hi)))
            else:
                arrays.append(_read(files, base + _tensor_name(config, name), per_layer))
        if quantize is not None and _is_linear(name, layer_shapes[name]):
            params["layers"][name] = _to_jax(arrays, lambda a: quantize(jnp.asarray(np.asarray(a).astype(dtype))))
        else:
            stacked = np.empty((config.num_layers, *per_layer), dtype)
            for i, a in enumerate(arrays):
                stacked[i] = np.asarray(a).astype(dtype)
            params["layers"][name] = jnp.asarray(stacked)
    return params


def _host(x) -> np.ndarray:
    if hasattr(x, "dequantize"):
        raise TypeError("save_params writes dense weights; dequantize (or use jft.convert.save_merged) first")
    return np.asarray(jax.device_get(x))


def hf_tensors(config: Config, params: dict, prefix: str = "model.") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF tensor name, host array) for every weight, one at a time, in HF's order."""
    yield f"{prefix}embed_tokens.weight", _host(params["embed"])
    fused = _fused_parts(config) if _fused(config) else {}
    layers = params["layers"]
    for i in range(config.num_layers):
        base = f"{prefix}layers.{i}."
        fused_rows: dict[str, list[np.ndarray]] = {}
        for name, value in layers.items():
            w = _host(value[i])
            if name in fused:
                fused_rows.setdefault(fused[name][0], []).append((fused[name][1], w))
            else:
                yield base + _tensor_name(config, name), w
        for tensor, parts in fused_rows.items():
            yield base + tensor, np.concatenate([w for _, w in sorted(parts, key=lambda p: p[0])], axis=0)
    yield f"{prefix}norm.weight", _host(params["final_norm"])
    if "lm_head" in params:
        yield "lm_head.weight", _host(params["lm_head"])


_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def save_params(directory, config: Config, params: dict, raw_config: dict, *, max_shard_size: int = 5 * 2**30,
                transform: Callable | None = None, quantization_config: dict | None = None) -> None:
    """Writes params as an HF checkpoint (sharded safetensors + index + config.json).

    `transform(name, array)` may replace one tensor by several (name, array) pairs, e.g. to write a
    linear weight in a quantized layout; `quantization_config` then goes into config.json.
    """
    os.makedirs(directory, exist_ok=True)
    dtype_name = _DTYPE_NAMES.get(np.dtype(params["embed"].dtype), "float32")
    config_out = {k: v for k, v in raw_config.items() if k not in ("quantization_config", "torch_dtype")}
    config_out["dtype"] = dtype_name
    if quantization_config:
        config_out["quantization_config"] = quantization_config
    tensors = hf_tensors(config, params)
    if transform is not None:
        tensors = (pair for name, t in tensors for pair in transform(name, t))
    save_sharded(tensors, directory, max_shard_bytes=max_shard_size)
    atomic_write(os.path.join(directory, "config.json"), lambda f: f.write(json.dumps(config_out, indent=2)), mode="w")


def save_pretrained(model, directory, *, max_shard_size: int = 5 * 2**30) -> None:
    """Saves a `jft.Model` (dense params) as an HF model directory, tokenizer included."""
    save_params(directory, model.config, model.params, model.hf_config, max_shard_size=max_shard_size)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
