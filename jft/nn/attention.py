"""Attention with GQA, positions, segment ids (packing / padding), sliding windows and softcapping.

The mask is built from explicit positions and segment ids instead of a [T, S] causal triangle, so one
function serves training on packed rows, left-padded batches and decoding from a KV cache:
a query may see a key iff k_pos <= q_pos, the segments are equal, and q_pos - k_pos < window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a fully masked row (padding) gives a uniform row instead of NaN


def attention_mask(q_positions, k_positions, q_segments, k_segments, window=None):
    """Boolean [B, T, S] mask; `window` may be a traced scalar (per-layer under scan) or None."""
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]
    allowed = (kp <= qp) & (q_segments[:, :, None] == k_segments[:, None, :])
    if window is not None:
        allowed &= qp - kp < window
    return allowed


def xla_attention(q, k, v, mask, *, scale: float, softcap: float | None = None):
    """q [B,T,Hq,hd], k/v [B,S,Hkv,hd], mask [B,T,S] -> [B,T,Hq,hd]; softmax statistics in fp32."""
    b, t, hq, hd = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, hd)


def causal_attention(q, k, v, *, scale: float, window: int | None = None, implementation: str | None = "cudnn"):
    """Plain causal attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

    No [T, S] mask is built, so memory stays linear in T. It ignores positions and segments, so it is
    exact only for rows that are one sequence each, padded on the right (real tokens never look
    right): unpacked training batches. `window`: the sliding window (q - k < window).
    """
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                        implementation=implementation)
