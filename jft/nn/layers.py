"""Small pure building blocks of the decoder: norms, projections, rotary embeddings, MLP."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jft.config import Config, Rope
from jft.kernels import layer_matmul as layer_matmul_kernels
from jft.kernels import nf4 as nf4_kernels
from jft.quant import NF4, NF4Layer, is_quantized


def rms_norm(x, w, eps: float, offset: float = 0.0):
    """RMSNorm in fp32, scaled by (offset + w); Gemma stores w and applies (1 + w)."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (normed * (offset + w.astype(jnp.float32))).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """Matrix `index` of a stacked dense weight, left in the stack: what decoding steps hand the
    projections, which read it in place (`jft.kernels.layer_matmul`) instead of copying it out."""

    stack: jax.Array
    index: jax.Array


def dense(w, dtype):
    """A weight as a dense array of `dtype`, dequantizing quantized leaves (NF4 through the kernel
    registry: Pallas on GPU, the jnp reference elsewhere)."""
    if isinstance(w, NF4):
        return nf4_kernels.dequantize(w, dtype)
    if isinstance(w, NF4Layer):
        return nf4_kernels.dequantize(w.stack, dtype, layer=w.index)
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype)
    return w.astype(dtype)


QUANTIZED_DOT = "quantized_dot"  # the name remat policies save a quantized matmul's output by


@jax.custom_vjp
def quantized_matmul(x, w):
    """x @ dense(w).T for a frozen quantized w [out, in].

    An NF4 weight times a decoding step's few tokens goes through the fused kernel where the kernel
    registry picks it (it reads the packed weight, not a dense copy). The backward pass dequantizes w
    again rather than keeping the forward's dense copy: under remat, that copy would stay alive from
    the recomputed forward to the backward, and a layer's seven dense matrices at once are most of
    QLoRA's working memory. w gets no gradient."""
    stack, layer = (w.stack, w.index) if isinstance(w, NF4Layer) else (w, None)
    if isinstance(stack, NF4) and nf4_kernels.fused_matmul_applies(x.size // x.shape[-1], stack):
        return nf4_kernels.nf4_matmul_pallas(x, stack, layer=layer)
    return jnp.einsum("...i,oi->...o", x, dense(w, x.dtype))


def _quantized_matmul_fwd(x, w):
    return quantized_matmul(x, w), w


def _quantized_matmul_bwd(w, g):
    # the barrier ties this dequantize to g: XLA can neither merge it with the forward's nor run it early
    w, g = jax.lax.optimization_barrier((w, g))
    dx = jnp.einsum("...o,oi->...i", g, dense(w, g.dtype))
    return dx, jax.tree.map(_zero_cotangent, w)


def _zero_cotangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


def linear(x, w, lora=None, bias=None, *, lora_scale: float = 1.0, lora_dropout_key=None, lora_dropout: float = 0.0):
    """y = x @ w.T (+ bias) (+ scale * dropout(x) @ A.T @ B.T); w is [out, in], dense or quantized."""
    if is_quantized(w):
        y = checkpoint_name(quantized_matmul(x, w), QUANTIZED_DOT)
    elif isinstance(w, DenseLayer):
        y = layer_matmul_kernels.layer_matmul(x, w.stack, w.index)
    else:
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if lora is not None:
        xl = x
        if lora_dropout_key is not None and lora_dropout > 0.0:
            keep = jax.random.bernoulli(lora_dropout_key, 1.0 - lora_dropout, x.shape)
            xl = jnp.where(keep, x / (1.0 - lora_dropout), 0).astype(x.dtype)
        # scaling the small B (not the product) lets XLA fold the add into the matmul's epilogue
        a, b = lora["a"].astype(x.dtype), (lora["b"] * lora_scale).astype(x.dtype)
        y = y + jnp.einsum("...i,ri->...r", xl, a) @ b.T
    return y


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_tanh":
        return lambda g: jax.nn.gelu(g, approximate=True)
    raise ValueError(f"unknown activation {name!r}")


# --- rotary embeddings -------------------------------------------------------------------------


def inv_frequencies(rope: Rope, rotary_dim: int, long: bool = False) -> np.ndarray:
    """Per-pair inverse frequencies, with linear, llama3, yarn or longrope scaling applied (fp32, numpy:
    static); `long` picks longrope's factors for forwards beyond the original context."""
    inv = 1.0 / (rope.theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim))
    inv = inv.astype(np.float32)
    if rope.kind == "linear":
        return inv / np.float32(rope.factor)
    if rope.kind == "longrope":
        return (inv / np.asarray(rope.long_factor if long else rope.short_factor, np.float32)).astype(np.float32)
    if rope.kind == "yarn":
        def pair_turning(times):  # the (fractional) pair index that turns `times` times over the original context
            return rotary_dim * math.log(rope.original_max_position_embeddings / (times * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = pair_turning(rope.beta_fast), pair_turning(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / max(high - low, 0.001), 0, 1)
        return (inv / np.float32(rope.factor) * ramp + inv * (1 - ramp)).astype(np.float32)
    if rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(inv_freq, positions, scale: float = 1.0):
    """cos/sin of shape [B, T, rotary_dim] for integer positions [B, T] (split-half layout), times scale."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def rope_for(rope: Rope, rotary_dim: int, positions, per_row: bool = False):
    """The rope tables of `positions` [B, T]. Longrope, like transformers, takes its long factors when
    the forward reaches beyond the original context (its largest position + 1 exceeds it), else its
    short ones; the choice is traced, so one compiled step serves both. It is made for the whole
    batch, as transformers does, or with `per_row` for each row as if it ran alone."""
    if rope.kind != "longrope":
        return rope_tables(inv_frequencies(rope, rotary_dim), positions, rope.attention_factor)
    last = jnp.max(positions, axis=-1, keepdims=True)[..., None] if per_row else jnp.max(positions)
    long = last + 1 > rope.original_max_position_embeddings
    inv = jnp.where(long, inv_frequencies(rope, rotary_dim, long=True), inv_frequencies(rope, rotary_dim))
    return rope_tables(inv, positions, rope.attention_factor)


def apply_rope(x, cos, sin):
    """Rotates the first cos.shape[-1] dims of x [B, T, H, hd] (HF's rotate_half convention)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    rotated = rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated


def softcap(x, cap: float | None):
    return x if cap is None else jnp.tanh(x / cap) * cap


def embed_tokens(config: Config, embed, input_ids, dtype):
    h = jnp.take(dense(embed, dtype), input_ids, axis=0)
    if config.embed_scale:
        h = h * jnp.asarray(math.sqrt(config.hidden_size), dtype)
    return h


def embed_tokens_on_host(config: Config, table: np.ndarray, input_ids) -> np.ndarray:
    """embed_tokens for a dense table in host memory (numpy), computed by the CPU: the same values."""
    h = table[np.asarray(input_ids)]
    if config.embed_scale:
        h = h * np.asarray(math.sqrt(config.hidden_size), table.dtype)
    return h
