"""GRPO's math as pure functions: group-normalised advantages and the clipped policy loss variants.

Shapes: rewards [B] grouped as B / G consecutive groups of G completions of one prompt; per-token
arrays [B, C] over completion tokens with a 0/1 `mask` (1 up to and including the stop token).

The loss variants differ only in how the masked per-token losses are reduced:

    grpo     mean over sequences of (sum over a sequence's tokens / its length)
    bnpo     sum over all tokens / number of tokens in this (micro-)batch
    dr_grpo  sum over all tokens / (number of sequences * max_completion_length)
    dapo     sum over all tokens / number of tokens in the whole generation batch (`num_items`),
             so gradient-accumulated micro-batches add up to one token-level mean
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
_STD_EPS = 1e-4


def group_advantages(rewards, num_generations: int, scale_rewards: str = "group"):
    """Reward minus its group's mean, divided by the group's (or batch's) unbiased std + 1e-4 unless 'none'.

    Returns (advantages [B], group std broadcast to [B]); a zero std marks a group that teaches nothing.
    """
    if scale_rewards is True:
        scale_rewards = "group"
    if scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"rewards must be [B] with B a multiple of num_generations={num_generations}, got {rewards.shape}")
    groups = rewards.reshape(-1, num_generations)
    mean = jnp.repeat(groups.mean(axis=1), num_generations)
    group_std = jnp.repeat(_unbiased_std(groups, axis=1), num_generations)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + _STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (_unbiased_std(rewards, axis=0) + _STD_EPS)
    return advantages, group_std


def _unbiased_std(x, axis):
    n = x.shape[axis]
    if n < 2:
        return jnp.zeros_like(jnp.mean(x, axis=axis))
    return jnp.std(x, axis=axis, ddof=1)


def k3_kl(logps, ref_logps):
    """Per-token estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 (Schulman's k3)."""
    d = ref_logps - logps
    return jnp.exp(d) - d - 1.0


def _masked_sum(x, mask):
    return jnp.sum(x * mask)


def policy_loss(logps, old_logps, advantages, mask, *, ref_logps=None, beta: float = 0.0, epsilon_low: float = 0.2,
                epsilon_high: float = 0.2, loss_type: str = "dapo", importance_sampling_level: str = "token",
                max_completion_length: int | None = None, num_items=None, delta: float | None = None):
    """The clipped surrogate loss (scalar) and its metrics.

    logps: log-probs of the sampled tokens under the current policy [B, C] (differentiated);
    old_logps: under the policy that sampled them (pass stop_gradient(logps) when on-policy);
    ref_logps: under the reference policy (needed when beta != 0); advantages [B]; mask [B, C].
    delta: optional upper bound on the unclipped ratio (two-sided clipping, INTELLECT-2).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}, got {importance_sampling_level!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the log-probs with the LoRA switched off)")
    mask = mask.astype(jnp.float32)
    lengths = jnp.maximum(mask.sum(axis=1), 1.0)
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":  # GSPO: one length-normalised ratio per sequence
        log_ratio = (jnp.sum(log_ratio * mask, axis=1) / lengths)[:, None]
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    if delta is not None:
        ratio = jnp.minimum(ratio, delta)
    adv = advantages[:, None]
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    per_token = jnp.broadcast_to(per_token, mask.shape)
    kl = None
    if beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token * mask, axis=1) / lengths)
    elif loss_type == "bnpo":
        loss = _masked_sum(per_token, mask) / jnp.maximum(mask.sum(), 1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = _masked_sum(per_token, mask) / (mask.shape[0] * max_completion_length)
    else:
        denom = mask.sum() if num_items is None else num_items
        loss = _masked_sum(per_token, mask) / jnp.maximum(denom, 1.0)

    metrics = _clip_metrics(jax.lax.stop_gradient(jnp.broadcast_to(jnp.exp(log_ratio), mask.shape)), adv, mask,
                            epsilon_low, epsilon_high)
    if kl is not None:
        metrics["kl"] = _masked_sum(jax.lax.stop_gradient(kl), mask) / jnp.maximum(mask.sum(), 1.0)
    return loss, metrics


def _clip_metrics(ratio, adv, mask, epsilon_low, epsilon_high):
    """Fractions of completion tokens whose ratio was clipped (and the clip was active for the advantage's sign)."""
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    n = jnp.maximum(mask.sum(), 1.0)
    return {"clip_low": _masked_sum(low, mask) / n, "clip_high": _masked_sum(high, mask) / n,
            "clip_fraction": _masked_sum(low | high, mask) / n}
