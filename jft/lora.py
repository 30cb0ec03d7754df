"""LoRA as a pytree: trainable A/B per targeted projection, stacked over layers like the base params.

`jax.grad` and optax only ever see a `LoRA`; the frozen base params (dense or quantized) are a
separate argument. `merge` folds the deltas into dense base weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jft.nn.layers import dense

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
_HF_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Static LoRA settings (hashable; part of the pytree's structure, not its leaves)."""

    r: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0
    use_rslora: bool = False
    layers: tuple[int, ...] | None = None  # None: every layer
    train_embeddings: bool = False

    def scaling(self, target: str | None = None) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def layer_mask(self, num_layers: int) -> np.ndarray:
        if self.layers is None:
            return np.ones(num_layers, np.float32)
        return np.isin(np.arange(num_layers), self.layers).astype(np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRA:
    """weights: {"layers": {target: {"a": [L, r, in], "b": [L, out, r]}}, optional "embed"/"lm_head"}."""

    weights: dict
    config: LoraConfig = dataclasses.field(metadata=dict(static=True))


def normalize_targets(targets) -> tuple[str, ...]:
    """Accepts "all-linear", jft names (q, k, ...) or HF module names (q_proj, ...)."""
    if targets == "all-linear":
        return TARGETS
    if isinstance(targets, str):
        targets = (targets,)
    out = []
    for t in targets:
        name = _HF_NAMES.get(t, t)
        if name not in TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; use 'all-linear' or some of {TARGETS} (or their HF *_proj names)")
        out.append(name)
    return tuple(sorted(set(out), key=TARGETS.index))


def _shape(w) -> tuple[int, ...]:
    return tuple(w.shape)


def init(model, r: int = 16, alpha: float = 16.0, targets=TARGETS, *, dropout: float = 0.0, use_rslora: bool = False,
         layers=None, train_embeddings: bool = False, key=None) -> LoRA:
    """PEFT's initialisation: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0; fp32."""
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(r=r, alpha=float(alpha), targets=normalize_targets(targets), dropout=float(dropout),
                        use_rslora=use_rslora, layers=None if layers is None else tuple(int(i) for i in layers),
                        train_embeddings=train_embeddings)
    key = jax.random.key(0) if key is None else key
    params = model.params
    weights = {"layers": {}}
    for target, k in zip(config.targets, jax.random.split(key, len(config.targets))):
        n_layers, out_dim, in_dim = _shape(params["layers"][target])
        bound = 1.0 / math.sqrt(in_dim)
        weights["layers"][target] = {
            "a": jax.random.uniform(k, (n_layers, r, in_dim), jnp.float32, -bound, bound),
            "b": jnp.zeros((n_layers, out_dim, r), jnp.float32),
        }
    if train_embeddings:
        weights["embed"] = dense(params["embed"], jnp.float32)
        if "lm_head" in params:
            weights["lm_head"] = dense(params["lm_head"], jnp.float32)
    return LoRA(weights, config)


def check_trains_something(lora: LoRA, num_layers: int) -> None:
    """Raises ValueError for a LoRA a trainer would run on without changing anything."""
    layers = bool(lora.weights["layers"]) and lora.config.layer_mask(num_layers).any()
    if layers or lora.weights.get("vision") or "embed" in lora.weights or "lm_head" in lora.weights:
        return
    if lora.weights["layers"]:
        raise ValueError(f"the LoRA's layers={lora.config.layers} select none of the model's {num_layers} layers "
                         f"(0 to {num_layers - 1}): training would change nothing")
    raise ValueError("the LoRA has no targets: training would change nothing. Make it with targets such as "
                     "'all-linear' or ['q', 'v']")


def delta(lora: LoRA, target: str, num_layers: int):
    """The dense update scale * B @ A for one target, [L, out, in] fp32 (masked layers are zero)."""
    w = lora.weights["layers"][target]
    mask = jnp.asarray(lora.config.layer_mask(num_layers))[:, None, None]
    return jnp.einsum("lor,lri->loi", w["b"], w["a"]) * lora.config.scaling(target) * mask


def merge_params(params: dict, lora: LoRA, dtype=None) -> dict:
    """Base params with the LoRA deltas added (quantized targets are dequantized): a dense copy."""
    layers = dict(params["layers"])
    for target in lora.weights["layers"]:
        base = layers[target]
        out_dtype = dtype or base.dtype
        merged = dense(base, jnp.float32) + delta(lora, target, base.shape[0])
        layers[target] = merged.astype(out_dtype)
    merged = {**params, "layers": layers}
    for name in ("embed", "lm_head"):
        if name in lora.weights:
            merged[name] = lora.weights[name].astype(dtype or params["embed"].dtype)
    return merged


def merge(model, lora: LoRA, dtype=None):
    """A new `jft.Model` whose params have the LoRA merged in."""
    return dataclasses.replace(model, params=merge_params(model.params, lora, dtype))


def num_trainable(lora: LoRA) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))
