"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + w), in fp32, cast back to x's dtype.

offset is 0 for Llama/Qwen and 1 for Gemma ("1 + w"). `rmsnorm_residual` fuses the residual add
that precedes every norm in a decoder: it returns (rmsnorm(x + residual), x + residual).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jft.kernels import registry
from jft.kernels.registry import cdiv, next_pow2

BACKWARD_PROGRAMS = 256  # dw is reduced from one partial row per program


def _check(x, w):
    if w.ndim != 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"rmsnorm: weight shape {w.shape} does not match x's last axis {x.shape}")


# ----------------------------------------------------------------------------- reference


def rmsnorm_reference(x, w, eps: float = 1e-6, offset: float = 0.0):
    _check(x, w)
    xf = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * inv_rms * (offset + w.astype(jnp.float32))).astype(x.dtype)


def rmsnorm_residual_reference(x, residual, w, eps: float = 1e-6, offset: float = 0.0):
    if x.shape != residual.shape:
        raise ValueError(f"rmsnorm_residual: x {x.shape} and residual {residual.shape} differ")
    summed = x + residual.astype(x.dtype)
    return rmsnorm_reference(summed, w, eps, offset), summed


# ----------------------------------------------------------------------------- pallas kernels


def _forward_kernel(*refs, d, eps, offset, with_residual):
    if with_residual:
        x_ref, r_ref, w_ref, y_ref, s_ref, rstd_ref = refs
    else:
        x_ref, w_ref, y_ref, rstd_ref = refs
    dp = next_pow2(d)
    cols = pl.ds(0, dp)
    mask = jnp.arange(dp) < d
    x = plgpu.load(x_ref.at[cols], mask=mask, other=0.0)
    if with_residual:
        x = x + plgpu.load(r_ref.at[cols], mask=mask, other=0.0).astype(x.dtype)
        plgpu.store(s_ref.at[cols], x, mask=mask)
    xf = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.sum(xf * xf) / d + eps)
    w = plgpu.load(w_ref.at[cols], mask=mask, other=0.0).astype(jnp.float32)
    plgpu.store(y_ref.at[cols], (xf * rstd * (offset + w)).astype(y_ref.dtype), mask=mask)
    rstd_ref[0] = rstd


def _forward(x2, w, residual2, eps, offset):
    rows, d = x2.shape
    with_residual = residual2 is not None
    row_spec = pl.BlockSpec((None, d), lambda i: (i, 0))
    in_specs = [row_spec] + ([row_spec] if with_residual else []) + [pl.BlockSpec((d,), lambda i: (0,))]
    out_shape = [jax.ShapeDtypeStruct(x2.shape, x2.dtype)]
    out_specs = [row_spec]
    if with_residual:
        out_shape.append(jax.ShapeDtypeStruct(x2.shape, x2.dtype))
        out_specs.append(row_spec)
    out_shape.append(jax.ShapeDtypeStruct((rows, 1), jnp.float32))
    out_specs.append(pl.BlockSpec((None, 1), lambda i: (i, 0)))
    kernel = functools.partial(
        _forward_kernel, d=d, eps=eps, offset=offset, with_residual=with_residual
    )
    inputs = (x2, residual2, w) if with_residual else (x2, w)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(rows,),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(d)),
        interpret=registry.interpret(),
        name="rmsnorm_fwd",
    )(*inputs)


def _backward_kernel(*refs, rows, d, rows_per_program, offset, with_residual):
    if with_residual:
        x_ref, w_ref, rstd_ref, dy_ref, ds_ref, dx_ref, dw_ref = refs
    else:
        x_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref = refs
    dp = next_pow2(d)
    cols = pl.ds(0, dp)
    mask = jnp.arange(dp) < d
    w = offset + plgpu.load(w_ref.at[cols], mask=mask, other=0.0).astype(jnp.float32)
    first = pl.program_id(0) * rows_per_program
    last = jnp.minimum(first + rows_per_program, rows)

    def row(i, dw):
        x = plgpu.load(x_ref.at[i, cols], mask=mask, other=0.0).astype(jnp.float32)
        dy = plgpu.load(dy_ref.at[i, cols], mask=mask, other=0.0).astype(jnp.float32)
        rstd = rstd_ref[i, 0]
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (jnp.sum(g * x_hat) / d))
        if with_residual:
            dx = dx + plgpu.load(ds_ref.at[i, cols], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dx_ref.at[i, cols], dx.astype(dx_ref.dtype), mask=mask)
        return dw + dy * x_hat

    dw = jax.lax.fori_loop(first, last, row, jnp.zeros((dp,), jnp.float32))
    plgpu.store(dw_ref.at[cols], dw, mask=mask)


def _backward(x2, w, rstd, dy2, ds2, offset):
    rows, d = x2.shape
    with_residual = ds2 is not None
    rows_per_program = cdiv(rows, min(rows, BACKWARD_PROGRAMS))
    programs = cdiv(rows, rows_per_program)
    whole = lambda a: pl.BlockSpec(a.shape, lambda p: (0,) * a.ndim)
    inputs = [x2, w, rstd, dy2] + ([ds2] if with_residual else [])
    kernel = functools.partial(
        _backward_kernel,
        rows=rows,
        d=d,
        rows_per_program=rows_per_program,
        offset=offset,
        with_residual=with_residual,
    )
    dx, dw_partial = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(x2.shape, x2.dtype),
            jax.ShapeDtypeStruct((programs, d), jnp.float32),
        ],
        grid=(programs,),
        in_specs=[whole(a) for a in inputs],
        out_specs=[whole(x2), pl.BlockSpec((None, d), lambda p: (p, 0))],
        compiler_params=plgpu.CompilerParams(num_warps=_num_warps(d)),
        interpret=registry.interpret(),
        name="rmsnorm_bwd",
    )(*inputs)
    return dx, jnp.sum(dw_partial, axis=0).astype(w.dtype)


def _num_warps(d: int) -> int:
    return 4 if d <= 1024 else 8 if d <= 4096 else 16


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rmsnorm(x2, w, eps, offset):
    return _forward(x2, w, None, eps, offset)[0]


def _rmsnorm_fwd(x2, w, eps, offset):
    y, rstd = _forward(x2, w, None, eps, offset)
    return y, (x2, w, rstd)


def _rmsnorm_bwd(eps, offset, res, dy):
    x2, w, rstd = res
    return _backward(x2, w, rstd, dy, None, offset)


_rmsnorm.defvjp(_rmsnorm_fwd, _rmsnorm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rmsnorm_residual(x2, r2, w, eps, offset):
    y, s, _ = _forward(x2, w, r2, eps, offset)
    return y, s


def _rmsnorm_residual_fwd(x2, r2, w, eps, offset):
    y, s, rstd = _forward(x2, w, r2, eps, offset)
    return (y, s), (s, w, rstd)


def _rmsnorm_residual_bwd(eps, offset, res, cotangents):
    s, w, rstd = res
    dy, ds = cotangents
    dx, dw = _backward(s, w, rstd, dy, ds, offset)
    return dx, dx, dw


_rmsnorm_residual.defvjp(_rmsnorm_residual_fwd, _rmsnorm_residual_bwd)


def rmsnorm_pallas(x, w, eps: float = 1e-6, offset: float = 0.0):
    _check(x, w)
    return _rmsnorm(x.reshape(-1, x.shape[-1]), w, float(eps), float(offset)).reshape(x.shape)


def rmsnorm_residual_pallas(x, residual, w, eps: float = 1e-6, offset: float = 0.0):
    _check(x, w)
    if x.shape != residual.shape:
        raise ValueError(f"rmsnorm_residual: x {x.shape} and residual {residual.shape} differ")
    d = x.shape[-1]
    y, s = _rmsnorm_residual(
        x.reshape(-1, d), residual.astype(x.dtype).reshape(-1, d), w, float(eps), float(offset)
    )
    return y.reshape(x.shape), s.reshape(x.shape)


registry.register("rmsnorm", rmsnorm_reference)
registry.register_pallas("rmsnorm", rmsnorm_pallas)
registry.register("rmsnorm_residual", rmsnorm_residual_reference)
registry.register_pallas("rmsnorm_residual", rmsnorm_residual_pallas)
