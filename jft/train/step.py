"""The functional core of supervised fine-tuning: loss, gradients, one optimizer step.

A batch is a dict of int32 arrays [B, T]: input_ids, labels (input_ids with -100 where no loss is
taken; NOT shifted, the loss shifts), positions and segment_ids (0 = padding), and optionally
inputs_embeds [B, T, D]: the token embeddings, looked up before the step (then params need no
"embed"; see `SFT(offload_embedding=True)`). With gradient accumulation each array has a leading
micro-batch axis [k, B, T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jft import kernels
from jft.config import Config
from jft.nn.layers import dense
from jft.nn.transformer import REMAT_POLICIES, forward_hidden, output_weight  # noqa: F401
from jft.sharding import keep_replicated

IGNORE = -100
BATCH_KEYS = ("input_ids", "labels", "positions", "segment_ids", "inputs_embeds")


def next_token_labels(labels, segment_ids):
    """Targets for each position: the next token's label, or IGNORE at a row end or segment boundary."""
    nxt = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)
    return jnp.where(same & (segment_ids > 0), nxt, IGNORE)


def token_losses(config: Config, params, lora, batch, *, dropout_key=None, remat: str = "full", attn_impl: str = "xla"):
    """Per-token cross-entropy [B, T] (0 where ignored) and the target mask, via the fused lm_head+CE."""
    hidden, _ = forward_hidden(config, params, batch["input_ids"], batch["positions"], batch["segment_ids"], lora=lora,
                               dropout_key=dropout_key, remat=remat, attn_impl=attn_impl,
                               inputs_embeds=batch.get("inputs_embeds"))
    targets = next_token_labels(batch["labels"], batch["segment_ids"])
    b, t, d = hidden.shape
    weight = dense(output_weight(config, params, lora), hidden.dtype)
    loss, _ = kernels.linear_cross_entropy(hidden.reshape(b * t, d), weight, targets.reshape(-1),
                                           ignore_index=IGNORE, softcap=config.final_logit_softcap)
    return loss.reshape(b, t), targets != IGNORE


def _sum_loss(lora, config, params, batch, key, remat, attn_impl):
    losses, mask = token_losses(config, params, lora, batch, dropout_key=key, remat=remat, attn_impl=attn_impl)
    return jnp.sum(losses), jnp.sum(mask)


def loss_and_grads(config: Config, params, lora, batch, *, key=None, remat: str = "full", attn_impl: str = "xla"):
    """Token-mean loss and its gradient w.r.t. the LoRA, over k micro-batches (leading axis).

    Every micro-batch's summed loss is divided by the label-token count of ALL micro-batches, so k
    micro-batches give exactly the update of one batch with the same tokens.
    """
    grad_fn = jax.value_and_grad(_sum_loss, has_aux=True)
    total = jnp.sum(jax.vmap(lambda l, s: next_token_labels(l, s) != IGNORE)(batch["labels"], batch["segment_ids"]))
    keys = None if key is None else jax.random.split(key, batch["input_ids"].shape[0])

    def micro(carry, xs):
        grads, loss_sum = carry
        mb, k = xs
        (loss, _), g = grad_fn(lora, config, params, mb, k, remat, attn_impl)
        return (jax.tree.map(jnp.add, grads, g), loss_sum + loss), None

    zeros = jax.tree.map(jnp.zeros_like, lora)
    (grads, loss_sum), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (batch, keys))
    denom = jnp.maximum(total, 1).astype(jnp.float32)
    return loss_sum / denom, jax.tree.map(lambda g: g / denom, grads), total


def make_sft_step(config: Config, optimizer: optax.GradientTransformation, *, remat: str = "full", grad_accum: int = 1,
                  attn_impl: str = "xla", donate: bool = True):
    """A jitted `(params, lora, opt_state, batch, key=None) -> (lora, opt_state, metrics)`.

    With grad_accum > 1, [B, T] batches are split into grad_accum micro-batches of B / grad_accum rows
    (or pass arrays already shaped [grad_accum, b, T]).
    """

    def step(params, lora, opt_state, batch, key=None):
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in BATCH_KEYS}
        if batch["input_ids"].ndim == 2:
            b = batch["input_ids"].shape[0]
            if b % grad_accum:
                raise ValueError(f"batch size {b} is not divisible by grad_accum={grad_accum}")
            batch = {k: v.reshape(grad_accum, b // grad_accum, *v.shape[1:]) for k, v in batch.items()}
        loss, grads, tokens = loss_and_grads(config, params, lora, batch, key=key, remat=remat, attn_impl=attn_impl)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        lora, opt_state = keep_replicated((optax.apply_updates(lora, updates), opt_state))
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": optax.tree.norm(grads)}
        return lora, opt_state, metrics

    return jax.jit(step, donate_argnums=(1, 2) if donate else ())


def eval_loss(config: Config, params, lora, batch, attn_impl: str = "xla"):
    """(summed loss, label-token count) of one [B, T] batch, without dropout."""
    losses, mask = token_losses(config, params, lora, batch, remat="none", attn_impl=attn_impl)
    return jnp.sum(losses), jnp.sum(mask)
