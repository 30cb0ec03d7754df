"""`jft.train.SFT`: the convenience loop around `make_sft_step`.

Progress bar (loss, lr, tokens/s), metrics.jsonl, a loss-curve PNG, evaluation on a held-out set,
orbax checkpoints every N steps with exact resume, and a clear stop on a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jft import data as jdata
from jft import sharding
from jft.data.packing import empty_rows
from jft.lora import check_trains_something
from jft.memory import (compiled_bytes, explain_out_of_memory, format_bytes, free_device_bytes, offload_embedding_option,
                        quantize_option, remat_option)
from jft.model import no_tokenizer_error, pad_token_id_of
from jft.nn.layers import dense, embed_tokens_on_host
from jft.nn.transformer import REMAT_POLICIES, resolve_attention
from jft.train.checkpoint import start_run
from jft.train.optim import adamw, schedule
from jft.train.step import eval_loss, make_sft_step


# remat="auto" takes the fastest policy whose compiled step needs at most this share of the free device
# memory (XLA's figure leaves out the allocator's fragmentation)
AUTO_REMAT_SHARE = 0.85


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainState:
    lora: object
    opt_state: object
    step: int
    history: list[dict]
    remat: str  # the remat policy the step ran with (what remat="auto" chose)


def _batch_stream(examples, *, batch_size, seq_len, packing, pad_id, seed, start_step):
    """An endless, deterministic stream of batches (epoch e shuffled with seed + e), skipping start_step."""
    epoch, produced = 0, 0
    while True:
        if packing:
            packed = jdata.pack(examples, seq_len, pad_id=pad_id)
            rows = np.random.default_rng(seed + epoch).permutation(len(packed["input_ids"]))
            fill = empty_rows(-len(rows) % batch_size, seq_len, pad_id)  # a short last batch, as unpacked
            packed = {k: np.concatenate([v[rows], fill[k]]) for k, v in packed.items()}
            epoch_batches = [{k: v[i : i + batch_size] for k, v in packed.items()}
                             for i in range(0, len(packed["input_ids"]), batch_size)]
        else:
            epoch_batches = list(jdata.batches(examples, batch_size, pad_id=pad_id, shuffle=True, seed=seed + epoch,
                                               buckets=_buckets(seq_len)))
        for b in epoch_batches:
            if produced >= start_step:
                yield epoch, b
            produced += 1
        epoch += 1


def _buckets(max_len: int) -> tuple[int, ...]:
    sizes, n = [], 64
    while n < max_len:
        sizes.append(n)
        n *= 2
    return (*sizes, max_len)


def _steps_per_epoch(examples, batch_size, seq_len, packing, pad_id) -> int:
    rows = len(jdata.pack(examples, seq_len, pad_id=pad_id)["input_ids"]) if packing else len(examples)
    return math.ceil(rows / batch_size)


class SFT:
    """Supervised fine-tuning of a LoRA over a frozen (possibly quantized) model.

    `fit(dataset, steps=N | epochs=E)` accepts a `datasets.Dataset`, a list of rows in any format
    `jft.data` knows, or already tokenised examples ({"input_ids", "labels"}).
    """

    def __init__(self, model, lora, *, optimizer: optax.GradientTransformation | None = None, learning_rate: float = 2e-4,
                 embedding_learning_rate: float | None = None, weight_decay: float = 0.0, lr_schedule: str = "linear",
                 warmup_steps: int = 0, max_seq_length: int = 2048, batch_size: int = 2, grad_accum: int = 1,
                 packing: bool = False, template: str | None = None, responses_only: bool = True, format: str | None = None,
                 remat: str = "auto", out_dir: str | None = None, checkpoint_every: int = 0, eval_every: int = 0,
                 log_every: int = 1, seed: int = 0, progress: bool = True, mesh=None, attention: str = "auto",
                 offload_embedding: bool = False):
        if not isinstance(max_seq_length, int) or max_seq_length <= 0:
            raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
        if optimizer is None and not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
        if not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
        if remat != "auto" and remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose auto or one of {REMAT_POLICIES}")
        check_trains_something(lora, model.config.num_layers)
        self.mesh = mesh
        sharding.check_rows(batch_size, mesh, f"batch_size={batch_size} rows")
        if mesh is not None:
            model = sharding.shard_model(model, mesh)
            lora = sharding.replicate(lora, mesh)
        self.model, self.lora = model, lora
        self.embed_table = offload_embedding_table(model, lora) if offload_embedding else None
        self.optimizer = optimizer
        self.opt_args = dict(lr=learning_rate, embedding_lr=embedding_learning_rate, weight_decay=weight_decay,
                             schedule_kind=lr_schedule, warmup_steps=warmup_steps)
        self.max_seq_length, self.batch_size, self.grad_accum = max_seq_length, batch_size, grad_accum
        self.packing, self.template, self.responses_only, self.format = packing, template, responses_only, format
        self.remat, self.out_dir, self.seed, self.progress = remat, out_dir, seed, progress
        self.attention = resolve_attention(model.config, packing, attention, model.params["embed"].dtype)
        self.checkpoint_every, self.eval_every, self.log_every = checkpoint_every, eval_every, log_every
        if checkpoint_every and not out_dir:
            raise ValueError("checkpoint_every needs out_dir")

    # -- data -----------------------------------------------------------------------------------
    def tokenize(self, dataset) -> list[dict]:
        rows = list(dataset) if not hasattr(dataset, "column_names") else dataset
        if len(rows) and "input_ids" in rows[0] and "labels" in rows[0]:
            return [{"input_ids": np.asarray(r["input_ids"], np.int32), "labels": np.asarray(r["labels"], np.int32)} for r in rows]
        if self.model.tokenizer is None:
            raise no_tokenizer_error(self.model, "pass tokenised examples ({'input_ids', 'labels'})")
        return jdata.prepare(dataset, self.model.tokenizer, self.max_seq_length, format=self.format,
                             template=self.template, responses_only=self.responses_only)

    def _pad_id(self) -> int:
        return pad_token_id_of(self.model)

    def _device_params(self) -> dict:
        """The params the step reads: without the embedding when it lives on the host."""
        params = self.model.params
        return params if self.embed_table is None else without_embedding(params)

    def _device_batch(self, batch: dict) -> dict:
        if self.embed_table is not None:
            batch = dict(batch, inputs_embeds=embed_tokens_on_host(self.model.config, self.embed_table, batch["input_ids"]))
        return sharding.place_batch(batch, self.mesh)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, lora, examples) -> float:
        """Token-mean loss over held-out examples."""
        fn = sharding.scoped(self.mesh, jax.jit(eval_loss, static_argnames=("config", "attn_impl")))
        total, count, params = 0.0, 0, self._device_params()
        with explain_out_of_memory("the SFT evaluation", self._memory_advice()):
            for batch in jdata.batches(examples, self.batch_size, pad_id=self._pad_id(),
                                       buckets=_buckets(self.max_seq_length)):
                s, n = fn(self.model.config, params, lora, self._device_batch(batch), self.attention)
                total, count = total + float(s), count + int(n)
        return total / max(count, 1)

    def _memory_advice(self, remat: str | None = None) -> str:
        """What to change when a step does not fit in device memory, given these settings (and the
        remat policy in use)."""
        options = [f"a smaller batch_size (now {self.batch_size}; a larger grad_accum, now {self.grad_accum}, keeps the "
                   "effective batch)", f"a smaller max_seq_length (now {self.max_seq_length})"]
        options += remat_option(remat or self.remat) + quantize_option(self.model.params)
        options += offload_embedding_option(self.model.config, self.embed_table is not None)
        if self.mesh is None and jax.device_count() > 1:
            options.append(f"mesh=jft.mesh() to shard over the {jax.device_count()} devices")
        return "; ".join(options)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, dataset, *, steps: int | None = None, epochs: int | None = None, eval_dataset=None,
            resume: bool = False, callbacks=()) -> TrainState:
        """Trains for `steps` optimizer steps (or `epochs`). Each callback is called as
        cb(step, record) after a logged step; raising from one stops training."""
        if (steps is None) == (epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        name, count = ("steps", steps) if steps is not None else ("epochs", epochs)
        if count < 1:
            raise ValueError(f"{name} must be >= 1, got {count}")
        examples = self.tokenize(dataset)
        if not len(examples):
            raise ValueError("the dataset has no examples")
        eval_examples = self.tokenize(eval_dataset) if eval_dataset is not None else None
        pad_id = self._pad_id()
        rows = self.batch_size * self.grad_accum
        if steps is None:
            steps = epochs * _steps_per_epoch(examples, rows, self.max_seq_length, self.packing, pad_id)
        optimizer = self.optimizer or adamw(total_steps=steps, **self.opt_args)
        lr_at = schedule(self.opt_args["lr"], steps, kind=self.opt_args["schedule_kind"], warmup_steps=self.opt_args["warmup_steps"])
        lora = jax.tree.map(jnp.copy, self.lora)  # a private copy (same placement): the step donates its buffers
        opt_state = sharding.replicate(optimizer.init(lora), self.mesh)  # its counters too: restored there as well
        params = self._device_params()
        with explain_out_of_memory("the SFT training step", self._memory_advice()):
            remat, step_fn = self._make_step(optimizer, params, lora, opt_state, self._widest_batch(examples))

        checkpoints, start, lora, opt_state, history = start_run(
            self.out_dir, checkpoint_every=self.checkpoint_every, resume=resume, lora=lora, opt_state=opt_state)
        stream = _batch_stream(examples, batch_size=rows, seq_len=self.max_seq_length, packing=self.packing,
                               pad_id=pad_id, seed=self.seed, start_step=start)
        key = jax.random.key(self.seed)
        bar = tqdm(total=steps, initial=start, desc="sft", disable=not (self.progress and sharding.is_main_process()),
                   dynamic_ncols=True)

        def upcoming():
            epoch, batch = next(stream)
            return epoch, int((batch["segment_ids"] > 0).sum()), self._device_batch(batch)

        t0, tokens_since = time.perf_counter(), 0
        pending = upcoming() if start < steps else None
        with explain_out_of_memory("the SFT training step", self._memory_advice(remat)), bar:
            for step in range(start, steps):
                epoch, tokens, batch = pending
                tokens_since += tokens
                lora, opt_state, metrics = step_fn(params, lora, opt_state, batch, jax.random.fold_in(key, step))
                if step + 1 < steps:
                    pending = upcoming()  # the host prepares the next batch while the device runs this step
                if (step + 1) % self.log_every == 0 or step + 1 == steps:
                    loss = float(metrics["loss"])
                    if not math.isfinite(loss):
                        where = f"; the last good checkpoint is in {self.out_dir}/checkpoints" if checkpoints else ""
                        raise TrainingDiverged(f"loss became {loss} at step {step + 1}{where}. Lower the learning rate "
                                               "or check the data.")
                    elapsed = time.perf_counter() - t0
                    record = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": float(lr_at(step)),
                              "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_since / max(elapsed, 1e-9)}
                    t0, tokens_since = time.perf_counter(), 0
                    if eval_examples is not None and self.eval_every and (step + 1) % self.eval_every == 0:
                        record["eval_loss"] = self.evaluate(lora, eval_examples)
                    history.append(record)
                    self._log(record)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if checkpoints is not None and self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
                    checkpoints.save(step + 1, lora, opt_state, history)
                if history and history[-1]["step"] == step + 1:
                    for cb in callbacks:
                        cb(step + 1, history[-1])
            bar.close()
            if eval_examples is not None:
                history.append({"step": steps, "eval_loss": self.evaluate(lora, eval_examples)})
                self._log(history[-1])
        if self.out_dir and sharding.is_main_process():
            plot_losses(history, os.path.join(self.out_dir, "loss.png"))
        if getattr(self, "_tb", None) is not None:
            self._tb.close()  # flushes the writer's queue
        self.__dict__.pop("_tb", None)
        self.lora = lora
        return TrainState(lora, opt_state, steps, history, remat)

    def _widest_batch(self, examples) -> int:
        """The longest batch the stream will make: max_seq_length packed, else the bucket of the longest example."""
        if self.packing:
            return self.max_seq_length
        return jdata.bucket_length(max(len(e["input_ids"]) for e in examples), _buckets(self.max_seq_length))

    def _make_step(self, optimizer, params, lora, opt_state, seq_len: int):
        """(remat policy, jitted step). remat="auto" takes the fastest policy whose step, compiled for
        the widest batch ([rows, seq_len]), fits in AUTO_REMAT_SHARE of the free device memory:
        save_dots, else full, else offload; full where the devices do not report their memory (CPU). A
        policy XLA runs out of memory compiling does not fit."""
        def make(policy):
            return make_sft_step(self.model.config, optimizer, remat=policy, grad_accum=self.grad_accum,
                                 attn_impl=self.attention)

        free = free_device_bytes() if self.remat == "auto" else None
        if free is None:
            policy = "full" if self.remat == "auto" else self.remat
            return policy, sharding.scoped(self.mesh, make(policy))
        batch = self._device_batch(empty_rows(self.batch_size * self.grad_accum, seq_len, self._pad_id()))
        for candidate in ("save_dots", "full"):
            step = make(candidate)
            compile_step = sharding.scoped(self.mesh, lambda: step.lower(params, lora, opt_state, batch,
                                                                         jax.random.key(0)).compile())
            need = compiled_bytes(compile_step)
            if need is not None and need <= AUTO_REMAT_SHARE * free:
                policy = candidate
                break
        else:
            policy, step = "offload", make("offload")
        if self.progress and sharding.is_main_process():
            needs = "ran out of memory compiling" if need is None else f"needs {format_bytes(need)}"
            tqdm.write(f'remat="auto" chose {policy}: the {candidate} step {needs}, {format_bytes(free)} free')
        return policy, sharding.scoped(self.mesh, step)

    def _log(self, record: dict) -> None:
        if not self.out_dir or not sharding.is_main_process():
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    writer.add_scalar(f"sft/{key}", value, record["step"])
            writer.flush()

    def _tensorboard(self):
        """A TensorBoard writer into out_dir/tensorboard when tensorboardX is installed, else None."""
        if not hasattr(self, "_tb"):
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
            except ImportError:
                self._tb = None
        return self._tb


def offload_embedding_table(model, lora) -> np.ndarray:
    """Moves the frozen token embedding to host memory: model.params["embed"] becomes a numpy array
    (the device copy is released once nothing else holds it) and is returned. Each batch's rows are
    then looked up on the host and sent with the batch, which saves vocab x hidden values of device
    memory (1 GiB on Llama-3-8B). Functions given these params still work: jit copies the table in.
    A vision-language model's language half is checked."""
    if getattr(model.config, "text", model.config).tie_embeddings:
        raise ValueError("offload_embedding needs an untied lm_head: this model's output projection is its token "
                         "embedding, which the loss reads on the device")
    if "embed" in lora.weights:
        raise ValueError("offload_embedding keeps the embedding frozen; this LoRA trains it (make it with train_embeddings=False)")
    embed = model.params["embed"]
    table = np.asarray(jax.device_get(dense(embed, embed.dtype)))
    model.params["embed"] = table
    return table


def without_embedding(params: dict) -> dict:
    """The params a step reads when the token embedding lives on the host (`offload_embedding_table`)."""
    return {k: v for k, v in params.items() if k != "embed"}


def plot_curves(series: dict[str, list[tuple[int, float]]], ylabel: str, path: str) -> None:
    """Named (step, value) curves as a PNG, written atomically; series with one point get markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if v}
    if not series:
        warnings.warn(f"nothing recorded for {ylabel}; no plot written", stacklevel=2)
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, points in series.items():
        ax.plot(*zip(*points), "o-" if len(points) < 20 else "-", label=label, lw=1.3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(history: list[dict], path: str) -> None:
    """Training (and evaluation) loss against step."""
    plot_curves({"train": [(h["step"], h["loss"]) for h in history if "loss" in h],
                 "eval": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]}, "loss", path)
