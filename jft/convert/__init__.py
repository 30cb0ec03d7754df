"""Converters at the edges: HF safetensors, PEFT adapters, merged checkpoints, bitsandbytes layouts, GGUF."""

from jft.convert.hf import load_params, save_params, save_pretrained
from jft.convert.merged import save_merged
from jft.convert.peft import load_lora, save_lora

__all__ = ["load_lora", "load_params", "save_lora", "save_merged", "save_params", "save_pretrained"]
