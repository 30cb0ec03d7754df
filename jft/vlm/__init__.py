"""Vision-language fine-tuning: Qwen2-VL and Qwen2.5-VL as pure functions (see docs/vision.md)."""

from jft.vlm.config import VLMConfig, VisionConfig, load_vlm_config, vlm_config_from_hf
from jft.vlm.loading import VLModel, load
from jft.vlm.model import VisionInputError, encode_images, forward, make_batch, rope_index
from jft.vlm.generate import generate
from jft.vlm.processor import ImageError, ImageProcessor, load_image, smart_resize

__all__ = ["ImageError", "ImageProcessor", "VLMConfig", "VLModel", "VisionConfig", "VisionInputError", "encode_images",
           "forward", "generate", "load", "load_image", "load_vlm_config", "make_batch", "rope_index", "smart_resize",
           "vlm_config_from_hf"]
