"""The Qwen2-VL / Qwen2.5-VL model: vision encoder -> image features scattered into the token
embeddings at the image-token positions -> the Qwen2 decoder with M-RoPE.

M-RoPE gives every token three positions (temporal, height, width). Text tokens have all three
equal; the tokens of an image get (start, start + row, start + column); text after an image resumes
at start + max(rows, columns). The rotary pairs of the head dim are split in three sections, each
rotated by one of the three positions. Attention masking and the KV cache still use the plain
sequence order (`positions`), as transformers does.

A batch (all numpy / jax arrays) for `hidden_states`:
    input_ids, positions, segment_ids [B, T]   (segment 0 = padding; positions = order of real tokens)
    rope_positions [3, B, T]                   (`rope_index`)
    pixel_values [N, patch_dim] + vision meta  (`jft.nn.vision.patch_metadata`), absent for text-only
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jft.nn import vision
from jft.nn.layers import embed_tokens, inv_frequencies
from jft.nn.transformer import forward_hidden, logits_from_hidden
from jft.vlm.config import VLMConfig

VISION_META = ("hw", "frame", "window")


class VisionInputError(ValueError):
    """Images and image tokens that do not fit together."""


def mrope_tables(config: VLMConfig, rope_positions):
    """cos/sin [B, T, head_dim] from positions [3, B, T]: pair j rotates by the position of its section."""
    inv = inv_frequencies(config.text.rope, config.text.head_dim)
    axis = np.repeat(np.arange(3), config.mrope_section)
    pos = jnp.asarray(rope_positions).astype(jnp.float32)[axis]  # [P, B, T]
    freqs = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _image_spans(token_row: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive image tokens."""
    is_image = np.concatenate([[False], token_row == image_token_id, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def tokens_per_image(config: VLMConfig, grid_thw) -> np.ndarray:
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return grid.prod(axis=1) // config.vision.merge_unit


def rope_index(config: VLMConfig, input_ids, image_grid_thw=None, attention_mask=None):
    """3-D M-RoPE positions [3, B, T] and per-row deltas [B] (transformers' get_rope_index).

    The delta is max(position) + 1 - (real tokens): the 3-D position of the next generated token is
    its sequence position plus the delta. Images are consumed from image_grid_thw in order, row by row.
    """
    ids = np.asarray(input_ids)
    b, t = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    per_image = tokens_per_image(config, grids)
    m = config.vision.spatial_merge_size
    out = np.zeros((3, b, t), np.int64)
    deltas = np.zeros(b, np.int64)
    image = 0
    for row in range(b):
        real = ids[row][mask[row]]
        pos = np.zeros((3, real.size), np.int64)
        cursor = next_pos = 0
        for start, end in _image_spans(real, config.image_token_id):
            n_text = start - cursor
            pos[:, cursor:start] = next_pos + np.arange(n_text)
            next_pos += n_text
            cursor = start
            while cursor < end:
                if image >= len(grids):
                    raise VisionInputError(f"row {row} has more image tokens than image_grid_thw describes "
                                           f"({len(grids)} images)")
                n = int(per_image[image])
                if cursor + n > end:
                    raise VisionInputError(f"row {row}: a run of {end - cursor} image tokens does not match image "
                                           f"{image} (grid {grids[image].tolist()} needs {n} tokens)")
                gt, gh, gw = (int(v) for v in grids[image])
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh // m), np.arange(gw // m), indexing="ij")
                pos[:, cursor:cursor + n] = next_pos + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
                next_pos += max(gh, gw) // m
                cursor += n
                image += 1
        pos[:, cursor:] = next_pos + np.arange(real.size - cursor)
        out[:, row, mask[row]] = pos
        deltas[row] = (pos.max() + 1 if real.size else 0) - real.size
    if image != len(grids):
        raise VisionInputError(f"image_grid_thw describes {len(grids)} images but the tokens hold {image}")
    return out, deltas


def check_image_tokens(config: VLMConfig, input_ids, image_grid_thw, pixel_values=None) -> None:
    """Raises VisionInputError unless the image tokens, the grids and the pixel patches agree."""
    n_tokens = int(np.sum(np.asarray(input_ids) == config.image_token_id))
    if image_grid_thw is None or len(np.asarray(image_grid_thw).reshape(-1, 3)) == 0:
        if n_tokens:
            raise VisionInputError(f"the prompt has {n_tokens} image tokens but no images were given")
        return
    expected = int(tokens_per_image(config, image_grid_thw).sum())
    if n_tokens != expected:
        raise VisionInputError(f"the prompt has {n_tokens} image tokens but the images need {expected} "
                               f"(image_grid_thw {np.asarray(image_grid_thw).tolist()}, "
                               f"{config.vision.merge_unit} patches per token)")
    if pixel_values is not None:
        have, need = np.asarray(pixel_values).shape, vision.num_patches(image_grid_thw)
        if len(have) != 2 or have[0] < need or have[1] != config.vision.patch_dim:
            raise VisionInputError(f"pixel_values has shape {have}; image_grid_thw needs ({need}, "
                                   f"{config.vision.patch_dim})")


def scatter_features(embeds, input_ids, features, image_token_id: int):
    """Replaces the embedding of the k-th image token (row-major over the batch) by features[k]."""
    is_image = (input_ids == image_token_id).reshape(-1)
    index = jnp.clip(jnp.cumsum(is_image) - 1, 0, features.shape[0] - 1)
    flat = embeds.reshape(-1, embeds.shape[-1])
    flat = jnp.where(is_image[:, None], features[index].astype(flat.dtype), flat)
    return flat.reshape(embeds.shape)


def image_features(config: VLMConfig, params, batch, lora=None, remat: bool = False, dtype=None):
    """Merged image features [N / m^2, D] of the batch's pixel patches (in dtype, default the embedding's)."""
    vision_lora = None if lora is None else lora.weights.get("vision")
    scale = 1.0 if lora is None else lora.config.scaling()
    meta = {k: batch[k] for k in VISION_META}
    return vision.encode_patches(config.vision, params["vision"], batch["pixel_values"], meta, lora=vision_lora,
                                 lora_scale=scale, dtype=dtype or params["embed"].dtype, remat=remat)


def input_embeddings(config: VLMConfig, params, batch, lora=None, remat: bool = False):
    """Token embeddings with the image features at the image tokens. The token embeddings are
    batch["inputs_embeds"] when the batch has them (looked up on the host: the table is not in params)."""
    embeds = batch.get("inputs_embeds")
    if embeds is None:
        weights = {} if lora is None else lora.weights
        embeds = embed_tokens(config.text, weights.get("embed", params["embed"]), batch["input_ids"], params["embed"].dtype)
    if batch.get("pixel_values") is None:
        return embeds
    feats = image_features(config, params, batch, lora, remat, dtype=embeds.dtype)
    return scatter_features(embeds, batch["input_ids"], feats, config.image_token_id)


def hidden_states(config: VLMConfig, params, batch, *, lora=None, cache=None, dropout_key=None, remat: str = "none",
                  attn_impl: str = "xla"):
    """Final-normed hidden states [B, T, D] (and the updated cache) of an image+text batch."""
    embeds = input_embeddings(config, params, batch, lora, remat=remat != "none")
    rope = mrope_tables(config, batch["rope_positions"])
    return forward_hidden(config.text, params, batch["input_ids"], batch["positions"], batch["segment_ids"], lora=lora,
                          cache=cache, dropout_key=dropout_key, remat=remat, attn_impl=attn_impl, inputs_embeds=embeds,
                          rope=rope)


def logits(config: VLMConfig, params, batch, *, lora=None):
    hidden, _ = hidden_states(config, params, batch, lora=lora)
    return logits_from_hidden(config.text, params, hidden, lora)


_jit_logits = jax.jit(logits, static_argnames=("config",))
_jit_features = jax.jit(image_features, static_argnames=("config", "remat"))


def make_batch(config: VLMConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pad_patches_to: int | None = None) -> dict:
    """Host-side inputs of `hidden_states`: positions, segments, M-RoPE positions, vision metadata."""
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32).reshape(ids.shape)
    check_image_tokens(config, ids[mask.astype(bool)] if attention_mask is not None else ids, image_grid_thw, pixel_values)
    rope_positions, deltas = rope_index(config, ids, image_grid_thw, mask)
    batch = {"input_ids": ids, "segment_ids": mask, "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32),
             "rope_positions": rope_positions.astype(np.int32), "rope_deltas": deltas.astype(np.int32)}
    if image_grid_thw is not None and len(np.asarray(image_grid_thw).reshape(-1, 3)):
        if pixel_values is None:
            raise VisionInputError("image_grid_thw was given without pixel_values")
        pixels = np.asarray(pixel_values, np.float32)
        meta = vision.patch_metadata(config.vision, image_grid_thw, pad_to=pad_patches_to)
        if pixels.shape[0] < meta["hw"].shape[0]:
            pixels = np.concatenate([pixels, np.zeros((meta["hw"].shape[0] - pixels.shape[0], pixels.shape[1]), np.float32)])
        batch.update(pixel_values=pixels, **meta)
    elif pixel_values is not None:
        raise VisionInputError("pixel_values were given without image_grid_thw")
    return batch


def forward(model, input_ids, *, pixel_values=None, image_grid_thw=None, attention_mask=None, lora=None):
    """Logits [B, T, V] (fp32) of an image+text batch: ids with image tokens, the processor's patches and grids."""
    batch = make_batch(model.config, input_ids, attention_mask, pixel_values, image_grid_thw)
    batch = {k: v for k, v in batch.items() if k != "rope_deltas"}
    return _jit_logits(model.config, model.params, batch, lora=lora)


def encode_images(model, pixel_values, image_grid_thw, *, lora=None):
    """The vision encoder alone: merged features [tokens, D] for the processor's patches and grids."""
    meta = vision.patch_metadata(model.config.vision, image_grid_thw)
    batch = {"pixel_values": np.asarray(pixel_values, np.float32), **meta}
    return _jit_features(model.config, model.params, batch, lora)
