"""Fused lm_head matmul + cross-entropy that never materialises the [N, V] logits.

    z = softcap(logit_scale * hidden @ weight.T),  softcap(l) = c * tanh(l / c)  (Gemma-2)
    lse = logsumexp(z, -1),  loss = lse - z[label]  (0 where label == ignore_index)

Both come back per token in fp32. The work is chunked over tokens (`chunk_size`) and vocabulary
(`vocab_chunk_size`); only a [chunk_size, vocab_chunk_size] tile of logits exists at a time. When
the weight is differentiated, the backward pass recomputes each tile and produces d(hidden) and
d(weight); the vocabulary loop is the outer one there, so d(weight) is written in place chunk by
chunk and never accumulated in fp32 as a whole. When it is frozen (QLoRA's lm_head), the forward
pass also accumulates what d(hidden) needs, and the backward pass touches no logits at all.

The reference and the Pallas version share this chunked driver and differ only in the per-tile
functions (statistics of a tile in the forward, d(logits) of a tile in the backward), which the
Pallas version runs as fused kernels. Labels outside [0, V) other than ignore_index give
loss = lse (their label logit is taken as 0).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jft.kernels import registry
from jft.kernels.registry import cdiv, next_pow2


class _Config(NamedTuple):
    ignore_index: int
    softcap: float | None
    logit_scale: float
    chunk_size: int
    vocab_chunk_size: int
    tiles: str  # "reference" or "pallas"


def _check(hidden, weight, labels, cfg):
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: expected hidden [N, D] and weight [V, D], got {hidden.shape}, {weight.shape}"
        )
    if labels.shape != hidden.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"linear_cross_entropy: labels must be integer [N], got {labels.dtype}{labels.shape}")
    if cfg.chunk_size < 1 or cfg.vocab_chunk_size < 1:
        raise ValueError("linear_cross_entropy: chunk sizes must be positive")
    if cfg.softcap is not None and cfg.softcap <= 0:
        raise ValueError(f"linear_cross_entropy: softcap must be positive, got {cfg.softcap}")


# ----------------------------------------------------------------------------- per-tile math
# A tile holds raw logits [rows, cols] (fp32) for vocabulary ids start .. start + cols - 1.
# Columns below `fresh_from` were already covered by the previous chunk (the last vocabulary chunk
# is shifted left to stay in bounds instead of padding the weight), so statistics skip them.


def _transform(logits, cfg):
    z = logits * cfg.logit_scale
    if cfg.softcap is not None:
        z = cfg.softcap * jnp.tanh(z / cfg.softcap)
    return z


def _reference_stats(logits, labels, start, fresh_from, cfg):
    z = _transform(logits, cfg)
    cols = start + jnp.arange(z.shape[1])[None, :]
    fresh = cols >= fresh_from
    z_fresh = jnp.where(fresh, z, -jnp.inf)
    m = jnp.max(z_fresh, axis=1)
    s = jnp.sum(jnp.exp(z_fresh - m[:, None]), axis=1)
    z_label = jnp.sum(jnp.where(fresh & (cols == labels[:, None]), z, 0.0), axis=1)
    return m, s, z_label


def _reference_grad(logits, labels, lse, g_loss, g_lse, start, cfg, dtype):
    z = _transform(logits, cfg)
    cols = start + jnp.arange(z.shape[1])[None, :]
    p = jnp.exp(z - lse[:, None])
    dz = (g_loss + g_lse)[:, None] * p - jnp.where(cols == labels[:, None], g_loss[:, None], 0.0)
    if cfg.softcap is not None:
        dz = dz * (1.0 - jnp.square(z / cfg.softcap))
    return (dz * cfg.logit_scale).astype(dtype)


# Pallas tiles: rows in blocks of ROW_BLOCK, columns in blocks of COL_BLOCK, ragged ends masked.
ROW_BLOCK = 16
COL_BLOCK = 512


def _tile_masks(r0, c0, rows, cols, br, bc):
    row_ids = r0 + jnp.arange(br)
    col_ids = c0 + jnp.arange(bc)
    return row_ids < rows, col_ids < cols, col_ids


def _stats_kernel(logits_ref, labels_ref, bounds_ref, m_ref, s_ref, zl_ref, *, rows, cols, br, bc, cfg):
    r0 = pl.program_id(0) * br
    start, fresh_from = bounds_ref[0], bounds_ref[1]
    row_ok = r0 + jnp.arange(br) < rows
    labels = plgpu.load(labels_ref.at[pl.ds(r0, br)], mask=row_ok, other=0)

    def column_block(j, carry):
        m, s, z_label = carry
        c0 = j * bc
        col_ids = c0 + jnp.arange(bc)
        ok = row_ok[:, None] & (col_ids < cols)[None, :]
        raw = plgpu.load(logits_ref.at[pl.ds(r0, br), pl.ds(c0, bc)], mask=ok, other=0.0)
        z = _transform(raw.astype(jnp.float32), cfg)
        vocab_ids = start + col_ids[None, :]
        counted = ok & (vocab_ids >= fresh_from)
        z_counted = jnp.where(counted, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z_counted, axis=1))
        # rows with nothing counted yet keep m = -inf; use 0 as the shift there to avoid inf - inf
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z_counted - shift[:, None]), axis=1)
        hit = counted & (vocab_ids == labels[:, None])
        z_label = z_label + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
        return m_new, s, z_label

    init = (
        jnp.full((br,), -jnp.inf, jnp.float32),
        jnp.zeros((br,), jnp.float32),
        jnp.zeros((br,), jnp.float32),
    )
    m, s, z_label = jax.lax.fori_loop(0, cdiv(cols, bc), column_block, init)
    plgpu.store(m_ref.at[pl.ds(r0, br)], m, mask=row_ok)
    plgpu.store(s_ref.at[pl.ds(r0, br)], s, mask=row_ok)
    plgpu.store(zl_ref.at[pl.ds(r0, br)], z_label, mask=row_ok)


def _pallas_stats(logits, labels, start, fresh_from, cfg):
    rows, cols = logits.shape
    br, bc = min(ROW_BLOCK, next_pow2(rows)), min(COL_BLOCK, next_pow2(cols))
    bounds = jnp.stack([start, fresh_from]).astype(jnp.int32)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
    row_stat = jax.ShapeDtypeStruct((rows,), jnp.float32)
    kernel = functools.partial(_stats_kernel, rows=rows, cols=cols, br=br, bc=bc, cfg=cfg)
    return pl.pallas_call(
        kernel,
        out_shape=[row_stat] * 3,
        grid=(cdiv(rows, br),),
        in_specs=[whole(logits), whole(labels), whole(bounds)],
        out_specs=[whole(row_stat)] * 3,
        compiler_params=plgpu.CompilerParams(num_warps=8),
        interpret=registry.interpret(),
        name="cross_entropy_stats",
    )(logits, labels.astype(jnp.int32), bounds)


def _grad_kernel(logits_ref, labels_ref, lse_ref, gl_ref, gz_ref, bounds_ref, d_ref, *, rows, cols, br, bc, cfg):
    r0, c0 = pl.program_id(0) * br, pl.program_id(1) * bc
    row_ok, col_ok, col_ids = _tile_masks(r0, c0, rows, cols, br, bc)
    ok = row_ok[:, None] & col_ok[None, :]
    rows_at = pl.ds(r0, br)
    labels = plgpu.load(labels_ref.at[rows_at], mask=row_ok, other=0)
    lse = plgpu.load(lse_ref.at[rows_at], mask=row_ok, other=0.0)
    g_loss = plgpu.load(gl_ref.at[rows_at], mask=row_ok, other=0.0)
    g_lse = plgpu.load(gz_ref.at[rows_at], mask=row_ok, other=0.0)
    raw = plgpu.load(logits_ref.at[rows_at, pl.ds(c0, bc)], mask=ok, other=0.0)
    z = _transform(raw.astype(jnp.float32), cfg)
    is_label = (bounds_ref[0] + col_ids)[None, :] == labels[:, None]
    dz = (g_loss + g_lse)[:, None] * jnp.exp(z - lse[:, None]) - jnp.where(is_label, g_loss[:, None], 0.0)
    if cfg.softcap is not None:
        dz = dz * (1.0 - jnp.square(z / cfg.softcap))
    plgpu.store(d_ref.at[rows_at, pl.ds(c0, bc)], (dz * cfg.logit_scale).astype(d_ref.dtype), mask=ok)


def _pallas_grad(logits, labels, lse, g_loss, g_lse, start, cfg, dtype):
    rows, cols = logits.shape
    br, bc = min(ROW_BLOCK, next_pow2(rows)), min(COL_BLOCK, next_pow2(cols))
    bounds = jnp.reshape(start, (1,)).astype(jnp.int32)
    inputs = (logits, labels.astype(jnp.int32), lse, g_loss, g_lse, bounds)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
    kernel = functools.partial(_grad_kernel, rows=rows, cols=cols, br=br, bc=bc, cfg=cfg)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(logits.shape, dtype),
        grid=(cdiv(rows, br), cdiv(cols, bc)),
        in_specs=[whole(a) for a in inputs],
        out_specs=whole(logits),
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=registry.interpret(),
        name="cross_entropy_grad",
    )(*inputs)


_TILES = {
    "reference": (_reference_stats, _reference_grad),
    "pallas": (_pallas_stats, _pallas_grad),
}


# ----------------------------------------------------------------------------- chunked driver


def _dot_t(a, b):
    """a @ b.T in the operands' common dtype, accumulated in fp32."""
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _token_chunks(cfg, hidden, *per_token):
    """Pad the token axis to a multiple of the chunk and split it: [n_chunks, chunk, ...]."""
    n = hidden.shape[0]
    chunk = min(cfg.chunk_size, n)
    padded = cdiv(n, chunk) * chunk

    def split(a, fill):
        a = jnp.pad(a, [(0, padded - n)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        return a.reshape((padded // chunk, chunk) + a.shape[1:])

    return split(hidden, 0), *(split(a, fill) for a, fill in per_token)


def _vocab_chunk(weight, j, cfg):
    v = weight.shape[0]
    chunk = min(cfg.vocab_chunk_size, v)
    start = jnp.minimum(j * chunk, v - chunk)
    return jax.lax.dynamic_slice_in_dim(weight, start, chunk, axis=0), start, j * chunk


def _expected_row_tile(logits, w, m, start, fresh_from, cfg):
    """sum over this tile's fresh columns v of exp(z_v - m) * t_v * w_v, t_v = dz_v/dlogit_v (1
    without softcap): a tile's share of E[t_v * weight_v] under softmax(z), unnormalised."""
    z = _transform(logits, cfg)
    fresh = start + jnp.arange(z.shape[1])[None, :] >= fresh_from
    e = jnp.where(fresh, jnp.exp(z - m[:, None]), 0.0)
    if cfg.softcap is not None:
        e = e * (1.0 - jnp.square(z / cfg.softcap))
    return jnp.dot(e.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _forward(hidden, weight, labels, cfg, expected_rows: bool = False):
    """(loss, lse) per token; with expected_rows also (z_label, E[t_v * weight_v] under softmax(z))
    per token, accumulated online over vocabulary chunks as flash attention accumulates values: all
    that d(hidden) needs when the weight is frozen, so the backward never recomputes the logits."""
    stats = _TILES[cfg.tiles][0]
    n, v = hidden.shape[0], weight.shape[0]
    n_vocab_chunks = cdiv(v, min(cfg.vocab_chunk_size, v))
    h_chunks, label_chunks = _token_chunks(cfg, hidden, (labels, cfg.ignore_index))
    compute_dtype = jnp.promote_types(hidden.dtype, weight.dtype)

    def token_chunk(xs):
        h, y = xs

        def vocab_step(j, carry):
            m, s, z_label, acc = carry
            w, start, fresh_from = _vocab_chunk(weight, j, cfg)
            logits = _dot_t(h, w)
            m_t, s_t, zl_t = stats(logits, y, start, fresh_from, cfg)
            m_new = jnp.maximum(m, m_t)
            if expected_rows:
                acc = acc * jnp.exp(m - m_new)[:, None] + _expected_row_tile(
                    logits, w.astype(compute_dtype), m_new, start, fresh_from, cfg)
            s = s * jnp.exp(m - m_new) + s_t * jnp.exp(m_t - m_new)
            return m_new, s, z_label + zl_t, acc

        rows = h.shape[0]
        acc = jnp.zeros((rows, h.shape[1])) if expected_rows else None
        init = (jnp.full((rows,), -jnp.inf), jnp.zeros((rows,)), jnp.zeros((rows,)), acc)
        m, s, z_label, acc = jax.lax.fori_loop(0, n_vocab_chunks, vocab_step, init)
        return m + jnp.log(s), z_label, None if acc is None else acc / s[:, None]

    lse, z_label, expected = jax.lax.map(token_chunk, (h_chunks, label_chunks))
    lse, z_label = lse.reshape(-1)[:n], z_label.reshape(-1)[:n]
    loss = jnp.where(labels == cfg.ignore_index, 0.0, lse - z_label)
    if not expected_rows:
        return loss, lse
    return loss, lse, z_label, expected.reshape(-1, hidden.shape[1])[:n]


def _backward(hidden, weight, labels, lse, g_loss, g_lse, cfg):
    grad_tile = _TILES[cfg.tiles][1]
    n, v = hidden.shape[0], weight.shape[0]
    vocab_chunk = min(cfg.vocab_chunk_size, v)
    n_vocab_chunks = cdiv(v, vocab_chunk)
    g_loss = jnp.where(labels == cfg.ignore_index, 0.0, g_loss)
    chunks = _token_chunks(cfg, hidden, (labels, cfg.ignore_index), (lse, 0.0), (g_loss, 0.0), (g_lse, 0.0))
    padded = chunks[0].shape[0] * chunks[0].shape[1]
    compute_dtype = jnp.promote_types(hidden.dtype, weight.dtype)

    def vocab_step(carry, j):
        dh, dw_all = carry
        w, start, fresh_from = _vocab_chunk(weight, j, cfg)
        # columns the previous chunk already covered must not count twice in d(hidden)
        fresh = (start + jnp.arange(vocab_chunk) >= fresh_from)[:, None]
        w_fresh = jnp.where(fresh, w, 0).astype(w.dtype)

        def token_step(dw, xs):
            h, y, lse_c, gl, gz = xs
            d_logits = grad_tile(_dot_t(h, w), y, lse_c, gl, gz, start, cfg, compute_dtype)
            dh_c = jnp.dot(d_logits, w_fresh.astype(d_logits.dtype), preferred_element_type=jnp.float32)
            dw = dw + _dot_t(d_logits.T, h.T)
            return dw, dh_c

        dw, dh_chunks = jax.lax.scan(token_step, jnp.zeros(w.shape, jnp.float32), chunks)
        # written in place; the shifted last chunk rewrites its overlap with the same values
        dw_all = jax.lax.dynamic_update_slice_in_dim(dw_all, dw.astype(weight.dtype), start, axis=0)
        return (dh + dh_chunks.reshape(padded, -1), dw_all), None

    init = (jnp.zeros((padded, hidden.shape[1]), jnp.float32), jnp.zeros(weight.shape, weight.dtype))
    (dh, dw), _ = jax.lax.scan(vocab_step, init, jnp.arange(n_vocab_chunks))
    return dh[:n].astype(hidden.dtype), dw


def _hidden_grad(weight, labels, z_label, expected, g_loss, g_lse, cfg):
    """d(hidden) from the forward's expected rows: d/dh of loss = lse - z_label and of lse."""
    g_loss = jnp.where(labels == cfg.ignore_index, 0.0, g_loss)
    label_row = jnp.take(weight, jnp.clip(labels, 0, weight.shape[0] - 1), axis=0).astype(jnp.float32)
    label_row = jnp.where(((labels >= 0) & (labels < weight.shape[0]))[:, None], label_row, 0.0)
    if cfg.softcap is not None:
        label_row = label_row * (1.0 - jnp.square(z_label / cfg.softcap))[:, None]
    return cfg.logit_scale * ((g_loss + g_lse)[:, None] * expected - g_loss[:, None] * label_row)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear_cross_entropy(hidden, weight, labels, cfg):
    return _forward(hidden, weight, labels, cfg)


def _lce_fwd(hidden, weight, labels, cfg):
    # symbolic_zeros: each primal says whether it is differentiated; a frozen weight (QLoRA's
    # lm_head) needs no d(weight), so d(hidden) is made here, beside the logits, at no extra matmul
    if weight.perturbed:
        loss, lse = _forward(hidden.value, weight.value, labels.value, cfg)
        return (loss, lse), (hidden.value, weight.value, labels.value, lse, None, None)
    loss, lse, z_label, expected = _forward(hidden.value, weight.value, labels.value, cfg, expected_rows=True)
    return (loss, lse), (jnp.zeros((0,), hidden.value.dtype), weight.value, labels.value, lse, z_label, expected)


def _lce_bwd(cfg, res, cotangents):
    hidden, weight, labels, lse, z_label, expected = res  # hidden: an empty array of its dtype when frozen
    g_loss, g_lse = (jnp.zeros_like(lse) if isinstance(g, SymbolicZero) else g for g in cotangents)
    if expected is not None:
        return _hidden_grad(weight, labels, z_label, expected, g_loss, g_lse, cfg).astype(hidden.dtype), None, None
    dh, dw = _backward(hidden, weight, labels, lse, g_loss, g_lse, cfg)
    return dh, dw, None


_linear_cross_entropy.defvjp(_lce_fwd, _lce_bwd, symbolic_zeros=True)


def _make(tiles):
    def linear_cross_entropy(
        hidden,
        weight,
        labels,
        *,
        ignore_index: int = -100,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        chunk_size: int = 4096,
        vocab_chunk_size: int = 8192,
    ):
        cfg = _Config(
            int(ignore_index),
            None if softcap is None else float(softcap),
            float(logit_scale),
            int(chunk_size),
            int(vocab_chunk_size),
            tiles,
        )
        _check(hidden, weight, labels, cfg)
        return _linear_cross_entropy(hidden, weight, labels.astype(jnp.int32), cfg)

    linear_cross_entropy.__name__ = f"linear_cross_entropy_{tiles}"
    linear_cross_entropy.__doc__ = __doc__
    return linear_cross_entropy


linear_cross_entropy_reference = _make("reference")
linear_cross_entropy_pallas = _make("pallas")

registry.register("linear_cross_entropy", linear_cross_entropy_reference)
registry.register_pallas("linear_cross_entropy", linear_cross_entropy_pallas)
