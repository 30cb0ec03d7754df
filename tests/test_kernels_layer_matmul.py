"""The decoding matmul that reads one layer of a stacked weight in place, against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.kernels.layer_matmul import layer_matmul_pallas, layer_matmul_reference, pallas_supported
from jft.rl import JaxEngine, SamplingParams
from jft.sharding import AXES
from tests.test_kernels_nf4 import equations

AUTO = jax.sharding.AxisType.Auto


def _random(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("lead, stack_shape, dtype, tol", [
    ((1,), (3, 64, 512), jnp.float32, 1e-5),  # one token
    ((5, 1), (2, 128, 1024), jnp.float32, 1e-5),  # ragged token count, batch dims
    ((128,), (2, 192, 512), jnp.bfloat16, 1e-2),  # the most tokens, several row programs
    ((4, 16), (3, 64, 1536), jnp.bfloat16, 1e-2),  # several inner steps
])
def test_pallas_equals_reference(lead, stack_shape, dtype, tol):
    x = _random((*lead, stack_shape[2]), dtype, 0)
    stack = _random(stack_shape, dtype, 1)
    fn = jax.jit(lambda x, s, layer: (layer_matmul_pallas(x, s, layer, interpret=True),
                                      layer_matmul_reference(x, s, layer)))
    for layer in range(stack_shape[0]):
        got, want = fn(x, stack, layer)
        assert got.shape == want.shape == (*lead, stack_shape[1]) and got.dtype == dtype
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * scale,
                                   rtol=tol)


def test_unsupported_shapes_are_refused():
    stack = jnp.zeros((2, 64, 512))
    assert pallas_supported(jnp.zeros((128, 512)), stack)
    assert not pallas_supported(jnp.zeros((129, 512)), stack)  # too many tokens
    assert not pallas_supported(jnp.zeros((1, 384)), jnp.zeros((2, 64, 384)))  # in not a multiple of the split
    assert not pallas_supported(jnp.zeros((1, 512)), jnp.zeros((2, 48, 512)))  # rows not a multiple of a program's
    with pytest.raises(ValueError, match="at most 128 tokens"):
        layer_matmul_pallas(jnp.zeros((129, 512)), stack, 0, interpret=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.tiny_models import save_hf_model

    path = tmp_path_factory.mktemp("wide")
    save_hf_model("llama", path, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                   head_dim=64)
    return jft.load(str(path), dtype="float32")


def test_decoding_reads_each_layer_in_place(model):
    """A decoding step (few tokens, a cache) hands the projections their layer inside the stack:
    every Pallas matmul reads a whole stacked weight, none a sliced-out copy."""
    from jft.nn.transformer import forward_hidden, init_cache

    config = model.config
    stacks = {leaf.size for leaf in model.params["layers"].values() if leaf.ndim == 3}
    ids = jnp.zeros((2, 1), jnp.int32)
    cache = init_cache(config, 2, 16, jnp.float32)
    step = jax.make_jaxpr(lambda p: forward_hidden(config, p, ids, ids, jnp.ones_like(ids), cache=cache))
    with jft.kernels.use("pallas"):
        jaxpr = step(model.params)
        # over a mesh of several devices the weights may be sharded, and a Pallas call would gather them whole
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1, 2, 1), AXES, axis_types=(AUTO,) * 3)):
            meshed = step(model.params)
    reads = [max(v.aval.size for v in eqn.invars) for eqn in equations(jaxpr.jaxpr, "pallas_call")]
    assert len(reads) == 7 and set(reads) == stacks, reads
    assert not list(equations(meshed.jaxpr, "pallas_call"))


def test_rollouts_match_the_reference_path(model):
    prompts = [[5, 17, 42, 7], [9, 3], [100, 101, 102, 103, 104, 105]]
    sampling = SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop_token_ids=())
    runs = {}
    for mode in ("reference", "pallas"):
        jax.clear_caches()  # the rollout is jitted, and the kernel mode is read when tracing
        with jft.kernels.use(mode):
            runs[mode] = JaxEngine(model, slots=2).generate(prompts, n=2, sampling=sampling)
    assert runs["pallas"].ids == runs["reference"].ids
    for got, want in zip(runs["pallas"].model_logprobs, runs["reference"].model_logprobs):
        np.testing.assert_allclose(got, want, atol=1e-4)
