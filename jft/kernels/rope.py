"""Rotary position embedding on q and k together, Hugging Face split-half layout.

For the rotated dims x = [x1, x2] (halves of the first rotary_dim = 2 * len(inv_freq) dims):
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin],   angle = position * inv_freq
which is HF's `x * cos + rotate_half(x) * sin`. Dims past rotary_dim pass through (partial rotary).
Positions are explicit [B, T] integers (packing restarts them). RoPE scaling (linear, llama3, ...)
only changes inv_freq, which is an input; `attention_scaling` multiplies cos and sin as HF does for
the yarn/longrope variants. Computed in fp32, cast back to the input dtype. No gradient flows to
positions or inv_freq.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jft.kernels import registry
from jft.kernels.registry import next_pow2, unchecked_start


def _check(q, k, positions, inv_freq):
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: expected q [B,T,Hq,hd] and k [B,T,Hkv,hd], got {q.shape}, {k.shape}")
    if positions.shape != q.shape[:2]:
        raise ValueError(f"rope: positions {positions.shape} must be [B, T] = {q.shape[:2]}")
    if inv_freq.ndim != 1 or 2 * inv_freq.shape[0] > q.shape[-1]:
        raise ValueError(f"rope: inv_freq {inv_freq.shape} must be [rotary_dim/2] with rotary_dim <= {q.shape[-1]}")


def cos_sin(positions, inv_freq, attention_scaling: float = 1.0):
    """fp32 cos and sin of position * inv_freq, [B, T, rotary_dim / 2] each."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    return jnp.cos(angles) * attention_scaling, jnp.sin(angles) * attention_scaling


# ----------------------------------------------------------------------------- reference


def _rotate_reference(x, cos, sin):
    half = cos.shape[-1]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def rope_reference(q, k, positions, inv_freq, attention_scaling: float = 1.0):
    _check(q, k, positions, inv_freq)
    cos, sin = jax.lax.stop_gradient(cos_sin(positions, inv_freq, attention_scaling))
    return _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)


# ----------------------------------------------------------------------------- pallas


def _rotate_tile(x_ref, o_ref, cos, sin, heads, half, head_dim):
    hp, halfp = next_pow2(heads), next_pow2(half)
    rows = pl.ds(0, hp)
    row_ok = (jnp.arange(hp) < heads)[:, None]
    mask = row_ok & (jnp.arange(halfp) < half)[None, :]
    lo, hi = x_ref.at[rows, pl.ds(0, halfp)], x_ref.at[rows, pl.ds(unchecked_start(half), halfp)]
    x1 = plgpu.load(lo, mask=mask, other=0.0).astype(jnp.float32)
    x2 = plgpu.load(hi, mask=mask, other=0.0).astype(jnp.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    plgpu.store(o_ref.at[rows, pl.ds(0, halfp)], out1.astype(o_ref.dtype), mask=mask)
    plgpu.store(o_ref.at[rows, pl.ds(unchecked_start(half), halfp)], out2.astype(o_ref.dtype), mask=mask)
    rest = head_dim - 2 * half
    if rest:
        restp = next_pow2(rest)
        rest_mask = row_ok & (jnp.arange(restp) < rest)[None, :]
        cols = pl.ds(unchecked_start(2 * half), restp)
        plgpu.store(o_ref.at[rows, cols], plgpu.load(x_ref.at[rows, cols], mask=rest_mask), mask=rest_mask)


def _rope_kernel(q_ref, k_ref, cos_ref, sin_ref, qo_ref, ko_ref, *, hq, hkv, half, head_dim):
    halfp = next_pow2(half)
    col_ok = jnp.arange(halfp) < half
    cos = plgpu.load(cos_ref.at[pl.ds(0, halfp)], mask=col_ok, other=0.0)
    sin = plgpu.load(sin_ref.at[pl.ds(0, halfp)], mask=col_ok, other=0.0)
    _rotate_tile(q_ref, qo_ref, cos, sin, hq, half, head_dim)
    _rotate_tile(k_ref, ko_ref, cos, sin, hkv, half, head_dim)


def _rope_call(q3, k3, cos2, sin2):
    tokens, hq, head_dim = q3.shape
    hkv, half = k3.shape[1], cos2.shape[-1]
    token = lambda a: pl.BlockSpec((None,) + a.shape[1:], lambda i: (i,) + (0,) * (a.ndim - 1))
    kernel = functools.partial(_rope_kernel, hq=hq, hkv=hkv, half=half, head_dim=head_dim)
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(q3.shape, q3.dtype), jax.ShapeDtypeStruct(k3.shape, k3.dtype)],
        grid=(tokens,),
        in_specs=[token(q3), token(k3), token(cos2), token(sin2)],
        out_specs=[token(q3), token(k3)],
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=registry.interpret(),
        name="rope",
    )(q3, k3, cos2, sin2)


@jax.custom_vjp
def _rope(q3, k3, cos2, sin2):
    return tuple(_rope_call(q3, k3, cos2, sin2))


def _rope_fwd(q3, k3, cos2, sin2):
    return _rope(q3, k3, cos2, sin2), (cos2, sin2)


def _rope_bwd(res, cotangents):
    cos2, sin2 = res
    dq, dk = _rope_call(*cotangents, cos2, -sin2)  # the transpose of a rotation rotates back
    return dq, dk, jnp.zeros_like(cos2), jnp.zeros_like(sin2)


_rope.defvjp(_rope_fwd, _rope_bwd)


def rope_pallas(q, k, positions, inv_freq, attention_scaling: float = 1.0):
    _check(q, k, positions, inv_freq)
    b, t = positions.shape
    cos, sin = jax.lax.stop_gradient(cos_sin(positions, inv_freq, attention_scaling))
    flat = lambda a: a.reshape((b * t,) + a.shape[2:])
    q_out, k_out = _rope(flat(q), flat(k), flat(cos), flat(sin))
    return q_out.reshape(q.shape), k_out.reshape(k.shape)


registry.register("rope", rope_reference)
registry.register_pallas("rope", rope_pallas)
