"""Gated linear units: swiglu(g, u) = silu(g) * u, geglu(g, u) = gelu_tanh(g) * u.

Computed in fp32 and cast back to g's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jft.kernels import registry
from jft.kernels.registry import cdiv

BLOCK = 1024
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _check(g, u):
    if g.shape != u.shape:
        raise ValueError(f"glu: gate {g.shape} and up {u.shape} must have the same shape")


# Activations and their derivatives, fp32 in and out; shared by the reference and the kernels.


def _silu(g):
    return g * jax.nn.sigmoid(g)


def _silu_grad(g):
    s = jax.nn.sigmoid(g)
    return s * (1.0 + g * (1.0 - s))


def _gelu_tanh(g):
    return 0.5 * g * (1.0 + jnp.tanh(_GELU_C * (g + _GELU_A * g * g * g)))


def _gelu_tanh_grad(g):
    t = jnp.tanh(_GELU_C * (g + _GELU_A * g * g * g))
    return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * g * g)


_ACTIVATIONS = {"silu": (_silu, _silu_grad), "gelu_tanh": (_gelu_tanh, _gelu_tanh_grad)}


# ----------------------------------------------------------------------------- reference


def _glu_reference(g, u, activation):
    _check(g, u)
    act = _ACTIVATIONS[activation][0]
    return (act(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(g.dtype)


def swiglu_reference(g, u):
    return _glu_reference(g, u, "silu")


def geglu_reference(g, u):
    # written independently of _gelu_tanh so the kernels' activation is checked against jax's
    _check(g, u)
    gf = g.astype(jnp.float32)
    return (jax.nn.gelu(gf, approximate=True) * u.astype(jnp.float32)).astype(g.dtype)


# ----------------------------------------------------------------------------- pallas


def _block(n):
    start = pl.program_id(0) * BLOCK
    return pl.ds(start, BLOCK), start + jnp.arange(BLOCK) < n


def _forward_kernel(g_ref, u_ref, o_ref, *, n, activation):
    idx, mask = _block(n)
    g = plgpu.load(g_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    u = plgpu.load(u_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    act = _ACTIVATIONS[activation][0]
    plgpu.store(o_ref.at[idx], (act(g) * u).astype(o_ref.dtype), mask=mask)


def _backward_kernel(g_ref, u_ref, do_ref, dg_ref, du_ref, *, n, activation):
    idx, mask = _block(n)
    g = plgpu.load(g_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    u = plgpu.load(u_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    do = plgpu.load(do_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    act, act_grad = _ACTIVATIONS[activation]
    plgpu.store(dg_ref.at[idx], (do * u * act_grad(g)).astype(dg_ref.dtype), mask=mask)
    plgpu.store(du_ref.at[idx], (do * act(g)).astype(du_ref.dtype), mask=mask)


def _elementwise_call(kernel, inputs, out_dtypes, name):
    n = inputs[0].shape[0]
    whole = pl.BlockSpec((n,), lambda i: (0,))
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n,), dt) for dt in out_dtypes],
        grid=(cdiv(n, BLOCK),),
        in_specs=[whole] * len(inputs),
        out_specs=[whole] * len(out_dtypes),
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=registry.interpret(),
        name=name,
    )(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _glu(g1, u1, activation):
    kernel = functools.partial(_forward_kernel, n=g1.shape[0], activation=activation)
    return _elementwise_call(kernel, (g1, u1), (g1.dtype,), f"{activation}_glu_fwd")[0]


def _glu_fwd(g1, u1, activation):
    return _glu(g1, u1, activation), (g1, u1)


def _glu_bwd(activation, res, do):
    g1, u1 = res
    kernel = functools.partial(_backward_kernel, n=g1.shape[0], activation=activation)
    dg, du = _elementwise_call(
        kernel, (g1, u1, do), (g1.dtype, u1.dtype), f"{activation}_glu_bwd"
    )
    return dg, du


_glu.defvjp(_glu_fwd, _glu_bwd)


def _glu_pallas(g, u, activation):
    _check(g, u)
    return _glu(g.reshape(-1), u.astype(g.dtype).reshape(-1), activation).reshape(g.shape)


def swiglu_pallas(g, u):
    return _glu_pallas(g, u, "silu")


def geglu_pallas(g, u):
    return _glu_pallas(g, u, "gelu_tanh")


registry.register("swiglu", swiglu_reference)
registry.register_pallas("swiglu", swiglu_pallas)
registry.register("geglu", geglu_reference)
registry.register_pallas("geglu", geglu_pallas)
