"""Rollout engines: `generate(prompts, n, sampling) -> Completions` and `sync(params, lora)`.

`JaxEngine` samples on the training params pytree itself (no copy) with the LoRA applied. It keeps
`slots` sequences in flight in a preallocated fixed-slot KV cache (one row of prompt + max_tokens
slots per sequence). The first `slots` requests are prefilled together; when a row finishes (stop
token or max_tokens) the next request takes its slot at once: its cache row is cleared (segment
ids reset, so stale keys are invisible) and its prompt is fed through the decode step one token per
step while the other rows keep decoding (continuous refill, no batch-wide prefill stall).

Each request's random stream is `fold_in(fold_in(key(seed), request), token_index)`, so a
completion does not depend on which slot served it or on what else was in the batch.

Log-probs come back in two flavours, explicitly:
  logprobs        of the distribution actually sampled from: log_softmax(filter(logits / T)),
                  filter = top-k / top-p / min-p (what an importance-sampling correction needs);
  model_logprobs  log_softmax(logits / T) without filtering: what the GRPO loss recomputes.
Both equal log_softmax(logits) at temperature 1 without filters; under greedy decoding (T = 0) both
are the raw model log-probs log_softmax(logits). (vLLM and TRL return raw model log-probs,
log_softmax(logits), by default.)

Quantized weights (NF4, FP8) are dequantized once per `generate` call, inside the rollout program,
when the dense copy fits (`dequantize="auto"`: the compiled rollout needs at most
`generate.DEQUANTIZE_SHARE`, half, of the free device memory; never on CPU, which reports none). A
decoding step is bound by reading the weights, and without the dense copy every step dequantizes
each layer again before its matmul (or, at one or two rows, multiplies the packed NF4 weights in one
fused kernel: `jft.kernels.nf4.nf4_matmul`).

A longrope model (Phi-3) takes its factor set per sequence, as that sequence would alone: short
within the original context; the step at which a sequence first reaches past it recomputes that
slot's cache row with the long factors (transformers' Phi-3 does the same for one sequence).

Stop strings are matched on the host after generation: the completion is cut after the token that
completes a stop string (the string itself is removed from `text`), but the slot kept decoding
until a stop token or max_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft import quant
from jft.config import Config
from jft.model import no_tokenizer_error
from jft.nn import generate as gen
from jft.nn.transformer import forward_hidden, init_cache, logits_from_hidden, rope_per_row

_EMPTY_POSITION = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 is greedy; stop_token_ids None means the model's EOS ids."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"top_k must be >= 0 and min_p in [0, 1), got {self.top_k}, {self.min_p}")


@dataclasses.dataclass
class Completions:
    """n completions per prompt, grouped by prompt (prompt 0's n first). `ids` include the stop token."""

    prompt_ids: list[list[int]]
    ids: list[list[int]]
    text: list[str]
    logprobs: list[np.ndarray]
    model_logprobs: list[np.ndarray]
    finish_reason: list[str]  # "stop" (stop token or string) or "length"
    prompt_index: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(i) for i in self.ids], np.int32)

    def __len__(self) -> int:
        return len(self.ids)


class Engine(Protocol):
    def generate(self, prompts, n: int = 1, sampling: SamplingParams = SamplingParams()) -> Completions: ...

    def sync(self, params=None, lora=None) -> None: ...


# --- the jitted rollout ------------------------------------------------------------------------


def _left_align(prompts, lengths):
    """Right-padded [R, P] -> left-padded ids and 0/1 mask."""
    p = prompts.shape[1]
    shift = p - lengths[:, None]
    cols = jnp.arange(p)[None, :]
    ids = jnp.take_along_axis(prompts, jnp.clip(cols - shift, 0, p - 1), axis=1)
    mask = (cols >= shift).astype(jnp.int32)
    return jnp.where(mask == 1, ids, 0), mask


def _decode_rows(config: Config, params, lora, tokens, positions, segments, cache):
    """One token per slot through the decoder; cache["index"] holds each slot's own write index."""
    hidden, cache = forward_hidden(config, params, tokens[:, None], positions[:, None], segments[:, None], lora=lora,
                                   cache=cache, rope=rope_per_row(config, positions[:, None]))
    return logits_from_hidden(config, params, hidden, lora)[:, 0], cache


def _recompute_crossing_rows(config: Config, params, lora, prompts, prompt_lengths, out_ids, slot_req, crossing, logits,
                             cache):
    """Longrope: each slot in `crossing` has just fed the first token past the original context;
    its sequence so far is run again whole, with the long factors, into a fresh cache row, and that
    row's logits replace the step's. Returns (logits, cache)."""
    n = config.rope.original_max_position_embeddings + 1  # tokens of the sequence so far
    length = cache["positions"].shape[1]
    cols = jnp.arange(length, dtype=jnp.int32)
    seen = cols < n

    def recompute(slot, logits, cache):
        req, plen = slot_req[slot], prompt_lengths[slot_req[slot]]
        ids = jnp.where(cols < plen, prompts[req, jnp.minimum(cols, prompts.shape[1] - 1)],
                        out_ids[req, jnp.clip(cols - plen, 0, out_ids.shape[1] - 1)])
        row = init_cache(config, 1, length, cache["k"].dtype)
        hidden, row = forward_hidden(config, params, ids[None], cols[None], seen[None].astype(jnp.int32), lora=lora,
                                     cache=row)
        row_logits = logits_from_hidden(config, params, hidden[:, n - 1 : n], lora)[0, 0]
        return logits.at[slot].set(row_logits), {
            "k": cache["k"].at[:, slot].set(row["k"][:, 0]), "v": cache["v"].at[:, slot].set(row["v"][:, 0]),
            "positions": cache["positions"].at[slot].set(jnp.where(seen, cols, _EMPTY_POSITION)),
            "segments": cache["segments"].at[slot].set(jnp.where(seen, 1, -1)),
            "index": cache["index"].at[slot].set(n)}

    def visit(slot, carry):
        return jax.lax.cond(crossing[slot], lambda: recompute(slot, *carry), lambda: carry)

    return jax.lax.fori_loop(0, crossing.shape[0], visit, (logits, cache))


def _pick(logits, keys, temperature, top_k, top_p, min_p):
    """Tokens [S] and their (sampling, model) log-probs from fp32 logits [S, V] with per-row keys."""
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=1)[:, 0]
        return token, lp, lp
    scaled = logits / temperature
    filtered = gen.filter_logits(scaled, top_k=top_k, top_p=top_p, min_p=min_p)
    token = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, filtered).astype(jnp.int32)
    sampled_lp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), token[:, None], axis=1)[:, 0]
    model_lp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=1)[:, 0]
    return token, sampled_lp, model_lp


@functools.partial(jax.jit, static_argnames=("config", "slots", "max_tokens", "temperature", "top_k", "top_p", "min_p",
                                             "stop_ids", "pad_id", "dequantize"))
def rollout(config: Config, params, lora, prompts, prompt_lengths, key, *, slots: int, max_tokens: int,
            temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, stop_ids: tuple[int, ...] = (),
            pad_id: int = 0, dequantize: bool = False):
    """Right-padded prompts [R, P] (lengths [R]) -> (tokens [R, N], sampling logprobs [R, N], model logprobs [R, N],
    lengths [R]); entries past a row's length are pad_id / 0. Lengths include the stop token. With `dequantize`,
    quantized weights are made dense (in the embedding's dtype) once, before the first step."""
    r, p = prompts.shape
    s = min(slots, r)
    dtype = params["embed"].dtype
    if dequantize:
        params = quant.dequantize_tree(params, dtype)
    stop = jnp.asarray(stop_ids or (-1,), jnp.int32)
    out_ids = jnp.full((r, max_tokens), pad_id, jnp.int32)
    out_lp = jnp.zeros((r, max_tokens), jnp.float32)
    out_mlp = jnp.zeros((r, max_tokens), jnp.float32)
    out_len = jnp.zeros((r,), jnp.int32)

    # batched prefill of the first s requests into a cache of s rows of p + max_tokens slots
    first_ids, first_mask = _left_align(prompts[:s], prompt_lengths[:s])
    positions = jnp.maximum(jnp.cumsum(first_mask, axis=1) - 1, 0)
    cache = init_cache(config, s, p + max_tokens, dtype)
    hidden, cache = forward_hidden(config, params, first_ids, positions, first_mask, lora=lora, cache=cache,
                                   rope=rope_per_row(config, positions))
    logits = logits_from_hidden(config, params, hidden[:, -1:], lora)[:, 0]
    cache = {**cache, "index": jnp.full((s,), p, jnp.int32)}
    crosses = config.rope.kind == "longrope" and p + max_tokens > config.rope.original_max_position_embeddings

    slot_req = jnp.arange(s, dtype=jnp.int32)
    slot_cursor = prompt_lengths[:s]  # prompt tokens already in the cache
    slot_gen = jnp.zeros((s,), jnp.int32)  # tokens emitted for the current request

    def keys_for(req, gen_index):
        return jax.vmap(lambda q, g: jax.random.fold_in(jax.random.fold_in(key, q), g))(req, gen_index)

    def emit(state, logits, emitting):
        """Samples for slots that are past their prompt, records the token, and refills finished slots."""
        cache, slot_req, slot_cursor, slot_gen, next_req, out_ids, out_lp, out_mlp, out_len, finished = state
        token, lp, mlp = _pick(logits, keys_for(jnp.maximum(slot_req, 0), slot_gen), temperature, top_k, top_p, min_p)
        row = jnp.where(emitting, slot_req, r)  # r is out of bounds: the write is dropped
        out_ids = out_ids.at[row, slot_gen].set(token, mode="drop")
        out_lp = out_lp.at[row, slot_gen].set(lp, mode="drop")
        out_mlp = out_mlp.at[row, slot_gen].set(mlp, mode="drop")
        slot_gen = slot_gen + emitting.astype(jnp.int32)
        done = emitting & (jnp.isin(token, stop) | (slot_gen >= max_tokens))
        out_len = out_len.at[jnp.where(done, slot_req, r)].set(slot_gen, mode="drop")
        finished = finished + jnp.sum(done)
        # refill: finished slots take the next requests in order
        new_req = next_req + jnp.cumsum(done) - 1
        refill = done & (new_req < r)
        slot_req = jnp.where(done, jnp.where(refill, new_req, -1), slot_req)
        next_req = next_req + jnp.sum(done)
        slot_cursor = jnp.where(done, 0, slot_cursor)
        slot_gen = jnp.where(done, 0, slot_gen)
        cache = {**cache,
                 "segments": jnp.where(done[:, None], -1, cache["segments"]),
                 "positions": jnp.where(done[:, None], _EMPTY_POSITION, cache["positions"]),
                 "index": jnp.where(done, 0, cache["index"])}
        return cache, slot_req, slot_cursor, slot_gen, next_req, out_ids, out_lp, out_mlp, out_len, finished

    state = (cache, slot_req, slot_cursor, slot_gen, jnp.asarray(s, jnp.int32), out_ids, out_lp, out_mlp, out_len,
             jnp.zeros((), jnp.int32))
    state = emit(state, logits, jnp.ones((s,), bool))

    def cond(state):
        return state[-1] < r

    def step(state):
        cache, slot_req, slot_cursor, slot_gen, next_req, out_ids, out_lp, out_mlp, out_len, finished = state
        active = slot_req >= 0
        req = jnp.maximum(slot_req, 0)
        plen = prompt_lengths[req]
        in_prompt = slot_cursor < plen
        prompt_tok = prompts[req, jnp.minimum(slot_cursor, p - 1)]
        last_tok = out_ids[req, jnp.maximum(slot_gen - 1, 0)]
        tokens = jnp.where(in_prompt, prompt_tok, last_tok)
        positions = jnp.where(in_prompt, slot_cursor, plen + slot_gen - 1)
        segments = active.astype(jnp.int32)
        old_index = cache["index"]
        logits, cache = _decode_rows(config, params, lora, tokens, positions, segments, cache)
        cache = {**cache, "index": jnp.where(active, cache["index"], old_index)}
        if crosses:
            crossing = active & (positions == config.rope.original_max_position_embeddings)
            logits, cache = jax.lax.cond(
                jnp.any(crossing),
                lambda: _recompute_crossing_rows(config, params, lora, prompts, prompt_lengths, out_ids, slot_req,
                                                 crossing, logits, cache),
                lambda: (logits, cache))
        slot_cursor = slot_cursor + (active & in_prompt).astype(jnp.int32)
        emitting = active & (slot_cursor >= plen)  # the last prompt token or a generated one was fed
        state = (cache, slot_req, slot_cursor, slot_gen, next_req, out_ids, out_lp, out_mlp, out_len, finished)
        return emit(state, logits, emitting)

    state = jax.lax.while_loop(cond, step, state)
    _, _, _, _, _, out_ids, out_lp, out_mlp, out_len, _ = state
    return out_ids, out_lp, out_mlp, out_len


# --- host side ---------------------------------------------------------------------------------


def _tokenize(model, prompts) -> list[list[int]]:
    tokenizer = model.tokenizer
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise no_tokenizer_error(model, "pass token ids instead of strings")
            bos = getattr(tokenizer, "bos_token", None)
            out.append(tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"])
        else:
            out.append([int(t) for t in prompt])
    if any(len(p) == 0 for p in out):
        raise ValueError("every prompt must have at least one token")
    return out


def _first_stop(text: str, stop: Sequence[str]) -> int:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else -1


def _cut_at_stop_string(tokenizer, ids: list[int], stop: Sequence[str]) -> int | None:
    """The number of tokens up to and including the one that completes the first stop string, or None."""
    if not stop or tokenizer is None or _first_stop(tokenizer.decode(ids, skip_special_tokens=True), stop) < 0:
        return None
    lo, hi = 1, len(ids)  # smallest prefix whose text contains a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(tokenizer.decode(ids[:mid], skip_special_tokens=True), stop) >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo


class JaxEngine:
    """Batched sampling with continuous refill on the training params (see the module docstring)."""

    def __init__(self, model, lora=None, *, slots: int = 64, max_prompt_length: int | None = None,
                 dequantize: bool | str = "auto"):
        """dequantize: True / False, or "auto" (when the dense copy fits; see the module docstring).
        After each `generate`, `self.dequantized` says whether that call made quantized weights dense."""
        from jft.model import eos_token_ids_of, pad_token_id_of

        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if dequantize not in (True, False, "auto"):
            raise ValueError(f'dequantize must be True, False or "auto", got {dequantize!r}')
        self.model, self.config, self.tokenizer = model, model.config, model.tokenizer
        self.params, self.lora = model.params, lora
        self.slots, self.max_prompt_length, self.dequantize = slots, max_prompt_length, dequantize
        self.eos_ids, self.pad_id = eos_token_ids_of(model), pad_token_id_of(model)
        self.dequantized = False

    def sync(self, params=None, lora=None) -> None:
        """Points the engine at the current policy (a reference, not a copy)."""
        if params is not None:
            self.params = params
        self.lora = lora

    def generate(self, prompts, n: int = 1, sampling: SamplingParams = SamplingParams()) -> Completions:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompt_ids = _tokenize(self.model, prompts)
        if self.max_prompt_length:
            prompt_ids = [p[-self.max_prompt_length :] for p in prompt_ids]  # keep the end, as TRL does
        requests = [p for p in prompt_ids for _ in range(n)]
        width = gen.bucket(max(len(p) for p in requests))
        padded = np.full((len(requests), width), self.pad_id, np.int32)
        for i, p in enumerate(requests):
            padded[i, : len(p)] = p
        lengths = np.asarray([len(p) for p in requests], np.int32)
        stop_ids = self.eos_ids if sampling.stop_token_ids is None else tuple(sampling.stop_token_ids)
        args = (self.config, self.params, self.lora, jnp.asarray(padded), jnp.asarray(lengths),
                jax.random.key(sampling.seed))
        options = dict(slots=self.slots, max_tokens=sampling.max_tokens, temperature=float(sampling.temperature),
                       top_k=int(sampling.top_k), top_p=float(sampling.top_p), min_p=float(sampling.min_p),
                       stop_ids=tuple(sorted(set(int(i) for i in stop_ids))), pad_id=self.pad_id)
        self.dequantized = self._dequantizes(args, options)
        ids, lp, mlp, out_len = rollout(*args, **options, dequantize=self.dequantized)
        return self._assemble(requests, n, np.asarray(ids), np.asarray(lp), np.asarray(mlp), np.asarray(out_len),
                              stop_ids, sampling.stop)

    def _dequantizes(self, args, options) -> bool:
        if self.dequantize == "auto":
            return gen.dense_once_fits(rollout, args, options)
        return self.dequantize and quant.has_quantized(self.params)

    def _assemble(self, requests, n, ids, lp, mlp, out_len, stop_ids, stop) -> Completions:
        outs, texts, lps, mlps, reasons = [], [], [], [], []
        for row, length in enumerate(out_len):
            toks = ids[row, :length].tolist()
            reason = "stop" if toks and toks[-1] in stop_ids else "length"
            cut = _cut_at_stop_string(self.tokenizer, toks, stop)
            if cut is not None:
                toks, reason = toks[:cut], "stop"
            shown = toks[:-1] if toks and toks[-1] in stop_ids else toks
            text = self.tokenizer.decode(shown, skip_special_tokens=True) if self.tokenizer is not None else ""
            if stop and _first_stop(text, stop) >= 0:
                text = text[: _first_stop(text, stop)]
            outs.append(toks)
            texts.append(text)
            lps.append(lp[row, : len(toks)].copy())
            mlps.append(mlp[row, : len(toks)].copy())
            reasons.append(reason)
        index = np.repeat(np.arange(len(requests) // n), n)
        return Completions(list(requests), outs, texts, lps, mlps, reasons, index)
