"""Generation for image+text prompts: one prefill with the image features, then a jitted KV-cache
decode loop. A new token's M-RoPE position is its sequence position plus the row's rope delta (the
same on all three axes), as in transformers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jft import quant
from jft.memory import explain_out_of_memory
from jft.model import Generation, decode_outputs, eos_token_ids_of, generation_memory_advice, pad_token_id_of
from jft.nn.generate import SAMPLING_STATICS, decode, dense_once_fits, left_pad
from jft.nn.transformer import init_cache, logits_from_hidden
from jft.vlm.model import hidden_states, make_batch, mrope_tables

_BATCH_KEYS = ("input_ids", "positions", "segment_ids", "rope_positions", "rope_deltas", "pixel_values", "hw", "frame",
               "window")


@functools.partial(jax.jit, static_argnames=("config", "dequantize", *SAMPLING_STATICS))
def generate_ids(config, params, lora, batch, key, dequantize: bool = False, **sampling):
    """Left-padded batch (`make_batch`) -> (new tokens [B, N] padded after EOS, lengths [B]). With
    `dequantize`, quantized weights are made dense (in the embedding's dtype) first."""
    if dequantize:
        params = quant.dequantize_tree(params, params["embed"].dtype)
    b, t = batch["input_ids"].shape
    cache = init_cache(config.text, b, t + sampling["max_new_tokens"], params["embed"].dtype)
    hidden, cache = hidden_states(config, params, batch, lora=lora, cache=cache)
    last = logits_from_hidden(config.text, params, hidden[:, -1:], lora)[:, 0]
    deltas = batch["rope_deltas"]

    def rope_at(pos):
        return mrope_tables(config, jnp.broadcast_to((pos + deltas)[None, :, None], (3, b, 1)))

    return decode(config.text, params, lora, last, cache, batch["positions"][:, -1] + 1, key, rope_at=rope_at,
                  **sampling)


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
    pad = pad_token_id_of(model)
    ids, mask = left_pad([list(map(int, s)) for s in encoded["input_ids"]], pad)
    batch = make_batch(model.config, ids, mask, encoded.get("pixel_values"), encoded.get("image_grid_thw"))
    eos = tuple(eos_token_ids) if eos_token_ids is not None else eos_token_ids_of(model)
    advice = generation_memory_advice(model, len(ids), max_new_tokens) + "; smaller images (the processor's max_pixels)"
    args = (model.config, model.params, lora, {k: v for k, v in batch.items() if k in _BATCH_KEYS}, jax.random.key(seed))
    options = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   min_p=float(min_p), eos_ids=eos, pad_id=pad)
    with explain_out_of_memory("generation", advice):
        out, lengths = generate_ids(*args, **options, dequantize=dense_once_fits(generate_ids, args, options))
        return decode_outputs(model, out, lengths, eos, stop)
