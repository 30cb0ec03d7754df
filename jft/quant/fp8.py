"""FP8 (float8_e4m3fn) weights with float32 scales, as a pytree leaf.

Two layouts, the two that transformers reads:
- per row ("row", `fbgemm_fp8`): scale [*batch, out, 1] (`weight_scale`);
- per tile ("block", fine-grained `fp8`): scale [*batch, ceil(out/bm), ceil(in/bn)] (`weight_scale_inv`,
  bm = bn = 128 by default). Tiles at a ragged edge are smaller and have their own scale.
In both the scale is the dequantization multiplier: w ~= q * scale, scale = amax / 448.

Quantization follows transformers' `Fp8Quantize`: q = clip(w * (448 / amax), -448, 448) rounded to
e4m3 (nearest even), scale = 1 / (448 / amax); an all-zero row or tile gets scale 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jft.quant.nf4 import materialized

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
LAYOUTS = ("row", "block")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scale"],
    meta_fields=["block", "dtype_name"],
)
@dataclasses.dataclass(frozen=True)
class FP8:
    """values: float8_e4m3fn [*batch, out, in]; scale: float32, [*batch, out, 1] when `block` is None
    (per row), else [*batch, ceil(out/block[0]), ceil(in/block[1])]."""

    values: jax.Array
    scale: jax.Array
    block: tuple[int, int] | None = DEFAULT_BLOCK
    dtype_name: str = "bfloat16"

    @property
    def layout(self) -> str:
        return "row" if self.block is None else "block"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return sum(int(math.prod(c.shape)) * jnp.dtype(c.dtype).itemsize for c in (self.values, self.scale))

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize_fp8(self, self.dtype if dtype is None else dtype)

    def __repr__(self) -> str:
        return f"FP8(shape={self.shape}, dtype={self.dtype_name}, layout={self.layout}, block={self.block})"


def _scales_for(amax: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(multiplier that maps amax to 448, its inverse = the stored dequantization scale).

    Rounded like transformers (torch evaluates 448 / amax as 448 * (1 / amax))."""
    nonzero = amax > 0
    reciprocal = materialized(1.0 / jnp.where(nonzero, amax, 1.0))
    to_fp8 = materialized(jnp.where(nonzero, FP8_MAX * reciprocal, 1.0))
    return to_fp8, 1.0 / to_fp8


def _to_e4m3(scaled: jax.Array) -> jax.Array:
    return jnp.clip(scaled, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def _tile_view(x: jax.Array, block: tuple[int, int]) -> jax.Array:
    """[*batch, out, in] -> zero-padded [*batch, out_tiles, bm, in_tiles, bn]."""
    *batch, rows, cols = x.shape
    bm, bn = block
    tr, tc = math.ceil(rows / bm), math.ceil(cols / bn)
    pad = [(0, 0)] * len(batch) + [(0, tr * bm - rows), (0, tc * bn - cols)]
    return jnp.pad(x, pad).reshape(*batch, tr, bm, tc, bn)


def _untile(tiles: jax.Array, rows: int, cols: int) -> jax.Array:
    *batch, tr, bm, tc, bn = tiles.shape
    return tiles.reshape(*batch, tr * bm, tc * bn)[..., :rows, :cols]


@functools.partial(jax.jit, static_argnames=("block", "dtype"))
def _quantize_fp8(w, block, dtype):
    w32 = w.astype(jnp.float32)
    if block is None:
        to_fp8, scale = _scales_for(jnp.max(jnp.abs(w32), axis=-1, keepdims=True))
        values = _to_e4m3(w32 * to_fp8)
    else:
        tiles = _tile_view(w32, block)
        to_fp8, scale = _scales_for(jnp.max(jnp.abs(tiles), axis=(-3, -1)))
        values = _untile(_to_e4m3(tiles * to_fp8[..., :, None, :, None]), *w.shape[-2:])
    return FP8(values=values, scale=scale, block=block, dtype_name=jnp.dtype(dtype).name)


def quantize_fp8(w, layout: str = "block", block=DEFAULT_BLOCK, dtype=None) -> FP8:
    """Quantize `w` [*batch, out, in] to e4m3 with per-row (`layout="row"`) or per-tile scales."""
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"FP8 quantizes [..., out, in] matrices; got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"FP8 quantizes floating-point weights; got {w.dtype}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown FP8 layout {layout!r}; expected one of {LAYOUTS}")
    block = None if layout == "row" else _checked_block(block)
    dtype = jnp.dtype(w.dtype if dtype is None else dtype)
    return _quantize_fp8(w, block, dtype)


def _checked_block(block) -> tuple[int, int]:
    block = tuple(int(b) for b in block)
    if len(block) != 2 or min(block) <= 0:
        raise ValueError(f"FP8 block must be two positive sizes, got {block}")
    return block


def expected_scale_shape(shape, block) -> tuple[int, ...]:
    """The scale shape for a weight of `shape` [*batch, out, in] (block None = per row)."""
    *batch, rows, cols = shape
    if block is None:
        return (*batch, rows, 1)
    return (*batch, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def dequantize_fp8(q: FP8, dtype=None) -> jax.Array:
    """Dense `q.shape` array: q * scale in float32, then rounded to `dtype`."""
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    values = q.values.astype(jnp.float32)
    if q.block is None:
        return (values * q.scale).astype(dtype)
    rows, cols = q.shape[-2:]
    tiles = _tile_view(values, q.block) * q.scale[..., :, None, :, None]
    return _untile(tiles, rows, cols).astype(dtype)
