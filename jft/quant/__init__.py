"""Quantized frozen weights: NF4 (bitsandbytes-exact) and FP8 (e4m3) pytree leaves.

A quantized leaf stands where a dense `[out, in]` (or stacked `[L, out, in]`) weight would and offers
`.shape`, `.dtype` (what it dequantizes to), `.dequantize(dtype=None)` and `.nbytes`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jft.quant.fp8 import FP8, dequantize_fp8, quantize_fp8
from jft.quant.nf4 import NF4, NF4Layer, dequantize_nf4, quantize_nf4

QUANTIZED_TYPES = (NF4, NF4Layer, FP8)
METHODS = ("nf4", "fp8")


def quantize(w, method: str = "nf4", **options):
    """Quantize a `[..., out, in]` weight: method "nf4" (options of `quantize_nf4`: blocksize,
    double_quant, dtype) or "fp8" (options of `quantize_fp8`: layout, block, dtype)."""
    if method == "nf4":
        return quantize_nf4(w, **options)
    if method == "fp8":
        return quantize_fp8(w, **options)
    raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")


def is_quantized(x) -> bool:
    return isinstance(x, QUANTIZED_TYPES)


def dequantize(x, dtype=None):
    """The dense array of a quantized leaf (in `dtype`, default its own); other arrays pass through."""
    if is_quantized(x):
        return x.dequantize(dtype)
    return x if dtype is None else jnp.asarray(x).astype(dtype)


def has_quantized(tree) -> bool:
    return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def dequantize_tree(tree, dtype):
    """The pytree with every quantized leaf dense in `dtype`; other leaves as they are."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def leaf_bytes(x) -> int:
    """Bytes of one params leaf: a quantized leaf at its packed size, an array (or a
    jax.ShapeDtypeStruct) at size * itemsize."""
    if is_quantized(x):
        return x.nbytes
    return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def param_bytes(tree) -> int:
    """Total bytes of a params pytree, quantized leaves counted packed (works under jax.eval_shape
    outputs, so a model's size can be computed without allocating it)."""
    return sum(leaf_bytes(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


__all__ = [
    "FP8",
    "NF4",
    "NF4Layer",
    "dequantize",
    "dequantize_fp8",
    "dequantize_nf4",
    "is_quantized",
    "leaf_bytes",
    "param_bytes",
    "quantize",
    "quantize_fp8",
    "quantize_nf4",
]
