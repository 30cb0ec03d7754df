"""Converters at the edges: HF safetensors, PEFT adapters, bitsandbytes layouts, GGUF."""

from jft.convert.hf import load_params, save_params, save_pretrained

__all__ = ["load_params", "save_params", "save_pretrained"]
