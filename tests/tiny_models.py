"""Tiny random transformers models of every supported family, saved to disk for parity tests."""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
WINDOW = 8  # sliding window small enough for test sequences to go beyond it

_COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

_EXTRA = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(),
    "qwen3": dict(),
    "gemma": dict(),
    "gemma2": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=24, attn_logit_softcapping=1.5, final_logit_softcapping=2.0),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        query_pre_attn_scalar=24, rope_parameters={
                            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "phi3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
}

# Phi-3's long-context rope on the tiny phi3 (rotary_dim 8: four frequency pairs); a forward whose
# largest position + 1 is beyond 32 takes the long factors
LONGROPE = dict(original_max_position_embeddings=32, max_position_embeddings=128, rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
    "short_factor": [1.0, 1.25, 2.5, 4.0], "long_factor": [1.5, 3.0, 8.0, 20.0]})

# Qwen's long-context yarn on the tiny qwen2 (head_dim 16: eight frequency pairs, of which the ramp
# from original to interpolated frequencies spans pairs 0-3 at an original context of 64)
YARN = dict(max_position_embeddings=256, rope_parameters={
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64})
# the same with every setting llama.cpp does not read changed
YARN_TUNED = dict(max_position_embeddings=256, rope_parameters={
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
    "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5})

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised fp32 transformers model (every weight random, biases and norms too)."""
    config_cls, model_cls = _CLASSES[family]
    config = config_cls(**{**_COMMON, **_EXTRA[family], **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    # the model's own math: transformers' default sdpa path drops Gemma-2's attention softcap in some
    # versions (5.17), eager applies it in all
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if family.startswith("gemma") else 1.0))
            else:
                p.normal_(0.0, 0.08)
    return model


def save_hf_model(family: str, path, seed: int = 0, **overrides):
    model = make_hf_model(family, seed, **overrides)
    model.save_pretrained(path)
    return model


def load_hf_model(path, **kwargs):
    """A saved checkpoint as the tests' reference: float32, eager attention (as in make_hf_model), on the
    CPU also where a GPU is present (bitsandbytes' 4-bit loading would otherwise move it there)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                             device_map="cpu", **kwargs)
