"""Image preprocessing of Qwen2-VL / Qwen2.5-VL, in numpy + PIL (no torch).

What transformers' Qwen2-VL image processor does: convert to RGB (transparency over white), resize
with PIL bicubic so height and width are multiples of patch_size * merge_size and the pixel count is
within [min_pixels, max_pixels] ("smart resize"), rescale to [0, 1], normalise with the CLIP mean/std,
then cut into patches of channels x temporal_patch_size x patch x patch (a still image is repeated
over the temporal patch), ordered so the m x m patches of each merge block are consecutive.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

import numpy as np

from jft.config import read_json

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """An image that cannot be read or processed."""


def load_image(image):
    """A PIL RGB image from a path, bytes, an HF-datasets {"bytes"/"path"} dict, a PIL image or an HxWxC uint8 array."""
    from PIL import Image, UnidentifiedImageError

    source = image
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
        if image is None:
            raise ImageError(f"image dict {sorted(source)} has neither 'bytes' nor 'path'")
    try:
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise ImageError(f"image file not found: {os.fspath(image)}")
            image = Image.open(image)
            image.load()
        elif isinstance(image, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(image)))
            image.load()
        elif isinstance(image, np.ndarray):
            if image.ndim not in (2, 3) or image.dtype != np.uint8:
                raise ImageError(f"an image array must be uint8 [H, W] or [H, W, C]; got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
    except (UnidentifiedImageError, OSError) as e:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        raise ImageError(f"cannot read image {name}: {e}") from None
    if not isinstance(image, Image.Image):
        raise ImageError(f"unsupported image type {type(source).__name__}: pass a path, bytes, a PIL image or a uint8 array")
    return _to_rgb(image)


def _to_rgb(image):
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, pixel count in [min_pixels, max_pixels], aspect kept."""
    if min(height, width) <= 0:
        raise ImageError(f"image has an empty side ({height} x {width})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_ASPECT_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[np.ndarray, int, int]:
    """[C, H, W] -> ([gh*gw, C*tp*p*p], gh, gw), merge blocks of m x m patches consecutive."""
    c, height, width = image.shape
    p, m = patch_size, merge_size
    gh, gw = height // p, width // p
    blocks = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # gh/m gw/m m m C p p
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, p, p))
    return frames.reshape(gh * gw, c * temporal_patch_size * p * p), gh, gw


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        size = d.get("size") or {}
        kw = dict(min_pixels=d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels"))),
                  max_pixels=d.get("max_pixels", size.get("longest_edge", size.get("max_pixels"))),
                  patch_size=d.get("patch_size"), temporal_patch_size=d.get("temporal_patch_size"),
                  merge_size=d.get("merge_size"), rescale_factor=d.get("rescale_factor"),
                  image_mean=tuple(d["image_mean"]) if d.get("image_mean") else None,
                  image_std=tuple(d["image_std"]) if d.get("image_std") else None)
        return cls(**{k: v for k, v in kw.items() if v is not None})

    @classmethod
    def from_vision_config(cls, vc, **overrides) -> "ImageProcessor":
        return cls(**{"patch_size": vc.patch_size, "temporal_patch_size": vc.temporal_patch_size,
                      "merge_size": vc.spatial_merge_size, **overrides})

    @classmethod
    def from_pretrained(cls, directory, vc=None) -> "ImageProcessor":
        path = os.path.join(directory, "preprocessor_config.json")
        if os.path.isfile(path):
            return cls.from_dict(read_json(path))
        if vc is None:
            return cls()
        return cls.from_vision_config(vc)

    def to_dict(self) -> dict:
        return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
                "do_normalize": True, "do_convert_rgb": True, "resample": 3, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "rescale_factor": self.rescale_factor}

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def process_one(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        from PIL import Image

        image = load_image(image)
        h, w = self.target_size(image.height, image.width)
        resized = np.asarray(image.resize((w, h), resample=Image.BICUBIC))
        scaled = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        normed = ((scaled - mean) / std).transpose(2, 0, 1)
        patches, gh, gw = patchify(normed, self.patch_size, self.merge_size, self.temporal_patch_size)
        return np.ascontiguousarray(patches, np.float32), (1, gh, gw)

    def __call__(self, images) -> dict[str, np.ndarray]:
        """{"pixel_values": [N, C*tp*p*p] float32, "image_grid_thw": [n_images, 3] int64}."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ImageError("no images to process")
        done = [self.process_one(im) for im in images]
        return {"pixel_values": np.concatenate([p for p, _ in done]),
                "image_grid_thw": np.asarray([g for _, g in done], np.int64)}

    def num_image_tokens(self, grid_thw) -> int:
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size**2
