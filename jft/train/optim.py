"""AdamW over the LoRA pytree with schedules, gradient clipping and a separate embedding learning rate."""

from __future__ import annotations

import jax
import optax

_EMBEDDINGS = ("embed", "lm_head")


def schedule(lr: float, total_steps: int | None, *, kind: str = "linear", warmup_steps: int = 0):
    """Learning rate per step: linear warm-up, then linear or cosine decay to 0 (or constant)."""
    if kind == "constant" or total_steps is None:
        decay = optax.constant_schedule(lr)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1))
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
    else:
        raise ValueError(f"unknown schedule {kind!r}; use linear, cosine or constant")
    if not warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def _group(path) -> str:
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    return "embedding" if any(n in _EMBEDDINGS for n in names) else "lora"


def _decay_mask(tree):
    """Weight decay everywhere except norms and biases."""
    def decays(path, _):
        last = str(getattr(path[-1], "key", ""))
        return not (last.endswith("norm") or last.endswith("bias"))
    return jax.tree_util.tree_map_with_path(decays, tree)


def adamw(lr: float = 2e-4, *, total_steps: int | None = None, schedule_kind: str = "linear", warmup_steps: int = 0,
          weight_decay: float = 0.0, embedding_lr: float | None = None, max_grad_norm: float | None = 1.0,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW for a `LoRA`; trained embeddings/lm_head get `embedding_lr` (Unsloth's embedding_learning_rate)."""
    def make(rate):
        sched = schedule(rate, total_steps, kind=schedule_kind, warmup_steps=warmup_steps)
        return optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)

    groups = optax.multi_transform(
        {"lora": make(lr), "embedding": make(embedding_lr if embedding_lr is not None else lr)},
        lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: _group(p), tree))
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), groups) if max_grad_norm else groups
