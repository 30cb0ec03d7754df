"""Batched generation with a KV cache: one prefill, then a jitted decode loop (`lax.while_loop`).

Prompts are left-padded into a bucketed length so a session compiles a handful of shapes. Padding
tokens get segment 0 and real tokens segment 1, so no real token ever attends to padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jft import quant
from jft.config import Config
from jft.memory import fits_free_memory
from jft.nn.transformer import forward_hidden, init_cache, logits_from_hidden


def filter_logits(logits, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Masks logits [B, V] outside top-k / nucleus top-p / min-p to -inf (temperature already applied)."""
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold included)
        keep = cumulative - jax.nn.softmax(sorted_logits, axis=-1) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def sample(logits, key, *, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Greedy when temperature == 0, else a draw from the filtered tempered softmax. Returns int32 [B]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits / temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def decode(config: Config, params, lora, last_logits, cache, next_pos, key, *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           eos_ids: tuple[int, ...] = (), pad_id: int = 0, rope_at=None, refill=None):
    """The decode loop after a prefill: samples from last_logits [B, V], then feeds each new token.

    next_pos [B]: the position of the first new token. rope_at(pos) may give the rope tables for a
    step (the vision models' M-RoPE); None builds them from positions. refill(out, i), for longrope,
    replaces the step that first reaches past the original context (see `_refill`). Returns (tokens
    [B, N] padded with pad_id after EOS, lengths [B] counting tokens up to and including the first EOS).
    """
    b = last_logits.shape[0]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def pick(logits, key):
        return sample(logits, key, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)

    key, sub = jax.random.split(key)
    first = pick(last_logits, sub)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        i, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, out, cache, done, lengths, pos, key = state
        token = out[:, i - 1]
        rope = None if rope_at is None else rope_at(pos)

        def one_token():
            hidden, new_cache = forward_hidden(config, params, token[:, None], pos[:, None], jnp.ones((b, 1), jnp.int32),
                                               lora=lora, cache=cache, rope=rope)
            return logits_from_hidden(config, params, hidden, lora)[:, 0], new_cache

        if refill is None:
            logits, cache = one_token()
        else:
            crossing = jnp.max(pos) == config.rope.original_max_position_embeddings
            logits, cache = jax.lax.cond(crossing, lambda: refill(out, i), one_token)
        key, sub = jax.random.split(key)
        new = jnp.where(done, pad_id, pick(logits, sub))
        out = out.at[:, i].set(new)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, eos)
        return i + 1, out, cache, done, lengths, pos + 1, key

    state = (jnp.asarray(1, jnp.int32), out, cache, done, lengths, next_pos, key)
    _, out, _, _, lengths, _, _ = jax.lax.while_loop(cond, step, state)
    return out, lengths


SAMPLING_STATICS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "eos_ids", "pad_id")
# Decoding is bound by reading the weights, and quantized ones are dequantized layer by layer in every
# step; generation makes them dense once instead when its compiled program needs at most this share
# of the free device memory.
DEQUANTIZE_SHARE = 0.5


def dense_once_fits(jitted, args, options) -> bool:
    """Whether `jitted(*args, **options, dequantize=True)` should run: args[1] (the params) hold
    quantized leaves and that program needs at most DEQUANTIZE_SHARE of the free device memory."""
    return quant.has_quantized(args[1]) and fits_free_memory(jitted, args, {**options, "dequantize": True},
                                                             DEQUANTIZE_SHARE)


@functools.partial(jax.jit, static_argnames=("config", "dequantize", *SAMPLING_STATICS))
def generate_ids(config: Config, params, lora, prompt_ids, prompt_mask, key, dequantize: bool = False, **sampling):
    """Left-padded prompts [B, T] (mask 1 real / 0 pad) -> `decode`'s (tokens [B, N], lengths [B]).
    With `dequantize`, quantized weights are made dense (in the embedding's dtype) first."""
    if dequantize:
        params = quant.dequantize_tree(params, params["embed"].dtype)
    b, t = prompt_ids.shape
    mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = init_cache(config, b, t + sampling["max_new_tokens"], params["embed"].dtype)
    hidden, cache = forward_hidden(config, params, prompt_ids, positions, mask, lora=lora, cache=cache)
    last_logits = logits_from_hidden(config, params, hidden[:, -1:], lora)[:, 0]
    refill = None
    if config.rope.kind == "longrope" and t + sampling["max_new_tokens"] > config.rope.original_max_position_embeddings:
        refill = functools.partial(_refill, config, params, lora, prompt_ids, mask, positions)
    return decode(config, params, lora, last_logits, cache, positions[:, -1] + 1, key, refill=refill, **sampling)


def _refill(config: Config, params, lora, prompt_ids, mask, positions, out, i):
    """Logits of new token i - 1 and a fresh cache, from the prompt and the first i new tokens.

    A longrope model switches to its long factors once a forward reaches past the original context,
    and the keys cached so far were rotated with the short ones; like transformers' Phi-3, the step
    that crosses recomputes the whole sequence. Slots of tokens not generated yet are written as
    padding (segment 0) and overwritten as decoding goes on."""
    b, t = prompt_ids.shape
    n = out.shape[1]
    ids = jnp.concatenate([prompt_ids, out], axis=1)
    pos = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(n, dtype=positions.dtype)], axis=1)
    segments = jnp.concatenate([mask, jnp.broadcast_to(jnp.arange(n) < i, (b, n)).astype(mask.dtype)], axis=1)
    cache = init_cache(config, b, t + n, params["embed"].dtype)
    hidden, cache = forward_hidden(config, params, ids, pos, segments, lora=lora, cache=cache)
    last = jax.lax.dynamic_slice_in_dim(hidden, t + i - 1, 1, axis=1)
    return logits_from_hidden(config, params, last, lora)[:, 0], {**cache, "index": t + i}


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum): prompt lengths compile to few shapes."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def left_pad(sequences: list[list[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into ids [B, length] and a mask (1 real, 0 pad)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt must have at least one token")
    length = length or bucket(max(len(s) for s in sequences))
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, s in enumerate(sequences):
        ids[row, length - len(s) :] = s
        mask[row, length - len(s) :] = 1
    return ids, mask
