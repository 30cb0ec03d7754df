"""Merged LoRA checkpoints, loaded back by transformers."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jft
from tests.test_lora import _random_b
from tests.tiny_models import LONGROPE, load_hf_model, save_hf_model


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])
def test_merged_checkpoint_loads_in_transformers_with_jft_logits(family, tmp_path):
    save_hf_model(family, tmp_path / "base")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = _random_b(jft.lora.init(model, r=4, alpha=8, layers=[0, 2], key=jax.random.key(0)), jax.random.key(1))
    jft.convert.save_merged(model, lora, tmp_path / "merged", dtype="float32", max_shard_size=40_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(2, 12))
    hf = load_hf_model(tmp_path / "merged")
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
    hf = load_hf_model(tmp_path / "merged")
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


def test_merged_save_replaces_an_older_model_in_the_directory(tmp_path):
    save_hf_model("llama", tmp_path / "base")
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = _random_b(jft.lora.init(model, r=4, alpha=8, key=jax.random.key(0)), jax.random.key(1))
    out = tmp_path / "merged"
    jft.convert.save_merged(model, None, out, dtype="float32", max_shard_size=40_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    (out / "README.md").write_text("notes")
    (out / "adapter_model.safetensors").write_bytes(b"not ours")
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(1, 8))
    expected = np.asarray(jft.forward(model, ids, lora=lora))
    for shard_size in (None, 40_000):  # sharded -> one file, then one file -> sharded
        jft.convert.save_merged(model, lora, out, dtype="float32", **({"max_shard_size": shard_size} if shard_size else {}))
        weights = sorted(p.name for p in out.glob("model*"))
        assert weights == (["model.safetensors"] if shard_size is None else
                           sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
                           + ["model.safetensors.index.json"])
        assert (out / "README.md").read_text() == "notes" and (out / "adapter_model.safetensors").exists()
        hf = load_hf_model(out)
        with torch.no_grad():
            np.testing.assert_allclose(hf(input_ids=torch.tensor(ids)).logits.numpy(), expected, atol=1e-4, rtol=0)
