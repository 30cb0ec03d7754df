"""Configuration of the Qwen2-VL / Qwen2.5-VL vision-language models.

A `VLMConfig` is the text decoder's `jft.Config` (a Qwen2 decoder) plus a `VisionConfig` and the
M-RoPE sections and special token ids. Both are frozen and hashable (static under `jax.jit`).
Reads transformers' nested layout (`text_config` / `vision_config`) and the older flat layout of
the Qwen hub checkpoints (text fields at the top level, `rope_scaling: {"type": "mrope"}`).
"""

from __future__ import annotations

import dataclasses

from jft.config import Config, ConfigError, config_from_hf, read_config_json

VLM_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_VISION_ACTIVATIONS = ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str  # qwen2_vl (LayerNorm, GELU MLP, full attention) | qwen2_5_vl (RMSNorm, SwiGLU, windows)
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the language model's hidden size: what the patch merger outputs
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    activation: str = "quick_gelu"
    rope_theta: float = 10000.0
    window_size: int = 112  # qwen2.5: window side in pixels
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 4
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def windowed(self) -> bool:
        return self.kind == "qwen2_5_vl"

    @property
    def full_attention_layers(self) -> tuple[bool, ...]:
        if not self.windowed:
            return (True,) * self.depth
        return tuple(i in self.fullatt_block_indexes for i in range(self.depth))


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    model_type: str
    text: Config
    vision: VisionConfig
    mrope_section: tuple[int, int, int]
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


def _vision_config(kind: str, v: dict, where: str) -> VisionConfig:
    try:
        if kind == "qwen2_vl":
            dim = v["embed_dim"]
            common = dict(depth=v["depth"], hidden_size=dim, intermediate_size=int(dim * v.get("mlp_ratio", 4)),
                          num_heads=v["num_heads"], out_hidden_size=v["hidden_size"])
        else:
            common = dict(depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                          num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"])
    except KeyError as e:
        raise ConfigError(f"{where}: vision_config is missing {e.args[0]!r}") from None
    activation = v.get("hidden_act", "quick_gelu" if kind == "qwen2_vl" else "silu")
    if activation not in _VISION_ACTIVATIONS:
        raise ConfigError(f"{where}: vision activation {activation!r} is not supported ({', '.join(_VISION_ACTIVATIONS)})")
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        kind=kind,
        patch_size=int(v.get("patch_size", 14)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        activation=activation,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", ()) or ()),
        tokens_per_second=int(v.get("tokens_per_second", 4)),
        **common,
    )


def _text_fields(c: dict) -> dict:
    """The text model's fields: the nested `text_config`, else the top level (old hub layout)."""
    text = dict(c["text_config"]) if isinstance(c.get("text_config"), dict) else dict(c)
    text.pop("vision_config", None)
    text.pop("text_config", None)
    return text


def _rope_settings(text: dict, where: str) -> tuple[float, tuple[int, int, int]]:
    params = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
    section = params.get("mrope_section")
    if section is None or len(section) != 3:
        raise ConfigError(f"{where}: M-RoPE needs rope_parameters.mrope_section of three ints, got {section!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ConfigError(f"{where}: rope type {kind!r} is not supported for {VLM_MODEL_TYPES}")
    theta = float(params.get("rope_theta", text.get("rope_theta", 1000000.0)))
    return theta, tuple(int(s) for s in section)


def vlm_config_from_hf(c: dict, where: str = "config.json") -> VLMConfig:
    """Builds a `VLMConfig` from the dict of a Qwen2-VL / Qwen2.5-VL `config.json`."""
    model_type = c.get("model_type")
    if model_type not in VLM_MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a supported vision-language model "
                          f"({', '.join(VLM_MODEL_TYPES)})")
    if not isinstance(c.get("vision_config"), dict):
        raise ConfigError(f"{where}: no vision_config")
    text = _text_fields(c)
    theta, section = _rope_settings(text, where)
    tie = c.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    decoder = {**text, "model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": theta},
               "tie_word_embeddings": bool(tie)}
    decoder.pop("rope_scaling", None)
    text_config = config_from_hf(decoder, where=where)
    if 2 * sum(section) != text_config.head_dim:
        raise ConfigError(f"{where}: mrope_section {section} must sum to head_dim/2 = {text_config.head_dim // 2}")
    ids = {k: c.get(k, text.get(k)) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                              "vision_end_token_id")}
    defaults = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653}
    ids = {k: int(v if v is not None else defaults[k]) for k, v in ids.items()}
    return VLMConfig(model_type=model_type, text=text_config, vision=_vision_config(model_type, c["vision_config"], where),
                     mrope_section=section, **ids)


def load_vlm_config(model_dir) -> tuple[VLMConfig, dict]:
    raw, path = read_config_json(model_dir)
    return vlm_config_from_hf(raw, where=path), raw
