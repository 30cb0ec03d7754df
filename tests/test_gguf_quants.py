"""jft's GGML quantizers against the references: gguf-py (Q8_0/Q4_0/Q5_0/Q5_1/F16/BF16 bytes and
every dequantizer) and llama.cpp's own `llama_model_quantize` (K-quant bytes and the per-tensor
type mixture), run on the same f32 GGUF."""

import ctypes

import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from jft.convert import gguf_quants as q


def _awkward_rows(x: np.ndarray) -> np.ndarray:
    """Overwrite the first rows with the cases quantizers get wrong: zeros, constants, values
    small enough for subnormal half scales, large values, all-negative rows, outliers, ties."""
    x = x.copy()
    n = x.shape[1]
    x[0] = 0
    x[1] = 0.5
    x[2] *= 1e-6
    x[3] *= 1e3
    x[4] = -np.abs(x[4])
    x[5, n // 3] = 40.0
    x[6, : n // 2] = 0
    x[7] = np.round(x[7] * 4) / 4  # many exact halves after scaling
    return x


def _random(shape, seed=0):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.01, 2.0, (shape[0], 1)).astype(np.float32)
    return _awkward_rows((rng.standard_normal(shape) * scale).astype(np.float32))


GGUF_PY_QUANTIZABLE = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "f16": T.F16, "bf16": T.BF16}


@pytest.mark.parametrize("name", sorted(GGUF_PY_QUANTIZABLE))
def test_bytes_equal_gguf_py(name):
    x = _random((24, 512))
    ours = q.QUANT_TYPES[name].quantize(x)
    reference = gguf.quants.quantize(x, GGUF_PY_QUANTIZABLE[name])
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, reference.view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("name", sorted(q.QUANT_TYPES))
def test_dequantize_equals_gguf_py(name):
    x = _random((12, 512), seed=1)
    spec = q.QUANT_TYPES[name]
    packed = spec.quantize(x)
    ours = spec.dequantize(packed)
    reference = gguf.quants.dequantize(packed, T(spec.type_id))
    np.testing.assert_array_equal(ours, reference.reshape(ours.shape))
    assert ours.shape == x.shape and ours.dtype == np.float32


def test_quantize_keeps_leading_shape_and_checks_rows():
    x = _random((8, 256))[:6].reshape(2, 3, 256)
    assert q.quantize_q4_k(x).shape == (2, 3, 144)
    assert q.quantize_q8_0(x).shape == (2, 3, 8 * 34)
    with pytest.raises(ValueError, match="not a multiple of the block size 256"):
        q.quantize_q6_k(np.zeros((2, 100), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        q.quantize_q8_0(np.zeros((2, 32), np.int32))


# --------------------------------------------------------------------------- llama.cpp


N_LAYERS, DIM, FFN, VOCAB = 8, 256, 320, 384  # FFN: ffn_down rows of 320 force the fallbacks


def _write_f32_gguf(path, n_layers, heads, kv_heads, vocab, tied):
    """A llama-architecture f32 GGUF with the metadata llama.cpp's quantizer reads."""
    head_dim = DIM // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(DIM)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(0)
    tensors = {}
    seed = iter(range(10_000))

    def add(name, shape):
        tensors[name] = _random(shape, next(seed)) if len(shape) == 2 else np.ones(shape, np.float32)
        w.add_tensor(name, tensors[name])

    add("token_embd.weight", (vocab, DIM))
    add("output_norm.weight", (DIM,))
    if not tied:
        add("output.weight", (vocab, DIM))
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (DIM,))
        add(p + "attn_q.weight", (DIM, DIM))
        add(p + "attn_k.weight", (kv_heads * head_dim, DIM))
        add(p + "attn_v.weight", (kv_heads * head_dim, DIM))
        add(p + "attn_output.weight", (DIM, DIM))
        add(p + "ffn_norm.weight", (DIM,))
        add(p + "ffn_gate.weight", (FFN, DIM))
        add(p + "ffn_up.weight", (FFN, DIM))
        add(p + "ffn_down.weight", (DIM, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _llama_cpp_quantize(src, dst, method):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = q.resolve_quant_method(method).file_type
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return {t.name: t for t in gguf.GGUFReader(dst).tensors}


MODELS = {  # name: (n_layers, heads, kv_heads, vocab, tied)
    "gqa4": (N_LAYERS, 4, 1, VOCAB, False),
    "tied": (3, 2, 2, 256, True),
}


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_quants")
    return {name: (root / f"{name}.gguf", _write_f32_gguf(root / f"{name}.gguf", *spec)) for name, spec in MODELS.items()}


METHODS = ["q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "q8_0", "q4_0", "q5_0", "q5_1", "f16", "bf16"]
CASES = [("gqa4", m) for m in METHODS] + [("tied", "q4_k_m"), ("tied", "q2_k")]


@pytest.mark.parametrize("model, method", CASES)
def test_types_and_bytes_equal_llama_cpp(f32_models, tmp_path, monkeypatch, model, method):
    # small chunks so that the multi-chunk, multi-thread path is the one compared
    monkeypatch.setattr(q, "_CHUNK_ELEMENTS", 4096)
    src, tensors = f32_models[model]
    n_layers, heads, kv_heads, _, tied = MODELS[model]
    theirs = _llama_cpp_quantize(src, tmp_path / "out.gguf", method)
    assert set(theirs) == set(tensors)
    for name, x in tensors.items():
        chosen = q.tensor_type(name, None, n_layers, method, shape=x.shape, n_gqa=heads // kv_heads, tied_embeddings=tied)
        spec = q.QUANT_TYPES[chosen]
        assert spec.type_id == int(theirs[name].tensor_type), (name, chosen, theirs[name].tensor_type.name)
        ours = spec.quantize(x)
        reference = np.asarray(theirs[name].data).view(np.uint8).reshape(ours.shape)
        if not np.array_equal(ours, reference):
            rows = np.nonzero((ours != reference).any(axis=-1))[0]
            pytest.fail(f"{name} ({chosen}): {len(rows)} of {len(ours)} rows differ from llama.cpp, first {rows[:5]}")


# --------------------------------------------------------------------------- names and mixtures


@pytest.mark.parametrize(
    "alias, canonical",
    [("fast_quantized", "q8_0"), ("quantized", "q4_k_m"), ("not_quantized", "f16"), ("Q4_K_M", "q4_k_m"),
     (" q5_k_m ", "q5_k_m"), ("q4_k", "q4_k_m"), ("BF16", "bf16"), ("q3_k_m", "q3_k_m"), ("q2_k", "q2_k")],
)
def test_resolve_quant_method(alias, canonical):
    assert q.resolve_quant_method(alias).name == canonical


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown GGUF quantization method 'q4_k_xl'.*fast_quantized.*q4_k_m"):
        q.resolve_quant_method("q4_k_xl")


def test_file_types_match_llama_cpp():
    for method, constant in [("f32", "LLAMA_FTYPE_ALL_F32"), ("f16", "LLAMA_FTYPE_MOSTLY_F16"),
                             ("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
                             ("q5_k_m", "LLAMA_FTYPE_MOSTLY_Q5_K_M"), ("q3_k_m", "LLAMA_FTYPE_MOSTLY_Q3_K_M"),
                             ("q2_k", "LLAMA_FTYPE_MOSTLY_Q2_K"), ("q6_k", "LLAMA_FTYPE_MOSTLY_Q6_K"),
                             ("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("bf16", "LLAMA_FTYPE_MOSTLY_BF16")]:
        assert q.resolve_quant_method(method).file_type == getattr(llama_cpp, constant)


def test_type_table_matches_gguf_py():
    for spec in q.QUANT_TYPES.values():
        assert gguf.GGML_QUANT_SIZES[T(spec.type_id)] == (spec.block_size, spec.type_size)
        assert T(spec.type_id).name.lower() == spec.name
