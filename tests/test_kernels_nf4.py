"""Pallas NF4 kernels (interpret mode on CPU) against the jnp reference."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jft.kernels import nf4 as kernels
from jft.quant import quantize


def random_nf4(shape, blocksize=64, double_quant=True, seed=0, dtype=jnp.float32):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return quantize(jnp.asarray(w).astype(dtype), "nf4", blocksize=blocksize, double_quant=double_quant)


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


@pytest.mark.parametrize(
    "shape, blocksize, double_quant, dtype",
    [
        ((33, 47), 64, True, jnp.bfloat16),  # ragged: 1551 elements, odd, last block of 15
        ((3, 5), 32, False, jnp.float32),  # fewer elements than one block
        ((2, 40, 96), 64, True, jnp.float16),  # stacked layers
        ((130, 256), 128, True, jnp.float32),  # several programs, the last one partial
    ],
)
def test_pallas_dequantize_equals_reference_exactly(shape, blocksize, double_quant, dtype):
    q = random_nf4(shape, blocksize, double_quant)
    reference = kernels.dequantize(q, dtype, impl="reference")
    pallas = kernels.dequantize(q, dtype, impl="pallas", interpret=True)
    assert pallas.shape == shape and pallas.dtype == dtype
    assert np.array_equal(bits(pallas), bits(reference))


def test_pallas_dequantize_writes_every_element():
    """The output buffer starts as NaN (aliased into the kernel); none may survive."""
    q = random_nf4((2, 65, 256), blocksize=64)  # 2 x 260 blocks: 5 programs of 128, the last partial
    packed, absmax = kernels._blocked_operands(q)
    poison = jnp.full((2 * q.n_blocks, q.blocksize), jnp.nan, jnp.float32)
    out = kernels._dequantize_blocks(packed, absmax, jnp.float32, interpret=True, out_init=poison)
    assert not np.isnan(np.asarray(out)).any()
    assert np.array_equal(np.asarray(out).reshape(q.shape), np.asarray(kernels.dequantize_reference(q, jnp.float32)))


def test_pallas_dequantize_under_jit():
    q = random_nf4((64, 96))
    fn = jax.jit(lambda leaf: kernels.dequantize(leaf, jnp.float32, impl="pallas", interpret=True))
    assert np.array_equal(np.asarray(fn(q)), np.asarray(kernels.dequantize_reference(q, jnp.float32)))


@pytest.mark.parametrize(
    "tokens, rows, cols, blocksize",
    [
        (1, 48, 192, 64),  # 3 blocks a row: one block a loop step, one program along the input
        (1, 80, 1024, 64),  # 16 blocks a row: 4 a step, 4 programs along the input; 16-row programs
        (2, 40, 256, 128),  # 8-row programs
        (2, 64, 512, 32),  # the most tokens
    ],
)
def test_pallas_nf4_matmul_matches_reference(tokens, rows, cols, blocksize):
    q = random_nf4((rows, cols), blocksize, seed=tokens)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((tokens, cols)), jnp.float32)
    reference = kernels.nf4_matmul(x, q, impl="reference")
    fused = kernels.nf4_matmul(x, q, impl="pallas", interpret=True)
    assert fused.shape == (tokens, rows) and fused.dtype == jnp.float32
    # Same weights and products; only the float32 summation order differs.
    scale = np.abs(np.asarray(reference)).max()
    np.testing.assert_allclose(np.asarray(fused), np.asarray(reference), rtol=1e-5, atol=1e-5 * scale)


def test_pallas_nf4_matmul_bf16_and_batch_dims():
    q = random_nf4((48, 128), seed=2)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 1, 128)), jnp.bfloat16)
    fused = kernels.nf4_matmul(x, q, impl="pallas", interpret=True)
    reference = kernels.nf4_matmul_reference(x, q)
    assert fused.shape == (2, 1, 48) and fused.dtype == jnp.bfloat16
    reference = np.asarray(reference, np.float32)  # bf16: errors on the scale of the largest output
    np.testing.assert_allclose(np.asarray(fused, np.float32), reference, rtol=1e-2, atol=1e-2 * np.abs(reference).max())


def test_pallas_nf4_matmul_reads_one_layer_of_a_stack_in_place():
    stack = random_nf4((3, 64, 512), seed=4)  # double-quantized: each layer has its own nested absmax
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 512)), jnp.float32)
    fn = jax.jit(lambda x, q, layer: kernels.nf4_matmul(x, q, impl="pallas", interpret=True, layer=layer))
    for layer in range(3):
        expected = np.asarray(x @ stack.dequantize(jnp.float32)[layer].T)
        np.testing.assert_allclose(np.asarray(fn(x, stack, layer)), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="give `layer`"):
        kernels.nf4_matmul_pallas(x, stack, interpret=True)


def test_unsupported_shapes_fall_back_or_raise():
    ragged_rows = random_nf4((8, 40))  # 40 input features: rows are not whole blocks
    x = jnp.ones((2, 40), jnp.float32)
    assert not kernels.pallas_matmul_supported(2, ragged_rows)
    np.testing.assert_array_equal(np.asarray(kernels.nf4_matmul(x, ragged_rows)), np.asarray(x @ ragged_rows.dequantize().T))
    with pytest.raises(ValueError, match="does not support"):
        kernels.nf4_matmul_pallas(x, ragged_rows, interpret=True)
    assert kernels.pallas_matmul_supported(kernels.MATMUL_MAX_TOKENS, random_nf4((16, 64)))
    assert not kernels.pallas_matmul_supported(kernels.MATMUL_MAX_TOKENS + 1, random_nf4((16, 64)))
    assert not kernels.pallas_matmul_supported(1, random_nf4((36, 64)))  # no 8-row programs divide 36 rows
    with pytest.raises(ValueError, match="unknown impl"):
        kernels.dequantize(ragged_rows, impl="cuda")
    odd_block = random_nf4((4, 48), blocksize=48)
    with pytest.raises(ValueError, match="power-of-two blocksize"):
        kernels.dequantize(odd_block, impl="pallas", interpret=True)


def equations(jaxpr, primitive=None):
    """The equations of a jaxpr and of every jaxpr nested in them (optionally only one primitive's)."""
    for eqn in jaxpr.eqns:
        if primitive is None or eqn.primitive.name == primitive:
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from equations(sub, primitive)


def loops_read_packed_bytes(jaxpr) -> bool:
    """Whether an operation inside a while loop of the jaxpr reads uint8 data (NF4's packed bytes)."""
    return any(v.aval.dtype == jnp.uint8 for loop in equations(jaxpr, "while")
               for eqn in equations(loop.params["body_jaxpr"].jaxpr) for v in eqn.invars)


def test_layer_scan_dequantizes_nf4_layers_in_place(tmp_path):
    """Inside the decoder's layer scan, every Pallas dequantize reads its layer from the whole stacked
    bytes: slicing the layer out first (as scan does with its inputs) would copy it on the GPU."""
    import jft
    from jft.nn.transformer import forward_hidden
    from tests.tiny_models import save_hf_model

    save_hf_model("llama", tmp_path)
    model = jft.load(str(tmp_path), dtype="float32", quantize="nf4")
    stacked = {leaf.packed.size for leaf in model.params["layers"].values() if hasattr(leaf, "packed")}
    ids = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.arange(8)[None]
    with jft.kernels.use("pallas"):
        jaxpr = jax.make_jaxpr(lambda p: forward_hidden(model.config, p, ids, positions, jnp.ones_like(ids)))(model.params)
    reads = [v.aval.size for eqn in equations(jaxpr.jaxpr, "pallas_call") for v in eqn.invars if v.aval.dtype == jnp.uint8]
    assert len(reads) == 7 and set(reads) <= stacked, reads


def test_decoding_one_row_multiplies_nf4_layers_fused(tmp_path):
    """A decoding step of one row hands each NF4 projection to the fused matmul, which reads its layer
    from the whole stack; greedy generation then equals the reference path's."""
    import jft
    from jft.nn.transformer import forward_hidden, init_cache
    from tests.tiny_models import save_hf_model

    save_hf_model("llama", tmp_path)
    model = jft.load(str(tmp_path), dtype="float32", quantize="nf4")
    stacked = {leaf.packed.size for leaf in model.params["layers"].values() if hasattr(leaf, "packed")}
    ids = jnp.zeros((1, 1), jnp.int32)
    cache = init_cache(model.config, 1, 16, jnp.float32)
    with jft.kernels.use("pallas"):
        jaxpr = jax.make_jaxpr(lambda p: forward_hidden(model.config, p, ids, ids, jnp.ones_like(ids), cache=cache))(model.params)
    calls = list(equations(jaxpr.jaxpr, "pallas_call"))
    assert len(calls) == 7 and all(eqn.params["jaxpr"].debug_info.func_name == "_matmul_kernel" for eqn in calls)
    assert {v.aval.size for eqn in calls for v in eqn.invars if v.aval.dtype == jnp.uint8} <= stacked

    ids_by_mode = {}
    for mode in ("reference", "pallas"):
        jax.clear_caches()  # generation is jitted, and the kernel mode is read when tracing
        with jft.kernels.use(mode):
            ids_by_mode[mode] = jft.generate(model, [[5, 17, 42, 7]], max_new_tokens=6).ids
    assert ids_by_mode["pallas"] == ids_by_mode["reference"]
