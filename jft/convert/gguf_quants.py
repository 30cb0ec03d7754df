"""GGML tensor encodings (F32/F16/BF16 and the Q*_0/Q*_1/K-quant blocks), written in numpy.

Every quantizer works on a whole tensor at once: blocks are laid out along the array's second
axis and each step of llama.cpp's per-block algorithm runs as one numpy operation over all blocks.
The arithmetic follows llama.cpp's reference (no importance matrix) quantizers step by step in
float32, so the bytes are the ones `llama-quantize` writes from an F32 GGUF. Where llama.cpp sums
a few values in a loop, we sum in the same order (`_ordered_sum`): float addition is not
associative and a different order changes the rounding, the chosen scale and then the bytes.

Public API:
- `quantize_<type>(x)` -> uint8 array `[..., n / block * bytes_per_block]`, `dequantize_<type>(q)`;
- `QUANT_TYPES`: type name -> `QuantType(type_id, block_size, type_size, quantize, dequantize)`;
- `resolve_quant_method(name)`: user-facing method name (Unsloth's too) -> canonical method;
- `tensor_type(name, layer, n_layers, method, shape=...)`: llama.cpp's per-tensor type mixture.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from typing import Callable

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32

# Super-blocks handled per numpy pass: big enough that the Python overhead vanishes, small enough
# that the per-pass temporaries (a few dozen arrays of this many floats) stay modest.
_CHUNK_ELEMENTS = 1 << 18
_MAX_THREADS = min(8, os.cpu_count() or 1)


# --------------------------------------------------------------------------- small helpers


def _as_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Float32 view of `x` as [n_blocks, block] and the leading shape of the rows."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("cannot quantize a 0-d array; give at least one row")
    if x.shape[-1] % block != 0:
        raise ValueError(
            f"row length {x.shape[-1]} is not a multiple of the block size {block}"
        )
    if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
        raise TypeError(f"expected a floating-point array, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.reshape(-1, block), x.shape[:-1]


def _encode(x: np.ndarray, block: int, type_size: int, encode_blocks) -> np.ndarray:
    """Run `encode_blocks([m, block] f32) -> [m, type_size] u8` over `x` in chunks."""
    x = np.asarray(x)
    blocks, lead = _as_blocks(x, block)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // block)

    def encode_chunk(start: int) -> None:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out[start : start + step] = encode_blocks(blocks[start : start + step])

    starts = range(0, blocks.shape[0], step)
    workers = min(len(starts), _MAX_THREADS)
    if workers <= 1:
        for start in starts:
            encode_chunk(start)
    else:  # numpy releases the GIL inside its loops, so chunks run in parallel
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(encode_chunk, starts))
    return out.reshape(*lead, (x.shape[-1] // block) * type_size)


def _decode(q: np.ndarray, block: int, type_size: int, decode_blocks) -> np.ndarray:
    """Inverse of `_encode`: uint8 [..., k * type_size] -> float32 [..., k * block]."""
    q = np.ascontiguousarray(q)
    if q.dtype != np.uint8:
        raise TypeError(f"expected uint8 block bytes, got {q.dtype}")
    if q.ndim == 0 or q.shape[-1] % type_size != 0:
        raise ValueError(f"last axis ({q.shape[-1:]}) is not a multiple of {type_size} bytes")
    blocks = q.reshape(-1, type_size)
    with np.errstate(over="ignore", invalid="ignore"):
        values = decode_blocks(blocks)
    return values.reshape(*q.shape[:-1], (q.shape[-1] // type_size) * block)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [m] -> [m, 2] bytes of the IEEE half nearest (ties to even), like GGML_FP32_TO_FP16."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _f16_round(v: np.ndarray) -> np.ndarray:
    """The float32 value a half-precision store then load gives."""
    return v.astype(np.float16).astype(np.float32)


def _f16_from(bytes2: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bytes2).view("<f2").reshape(bytes2.shape[:-1]).astype(np.float32)


def _round_clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """llama.cpp's nearest_int (round half to even) clamped to [lo, hi], kept as float32."""
    return np.clip(np.rint(v), lo, hi).astype(np.float32)


def _ordered_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over axis 0 strictly left to right from 0.0f, as a C `for` loop does."""
    acc = np.zeros(terms.shape[1:], dtype=np.float32)
    for t in terms:
        acc += t
    return acc


def _first_absmax(v: np.ndarray, axis: int) -> np.ndarray:
    """The signed value of largest magnitude, the first one on ties (C's `if (ax > amax)`).

    When every value is zero the C loop never fires and keeps its initial +0.0, even if the values
    are -0.0; the sign matters because it survives into the half-precision scale's bytes.
    """
    idx = np.expand_dims(np.argmax(np.abs(v), axis=axis), axis)
    peak = np.take_along_axis(v, idx, axis=axis).squeeze(axis)
    return np.where(peak == 0, np.float32(0), peak)


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """[m, 256] values 0..3 -> [m, 64] bytes: per 128 values, byte l holds l, l+32, l+64, l+96."""
    q = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_2bit`: [m, 64] -> [m, 256] values 0..3."""
    q = qs.reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((q >> shifts) & 3).reshape(-1, 256)


def _pack_scales_6bit(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins -> 12 bytes."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    low = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    high = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return np.concatenate([low, mid, high], axis=1)


def _unpack_scales_6bit(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_pack_scales_6bit`: 12 bytes -> (scales [m, 8], mins [m, 8]) as uint8."""
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    ls = np.concatenate([low & 63, (high & 0xF) | ((low >> 6) << 4)], axis=1)
    lm = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=1)
    return ls, lm


def _pack_scales_q3k(levels: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales -> 12 bytes (low nibbles in 0..7, top 2 bits in 8..11)."""
    lv = levels.astype(np.uint8)
    low = (lv[:, :8] & 0xF) | ((lv[:, 8:] & 0xF) << 4)
    top = (lv >> 4).reshape(-1, 4, 4)  # [m, j // 4, j % 4]
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return np.concatenate([low, high], axis=1)


def _unpack_scales_q3k(packed: np.ndarray) -> np.ndarray:
    """Inverse of `_pack_scales_q3k`: 12 bytes -> [m, 16] values 0..63."""
    low = np.concatenate([packed[:, :8] & 0xF, packed[:, :8] >> 4], axis=1)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)
    top = (packed[:, None, 8:12] >> shifts) & 3  # [m, j // 4, j % 4]
    return low | (top.reshape(-1, 16) << 4)


# --------------------------------------------------------------------------- float types


def quantize_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype="<f4")
    return x.view(np.uint8).reshape(*x.shape[:-1], x.shape[-1] * 4)


def dequantize_f32(q: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(q).view("<f4").astype(np.float32)


def quantize_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x, dtype=np.float32).astype("<f2")
    return x.view(np.uint8).reshape(*x.shape[:-1], x.shape[-1] * 2)


def dequantize_f16(q: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(q).view("<f2").astype(np.float32)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even; NaNs stay NaN (made quiet), as ggml_compute_fp32_to_bf16."""
    bits = np.ascontiguousarray(x, dtype="<f4").view(np.uint32).astype(np.uint64)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    half = np.where(is_nan, (bits >> 16) | 64, rounded).astype("<u2")
    return half.view(np.uint8).reshape(*half.shape[:-1], half.shape[-1] * 2)


def dequantize_bf16(q: np.ndarray) -> np.ndarray:
    half = np.ascontiguousarray(q).view("<u2").astype(np.uint32)
    return (half << 16).view(np.float32)


# --------------------------------------------------------------------------- 32-element blocks


def _q8_0_blocks(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    d = amax / F32(127)
    inv = np.where(d != 0, F32(1) / d, F32(0)).astype(np.float32)
    scaled = x * inv[:, None]
    # roundf: halves away from zero (x - trunc(x) is exact, so this has no double rounding)
    whole = np.trunc(scaled)
    q = whole + np.where(np.abs(scaled - whole) >= 0.5, np.sign(scaled), 0)
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def _q8_0_values(b: np.ndarray) -> np.ndarray:
    d = _f16_from(b[:, 0:2])
    return d[:, None] * b[:, 2:].view(np.int8).astype(np.float32)


def _signed_absmax_scale(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: d = (value of largest magnitude) / -levels, and 1/d (0 where d is 0)."""
    d = _first_absmax(x, axis=1) / F32(-levels)
    inv = np.where(d != 0, F32(1) / d, F32(0)).astype(np.float32)
    return d, inv


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Elements j in the low nibble and j + 16 in the high nibble of byte j."""
    return (lo & 0xF) | ((hi & 0xF) << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 values, as a little-endian uint32 (element j at bit j)."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def _q4_0_blocks(x: np.ndarray) -> np.ndarray:
    d, inv = _signed_absmax_scale(x, 8)
    q = np.minimum(15, np.trunc(x * inv[:, None] + F32(8.5))).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _q4_0_values(b: np.ndarray) -> np.ndarray:
    d = _f16_from(b[:, 0:2])
    q = np.concatenate([b[:, 2:] & 0xF, b[:, 2:] >> 4], axis=1).astype(np.float32)
    return d[:, None] * (q - 8)


def _q5_0_blocks(x: np.ndarray) -> np.ndarray:
    d, inv = _signed_absmax_scale(x, 16)
    q = np.minimum(31, np.trunc(x * inv[:, None] + F32(16.5))).astype(np.uint8)
    return np.concatenate(
        [_f16_bytes(d), _fifth_bits(q), _nibbles(q[:, :16], q[:, 16:])], axis=1
    )


def _five_bit_levels(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    high = (qh.copy().view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
    low = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    return (low | (high.astype(np.uint8) << 4)).astype(np.float32)


def _q5_0_values(b: np.ndarray) -> np.ndarray:
    d = _f16_from(b[:, 0:2])
    return d[:, None] * (_five_bit_levels(b[:, 2:6], b[:, 6:]) - 16)


def _q5_1_blocks(x: np.ndarray) -> np.ndarray:
    # the first extremes, as C's `if (v < min)` keeps them: that fixes the signs of zeros
    lo = np.take_along_axis(x, np.argmin(x, axis=1)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(x, np.argmax(x, axis=1)[:, None], axis=1)[:, 0]
    d = (hi - lo) / F32(31)
    inv = np.where(d != 0, F32(1) / d, F32(0)).astype(np.float32)
    q = np.trunc((x - lo[:, None]) * inv[:, None] + F32(0.5)).astype(np.uint8)
    return np.concatenate(
        [_f16_bytes(d), _f16_bytes(lo), _fifth_bits(q), _nibbles(q[:, :16], q[:, 16:])], axis=1
    )


def _q5_1_values(b: np.ndarray) -> np.ndarray:
    d = _f16_from(b[:, 0:2])
    m = _f16_from(b[:, 2:4])
    return d[:, None] * _five_bit_levels(b[:, 4:8], b[:, 8:]) + m[:, None]


# --------------------------------------------------------------------------- K-quant searches
# All of these take sub-blocks along axis 1: x has shape [n, m] (n values of each of m groups),
# so that the loops over the n values run in C order and each step is vectorised over m.


def _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    """Scale and min for `x ~= scale * L - min` with L in 0..nmax (llama.cpp make_qkx2_quants).

    Tries nstep+1 stretched scales, refits scale and min by weighted least squares for each
    and keeps the best weighted error. Returns (scale [m], min [m] >= 0, L [n, m] float32).
    """
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    sum_w = weights[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo)

    def error(scale, offset, levels):
        diff = scale * levels + offset - x
        return _ordered_sum(weights * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    levels = _round_clip(iscale * (x - lo), 0, nmax)
    best = error(scale, lo, levels)
    for step in range(nstep + 1):
        # like llama.cpp, later steps measure from the best min found so far
        span = np.where(flat, F32(1), hi - lo)
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
        trial = _round_clip(iscale * (x - lo), 0, nmax)
        wl = weights * trial
        sum_l = _ordered_sum(wl)
        sum_l2 = _ordered_sum(wl * trial)
        sum_xl = _ordered_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive_min = this_min > 0
        this_min = np.where(positive_min, F32(0), this_min)
        this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
        err = error(this_scale, this_min, trial)
        better = (det > 0) & (err < best) & ~flat
        levels = np.where(better, trial, levels)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    scale = np.where(flat, F32(0), scale)
    levels = np.where(flat, F32(0), levels)
    return scale, -lo, levels


def _make_qx_quants(x, nmax):
    """Symmetric scale for L in -nmax..nmax-1 weighted by x^2 (make_qx_quants, rmse_type 1).

    Returns (scale [m], L + nmax [n, m]); all-zero groups give scale 0 and L 0.
    """
    peak = _first_absmax(x, axis=0)
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    w = x * x
    wx = w * x

    def fit(iscale):
        levels = _round_clip(iscale * x, -nmax, nmax - 1)
        wl = w * levels
        return levels, _ordered_sum(wx * levels), _ordered_sum(wl * levels)

    levels, sumlx, suml2 = fit(F32(-nmax) / peak)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        trial, sumlx, suml2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better, trial, levels)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), levels + nmax)


def _make_q3_quants(x, nmax):
    """Symmetric 3-bit fit with coordinate-descent refinement (make_q3_quants, do_rmse)."""
    peak = _first_absmax(x, axis=0)
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak)
    levels = _round_clip((F32(-nmax) / peak) * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _ordered_sum(wx * levels)
    suml2 = _ordered_sum(w * levels * levels)
    for _ in range(5):
        changed = np.zeros(x.shape[1], dtype=bool)
        for i in range(x.shape[0]):
            li = levels[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = _round_clip(x[i] * sl2 / slx, -nmax, nmax - 1)
            slx = slx + wx[i] * new_l
            sl2 = sl2 + w[i] * new_l * new_l
            accept = (
                (sumlx - wx[i] * li > 0)
                & (new_l != li)
                & (sl2 > 0)
                & (slx * slx * suml2 > sumlx * sumlx * sl2)
            )
            levels[i] = np.where(accept, new_l, li)
            sumlx = np.where(accept, slx, sumlx)
            suml2 = np.where(accept, sl2, suml2)
            changed |= accept
        if not changed.any():  # an unchanged group stays unchanged: C's early break is a no-op
            break
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), levels + nmax)


def _subblocks(x: np.ndarray, size: int) -> np.ndarray:
    """[m, 256] -> [size, m * 256 / size]: one column per sub-block, in block order."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _from_subblocks(v: np.ndarray, m: int) -> np.ndarray:
    return v.T.reshape(m, -1)


# --------------------------------------------------------------------------- K-quant blocks


def _asymmetric_k_blocks(x, nmax, rmin, rdelta, nstep):
    """Shared front half of Q4_K (nmax 15) and Q5_K (nmax 31): levels and 6-bit scales."""
    m = x.shape[0]
    xs = _subblocks(x, 32)
    av_x = np.sqrt(_ordered_sum(xs * xs) / F32(32))
    weights = av_x + np.abs(xs)
    scales, mins, levels = _make_qkx2_quants(xs, weights, nmax, rmin, rdelta, nstep, False)
    scales, mins = scales.reshape(m, 8), mins.reshape(m, 8)
    levels = _from_subblocks(levels, m)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF)
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF)
    d = max_scale / F32(63)
    dmin = max_min / F32(63)
    eff_d = _f16_round(d)[:, None] * ls.astype(np.float32)
    eff_m = _f16_round(dmin)[:, None] * lm.astype(np.float32)
    xb = x.reshape(m, 8, 32)
    requant = _round_clip((xb + eff_m[..., None]) / eff_d[..., None], 0, nmax)
    levels = np.where((eff_d != 0)[..., None], requant, levels.reshape(m, 8, 32))
    head = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_6bit(ls, lm)], axis=1)
    return head, levels.reshape(m, 256).astype(np.uint8)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    head, q = _asymmetric_k_blocks(x, 15, -1.0, 0.1, 20)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    head, q = _asymmetric_k_blocks(x, 31, -0.5, 0.1, 15)
    q = q.reshape(-1, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    top = (q >> 4).astype(np.uint8)  # [m, pair, half, j]: bit 2*pair+half of qh[j]
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    qh = np.bitwise_or.reduce((top << shifts).reshape(-1, 8, 32), axis=1)
    return np.concatenate([head, qh, qs], axis=1)


def _asymmetric_k_values(b, levels):
    d = _f16_from(b[:, 0:2])
    dmin = _f16_from(b[:, 2:4])
    ls, lm = _unpack_scales_6bit(b[:, 4:16])
    eff_d = d[:, None] * ls.astype(np.float32)
    eff_m = dmin[:, None] * lm.astype(np.float32)
    values = eff_d[..., None] * levels.reshape(-1, 8, 32).astype(np.float32) - eff_m[..., None]
    return values.reshape(-1, 256)


def _q4_k_values(b: np.ndarray) -> np.ndarray:
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    levels = np.concatenate([qs & 0xF, qs >> 4], axis=2)
    return _asymmetric_k_values(b, levels)


def _q5_k_values(b: np.ndarray) -> np.ndarray:
    qh = b[:, 16:48].reshape(-1, 1, 1, 32)
    qs = b[:, 48:176].reshape(-1, 4, 1, 32)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=2)
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    return _asymmetric_k_values(b, low | (((qh >> shifts) & 1) << 4))


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    m = x.shape[0]
    scales, levels = _make_qx_quants(_subblocks(x, 16), 32)
    scales = scales.reshape(m, 16)
    levels = _from_subblocks(levels, m).reshape(m, 16, 16)
    max_scale = _first_absmax(scales, axis=1)
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d = F32(1) / iscale
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    eff_d = _f16_round(d)[:, None] * sc.astype(np.float32)
    requant = _round_clip(x.reshape(m, 16, 16) / eff_d[..., None], -32, 31) + 32
    q = np.where((eff_d != 0)[..., None], requant, levels).astype(np.uint8).reshape(m, 2, 4, 32)
    ql = np.concatenate(
        [(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)],
        axis=2,
    ).reshape(m, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    out = np.concatenate([ql, qh.reshape(m, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)
    out[empty] = 0
    return out


def _q6_k_values(b: np.ndarray) -> np.ndarray:
    ql = b[:, 0:128].reshape(-1, 2, 64)
    qh = b[:, 128:192].reshape(-1, 2, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16_from(b[:, 208:210])
    low = np.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (low | (high << 4)).astype(np.float32) - 32  # [m, half, quarter, 32]
    eff_d = (d[:, None] * sc).reshape(-1, 16, 1)
    return (eff_d * q.reshape(-1, 16, 16)).reshape(-1, 256)


def _q3_k_blocks(x: np.ndarray) -> np.ndarray:
    m = x.shape[0]
    scales, levels = _make_q3_quants(_subblocks(x, 16), 4)
    scales = scales.reshape(m, 16)
    levels = _from_subblocks(levels, m).reshape(m, 16, 16)
    max_scale = _first_absmax(scales, axis=1)
    has_scale = max_scale != 0
    iscale = F32(-32) / np.where(has_scale, max_scale, F32(1))
    stored = np.clip(np.rint(iscale[:, None] * scales), -32, 31) + 32
    stored = np.where(has_scale[:, None], stored, 0).astype(np.uint8)
    d = np.where(has_scale, F32(1) / iscale, F32(0))
    eff_d = _f16_round(d)[:, None] * (stored.astype(np.float32) - 32)
    requant = _round_clip(x.reshape(m, 16, 16) / eff_d[..., None], -4, 3) + 4
    q = np.where((eff_d != 0)[..., None], requant, levels).astype(np.uint8).reshape(m, 256)
    high = (q > 3).reshape(m, 8, 32)  # bit b of hmask[j] is the high bit of value 32*b + j
    hmask = np.bitwise_or.reduce(high.astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    q = np.where(q > 3, q - 4, q)
    return np.concatenate([hmask, _pack_2bit(q), _pack_scales_q3k(stored), _f16_bytes(d)], axis=1)


def _q3_k_values(b: np.ndarray) -> np.ndarray:
    hmask = b[:, 0:32]
    low = _unpack_2bit(b[:, 32:96]).reshape(-1, 8, 32)
    sc = _unpack_scales_q3k(b[:, 96:108]).astype(np.float32) - 32
    d = _f16_from(b[:, 108:110])
    high = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = low.astype(np.float32) - np.where(high == 1, F32(0), F32(4))
    eff_d = (d[:, None] * sc).reshape(-1, 16, 1)
    return (eff_d * q.reshape(-1, 16, 16)).reshape(-1, 256)


def _q2_k_blocks(x: np.ndarray) -> np.ndarray:
    m = x.shape[0]
    xs = _subblocks(x, 16)
    scales, mins, levels = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(m, 16), mins.reshape(m, 16)
    levels = _from_subblocks(levels, m).reshape(m, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = F32(15) / np.where(max_scale > 0, max_scale, F32(1))
    inv_min = F32(15) / np.where(max_min > 0, max_min, F32(1))
    ls = np.where(max_scale[:, None] > 0, np.rint(inv_scale[:, None] * scales), 0).astype(np.int64)
    lm = np.where(max_min[:, None] > 0, np.rint(inv_min[:, None] * mins), 0).astype(np.int64)
    packed = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    d = np.where(max_scale > 0, max_scale / F32(15), F32(0))
    dmin = np.where(max_min > 0, max_min / F32(15), F32(0))
    eff_d = _f16_round(d)[:, None] * (packed & 0xF).astype(np.float32)
    eff_m = _f16_round(dmin)[:, None] * (packed >> 4).astype(np.float32)
    requant = _round_clip((x.reshape(m, 16, 16) + eff_m[..., None]) / eff_d[..., None], 0, 3)
    q = np.where((eff_d != 0)[..., None], requant, levels).reshape(m, 256)
    return np.concatenate([packed, _pack_2bit(q), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _q2_k_values(b: np.ndarray) -> np.ndarray:
    sc = b[:, 0:16]
    q = _unpack_2bit(b[:, 16:80]).astype(np.float32).reshape(-1, 16, 16)
    d = _f16_from(b[:, 80:82])
    dmin = _f16_from(b[:, 82:84])
    eff_d = d[:, None] * (sc & 0xF).astype(np.float32)
    eff_m = dmin[:, None] * (sc >> 4).astype(np.float32)
    return (eff_d[..., None] * q - eff_m[..., None]).reshape(-1, 256)


# --------------------------------------------------------------------------- public table


@dataclasses.dataclass(frozen=True)
class QuantType:
    name: str
    type_id: int  # ggml_type
    block_size: int  # values per block
    type_size: int  # bytes per block
    quantize: Callable[[np.ndarray], np.ndarray]
    dequantize: Callable[[np.ndarray], np.ndarray]

    def row_bytes(self, n: int) -> int:
        if n % self.block_size:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of {self.block_size}")
        return n // self.block_size * self.type_size


def _block_codec(block: int, type_size: int, encode, decode):
    def quantize(x: np.ndarray) -> np.ndarray:
        return _encode(x, block, type_size, encode)

    def dequantize(q: np.ndarray) -> np.ndarray:
        return _decode(q, block, type_size, decode)

    return quantize, dequantize


quantize_q8_0, dequantize_q8_0 = _block_codec(32, 34, _q8_0_blocks, _q8_0_values)
quantize_q4_0, dequantize_q4_0 = _block_codec(32, 18, _q4_0_blocks, _q4_0_values)
quantize_q5_0, dequantize_q5_0 = _block_codec(32, 22, _q5_0_blocks, _q5_0_values)
quantize_q5_1, dequantize_q5_1 = _block_codec(32, 24, _q5_1_blocks, _q5_1_values)
quantize_q2_k, dequantize_q2_k = _block_codec(QK_K, 84, _q2_k_blocks, _q2_k_values)
quantize_q3_k, dequantize_q3_k = _block_codec(QK_K, 110, _q3_k_blocks, _q3_k_values)
quantize_q4_k, dequantize_q4_k = _block_codec(QK_K, 144, _q4_k_blocks, _q4_k_values)
quantize_q5_k, dequantize_q5_k = _block_codec(QK_K, 176, _q5_k_blocks, _q5_k_values)
quantize_q6_k, dequantize_q6_k = _block_codec(QK_K, 210, _q6_k_blocks, _q6_k_values)

QUANT_TYPES: dict[str, QuantType] = {
    t.name: t
    for t in (
        QuantType("f32", 0, 1, 4, quantize_f32, dequantize_f32),
        QuantType("f16", 1, 1, 2, quantize_f16, dequantize_f16),
        QuantType("q4_0", 2, 32, 18, quantize_q4_0, dequantize_q4_0),
        QuantType("q5_0", 6, 32, 22, quantize_q5_0, dequantize_q5_0),
        QuantType("q5_1", 7, 32, 24, quantize_q5_1, dequantize_q5_1),
        QuantType("q8_0", 8, 32, 34, quantize_q8_0, dequantize_q8_0),
        QuantType("q2_k", 10, QK_K, 84, quantize_q2_k, dequantize_q2_k),
        QuantType("q3_k", 11, QK_K, 110, quantize_q3_k, dequantize_q3_k),
        QuantType("q4_k", 12, QK_K, 144, quantize_q4_k, dequantize_q4_k),
        QuantType("q5_k", 13, QK_K, 176, quantize_q5_k, dequantize_q5_k),
        QuantType("q6_k", 14, QK_K, 210, quantize_q6_k, dequantize_q6_k),
        QuantType("bf16", 30, 1, 2, quantize_bf16, dequantize_bf16),
    )
}
QUANT_TYPES_BY_ID: dict[int, QuantType] = {t.type_id: t for t in QUANT_TYPES.values()}


# --------------------------------------------------------------------------- methods and mixtures


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    name: str  # canonical, e.g. "q4_k_m"
    file_type: int  # llama_ftype, written as general.file_type
    base_type: str  # the type most tensors get


QUANT_METHODS: dict[str, QuantMethod] = {
    m.name: m
    for m in (
        QuantMethod("f32", 0, "f32"),
        QuantMethod("f16", 1, "f16"),
        QuantMethod("q4_0", 2, "q4_0"),
        QuantMethod("q8_0", 7, "q8_0"),
        QuantMethod("q5_0", 8, "q5_0"),
        QuantMethod("q5_1", 9, "q5_1"),
        QuantMethod("q2_k", 10, "q2_k"),
        QuantMethod("q3_k_m", 12, "q3_k"),
        QuantMethod("q4_k_m", 15, "q4_k"),
        QuantMethod("q5_k_m", 17, "q5_k"),
        QuantMethod("q6_k", 18, "q6_k"),
        QuantMethod("bf16", 32, "bf16"),
    )
}

# Names users type (Unsloth's quantization_method values, llama-quantize's short forms).
METHOD_ALIASES = {
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "not_quantized": "f16",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "q3_k": "q3_k_m",
    "float16": "f16",
    "float32": "f32",
    "bfloat16": "bf16",
}


def resolve_quant_method(name: str) -> QuantMethod:
    """Map a user-facing method name (case-insensitive) to its `QuantMethod`."""
    if not isinstance(name, str):
        raise TypeError(f"quantization method must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = METHOD_ALIASES.get(key, key)
    if key not in QUANT_METHODS:
        valid = sorted(set(QUANT_METHODS) | set(METHOD_ALIASES))
        raise ValueError(f"unknown GGUF quantization method {name!r}; valid names: {', '.join(valid)}")
    return QUANT_METHODS[key]


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth of layers, and every third in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


# Types whose blocks do not fit a row length, replaced by a 32-wide type as llama.cpp does.
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def _fallback(type_name: str, row_length: int) -> str:
    if row_length % QUANT_TYPES[type_name].block_size == 0:
        return type_name
    smaller = _FALLBACK.get(type_name, type_name)
    return smaller if row_length % QUANT_TYPES[smaller].block_size == 0 else "f16"


def _is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes only >=2-D weights that are not norms."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _mixture(category: str, layer: int, n_layers: int, method: str, base: str, n_gqa: int) -> str:
    """The type llama.cpp's mixture picks for one quantized tensor (before shape fallbacks)."""
    if category == "attn_v":
        if method == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if method == "q3_k_m":
            return "q5_k" if layer < 2 else "q4_k"
        if method in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layers):
            return "q6_k"
    elif category == "ffn_down":
        if method == "q2_k":
            return "q3_k"
        if method == "q3_k_m":
            return "q5_k" if layer < n_layers // 16 else "q4_k"
        if method in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layers):
            return "q6_k"
    elif category == "attn_output":
        if method == "q2_k":
            return "q3_k"
        if method == "q3_k_m":
            return "q4_k"
    return base


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part, category in (
        ("attn_qkv.weight", "attn_v"),  # fused QKV (phi3) follows the attn_v rules
        ("attn_v.weight", "attn_v"),
        ("attn_output.weight", "attn_output"),
        ("ffn_down", "ffn_down"),
    ):
        if part in name:
            return category
    return "other"


def tensor_type(
    name: str,
    layer: int | None,
    n_layers: int,
    method: str | QuantMethod,
    *,
    shape: tuple[int, ...],
    n_gqa: int = 1,
    tied_embeddings: bool = False,
) -> str:
    """The GGML type name llama-quantize gives tensor `name` of logical (numpy) `shape`.

    `layer` is the block index (None outside blocks), `n_gqa` = query heads / KV heads, and
    `tied_embeddings` says the file has no output.weight (token_embd then follows output's rule).
    Not modelled: llama.cpp's extra rules for MoE (n_expert > 1), Falcon and 70B models.
    """
    spec = method if isinstance(method, QuantMethod) else resolve_quant_method(method)
    shape = tuple(int(s) for s in shape)
    if not _is_quantizable(name, shape):
        return "f32"
    base = spec.base_type
    if base in ("f32", "f16", "bf16"):
        return base
    row = shape[-1]
    category = _category(name)
    if category == "output" or (category == "token_embd" and tied_embeddings):
        if row % QUANT_TYPES[base].block_size != 0:
            chosen = "q8_0"
        else:
            chosen = base if base == "q8_0" else "q6_k"
    elif category == "token_embd":
        chosen = base
    else:
        if layer is None:
            match = re.match(r"blk\.(\d+)\.", name)
            layer = int(match.group(1)) if match else 0
        chosen = _mixture(category, layer, n_layers, spec.name, base, n_gqa)
    return _fallback(chosen, row)
