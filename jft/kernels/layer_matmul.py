"""x @ W[layer].T for one matrix of a stacked dense weight [L, out, in], read where it lies.

The decoder scans its layers, and scanning hands each layer its slice of every stacked weight: on
the GPU a copy of the layer's matrices before every matmul. For a training batch that copy hides
behind compute-bound matmuls, but a decoding step has a few tokens per row and is bound by reading
the weights, so the copy (read and write) and the matmul's own read triple its traffic. The Pallas
kernel reads the layer's rows at their offset in the stack instead. It is for decoding only (no
gradient) and for few tokens: each program multiplies a [rows, in / k_split] tile of W by all the
tokens, and the k_split partial products are summed afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jft.kernels import registry

MAX_TOKENS = 128  # the most tokens the Pallas kernel takes (its [rows, tokens] accumulator lives in registers)
_ROWS = 64  # weight rows (output features) per program
_TILE_K = 128  # input features per inner step
_K_SPLIT = 4  # programs along the input dimension
_MIN_DOT = 16  # Triton's smallest dot operand dimension


def layer_matmul_reference(x: jax.Array, stack: jax.Array, layer) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, stack[layer].astype(x.dtype))


def pallas_supported(x: jax.Array, stack: jax.Array) -> bool:
    tokens = x.size // x.shape[-1]
    _, rows, cols = stack.shape
    return tokens <= MAX_TOKENS and rows % _ROWS == 0 and cols % (_K_SPLIT * _TILE_K) == 0


def _kernel(first_ref, xt_ref, w_ref, out_ref, *, steps):
    rows, tokens = out_ref.shape
    row0 = first_ref[0] + pl.program_id(0) * rows
    col0 = pl.program_id(1) * steps * _TILE_K

    def step(s, acc):
        w = w_ref[pl.ds(row0, rows), pl.ds(col0 + s * _TILE_K, _TILE_K)].astype(xt_ref.dtype)
        return acc + jnp.dot(w, xt_ref[pl.ds(s * _TILE_K, _TILE_K), :], preferred_element_type=jnp.float32)

    out_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros((rows, tokens), jnp.float32))


def layer_matmul_pallas(x: jax.Array, stack: jax.Array, layer, interpret: bool | None = None) -> jax.Array:
    """Same as `layer_matmul_reference` (float32 accumulation, result in x.dtype) for supported shapes."""
    if not pallas_supported(x, stack):
        raise ValueError(f"layer_matmul_pallas takes at most {MAX_TOKENS} tokens and a stack [L, out, in] with out "
                         f"% {_ROWS} == 0 and in % {_K_SPLIT * _TILE_K} == 0; got x {x.shape}, stack {stack.shape}")
    interpret = registry.interpret() if interpret is None else interpret
    *lead, cols = x.shape
    n_layers, rows, _ = stack.shape
    tokens = x.size // cols
    padded = max(_MIN_DOT, registry.next_pow2(tokens))
    xt = jnp.pad(x.reshape(tokens, cols), ((0, padded - tokens), (0, 0))).T
    steps = cols // (_K_SPLIT * _TILE_K)
    partials = pl.pallas_call(
        functools.partial(_kernel, steps=steps),
        grid=(rows // _ROWS, _K_SPLIT),
        in_specs=[
            pl.BlockSpec((1,), lambda j, k: (0,)),
            pl.BlockSpec((steps * _TILE_K, padded), lambda j, k: (k, 0)),
            pl.BlockSpec(),  # the whole stack: programs read their layer's rows in place
        ],
        out_specs=pl.BlockSpec((_ROWS, padded), lambda j, k: (j, k)),
        out_shape=jax.ShapeDtypeStruct((rows, _K_SPLIT * padded), jnp.float32),
        interpret=interpret,
    )(jnp.reshape(layer * rows, (1,)).astype(jnp.int32), xt, stack.reshape(n_layers * rows, cols))
    summed = partials.reshape(rows, _K_SPLIT, padded).sum(axis=1)
    return summed[:, :tokens].T.astype(x.dtype).reshape(*lead, rows)


registry.register("layer_matmul", layer_matmul_reference)
registry.register_pallas("layer_matmul", layer_matmul_pallas, auto_backends=("gpu",))


def layer_matmul(x: jax.Array, stack: jax.Array, layer) -> jax.Array:
    """x [..., in] @ stack[layer].T, by the Pallas kernel where jft.kernels' mode picks it and the
    shapes suit it, else by the reference."""
    if registry.implementation("layer_matmul") is layer_matmul_pallas and pallas_supported(x, stack):
        return layer_matmul_pallas(x, stack, layer)
    return layer_matmul_reference(x, stack, layer)
