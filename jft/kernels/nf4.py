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
_MATMUL_ROWS = 64  # weight rows (output features) per matmul program
_MATMUL_MAX_SUBBLOCKS = 8  # quantization blocks per matmul program along the input dimension
_MIN_DOT = 16  # Triton's smallest dot operand dimension


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


def nf4_matmul_reference(x: jax.Array, q: NF4) -> jax.Array:
    """x [..., in] @ W.T with W = q dequantized to x.dtype; float32 accumulation, result in x.dtype."""
    w = dequantize_nf4(q, x.dtype)
    return jnp.matmul(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_kernel(table_ref, xt_even_ref, xt_odd_ref, packed_ref, absmax_ref, out_ref, *, half, subblocks):
    """One program: rows [TN] of W times x.T over `subblocks` quantization blocks of the input
    dimension, giving [TN, M]. x.T is split into its even and odd input features so the two nibbles
    of a byte meet their inputs without interleaving W."""
    compute_dtype = xt_even_ref.dtype
    acc = jnp.zeros((packed_ref.shape[0], xt_even_ref.shape[1]), jnp.float32)
    for s in range(subblocks):
        cols = pl.ds(s * half, half)
        byte = packed_ref[:, cols].astype(jnp.int32)
        scale = absmax_ref[:, pl.ds(s, 1)]
        w_first = (_decode(table_ref, byte >> 4) * scale).astype(compute_dtype)
        w_second = (_decode(table_ref, byte & 0xF) * scale).astype(compute_dtype)
        acc += jnp.dot(w_first, xt_even_ref[cols, :], preferred_element_type=jnp.float32)
        acc += jnp.dot(w_second, xt_odd_ref[cols, :], preferred_element_type=jnp.float32)
    out_ref[...] = acc


def _largest_pow2_divisor(n: int, limit: int) -> int:
    d = 1
    while d * 2 <= limit and n % (d * 2) == 0:
        d *= 2
    return d


def pallas_matmul_supported(q: NF4) -> bool:
    """The fused kernel needs an unstacked leaf whose rows are whole blocks of a power-of-two size
    of at least 32 (half a block is a Triton dot operand)."""
    return (
        not q.batch_shape
        and _is_pow2(q.blocksize)
        and q.blocksize // 2 >= _MIN_DOT
        and q.cols % q.blocksize == 0
    )


def nf4_matmul_pallas(x: jax.Array, q: NF4, interpret: bool | None = None) -> jax.Array:
    """Fused dequant-matmul for few tokens (decoding): x [..., in] @ W.T without materialising W.

    Split-K: program (j, k) multiplies weight rows j*TN.. by input blocks k*TK.., and the partial
    products [out, n_k * M] are summed afterwards (cheap while M is small)."""
    if not pallas_matmul_supported(q):
        raise ValueError(f"nf4_matmul_pallas does not support {q!r}; use nf4_matmul_reference")
    interpret = registry.interpret() if interpret is None else interpret
    *lead, features = x.shape
    if features != q.cols:
        raise ValueError(f"x has {features} input features, the weight {q.shape} expects {q.cols}")
    tokens = math.prod(lead)
    x2d = x.reshape(tokens, features)
    padded_tokens = max(_MIN_DOT, registry.next_pow2(tokens))
    x2d = jnp.pad(x2d, ((0, padded_tokens - tokens), (0, 0)))
    xt_even, xt_odd = x2d[:, 0::2].T, x2d[:, 1::2].T

    half = q.blocksize // 2
    blocks_per_row = q.cols // q.blocksize
    subblocks = _largest_pow2_divisor(blocks_per_row, _MATMUL_MAX_SUBBLOCKS)
    k_tiles = blocks_per_row // subblocks
    rows_per_program = min(_MATMUL_ROWS, max(_MIN_DOT, registry.next_pow2(q.rows)))
    packed = q.packed.reshape(q.rows, q.cols // 2)
    absmax = block_absmax(q).reshape(q.rows, blocks_per_row)

    partials = pl.pallas_call(
        functools.partial(_matmul_kernel, half=half, subblocks=subblocks),
        grid=(registry.cdiv(q.rows, rows_per_program), k_tiles),
        in_specs=[
            pl.BlockSpec((16,), lambda j, k: (0,)),
            pl.BlockSpec((subblocks * half, padded_tokens), lambda j, k: (k, 0)),
            pl.BlockSpec((subblocks * half, padded_tokens), lambda j, k: (k, 0)),
            pl.BlockSpec((rows_per_program, subblocks * half), lambda j, k: (j, k)),
            pl.BlockSpec((rows_per_program, subblocks), lambda j, k: (j, k)),
        ],
        out_specs=pl.BlockSpec((rows_per_program, padded_tokens), lambda j, k: (j, k)),
        out_shape=jax.ShapeDtypeStruct((q.rows, k_tiles * padded_tokens), jnp.float32),
        interpret=interpret,
    )(jnp.asarray(NF4_CODES), xt_even, xt_odd, packed, absmax)
    summed = partials.reshape(q.rows, k_tiles, padded_tokens).sum(axis=1)
    return summed[:, :tokens].T.astype(x.dtype).reshape(*lead, q.rows)


def nf4_matmul(x: jax.Array, q: NF4, impl: str | None = None, interpret: bool | None = None) -> jax.Array:
    """x [..., in] @ dequantize(q).T. impl None: the fused Pallas kernel when jft.kernels' mode
    selects Pallas and the leaf is supported, else the reference."""
    if impl is None:
        wants_pallas = registry.implementation("nf4_dequantize") is dequantize_pallas
        impl = "pallas" if wants_pallas and pallas_matmul_supported(q) else "reference"
    if impl == "reference":
        return nf4_matmul_reference(x, q)
    if impl == "pallas":
        return nf4_matmul_pallas(x, q, interpret)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
