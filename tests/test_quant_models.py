"""Quantized models against transformers + bitsandbytes (CPU), in both directions, and FP8 checkpoints."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import BitsAndBytesConfig

import jft
from jft.convert.fp8 import fp8_quantization_config, fp8_to_hf
from jft.convert.hf import hf_tensors
from jft.convert.safetensors_io import save_file
from jft.quant import FP8, NF4, quantize_fp8
from tests.tiny_models import load_hf_model, save_hf_model

BNB = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)


def _ids(vocab, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=(2, 12))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def _close(ours, theirs, rel=1e-3):
    assert np.abs(ours - theirs).max() <= rel * np.abs(theirs).max(), np.abs(ours - theirs).max()


def _bnb_dequantized_reference(bnb_model, fp32_dir):
    """transformers in fp32 with every 4-bit linear replaced by bitsandbytes' own dequantization of it.

    bitsandbytes' CPU 4-bit matmul itself rounds (about 1e-2 abs on these shapes, measured against a
    dense fp32 matmul of its own dequantized weight), so the exact reference is the dense one.
    """
    import bitsandbytes.functional as F

    ref = load_hf_model(fp32_dir)
    quantized = {n: m for n, m in bnb_model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert quantized
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name in quantized:
                q = quantized[name]
                module.weight.copy_(F.dequantize_4bit(q.weight.data, q.weight.quant_state).float())
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bnb_4bit_checkpoint_loads_without_dequantizing_and_matches(family, tmp_path):
    save_hf_model(family, tmp_path / "fp32")
    hf = load_hf_model(tmp_path / "fp32", quantization_config=BNB)
    hf.save_pretrained(tmp_path / "bnb")
    model = jft.load(str(tmp_path / "bnb"), dtype="float32")
    assert isinstance(model.params["layers"]["q"], NF4) and isinstance(model.params["layers"]["down"], NF4)
    ids = _ids(model.config.vocab_size)
    ours = np.asarray(jft.forward(model, ids))
    _close(ours, _hf_logits(_bnb_dequantized_reference(hf, tmp_path / "fp32"), ids))
    _close(ours, _hf_logits(hf, ids), rel=2e-2)  # bitsandbytes' own (rounding) CPU matmul


def test_quantize_on_load_equals_bitsandbytes_quantization(tmp_path):
    save_hf_model("gemma2", tmp_path / "fp32")
    hf = load_hf_model(tmp_path / "fp32", quantization_config=BNB)
    model = jft.load(str(tmp_path / "fp32"), dtype="float32", quantize="nf4")
    ids = _ids(model.config.vocab_size, seed=1)
    _close(np.asarray(jft.forward(model, ids)), _hf_logits(_bnb_dequantized_reference(hf, tmp_path / "fp32"), ids))


def test_jft_bnb_4bit_export_loads_in_transformers(tmp_path):
    save_hf_model("mistral", tmp_path / "fp32")
    model = jft.load(str(tmp_path / "fp32"), dtype="float32", quantize="nf4")
    lora = jft.lora.init(model, r=4, key=jax.random.key(0))
    jft.convert.save_merged(model, lora, tmp_path / "bnb", dtype="float32", quantize="nf4")
    cfg = json.loads((tmp_path / "bnb" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    hf = load_hf_model(tmp_path / "bnb")
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = _ids(model.config.vocab_size, seed=2)
    again = jft.load(str(tmp_path / "bnb"), dtype="float32")
    exported = np.asarray(jft.forward(again, ids))
    _close(exported, _hf_logits(_bnb_dequantized_reference(hf, tmp_path / "fp32"), ids))
    # re-quantizing (B = 0, so the merge is the identity) only moves the double-quantized absmax
    _close(exported, np.asarray(jft.forward(model, ids)), rel=2e-2)


@pytest.mark.parametrize("layout", ["block", "row"])
def test_fp8_checkpoints_load_and_match_dequantized_weights(layout, tmp_path):
    save_hf_model("llama", tmp_path / "fp32")
    dense = jft.load(str(tmp_path / "fp32"), dtype="float32")
    tensors = {}
    for name, w in hf_tensors(dense.config, dense.params):
        if ".layers." in name and w.ndim == 2 and not name.endswith("norm.weight"):
            for suffix, t in fp8_to_hf(quantize_fp8(w, layout=layout)).items():
                tensors[name[: -len("weight")] + suffix] = t
        else:
            tensors[name] = w
    (tmp_path / "fp8").mkdir()
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    cfg = {**dense.hf_config, "quantization_config": fp8_quantization_config(layout)}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))

    model = jft.load(str(tmp_path / "fp8"), dtype="float32")
    assert isinstance(model.params["layers"]["gate"], FP8) and model.params["layers"]["gate"].layout == layout
    dequantized = jft.Model(model.config, jax.tree.map(lambda x: x.dequantize() if isinstance(x, FP8) else x,
                                                        model.params, is_leaf=lambda x: isinstance(x, FP8)))
    ids = _ids(model.config.vocab_size, seed=3)
    np.testing.assert_allclose(np.asarray(jft.forward(model, ids)), np.asarray(jft.forward(dequantized, ids)), atol=1e-5)
    # and the FP8 model stays close to the original fp32 one (e4m3 keeps ~2 significant digits)
    ref = np.asarray(jft.forward(dense, ids))
    assert np.abs(np.asarray(jft.forward(model, ids)) - ref).max() < 0.1 * np.abs(ref).max()


def test_8b_llama_in_nf4_takes_about_5_7_gib():
    from jft.config import config_from_hf
    from jft.nn.transformer import init_params
    from jft.quant import param_bytes, quantize_nf4

    cfg = config_from_hf({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8})

    def quantized(double_quant):
        params = init_params(cfg, jax.random.key(0), dtype=jax.numpy.bfloat16)
        params["layers"] = {k: quantize_nf4(v, double_quant=double_quant) if v.ndim == 3 else v
                            for k, v in params["layers"].items()}
        return params

    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    sixteen_bit = 2 * (2 * 128256 * 4096 + 65 * 4096)  # embed, lm_head, 65 norms
    for double_quant, absmax_bytes in ((True, 1), (False, 4)):
        nested = linear // 64 // 256 * 4 if double_quant else 0  # f32 scale per 256 absmax codes
        expected = sixteen_bit + linear // 2 + linear // 64 * absmax_bytes + nested
        got = param_bytes(jax.eval_shape(lambda: quantized(double_quant)))
        assert abs(got - expected) < 2**16, (double_quant, got, expected)  # per-matrix offsets and rounding
        assert got / 2**30 <= 5.7


def note_dense_choices(monkeypatch, module) -> list[bool]:
    """Records every choice `module.dense_once_fits` makes (patched for the test); returns the record."""
    choices, decide = [], module.dense_once_fits

    def noted(*args):
        choices.append(decide(*args))
        return choices[-1]

    monkeypatch.setattr(module, "dense_once_fits", noted)
    return choices


def test_generation_makes_quantized_weights_dense_once_when_they_fit(tmp_path, monkeypatch):
    """Greedy generation from an NF4 model equals transformers on bitsandbytes' dequantized weights,
    whether the weights are made dense once (when the program fits half the free device memory) or
    dequantized in every decoding step (no free memory reported, as on CPU, or too little)."""
    from jft import memory
    from jft.nn import generate as gen
    from tests.test_kernels_nf4 import loops_read_packed_bytes

    save_hf_model("llama", tmp_path / "fp32")
    hf = load_hf_model(tmp_path / "fp32", quantization_config=BNB)
    reference = _bnb_dequantized_reference(hf, tmp_path / "fp32")
    model = jft.load(str(tmp_path / "fp32"), dtype="float32", quantize="nf4")
    prompt = _ids(model.config.vocab_size, seed=2)[0].tolist()
    with torch.no_grad():
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    choices = note_dense_choices(monkeypatch, gen)
    for free in (None, 2**40, 2**10):
        monkeypatch.setattr(memory, "free_device_bytes", lambda: free)
        assert jft.generate(model, [prompt], max_new_tokens=8, eos_token_ids=()).ids[0] == want
    assert choices == [False, True, False]
    # one row a step, per-step weights, Pallas kernels: the fused NF4 matmul (interpret mode here)
    monkeypatch.setattr(memory, "free_device_bytes", lambda: None)
    jax.clear_caches()  # generation is jitted, and the kernel mode is read when tracing
    with jft.kernels.use("pallas"):
        assert jft.generate(model, [prompt], max_new_tokens=8, eos_token_ids=()).ids[0] == want

    args = (model.config, model.params, None, jax.numpy.asarray([prompt]), jax.numpy.ones((1, len(prompt)), "int32"),
            jax.random.key(0))
    for dequantize in (True, False):
        jaxpr = gen.generate_ids.trace(*args, dequantize=dequantize, max_new_tokens=8, temperature=0.0, top_k=0,
                                       top_p=1.0, min_p=0.0, eos_ids=(), pad_id=0).jaxpr
        assert loops_read_packed_bytes(jaxpr) != dequantize
