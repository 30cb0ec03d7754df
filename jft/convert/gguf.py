"""`save_gguf`: a jft model (plus an optional LoRA, merged on the fly) as a llama.cpp GGUF file.

Layer by layer, each weight is merged with its LoRA delta, laid out the way llama.cpp expects
(names, the llama-family Q/K row permutation, Gemma's +1 norms, Phi-3's fused tensors), quantized
with jft's own quantizers and streamed to disk; the whole model is never held twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jft.config import Config
from jft.convert import gguf_quants as gq
from jft.convert.gguf_io import GGUFTensor, GGUFValueType as V, write_gguf
from jft.nn.layers import dense

ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",  # llama.cpp runs HF Mistral as llama (no sliding window)
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
_LLAMA_FAMILY = ("llama", "mistral")  # HF rotates halves; llama.cpp's llama arch rotates pairs


class GGUFExportError(ValueError):
    """A model, tokenizer or option save_gguf cannot write."""


# --------------------------------------------------------------------------- weights


def permute_rows_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF split-half rotary rows -> llama.cpp adjacent pairs: in each head, row 2j <- j, 2j+1 <- j + d/2."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_attention_scale(config: Config) -> float:
    """The query scale llama.cpp's graph applies for this architecture."""
    return 1.0 / math.sqrt(config.head_dim)


def _query_fold(config: Config) -> float:
    """Factor folded into the query path so llama.cpp's fixed scale gives the model's own scale."""
    if config.model_type not in ("gemma2", "gemma3_text"):
        return 1.0
    return config.attention_scale / _llama_attention_scale(config)


class _Weights:
    """Host float32 weights of one layer at a time, LoRA merged in."""

    def __init__(self, params: dict, lora, num_layers: int):
        self.params, self.lora, self.num_layers = params, lora, num_layers

    def top(self, name: str) -> np.ndarray:
        if self.lora is not None and name in self.lora.weights:
            return np.asarray(self.lora.weights[name], np.float32)
        return np.asarray(jax.device_get(dense(self.params[name], jnp.float32)))

    def layer(self, name: str, i: int) -> np.ndarray:
        leaf = jax.tree.map(lambda a: a[i], self.params["layers"][name])
        w = np.asarray(jax.device_get(dense(leaf, jnp.float32)))
        if self.lora is not None and name in self.lora.weights.get("layers", {}):
            ab = self.lora.weights["layers"][name]
            if self.lora.config.layer_mask(self.num_layers)[i]:
                b = np.asarray(ab["b"][i], np.float32)
                a = np.asarray(ab["a"][i], np.float32)
                if w.shape != (b.shape[0], a.shape[1]):
                    raise GGUFExportError(f"LoRA for {name} has shape {(b.shape[0], a.shape[1])}, base weight {w.shape}")
                w = w + (b @ a) * np.float32(self.lora.config.scaling(name))
        return w


def _gguf_tensors(config: Config, weights: _Weights) -> Iterator[tuple[str, int | None, Callable[[], np.ndarray], tuple]]:
    """(gguf name, layer, producer of the float32 array, shape) in llama.cpp's naming."""
    gemma = config.model_type.startswith("gemma")
    llama = config.model_type in _LLAMA_FAMILY
    fold = _query_fold(config)
    layers = weights.params["layers"]

    def shape_of(x) -> tuple[int, ...]:
        return tuple(int(s) for s in x.shape)

    def norm(fn):
        return (lambda: fn() + np.float32(1)) if gemma else fn

    yield "token_embd.weight", None, lambda: weights.top("embed"), shape_of(weights.params["embed"])
    for extra, values in _extra_tensors(config).items():
        yield f"{extra}.weight", None, lambda values=values: values, values.shape
    for i in range(config.num_layers):
        p = f"blk.{i}."

        def get(name, i=i):
            return lambda: weights.layer(name, i)

        def per_layer(name):
            return shape_of(layers[name])[1:]

        yield p + "attn_norm.weight", i, norm(get("attn_norm")), per_layer("attn_norm")
        if config.model_type == "phi3":
            qkv = (config.q_dim + 2 * config.kv_dim, config.hidden_size)
            yield p + "attn_qkv.weight", i, lambda i=i: np.concatenate(
                [weights.layer(n, i) for n in ("q", "k", "v")], axis=0), qkv
        else:
            q, k = get("q"), get("k")
            if llama:
                q = (lambda f: lambda: permute_rows_for_rope(f(), config.num_heads))(q)
                k = (lambda f: lambda: permute_rows_for_rope(f(), config.num_kv_heads))(k)
            if fold != 1.0 and not config.qk_norm:
                q = (lambda f: lambda: f() * np.float32(fold))(q)
            yield p + "attn_q.weight", i, q, per_layer("q")
            yield p + "attn_k.weight", i, k, per_layer("k")
            yield p + "attn_v.weight", i, get("v"), per_layer("v")
            for part in ("q", "k", "v"):
                if f"{part}_bias" in layers:
                    bias = get(f"{part}_bias")
                    if llama and part != "v":
                        heads = config.num_heads if part == "q" else config.num_kv_heads
                        bias = (lambda f, h: lambda: permute_rows_for_rope(f(), h))(bias, heads)
                    yield p + f"attn_{part}.bias", i, bias, per_layer(f"{part}_bias")
        yield p + "attn_output.weight", i, get("o"), per_layer("o")
        if "q_norm" in layers:
            q_norm = norm(get("q_norm"))
            if fold != 1.0:
                q_norm = (lambda f: lambda: f() * np.float32(fold))(q_norm)
            yield p + "attn_q_norm.weight", i, q_norm, per_layer("q_norm")
            yield p + "attn_k_norm.weight", i, norm(get("k_norm")), per_layer("k_norm")
        if config.sandwich_norm:
            yield p + "post_attention_norm.weight", i, norm(get("post_attn_norm")), per_layer("post_attn_norm")
        yield p + "ffn_norm.weight", i, norm(get("mlp_norm")), per_layer("mlp_norm")
        if config.model_type == "phi3":
            yield p + "ffn_up.weight", i, lambda i=i: np.concatenate(
                [weights.layer("gate", i), weights.layer("up", i)], axis=0), (2 * config.intermediate_size, config.hidden_size)
        else:
            yield p + "ffn_gate.weight", i, get("gate"), per_layer("gate")
            yield p + "ffn_up.weight", i, get("up"), per_layer("up")
        yield p + "ffn_down.weight", i, get("down"), per_layer("down")
        if config.sandwich_norm:
            yield p + "post_ffw_norm.weight", i, norm(get("post_mlp_norm")), per_layer("post_mlp_norm")
    yield "output_norm.weight", None, norm(lambda: weights.top("final_norm")), shape_of(weights.params["final_norm"])
    if "lm_head" in weights.params:
        yield "output.weight", None, lambda: weights.top("lm_head"), shape_of(weights.params["lm_head"])


def _llama3_rope_factors(config: Config) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for llama3 rope scaling (its rope_freqs tensor)."""
    r, dim = config.rope, config.rotary_dims
    freqs = 1.0 / (r.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / r.factor + smooth)
    factors = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, r.factor, mid))
    return factors.astype(np.float32)


def _extra_tensors(config: Config) -> dict[str, np.ndarray]:
    """Model-wide rope tensors: llama3's frequency divisors, or longrope's two sets (llama.cpp picks
    one by its context size: long when n_ctx exceeds rope.scaling.original_context_length)."""
    if config.rope.kind == "llama3":
        return {"rope_freqs": _llama3_rope_factors(config)}
    if config.rope.kind == "longrope":
        return {"rope_factors_long": np.asarray(config.rope.long_factor, np.float32),
                "rope_factors_short": np.asarray(config.rope.short_factor, np.float32)}
    return {}


# --------------------------------------------------------------------------- metadata


def _model_kv(config: Config, method: gq.QuantMethod, name: str) -> list[tuple[str, int, object]]:
    arch = ARCHITECTURES[config.model_type]
    kv = [
        ("general.architecture", V.STRING, arch),
        ("general.name", V.STRING, name),
        ("general.file_type", V.UINT32, method.file_type),
        ("general.quantization_version", V.UINT32, 2),
        (f"{arch}.vocab_size", V.UINT32, config.vocab_size),
        (f"{arch}.context_length", V.UINT32, config.max_position_embeddings),
        (f"{arch}.embedding_length", V.UINT32, config.hidden_size),
        (f"{arch}.block_count", V.UINT32, config.num_layers),
        (f"{arch}.feed_forward_length", V.UINT32, config.intermediate_size),
        (f"{arch}.attention.head_count", V.UINT32, config.num_heads),
        (f"{arch}.attention.head_count_kv", V.UINT32, config.num_kv_heads),
        (f"{arch}.attention.key_length", V.UINT32, config.head_dim),
        (f"{arch}.attention.value_length", V.UINT32, config.head_dim),
        (f"{arch}.attention.layer_norm_rms_epsilon", V.FLOAT32, config.rms_norm_eps),
        (f"{arch}.rope.freq_base", V.FLOAT32, config.rope.theta),
        (f"{arch}.rope.dimension_count", V.UINT32, config.rotary_dims),
    ]
    if config.rope.kind == "linear":
        kv += [(f"{arch}.rope.scaling.type", V.STRING, "linear"), (f"{arch}.rope.scaling.factor", V.FLOAT32, config.rope.factor)]
    if config.rope.kind == "yarn":
        kv += [(f"{arch}.rope.scaling.type", V.STRING, "yarn"), (f"{arch}.rope.scaling.factor", V.FLOAT32, config.rope.factor),
               (f"{arch}.rope.scaling.original_context_length", V.UINT32, config.rope.original_max_position_embeddings)]
    if config.rope.kind == "longrope":
        kv += [(f"{arch}.rope.scaling.attn_factor", V.FLOAT32, config.rope.attention_factor),
               (f"{arch}.rope.scaling.original_context_length", V.UINT32, config.rope.original_max_position_embeddings)]
    if config.model_type in ("gemma2", "gemma3_text"):
        if config.attn_logit_softcap:
            kv.append((f"{arch}.attn_logit_softcapping", V.FLOAT32, config.attn_logit_softcap))
        if config.final_logit_softcap:
            kv.append((f"{arch}.final_logit_softcapping", V.FLOAT32, config.final_logit_softcap))
        if config.sliding_window:
            kv.append((f"{arch}.attention.sliding_window", V.UINT32, config.sliding_window))
            kv.append((f"{arch}.attention.sliding_window_pattern", V.ARRAY, (V.BOOL, list(config.sliding_layers))))
        if config.local_rope is not None:
            kv.append((f"{arch}.rope.freq_base_swa", V.FLOAT32, config.local_rope.theta))
    return kv


def _check_supported(config: Config) -> None:
    if config.model_type not in ARCHITECTURES:
        raise GGUFExportError(f"GGUF export supports {', '.join(ARCHITECTURES)}; got {config.model_type!r}")
    if config.local_rope is not None and config.local_rope.kind != "default":
        raise GGUFExportError("llama.cpp has no rope scaling for gemma3's sliding layers")
    if config.rope.kind == "longrope" and config.model_type != "phi3":
        raise GGUFExportError(f"llama.cpp reads longrope factors for phi3 only, not {config.model_type}")
    if config.rope.kind == "yarn" and _yarn_beyond_llama_cpp(config.rope):
        raise GGUFExportError("llama.cpp's yarn for this architecture has fixed settings (beta_fast 32, beta_slow 1, "
                              "truncated ramp, attention factor 1 + 0.1 ln(factor)); this config changes them")
    if config.o_bias:
        raise GGUFExportError("attention output bias is not supported in GGUF export")


def _yarn_beyond_llama_cpp(rope) -> bool:
    return (rope.beta_fast, rope.beta_slow, rope.truncate) != (32.0, 1.0, True) or not math.isclose(
        rope.attention_factor, 1 + 0.1 * math.log(rope.factor) if rope.factor > 1 else 1.0, rel_tol=1e-6)


# --------------------------------------------------------------------------- tokenizer

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_PRE_TOKENIZERS = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}


def _bytes_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">")


def tokenizer_kv(tokenizer, config: Config) -> list[tuple[str, int, object]]:
    """Vocabulary metadata from an HF fast tokenizer (its tokenizer.json)."""
    if tokenizer is None:
        raise GGUFExportError("the model has no tokenizer; llama.cpp needs one (load the model with its tokenizer)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} is not supported (BPE only)")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for tid, t in added.items():
        vocab[t["content"]] = tid
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, tid in vocab.items():
        tokens[tid] = text
        types[tid] = NORMAL
    byte_fallback = bool(model.get("byte_fallback"))
    for tid, t in added.items():
        types[tid] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv: list[tuple[str, int, object]] = []
    if byte_fallback:  # SentencePiece-style vocabulary: llama.cpp's "llama" tokenizer
        rank = {m.replace(" ", ""): r for r, m in enumerate(merges)}
        scores = [-float(rank.get(t, 0)) for t in tokens]
        for tid, text in enumerate(tokens):
            if _bytes_token(text) and types[tid] == NORMAL:
                types[tid] = BYTE
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = UNKNOWN
        kv += [("tokenizer.ggml.model", V.STRING, "llama"), ("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, scores))]
    else:
        pre = _PRE_TOKENIZERS.get(config.model_type, "default")
        kv += [("tokenizer.ggml.model", V.STRING, "gpt2"), ("tokenizer.ggml.pre", V.STRING, pre),
               ("tokenizer.ggml.merges", V.ARRAY, (V.STRING, merges))]
    kv += [("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, tokens)), ("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, types))]
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is None and role == "bos":
            tid = config.bos_token_id
        if tid is None and role == "eos" and config.eos_token_ids:
            tid = config.eos_token_ids[0]
        if tid is not None:
            key = "padding" if role == "pad" else role
            kv.append((f"tokenizer.ggml.{key}_token_id", V.UINT32, int(tid)))
    for role in ("bos", "eos"):
        flag = getattr(tokenizer, f"add_{role}_token", None)
        if flag is not None:
            kv.append((f"tokenizer.ggml.add_{role}_token", V.BOOL, bool(flag)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        kv.append(("tokenizer.chat_template", V.STRING, template))
    return kv


# --------------------------------------------------------------------------- Ollama

_OLLAMA_TEMPLATES = {
    "llama3": ("<|start_header_id|>",
               "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
               ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]),
    "chatml": ("<|im_start|>",
               "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
               ["<|im_start|>", "<|im_end|>"]),
    "gemma": ("<start_of_turn>",
              "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
              "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
              ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ("<|assistant|>",
             "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
             "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>\n",
             ["<|end|>", "<|user|>", "<|assistant|>"]),
    "mistral": ("[INST]",
                "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}</s>",
                ["[INST]", "[/INST]", "</s>"]),
}


def modelfile_text(gguf_name: str, chat_template: str | None, system: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF next to it; TEMPLATE picked from the chat template's markers."""
    lines = [f"FROM ./{gguf_name}"]
    for marker, template, stops in _OLLAMA_TEMPLATES.values():
        if chat_template and marker in chat_template:
            lines.append(f'TEMPLATE """{template}"""')
            lines += [f'PARAMETER stop "{s}"' for s in stops]
            break
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point


def _output_paths(path: str, methods: Sequence[gq.QuantMethod]) -> list[str]:
    if len(methods) == 1:
        return [path]
    stem = path[:-5] if path.endswith(".gguf") else path
    return [f"{stem}.{m.name.upper()}.gguf" for m in methods]


def save_gguf(model, lora, path, quant: str | Sequence[str] = "f16", *, modelfile: bool = True,
              system_prompt: str | None = None, progress: bool = True) -> list[str]:
    """Write `model` (with `lora` merged, if given) as GGUF file(s); returns the paths written.

    `quant` is a method name or a list of them (see `gguf_quants.resolve_quant_method`); with a
    list, each file is named `<stem>.<METHOD>.gguf`. An Ollama `Modelfile` is written beside the
    (first) file unless `modelfile=False`.
    """
    config: Config = model.config
    _check_supported(config)
    if model.tokenizer is None:
        from jft.model import no_tokenizer_error

        raise GGUFExportError(f"{no_tokenizer_error(model)} (a GGUF file carries the tokenizer)")
    names = [quant] if isinstance(quant, str) else list(quant)
    if not names:
        raise GGUFExportError("no quantization method given")
    methods = list(dict.fromkeys(gq.resolve_quant_method(n) for n in names))  # a name given twice is one file
    path = os.fspath(path)
    tok_kv = tokenizer_kv(model.tokenizer, config)
    weights = _Weights(model.params, lora, config.num_layers)
    tied = "lm_head" not in model.params
    name = os.path.basename(os.path.normpath(model.path)) if getattr(model, "path", None) else "jft-model"
    outputs = _output_paths(path, methods)
    for method, out in zip(methods, outputs):
        tensors = []
        for gname, layer, produce, shape in _gguf_tensors(config, weights):
            qtype = gq.QUANT_TYPES[gq.tensor_type(gname, layer, config.num_layers, method, shape=shape,
                                                  n_gqa=config.num_heads // config.num_kv_heads, tied_embeddings=tied)]
            tensors.append(GGUFTensor(gname, (lambda f=produce, q=qtype: q.quantize(f())), q_id(qtype), shape))
        write_gguf(out, _model_kv(config, method, name) + tok_kv, tensors, progress=progress)
    if modelfile:
        template = getattr(model.tokenizer, "chat_template", None)
        text = modelfile_text(os.path.basename(outputs[0]), template if isinstance(template, str) else None, system_prompt)
        target = os.path.join(os.path.dirname(os.path.abspath(outputs[0])), "Modelfile")
        tmp = target + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    return outputs


def q_id(qtype: gq.QuantType) -> int:
    return qtype.type_id
