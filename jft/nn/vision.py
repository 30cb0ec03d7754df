"""The Qwen2-VL / Qwen2.5-VL vision encoder as pure functions over a params pytree.

Pixels arrive as flattened temporal-spatial patches [N, C*tp*p*p] (the image processor's layout:
the m x m patches of one merge block are consecutive). A linear patch embedding (HF's Conv3d with
stride = kernel), blocks stacked on a leading axis and run under `lax.scan`, then the patch merger
(norm, concatenate each m x m block, 2-layer GELU MLP) gives one feature per merged token.

Attention is masked by segment ids instead of HF's cu_seqlens splits: a patch attends to the patches
of its own frame (full-attention layers) or of its own window (Qwen2.5's windowed layers). It goes
through `jft.kernels.attention` (all positions equal, so nothing is causal): on the GPU the flash
kernel, whose memory grows with the patch count rather than its square and which visits only the key
blocks from the first to the last that hold a query block's segment; elsewhere the masked reference.
Masked attention does not depend on token order, but that kernel's work does: Qwen2.5's blocks run
over the patches sorted by window (merge blocks kept whole), where each window is contiguous, and
the merged tokens are put back in image order.

Params (linear weights [out, in], blocks stacked on axis 0):
    patch_embed [D, C*tp*p*p]
    blocks: norm1, norm2 [L, D] (+ norm1_bias, norm2_bias for qwen2_vl's LayerNorm),
            qkv [L, 3D, D], qkv_bias [L, 3D], proj [L, D, D], proj_bias [L, D],
            qwen2_vl: fc1 [L, F, D], fc1_bias, fc2 [L, D, F], fc2_bias
            qwen2_5_vl: gate, up [L, F, D], down [L, D, F] with *_bias
    merger: norm [D] (+ norm_bias), fc1 [H, H], fc1_bias, fc2 [out, H], fc2_bias   (H = D*m*m)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jft import kernels
from jft.nn.layers import linear

PAD_SEGMENT = -1  # padding patches (bucketed batches) form their own segment and are discarded


def mlp_targets(vc) -> tuple[str, ...]:
    return ("gate", "up", "down") if vc.windowed else ("fc1", "fc2")


def vision_param_shapes(vc) -> dict:
    L, D, F = vc.depth, vc.hidden_size, vc.intermediate_size
    H = D * vc.merge_unit
    blocks = {"norm1": (L, D), "norm2": (L, D), "qkv": (L, 3 * D, D), "qkv_bias": (L, 3 * D), "proj": (L, D, D),
              "proj_bias": (L, D)}
    if vc.windowed:
        blocks.update(gate=(L, F, D), gate_bias=(L, F), up=(L, F, D), up_bias=(L, F), down=(L, D, F), down_bias=(L, D))
    else:
        blocks.update(norm1_bias=(L, D), norm2_bias=(L, D), fc1=(L, F, D), fc1_bias=(L, F), fc2=(L, D, F),
                      fc2_bias=(L, D))
    merger = {"norm": (D,), "fc1": (H, H), "fc1_bias": (H,), "fc2": (vc.out_hidden_size, H),
              "fc2_bias": (vc.out_hidden_size,)}
    if not vc.windowed:
        merger["norm_bias"] = (D,)
    return {"patch_embed": (D, vc.patch_dim), "blocks": blocks, "merger": merger}


# --- host-side metadata from image_grid_thw ------------------------------------------------------


def _check_grid(vc, grid_thw) -> np.ndarray:
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m = vc.spatial_merge_size
    bad = (grid <= 0).any(axis=1) | (grid[:, 1] % m != 0) | (grid[:, 2] % m != 0)
    if bad.any():
        raise ValueError(f"image_grid_thw rows must be positive with h and w divisible by spatial_merge_size={m}; "
                         f"got {grid[bad].tolist()}")
    return grid


def num_patches(grid_thw) -> int:
    return int(np.prod(np.asarray(grid_thw, np.int64).reshape(-1, 3), axis=1).sum())


def patch_metadata(vc, grid_thw, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Per patch: its (h, w) grid coordinate, its frame segment and its attention-window segment.

    `pad_to` appends padding patches (segment PAD_SEGMENT) so batches of different images compile
    to a few shapes. Window ids follow HF's get_vision_window_index: windows of ws x ws merged tokens
    (ws = window_size / merge / patch) per frame, the last row and column of windows clipped.
    """
    grid = _check_grid(vc, grid_thw)
    m, mu = vc.spatial_merge_size, vc.merge_unit
    ws = max(vc.window_size // m // vc.patch_size, 1)
    hw, frames, windows = [], [], []
    frame_base = window_base = 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        k = np.arange(t * h * w)
        merged = k // mu
        ft, rem = np.divmod(merged, lh * lw)
        i, j = np.divmod(rem, lw)
        bi, bj = np.divmod(k % mu, m)
        hw.append(np.stack([i * m + bi, j * m + bj], axis=-1))
        frames.append(frame_base + ft)
        n_wh, n_ww = -(-lh // ws), -(-lw // ws)
        windows.append(window_base + (ft * n_wh + i // ws) * n_ww + j // ws)
        frame_base += t
        window_base += t * n_wh * n_ww
    out = {"hw": np.concatenate(hw).astype(np.int32), "frame": np.concatenate(frames).astype(np.int32),
           "window": np.concatenate(windows).astype(np.int32)}
    n = out["hw"].shape[0]
    if pad_to is not None:
        if pad_to < n:
            raise ValueError(f"pad_to={pad_to} is smaller than the {n} patches of these images")
        extra = pad_to - n
        out = {"hw": np.concatenate([out["hw"], np.zeros((extra, 2), np.int32)]),
               "frame": np.concatenate([out["frame"], np.full(extra, PAD_SEGMENT, np.int32)]),
               "window": np.concatenate([out["window"], np.full(extra, PAD_SEGMENT, np.int32)])}
    return out


# --- the encoder ---------------------------------------------------------------------------------


def axial_rope(vc, hw):
    """cos/sin [N, head_dim] (fp32): the first quarter of pairs rotate by h, the second by w."""
    quarter = vc.head_dim // 4
    inv = 1.0 / (vc.rope_theta ** (np.arange(0, vc.head_dim // 2, 2, dtype=np.float32) / (vc.head_dim // 2)))
    inv = jnp.asarray(inv.astype(np.float32))
    pos = hw.astype(jnp.float32)
    freqs = jnp.concatenate([pos[:, :1] * inv[:quarter], pos[:, 1:2] * inv[:quarter]], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x, cos, sin):
    """HF's rotate_half rotation over the whole head dim, in fp32 like apply_rotary_pos_emb_vision."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def layer_norm(x, w, b, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps) * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def _rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * normed.astype(x.dtype)


def _norm(vc, x, p, name):
    if vc.windowed:
        return _rms_norm(x, p[name], vc.norm_eps)
    return layer_norm(x, p[name], p[name + "_bias"], vc.norm_eps)


def _activation(name: str):
    return {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x), "silu": jax.nn.silu,
            "gelu": lambda x: jax.nn.gelu(x, approximate=False),
            "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}[name]


def _block(vc, x, p, lw, lora_scale, full, rope_and_segments):
    n, d = x.shape
    heads, hd = vc.num_heads, vc.head_dim

    def proj(h, name):
        lora = None if lw is None else lw.get(name)
        return linear(h, p[name], lora, p[name + "_bias"], lora_scale=lora_scale)

    h = _norm(vc, x, p, "norm1")
    qkv = proj(h, "qkv").reshape(n, 3, heads, hd)
    cos, sin, frame, window = rope_and_segments
    q, k, v = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin), qkv[:, 2]
    segments = jnp.where(full, frame, window)[None]
    same_position = jnp.zeros_like(segments)
    o = kernels.attention(q[None], k[None], v[None], same_position, same_position, segments, segments, scale=hd**-0.5)[0]
    x = x + proj(o.reshape(n, d), "proj")
    h = _norm(vc, x, p, "norm2")
    act = _activation(vc.activation)
    if vc.windowed:
        h = proj(act(proj(h, "gate")) * proj(h, "up"), "down")
    else:
        h = proj(act(proj(h, "fc1")), "fc2")
    return x + h


def merge_patches(vc, params, x):
    """The patch merger: norm, concatenate each m x m block of patches, Linear-GELU-Linear."""
    p = params["merger"]
    if vc.windowed:
        h = _rms_norm(x, p["norm"], vc.norm_eps)
    else:
        h = layer_norm(x, p["norm"], p["norm_bias"], vc.norm_eps)
    h = h.reshape(-1, vc.hidden_size * vc.merge_unit)
    h = jax.nn.gelu(linear(h, p["fc1"], bias=p["fc1_bias"]), approximate=False)
    return linear(h, p["fc2"], bias=p["fc2_bias"])


def encode_patches(vc, params, patches, meta, *, lora=None, lora_scale: float = 1.0, dtype=None, remat: bool = False):
    """Pixel patches [N, patch_dim] -> merged image features [N / m^2, out_hidden_size].

    meta: `patch_metadata` arrays (hw, frame, window). lora: {target: {"a": [L, r, in], "b": [L, out, r]}}
    over the blocks, or None.
    """
    dtype = dtype or params["blocks"]["qkv_bias"].dtype
    x = linear(jnp.asarray(patches).astype(dtype), params["patch_embed"])
    hw, frame, window = (jnp.asarray(meta[name]) for name in ("hw", "frame", "window"))
    if vc.windowed:
        order, merged_order = window_order(vc, window)
        x, hw, frame, window = (a[order] for a in (x, hw, frame, window))
    cos, sin = axial_rope(vc, hw)
    rope_and_segments = (cos, sin, frame, window)
    full = jnp.asarray(vc.full_attention_layers)

    def body(x, xs):
        p, lw, f = xs
        return _block(vc, x, p, lw, lora_scale, f, rope_and_segments), None

    if remat:
        body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, x, (params["blocks"], lora, full))
    merged = merge_patches(vc, params, x)
    return merged[jnp.argsort(merged_order)] if vc.windowed else merged


def window_order(vc, window):
    """The patches' order sorted by window, each merge block kept whole (its patches share a window),
    and the merged tokens' order that results (indices into image order). Windows are numbered frame
    by frame, so frames stay contiguous too."""
    mu = vc.merge_unit
    merged_order = jnp.argsort(window[::mu], stable=True)
    return (merged_order[:, None] * mu + jnp.arange(mu)).reshape(-1), merged_order


def init_vision_params(vc, key, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random vision params (normal(std) matrices and biases, unit norms)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(vision_param_shapes(vc), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name.startswith("norm") and not name.endswith("bias"):
            leaves.append(jnp.ones(shape, dtype))
        else:
            leaves.append((jax.random.normal(k, shape, jnp.float32) * std).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


__all__ = ["axial_rope", "encode_patches", "init_vision_params", "merge_patches", "mlp_targets", "num_patches",
           "patch_metadata", "vision_param_shapes", "window_order"]
