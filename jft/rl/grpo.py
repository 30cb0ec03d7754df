"""GRPO on a LoRA: the functional step (`make_grpo_step`) and the loop (`GRPO.fit`).

A step's batch holds B = prompts_per_step * num_generations completions laid out as one row each:
the prompt left-padded to P, then the completion right-padded to C = max_completion_length:

    input_ids, positions, segment_ids  [B, P + C]   (segment 0 = padding)
    completion_mask                    [B, C]       (1 on completion tokens, stop token included)
    advantages                         [B]
    old_logprobs (optional)            [B, C]       (when num_iterations > 1)
    inputs_embeds (optional)           [B, P + C, D] (the rows' embeddings, looked up on the host when
                                                     the embedding lives there; see `GRPO`)

Completion log-probs come from the final hidden states through the fused chunked lm_head +
cross-entropy kernel, so [B, T, V] logits never exist. The reference policy is the same params
with the LoRA switched off (lora=None): no second model in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jft import kernels, sharding
from jft.config import Config
from jft.lora import check_trains_something
from jft.memory import explain_out_of_memory, offload_embedding_option, quantize_option, remat_option
from jft.nn.generate import bucket
from jft.nn.layers import dense, embed_tokens_on_host
from jft.nn.transformer import forward_hidden, output_weight, resolve_attention, rope_per_row
from jft.rl.engine import Completions, JaxEngine, SamplingParams
from jft.rl.losses import LOSS_TYPES, group_advantages, policy_loss
from jft.rl.rewards import compute_rewards, reward_name
from jft.train.checkpoint import start_run
from jft.train.optim import adamw, schedule
from jft.train.sft import TrainingDiverged, offload_embedding_table, plot_curves, plot_losses, without_embedding

IGNORE = -100


@dataclasses.dataclass
class GRPOConfig:
    """GRPO settings; names follow TRL's GRPOConfig where one exists."""

    prompts_per_step: int = 4
    num_generations: int = 8
    micro_batch_size: int | None = None  # completions per gradient micro-batch (None: all at once)
    num_iterations: int = 1  # optimizer steps per generation batch (mu)
    learning_rate: float = 5e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    beta: float = 0.0  # KL coefficient (0: no reference forward pass at all)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (DAPO uses 0.28)
    delta: float | None = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"  # "sequence" for GSPO
    scale_rewards: str = "group"  # "group", "batch" or "none" (Dr. GRPO)
    reward_weights: tuple[float, ...] | None = None
    mask_truncated_completions: bool = False
    max_prompt_length: int | None = 512
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    remat: str = "full"
    out_dir: str | None = None
    checkpoint_every: int = 0
    log_every: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.num_generations < 2 and self.scale_rewards != "none":
            raise ValueError("num_generations must be >= 2: advantages compare completions within a group")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide prompts_per_step * num_generations"
                             f" = {self.batch_size}")
        if self.checkpoint_every and not self.out_dir:
            raise ValueError("checkpoint_every needs out_dir")

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_completion_length, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, stop=tuple(self.stop), seed=self.seed)


# --- the functional core -----------------------------------------------------------------------


def completion_logprobs(config: Config, params, lora, batch, *, temperature: float = 1.0, remat: str = "full",
                        attn_impl: str = "xla"):
    """log pi(token | prefix) of every completion token [B, C] at `temperature` (0 where masked)."""
    mask = batch["completion_mask"]
    c = mask.shape[1]
    p = batch["input_ids"].shape[1] - c
    hidden, _ = forward_hidden(config, params, batch["input_ids"], batch["positions"], batch["segment_ids"], lora=lora,
                               remat=remat, attn_impl=attn_impl, inputs_embeds=batch.get("inputs_embeds"),
                               rope=rope_per_row(config, batch["positions"]))  # each completion as the engine ran it
    h = hidden[:, p - 1 : p + c - 1]  # the hidden state before each completion token predicts it
    b, _, d = h.shape
    labels = jnp.where(mask > 0, batch["input_ids"][:, p:], IGNORE)
    weight = dense(output_weight(config, params, lora), h.dtype)
    t = 1.0 if temperature == 0 else float(temperature)
    # softcap(x) / T == softcap_{cap/T}(x / T): temperature folds into the kernel's scale and cap
    cap = None if config.final_logit_softcap is None else config.final_logit_softcap / t
    loss, _ = kernels.linear_cross_entropy(h.reshape(b * c, d), weight, labels.reshape(-1), ignore_index=IGNORE,
                                           softcap=cap, logit_scale=1.0 / t)
    return -loss.reshape(b, c)


def _loss_kwargs(cfg: GRPOConfig) -> dict:
    return dict(beta=cfg.beta, epsilon_low=cfg.epsilon,
                epsilon_high=cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high, loss_type=cfg.loss_type,
                importance_sampling_level=cfg.importance_sampling_level,
                max_completion_length=cfg.max_completion_length, delta=cfg.delta)


def grpo_loss(config: Config, params, lora, batch, cfg: GRPOConfig, *, num_items=None, attn_impl: str = "xla"):
    """The GRPO loss of one (micro-)batch and its metrics; the reference policy is `lora=None`."""
    logps = completion_logprobs(config, params, lora, batch, temperature=cfg.temperature, remat=cfg.remat,
                                attn_impl=attn_impl)
    old = batch["old_logprobs"] if "old_logprobs" in batch else jax.lax.stop_gradient(logps)
    ref = None
    if cfg.beta != 0.0:
        ref = jax.lax.stop_gradient(completion_logprobs(config, params, None, batch, temperature=cfg.temperature,
                                                        remat=cfg.remat, attn_impl=attn_impl))
    return policy_loss(logps, old, batch["advantages"], batch["completion_mask"], ref_logps=ref, num_items=num_items,
                       **_loss_kwargs(cfg))


_BATCH_KEYS = ("input_ids", "positions", "segment_ids", "completion_mask", "advantages", "old_logprobs", "inputs_embeds")


def make_grpo_step(config: Config, optimizer: optax.GradientTransformation, cfg: GRPOConfig, *, attn_impl: str = "xla",
                   donate: bool = True):
    """A jitted `(params, lora, opt_state, batch) -> (lora, opt_state, metrics)` (batch as in the module docstring).

    With cfg.micro_batch_size, the B rows are split into micro-batches whose gradients are summed;
    grpo / bnpo / dr_grpo average the micro-batch losses (as TRL does under gradient accumulation),
    dapo divides every micro-batch by the completion-token count of the whole batch.
    """

    def micro_loss(lora, params, mb, num_items, n_micro):
        loss, metrics = grpo_loss(config, params, lora, mb, cfg, num_items=num_items, attn_impl=attn_impl)
        if cfg.loss_type != "dapo":
            loss = loss / n_micro
        return loss, metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(params, lora, opt_state, batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in _BATCH_KEYS}
        b = batch["input_ids"].shape[0]
        mb_size = cfg.micro_batch_size or b
        if b % mb_size:
            raise ValueError(f"batch of {b} completions is not divisible by micro_batch_size={mb_size}")
        k = b // mb_size
        micro = {name: v.reshape(k, mb_size, *v.shape[1:]) for name, v in batch.items()}
        num_items = jnp.sum(batch["completion_mask"]).astype(jnp.float32)

        def body(carry, mb):
            grads, loss_sum = carry
            (loss, metrics), g = grad_fn(lora, params, mb, num_items, k)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + loss), metrics

        zeros = jax.tree.map(jnp.zeros_like, lora)
        (grads, loss), metrics = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        lora, opt_state = sharding.keep_replicated((optax.apply_updates(lora, updates), opt_state))
        metrics = {name: jnp.mean(v) for name, v in metrics.items()}
        return lora, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return jax.jit(step, donate_argnums=(1, 2) if donate else ())


# --- batches -------------------------------------------------------------------------------------


def build_batch(completions: Completions, advantages, *, max_completion_length: int, pad_id: int,
                mask_truncated: bool = False) -> dict:
    """The step's arrays (see the module docstring) from engine output; prompt width is bucketed."""
    b, c = len(completions), max_completion_length
    p = bucket(max(len(x) for x in completions.prompt_ids))
    ids = np.full((b, p + c), pad_id, np.int32)
    positions = np.zeros((b, p + c), np.int32)
    segments = np.zeros((b, p + c), np.int32)
    mask = np.zeros((b, c), np.int32)
    for row, (prompt, comp) in enumerate(zip(completions.prompt_ids, completions.ids)):
        comp = comp[:c]
        n_p, n_c = len(prompt), len(comp)
        ids[row, p - n_p : p] = prompt
        ids[row, p : p + n_c] = comp
        positions[row, p - n_p : p + n_c] = np.arange(n_p + n_c)
        segments[row, p - n_p : p + n_c] = 1
        if not (mask_truncated and completions.finish_reason[row] == "length"):
            mask[row, :n_c] = 1
    return {"input_ids": ids, "positions": positions, "segment_ids": segments, "completion_mask": mask,
            "advantages": np.asarray(advantages, np.float32)}


# --- the loop ------------------------------------------------------------------------------------


@dataclasses.dataclass
class GRPOState:
    lora: object
    opt_state: object
    step: int
    history: list[dict]


def _rows(dataset) -> list[dict]:
    rows = [dict(r) for r in dataset]
    if not rows:
        raise ValueError("the prompts dataset is empty")
    if "prompt" not in rows[0]:
        raise ValueError(f"every row needs a 'prompt' column (a string or a list of chat messages); got {sorted(rows[0])}")
    return rows


def _prompt_stream(n_rows: int, per_step: int, seed: int, start_step: int):
    """Row indices for each step: epoch e is a permutation seeded with seed + e."""
    order, epoch, produced = [], 0, 0
    while True:
        while len(order) < per_step:
            order.extend(np.random.default_rng(seed + epoch).permutation(n_rows).tolist())
            epoch += 1
        chunk, order = order[:per_step], order[per_step:]
        if produced >= start_step:
            yield chunk
        produced += 1


class GRPO:
    """Group Relative Policy Optimization of a LoRA over a frozen (possibly quantized) model.

    reward_fns: callables `(prompts, completions, completion_ids=..., **dataset_columns) -> list[float]`
    (None entries count as missing); their weighted sum is the reward. `engine` defaults to a
    `JaxEngine` on the model's own params. `fit(dataset, steps)` takes rows with a "prompt" (a string,
    or chat messages rendered with the tokenizer's chat template) and any other columns.
    With `mesh=jft.mesh(...)` the params are sharded over it, as in `SFT`, and each step's completions
    split over data x fsdp (prompts_per_step * num_generations must divide by their product).
    With `offload_embedding=True` the frozen token embedding stays in host memory, as in `SFT`: the
    training step gets each batch's rows looked up on the host, and each rollout copies the table in
    for its own program only.
    """

    def __init__(self, model, lora, reward_fns, engine=None, config: GRPOConfig | None = None, *,
                 optimizer: optax.GradientTransformation | None = None, mesh=None, offload_embedding: bool = False):
        self.config = config or GRPOConfig()
        check_trains_something(lora, model.config.num_layers)
        self.mesh = mesh
        sharding.check_rows(self.config.batch_size, mesh,
                            f"prompts_per_step * num_generations = {self.config.batch_size} completions")
        if mesh is not None:
            model, lora = sharding.shard_model(model, mesh), sharding.replicate(lora, mesh)
        self.model, self.lora = model, lora
        self.embed_table = offload_embedding_table(model, lora) if offload_embedding else None
        self.reward_fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) else [reward_fns]
        if not self.reward_fns:
            raise ValueError("give at least one reward function")
        weights = self.config.reward_weights
        if weights is not None and len(weights) != len(self.reward_fns):
            raise ValueError(f"{len(weights)} reward_weights for {len(self.reward_fns)} reward functions")
        self.weights = np.ones(len(self.reward_fns), np.float32) if weights is None else np.asarray(weights, np.float32)
        self.engine = engine or JaxEngine(model, lora, slots=self.config.batch_size,
                                          max_prompt_length=self.config.max_prompt_length)
        if getattr(self.engine, "max_prompt_length", None) is None and self.config.max_prompt_length:
            self.engine.max_prompt_length = self.config.max_prompt_length
        self.optimizer = optimizer
        from jft.model import pad_token_id_of

        self.pad_id = pad_token_id_of(model)

    # -- prompts ------------------------------------------------------------------------------
    def _render(self, prompt):
        if isinstance(prompt, str):
            return prompt
        tok = self.model.tokenizer
        if tok is None:
            raise ValueError("chat-message prompts need a tokenizer with a chat template")
        return tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)

    # -- one generation batch -----------------------------------------------------------------
    def rollout(self, rows: list[dict], lora, step: int):
        """Samples the group completions of `rows` and scores them; returns (batch, metrics)."""
        cfg, g = self.config, self.config.num_generations
        self.engine.sync(self.model.params, lora)
        texts = [self._render(r["prompt"]) for r in rows]
        sampling = dataclasses.replace(cfg.sampling, seed=cfg.seed * 1_000_003 + step)
        t0 = time.perf_counter()
        with explain_out_of_memory("the GRPO rollout", self._rollout_memory_advice()):
            comps = sharding.scoped(self.mesh, self.engine.generate)(texts, n=g, sampling=sampling)
        rollout_s = time.perf_counter() - t0
        conversational = not isinstance(rows[0]["prompt"], str)
        prompts = [r["prompt"] for r in rows for _ in range(g)]
        completions = [[{"role": "assistant", "content": t}] if conversational else t for t in comps.text]
        columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
        total, per_fn = compute_rewards(self.reward_fns, self.weights, prompts, completions, comps.ids, columns)
        advantages, group_std = group_advantages(total, g, cfg.scale_rewards)
        batch = build_batch(comps, np.asarray(advantages), max_completion_length=cfg.max_completion_length,
                            pad_id=self.pad_id, mask_truncated=cfg.mask_truncated_completions)
        lengths = comps.lengths
        metrics = {"reward": float(np.mean(total)), "reward_std": float(np.mean(np.asarray(group_std))),
                   "frac_reward_zero_std": float(np.mean(np.asarray(group_std) == 0)),
                   "completion_length": float(lengths.mean()), "completion_length_min": int(lengths.min()),
                   "completion_length_max": int(lengths.max()),
                   "truncated_fraction": float(np.mean([r == "length" for r in comps.finish_reason])),
                   "rollout_s": rollout_s}
        for fn, values in zip(self.reward_fns, per_fn):
            name = reward_name(fn)
            metrics[f"rewards/{name}/mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            metrics[f"rewards/{name}/std"] = float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")
        return batch, metrics, comps

    def _rollout_memory_advice(self) -> str:
        cfg = self.config
        options = [f"fewer prompts_per_step or num_generations (now {cfg.prompts_per_step} x {cfg.num_generations} "
                   "completions)", f"a smaller max_completion_length (now {cfg.max_completion_length}) or "
                   f"max_prompt_length (now {cfg.max_prompt_length})"]
        if isinstance(self.engine, JaxEngine):
            options.append(f"engine=JaxEngine(model, lora, slots=...) with fewer slots (now {self.engine.slots}) "
                           "to decode fewer completions at once")
        return "; ".join(options + quantize_option(self.model.params))

    def _step_memory_advice(self) -> str:
        cfg = self.config
        options = [f"a smaller micro_batch_size (now {cfg.micro_batch_size or cfg.batch_size} of the {cfg.batch_size} "
                   "completions per gradient pass)", f"a smaller max_completion_length (now {cfg.max_completion_length})",
                   "fewer prompts_per_step or num_generations"]
        options += remat_option(cfg.remat) + quantize_option(self.model.params)
        return "; ".join(options + offload_embedding_option(self.model.config, self.embed_table is not None))

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, prompts_dataset, steps: int, *, resume: bool = False, callbacks=()) -> GRPOState:
        """Runs `steps` generation batches (each followed by num_iterations optimizer steps)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cfg = self.config
        rows = _rows(prompts_dataset)
        total_updates = steps * cfg.num_iterations
        optimizer = self.optimizer or adamw(cfg.learning_rate, total_steps=total_updates, schedule_kind=cfg.lr_schedule,
                                            warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                                            max_grad_norm=cfg.max_grad_norm)
        lr_at = schedule(cfg.learning_rate, total_updates, kind=cfg.lr_schedule, warmup_steps=cfg.warmup_steps)
        lora = jax.tree.map(jnp.array, self.lora)  # a private copy: the step donates its buffers
        opt_state = sharding.replicate(optimizer.init(lora), self.mesh)  # its counters too: restored there as well
        attn_impl = resolve_attention(self.model.config, packed=True)  # rows are left-padded prompts + completions
        step_fn = sharding.scoped(self.mesh, make_grpo_step(self.model.config, optimizer, cfg, attn_impl=attn_impl))
        params = self.model.params  # what the step reads: without the embedding when it lives on the host
        if self.embed_table is not None:
            params = without_embedding(params)
        logprob_fn = sharding.scoped(self.mesh, jax.jit(completion_logprobs,
                                                        static_argnames=("config", "temperature", "remat", "attn_impl")))

        checkpoints, start, lora, opt_state, history = start_run(
            cfg.out_dir, checkpoint_every=cfg.checkpoint_every, resume=resume, lora=lora, opt_state=opt_state)
        stream = _prompt_stream(len(rows), cfg.prompts_per_step, cfg.seed, start)
        bar = tqdm(total=steps, initial=start, desc="grpo", disable=not (cfg.progress and sharding.is_main_process()),
                   dynamic_ncols=True)
        with explain_out_of_memory("the GRPO training step", self._step_memory_advice()), bar:
            for step in range(start, steps):
                batch, record, _ = self.rollout([rows[i] for i in next(stream)], lora, step)
                t0 = time.perf_counter()
                if self.embed_table is not None:
                    batch["inputs_embeds"] = embed_tokens_on_host(self.model.config, self.embed_table, batch["input_ids"])
                batch = sharding.place_batch(batch, self.mesh)
                if cfg.num_iterations > 1:
                    batch["old_logprobs"] = logprob_fn(self.model.config, params, lora, batch,
                                                       temperature=cfg.temperature, remat="none", attn_impl=attn_impl)
                for _ in range(cfg.num_iterations):
                    lora, opt_state, metrics = step_fn(params, lora, opt_state, batch)
                metrics = {k: float(v) for k, v in metrics.items()}
                if not math.isfinite(metrics["loss"]):
                    raise TrainingDiverged(f"loss became {metrics['loss']} at step {step + 1}; lower the learning rate "
                                           "or check the reward functions")
                record = {"step": step + 1, **record, **metrics, "lr": float(lr_at(step * cfg.num_iterations)),
                          "step_s": time.perf_counter() - t0}
                history.append(record)
                if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                    self._log(record)
                bar.set_postfix(reward=f"{record['reward']:.3f}", len=f"{record['completion_length']:.0f}",
                                **({"kl": f"{record['kl']:.4f}"} if "kl" in record else {}))
                bar.update(1)
                if checkpoints is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    checkpoints.save(step + 1, lora, opt_state, history)
                for cb in callbacks:
                    cb(step + 1, record)
        if cfg.out_dir and sharding.is_main_process():
            plot_rewards(history, os.path.join(cfg.out_dir, "reward.png"))
            plot_losses(history, os.path.join(cfg.out_dir, "loss.png"))
        self.lora = lora
        self.engine.sync(self.model.params, lora)
        return GRPOState(lora, opt_state, steps, history)

    def _log(self, record: dict) -> None:
        if not self.config.out_dir or not sharding.is_main_process():
            return
        os.makedirs(self.config.out_dir, exist_ok=True)
        with open(os.path.join(self.config.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_rewards(history: list[dict], path: str) -> None:
    """Mean reward (and each reward function's mean) against step, as a PNG."""
    names = sorted({k.split("/")[1] for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    series = {"reward (weighted sum)": [(h["step"], h["reward"]) for h in history if "reward" in h]}
    for name in names:
        series[name] = [(h["step"], h[f"rewards/{name}/mean"]) for h in history if f"rewards/{name}/mean" in h]
    plot_curves(series, "mean reward", path)
