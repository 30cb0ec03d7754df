"""LoRA against PEFT + transformers: gradients, adapter files in both directions, merging."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import jft
import jft.lora
from jft.convert.peft import adapter_tensors, load_lora, save_lora
from jft.quant import NF4
from jft.train.step import loss_and_grads
from tests.test_quant_models import BNB, _bnb_dequantized_reference
from tests.tiny_models import load_hf_model, save_hf_model


def _random_b(lora, key, std=0.05):
    """B = 0 at init makes A's gradient vanish; give B values so every gradient is exercised."""
    layers = {}
    for i, (t, w) in enumerate(lora.weights["layers"].items()):
        layers[t] = {"a": w["a"], "b": jax.random.normal(jax.random.fold_in(key, i), w["b"].shape) * std}
    return dataclasses.replace(lora, weights={**lora.weights, "layers": layers})


def _batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(2, 14)).astype(np.int32)
    labels = ids.copy()
    labels[:, :5] = -100  # prompt tokens
    labels[1, 11:] = -100
    return ids, labels


def _jft_grads(model, lora, ids, labels, remat="none"):
    batch = {"input_ids": ids, "labels": labels, "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape),
             "segment_ids": np.ones_like(ids)}
    batch = {k: jnp.asarray(v, jnp.int32)[None] for k, v in batch.items()}
    loss, grads, _ = loss_and_grads(model.config, model.params, lora, batch, remat=remat)
    return float(loss), grads


def _peft_grads(hf_dir, adapter_dir, ids, labels):
    hf = load_hf_model(hf_dir)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True)
    out = peft_model(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long))
    out.loss.backward()
    grads = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "").replace(".modules_to_save", "").replace(".original_module", "")
            grads[key] = p.grad.numpy()
    return float(out.loss), grads


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_lora_gradients_equal_peft(family, tmp_path):
    save_hf_model(family, tmp_path / "base")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = _random_b(jft.lora.init(model, r=4, alpha=8, targets="all-linear", key=jax.random.key(1)), jax.random.key(2))
    save_lora(model, lora, tmp_path / "adapter")
    ids, labels = _batch(model.config.vocab_size)

    loss, grads = _jft_grads(model, lora, ids, labels)
    peft_loss, peft_grads = _peft_grads(tmp_path / "base", tmp_path / "adapter", ids, labels)
    assert abs(loss - peft_loss) < 1e-5 * abs(peft_loss)

    ours, _ = adapter_tensors(model, grads)
    assert set(ours) == {k for k in peft_grads if "lora_" in k}
    for name, g in ours.items():
        ref = peft_grads[name]
        if family == "phi3" and "lora_B" in name:  # fused B is block-diagonal: compare the blocks we own
            ref = np.where(g != 0, ref, 0)
        scale = np.abs(ref).max()
        assert scale > 0, name
        np.testing.assert_allclose(g, ref, atol=1e-4 * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("remat, kernels", [("none", "auto"), ("full", "auto"), ("save_dots", "auto"), ("full", "pallas")])
def test_qlora_gradients_equal_peft_on_bitsandbytes_weights(remat, kernels, tmp_path):
    """jft's NF4 matmul (which dequantizes again in the backward pass) against PEFT over
    transformers holding bitsandbytes' own dequantization of the same 4-bit checkpoint; with
    "pallas", the layer scan's NF4 views go through the Pallas dequantize (interpret mode)."""
    save_hf_model("llama", tmp_path / "fp32")
    bnb = load_hf_model(tmp_path / "fp32", quantization_config=BNB)
    bnb.save_pretrained(tmp_path / "bnb")
    _bnb_dequantized_reference(bnb, tmp_path / "fp32").save_pretrained(tmp_path / "dequantized")
    model = jft.load(str(tmp_path / "bnb"), dtype="float32")
    assert isinstance(model.params["layers"]["q"], NF4)
    lora = _random_b(jft.lora.init(model, r=4, alpha=8, targets="all-linear", key=jax.random.key(1)), jax.random.key(2))
    save_lora(model, lora, tmp_path / "adapter")
    ids, labels = _batch(model.config.vocab_size)

    with jft.kernels.use(kernels):
        loss, grads = _jft_grads(model, lora, ids, labels, remat)
    peft_loss, peft_grads = _peft_grads(tmp_path / "dequantized", tmp_path / "adapter", ids, labels)
    assert abs(loss - peft_loss) < 1e-5 * abs(peft_loss)
    for name, g in adapter_tensors(model, grads)[0].items():
        ref = peft_grads[name]
        np.testing.assert_allclose(g, ref, atol=1e-4 * np.abs(ref).max(), rtol=0, err_msg=name)


def test_trainable_embeddings_gradients_equal_peft(tmp_path):
    save_hf_model("llama", tmp_path / "base")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = jft.lora.init(model, r=4, alpha=8, targets=("q", "v"), train_embeddings=True, key=jax.random.key(1))
    lora = _random_b(lora, jax.random.key(2))
    save_lora(model, lora, tmp_path / "adapter")
    ids, labels = _batch(model.config.vocab_size, seed=1)
    _, grads = _jft_grads(model, lora, ids, labels)
    _, peft_grads = _peft_grads(tmp_path / "base", tmp_path / "adapter", ids, labels)
    for ours, theirs in (("embed", "base_model.model.model.embed_tokens.weight"), ("lm_head", "base_model.model.lm_head.weight")):
        ref = peft_grads[theirs]
        np.testing.assert_allclose(np.asarray(grads.weights[ours]), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_adapter_saved_by_jft_gives_jft_logits_in_peft(family, tmp_path):
    save_hf_model(family, tmp_path / "base")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = _random_b(jft.lora.init(model, r=4, alpha=16, targets="all-linear", use_rslora=True, key=jax.random.key(3)),
                     jax.random.key(4))
    save_lora(model, lora, tmp_path / "adapter")
    ids, _ = _batch(model.config.vocab_size, seed=2)
    ours = np.asarray(jft.forward(model, ids, lora=lora))
    hf = load_hf_model(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_adapter_trained_by_peft_loads_into_jft(family, tmp_path):
    save_hf_model(family, tmp_path / "base")
    hf = load_hf_model(tmp_path / "base")
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else ["q_proj", "v_proj", "down_proj"]
    cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={targets[0]: 6},
                         alpha_pattern={targets[0]: 3.0}, layers_to_transform=[0, 2])
    peft_model = get_peft_model(hf, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = load_lora(model, tmp_path / "adapter")
    ids, _ = _batch(model.config.vocab_size, seed=3)
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jft.forward(model, ids, lora=lora)), theirs, atol=1e-4, rtol=0)


def test_merge_equals_lora_forward(tmp_path):
    save_hf_model("gemma", tmp_path / "base")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = _random_b(jft.lora.init(model, r=4, alpha=8, key=jax.random.key(5)), jax.random.key(6))
    ids, _ = _batch(model.config.vocab_size, seed=4)
    merged = jft.lora.merge(model, lora)
    np.testing.assert_allclose(np.asarray(jft.forward(merged, ids)), np.asarray(jft.forward(model, ids, lora=lora)),
                               atol=1e-4, rtol=0)


def test_adapter_for_another_base_is_rejected(tmp_path):
    save_hf_model("llama", tmp_path / "a")
    save_hf_model("llama", tmp_path / "b", hidden_size=32, intermediate_size=64)
    model_a = jft.load(str(tmp_path / "a"), dtype="float32")
    save_lora(model_a, jft.lora.init(model_a, r=2, key=jax.random.key(0)), tmp_path / "adapter")
    with pytest.raises(jft.CheckpointError, match="base model needs"):
        load_lora(jft.load(str(tmp_path / "b"), dtype="float32"), tmp_path / "adapter")
