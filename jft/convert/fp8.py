"""transformers' FP8 checkpoint layouts <-> `jft.quant.FP8`.

- fine-grained `fp8` (`quant_method: "fp8"`): `X.weight` float8_e4m3fn [out, in] and
  `X.weight_scale_inv` float32 [ceil(out/bm), ceil(in/bn)], the per-tile dequantization multiplier;
  `weight_block_size: [bm, bn]` in the config.
- `fbgemm_fp8`: `X.weight` float8_e4m3fn [out, in] and `X.weight_scale` float32 [out, 1].
The functions here work on the tensors of ONE linear, keyed by suffix ("weight", "weight_scale",
"weight_scale_inv").
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jft.quant.fp8 import DEFAULT_BLOCK, FP8, expected_scale_shape

WEIGHT = "weight"
ROW_SCALE = "weight_scale"
BLOCK_SCALE = "weight_scale_inv"
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


class Fp8FormatError(ValueError):
    """An FP8 checkpoint entry that jft cannot read."""


def _as_e4m3(weight) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.dtype == E4M3:
        return weight
    if weight.dtype in (np.uint8, np.int8):  # raw bytes, e.g. from a reader without float8 support
        return np.ascontiguousarray(weight).view(E4M3)
    raise Fp8FormatError(f"FP8 {WEIGHT} must be float8_e4m3fn (or its raw bytes), got {weight.dtype}")


def fp8_from_hf(tensors: Mapping[str, np.ndarray], dtype="bfloat16", block=None) -> FP8:
    """An unstacked FP8 leaf from one linear's tensors. With `weight_scale_inv` the layout is per
    tile and `block` (the config's weight_block_size) defaults to (128, 128); with `weight_scale` it
    is per row."""
    if WEIGHT not in tensors:
        raise Fp8FormatError(f"missing FP8 tensor {WEIGHT!r}; have {sorted(tensors)}")
    values = _as_e4m3(tensors[WEIGHT])
    if values.ndim != 2:
        raise Fp8FormatError(f"FP8 {WEIGHT} must be [out, in], got shape {values.shape}")
    has_row, has_block = ROW_SCALE in tensors, BLOCK_SCALE in tensors
    if has_row == has_block:
        raise Fp8FormatError(f"expected exactly one of {ROW_SCALE!r} / {BLOCK_SCALE!r}; have {sorted(tensors)}")
    if has_row:
        block, scale = None, np.asarray(tensors[ROW_SCALE])
        if scale.ndim == 1:  # some writers drop the trailing 1
            scale = scale[:, None]
    else:
        block, scale = tuple(block or DEFAULT_BLOCK), np.asarray(tensors[BLOCK_SCALE])
    expected = expected_scale_shape(values.shape, block)
    if tuple(scale.shape) != expected:
        name = ROW_SCALE if has_row else f"{BLOCK_SCALE} (block {block})"
        raise Fp8FormatError(f"{name} has shape {tuple(scale.shape)}, expected {expected} for weight {values.shape}")
    return FP8(
        values=jnp.asarray(values),
        scale=jnp.asarray(scale.astype(np.float32)),
        block=block,
        dtype_name=jnp.dtype(dtype).name,
    )


def fp8_to_hf(leaf: FP8) -> dict[str, np.ndarray]:
    """One unstacked FP8 leaf -> {"weight": e4m3 [out, in], "weight_scale" | "weight_scale_inv": f32}."""
    if not isinstance(leaf, FP8):
        raise TypeError(f"fp8_to_hf takes an FP8 leaf, got {type(leaf).__name__}")
    if leaf.values.ndim != 2:
        raise ValueError(
            f"fp8_to_hf writes one matrix; this leaf has shape {leaf.shape}: "
            "slice it first, e.g. jax.tree.map(lambda c: c[i], leaf)"
        )
    scale_name = ROW_SCALE if leaf.block is None else BLOCK_SCALE
    return {WEIGHT: np.array(leaf.values), scale_name: np.array(leaf.scale, dtype=np.float32)}


def fp8_quantization_config(layout: str = "block", block=DEFAULT_BLOCK, modules_to_not_convert=None) -> dict:
    """`quantization_config` for config.json: fine-grained `fp8` (layout "block") or `fbgemm_fp8`
    (layout "row"), with the fields transformers' FineGrainedFP8Config / FbgemmFp8Config read."""
    if layout == "block":
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [int(b) for b in block],
            "modules_to_not_convert": modules_to_not_convert,
        }
    if layout == "row":
        return {
            "quant_method": "fbgemm_fp8",
            "activation_scale_ub": 1200.0,
            "modules_to_not_convert": modules_to_not_convert,
        }
    raise ValueError(f"unknown FP8 layout {layout!r}; expected 'block' or 'row'")
