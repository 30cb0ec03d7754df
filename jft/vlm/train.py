"""LoRA for the vision-language model and its training step.

The LoRA pytree is `jft.lora.LoRA` with one more branch: weights = {"layers": language targets
(as for text models), "vision": {target: {"a": [Lv, r, in], "b": [Lv, out, r]}}}. Targets follow
Unsloth's four switches: finetune_language_layers / finetune_vision_layers choose the towers,
finetune_attention_modules / finetune_mlp_modules the projections (vision attention: qkv, proj;
vision MLP: fc1, fc2 in Qwen2-VL, gate/up/down in Qwen2.5-VL).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from jft import kernels
from jft import lora as lora_lib
from jft.memory import explain_out_of_memory, offload_embedding_option, quantize_option
from jft.nn.layers import dense, embed_tokens_on_host
from jft.nn.transformer import checked_remat, output_weight, resolve_attention
from jft.nn.vision import mlp_targets
from jft.train.sft import TrainingDiverged, offload_embedding_table, plot_losses, without_embedding
from jft.train.step import IGNORE, next_token_labels
from jft.vlm.model import VISION_META, hidden_states

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
VISION_ATTENTION_TARGETS = ("qkv", "proj")
_BATCH_KEYS = ("input_ids", "labels", "positions", "segment_ids", "rope_positions", "pixel_values", "inputs_embeds",
               *VISION_META)


def targets_for(config, *, finetune_vision_layers: bool, finetune_language_layers: bool, finetune_attention_modules: bool,
                finetune_mlp_modules: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(language targets, vision targets) selected by Unsloth's four flags."""
    if not (finetune_vision_layers or finetune_language_layers):
        raise ValueError("select at least one of finetune_vision_layers / finetune_language_layers")
    if not (finetune_attention_modules or finetune_mlp_modules):
        raise ValueError("select at least one of finetune_attention_modules / finetune_mlp_modules")
    language = (ATTENTION_TARGETS if finetune_attention_modules else ()) + (MLP_TARGETS if finetune_mlp_modules else ())
    vision = ((VISION_ATTENTION_TARGETS if finetune_attention_modules else ())
              + (mlp_targets(config.vision) if finetune_mlp_modules else ()))
    return (language if finetune_language_layers else ()), (vision if finetune_vision_layers else ())


def init_lora(model, r: int = 16, alpha: float = 16.0, *, finetune_vision_layers: bool = True,
              finetune_language_layers: bool = True, finetune_attention_modules: bool = True,
              finetune_mlp_modules: bool = True, use_rslora: bool = False, key=None) -> lora_lib.LoRA:
    """PEFT's initialisation (A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, fp32) on the selected projections."""
    language, vision = targets_for(model.config, finetune_vision_layers=finetune_vision_layers,
                                   finetune_language_layers=finetune_language_layers,
                                   finetune_attention_modules=finetune_attention_modules,
                                   finetune_mlp_modules=finetune_mlp_modules)
    key = jax.random.key(0) if key is None else key
    text_key, vision_key = jax.random.split(key)
    base = lora_lib.init(model, r=r, alpha=alpha, targets=language, use_rslora=use_rslora, key=text_key)
    weights = {"layers": base.weights["layers"], "vision": {}}
    blocks = model.params["vision"]["blocks"]
    for target, k in zip(vision, jax.random.split(vision_key, max(len(vision), 1))):
        n_layers, out_dim, in_dim = blocks[target].shape
        bound = 1.0 / math.sqrt(in_dim)
        weights["vision"][target] = {"a": jax.random.uniform(k, (n_layers, r, in_dim), jnp.float32, -bound, bound),
                                     "b": jnp.zeros((n_layers, out_dim, r), jnp.float32)}
    return lora_lib.LoRA(weights, base.config)


def token_losses(config, params, lora, batch, *, remat: str = "full", attn_impl: str = "xla"):
    """Per-token cross-entropy [B, T] and the target mask of an image+text batch."""
    hidden, _ = hidden_states(config, params, batch, lora=lora, remat=remat, attn_impl=attn_impl)
    targets = next_token_labels(batch["labels"], batch["segment_ids"])
    b, t, d = hidden.shape
    weight = dense(output_weight(config.text, params, lora), hidden.dtype)
    loss, _ = kernels.linear_cross_entropy(hidden.reshape(b * t, d), weight, targets.reshape(-1), ignore_index=IGNORE)
    return loss.reshape(b, t), targets != IGNORE


def loss_fn(lora, config, params, batch, remat: str = "full", attn_impl: str = "xla"):
    """Token-mean cross-entropy over the labelled tokens."""
    losses, mask = token_losses(config, params, lora, batch, remat=remat, attn_impl=attn_impl)
    return jnp.sum(losses) / jnp.maximum(jnp.sum(mask), 1)


def loss_and_grads(config, params, lora, batch, remat: str = "full", attn_impl: str = "xla"):
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in _BATCH_KEYS}
    return jax.value_and_grad(loss_fn)(lora, config, params, batch, remat, attn_impl)


def make_step(config, optimizer: optax.GradientTransformation, *, remat: str = "full", attn_impl: str = "xla"):
    """A jitted `(params, lora, opt_state, batch) -> (lora, opt_state, metrics)` for collator batches."""

    def step(params, lora, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(lora, config, params, batch, remat, attn_impl)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    jitted = jax.jit(step)

    def run(params, lora, opt_state, batch):
        return jitted(params, lora, opt_state, {k: jnp.asarray(v) for k, v in batch.items() if k in _BATCH_KEYS})

    return run


def fit(model, lora, examples, collator, *, steps: int, batch_size: int = 2, optimizer=None, seed: int = 0,
        log_every: int = 0, remat: str = "full", attention: str = "auto", progress: bool = True,
        out_dir: str | None = None, offload_embedding: bool = False) -> tuple[lora_lib.LoRA, list[float]]:
    """A small training loop: batches drawn in shuffled order (epochs repeat); returns (lora, losses).

    remat: the language layers' policy (`jft.train.REMAT_POLICIES`; the vision layers recompute
    unless it is "none"). attention: as `jft.train.SFT`'s ("auto": on GPU cuDNN for 16-bit models,
    whose causal kernel serves the collator's right-padded unpacked rows exactly, jft's flash kernel
    for float32; XLA elsewhere). out_dir: where loss.png goes at the end. offload_embedding: as
    `jft.train.SFT`'s (the frozen token embedding stays in host memory; needs an untied lm_head)."""
    import numpy as np

    checked_remat(remat)
    attn_impl = resolve_attention(model.config.text, packed=False, attention=attention,
                                  dtype=model.params["embed"].dtype)
    table = offload_embedding_table(model, lora) if offload_embedding else None
    params = model.params if table is None else without_embedding(model.params)
    optimizer = optimizer or optax.adamw(2e-4)
    opt_state = optimizer.init(lora)
    step = make_step(model.config, optimizer, remat=remat, attn_impl=attn_impl)
    encoded = [collator.encode(e) for e in examples]
    rng = np.random.default_rng(seed)

    def batches():  # shuffled order, epochs repeating
        order = []
        while True:
            if len(order) < batch_size:
                order += rng.permutation(len(encoded)).tolist()
            picked, order = order[:batch_size], order[batch_size:]
            batch = collator.collate_encoded([encoded[j] for j in picked])
            if table is not None:
                batch["inputs_embeds"] = embed_tokens_on_host(model.config.text, table, batch["input_ids"])
            yield batch

    losses, stream = [], batches()
    batch = next(stream)
    bar = tqdm(total=steps, desc="vision sft", disable=not progress, dynamic_ncols=True)
    advice = _memory_advice(model, batch_size, collator, offloaded=table is not None)
    with explain_out_of_memory("the vision-language training step", advice), bar:
        for i in range(steps):
            lora, opt_state, metrics = step(params, lora, opt_state, batch)
            if i + 1 < steps:
                batch = next(stream)  # made on the host while the device runs this step
            losses.append(float(metrics["loss"]))
            if not math.isfinite(losses[-1]):
                raise TrainingDiverged(f"loss became {losses[-1]} at step {i + 1}. Lower the learning rate or check the data.")
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
            if log_every and (i + 1) % log_every == 0:
                tqdm.write(f"step {i + 1}: loss {losses[-1]:.4f}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        plot_losses([{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)], os.path.join(out_dir, "loss.png"))
    return lora, losses


def _memory_advice(model, batch_size: int, collator, offloaded: bool) -> str:
    options = [f"a smaller batch_size (now {batch_size})",
               f"VisionCollator(max_seq_length=...) to cut long examples (now {collator.max_seq_length})",
               f"smaller images (the processor's max_pixels, now {collator.processor.max_pixels})",
               "init_lora(..., finetune_vision_layers=False)"]
    return "; ".join(options + offload_embedding_option(model.config.text, offloaded)
                     + quantize_option(model.params, "jft.vlm.load"))
