"""Reinforcement learning: GRPO (and its bnpo / dr_grpo / dapo / GSPO variants) with rollout engines."""

from jft.rl.engine import Completions, Engine, JaxEngine, SamplingParams, rollout
from jft.rl.grpo import GRPO, GRPOConfig, GRPOState, build_batch, completion_logprobs, grpo_loss, make_grpo_step, plot_rewards
from jft.rl.losses import LOSS_TYPES, group_advantages, k3_kl, policy_loss
from jft.rl.rewards import (BUILTIN, GSM8K_SYSTEM_PROMPT, compute_rewards, gsm8k_answer_reward, gsm8k_format_reward,
                            gsm8k_prompts)


def __getattr__(name):
    if name == "VllmEngine":  # vllm is an optional extra: import it only when asked for
        from jft.rl.vllm_engine import VllmEngine

        return VllmEngine
    raise AttributeError(f"module 'jft.rl' has no attribute {name!r}")


__all__ = ["BUILTIN", "Completions", "Engine", "GRPO", "GRPOConfig", "GRPOState", "GSM8K_SYSTEM_PROMPT", "JaxEngine",
           "LOSS_TYPES", "SamplingParams", "VllmEngine", "build_batch", "completion_logprobs", "compute_rewards",
           "group_advantages", "grpo_loss", "gsm8k_answer_reward", "gsm8k_format_reward", "gsm8k_prompts", "k3_kl",
           "make_grpo_step", "plot_rewards", "policy_loss", "rollout"]
