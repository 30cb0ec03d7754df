"""The user-facing model handle and the functions that take it: load, forward, generate."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.config import Config, load_config, read_config_json, read_json
from jft.convert import hf
from jft.memory import explain_out_of_memory, quantize_option
from jft.nn import generate as gen
from jft.nn import transformer

_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclasses.dataclass
class Model:
    """A loaded model: static config, params pytree, tokenizer (or None), and where it came from."""

    config: Config
    params: dict
    tokenizer: Any = None
    path: str | None = None
    hf_config: dict = dataclasses.field(default_factory=dict)
    max_seq_length: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the params take (quantized leaves at their packed size)."""
        from jft.quant import param_bytes

        return param_bytes(self.params)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.model_type}, layers={c.num_layers}, hidden={c.hidden_size}, vocab={c.vocab_size}, "
                f"params={self.nbytes / 2**30:.2f} GiB, path={self.path!r})")


def resolve_path(path_or_id: str | os.PathLike) -> str:
    """A local model directory, downloading a hub id with huggingface_hub when it is not local."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        raise NotADirectoryError(f"{path} is a file, not a model directory: give the directory holding config.json "
                                "and the weights, or a hub id")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.startswith("."):
        raise FileNotFoundError(f"model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=_HUB_FILES)
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise OSError(f"could not get {path!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                      "If you are offline, pass a local directory instead.") from e


def _has_tokenizer_files(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def _load_tokenizer(path: str):
    if not _has_tokenizer_files(path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        for name in _TOKENIZER_JSON_FILES:  # transformers does not say which file is malformed
            if os.path.isfile(os.path.join(path, name)):
                read_json(os.path.join(path, name))
        raise


def load(path_or_id, *, dtype="bfloat16", quantize: str | None = None, max_seq_length: int | None = None,
         tokenizer: bool = True, progress: bool = True) -> Model:
    """Loads an HF checkpoint (local dir or hub id) into a `Model`.

    dtype: the dtype of dense params and of activations. quantize: None, "nf4" or "fp8" (frozen
    linear weights are quantized on load, tensor by tensor).
    """
    dtype = _float_dtype(dtype)
    path = resolve_path(path_or_id)
    raw, _ = read_config_json(path)
    if raw.get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        from jft import vlm

        return vlm.load(path, dtype=dtype, quantize=quantize, tokenizer=tokenizer, progress=progress)
    config, raw = load_config(path)
    quantizer = None
    if quantize is not None:
        from jft import quant

        if quantize not in quant.METHODS:
            raise ValueError(f"unknown quantize={quantize!r}; choose one of {quant.METHODS}")
        quantizer = functools.partial(quant.quantize, method=quantize, dtype=dtype)
    params = hf.load_params(path, config, dtype=dtype, quantize=quantizer,
                            quantization_config=raw.get("quantization_config"), progress=progress)
    tok = _load_tokenizer(path) if tokenizer else None
    return Model(config, params, tok, path, raw, max_seq_length)


def _float_dtype(dtype) -> jnp.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    return d


@functools.partial(jax.jit, static_argnames=("config", "attn_impl"))
def _forward(config, params, input_ids, positions, segment_ids, lora, attn_impl="xla"):
    return transformer.forward(config, params, input_ids, positions, segment_ids, lora=lora, attn_impl=attn_impl)


def forward(model: Model, input_ids, *, lora=None, positions=None, segment_ids=None, attention_mask=None):
    """Logits [B, T, V] (fp32). `attention_mask` (1 real / 0 pad) is a shortcut for padded batches:
    pads get segment 0 and positions count real tokens only, as transformers' generate does."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if attention_mask is not None:
        mask = jnp.asarray(attention_mask, jnp.int32)
        segment_ids = mask if segment_ids is None else segment_ids
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) if positions is None else positions
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids)
    return _forward(model.config, model.params, input_ids, jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32), lora)


@dataclasses.dataclass
class Generation:
    """What `generate` returns: decoded texts and the new token ids (EOS excluded), one per prompt."""

    text: list[str]
    ids: list[list[int]]


def eos_token_ids_of(model) -> tuple[int, ...]:
    """EOS ids from the config, the tokenizer and generation_config.json (any of them may list more)."""
    config = getattr(model.config, "text", model.config)
    ids = set(config.eos_token_ids)
    tok = model.tokenizer
    if tok is not None and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen_cfg = os.path.join(model.path or "", "generation_config.json")
    if model.path and os.path.isfile(gen_cfg):
        eos = read_json(gen_cfg).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return tuple(sorted(ids))


def pad_token_id_of(model) -> int:
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    config = getattr(model.config, "text", model.config)
    return int(config.pad_token_id) if config.pad_token_id is not None else 0


def no_tokenizer_error(model, instead: str | None = None) -> ValueError:
    """The error for a model without a tokenizer where one is needed: which files its directory lacks,
    and `instead` (what works without one), if anything."""
    alternative = f", or {instead}" if instead else ""
    if model.path and not _has_tokenizer_files(model.path):
        return ValueError(f"{model.path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): copy the tokenizer "
                          f"files of the model it comes from into that directory{alternative}")
    return ValueError(f"this model has no tokenizer: load it with one (jft.load(..., tokenizer=True)){alternative}")


def _as_token_lists(model: Model, prompts) -> list[list[int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if prompts and isinstance(prompts[0], str):
        if model.tokenizer is None:
            raise no_tokenizer_error(model, "pass token ids instead of strings")
        return [model.tokenizer(p)["input_ids"] for p in prompts]
    return [[int(t) for t in p] for p in prompts]


def generate(model: Model, prompts, max_new_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, stop: list[str] | None = None, seed: int = 0, lora=None,
             eos_token_ids: tuple[int, ...] | None = None) -> Generation:
    """Generates for a batch of prompts (strings or token-id lists). temperature 0 is greedy.

    Generation of a row ends at an EOS token; texts are also cut at the first `stop` string.
    For a vision-language model, prompts are chat messages with images (see `jft.vlm.generate`).
    """
    from jft.rl.engine import SamplingParams

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)  # checks them
    if hasattr(model.config, "vision"):
        from jft.vlm.generate import generate as generate_with_images

        return generate_with_images(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    min_p=min_p, stop=stop, seed=seed, lora=lora, eos_token_ids=eos_token_ids)
    seqs = _as_token_lists(model, prompts)
    _warn_past_context(model.config, max(map(len, seqs), default=0), max_new_tokens)
    pad = pad_token_id_of(model)
    ids, mask = gen.left_pad(seqs, pad)
    eos = tuple(eos_token_ids) if eos_token_ids is not None else eos_token_ids_of(model)
    args = (model.config, model.params, lora, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed))
    options = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   min_p=float(min_p), eos_ids=eos, pad_id=pad)
    with explain_out_of_memory("generation", generation_memory_advice(model, len(seqs), max_new_tokens)):
        dense = gen.dense_once_fits(gen.generate_ids, args, options)
        out, lengths = gen.generate_ids(*args, **options, dequantize=dense)
        return decode_outputs(model, out, lengths, eos, stop)


def generation_memory_advice(model, prompts: int, max_new_tokens: int) -> str:
    """The KV cache grows with prompts x (prompt length + max_new_tokens)."""
    options = [f"fewer prompts at once (now {prompts})", f"a smaller max_new_tokens (now {max_new_tokens})"]
    return "; ".join(options + quantize_option(model.params))


def _warn_past_context(config: Config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Positions past max_position_embeddings compute (rotary tables are made per position, the cache
    fits prompt + new tokens) as transformers does, but the model was not trained there."""
    context = config.max_position_embeddings
    if prompt_tokens + max_new_tokens > context:
        warnings.warn(f"the longest prompt ({prompt_tokens} tokens) plus max_new_tokens={max_new_tokens} goes past "
                      f"the model's context of {context} tokens (max_position_embeddings): text generated beyond it "
                      "is likely poor", stacklevel=3)


def decode_outputs(model, out, lengths, eos: tuple[int, ...], stop: list[str] | None) -> Generation:
    """Token arrays from the decode loop -> a `Generation` (EOS dropped, texts cut at stop strings)."""
    new_ids = []
    for row, n in zip(np.asarray(out), np.asarray(lengths)):
        toks = row[:n].tolist()
        if toks and toks[-1] in eos:
            toks = toks[:-1]
        new_ids.append(toks)
    tok = model.tokenizer
    texts = [tok.decode(t, skip_special_tokens=True) if tok is not None else "" for t in new_ids]
    if stop:
        texts = [_cut_at_stop(t, stop) for t in texts]
    return Generation(texts, new_ids)


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text
