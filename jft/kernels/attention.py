"""Masked softmax attention with GQA, explicit positions, segments, sliding window and softcap.

q [B,T,Hq,hd], k and v [B,S,Hkv,hd] (Hq a multiple of Hkv), q_positions [B,T], k_positions [B,S],
segment ids [B,T] / [B,S] (None: one segment). Key s is visible from query t iff
    k_pos <= q_pos  and  q_seg == k_seg  and  (window is None or q_pos - k_pos < window).
Scores are fp32 q.k * scale (scale defaults to hd**-0.5), softcapped as tanh(s/c)*c before
masking, masked with a large negative finite value, softmax in fp32. A query that sees no key at
all gets a zero output (this only happens for padding).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jft.kernels import registry
from jft.kernels.registry import cdiv, next_pow2

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = 1.4426950408889634


def _check(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention: expected q [B,T,Hq,hd], k = v [B,S,Hkv,hd]; got {q.shape}, {k.shape}, {v.shape}")
    (b, t, hq, hd), (bk, s, hkv, hdk) = q.shape, k.shape
    if b != bk or hd != hdk or hq % hkv:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree (batch, head_dim, or Hq % Hkv)")
    if q_positions.shape != (b, t) or k_positions.shape != (b, s):
        raise ValueError(f"attention: positions {q_positions.shape}, {k_positions.shape} must be [B,T], [B,S]")
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("attention: give both q_segment_ids and k_segment_ids, or neither")
    if q_segment_ids is not None and (q_segment_ids.shape != (b, t) or k_segment_ids.shape != (b, s)):
        raise ValueError(f"attention: segment ids {q_segment_ids.shape}, {k_segment_ids.shape} must be [B,T], [B,S]")


def allowed_mask(q_positions, k_positions, q_segment_ids, k_segment_ids, window):
    """[B, T, S] boolean: which keys each query may attend to."""
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]
    ok = kp <= qp
    if q_segment_ids is not None:
        ok &= q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    if window is not None:
        ok &= qp - kp < window
    return ok


def attention_reference(
    q, k, v, q_positions, k_positions, q_segment_ids=None, k_segment_ids=None,
    *, scale: float | None = None, window: int | None = None, softcap: float | None = None,
):
    _check(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids)
    b, t, hq, hd = q.shape
    hkv = k.shape[2]
    scale = hd**-0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    ok = allowed_mask(q_positions, k_positions, q_segment_ids, k_segment_ids, window)[:, None, None]
    probs = jax.nn.softmax(jnp.where(ok, scores, MASK_VALUE), axis=-1)
    probs = jnp.where(jnp.any(ok, axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------- pallas (flash)
# Forward: one program per (batch, q head, q block) loops over key blocks with an online softmax.
# Backward: one kernel for dq (same grid), one for dk/dv per (batch, kv head, key block) looping
# over the q heads of its group and the q blocks. Loops run over precomputed block ranges, so the
# blocks no key of which is visible (above the causal diagonal, outside the window or the segment)
# are not visited, and the run of blocks wholly visible skips the mask (1.4x on the causal forward).
# Loop bodies have no branches (Triton pipelines their loads). Sequences are padded to whole blocks
# and head_dim to a power of two; padded keys and queries get segment ids that match nothing.

_PAD_Q_SEGMENT = -(2**31)
_PAD_K_SEGMENT = -(2**31) + 1


class _Config(NamedTuple):
    scale: float
    window: int | None
    softcap: float | None
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    stages: int  # software-pipeline depth of the forward and dq loops (dk/dv: 2, more exceeds shared memory)


def _visible(q_pos, q_seg, k_pos, k_seg, window):
    ok = (k_pos[None, :] <= q_pos[:, None]) & (k_seg[None, :] == q_seg[:, None])
    if window is not None:
        ok &= q_pos[:, None] - k_pos[None, :] < window
    return ok


def _dot(a, b, contract=(1, 0)):
    return jax.lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=jnp.float32)


@functools.cache
def _nvidia() -> bool:
    return "cuda" in jax.devices()[0].client.platform_version.lower()


def _exp2(x):
    """2**x. Compiled for an NVIDIA GPU, one ex2.approx.ftz instruction (weights below 2**-126 flush
    to zero): libdevice's exp2f, which jnp.exp2 lowers to, made the forward kernel 7% slower."""
    if registry.interpret() or not _nvidia():
        return jnp.exp2(x)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1, result_shape_dtypes=[out]
    )[0]


def _tanh(x):
    # Through exp2: Triton lowers jnp.tanh to a slow libdevice call; this is exact at both tails.
    return 1.0 - 2.0 / (1.0 + _exp2((2.0 * LOG2E) * x))


def _scores(q, k, cfg):
    """fp32 scores (softcapped) in base-2 units, s * log2(e), and with softcap the tanh needed by the
    backward pass. The kernels' softmax is in base 2: on GPU exp2 is one instruction (_exp2), exp several."""
    s = _dot(q, k, (1, 1))
    if cfg.softcap is None:
        return s * (cfg.scale * LOG2E), None
    t = _tanh(s * (cfg.scale / cfg.softcap))
    return (cfg.softcap * LOG2E) * t, t


def _forward_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, range_ref, o_ref, lse_ref, *, cfg):
    bq, bk = q_ref.shape[0], cfg.block_k
    q, q_pos, q_seg = q_ref[...], qp_ref[...], qs_ref[...]

    def key_block(masked):
        def body(j, carry):
            acc, m, l = carry
            keys = pl.ds(j * bk, bk)
            s, _ = _scores(q, k_ref[keys, :], cfg)
            if masked:
                mask = _visible(q_pos, q_seg, kp_ref[keys], ks_ref[keys], cfg.window)
                s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = _exp2(s - m_new[:, None])
            if masked:
                p = jnp.where(mask, p, 0.0)
            alpha = _exp2(m - m_new)
            v = v_ref[keys, :]
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
            return acc, m_new, l * alpha + jnp.sum(p, axis=1)
        return body

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = _over_ranges(range_ref, _fori(key_block), init)
    seen = l != 0.0  # NaN counts as seen: a NaN input must reach the output, as in the reference
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(safe_l), 0.0)  # base 2, for the backward kernels


def _over_ranges(range_ref, loop, carry):
    """loop(start, stop, masked, carry) over the block range [lo, hi) in three runs, the middle one
    [full_lo, full_hi) (blocks whose keys are all visible) unmasked; range_ref holds the four ends."""
    lo, full_lo, full_hi, hi = (range_ref[i] for i in range(4))
    carry = loop(lo, full_lo, True, carry)
    carry = loop(full_lo, full_hi, False, carry)
    return loop(full_hi, hi, True, carry)


def _fori(body):
    """A loop over blocks start..stop-1 for _over_ranges, from body(masked)(j, carry)."""
    return lambda start, stop, masked, carry: jax.lax.fori_loop(start, stop, body(masked), carry)


def _dq_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, range_ref, dq_ref, *, cfg):
    bk = cfg.block_k_bwd
    q, do, q_pos, q_seg = q_ref[...], do_ref[...], qp_ref[...], qs_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def key_block(masked):
        def body(j, dq):
            keys = pl.ds(j * bk, bk)
            k, v = k_ref[keys, :], v_ref[keys, :]
            s, t = _scores(q, k, cfg)
            p = _exp2(s - lse[:, None])
            if masked:
                p = jnp.where(_visible(q_pos, q_seg, kp_ref[keys], ks_ref[keys], cfg.window), p, 0.0)
            ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            return dq + _dot(ds.astype(k.dtype), k)
        return body

    dq = _over_ranges(range_ref, _fori(key_block), jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, range_ref,
                dk_ref, dv_ref, *, cfg):
    bq = cfg.block_q_bwd
    group = q_ref.shape[1]
    k, v, k_pos, k_seg = k_ref[...], v_ref[...], kp_ref[...], ks_ref[...]

    def q_block(masked, g, i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        lse, delta = lse_ref[g, rows], delta_ref[g, rows]
        s, t = _scores(q, k, cfg)
        p = _exp2(s - lse[:, None])
        if masked:
            p = jnp.where(_visible(qp_ref[rows], qs_ref[rows], k_pos, k_seg, cfg.window), p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    def every_head(start, stop, masked, carry):
        # one flat loop over (q head of the group, q block): a single pipelined loop per run
        blocks = stop - start

        def body(n, carry):
            g = jax.lax.div(n, blocks)  # jnp's // and % do not lower to Triton
            return q_block(masked, g, start + n - g * blocks, carry)

        return jax.lax.fori_loop(0, group * blocks, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _over_ranges(range_ref, every_head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _block_ranges(qp, kp, qs, ks, bq, bk, window):
    """For each (row, q block), int32 [lo, full_lo, full_hi, hi]: the key blocks [lo, hi) from the
    first to the last that holds a key visible to a query of the block, and within it a run
    [full_lo, full_hi) of blocks all of whose keys every query of the block sees (no mask needed);
    and the same for each (row, key block) over q blocks. Shapes [B, nQ, 4] and [B, nK, 4]. Kernels
    loop over these ranges only. Exact, from the (query, key) visibility itself: block statistics
    would let every query of a packed row visit the row's last blocks (a later document's positions
    restart at 0), and with them every block in between."""
    b, t = qp.shape
    s = kp.shape[1]

    def q_blocks(qp_q, qs_q):  # [B, bq] -> any / all visible per key block, [B, nK] each
        ok = jax.vmap(functools.partial(_visible, window=window))(qp_q, qs_q, kp, ks).reshape(b, bq, s // bk, bk)
        return ok.any(axis=(1, 3)), ok.all(axis=(1, 3))

    by_block = lambda a: a.reshape(b, t // bq, bq).swapaxes(0, 1)
    per_step = max(1, 2**24 // (b * bq * s))  # q blocks per step: a [B, bq, S] mask each, at most 16M booleans
    some, full = jax.lax.map(lambda a: q_blocks(*a), (by_block(qp), by_block(qs)), batch_size=per_step)
    some, full = some.swapaxes(0, 1), full.swapaxes(0, 1)  # [B, nQ, nK]

    def ranges(some, full):
        n = some.shape[-1]
        index = jnp.arange(n)
        first = lambda m: jnp.where(jnp.any(m, axis=-1), jnp.argmax(m, axis=-1), n)
        lo = jnp.where(jnp.any(some, axis=-1), first(some), 0)
        hi = jnp.where(jnp.any(some, axis=-1), n - jnp.argmax(some[..., ::-1], axis=-1), 0)
        full_lo = first(full)
        full_hi = first(~full & (index >= full_lo[..., None]))
        full_lo, full_hi = jnp.minimum(full_lo, hi), jnp.minimum(full_hi, hi)  # no full block: an empty run at hi
        return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)

    return ranges(some, full), ranges(jnp.swapaxes(some, 1, 2), jnp.swapaxes(full, 1, 2))


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg, name, stages):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=stages),
        interpret=registry.interpret(),
        name=name,
    )


def _flash_forward(q, k, v, qp, kp, qs, ks, cfg):
    b, t, hq, hd = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group, bq = hq // hkv, cfg.block_q
    key_ranges, _ = _block_ranges(qp, kp, qs, ks, bq, cfg.block_k, cfg.window)
    q_spec = pl.BlockSpec((None, bq, None, hd), lambda b_, h, i: (b_, i, h, 0))
    kv_spec = pl.BlockSpec((None, s, None, hd), lambda b_, h, i: (b_, 0, h // group, 0))
    q_ids = pl.BlockSpec((None, bq), lambda b_, h, i: (b_, i))
    k_ids = pl.BlockSpec((None, s), lambda b_, h, i: (b_, 0))
    q_range = pl.BlockSpec((None, None, 4), lambda b_, h, i: (b_, i, 0))
    lse_spec = pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i))
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)]
    return _call(
        _forward_kernel, (b, hq, t // bq), [q_spec, kv_spec, kv_spec, q_ids, k_ids, q_ids, k_ids, q_range],
        [q_spec, lse_spec], out_shape, cfg, "flash_attention_fwd", cfg.stages,
    )(q, k, v, qp, kp, qs, ks, key_ranges)


def _flash_backward(q, k, v, qp, kp, qs, ks, o, lse, do, cfg):
    b, t, hq, hd = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group, bq, bk = hq // hkv, cfg.block_q_bwd, cfg.block_k_bwd
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    key_ranges, q_ranges = _block_ranges(qp, kp, qs, ks, bq, bk, cfg.window)

    q_spec = pl.BlockSpec((None, bq, None, hd), lambda b_, h, i: (b_, i, h, 0))
    kv_all = pl.BlockSpec((None, s, None, hd), lambda b_, h, i: (b_, 0, h // group, 0))
    q_ids = pl.BlockSpec((None, bq), lambda b_, h, i: (b_, i))
    k_all_ids = pl.BlockSpec((None, s), lambda b_, h, i: (b_, 0))
    row_stat = pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i))
    block_range = pl.BlockSpec((None, None, 4), lambda b_, h, i: (b_, i, 0))
    dq = _call(
        _dq_kernel, (b, hq, t // bq),
        [q_spec, kv_all, kv_all, q_ids, k_all_ids, q_ids, k_all_ids, q_spec, row_stat, row_stat, block_range],
        q_spec, jax.ShapeDtypeStruct(q.shape, q.dtype), cfg, "flash_attention_dq", cfg.stages,
    )(q, k, v, qp, kp, qs, ks, do, lse, delta, key_ranges)

    q_group = pl.BlockSpec((None, t, group, hd), lambda b_, h, j: (b_, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bk, None, hd), lambda b_, h, j: (b_, j, h, 0))
    q_all_ids = pl.BlockSpec((None, t), lambda b_, h, j: (b_, 0))
    k_ids = pl.BlockSpec((None, bk), lambda b_, h, j: (b_, j))
    group_stat = pl.BlockSpec((None, group, t), lambda b_, h, j: (b_, h, 0))
    dk, dv = _call(
        _dkv_kernel, (b, hkv, s // bk),
        [q_group, kv_spec, kv_spec, q_all_ids, k_ids, q_all_ids, k_ids, q_group, group_stat, group_stat, block_range],
        [kv_spec, kv_spec], [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cfg, "flash_attention_dkv", 2,
    )(q, k, v, qp, kp, qs, ks, do, lse, delta, q_ranges)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qp, kp, qs, ks, cfg):
    return _flash_forward(q, k, v, qp, kp, qs, ks, cfg)[0]


def _flash_fwd(q, k, v, qp, kp, qs, ks, cfg):
    o, lse = _flash_forward(q, k, v, qp, kp, qs, ks, cfg)
    return o, (q, k, v, qp, kp, qs, ks, o, lse)


def _flash_bwd(cfg, res, do):
    dq, dk, dv = _flash_backward(*res, do, cfg)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(a, axis, size, fill=0):
    if a.shape[axis] == size:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths, constant_values=fill)


def _block(requested, length):
    return max(16, min(requested, next_pow2(length)))  # Triton dots need tiles of at least 16


def attention_pallas(
    q, k, v, q_positions, k_positions, q_segment_ids=None, k_segment_ids=None,
    *, scale: float | None = None, window: int | None = None, softcap: float | None = None,
    block_q: int | None = None, block_k: int | None = None,
    block_q_bwd: int | None = None, block_k_bwd: int | None = None,
):
    _check(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids)
    b, t, hq, hd = q.shape
    s = k.shape[1]
    hd_padded = max(16, next_pow2(hd))
    row_bytes = hd_padded * jnp.dtype(q.dtype).itemsize  # shared memory grows with it
    wide, wider = row_bytes > 256, row_bytes > 512  # bf16 at hd 256 or float32 at hd 128; float32 at hd 256
    cfg = _Config(
        scale=float(hd**-0.5 if scale is None else scale),
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
        # the fastest of a sweep on the H200 (docs/benchmarks.md); wider tiles or deeper pipelines
        # exceed shared memory at wider rows
        block_q=_block(block_q or (64 if wider else 128), t),
        block_k=_block(block_k or (32 if wider else 64), s),
        block_q_bwd=_block(block_q_bwd or (32 if wider else 64 if wide else 128), t),
        block_k_bwd=_block(block_k_bwd or (32 if wider else 64), s),
        num_warps=4 if hd_padded <= 64 else 8,
        stages=2 if wide else 3,
    )
    t_pad = cdiv(t, max(cfg.block_q, cfg.block_q_bwd)) * max(cfg.block_q, cfg.block_q_bwd)
    s_pad = cdiv(s, max(cfg.block_k, cfg.block_k_bwd)) * max(cfg.block_k, cfg.block_k_bwd)
    if q_segment_ids is None:
        q_segment_ids, k_segment_ids = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    ints = lambda a, n, fill: _pad_axis(a.astype(jnp.int32), 1, n, fill)
    heads = lambda a, n: _pad_axis(_pad_axis(a, 3, hd_padded), 1, n)
    out = _flash(
        heads(q, t_pad), heads(k, s_pad), heads(v, s_pad),
        ints(q_positions, t_pad, 0), ints(k_positions, s_pad, 0),
        ints(q_segment_ids, t_pad, _PAD_Q_SEGMENT), ints(k_segment_ids, s_pad, _PAD_K_SEGMENT),
        cfg,
    )
    return out[:, :t, :, :hd]


registry.register("attention", attention_reference)
registry.register_pallas("attention", attention_pallas)
