"""bitsandbytes' NF4 as a pytree leaf.

Format (checked against bitsandbytes 0.50 in tests/test_quant_nf4.py):
- each `[out, in]` matrix is flattened row-major and cut into blocks of `blocksize` elements (the
  last block may be shorter and has its own absmax);
- absmax = max|x| per block (float32); x / absmax goes to the nearest of the 16 NF4 codes, boundaries
  being the float32 midpoints between neighbouring codes (a value on a midpoint takes the lower code);
- two codes per byte, the FIRST element in the HIGH nibble; an odd element count is padded with the
  code of 0.0 (7) in the last low nibble;
- double quantization: offset = mean(absmax); (absmax - offset) is cut into blocks of 256, each
  multiplied by 1/max|.| of its block ("nested absmax", float32) and mapped to an entry of the
  256-value "dynamic" map the way bitsandbytes' CPU quantizer does (nearest entry through a 65536-point
  lookup grid): absmax = map[code] * nested_absmax + offset.

A leaf may hold a stack of matrices `[*batch, out, in]` (the decoder's layer axis): every matrix is
quantized on its own, exactly as bitsandbytes would quantize that layer's weight alone, and every
array child carries the batch axes, so `jax.lax.scan` / `jax.tree.map(lambda c: c[i], leaf)` slice
it into single-layer leaves. The static metadata never encodes the batch shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

NF4_CODES = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
NF4_ZERO_CODE = 7
# Computed in float32, as bitsandbytes does, so boundary cases round the same way.
NF4_BOUNDS = ((NF4_CODES[:-1] + NF4_CODES[1:]) / np.float32(2)).astype(np.float32)

DEFAULT_BLOCKSIZE = 64
DEFAULT_NESTED_BLOCKSIZE = 256

# bitsandbytes stores 1e-38 (a float32 subnormal) as the absmax of an all-zero ragged last block.
# XLA flushes subnormal arithmetic results to zero, so the constant is built from its bits.
_TINY_ABSMAX_BITS = int(np.float32(1e-38).view(np.int32))


def _linspace_like_torch(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: a float32 step, each point one fused multiply-add from the
    nearer end. (Matches torch bit for bit; numpy's linspace does not.)"""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    k = np.arange(steps, dtype=np.float64)
    from_start = np.float64(start32) + np.float64(step) * k
    from_end = np.float64(end32) - np.float64(step) * (steps - 1 - k)
    return np.where(k < steps // 2, from_start, from_end).astype(np.float32)


def _signed_dynamic_map() -> np.ndarray:
    """The 256-entry signed "dynamic" map of 8-bit dynamic tree quantization (Dettmers 2015), as
    bitsandbytes builds it: for exponent e = 0..6, 2**e fraction values (midpoints of an even grid on
    [0.1, 1]) scaled by 10**(e - 6), with both signs; plus 0 and 1; sorted."""
    values = [np.float32(0.0), np.float32(1.0)]
    for exponent in range(7):
        grid = _linspace_like_torch(0.1, 1.0, 2**exponent + 1)
        means = ((grid[:-1] + grid[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (exponent - 6))
        values.extend(scale * means)
        values.extend(-scale * means)
    table = np.sort(np.array(values, dtype=np.float32))
    assert table.shape == (256,)
    return table


DYNAMIC_MAP = _signed_dynamic_map()


def materialized(x):
    """`x` as an opaque value, rounded to its dtype before the next op sees it.

    XLA contracts a multiply feeding an add into one fused multiply-add and simplifies 1/(c/x) to
    x/c; both round differently from the reference libraries, which round every op. A select on
    `x == x` hides `x`'s producer from those rewrites."""
    return jnp.where(x == x, x, jnp.nan)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "absmax", "nested_absmax", "offset"],
    meta_fields=["rows", "cols", "blocksize", "nested_blocksize", "dtype_name"],
)
@dataclasses.dataclass(frozen=True)
class NF4:
    """An NF4-quantized `[*batch, rows, cols]` weight (see the module docstring for the format).

    packed:        uint8 [*batch, ceil(rows*cols/2)]
    absmax:        float32 [*batch, n_blocks], or uint8 codes into DYNAMIC_MAP when double-quantized
    nested_absmax: float32 [*batch, ceil(n_blocks/nested_blocksize)] or None
    offset:        float32 [*batch] or None
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    rows: int
    cols: int
    blocksize: int = DEFAULT_BLOCKSIZE
    nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE
    dtype_name: str = "bfloat16"

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.packed.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.batch_shape + (self.rows, self.cols)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.rows * self.cols / self.blocksize)

    @property
    def nbytes(self) -> int:
        children = (self.packed, self.absmax, self.nested_absmax, self.offset)
        return sum(_array_nbytes(c) for c in children if c is not None)

    def block_absmax(self) -> jax.Array:
        """float32 [*batch, n_blocks]: the per-block absmax, undoing double quantization."""
        return block_absmax(self)

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize_nf4(self, self.dtype if dtype is None else dtype)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return f"NF4(shape={self.shape}, dtype={self.dtype_name}, blocksize={self.blocksize}{dq})"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stack", "index"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class NF4Layer:
    """Matrix `index` of a stacked NF4 leaf, left in the stack. The decoder's layer scan hands these
    to the projections: slicing the layer out (as scan does with its inputs) would copy its bytes
    before every dequantize, which reads them in place instead."""

    stack: NF4
    index: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[-2:]

    @property
    def dtype(self) -> jnp.dtype:
        return self.stack.dtype

    @property
    def nbytes(self) -> int:
        return self.stack.nbytes // math.prod(self.stack.batch_shape)

    def sliced(self) -> NF4:
        return jax.tree.map(lambda c: c[self.index], self.stack)

    def dequantize(self, dtype=None) -> jax.Array:
        return self.sliced().dequantize(dtype)


def _array_nbytes(x) -> int:
    return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def _check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2:
        raise ValueError(f"{name} must be a positive even integer, got {blocksize!r}")


def _pad_to_blocks(flat: jax.Array, blocksize: int) -> jax.Array:
    """[B, n] -> [B, ceil(n/blocksize), blocksize], zero-padded."""
    n = flat.shape[-1]
    n_blocks = math.ceil(n / blocksize)
    padded = jnp.pad(flat, ((0, 0), (0, n_blocks * blocksize - n)))
    return padded.reshape(flat.shape[0], n_blocks, blocksize)


def _nf4_codes(scaled: jax.Array) -> jax.Array:
    """Nearest NF4 code index of values in [-1, 1]; a value on a boundary takes the lower code."""
    return jnp.searchsorted(jnp.asarray(NF4_BOUNDS), scaled, side="left").astype(jnp.uint8)


def _pack_nibbles(codes: jax.Array, n: int) -> jax.Array:
    """[B, m] codes (m even, m >= n) -> [B, ceil(n/2)] bytes, first element in the high nibble."""
    pairs = codes.reshape(codes.shape[0], -1, 2)
    packed = (pairs[..., 0] << 4) | pairs[..., 1]
    return packed[:, : (n + 1) // 2]


def _unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """[B, ceil(n/2)] bytes -> [B, n] code indices (int32)."""
    high = (packed >> 4).astype(jnp.int32)
    low = (packed & 0xF).astype(jnp.int32)
    return jnp.stack([high, low], axis=-1).reshape(packed.shape[0], -1)[:, :n]


def _quantize_blocks(flat: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """[B, n] float32 -> (packed uint8 [B, ceil(n/2)], absmax float32 [B, n_blocks]).

    bitsandbytes multiplies full blocks by 1/absmax but divides the ragged last block by its
    absmax; the two differ in the last bit often enough to matter, so both are reproduced."""
    n = flat.shape[-1]
    blocks = _pad_to_blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    nonzero = absmax > 0
    inverse = jnp.where(nonzero, 1.0 / jnp.where(nonzero, absmax, 1.0), 0.0)
    scaled = blocks * inverse[..., None]
    if n % blocksize:
        last_absmax = absmax[:, -1:]
        last_nonzero = last_absmax > 0
        last = jnp.where(last_nonzero, blocks[:, -1] / jnp.where(last_nonzero, last_absmax, 1.0), 0.0)
        scaled = scaled.at[:, -1].set(last)
        tiny = jax.lax.bitcast_convert_type(jnp.int32(_TINY_ABSMAX_BITS), jnp.float32)
        absmax = absmax.at[:, -1].set(jnp.where(last_nonzero[:, 0], absmax[:, -1], tiny))
    codes = _nf4_codes(jnp.clip(scaled, -1.0, 1.0))
    return _pack_nibbles(codes.reshape(flat.shape[0], -1), n), absmax


def _build_dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantizer does not search the map: it rounds the normalized value to
    a grid of 65536 points on [-1, 1] and reads the code nearest to that grid point from this table
    (number of float32 midpoints strictly below the point)."""
    midpoints = (np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])).astype(np.float32)
    steps = np.arange(_LUT_SIZE, dtype=np.float32)
    grid = (np.float32(-1.0) + (np.float32(2.0) * steps) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)


_LUT_SIZE = 65536
_DYNAMIC_LUT = _build_dynamic_lut()


def _dynamic_codes(normed: jax.Array) -> jax.Array:
    """DYNAMIC_MAP codes of values in [-1, 1], the way bitsandbytes' CPU quantizer picks them (the
    nearest entry, except within about 2**-16 of a midpoint where the grid decides)."""
    half = (jnp.clip(normed, -1.0, 1.0) + 1.0) * 0.5
    grid_index = (materialized(half * float(_LUT_SIZE - 1)) + 0.5).astype(jnp.int32)
    return jnp.asarray(_DYNAMIC_LUT)[grid_index]


def double_quantize_absmax(
    absmax: jax.Array, offset: jax.Array, nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE
) -> tuple[jax.Array, jax.Array]:
    """(absmax [B, nb] f32, offset [B] f32) -> (codes uint8 [B, nb], nested_absmax f32 [B, nnb]).

    Each value is multiplied by 1/nested_absmax of its block; an all-zero block gets code 0."""
    nb = absmax.shape[-1]
    centered = absmax - offset[:, None]
    blocks = _pad_to_blocks(centered, nested_blocksize)
    nested_absmax = jnp.max(jnp.abs(blocks), axis=-1)
    nonzero = nested_absmax > 0
    inverse = 1.0 / jnp.where(nonzero, nested_absmax, 1.0)
    codes = jnp.where(nonzero[..., None], _dynamic_codes(blocks * inverse[..., None]), 0)
    return codes.reshape(absmax.shape[0], -1)[:, :nb].astype(jnp.uint8), nested_absmax


def absmax_offset(absmax: jax.Array) -> jax.Array:
    """offset [B] = mean(absmax [B, nb]) in float32.

    bitsandbytes uses torch's mean, whose float32 summation order depends on the CPU's vector width
    (and differs on CUDA), so its offset can differ from this one in the last bit; any offset is a
    valid encoding because it is stored with the leaf."""
    return jnp.mean(absmax, axis=-1)


def _dequantize_absmax(codes, nested_absmax, offset, nested_blocksize: int) -> jax.Array:
    nb = codes.shape[-1]
    values = jnp.asarray(DYNAMIC_MAP)[codes.astype(jnp.int32)]
    scale = jnp.repeat(nested_absmax, nested_blocksize, axis=-1)[..., :nb]
    return materialized(values * scale) + offset[..., None]


def block_absmax(q: NF4) -> jax.Array:
    """float32 [*batch, n_blocks] absmax of `q`, dequantizing the nested absmax if there is one."""
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    return _dequantize_absmax(q.absmax, q.nested_absmax, q.offset, q.nested_blocksize)


@functools.partial(jax.jit, static_argnames=("blocksize", "double_quant", "dtype", "nested_blocksize"))
def _quantize_nf4(w, blocksize, double_quant, dtype, nested_blocksize):
    *batch, rows, cols = w.shape
    flat = w.reshape(-1, rows * cols).astype(jnp.float32)
    packed, absmax = _quantize_blocks(flat, blocksize)
    nested_absmax = offset = None
    if double_quant:
        offset = absmax_offset(absmax)
        absmax, nested_absmax = double_quantize_absmax(absmax, offset, nested_blocksize)
        nested_absmax = nested_absmax.reshape(*batch, -1)
        offset = offset.reshape(batch)
    return NF4(
        packed=packed.reshape(*batch, -1),
        absmax=absmax.reshape(*batch, -1),
        nested_absmax=nested_absmax,
        offset=offset,
        rows=rows,
        cols=cols,
        blocksize=blocksize,
        nested_blocksize=nested_blocksize,
        dtype_name=jnp.dtype(dtype).name,
    )


def quantize_nf4(
    w,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    dtype=None,
    nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE,
) -> NF4:
    """Quantize `w` [*batch, out, in] to NF4, each [out, in] matrix on its own (jit-compiled).

    `dtype` is what the leaf dequantizes to (default: `w`'s floating dtype)."""
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"NF4 quantizes [..., out, in] matrices; got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"NF4 quantizes floating-point weights; got {w.dtype}")
    _check_blocksize(blocksize)
    if double_quant:
        _check_blocksize(nested_blocksize, "nested_blocksize")
    dtype = jnp.dtype(w.dtype if dtype is None else dtype)
    return _quantize_nf4(w, blocksize, bool(double_quant), dtype, nested_blocksize)


def dequantize_nf4(q: NF4, dtype=None) -> jax.Array:
    """Dense `q.shape` array: code * absmax in float32, then rounded to `dtype` (bitsandbytes' order)."""
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    n = q.rows * q.cols
    packed = q.packed.reshape(-1, q.packed.shape[-1])
    absmax = block_absmax(q).reshape(packed.shape[0], -1)
    values = jnp.asarray(NF4_CODES)[_unpack_nibbles(packed, n)]
    blocks = _pad_to_blocks(values, q.blocksize) * absmax[..., None]
    flat = blocks.reshape(packed.shape[0], -1)[:, :n]
    return flat.astype(dtype).reshape(q.shape)
