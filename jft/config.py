"""Model configuration: one frozen dataclass for every supported family.

Family differences are flags (norm offset, q/k norm, sandwich norms, softcaps, ...), never subclasses.
A `Config` is hashable so it can be a static argument under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "su")  # su: Phi-3's old name for longrope


class ConfigError(ValueError):
    """A config.json jft cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding of one attention kind (full or sliding layers)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3 | yarn | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope (Phi-3 / Phi-4-mini): per-pair frequency divisors for forwards within the original
    # context and for longer ones, and the factor cos and sin are multiplied by
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    # yarn (Qwen's long-context setting): pairs that turn more than beta_fast times over the original
    # context keep their frequency, those that turn less than beta_slow times are divided by factor,
    # a linear ramp between (its ends rounded outwards when truncate)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: Rope = Rope()
    local_rope: Rope | None = None  # gemma3: sliding layers use their own rope base
    rotary_dim: int | None = None  # partial rotary (phi3 / phi-4-mini); None means head_dim
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0  # gemma: weights are stored as w and applied as (1 + w)
    embed_scale: bool = False  # gemma: embeddings multiplied by sqrt(hidden_size)
    activation: str = "silu"  # silu | gelu_tanh
    sandwich_norm: bool = False  # gemma2/3: extra norms after attention and after the MLP
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_scale: float | None = None  # None means 1/sqrt(head_dim)
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window?
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def rotary_dims(self) -> int:
        return self.rotary_dim or self.head_dim


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_from(params: dict | None, legacy: dict, default_theta: float, where: str, rotary_dim: int = 0) -> Rope:
    """Reads transformers' new `rope_parameters` or the old `rope_theta` + `rope_scaling`."""
    params = dict(params or {})
    scaling = legacy.get("rope_scaling") or {}
    theta = params.get("rope_theta", legacy.get("rope_theta", default_theta))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in _SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: rope type {kind!r} is not supported (supported: {', '.join(_SUPPORTED_ROPE_TYPES)})")
    # like transformers, a top-level original_max_position_embeddings (Phi-3 keeps it there) wins
    original = int(legacy.get("original_max_position_embeddings")
                   or merged.get("original_max_position_embeddings", legacy.get("max_position_embeddings", 8192)))
    # yarn and longrope stretch the original context to max_position_embeddings unless told a factor
    stretch = legacy.get("max_position_embeddings", original) / original if kind in ("yarn", "longrope", "su") else 1.0
    rope = Rope(
        theta=float(theta),
        kind=kind,
        factor=_number(merged, "factor", stretch, where),
        low_freq_factor=_number(merged, "low_freq_factor", 1.0, where),
        high_freq_factor=_number(merged, "high_freq_factor", 4.0, where),
        original_max_position_embeddings=original,
    )
    if kind == "yarn":
        return _yarn(rope, merged, where)
    return _longrope(rope, merged, where, rotary_dim) if kind in ("longrope", "su") else rope


def _yarn(rope: Rope, merged: dict, where: str) -> Rope:
    """A yarn config's numbers, with the defaults and the attention factor transformers derives."""
    factor = rope.factor
    m, m_all = _number(merged, "mscale", 0.0, where), _number(merged, "mscale_all_dim", 0.0, where)

    def magnitude(scale, weight=1.0):
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    derived = magnitude(factor, m) / magnitude(factor, m_all) if m and m_all else magnitude(factor)
    return dataclasses.replace(rope, attention_factor=_number(merged, "attention_factor", derived, where),
                               beta_fast=_number(merged, "beta_fast", 32.0, where) or 32.0,
                               beta_slow=_number(merged, "beta_slow", 1.0, where) or 1.0,
                               truncate=bool(merged.get("truncate", True)))


def _number(scaling: dict, name: str, default: float, where: str) -> float:
    """rope_scaling[name] as a float; the default when absent or null."""
    value = scaling.get(name)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: rope_scaling.{name} must be a number, got {value!r}")
    return float(value)


def _longrope(rope: Rope, merged: dict, where: str, rotary_dim: int) -> Rope:
    """The factors of a longrope config, checked; the attention factor as transformers derives it."""
    factors = {}
    for name in ("short_factor", "long_factor"):
        value = merged.get(name)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{where}: longrope needs rope_scaling.{name} as a list of numbers, got {value!r}")
        if len(value) != rotary_dim // 2:
            raise ConfigError(f"{where}: rope_scaling.{name} has {len(value)} values; longrope needs one per "
                              f"rotary frequency pair ({rotary_dim // 2})")
        factors[name] = tuple(float(v) for v in value)
    factor, original = rope.factor, rope.original_max_position_embeddings
    derived = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
    return dataclasses.replace(rope, kind="longrope", attention_factor=_number(merged, "attention_factor", derived, where),
                               **factors)


def _sliding_layers(c: dict, model_type: str, num_layers: int) -> tuple[bool, ...]:
    if c.get("layer_types"):
        return tuple(t == "sliding_attention" for t in c["layer_types"])
    if model_type == "mistral":
        return (c.get("sliding_window") is not None,) * num_layers
    if model_type == "gemma2":
        return tuple(i % 2 == 0 for i in range(num_layers))
    if model_type == "gemma3_text":
        pattern = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
        return tuple(bool((i + 1) % pattern) for i in range(num_layers))
    if model_type in ("qwen2", "qwen3") and c.get("use_sliding_window"):
        start = c.get("max_window_layers", num_layers)
        return tuple(i >= start for i in range(num_layers))
    return (False,) * num_layers


def config_from_hf(c: dict, where: str = "config.json") -> Config:
    """Builds a `Config` from the dict of an HF `config.json`."""
    if c.get("model_type") == "gemma3" and "text_config" in c:  # multimodal wrapper: use its text model
        c = {**c["text_config"], "model_type": "gemma3_text"}
    model_type = c.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported; jft supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        hidden, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
        vocab, inter = c["vocab_size"], c["intermediate_size"]
    except KeyError as e:
        raise ConfigError(f"{where}: missing required field {e.args[0]!r}") from None
    if c.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported")
    head_dim = c.get("head_dim") or hidden // heads
    gemma = model_type.startswith("gemma")
    rope_params = c.get("rope_parameters")
    partial = (rope_params or {}).get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)
    local_rope = None
    if model_type == "gemma3_text":
        nested = rope_params if rope_params and "full_attention" in rope_params else None
        rope = _rope_from(nested["full_attention"] if nested else rope_params, c, 1_000_000.0, where)
        local = nested["sliding_attention"] if nested else {"rope_theta": c.get("rope_local_base_freq", 10000.0)}
        local_rope = _rope_from(local, {}, 10000.0, where)
    else:
        rope = _rope_from(rope_params, c, 10000.0, where, rotary_dim)
    activation = c.get("hidden_activation") or c.get("hidden_act", "silu")
    if gemma and activation in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        activation = "gelu_pytorch_tanh"  # transformers runs every gemma with the tanh approximation
    activations = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if activation not in activations:
        raise ConfigError(f"{where}: activation {activation!r} is not supported")
    sliding = _sliding_layers(c, model_type, layers)
    window = c.get("sliding_window") if any(sliding) else None
    scalar = c.get("query_pre_attn_scalar") if model_type in ("gemma2", "gemma3_text") else None
    return Config(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope=rope,
        local_rope=local_rope,
        rotary_dim=rotary_dim if partial != 1.0 else None,
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        tie_embeddings=c.get("tie_word_embeddings", gemma),
        qkv_bias=model_type == "qwen2" or bool(c.get("attention_bias")),
        o_bias=bool(c.get("attention_bias")) and model_type != "qwen2",
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        activation=activations[activation],
        sandwich_norm=model_type in ("gemma2", "gemma3_text"),
        attn_logit_softcap=c.get("attn_logit_softcapping") if model_type == "gemma2" else None,
        final_logit_softcap=c.get("final_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
        query_scale=scalar**-0.5 if scalar else None,
        sliding_window=window,
        sliding_layers=sliding,
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_as_ids(c.get("eos_token_id")),
        pad_token_id=c.get("pad_token_id"),
    )


def read_json(path: str | os.PathLike, error: type[ValueError] = ValueError):
    """The parsed content of a JSON file; a malformed one raises `error` naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{os.fspath(path)}: not valid JSON ({e})") from None


def read_config_json(model_dir: str | os.PathLike) -> tuple[dict, str]:
    """The dict of a model directory's config.json, and its path."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return read_json(path, ConfigError), path


def load_config(model_dir: str | os.PathLike) -> tuple[Config, dict]:
    """Reads `config.json` from a model directory; returns the Config and the raw dict."""
    raw, path = read_config_json(model_dir)
    return config_from_hf(raw, where=path), raw
