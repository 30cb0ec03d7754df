"""The decoder as pure functions over a params pytree whose layers are stacked on a leading axis.

Layers run under `jax.lax.scan` (compile time does not grow with depth), each one optionally under
`jax.checkpoint` with a named remat policy. Per-layer differences (sliding window or not, Gemma-3's
local rope base) are scanned flags, not Python branches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jft.config import Config
from jft.kernels import layer_matmul
from jft.kernels.attention import attention_pallas as flash_attention
from jft.nn import attention as attn
from jft.nn.layers import (QUANTIZED_DOT, DenseLayer, activation, apply_rope, dense, embed_tokens, linear, rms_norm,
                           rope_for, softcap)
from jft.quant import NF4, NF4Layer
from jft.sharding import gather_layer

# "full" recomputes each layer in the backward pass from its input, kept on the device; "offload"
# does the same with the layer inputs in host memory (Unsloth's default); "save_dots" keeps every
# matmul output on the device.
REMAT_POLICIES = ("none", "full", "offload", "save_dots")
# "xla": masked attention by positions and segments (packing, padding, KV cache) — always exact.
# "flash": jft's Pallas flash attention, exact by positions and segments, with softcap (not for
# decoding from a cache). "cudnn": causal flash attention, no mask (unpacked right-padded batches
# only); "causal" is the same contract through XLA, for checking it where cuDNN is absent.
ATTENTION_IMPLEMENTATIONS = ("xla", "flash", "cudnn", "causal")
_NO_WINDOW = np.iinfo(np.int32).max
_EMPTY_SLOT_POSITION = np.iinfo(np.int32).max  # an empty cache slot is "in the future" of every query


def param_shapes(config: Config) -> dict:
    """The canonical params layout as {path: shape}; the one source of truth for init and loading."""
    c, L = config, config.num_layers
    layers = {
        "attn_norm": (L, c.hidden_size),
        "q": (L, c.q_dim, c.hidden_size),
        "k": (L, c.kv_dim, c.hidden_size),
        "v": (L, c.kv_dim, c.hidden_size),
        "o": (L, c.hidden_size, c.q_dim),
        "mlp_norm": (L, c.hidden_size),
        "gate": (L, c.intermediate_size, c.hidden_size),
        "up": (L, c.intermediate_size, c.hidden_size),
        "down": (L, c.hidden_size, c.intermediate_size),
    }
    if c.qkv_bias:
        layers.update(q_bias=(L, c.q_dim), k_bias=(L, c.kv_dim), v_bias=(L, c.kv_dim))
    if c.o_bias:
        layers["o_bias"] = (L, c.hidden_size)
    if c.qk_norm:
        layers.update(q_norm=(L, c.head_dim), k_norm=(L, c.head_dim))
    if c.sandwich_norm:
        layers.update(post_attn_norm=(L, c.hidden_size), post_mlp_norm=(L, c.hidden_size))
    shapes = {"embed": (c.vocab_size, c.hidden_size), "final_norm": (c.hidden_size,), "layers": layers}
    if not c.tie_embeddings:
        shapes["lm_head"] = (c.vocab_size, c.hidden_size)
    return shapes


def is_norm(name: str) -> bool:
    return name.endswith("norm")


def init_params(config: Config, key, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random params (normal(std) matrices, unit norms) in the canonical layout."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if is_norm(name):
            leaves.append(jnp.full(shape, 1.0 - config.norm_offset, dtype))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((jax.random.normal(k, shape, jnp.float32) * std).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --- KV cache ----------------------------------------------------------------------------------


def init_cache(config: Config, batch: int, length: int, dtype) -> dict:
    kv = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(kv, dtype),
        "v": jnp.zeros(kv, dtype),
        "positions": jnp.full((batch, length), _EMPTY_SLOT_POSITION, jnp.int32),
        "segments": jnp.full((batch, length), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def _write_tokens(buffer, new, index, *lead):
    """buffer[*lead, b, index + t] = new[b, t], in place: index is one int for every row, or one per row [B]."""
    new = new.astype(buffer.dtype)
    if jnp.ndim(index) == 0:
        start = (*lead, 0, index) + (0,) * (new.ndim - 2)
        return jax.lax.dynamic_update_slice(buffer, new.reshape((1,) * len(lead) + new.shape), start)
    rows = jnp.arange(new.shape[0])[:, None]
    return buffer.at[(*lead, rows, index[:, None] + jnp.arange(new.shape[1]))].set(new)


def _write_cache_metadata(cache, positions, segments):
    i = cache["index"]
    return {
        **cache,
        "positions": _write_tokens(cache["positions"], positions, i),
        "segments": _write_tokens(cache["segments"], segments, i),
        "index": i + positions.shape[1],
    }


# --- the decoder ---------------------------------------------------------------------------------


_LAYER_INPUT = "layer_input"


def checked_remat(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {REMAT_POLICIES}")
    return policy


def _remat(fn, policy: str):
    if checked_remat(policy) == "none":
        return fn
    cp = jax.checkpoint_policies
    policies = {
        "full": None,
        "offload": cp.save_and_offload_only_these_names(names_which_can_be_saved=[], names_which_can_be_offloaded=[_LAYER_INPUT],
                                                        offload_src="device", offload_dst="pinned_host"),
        "save_dots": cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names(QUANTIZED_DOT)),
    }

    def named_input(carry, xs):
        x, kv = carry
        return fn((checkpoint_name(x, _LAYER_INPUT), kv), xs)

    return jax.checkpoint(named_input, policy=policies[policy], prevent_cse=False)


def _lora_for(lora_layer, name):
    return None if lora_layer is None else lora_layer.get(name)


def _decoder_layer(config: Config, lora_cfg, attn_impl: str, x, lp, ll, lora_on, sliding, rope_g, rope_l, q_meta, k_meta,
                   cache_kv, layer, cache_index, key):
    """One decoder layer. q_meta/k_meta are (positions, segments); cache_kv is the whole (k, v) cache
    [L, B, S, ...] or None, written in place at this layer and cache_index (one int, or one per row);
    lora_on is 1.0 where this layer's LoRA applies (a LoRA may target a subset of layers)."""
    c = config
    b, t, _ = x.shape
    keys = iter(jax.random.split(key, 7)) if key is not None else None

    def proj(h, name, bias=None):
        lw = _lora_for(ll, name)
        kw = {}
        if lw is not None:
            kw = dict(lora_scale=lora_cfg.scaling(name) * lora_on, lora_dropout=lora_cfg.dropout,
                      lora_dropout_key=next(keys) if keys is not None else None)
        return linear(h, lp[name], lw, bias, **kw)

    h = rms_norm(x, lp["attn_norm"], c.rms_norm_eps, c.norm_offset)
    q = proj(h, "q", lp.get("q_bias")).reshape(b, t, c.num_heads, c.head_dim)
    k = proj(h, "k", lp.get("k_bias")).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = proj(h, "v", lp.get("v_bias")).reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        q = rms_norm(q, lp["q_norm"], c.rms_norm_eps, c.norm_offset)
        k = rms_norm(k, lp["k_norm"], c.rms_norm_eps, c.norm_offset)
    cos, sin = rope_g
    if rope_l is not None:
        cos, sin = jnp.where(sliding, rope_l[0], cos), jnp.where(sliding, rope_l[1], sin)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    new_kv = None
    if cache_kv is not None:
        new_kv = tuple(_write_tokens(cached, fresh, cache_index, layer) for cached, fresh in zip(cache_kv, (k, v)))
        k, v = (cached[layer].astype(q.dtype) for cached in new_kv)
    if attn_impl in ("cudnn", "causal") and cache_kv is None and c.attn_logit_softcap is None:
        o = _causal_attention(c, q, k, v, sliding, "cudnn" if attn_impl == "cudnn" else None)
    elif attn_impl == "flash" and cache_kv is None:
        o = _flash_attention(c, q, k, v, sliding, q_meta)
    else:
        window = None
        if c.sliding_window is not None:
            window = jnp.where(sliding, c.sliding_window, _NO_WINDOW)
        mask = attn.attention_mask(q_meta[0], k_meta[0], q_meta[1], k_meta[1], window)
        o = attn.xla_attention(q, k, v, mask, scale=c.attention_scale, softcap=c.attn_logit_softcap)
    o = proj(o.reshape(b, t, c.q_dim), "o", lp.get("o_bias"))
    if c.sandwich_norm:
        o = rms_norm(o, lp["post_attn_norm"], c.rms_norm_eps, c.norm_offset)
    x = x + o

    h = rms_norm(x, lp["mlp_norm"], c.rms_norm_eps, c.norm_offset)
    h = activation(c.activation)(proj(h, "gate")) * proj(h, "up")
    h = proj(h, "down")
    if c.sandwich_norm:
        h = rms_norm(h, lp["post_mlp_norm"], c.rms_norm_eps, c.norm_offset)
    return x + h, new_kv


def _same_layout(*xs):
    """Under a jft mesh (`jax.set_mesh`), gives q/k/v one sharding: rows over data x fsdp, heads over
    tensor. cuDNN's partitioner requires it, and propagation alone may shard them differently."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names:
        return xs
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    return tuple(jax.lax.with_sharding_constraint(x, spec) if x.shape[2] % mesh.shape["tensor"] == 0
                 else jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp"))) for x in xs)


def _causal_attention(c: Config, q, k, v, sliding, implementation):
    q, k, v = _same_layout(q, k, v)
    return _per_layer_window(c, sliding, lambda window: attn.causal_attention(
        q, k, v, scale=c.attention_scale, window=window, implementation=implementation))


def _per_layer_window(c: Config, sliding, attend):
    """attend(window) with this layer's window: a static choice unless layers differ (then a cond)."""
    if c.sliding_window is None or not any(c.sliding_layers):
        return attend(None)
    if all(c.sliding_layers):
        return attend(c.sliding_window)
    return jax.lax.cond(sliding, lambda: attend(c.sliding_window), lambda: attend(None))


def _flash_attention(c: Config, q, k, v, sliding, meta):
    positions, segments = meta
    return _per_layer_window(c, sliding, lambda window: flash_attention(
        q, k, v, positions, positions, segments, segments, scale=c.attention_scale, window=window,
        softcap=c.attn_logit_softcap))


def resolve_attention(config: Config, packed: bool, attention: str = "auto", dtype=jnp.bfloat16) -> str:
    """A checked attn_impl; "auto" is the fastest exact one for training batches on this backend:
    cuDNN for unpacked rows of 16-bit activations (without softcap), jft's flash kernel for packed
    rows, softcap or float32 on GPU, XLA elsewhere."""
    if attention != "auto":
        return _checked_attention(attention)
    if jax.default_backend() != "gpu":
        return "xla"
    cudnn_serves = not packed and config.attn_logit_softcap is None and jnp.dtype(dtype).itemsize == 2
    return "cudnn" if cudnn_serves else "flash"


def _checked_attention(attn_impl: str) -> str:
    if attn_impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {attn_impl!r}; choose \"auto\" or one of {ATTENTION_IMPLEMENTATIONS}")
    return attn_impl


def _rope_for(config: Config, positions):
    rope_g = rope_for(config.rope, config.rotary_dims, positions)
    rope_l = None
    if config.local_rope is not None:
        rope_l = rope_for(config.local_rope, config.rotary_dims, positions)
    return rope_g, rope_l


def rope_per_row(config: Config, positions):
    """Rope tables [B, T, rotary_dim] with longrope's factor set chosen for each row as if it ran alone
    (a sequence's own length decides, not the batch's longest); None for every other rope, whose
    tables do not depend on the batch."""
    if config.rope.kind != "longrope":
        return None
    return rope_for(config.rope, config.rotary_dims, positions, per_row=True)


def forward_hidden(config: Config, params, input_ids, positions, segment_ids, *, lora=None, cache=None,
                   dropout_key=None, remat: str = "none", attn_impl: str = "xla", dtype=None, inputs_embeds=None,
                   rope=None):
    """Runs the decoder. Returns (final-normed hidden [B, T, D], updated cache or None).

    positions/segment_ids: int [B, T]. Tokens attend only within their segment (0 = padding).
    With a cache, new keys are written at cache["index"] and queries see every filled slot.
    inputs_embeds [B, T, D] replaces the token embedding (vision-language models scatter image
    features into it); rope, a precomputed (cos, sin) pair of [B, T, rotary_dim], replaces the rotary
    tables of `positions` (M-RoPE), which then only order tokens for masking and the cache.
    """
    c = config
    _checked_attention(attn_impl)
    dtype = dtype or (inputs_embeds.dtype if inputs_embeds is not None else _compute_dtype(params))
    lora_weights = None if lora is None else lora.weights
    if inputs_embeds is not None:
        x = inputs_embeds.astype(dtype)
    else:
        embed = lora_weights["embed"] if lora_weights is not None and "embed" in lora_weights else params["embed"]
        x = embed_tokens(c, embed, input_ids, dtype)
    rope_g, rope_l = _rope_for(c, positions) if rope is None else (tuple(rope), None)
    q_meta = (positions, segment_ids)

    cache_index = None
    if cache is not None:
        cache_index = cache["index"]
        cache = _write_cache_metadata(cache, positions, segment_ids)
        k_meta = (cache["positions"], cache["segments"])
    else:
        k_meta = q_meta

    lora_cfg = None if lora is None else lora.config
    layer_lora = None if lora_weights is None else lora_weights.get("layers")
    sliding = jnp.asarray(c.sliding_layers or (False,) * c.num_layers)
    lora_on = None if lora_cfg is None else jnp.asarray(lora_cfg.layer_mask(c.num_layers))
    layer_keys = None if dropout_key is None else jax.random.split(dropout_key, c.num_layers)

    # matrices the projections read in place from their stacks (see NF4Layer and DenseLayer)
    in_place = {name: leaf for name, leaf in params["layers"].items() if isinstance(leaf, NF4)}
    if cache is not None and x.shape[0] * x.shape[1] <= layer_matmul.MAX_TOKENS and _one_device():  # decoding
        in_place.update({name: leaf for name, leaf in params["layers"].items() if _is_dense_matrix_stack(leaf)})
    scanned = {name: leaf for name, leaf in params["layers"].items() if name not in in_place}

    def body(carry, xs):
        x, kv = carry
        lp, ll, on, sl, key, index = xs
        lp = gather_layer({**lp, **{name: _layer_of(stack, index) for name, stack in in_place.items()}})
        return _decoder_layer(c, lora_cfg, attn_impl, x, lp, ll, on, sl, rope_g, rope_l, q_meta, k_meta, kv, index,
                              cache_index, key), None

    # the cache rides in the carry, not in xs/ys: each layer writes its new keys in place, where
    # scanning over it would rewrite the whole cache every step
    kv = None if cache is None else (cache["k"], cache["v"])
    xs = (scanned, layer_lora, lora_on, sliding, layer_keys, jnp.arange(c.num_layers))
    (x, kv), _ = jax.lax.scan(_remat(body, remat), (x, kv), xs)
    x = rms_norm(x, params["final_norm"], c.rms_norm_eps, c.norm_offset)
    if cache is not None:
        cache = {**cache, "k": kv[0], "v": kv[1]}
    return x, cache


def _one_device() -> bool:
    """Not under a mesh of several devices, where a Pallas call on sharded weights would gather them whole."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def _is_dense_matrix_stack(leaf) -> bool:
    return isinstance(leaf, jax.Array) and leaf.ndim == 3


def _layer_of(stack, index):
    return NF4Layer(stack, index) if isinstance(stack, NF4) else DenseLayer(stack, index)


def output_weight(config: Config, params, lora=None):
    """The [V, D] output projection: lm_head, or the (possibly trained) embedding when tied."""
    weights = {} if lora is None else lora.weights
    if config.tie_embeddings:
        return weights.get("embed", params["embed"])
    return weights.get("lm_head", params["lm_head"])


def logits_from_hidden(config: Config, params, hidden, lora=None):
    w = dense(output_weight(config, params, lora), hidden.dtype)
    logits = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
    return softcap(logits, config.final_logit_softcap)


def forward(config: Config, params, input_ids, positions=None, segment_ids=None, *, lora=None, attn_impl: str = "xla"):
    """Logits [B, T, V] in fp32. Default positions 0..T-1 and one segment per row."""
    input_ids = jnp.asarray(input_ids)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids, dtype=jnp.int32)
    hidden, _ = forward_hidden(config, params, input_ids, positions, segment_ids, lora=lora, attn_impl=attn_impl)
    return logits_from_hidden(config, params, hidden, lora)


def _compute_dtype(params):
    """The dtype activations run in: the embedding's (quantized leaves report their target dtype)."""
    return params["embed"].dtype
