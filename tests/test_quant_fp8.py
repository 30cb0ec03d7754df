"""FP8 leaves against transformers' FP8 quantizer, dequantizer, modules and checkpoint loading."""

import json
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from jft.convert import fp8 as fp8_convert
from jft.quant import FP8, dequantize, param_bytes, quantize
from jft.quant import fp8

E4M3_MANTISSA_BITS = 3
E4M3_MIN_NORMAL = 2.0**-6
E4M3_SUBNORMAL_STEP = 2.0**-9


def e4m3_error_bound(w: np.ndarray, scale_per_element: np.ndarray) -> np.ndarray:
    """Round-to-nearest e4m3 of w/scale: half an ulp, relative 2**-4 for normals and half the
    subnormal step below 2**-6, mapped back through the scale (plus float32 slack)."""
    scaled = np.abs(w) / scale_per_element
    half_ulp = np.where(scaled >= E4M3_MIN_NORMAL, scaled * 2.0 ** -(E4M3_MANTISSA_BITS + 1), E4M3_SUBNORMAL_STEP / 2)
    return half_ulp * scale_per_element * (1 + 1e-5) + 1e-7 * np.abs(w)


def expand_scale(q: FP8) -> np.ndarray:
    scale = np.asarray(q.scale)
    if q.block is None:
        return np.broadcast_to(scale, q.shape)
    bm, bn = q.block
    full = np.repeat(np.repeat(scale, bm, axis=-2), bn, axis=-1)
    return full[..., : q.shape[-2], : q.shape[-1]]


@pytest.mark.parametrize("layout", ["row", "block"])
@pytest.mark.parametrize("shape", [(200, 300), (2, 130, 129)])
def test_round_trip_within_e4m3_bounds(layout, shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 2, shape))).astype(np.float32)
    w[..., 0, :7] = 0.0
    q = quantize(jnp.asarray(w), "fp8", layout=layout)
    assert q.shape == shape and q.dtype == jnp.float32 and q.layout == layout
    assert q.scale.shape == fp8.expected_scale_shape(shape, q.block)
    back = np.asarray(dequantize(q))
    error = np.abs(back - w)
    assert np.all(error <= e4m3_error_bound(w, expand_scale(q)))
    assert np.all(back[..., 0, :7] == 0)
    # Every row / tile uses the full e4m3 range: its largest magnitude maps to 448.
    assert float(jnp.max(jnp.abs(q.values.astype(jnp.float32)))) == 448.0


def test_stacked_fp8_slices_per_layer():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 130, 260)), jnp.bfloat16)
    q = quantize(w, "fp8")
    for i in range(3):
        single = quantize(w[i], "fp8")
        sliced = jax.tree.map(lambda c: c[i], q)
        assert sliced.shape == (130, 260)
        assert np.array_equal(np.asarray(sliced.values), np.asarray(single.values))
        assert np.array_equal(np.asarray(sliced.scale), np.asarray(single.scale))
    assert jax.tree.structure(q) == jax.tree.structure(quantize(w[:1], "fp8"))
    assert q.nbytes == 3 * 130 * 260 + 4 * 3 * 2 * 3
    assert param_bytes({"w": q, "b": jnp.zeros(4)}) == q.nbytes + 16
    _, per_layer = jax.lax.scan(lambda c, leaf: (c, leaf.dequantize()), 0, q)
    assert np.array_equal(np.asarray(per_layer), np.asarray(q.dequantize()))


def transformers_fp8_ops():
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    hf_quantizer = types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128]))
    return Fp8Quantize(hf_quantizer), Fp8Dequantize(hf_quantizer)


def test_block_layout_bit_exact_with_transformers_quantizer():
    quantizer, dequantizer = transformers_fp8_ops()
    w = torch.randn(256, 384, dtype=torch.bfloat16) * 0.05
    w[:128, :128] = 0.0  # an all-zero tile keeps scale 1
    theirs = quantizer.convert({"layer.weight": w})
    ours = fp8_convert.fp8_to_hf(quantize(jnp.asarray(w.float().numpy()).astype(jnp.bfloat16), "fp8"))
    assert ours["weight"].dtype == ml_dtypes.float8_e4m3fn and ours["weight_scale_inv"].dtype == np.float32
    assert np.array_equal(ours["weight"].view(np.uint8), theirs["layer.weight"].view(torch.uint8).numpy())
    assert np.array_equal(ours["weight_scale_inv"], theirs["layer.weight_scale_inv"].numpy())
    leaf = fp8_convert.fp8_from_hf(ours, dtype="float32")
    values = torch.from_numpy(ours["weight"].view(np.uint8)).view(torch.float8_e4m3fn)
    reference = dequantizer._dequantize_one(values, torch.from_numpy(ours["weight_scale_inv"]), torch.float32)
    assert np.array_equal(np.asarray(leaf.dequantize()), reference.numpy())


def test_row_layout_matches_fbgemm_module_parameters():
    """transformers' fbgemm_fp8 needs CUDA and fbgemm-gpu to load, so on CPU we check the tensors
    against the parameters FbgemmFp8Linear registers, and the config against FbgemmFp8Config."""
    from transformers import FbgemmFp8Config
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear

    module = FbgemmFp8Linear(96, 40, bias=False)
    tensors = fp8_convert.fp8_to_hf(quantize(jnp.ones((40, 96)), "fp8", layout="row"))
    assert sorted(tensors) == ["weight", "weight_scale"]
    for name, array in tensors.items():
        expected = getattr(module, name)
        assert tuple(array.shape) == tuple(expected.shape), name
        assert str(expected.dtype) == f"torch.{array.dtype}", name
    config = fp8_convert.fp8_quantization_config("row")
    assert FbgemmFp8Config.from_dict(config).to_dict() == {**FbgemmFp8Config().to_dict(), **config}


def tiny_llama(root):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(root)
    return model


def test_transformers_loads_jft_block_fp8_checkpoint(tmp_path, monkeypatch):
    """transformers dequantizes fine-grained FP8 checkpoints when no GPU is present: every weight it
    loads must equal jft's dequantization of the leaf jft wrote. (With a GPU it keeps them in FP8, so
    the GPU is hidden from it here.)"""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny_llama(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    leaves = {}
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        module = name.removesuffix(".weight")
        leaves[module] = quantize(jnp.asarray(tensors[name].numpy()), "fp8", layout="block")
        for suffix, array in fp8_convert.fp8_to_hf(leaves[module]).items():
            if array.dtype == ml_dtypes.float8_e4m3fn:
                tensors[f"{module}.{suffix}"] = torch.from_numpy(array.view(np.uint8)).view(torch.float8_e4m3fn)
            else:
                tensors[f"{module}.{suffix}"] = torch.from_numpy(array)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = fp8_convert.fp8_quantization_config("block")
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    for module, leaf in leaves.items():
        loaded = model.get_submodule(module).weight.detach().float().numpy()
        assert np.array_equal(loaded, np.asarray(leaf.dequantize(jnp.float32))), module


def test_corrupt_fp8_input_raises_clear_errors():
    tensors = fp8_convert.fp8_to_hf(quantize(jnp.ones((200, 300)), "fp8"))
    error = fp8_convert.Fp8FormatError
    with pytest.raises(error, match=r"weight_scale_inv \(block \(128, 128\)\) has shape \(2, 2\), expected \(2, 3\)"):
        fp8_convert.fp8_from_hf({**tensors, "weight_scale_inv": tensors["weight_scale_inv"][:, :2]})
    with pytest.raises(error, match="exactly one of"):
        fp8_convert.fp8_from_hf({**tensors, "weight_scale": np.ones((200, 1), np.float32)})
    with pytest.raises(error, match="float8_e4m3fn"):
        fp8_convert.fp8_from_hf({**tensors, "weight": np.ones((200, 300), np.float16)})
    with pytest.raises(error, match=r"weight_scale has shape \(199, 1\)"):
        fp8_convert.fp8_from_hf({"weight": tensors["weight"], "weight_scale": np.ones((199, 1), np.float32)})
    with pytest.raises(ValueError, match="unknown FP8 layout"):
        quantize(jnp.ones((4, 4)), "fp8", layout="tile")
