"""Merged LoRA checkpoints, loaded back by transformers."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jft
from tests.test_lora import _random_b
from tests.tiny_models import LONGROPE, save_hf_model


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])
def test_merged_checkpoint_loads_in_transformers_with_jft_logits(family, tmp_path):
    save_hf_model(family, tmp_path / "base")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = _random_b(jft.lora.init(model, r=4, alpha=8, layers=[0, 2], key=jax.random.key(0)), jax.random.key(1))
    jft.convert.save_merged(model, lora, tmp_path / "merged", dtype="float32", max_shard_size=40_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(2, 12))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(jft.forward(model, ids, lora=lora)), atol=1e-4, rtol=0)


def test_merged_longrope_checkpoint_keeps_its_rope(tmp_path):
    """config.json carries the longrope factors through: transformers and jft both read them back, and
    transformers' logits equal jft's within the original context and beyond it."""
    save_hf_model("phi3", tmp_path / "base", **LONGROPE)
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = _random_b(jft.lora.init(model, r=4, alpha=8, key=jax.random.key(0)), jax.random.key(1))
    jft.convert.save_merged(model, lora, tmp_path / "merged", dtype="float32")
    assert jft.load(str(tmp_path / "merged"), dtype="float32").config == model.config
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert hf.config.rope_parameters["long_factor"] == list(LONGROPE["rope_parameters"]["long_factor"])
    for length in (20, 48):
        ids = np.random.default_rng(length).integers(3, model.config.vocab_size, size=(1, length))
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(theirs, np.asarray(jft.forward(model, ids, lora=lora)), atol=1e-4, rtol=0)


def test_merged_bf16_config_says_bfloat16(tmp_path):
    save_hf_model("llama", tmp_path / "base")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    jft.convert.save_merged(model, None, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert hf.dtype == torch.bfloat16
