"""NF4 dequantization and fused NF4 dequant-matmul: pure-jnp references and Pallas kernels.

The references are the spec (jft.quant.nf4). The Pallas kernels view a matrix's packed bytes as
[n_blocks, blocksize/2] (one row per quantization block), so every tile is a power of two for the
Triton lowering as long as the blocksize is one (bitsandbytes only allows 32..4096, all powers of
two). Double-quantized absmax is expanded to float32 by the jnp reference first (n/blocksize values,
a few percent of the traffic). On CPU the kernels run in Pallas interpret mode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jft.kernels import registry
from jft.quant.nf4 import NF4, NF4_CODES, NF4Layer, block_absmax, dequantize_nf4

IMPLS = ("reference", "pallas")
_TILE_ELEMENTS = 8192  # elements a dequantize program writes
_DEQUANT_NUM_WARPS = None  # Triton's default unless set
# The fused matmul multiplies on the CUDA cores: on the H200 it beats dequantize + cuBLAS at one and
# two tokens, not at four (docs/benchmarks.md); Triton dots over weights decoded in the kernel were
# slower than dequantize + cuBLAS at every token count.
MATMUL_MAX_TOKENS = 2
_MATMUL_ROWS = 32  # the most weight rows (output features) per matmul program
_MATMUL_UNROLL = 4  # quantization blocks per step of a matmul program's loop
_MATMUL_K_SPLIT = 4  # the most matmul programs along the input dimension
_MATMUL_NUM_WARPS = 4


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _decode(table_ref, nibbles: jax.Array) -> jax.Array:
    """NF4 code values (float32) of int32 nibbles, gathered from the 16-entry table in memory (on
    the H200 this beat a 15-select tree by 1.5x in the dequantize kernel)."""
    return table_ref[nibbles]


def _triton_params(interpret: bool, num_warps: int | None):
    if interpret or num_warps is None:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps)


def _check_pallas_blocksize(q: NF4) -> None:
    if not _is_pow2(q.blocksize):
        raise ValueError(f"the Pallas NF4 kernels need a power-of-two blocksize, got {q.blocksize}")


# ----------------------------------------------------------------------------------- dequantize


def dequantize_reference(q: NF4, dtype=None, layer=None) -> jax.Array:
    return dequantize_nf4(q if layer is None else NF4Layer(q, layer).sliced(), dtype)


def _dequantize_kernel(table_ref, first_ref, packed_ref, absmax_ref, *rest):
    out_ref = rest[-1]  # rest = (out,) or (aliased out, out)
    rows = out_ref.shape[0]
    byte = packed_ref[pl.ds(first_ref[0] + pl.program_id(0) * rows, rows), :].astype(jnp.int32)
    scale = absmax_ref[...]
    first = _decode(table_ref, byte >> 4) * scale
    second = _decode(table_ref, byte & 0xF) * scale
    interleaved = jnp.stack([first, second], axis=-1).reshape(out_ref.shape)
    out_ref[...] = interleaved.astype(out_ref.dtype)


def _dequantize_blocks(packed2d, absmax2d, dtype, interpret, first_block=0, out_init=None):
    """Blocks first_block.. of packed2d (uint8 [N, bs/2], read in place) with absmax2d (f32 [nb, 1])
    -> [nb, bs] in `dtype`.

    Each program takes a power-of-two run of blocks that divides nb, so none reads past its matrix.
    With `out_init` ([nb, bs], aliased to the output) every element the kernel fails to write keeps
    its initial value; the tests pass NaNs to prove full coverage."""
    n_blocks, half = absmax2d.shape[0], packed2d.shape[1]
    blocks_per_program = _largest_pow2_divisor(n_blocks, max(1, _TILE_ELEMENTS // (2 * half)))
    in_specs = [
        pl.BlockSpec((16,), lambda i: (0,)),
        pl.BlockSpec((1,), lambda i: (0,)),
        pl.BlockSpec(),  # whole: programs read their rows at first_block + offset
        pl.BlockSpec((blocks_per_program, 1), lambda i: (i, 0)),
    ]
    operands = [jnp.asarray(NF4_CODES), jnp.reshape(first_block, (1,)).astype(jnp.int32), packed2d, absmax2d]
    aliases = {}
    if out_init is not None:
        in_specs.append(pl.BlockSpec((blocks_per_program, 2 * half), lambda i: (i, 0)))
        operands.append(out_init)
        aliases = {4: 0}
    return pl.pallas_call(
        _dequantize_kernel,
        grid=(n_blocks // blocks_per_program,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((blocks_per_program, 2 * half), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n_blocks, 2 * half), dtype),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_triton_params(interpret, _DEQUANT_NUM_WARPS),
    )(*operands)


def _blocked_operands(q: NF4) -> tuple[jax.Array, jax.Array]:
    """(packed [B*nb, bs/2] (a ragged last block zero-padded), absmax f32 [B*nb, 1]): the blocks of
    all stacked matrices, one after another, since every block is dequantized on its own."""
    batch = max(1, math.prod(q.batch_shape))
    half = q.blocksize // 2
    packed = q.packed.reshape(batch, -1)
    missing = q.n_blocks * half - packed.shape[-1]
    if missing:
        packed = jnp.pad(packed, ((0, 0), (0, missing)))
    absmax = block_absmax(q).reshape(batch * q.n_blocks, 1)
    return packed.reshape(batch * q.n_blocks, half), absmax


def dequantize_pallas(q: NF4, dtype=None, interpret: bool | None = None, layer=None) -> jax.Array:
    """Pallas NF4 dequantize; same result as `dequantize_reference`, bit for bit. With `layer` (an
    int, may be traced) only that matrix of a stacked leaf: the kernel reads its bytes in place,
    where slicing them out first (as `lax.scan` does with its inputs) would copy them."""
    _check_pallas_blocksize(q)
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    interpret = registry.interpret() if interpret is None else interpret
    if layer is None:
        packed, absmax = _blocked_operands(q)
        blocks = _dequantize_blocks(packed, absmax, dtype, interpret)
        batch = max(1, math.prod(q.batch_shape))
        return blocks.reshape(batch, -1)[:, : q.rows * q.cols].reshape(q.shape)
    one = NF4Layer(q, layer).sliced()
    if q.rows * q.cols % q.blocksize:  # ragged: padding copies the matrix anyway
        return dequantize_pallas(one, dtype, interpret)
    packed = q.packed.reshape(-1, q.blocksize // 2)
    absmax = block_absmax(one).reshape(q.n_blocks, 1)
    blocks = _dequantize_blocks(packed, absmax, dtype, interpret, first_block=layer * q.n_blocks)
    return blocks.reshape(q.rows, q.cols)


registry.register("nf4_dequantize", dequantize_reference)
# measured on the H200 (docs/quantization.md): 3.1 TB/s against 0.7 TB/s for the XLA reference
registry.register_pallas("nf4_dequantize", dequantize_pallas, auto_backends=("gpu",))


def dequantize(q: NF4, dtype=None, impl: str | None = None, interpret: bool | None = None, layer=None) -> jax.Array:
    """Dense `q.shape` array (with `layer`: that matrix of a stacked leaf). impl None follows
    jft.kernels' mode; "reference" or "pallas" force one."""
    if impl is None:
        fn = registry.implementation("nf4_dequantize")
        return dequantize_pallas(q, dtype, interpret, layer) if fn is dequantize_pallas else fn(q, dtype, layer)
    if impl == "reference":
        return dequantize_reference(q, dtype, layer)
    if impl == "pallas":
        return dequantize_pallas(q, dtype, interpret, layer)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


# -------------------------------------------------------------------------- fused dequant-matmul


def nf4_matmul_reference(x: jax.Array, q: NF4, layer=None) -> jax.Array:
    """x [..., in] @ W.T with W = q (with `layer`: that matrix of a stacked q) dequantized to x.dtype;
    float32 accumulation, result in x.dtype."""
    w = dequantize_reference(q, x.dtype, layer)
    return jnp.matmul(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_kernel(table_ref, first_ref, xt_ref, packed_ref, absmax_ref, out_ref, *, half, unroll, steps, blocks_per_row):
    """One program: weight rows [rows] (read in place at first_ref[0] + program * rows of the stack)
    times each token's x over `steps * unroll` quantization blocks of the input dimension, as
    multiply-adds on the CUDA cores (a few tokens leave the tensor cores nothing to do). xt_ref holds
    each token's even and odd input features as two rows, so the two nibbles of a byte meet their
    inputs without interleaving W."""
    tokens, rows = out_ref.shape
    weight_rows = pl.ds(first_ref[0] + pl.program_id(0) * rows, rows)
    tile = (rows, unroll * half)
    row = pl.program_id(0) * rows + jax.lax.broadcasted_iota(jnp.int32, tile, 0)
    block_of_col = jax.lax.broadcasted_iota(jnp.int32, tile, 1) // half
    first_block = pl.program_id(1) * steps * unroll

    def step(s, acc):
        block = first_block + s * unroll
        cols = pl.ds(block * half, unroll * half)
        byte = packed_ref[weight_rows, cols].astype(jnp.int32)
        scale = absmax_ref[row * blocks_per_row + block + block_of_col]
        w_first = (_decode(table_ref, byte >> 4) * scale).astype(xt_ref.dtype).astype(jnp.float32)
        w_second = (_decode(table_ref, byte & 0xF) * scale).astype(xt_ref.dtype).astype(jnp.float32)
        return tuple(
            acc[t] + jnp.sum(w_first * xt_ref[2 * t, cols].astype(jnp.float32)[None, :]
                             + w_second * xt_ref[2 * t + 1, cols].astype(jnp.float32)[None, :], axis=1)
            for t in range(tokens)
        )

    acc = jax.lax.fori_loop(0, steps, step, tuple(jnp.zeros((rows,), jnp.float32) for _ in range(tokens)))
    for t in range(tokens):
        out_ref[t, :] = acc[t]


def _largest_pow2_divisor(n: int, limit: int) -> int:
    d = 1
    while d * 2 <= limit and n % (d * 2) == 0:
        d *= 2
    return d


def _matmul_tiles(q: NF4) -> tuple[int, int, int]:
    """(weight rows per program, blocks per loop step, programs along the input dimension)."""
    blocks_per_row = q.cols // q.blocksize
    unroll = _largest_pow2_divisor(blocks_per_row, _MATMUL_UNROLL)
    k_split = _largest_pow2_divisor(blocks_per_row // unroll, _MATMUL_K_SPLIT)
    return _largest_pow2_divisor(q.rows, _MATMUL_ROWS), unroll, k_split


def pallas_matmul_supported(tokens: int, q: NF4) -> bool:
    """The fused kernel takes at most MATMUL_MAX_TOKENS tokens and a weight whose rows are whole
    blocks of a power-of-two size, with a row count divisible by 8."""
    return (
        tokens <= MATMUL_MAX_TOKENS
        and _is_pow2(q.blocksize)
        and q.cols % q.blocksize == 0
        and _matmul_tiles(q)[0] >= 8
    )


def nf4_matmul_pallas(x: jax.Array, q: NF4, interpret: bool | None = None, layer=None) -> jax.Array:
    """Fused dequant-matmul for decoding one or two tokens: x [..., in] @ W.T without materialising
    W, reading 0.5 bytes per weight. With `layer` (an int, may be traced) W is that matrix of a
    stacked q, read in place. Weights are rounded to x.dtype as the dequantize would, products
    summed in float32. Split-K: program (j, k) takes weight rows j*rows.. over its share of the input
    blocks, and the partial sums [tokens, k_split * out] are added afterwards."""
    if len(q.batch_shape) != (layer is not None):
        raise ValueError(f"nf4_matmul_pallas: give `layer` for a stack [L, out, in] (and only then); got {q!r}")
    *lead, features = x.shape
    tokens = x.size // features
    if not pallas_matmul_supported(tokens, q):
        raise ValueError(f"nf4_matmul_pallas does not support x {x.shape} with {q!r}; use nf4_matmul_reference")
    if features != q.cols:
        raise ValueError(f"x has {features} input features, the weight {q.shape} expects {q.cols}")
    interpret = registry.interpret() if interpret is None else interpret
    x2d = x.reshape(tokens, features)
    xt = jnp.stack([x2d[:, 0::2], x2d[:, 1::2]], axis=1).reshape(2 * tokens, features // 2)

    rows_per_program, unroll, k_split = _matmul_tiles(q)
    blocks_per_row = q.cols // q.blocksize
    one = q if layer is None else NF4Layer(q, layer).sliced()
    packed = q.packed.reshape(-1, q.cols // 2)  # every matrix of the stack, one after another
    first_row = jnp.reshape(0 if layer is None else layer * q.rows, (1,)).astype(jnp.int32)
    row_programs = q.rows // rows_per_program

    partials = pl.pallas_call(
        functools.partial(_matmul_kernel, half=q.blocksize // 2, unroll=unroll,
                          steps=blocks_per_row // (unroll * k_split), blocks_per_row=blocks_per_row),
        grid=(row_programs, k_split),
        in_specs=[
            pl.BlockSpec((16,), lambda j, k: (0,)),
            pl.BlockSpec((1,), lambda j, k: (0,)),
            pl.BlockSpec(),  # whole: programs read their input features
            pl.BlockSpec(),  # whole: programs read their layer's rows in place
            pl.BlockSpec(),
        ],
        out_specs=pl.BlockSpec((tokens, rows_per_program), lambda j, k: (0, k * row_programs + j)),
        out_shape=jax.ShapeDtypeStruct((tokens, k_split * q.rows), jnp.float32),
        interpret=interpret,
        compiler_params=_triton_params(interpret, _MATMUL_NUM_WARPS),
    )(jnp.asarray(NF4_CODES), first_row, xt, packed, block_absmax(one).reshape(-1))
    summed = partials.reshape(tokens, k_split, q.rows).sum(axis=1)
    return summed.astype(x.dtype).reshape(*lead, q.rows)


def fused_matmul_applies(tokens: int, q: NF4) -> bool:
    """Whether jft.kernels' mode picks Pallas for NF4 and the fused matmul takes `tokens` times q."""
    return registry.implementation("nf4_dequantize") is dequantize_pallas and pallas_matmul_supported(tokens, q)


def nf4_matmul(x: jax.Array, q: NF4, impl: str | None = None, interpret: bool | None = None, layer=None) -> jax.Array:
    """x [..., in] @ dequantize(q).T (with `layer`: that matrix of a stacked q). impl None: the fused
    Pallas kernel where `fused_matmul_applies`, else the reference."""
    if impl is None:
        impl = "pallas" if fused_matmul_applies(x.size // x.shape[-1], q) else "reference"
    if impl == "reference":
        return nf4_matmul_reference(x, q, layer)
    if impl == "pallas":
        return nf4_matmul_pallas(x, q, interpret, layer)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
