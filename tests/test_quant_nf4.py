"""NF4 leaves against bitsandbytes (CPU) and transformers' bitsandbytes checkpoints."""

import json

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default import ops as bnb_default_ops

from jft.convert import bnb as bnb_convert
from jft.quant import NF4, dequantize, is_quantized, param_bytes, quantize
from jft.quant import nf4

TORCH_TO_JAX = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}


def random_weight(shape, torch_dtype, seed):
    rng = np.random.default_rng(seed)
    w = torch.from_numpy((rng.standard_normal(shape) * rng.uniform(0.01, 2.0)).astype(np.float32))
    return w.to(torch_dtype)


def to_jax(t: torch.Tensor):
    return jnp.asarray(t.float().numpy()).astype(TORCH_TO_JAX[t.dtype])


def as_f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def bnb_dequantize(packed, state) -> np.ndarray:
    """bitsandbytes' dequantization by its generic implementation (what its backends without a
    dedicated kernel run). Its AVX512 CPU kernel is not exact everywhere: it reads the wrong absmax
    when a block straddles two rows (cols % blocksize != 0 with cols % 16 == 0: it indexes absmax per
    row), and on some hosts (the H200 machine's) it rounds float16 ties away from even."""
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = bnb_default_ops._dequantize_4bit_compute.__wrapped__
    code = bnbf.get_4bit_type("nf4", device="cpu")
    return compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype).float().numpy()


def test_tables_match_bitsandbytes():
    assert np.array_equal(nf4.NF4_CODES, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(nf4.DYNAMIC_MAP, bnbf.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize(
    "shape, torch_dtype, blocksize",
    [
        ((33, 47), torch.float32, 64),
        ((33, 47), torch.bfloat16, 64),
        ((33, 47), torch.float16, 128),
        ((128, 320), torch.float32, 64),
        ((128, 320), torch.bfloat16, 128),
        ((128, 320), torch.float16, 64),
        ((3, 5), torch.float32, 32),
    ],
)
def test_nf4_bytes_and_absmax_equal_bitsandbytes(shape, torch_dtype, blocksize):
    w = random_weight(shape, torch_dtype, seed=sum(shape) + blocksize)
    packed_ref, state_ref = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    q = nf4.quantize_nf4(to_jax(w), blocksize=blocksize, double_quant=False)

    assert q.shape == shape and q.dtype == TORCH_TO_JAX[torch_dtype]
    assert np.array_equal(np.asarray(q.packed), packed_ref.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.absmax), state_ref.absmax.numpy())
    # Exact: both compute code * absmax in float32 and round that once to the output dtype.
    assert np.array_equal(as_f32(q.dequantize()), bnb_dequantize(packed_ref, state_ref))


@pytest.mark.parametrize(
    "shape, torch_dtype", [((33, 47), torch.float32), ((128, 320), torch.bfloat16), ((3, 5), torch.float16)]
)
def test_double_quant_equals_bitsandbytes(shape, torch_dtype):
    w = random_weight(shape, torch_dtype, seed=7)
    packed_ref, state_ref = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, plain_ref = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = nf4.quantize_nf4(to_jax(w), blocksize=64, double_quant=True)
    torch_offset = np.float32(state_ref.offset.item())

    assert np.array_equal(np.asarray(q.packed), packed_ref.numpy().reshape(-1))
    # torch's float32 mean sums in a CPU-width-dependent order; ours may differ in the last bits.
    assert abs(float(q.offset) - torch_offset) <= 4 * np.spacing(torch_offset)
    # Given the same offset, the nested stage is bit-exact: codes and nested absmax.
    codes, nested = nf4.double_quantize_absmax(jnp.asarray(plain_ref.absmax.numpy())[None], jnp.asarray([torch_offset]))
    assert np.array_equal(np.asarray(codes[0]), state_ref.absmax.numpy())
    assert np.array_equal(np.asarray(nested[0]), state_ref.state2.absmax.numpy())
    # A leaf holding bitsandbytes' statistics dequantizes exactly like bitsandbytes.
    leaf = NF4(q.packed, codes[0], nested[0], jnp.asarray(torch_offset), *shape, dtype_name=q.dtype_name)
    assert np.array_equal(as_f32(leaf.dequantize()), bnb_dequantize(packed_ref, state_ref))
    np.testing.assert_allclose(as_f32(q.block_absmax()), as_f32(leaf.block_absmax()), rtol=1e-6)


def test_nested_codes_follow_bitsandbytes_lookup_grid():
    """bitsandbytes' CPU 8-bit quantizer rounds through a 65536-point grid, not to the true nearest
    map entry; a dense sweep over [-1, 1] (which crosses every midpoint) must agree everywhere."""
    rng = np.random.default_rng(3)
    sweep = np.concatenate([[1.0], np.linspace(-1, 1, 40001), rng.uniform(-1, 1, 9215), [0.0] * 256])
    values = torch.from_numpy(sweep.astype(np.float32))
    codes_ref, state = bnbf.quantize_blockwise(values, blocksize=256)
    codes, nested = nf4.double_quantize_absmax(jnp.asarray(values.numpy())[None], jnp.zeros(1))
    assert np.array_equal(np.asarray(nested[0]), state.absmax.numpy())
    assert np.array_equal(np.asarray(codes[0]), codes_ref.numpy())


def test_zero_blocks_equal_bitsandbytes():
    w = torch.randn(7, 50)
    w[0, :] = 0.0  # a zero full block (elements 0..63 span rows 0 and 1)
    w[1, :14] = 0.0
    w[6, :] = 0.0  # the ragged last block (elements 320..349) is all zero
    w[5, 20:] = 0.0
    packed_ref, state_ref = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = nf4.quantize_nf4(to_jax(w), blocksize=64, double_quant=False)
    assert np.array_equal(np.asarray(q.packed), packed_ref.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.absmax).view(np.int32), state_ref.absmax.numpy().view(np.int32))
    assert np.array_equal(as_f32(q.dequantize()), bnb_dequantize(packed_ref, state_ref))


def test_stacked_leaf_is_per_layer_and_scans():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 24, 40)), jnp.bfloat16)
    q = quantize(w, "nf4")
    layers = [nf4.quantize_nf4(w[i]) for i in range(3)]
    assert q.shape == (3, 24, 40) and q.batch_shape == (3,)
    for i, layer in enumerate(layers):
        sliced = jax.tree.map(lambda c: c[i], q)
        assert sliced.shape == (24, 40)
        for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(layer)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    # The static metadata does not encode the layer count.
    assert jax.tree.structure(q) == jax.tree.structure(quantize(w[:2], "nf4"))

    def body(carry, layer_q):
        return carry, layer_q.dequantize(jnp.float32)

    _, per_layer = jax.jit(lambda leaf: jax.lax.scan(body, 0, leaf))(q)
    assert np.array_equal(np.asarray(per_layer), np.asarray(q.dequantize(jnp.float32)))
    assert np.array_equal(np.asarray(jax.jit(dequantize)(q)), np.asarray(q.dequantize()))


def test_api_and_errors():
    w = jnp.ones((4, 6), jnp.float32)
    q = quantize(w, "nf4", double_quant=False, dtype=jnp.bfloat16)
    assert is_quantized(q) and not is_quantized(w) and q.dtype == jnp.bfloat16
    assert q.nbytes == 12 + 4  # 24 nibbles + one float32 absmax
    assert dequantize(w) is w
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize(w, "int3")
    with pytest.raises(ValueError, match="blocksize"):
        quantize(w, "nf4", blocksize=63)
    with pytest.raises(ValueError, match="matrices"):
        quantize(jnp.ones(8), "nf4")


def llama3_8b_shapes(quantize_linear):
    L, D, F, V, Hq, Hkv, hd = 32, 4096, 14336, 128256, 32, 8, 128

    def dense(*shape):
        return jnp.zeros(shape, jnp.bfloat16)

    def linear(*shape):
        return quantize_linear(dense(L, *shape))

    return {
        "embed": dense(V, D), "lm_head": dense(V, D), "final_norm": dense(D),
        "layers": {
            "attn_norm": dense(L, D), "mlp_norm": dense(L, D),
            "q": linear(Hq * hd, D), "k": linear(Hkv * hd, D), "v": linear(Hkv * hd, D), "o": linear(D, Hq * hd),
            "gate": linear(F, D), "up": linear(F, D), "down": linear(D, F),
        },
    }


def test_llama3_8b_nf4_size_from_shapes():
    params = jax.eval_shape(lambda: llama3_8b_shapes(lambda w: quantize(w, "nf4")))
    linear_weights = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    blocks = linear_weights // 64
    nested_blocks = 32 * sum(-(-(o * i // 64) // 256) for o, i in [(4096, 4096), (1024, 4096), (1024, 4096),
                                                                    (4096, 4096), (14336, 4096), (14336, 4096),
                                                                    (4096, 14336)])
    sixteen_bit = 2 * (2 * 128256 * 4096 + 4096 + 2 * 32 * 4096)
    expected = linear_weights // 2 + blocks + 4 * nested_blocks + 4 * 32 * 7 + sixteen_bit
    assert param_bytes(params) == expected
    assert 5.25 < expected / 2**30 < 5.35  # 5.31 GiB = 5.70 GB, what bitsandbytes reports for Llama-3-8B
    dense = jax.eval_shape(lambda: llama3_8b_shapes(lambda w: w))
    assert param_bytes(dense) == 2 * (linear_weights + 2 * 128256 * 4096 + 4096 + 2 * 32 * 4096)


# ------------------------------------------------------------- transformers' bitsandbytes checkpoints


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bnb")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "dense")
    quant_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(root / "dense", quantization_config=quant_config, device_map="cpu",
                                             dtype=torch.float32)
    model.save_pretrained(root / "nf4")
    return root, model


def load_tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def test_transformers_checkpoint_round_trips(bnb_checkpoint):
    root, model = bnb_checkpoint
    tensors = load_tensors(root / "nf4")
    modules = bnb_convert.group_bnb_tensors(tensors)
    assert len(modules) == 2 * 7
    for name, entry in modules.items():
        leaf = bnb_convert.nf4_from_bnb(entry)
        weight = model.get_submodule(name).weight
        assert leaf.shape == tuple(weight.quant_state.shape) and leaf.double_quant
        assert np.array_equal(as_f32(leaf.dequantize(jnp.float32)), bnbf.dequantize_4bit(weight.data, weight.quant_state).numpy())
        written = bnb_convert.nf4_to_bnb(leaf)
        assert sorted(written) == sorted(entry)
        for suffix, array in entry.items():
            assert written[suffix].dtype == array.dtype and written[suffix].tobytes() == array.tobytes(), suffix


def test_jft_quantizes_like_transformers(bnb_checkpoint):
    root, _ = bnb_checkpoint
    dense = load_tensors(root / "dense")
    modules = bnb_convert.group_bnb_tensors(load_tensors(root / "nf4"))
    for name, entry in modules.items():
        ours = nf4.quantize_nf4(jnp.asarray(dense[name + ".weight"]))
        theirs = bnb_convert.nf4_from_bnb(entry)
        assert np.array_equal(np.asarray(ours.packed), np.asarray(theirs.packed)), name
        np.testing.assert_allclose(as_f32(ours.block_absmax()), as_f32(theirs.block_absmax()), rtol=1e-6)


def test_transformers_loads_what_jft_writes(bnb_checkpoint, tmp_path):
    """Replace every quantized linear of the saved checkpoint by jft's own quantization of the dense
    weight, with jft's config dict; transformers must load it and dequantize to jft's values."""
    from safetensors.numpy import save_file
    from transformers import LlamaForCausalLM

    root, _ = bnb_checkpoint
    dense = load_tensors(root / "dense")
    tensors = load_tensors(root / "nf4")
    ours = {}
    for name in bnb_convert.group_bnb_tensors(tensors):
        ours[name] = nf4.quantize_nf4(jnp.asarray(dense[name + ".weight"]))
        for suffix, array in bnb_convert.nf4_to_bnb(ours[name]).items():
            tensors[f"{name}.{suffix}"] = array
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "nf4" / "config.json").read_text())
    assert config["quantization_config"] == bnb_convert.bnb_quantization_config(compute_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    for name, leaf in ours.items():
        weight = model.get_submodule(name).weight
        assert np.array_equal(bnbf.dequantize_4bit(weight.data, weight.quant_state).numpy(), as_f32(leaf.dequantize()))


def one_linear(bnb_checkpoint):
    root, _ = bnb_checkpoint
    return bnb_convert.group_bnb_tensors(load_tensors(root / "nf4"))["model.layers.0.mlp.down_proj"]


def with_state(entry, **changes):
    state = json.loads(entry["weight.quant_state.bitsandbytes__nf4"].tobytes())
    state.update(changes)
    return {**entry, "weight.quant_state.bitsandbytes__nf4": np.frombuffer(json.dumps(state).encode(), np.uint8)}


def test_corrupt_bnb_input_raises_clear_errors(bnb_checkpoint):
    entry = one_linear(bnb_checkpoint)
    error = bnb_convert.BnbFormatError
    with pytest.raises(error, match="weight.absmax has 127 entries, expected 128"):
        bnb_convert.nf4_from_bnb({**entry, "weight.absmax": entry["weight.absmax"][:-1]})
    with pytest.raises(error, match="unsupported bitsandbytes quant_type 'fp4'"):
        bnb_convert.nf4_from_bnb(with_state(entry, quant_type="fp4"))
    with pytest.raises(error, match="packed bytes of a 64x100 weight"):
        bnb_convert.nf4_from_bnb(with_state(entry, shape=[64, 100]))
    with pytest.raises(error, match="nested_absmax has 2 entries"):
        bnb_convert.nf4_from_bnb({**entry, "weight.nested_absmax": np.ones(2, np.float32)})
    with pytest.raises(error, match="not valid UTF-8 JSON"):
        bnb_convert.nf4_from_bnb({**entry, "weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"{oops", np.uint8)})
    with pytest.raises(error, match="standard table"):
        bnb_convert.nf4_from_bnb({**entry, "weight.quant_map": np.linspace(-1, 1, 16, dtype=np.float32)})
    with pytest.raises(error, match="missing bitsandbytes tensor 'weight.absmax'"):
        bnb_convert.nf4_from_bnb({k: v for k, v in entry.items() if k != "weight.absmax"})
    stacked = nf4.quantize_nf4(jnp.ones((2, 4, 64)))
    with pytest.raises(ValueError, match="stacked"):
        bnb_convert.nf4_to_bnb(stacked)
