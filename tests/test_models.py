"""The decoder against transformers: logits, greedy generation, checkpoint round trips, bad input."""

import dataclasses
import json
import math
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

import jft
from tests.tiny_models import FAMILIES, LONGROPE, WINDOW, YARN, YARN_TUNED, load_hf_model, save_hf_model

SEQ = 3 * WINDOW + 5  # longer than the sliding window


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(request.param, path)
    return request.param, hf_model, jft.load(str(path), dtype="float32")


def _hf_logits(hf_model, ids, mask=None, positions=None):
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                       position_ids=None if positions is None else torch.tensor(positions))
    return out.logits.numpy()


def test_logits_match_transformers(family_model):
    family, hf_model, model = family_model
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(2, SEQ))
    ours = np.asarray(jft.forward(model, ids))
    np.testing.assert_allclose(ours, _hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_logits_match_transformers_with_left_padding(family_model):
    family, hf_model, model = family_model
    rng = np.random.default_rng(1)
    ids = rng.integers(3, model.config.vocab_size, size=(2, SEQ))
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = np.asarray(jft.forward(model, ids, attention_mask=mask))
    theirs = _hf_logits(hf_model, ids, mask, positions)
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(family_model):
    family, hf_model, model = family_model
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (5, 11, 8)]
    new = 24
    ours = jft.generate(model, prompts, max_new_tokens=new, eos_token_ids=())
    for prompt, got in zip(prompts, ours.ids):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


def test_batched_generation_equals_single_prompt_generation(family_model):
    _, _, model = family_model
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (4, 9)]
    batched = jft.generate(model, prompts, max_new_tokens=12, eos_token_ids=()).ids
    singles = [jft.generate(model, [p], max_new_tokens=12, eos_token_ids=()).ids[0] for p in prompts]
    assert batched == singles


def test_save_then_load_is_bit_identical(family_model, tmp_path):
    _, _, model = family_model
    jft.convert.save_pretrained(model, tmp_path / "saved")
    again = jft.load(str(tmp_path / "saved"), dtype="float32")
    flat_a = jax_leaves(model.params)
    flat_b = jax_leaves(again.params)
    assert len(flat_a) == len(flat_b)
    for a, b in zip(flat_a, flat_b):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture()
def llama_dir(tmp_path):
    save_hf_model("llama", tmp_path / "m")
    return tmp_path / "m"


def test_missing_tensor_names_file_and_tensor(llama_dir):
    from jft.convert.safetensors_io import SafetensorsFile, save_file

    f = SafetensorsFile(llama_dir / "model.safetensors")
    tensors = {k: np.array(f[k]) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(jft.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        jft.load(str(llama_dir))


def test_wrong_shape_names_file_and_tensor(llama_dir):
    from jft.convert.safetensors_io import SafetensorsFile, save_file

    f = SafetensorsFile(llama_dir / "model.safetensors")
    tensors = {k: np.array(f[k]) for k in f.keys()}
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(jft.CheckpointError, match=r"model\.safetensors.*k_proj\.weight.*shape"):
        jft.load(str(llama_dir))


def test_truncated_file_is_reported(llama_dir):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(jft.CheckpointError, match=r"model\.safetensors.*truncated"):
        jft.load(str(llama_dir))


def test_unknown_model_type_is_reported(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(jft.ConfigError, match="mamba"):
        jft.load(str(llama_dir))


def test_unsupported_dtype_is_reported(llama_dir):
    with pytest.raises(ValueError, match="dtype must be bfloat16, float16 or float32, got 'float8'"):
        jft.load(str(llama_dir), dtype="float8")
    with pytest.raises(ValueError, match="got 'int8'"):
        jft.load(str(llama_dir), dtype="int8")


def test_missing_directory_and_offline_hub_id_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        jft.load(str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Hugging Face hub"):
        jft.load("some-org/some-model-that-is-not-cached")


def test_a_model_directory_without_tokenizer_files_is_named(llama_dir, tmp_path):
    from jft.convert.gguf import save_gguf

    model = jft.load(str(llama_dir), dtype="float32")  # save_hf_model writes no tokenizer
    missing = f"{llama_dir} has no tokenizer (none of tokenizer.json, tokenizer.model, tokenizer_config.json): copy"
    with pytest.raises(ValueError, match=re.escape(missing) + ".* or pass token ids"):
        jft.generate(model, "hello")
    with pytest.raises(ValueError, match=re.escape(missing) + ".* or pass tokenised examples"):
        jft.train.SFT(model, jft.lora.init(model, r=2), progress=False).fit([{"text": "hello"}], steps=1)
    with pytest.raises(ValueError, match=re.escape(missing)):
        save_gguf(model, None, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=r"has no tokenizer: load it with one \(jft.load\(..., tokenizer=True\)\), or pass token ids"):
        jft.generate(dataclasses.replace(model, path=None), "hello")  # made in memory


def test_malformed_json_files_are_named(base, tmp_path):
    model = jft.load(base, dtype="float32")
    jft.convert.save_lora(model, jft.lora.init(model, r=2), tmp_path / "adapter")
    jft.convert.save_pretrained(model, tmp_path / "sharded", max_shard_size=20_000)
    cases = [("tokenizer.json", lambda d: jft.load(d)), ("tokenizer_config.json", lambda d: jft.load(d)),
             ("generation_config.json", lambda d: jft.generate(jft.load(d), "hi", max_new_tokens=1)),
             ("model.safetensors.index.json", lambda d: jft.load(d)),
             ("adapter_config.json", lambda d: jft.convert.load_lora(model, d))]
    for name, use in cases:
        source = tmp_path / ("adapter" if name.startswith("adapter") else "sharded")
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(source, broken)
        (broken / name).write_text('{"a": 1,\n "b": }')
        with pytest.raises(ValueError, match=re.escape(f"{broken / name}: not valid JSON (") + ".*line 2 column 7"):
            use(str(broken))


def test_generation_past_the_context_warns_and_still_equals_transformers(llama_dir):
    model = jft.load(str(llama_dir), dtype="float32")
    context = model.config.max_position_embeddings
    prompt = np.random.default_rng(4).integers(3, model.config.vocab_size, size=context - 4).tolist()
    with pytest.warns(UserWarning, match=f"plus max_new_tokens=10 goes past the model's context of {context} tokens"):
        ours = jft.generate(model, [prompt], max_new_tokens=10, eos_token_ids=()).ids[0]
    hf = load_hf_model(llama_dir)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, len(prompt):].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jft.generate(model, [prompt[: context - 10]], max_new_tokens=10, eos_token_ids=())


def test_old_rope_theta_config_layout_is_read(tmp_path):
    from jft.config import config_from_hf

    old = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    new = {**old, "rope_parameters": {"rope_theta": 500000.0, **old["rope_scaling"]}}
    del new["rope_theta"], new["rope_scaling"]
    assert config_from_hf(old).rope == config_from_hf(new).rope
    assert config_from_hf(old).rope.kind == "llama3" and config_from_hf(old).rope.theta == 500000.0


def test_sharded_checkpoint_loads_like_single_file(llama_dir, tmp_path):
    model = jft.load(str(llama_dir), dtype="float32")
    jft.convert.save_pretrained(model, tmp_path / "sharded", max_shard_size=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = jft.load(str(tmp_path / "sharded"), dtype="float32")
    for a, b in zip(jax_leaves(model.params), jax_leaves(again.params)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_causal_attention_path_equals_masked_path_on_unpacked_rows(family, tmp_path):
    """The mask-free path the GPU uses with cuDNN (checked here through XLA) on sliding-window models."""
    import jax.numpy as jnp

    from jft.nn import transformer

    save_hf_model(family, tmp_path / "m")
    model = jft.load(str(tmp_path / "m"), dtype="float32")
    ids = jnp.asarray(np.random.default_rng(4).integers(3, model.config.vocab_size, size=(2, SEQ)))
    masked = transformer.forward(model.config, model.params, ids, attn_impl="xla")
    causal = transformer.forward(model.config, model.params, ids, attn_impl="causal")
    np.testing.assert_allclose(np.asarray(causal), np.asarray(masked), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_flash_attention_path_equals_masked_path_on_packed_rows(family, tmp_path):
    """The Pallas flash path (GPU default for packed rows and softcap) gives the masked path's loss
    and LoRA gradients on packed rows; gemma2 brings softcap and alternating sliding windows."""
    import jax
    import jax.numpy as jnp

    from jft.train.step import loss_and_grads

    save_hf_model(family, tmp_path / "m")
    model = jft.load(str(tmp_path / "m"), dtype="float32")
    lora = jft.lora.init(model, r=4, targets="all-linear", key=jax.random.key(0))
    lora = jax.tree.map(lambda w: w + 0.01, lora)  # B = 0 at init would hide the attention gradient
    t = SEQ
    ids = np.random.default_rng(5).integers(3, model.config.vocab_size, size=(2, t))
    cut = t // 3
    positions = np.concatenate([np.arange(cut), np.arange(t - cut)])[None].repeat(2, 0)
    segments = np.concatenate([np.ones(cut), np.full(t - cut, 2)])[None].repeat(2, 0)
    segments[1, -3:], positions[1, -3:] = 0, 0  # padding
    batch = {"input_ids": ids, "labels": ids, "positions": positions, "segment_ids": segments}
    batch = {k: jnp.asarray(v, jnp.int32)[None] for k, v in batch.items()}
    results = {impl: loss_and_grads(model.config, model.params, lora, batch, attn_impl=impl) for impl in ("xla", "flash")}
    (loss_x, grads_x, _), (loss_f, grads_f, _) = results["xla"], results["flash"]
    np.testing.assert_allclose(float(loss_f), float(loss_x), rtol=1e-5)
    for gf, gx in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(np.asarray(gf), np.asarray(gx), atol=1e-5, rtol=1e-4)


def test_remat_policies_give_the_same_gradients_and_offload_keeps_layer_inputs_on_host(tmp_path):
    import jax
    import jax.numpy as jnp

    from jft.train.step import loss_and_grads

    save_hf_model("llama", tmp_path / "m")
    model = jft.load(str(tmp_path / "m"), dtype="float32")
    lora = jax.tree.map(lambda w: w + 0.01, jft.lora.init(model, r=4, targets="all-linear", key=jax.random.key(0)))
    ids = np.random.default_rng(6).integers(3, model.config.vocab_size, size=(1, 2, SEQ))
    batch = {"input_ids": ids, "labels": ids, "positions": np.broadcast_to(np.arange(SEQ), ids.shape),
             "segment_ids": np.ones_like(ids)}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    run = lambda remat: loss_and_grads(model.config, model.params, lora, batch, remat=remat)
    loss_0, grads_0, _ = run("none")
    for remat in ("full", "offload", "save_dots"):
        loss, grads, _ = run(remat)
        np.testing.assert_allclose(float(loss), float(loss_0), rtol=1e-6)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_0)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(g0), atol=1e-6, rtol=1e-5)
    jaxpr = lambda remat: str(jax.make_jaxpr(
        lambda lo: loss_and_grads(model.config, model.params, lo, batch, remat=remat))(lora))
    assert "<host>" in jaxpr("offload") and "<host>" not in jaxpr("full")


def test_unknown_attention_implementation_is_reported(tmp_path):
    from jft.nn import transformer

    save_hf_model("llama", tmp_path / "m")
    model = jft.load(str(tmp_path / "m"), dtype="float32")
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        transformer.forward(model.config, model.params, np.ones((1, 4), np.int32), attn_impl="fast")
    lora = jft.lora.init(model, r=4, targets="all-linear")
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        jft.train.SFT(model, lora, attention="fast")


def test_failed_checkpoint_write_leaves_nothing_behind(tmp_path):
    from jft.convert.safetensors_io import save_sharded

    def tensors():
        yield "a", np.zeros((1000,), np.float32)
        yield "b", np.zeros((1000,), np.float32)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_sharded(tensors(), tmp_path, max_shard_bytes=4000)
    assert list(tmp_path.iterdir()) == []


# --- LongRoPE (Phi-3 long-context checkpoints) ----------------------------------------------------


@pytest.fixture(scope="module")
def longrope_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3_longrope")
    hf_model = save_hf_model("phi3", path, **LONGROPE)
    return hf_model, jft.load(str(path), dtype="float32")


@pytest.mark.parametrize("length", [20, 48], ids=["short_factors", "long_factors"])
def test_longrope_logits_match_transformers(longrope_model, length):
    """Within the original context (32) transformers uses the short factors, beyond it the long ones."""
    hf_model, model = longrope_model
    ids = np.random.default_rng(7).integers(3, model.config.vocab_size, size=(2, length))
    ours = np.asarray(jft.forward(model, ids))
    np.testing.assert_allclose(ours, _hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_longrope_factor_set_follows_the_longest_position(longrope_model):
    """The same 20 tokens get other logits once the forward reaches past the original context, and a
    packed row of two segments within it keeps the short factors (its largest position decides)."""
    hf_model, model = longrope_model
    rng = np.random.default_rng(8)
    ids = rng.integers(3, model.config.vocab_size, size=(1, 44))
    prefix = np.asarray(jft.forward(model, ids[:, :20]))
    assert np.abs(np.asarray(jft.forward(model, ids))[:, :20] - prefix).max() > 1e-2
    positions = np.concatenate([np.arange(20), np.arange(24)])[None]
    segments = np.concatenate([np.ones(20), np.full(24, 2)])[None].astype(np.int32)
    from jft.nn import transformer

    packed = np.asarray(transformer.forward(model.config, model.params, ids, positions, segments))
    np.testing.assert_allclose(packed[:, :20], _hf_logits(hf_model, ids[:, :20]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(packed[:, 20:], _hf_logits(hf_model, ids[:, 20:]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt_len,new", [(5, 20), (40, 8), (20, 24), (31, 6)],
                         ids=["short", "long", "crossing", "crossing_at_once"])
def test_longrope_greedy_generation_matches_transformers(longrope_model, prompt_len, new):
    """Crossing the original context mid-generation, every later token is the one the whole sequence's
    forward with the long factors predicts: jft's decode loop recomputes the cache at that step. The
    reference decodes without a cache (transformers 5.23's Phi-3 drops its cache there too; 5.17 kept
    the short-factor keys)."""
    hf_model, model = longrope_model
    prompt = np.random.default_rng(prompt_len).integers(3, model.config.vocab_size, size=prompt_len).tolist()
    ours = jft.generate(model, [prompt], max_new_tokens=new, eos_token_ids=()).ids[0]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                eos_token_id=None, pad_token_id=0, use_cache=False)
    assert ours == ref[0, prompt_len:].tolist()


def _phi3_config(**rope_scaling):
    return {"model_type": "phi3", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 4, "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "rope_scaling": rope_scaling}


def test_longrope_config_is_read_and_checked():
    from jft.config import config_from_hf

    short, long = [1.0] * 6, [2.0] * 6  # rotary_dim 12: six frequency pairs
    rope = config_from_hf(_phi3_config(type="su", short_factor=short, long_factor=long)).rope
    assert rope.kind == "longrope" and rope.short_factor == tuple(short) and rope.long_factor == tuple(long)
    assert rope.original_max_position_embeddings == 4096 and rope.factor == 32.0
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    hash(rope)
    given = config_from_hf(_phi3_config(rope_type="longrope", short_factor=short, long_factor=long, attention_factor=1.5))
    assert given.rope.attention_factor == 1.5
    with pytest.raises(jft.ConfigError, match=r"rope_scaling\.long_factor has 5 values.*\(6\)"):
        config_from_hf(_phi3_config(type="longrope", short_factor=short, long_factor=long[:5]))
    with pytest.raises(jft.ConfigError, match=r"longrope needs rope_scaling\.short_factor as a list of numbers, got None"):
        config_from_hf(_phi3_config(type="longrope", long_factor=long))
    with pytest.raises(jft.ConfigError, match=r"short_factor as a list of numbers"):
        config_from_hf(_phi3_config(type="longrope", short_factor=["a"] * 6, long_factor=long))


# --- YaRN (Qwen's long-context setting) -----------------------------------------------------------


@pytest.mark.parametrize("yarn", [YARN, YARN_TUNED], ids=["defaults", "tuned"])
def test_yarn_logits_and_greedy_generation_match_transformers(tmp_path, yarn):
    """YaRN rescales the rotary frequencies (a ramp between original and interpolated) and multiplies
    cos and sin by its attention factor, at every position; the tuned config changes beta_fast,
    beta_slow, the truncated ramp and the attention factor (mscale / mscale_all_dim)."""
    hf_model = save_hf_model("qwen2", tmp_path, **yarn)
    model = jft.load(str(tmp_path), dtype="float32")
    ids = np.random.default_rng(11).integers(3, model.config.vocab_size, size=(2, 90))
    np.testing.assert_allclose(np.asarray(jft.forward(model, ids)), _hf_logits(hf_model, ids), atol=1e-4, rtol=0)
    prompt = ids[0, :30].tolist()
    ours = jft.generate(model, [prompt], max_new_tokens=12, eos_token_ids=()).ids[0]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, 30:].tolist()


def test_yarn_config_is_read_and_checked():
    from jft.config import config_from_hf

    qwen = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 131072}
    rope = config_from_hf({**qwen, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}).rope
    assert (rope.kind, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 32768)
    assert (rope.beta_fast, rope.beta_slow, rope.truncate) == (32.0, 1.0, True)
    assert rope.attention_factor == pytest.approx(1 + 0.1 * math.log(4.0))
    implied = config_from_hf({**qwen, "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 32768}}).rope
    assert implied.factor == 4.0  # max_position_embeddings / original, as transformers takes it
    with pytest.raises(jft.ConfigError, match=r"rope_scaling\.beta_fast must be a number, got 'fast'"):
        config_from_hf({**qwen, "rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": "fast"}})


def test_auto_attention_takes_cudnn_only_where_its_kernel_serves(tmp_path, monkeypatch):
    """cuDNN's causal kernel takes unpacked rows of 16-bit activations without softcap; other GPU
    batches go to jft's flash kernel, and other backends to XLA."""
    import jax
    import jax.numpy as jnp

    from jft.nn import transformer

    save_hf_model("llama", tmp_path / "m")
    model = jft.load(str(tmp_path / "m"), dtype="float32")
    config = model.config
    softcapped = dataclasses.replace(config, attn_logit_softcap=50.0)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert transformer.resolve_attention(config, packed=False, dtype=jnp.bfloat16) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert transformer.resolve_attention(config, packed=False, dtype=jnp.bfloat16) == "cudnn"
    assert transformer.resolve_attention(config, packed=False, dtype=jnp.float16) == "cudnn"
    assert transformer.resolve_attention(config, packed=False, dtype=jnp.float32) == "flash"
    assert transformer.resolve_attention(config, packed=True, dtype=jnp.bfloat16) == "flash"
    assert transformer.resolve_attention(softcapped, packed=False, dtype=jnp.bfloat16) == "flash"
    assert transformer.resolve_attention(config, packed=False, attention="xla", dtype=jnp.bfloat16) == "xla"
    assert jft.train.SFT(model, jft.lora.init(model, r=2)).attention == "flash"  # a float32 model
