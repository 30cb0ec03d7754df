"""PEFT LoRA adapters <-> `jft.lora.LoRA`.

On disk: adapter_config.json and adapter_model.safetensors with keys
`base_model.model.<HF module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
Phi-3 fuses q/k/v (and gate/up) into one projection, so its separate jft LoRAs are written as one
fused LoRA of rank (parts x r): A stacked, B block-diagonal, with `rank_pattern` / `alpha_pattern`
keeping each part's scaling exact. Reading a fused PEFT adapter splits B by rows and shares A.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jft.config import read_json
from jft.convert.hf import _fused_parts, layer_modules
from jft.convert.safetensors_io import CheckpointError, SafetensorsFile, atomic_write, save_file
from jft.lora import TARGETS, LoRA, LoraConfig

_PREFIX = "base_model.model.model.layers"
_FUSED_GROUPS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}
_MODULES_TO_SAVE = {"embed": "model.embed_tokens", "lm_head": "lm_head"}


def _module(config, target: str) -> str:
    return layer_modules(config)[target]


def _fused_module_of(config, target: str) -> str | None:
    if config.model_type != "phi3":
        return None
    return next((m for m, parts in _FUSED_GROUPS.items() if target in parts), None)


def _scaled_alpha(lc: LoraConfig, rank: int) -> float:
    """The alpha that gives rank `rank` the scaling lc.scaling()."""
    return lc.scaling() * (math.sqrt(rank) if lc.use_rslora else rank)


def adapter_tensors(model, lora: LoRA) -> tuple[dict[str, np.ndarray], dict]:
    """(PEFT tensors, extra config entries: target_modules, rank_pattern, alpha_pattern)."""
    config, lc = model.config, lora.config
    w = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), lora.weights)
    layers = lc.layers if lc.layers is not None else range(config.num_layers)
    tensors, modules, rank_pattern, alpha_pattern = {}, [], {}, {}
    done_fused = set()
    for target in lc.targets:
        fused = _fused_module_of(config, target)
        if fused is None:
            path = _module(config, target)
            modules.append(path.split(".")[-1])
            for i in layers:
                tensors[f"{_PREFIX}.{i}.{path}.lora_A.weight"] = w["layers"][target]["a"][i]
                tensors[f"{_PREFIX}.{i}.{path}.lora_B.weight"] = w["layers"][target]["b"][i]
            continue
        if fused in done_fused:
            continue
        done_fused.add(fused)
        parts = _FUSED_GROUPS[fused]
        missing = [p for p in parts if p not in lc.targets]
        if missing:
            raise ValueError(f"phi3 fuses {'/'.join(parts)} into {fused}: a PEFT adapter needs all of them as targets, missing {missing}")
        rank = lc.r * len(parts)
        modules.append(fused)
        parent = "self_attn" if fused == "qkv_proj" else "mlp"
        rank_pattern[fused] = rank
        alpha_pattern[fused] = _scaled_alpha(lc, rank)
        for i in layers:
            a = np.concatenate([w["layers"][p]["a"][i] for p in parts], axis=0)
            bs = [w["layers"][p]["b"][i] for p in parts]
            b = np.zeros((sum(x.shape[0] for x in bs), rank), np.float32)
            row = 0
            for j, x in enumerate(bs):
                b[row : row + x.shape[0], j * lc.r : (j + 1) * lc.r] = x
                row += x.shape[0]
            tensors[f"{_PREFIX}.{i}.{parent}.{fused}.lora_A.weight"] = a
            tensors[f"{_PREFIX}.{i}.{parent}.{fused}.lora_B.weight"] = b
    for name, module in _MODULES_TO_SAVE.items():
        if name in w:
            tensors[f"base_model.model.{module}.weight"] = w[name]
    return tensors, {"target_modules": sorted(set(modules)), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def adapter_config(model, lora: LoRA, extra: dict) -> dict:
    lc = lora.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lc.r,
        "lora_alpha": lc.alpha,
        "lora_dropout": lc.dropout,
        "target_modules": extra["target_modules"],
        "rank_pattern": extra["rank_pattern"],
        "alpha_pattern": extra["alpha_pattern"],
        "bias": "none",
        "use_rslora": lc.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": list(lc.layers) if lc.layers is not None else None,
        "modules_to_save": [m.split(".")[-1] for n, m in _MODULES_TO_SAVE.items() if n in lora.weights] or None,
        "base_model_name_or_path": (model.hf_config.get("_name_or_path") or model.path or ""),
        "inference_mode": True,
    }


def save_lora(model, lora: LoRA, directory) -> None:
    """Writes a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads."""
    tensors, extra = adapter_tensors(model, lora)
    cfg = adapter_config(model, lora, extra)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), {"format": "pt"})
    atomic_write(os.path.join(directory, "adapter_config.json"), lambda f: f.write(json.dumps(cfg, indent=2)), mode="w")


def _read_adapter_config(directory) -> dict:
    if os.path.isfile(directory):
        raise NotADirectoryError(f"{directory} is a file, not an adapter directory: give the directory holding "
                                 "adapter_config.json and adapter_model.safetensors")
    path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter_config.json in {directory}")
    cfg = read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if cfg.get(unsupported):
            raise ValueError(f"{path}: {unsupported}=true is not supported")
    return cfg


def _layer_and_module(key: str) -> tuple[int, str, str] | None:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'lora_A')."""
    parts = key.split(".")
    if "layers" not in parts or "lora_A" not in key and "lora_B" not in key:
        return None
    i = parts.index("layers")
    which = "lora_A" if "lora_A" in parts else "lora_B"
    return int(parts[i + 1]), parts[parts.index(which) - 1], which


def _layers_to_transform(cfg: dict) -> tuple[int, ...] | None:
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return None
    return tuple([layers] if isinstance(layers, int) else layers)


def load_lora(model, directory) -> LoRA:
    """Reads a PEFT adapter (saved by jft or by PEFT) into a `LoRA` for `model`."""
    cfg = _read_adapter_config(directory)
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter_model.safetensors in {directory} (jft reads safetensors adapters)")
    f = SafetensorsFile(path)
    config = model.config
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))

    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key in f.keys():
        parsed = _layer_and_module(key)
        if parsed is None:
            continue
        i, module, which = parsed
        found.setdefault(module, {}).setdefault(i, {})[which] = np.asarray(f[key], np.float32)

    by_hf = {_module(config, t).split(".")[-1]: t for t in TARGETS}
    shapes = {t: model.params["layers"][t].shape for t in TARGETS}
    parts: dict[str, list] = {}  # target -> [(layer, A, B, scaling)]
    for module, per_layer in found.items():
        rank = int(cfg.get("rank_pattern", {}).get(module, r))
        mod_alpha = float(cfg.get("alpha_pattern", {}).get(module, alpha))
        scaling = mod_alpha / (math.sqrt(rank) if rslora else rank)
        if module in _FUSED_GROUPS and config.model_type == "phi3":
            targets, rows = _FUSED_GROUPS[module], _fused_parts(config)
        elif module in by_hf:
            targets, rows = (by_hf[module],), None
        else:
            raise CheckpointError(f"{path}: adapter targets module {module!r}, which {config.model_type} does not have")
        for t in targets:
            n_layers, out_dim, in_dim = shapes[t]
            for i, ab in per_layer.items():
                if i >= n_layers:
                    raise CheckpointError(f"{path}: layer {i} of {module} but the model has {n_layers} layers")
                a = ab["lora_A"]
                b = ab["lora_B"] if rows is None else ab["lora_B"][rows[t][1] : rows[t][2]]
                if a.shape != (rank, in_dim) or b.shape != (out_dim, rank):
                    raise CheckpointError(f"{path}: {module} of layer {i} has A {a.shape} / B {b.shape}, "
                                          f"but the base model needs A {(rank, in_dim)} / B {(out_dim, rank)}")
                parts.setdefault(t, []).append((i, a, b, scaling))

    # Modules may differ in rank and scaling: zero-pad every A/B to the largest rank and fold each
    # module's scaling into its B, which leaves every B @ A (and so the model) unchanged.
    rank = max((a.shape[0] for entries in parts.values() for _, a, _, _ in entries), default=r)
    lc = LoraConfig(r=rank, alpha=alpha, use_rslora=rslora, targets=tuple(t for t in TARGETS if t in parts),
                    dropout=float(cfg.get("lora_dropout", 0.0)), layers=_layers_to_transform(cfg))
    weights = {}
    for t, entries in parts.items():
        n_layers, out_dim, in_dim = shapes[t]
        a_all = np.zeros((n_layers, rank, in_dim), np.float32)
        b_all = np.zeros((n_layers, out_dim, rank), np.float32)
        for i, a, b, scaling in entries:
            a_all[i, : a.shape[0]] = a
            b_all[i, :, : b.shape[1]] = b * (scaling / lc.scaling())
        weights[t] = {"a": jnp.asarray(a_all), "b": jnp.asarray(b_all)}
    out = {"layers": weights}
    for name, module in _MODULES_TO_SAVE.items():
        for key in (f"base_model.model.{module}.weight", f"base_model.model.{module}.modules_to_save.default.weight"):
            if key in f:
                out[name] = jnp.asarray(np.asarray(f[key], np.float32))
    if "embed" in out or "lm_head" in out:
        lc = dataclasses.replace(lc, train_embeddings=True)
    return LoRA(out, lc)
