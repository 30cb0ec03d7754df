"""Generation for image+text prompts: one prefill with the image features, then a jitted KV-cache
decode loop. A new token's M-RoPE position is its sequence position plus the row's rope delta (the
same on all three axes), as in transformers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jft.model import Generation, _cut_at_stop
from jft.nn.generate import bucket, sample
from jft.nn.transformer import forward_hidden, init_cache, logits_from_hidden
from jft.vlm.model import hidden_states, make_batch, mrope_tables

_BATCH_KEYS = ("input_ids", "positions", "segment_ids", "rope_positions", "rope_deltas", "pixel_values", "hw", "frame",
               "window")


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                             "eos_ids", "pad_id"))
def generate_ids(config, params, lora, batch, key, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, eos_ids: tuple[int, ...] = (), pad_id: int = 0):
    """Left-padded batch (`make_batch`) -> (new tokens [B, N] padded after EOS, lengths [B])."""
    b, t = batch["input_ids"].shape
    cache = init_cache(config.text, b, t + max_new_tokens, params["embed"].dtype)
    hidden, cache = hidden_states(config, params, batch, lora=lora, cache=cache)
    last = logits_from_hidden(config.text, params, hidden[:, -1:], lora)[:, 0]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def pick(logits, key):
        return sample(logits, key, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)

    key, sub = jax.random.split(key)
    first = pick(last, sub)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)
    lengths = jnp.ones((b,), jnp.int32)
    next_pos = batch["positions"][:, -1] + 1
    deltas = batch["rope_deltas"]

    def cond(state):
        i, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, out, cache, done, lengths, pos, key = state
        token = out[:, i - 1]
        rope_pos = jnp.broadcast_to((pos + deltas)[None, :, None], (3, b, 1))
        hidden, cache = forward_hidden(config.text, params, token[:, None], pos[:, None], jnp.ones((b, 1), jnp.int32),
                                       lora=lora, cache=cache, rope=mrope_tables(config, rope_pos))
        logits = logits_from_hidden(config.text, params, hidden, lora)[:, 0]
        key, sub = jax.random.split(key)
        new = jnp.where(done, pad_id, pick(logits, sub))
        out = out.at[:, i].set(new)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(new, eos)
        return i + 1, out, cache, done, lengths, pos + 1, key

    state = (jnp.asarray(1, jnp.int32), out, cache, done, lengths, next_pos, key)
    _, out, _, _, lengths, _, _ = jax.lax.while_loop(cond, step, state)
    return out, lengths


def left_pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt must have at least one token")
    length = bucket(max(len(s) for s in sequences))
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, length - len(s):] = s
        mask[row, length - len(s):] = 1
    return ids, mask


def _eos_ids(model) -> tuple[int, ...]:
    ids = set(model.config.text.eos_token_ids)
    tok = model.tokenizer
    if tok is not None and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return tuple(sorted(ids))


def generate(model, prompts, max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             min_p: float = 0.0, stop: list[str] | None = None, seed: int = 0, lora=None,
             eos_token_ids: tuple[int, ...] | None = None, processor=None) -> Generation:
    """Generates for image+text prompts.

    prompts: a list of chat `messages` (content items {"type": "image", "image": ...} / {"type": "text",
    "text": ...}), or one dict {"input_ids": [[...]], "pixel_values", "image_grid_thw"} of already
    expanded token ids (what `VisionCollator.prompts` returns). temperature 0 is greedy.
    """
    if isinstance(prompts, dict):
        encoded = prompts
    else:
        from jft.vlm.collator import VisionCollator

        encoded = VisionCollator(model, processor=processor).prompts(prompts)
    pad = int(model.tokenizer.pad_token_id) if model.tokenizer is not None and model.tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad_batch([list(map(int, s)) for s in encoded["input_ids"]], pad)
    batch = make_batch(model.config, ids, mask, encoded.get("pixel_values"), encoded.get("image_grid_thw"))
    eos = tuple(eos_token_ids) if eos_token_ids is not None else _eos_ids(model)
    out, lengths = generate_ids(model.config, model.params, lora, {k: v for k, v in batch.items() if k in _BATCH_KEYS},
                                jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=float(temperature),
                                top_k=int(top_k), top_p=float(top_p), min_p=float(min_p), eos_ids=eos, pad_id=pad)
    new_ids = []
    for row, n in zip(np.asarray(out), np.asarray(lengths)):
        toks = row[:n].tolist()
        if toks and toks[-1] in eos:
            toks = toks[:-1]
        new_ids.append(toks)
    texts = [model.tokenizer.decode(t, skip_special_tokens=True) if model.tokenizer is not None else "" for t in new_ids]
    if stop:
        texts = [_cut_at_stop(t, stop) for t in texts]
    return Generation(texts, new_ids)
