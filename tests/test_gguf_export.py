"""save_gguf against the real consumers: llama-cpp-python's logits vs transformers, and llama.cpp's
own quantizer on jft's f32 file."""

import ctypes
import os

import gguf
import jax
import jax.numpy as jnp
import llama_cpp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import jft
from jft.convert import gguf_quants
from jft.convert.gguf import GGUFExportError, save_gguf
from tests.tiny_models import FAMILIES, LONGROPE, YARN, YARN_TUNED, save_hf_model

CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
# llama.cpp's CPU GELU goes through an fp16 lookup table, so the gelu families are ~1e-3 off
TOLERANCE = {"gemma": 5e-3, "gemma2": 5e-3, "gemma3_text": 5e-3}


@pytest.fixture(scope="module", autouse=True)
def _no_amx_repack():
    """This machine's CPU reports Intel AMX, and ggml's AMX weight repacking (an "extra buffer
    type") segfaults evaluating quantized tensors here. `use_extra_bufts` is llama.cpp's own model
    parameter for turning that repacking off; the regular CPU kernels still run."""
    original = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    yield
    llama_cpp.llama_cpp.llama_model_default_params = original


def _save_tiny_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, this is a tiny test of the tokenizer. " * 5,
                             "the quick brown fox jumps over the lazy dog"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)


def _overrides(family):
    if family == "mistral":
        return dict(sliding_window=None)  # llama.cpp runs HF Mistral as llama, without a window
    return {}


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    family = request.param
    # a neutral directory name: llama.cpp keys phi-3 token attributes off general.name (from it)
    path = tmp_path_factory.mktemp("tiny")
    hf_model = save_hf_model(family, path, **_overrides(family))
    _save_tiny_tokenizer(path)
    model = jft.load(str(path), dtype="float32", progress=False)
    files = save_gguf(model, None, path / "model.gguf", ["f32", "f16"], progress=False)
    return family, hf_model, model, files


def _llama_logits(gguf_path, ids, n_ctx=64):
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: llm.n_tokens])
    finally:
        llm.close()


def _hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids])).logits[0].numpy()


IDS = np.random.default_rng(0).integers(3, 384, size=20).tolist()


def test_f32_logits_match_transformers(exported):
    family, hf_model, _, files = exported
    ours = _llama_logits(files[0], IDS)
    np.testing.assert_allclose(ours, _hf_logits(hf_model, IDS), atol=TOLERANCE.get(family, 1e-4), rtol=0)


def test_f16_logits_match_transformers(exported):
    family, hf_model, _, files = exported
    ours = _llama_logits(files[1], IDS)
    ref = _hf_logits(hf_model, IDS)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    np.testing.assert_allclose(ours, ref, atol=1e-2, rtol=0)


def test_gguf_py_reads_every_key_and_tensor(exported):
    family, _, model, files = exported
    reader = gguf.GGUFReader(files[0])
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.block_count"].contents() == model.config.num_layers
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == model.config.vocab_size
    assert tokens[1] == "<s>" and reader.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    assert all(np.isfinite(np.asarray(t.data, np.float32)).all() for t in reader.tensors)


def test_q4_k_m_equals_llama_cpp_quantizing_our_f32(exported, tmp_path):
    family, _, model, files = exported
    ours_path = save_gguf(model, None, tmp_path / "ours.gguf", "q4_k_m", modelfile=False, progress=False)[0]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf_quants.resolve_quant_method("q4_k_m").file_type
    params.nthread = 1
    theirs_path = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(files[0]).encode(), str(theirs_path).encode(), ctypes.byref(params)) == 0
    theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(theirs[name].data).view(np.uint8)), name
    prompt = IDS[:6]
    assert _greedy(ours_path, prompt, 12) == _greedy(theirs_path, prompt, 12)


def _greedy(path, prompt, n):
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    try:
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            out.append(int(token))
            if len(out) == n:
                return out
        return out
    finally:
        llm.close()


def test_lora_is_merged(exported, tmp_path):
    family, _, model, _ = exported
    lora = jft.lora.init(model, r=4, alpha=8.0, key=jax.random.key(1))
    weights = {t: {"a": w["a"], "b": jnp.full_like(w["b"], 0.05)} for t, w in lora.weights["layers"].items()}
    lora = jft.lora.LoRA({"layers": weights}, lora.config)
    path = save_gguf(model, lora, tmp_path / "lora.gguf", "f32", modelfile=False, progress=False)[0]
    merged = jft.lora.merge(model, lora)
    ref = np.asarray(jft.forward(merged, np.array([IDS])))[0]
    np.testing.assert_allclose(_llama_logits(path, IDS), ref, atol=TOLERANCE.get(family, 1e-4), rtol=0)


def test_modelfile_is_written(exported):
    _, _, _, files = exported
    text = open(os.path.join(os.path.dirname(files[0]), "Modelfile")).read()
    assert text.startswith(f"FROM ./{os.path.basename(files[0])}\n")
    assert "<|im_start|>assistant" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_unknown_quant_name_is_refused(exported, tmp_path):
    _, _, model, _ = exported
    with pytest.raises(ValueError, match="valid names"):
        save_gguf(model, None, tmp_path / "x.gguf", "q4_k_xl")
    assert not os.listdir(tmp_path)


def test_phi3_longrope_factors_and_metadata_give_jft_logits(tmp_path):
    """llama.cpp takes longrope's factor set once per context, the long one when its context size
    exceeds rope.scaling.original_context_length; it rounds n_ctx up to a multiple of 256, so here the
    original context is 256 (with 32, any context would get the long factors). n_ctx 256 with a short
    prompt gives the short factors, as jft's forward within the original context; n_ctx 512 with 300
    tokens gives the long ones, as jft's forward beyond it."""
    path = tmp_path / "tiny"
    save_hf_model("phi3", path, **{**LONGROPE, "original_max_position_embeddings": 256, "max_position_embeddings": 1024})
    _save_tiny_tokenizer(path)
    model = jft.load(str(path), dtype="float32", progress=False)
    gguf_path = save_gguf(model, None, path / "model.gguf", "f32", modelfile=False, progress=False)[0]
    reader = gguf.GGUFReader(gguf_path)
    rope = model.config.rope
    assert reader.fields["phi3.rope.scaling.original_context_length"].contents() == 256
    assert reader.fields["phi3.context_length"].contents() == 1024
    assert reader.fields["phi3.rope.scaling.attn_factor"].contents() == pytest.approx(rope.attention_factor)
    tensors = {t.name: t for t in reader.tensors}
    for name, factors in (("rope_factors_long.weight", rope.long_factor), ("rope_factors_short.weight", rope.short_factor)):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(tensors[name].data), np.asarray(factors, np.float32))
    long_ids = np.random.default_rng(9).integers(3, 384, size=300).tolist()
    for ids, n_ctx in ((IDS, 256), (long_ids, 512)):
        ref = np.asarray(jft.forward(model, np.array([ids])))[0]
        np.testing.assert_allclose(_llama_logits(gguf_path, ids, n_ctx), ref, atol=1e-4, rtol=0)


def test_qwen2_yarn_metadata_gives_jft_logits(tmp_path):
    """llama.cpp derives YaRN's ramp and attention factor from rope.scaling.factor and
    original_context_length alone, as transformers does for a config with the default settings."""
    path = tmp_path / "tiny"
    save_hf_model("qwen2", path, **YARN)
    _save_tiny_tokenizer(path)
    model = jft.load(str(path), dtype="float32", progress=False)
    gguf_path = save_gguf(model, None, path / "model.gguf", "f32", modelfile=False, progress=False)[0]
    fields = gguf.GGUFReader(gguf_path).fields
    assert fields["qwen2.rope.scaling.type"].contents() == "yarn"
    assert fields["qwen2.rope.scaling.factor"].contents() == 4.0
    assert fields["qwen2.rope.scaling.original_context_length"].contents() == 64
    ids = np.random.default_rng(12).integers(3, 384, size=120).tolist()
    ref = np.asarray(jft.forward(model, np.array([ids])))[0]
    np.testing.assert_allclose(_llama_logits(gguf_path, ids, 256), ref, atol=1e-4, rtol=0)


def test_yarn_settings_llama_cpp_does_not_read_are_refused(tmp_path):
    save_hf_model("qwen2", tmp_path / "tiny", **YARN_TUNED)
    model = jft.load(str(tmp_path / "tiny"), dtype="float32", progress=False)
    with pytest.raises(GGUFExportError, match="yarn .* fixed settings"):
        save_gguf(model, None, tmp_path / "out" / "model.gguf", "f32", modelfile=False, progress=False)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
