"""Supervised fine-tuning: packing, gradient accumulation, resume, divergence, and a real GSM8K run."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.data.testing import make_tiny_tokenizer
from jft.demo import build_tiny_model
from jft.train.step import loss_and_grads, token_losses

GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    texts = [r["question"] + " " + r["answer"] for r in _gsm8k_rows("train", 300)]
    tokenizer = make_tiny_tokenizer(vocab_size=1024, chat_template="chatml", texts=texts)
    build_tiny_model(str(path), tokenizer, hidden=64, layers=2, intermediate=128)
    return jft.load(str(path), dtype="float32")


def _lora(model, seed=0):
    lora = jft.lora.init(model, r=4, alpha=8, key=jax.random.key(seed))
    layers = {t: {"a": w["a"], "b": jax.random.normal(jax.random.key(seed + i + 1), w["b"].shape) * 0.05}
              for i, (t, w) in enumerate(lora.weights["layers"].items())}
    return jft.lora.LoRA({"layers": layers}, lora.config)


def _samples(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, vocab, size=n).astype(np.int32)
        labels = ids.copy()
        labels[: n // 3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _unpacked_batch(sample):
    n = len(sample["input_ids"])
    return {"input_ids": jnp.asarray(sample["input_ids"])[None], "labels": jnp.asarray(sample["labels"])[None],
            "positions": jnp.arange(n)[None], "segment_ids": jnp.ones((1, n), jnp.int32)}


def test_packed_loss_equals_token_weighted_unpacked_loss(tiny):
    lora = _lora(tiny)
    samples = _samples(tiny.config.vocab_size, [9, 14, 6])
    packed = {k: jnp.asarray(v) for k, v in jft.data.pack(samples, 32).items()}
    assert packed["input_ids"].shape[0] == 1  # all three share one row
    losses, mask = token_losses(tiny.config, tiny.params, lora, packed, remat="none")
    packed_mean = float(jnp.sum(losses) / jnp.sum(mask))
    total, count = 0.0, 0
    for s in samples:
        l, m = token_losses(tiny.config, tiny.params, lora, _unpacked_batch(s), remat="none")
        total, count = total + float(jnp.sum(l)), count + int(jnp.sum(m))
    assert abs(packed_mean - total / count) < 1e-5


def test_no_attention_across_segments(tiny):
    samples = _samples(tiny.config.vocab_size, [10, 12, 7], seed=1)
    packed = jft.data.pack(samples, 32)
    seg = packed["segment_ids"][0]
    base = np.asarray(jft.forward(tiny, packed["input_ids"], positions=packed["positions"], segment_ids=packed["segment_ids"]))
    changed = packed["input_ids"].copy()
    victim = seg == seg[0]  # the first segment in the row
    changed[0, victim] = (changed[0, victim] + 7) % tiny.config.vocab_size
    after = np.asarray(jft.forward(tiny, changed, positions=packed["positions"], segment_ids=packed["segment_ids"]))
    others = (seg != seg[0]) & (seg > 0)
    assert np.abs(after[0, victim] - base[0, victim]).max() > 1e-3  # the perturbation matters where it should
    np.testing.assert_array_equal(after[0, others], base[0, others])


def test_gradient_accumulation_equals_one_big_batch(tiny):
    lora = _lora(tiny, seed=3)
    samples = _samples(tiny.config.vocab_size, [20, 9, 17, 12], seed=2)  # unequal label counts per micro-batch
    batch = next(jft.data.batches(samples, 4, buckets=(24,)))
    one = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    two = {k: jnp.asarray(v).reshape(2, 2, -1) for k, v in batch.items()}
    loss1, g1, n1 = loss_and_grads(tiny.config, tiny.params, lora, one, remat="none")
    loss2, g2, n2 = loss_and_grads(tiny.config, tiny.params, lora, two, remat="full")
    assert int(n1) == int(n2)
    assert abs(float(loss1) - float(loss2)) < 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)


def _gsm8k_rows(split, n):
    with open(os.path.join(GSM8K, f"{split}.jsonl")) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_resume_gives_identical_lora(tiny, tmp_path):
    rows = _gsm8k_rows("train", 48)
    kw = dict(learning_rate=1e-3, max_seq_length=384, batch_size=4, packing=True, progress=False, seed=5)
    full = jft.train.SFT(tiny, jft.lora.init(tiny, r=4, key=jax.random.key(0)), **kw).fit(rows, steps=10)

    def kill_at_7(step, record):  # two steps after the checkpoint of step 5, logged and then lost
        if step == 7:
            raise KeyboardInterrupt

    out = str(tmp_path / "run")
    first = jft.train.SFT(tiny, jft.lora.init(tiny, r=4, key=jax.random.key(0)), out_dir=out, checkpoint_every=5, **kw)
    with pytest.raises(KeyboardInterrupt):
        first.fit(rows, steps=10, callbacks=[kill_at_7])
    resumed = jft.train.SFT(tiny, jft.lora.init(tiny, r=4, key=jax.random.key(9)), out_dir=out, checkpoint_every=5, **kw)
    state = resumed.fit(rows, steps=10, resume=True)
    for a, b in zip(jax.tree.leaves(full.lora), jax.tree.leaves(state.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["step"] for h in state.history] == list(range(1, 11))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 11))
    with pytest.warns(UserWarning, match="no checkpoint"):
        jft.train.SFT(tiny, jft.lora.init(tiny, r=4), out_dir=str(tmp_path / "fresh"), **kw).fit(rows, steps=1, resume=True)


def test_resume_with_other_lora_settings_names_what_differs(tiny, tmp_path):
    rows, out = _gsm8k_rows("train", 4), str(tmp_path / "run")
    kw = dict(max_seq_length=384, batch_size=2, progress=False, out_dir=out, checkpoint_every=1)
    jft.train.SFT(tiny, jft.lora.init(tiny, r=4, alpha=8), **kw).fit(rows, steps=1)
    where = re.escape(os.path.join(out, "checkpoints"))
    for lora, differ in ((jft.lora.init(tiny, r=8, alpha=8), "has LoRA r=4, this run has r=8"),
                         (jft.lora.init(tiny, r=4, alpha=16), "has LoRA alpha=8.0, this run has alpha=16.0"),
                         (jft.lora.init(tiny, r=4, alpha=8, targets=["q", "v"]),
                          "has LoRA targets=q,k,v,o,gate,up,down, this run has targets=q,v")):
        with pytest.raises(ValueError, match=f"the checkpoint in {where} {differ}: resume with"):
            jft.train.SFT(tiny, lora, **kw).fit(rows, steps=2, resume=True)
    os.remove(os.path.join(out, "checkpoints", "lora-1.json"))  # as written before these files existed
    with pytest.raises(ValueError, match=f"the checkpoint in {where} does not fit this run's LoRA"):
        jft.train.SFT(tiny, jft.lora.init(tiny, r=8, alpha=8), **kw).fit(rows, steps=2, resume=True)
    state = jft.train.SFT(tiny, jft.lora.init(tiny, r=4, alpha=8, dropout=0.1), **kw).fit(rows, steps=2, resume=True)
    assert [h["step"] for h in state.history] == [1, 2]  # dropout may change on resume
    jft.train.SFT(tiny, jft.lora.init(tiny, r=4, alpha=8), **kw).fit(rows, steps=4, resume=True)
    # orbax keeps the two newest steps; the other steps' history and settings files go too
    assert sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.endswith(".json")) == [
        "history-3.json", "history-4.json", "lora-3.json", "lora-4.json"]


def test_offloaded_embedding_trains_like_the_device_one(tiny):
    rows = _gsm8k_rows("train", 24)
    kw = dict(learning_rate=1e-3, max_seq_length=384, batch_size=4, grad_accum=2, packing=True, progress=False, seed=2,
              eval_every=2)
    lora = jft.lora.init(tiny, r=4, key=jax.random.key(0))
    on_device = jft.train.SFT(tiny, lora, **kw).fit(rows, steps=4, eval_dataset=rows[:6])
    model = dataclasses.replace(tiny, params=dict(tiny.params))  # offloading moves this model's table
    trainer = jft.train.SFT(model, lora, offload_embedding=True, **kw)
    assert isinstance(model.params["embed"], np.ndarray)
    np.testing.assert_array_equal(model.params["embed"], np.asarray(tiny.params["embed"]))
    on_host = trainer.fit(rows, steps=4, eval_dataset=rows[:6])
    for key in ("loss", "eval_loss", "grad_norm"):
        expected, got = [h[key] for h in on_device.history if key in h], [h[key] for h in on_host.history if key in h]
        assert len(expected) >= 2 and np.allclose(got, expected, rtol=1e-6, atol=0), key
    for a, b in zip(jax.tree.leaves(on_device.lora), jax.tree.leaves(on_host.lora)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # the offloaded params still serve the usual forward (jit copies the table in)
    ids = np.asarray([[5, 9, 12]])
    np.testing.assert_allclose(jft.forward(model, ids), jft.forward(tiny, ids), rtol=1e-6)


def test_offload_embedding_refuses_what_it_cannot_keep_off_the_device(tiny):
    tied = dataclasses.replace(tiny, config=dataclasses.replace(tiny.config, tie_embeddings=True), params=dict(tiny.params))
    with pytest.raises(ValueError, match="untied"):
        jft.train.SFT(tied, jft.lora.init(tied, r=2), offload_embedding=True)
    model = dataclasses.replace(tiny, params=dict(tiny.params))
    trained = jft.lora.init(model, r=2, train_embeddings=True)
    with pytest.raises(ValueError, match="frozen"):
        jft.train.SFT(model, trained, offload_embedding=True)
    assert not isinstance(model.params["embed"], np.ndarray)


def test_nan_loss_stops_with_clear_error(tiny, tmp_path):
    lora = jft.lora.init(tiny, r=4, key=jax.random.key(0))
    bad = jft.lora.LoRA({"layers": {**lora.weights["layers"], "q": {"a": lora.weights["layers"]["q"]["a"] * jnp.nan,
                                                                     "b": lora.weights["layers"]["q"]["b"] + 1.0}}},
                        lora.config)
    with pytest.raises(jft.train.TrainingDiverged, match="step 1"):
        jft.train.SFT(tiny, bad, max_seq_length=384, batch_size=2, progress=False).fit(_gsm8k_rows("train", 8), steps=3)


def test_bad_arguments_are_reported_when_the_trainer_is_made(tiny):
    lora = jft.lora.init(tiny, r=2)
    for bad in (0, -1, 8.5):
        with pytest.raises(ValueError, match="max_seq_length must be a positive integer"):
            jft.train.SFT(tiny, lora, max_seq_length=bad)
    with pytest.raises(ValueError, match="unknown remat policy 'bogus'"):
        jft.train.SFT(tiny, lora, remat="bogus")
    with pytest.raises(ValueError, match="the LoRA has no targets"):
        jft.train.SFT(tiny, jft.lora.init(tiny, r=2, targets=[]))
    with pytest.raises(ValueError, match=r"layers=\(5,\) select none of the model's 2 layers"):
        jft.train.SFT(tiny, jft.lora.init(tiny, r=2, layers=[5]))
    jft.train.SFT(tiny, jft.lora.init(tiny, r=2, targets=[], train_embeddings=True))  # the embeddings alone train


def test_fewer_packed_rows_than_a_batch_still_train(tiny):
    """As unpacked batches do, a short packed batch is filled with all-padding rows."""
    samples = _samples(tiny.config.vocab_size, [9, 14, 6])  # one packed row of 32
    trainer = jft.train.SFT(tiny, _lora(tiny), max_seq_length=32, batch_size=2, packing=True, progress=False)
    state = trainer.fit(samples, epochs=1)
    assert state.step == 1 and np.isfinite(state.history[-1]["loss"])
    packed = jft.data.pack(samples, 32)
    loss = jax.jit(lambda batch: loss_and_grads(tiny.config, tiny.params, state.lora, batch, remat="none")[0])
    filled = {k: np.concatenate([v, jft.data.packing.empty_rows(1, 32, 0)[k]]) for k, v in packed.items()}
    alone, filled = ({k: jnp.asarray(v)[None] for k, v in b.items()} for b in (packed, filled))
    assert abs(float(loss(alone)) - float(loss(filled))) < 1e-6


def test_bad_datasets_are_reported(tiny):
    trainer = jft.train.SFT(tiny, jft.lora.init(tiny, r=2), max_seq_length=64, progress=False)
    with pytest.raises(ValueError, match="empty"):
        trainer.fit([], steps=1)
    with pytest.raises(ValueError, match="output"):
        trainer.fit([{"instruction": "add", "input": "1 2"}], steps=1)
    with pytest.raises(ValueError, match="chatml"):
        jft.train.SFT(tiny, jft.lora.init(tiny, r=2), template="no-such-template", progress=False).fit(
            _gsm8k_rows("train", 2), steps=1)


@pytest.mark.slow
def test_sft_on_gsm8k_lowers_held_out_loss(tmp_path):
    train_rows, test_rows = _gsm8k_rows("train", 800), _gsm8k_rows("test", 64)
    texts = [r["question"] + " " + r["answer"] for r in train_rows]
    tokenizer = make_tiny_tokenizer(vocab_size=1024, chat_template="chatml", texts=texts)
    build_tiny_model(str(tmp_path / "base"), tokenizer, hidden=96, layers=2, intermediate=192)
    model = jft.load(str(tmp_path / "base"), dtype="float32")
    lora = jft.lora.init(model, r=16, alpha=32, train_embeddings=True, key=jax.random.key(0))
    trainer = jft.train.SFT(model, lora, learning_rate=2e-3, max_seq_length=256, batch_size=8, packing=True,
                            out_dir=str(tmp_path / "out"), progress=False, warmup_steps=10)
    before = trainer.evaluate(lora, trainer.tokenize(test_rows))
    state = trainer.fit(train_rows, steps=200, eval_dataset=test_rows)
    after = state.history[-1]["eval_loss"]
    assert after < 0.7 * before, (before, after)
    assert os.path.getsize(tmp_path / "out" / "loss.png") > 1000
    assert sum(1 for _ in open(tmp_path / "out" / "metrics.jsonl")) >= 200


def test_metrics_go_to_tensorboard_too(tiny, tmp_path):
    import struct

    from tensorboardX.proto.event_pb2 import Event  # the record schema TensorBoard reads

    out = tmp_path / "run"
    jft.train.SFT(tiny, jft.lora.init(tiny, r=2), max_seq_length=384, batch_size=2, progress=False,
                  out_dir=str(out)).fit(_gsm8k_rows("train", 4), steps=2)
    data = next((out / "tensorboard").iterdir()).read_bytes()
    tags, at = {}, 0
    while at < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack_from("<Q", data, at)
        event = Event.FromString(data[at + 12 : at + 12 + n])
        for v in event.summary.value:
            tags.setdefault(v.tag, []).append(event.step)
        at += 12 + n + 4
    assert tags["sft/loss"] == [1, 2] and "sft/lr" in tags and "sft/grad_norm" in tags


def test_auto_remat_takes_the_fastest_policy_that_fits(tiny, monkeypatch):
    """remat="auto" compiles the step for a full batch and takes save_dots when XLA's figure for it fits
    AUTO_REMAT_SHARE of the free device memory, else full, else offload. CPU devices report no memory,
    so there it is full; the free memory of a GPU is stood in for here, the figures are XLA's own. A policy
    whose compile runs out of memory does not fit."""
    import optax

    import jft.train.sft as sft
    from jft.data.packing import empty_rows
    from jft.memory import allocated_bytes
    from jft.train.step import make_sft_step

    trainer = jft.train.SFT(tiny, _lora(tiny), max_seq_length=128, batch_size=2, progress=False)
    optimizer = optax.adamw(1e-3)
    params, lora = trainer._device_params(), _lora(tiny)
    opt_state = optimizer.init(lora)
    monkeypatch.setattr(sft, "free_device_bytes", lambda: None)
    assert trainer._make_step(optimizer, params, lora, opt_state, 128)[0] == "full"
    batch = trainer._device_batch(empty_rows(2, 128, 0))
    need = {policy: allocated_bytes(make_sft_step(tiny.config, optimizer, remat=policy, attn_impl=trainer.attention)
                                    .lower(params, lora, opt_state, batch, jax.random.key(0)).compile())
            for policy in ("save_dots", "full")}
    assert need["save_dots"] > need["full"] / sft.AUTO_REMAT_SHARE + 1
    for free, expected in ((need["save_dots"] / sft.AUTO_REMAT_SHARE + 1, "save_dots"),
                           (need["full"] / sft.AUTO_REMAT_SHARE + 1, "full"), (need["full"], "offload")):
        monkeypatch.setattr(sft, "free_device_bytes", lambda free=free: int(free))
        assert trainer._make_step(optimizer, params, lora, opt_state, 128)[0] == expected

    class RunsOutCompiling:  # what XLA:GPU's autotuner raises when it cannot allocate a kernel's operands
        def lower(self, *args):
            return self

        def compile(self):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Failed to get configs for: 1 out of 9 instructions")

    def save_dots_runs_out_compiling(config, optimizer, remat, **options):
        return RunsOutCompiling() if remat == "save_dots" else make_sft_step(config, optimizer, remat=remat, **options)

    monkeypatch.setattr(sft, "make_sft_step", save_dots_runs_out_compiling)
    monkeypatch.setattr(sft, "free_device_bytes", lambda: 2**40)
    assert trainer._make_step(optimizer, params, lora, opt_state, 128)[0] == "full"
    monkeypatch.setattr(sft, "make_sft_step", make_sft_step)
    rows = _gsm8k_rows("train", 8)
    monkeypatch.setattr(sft, "free_device_bytes", lambda: 2**40)
    auto = jft.train.SFT(tiny, _lora(tiny), max_seq_length=128, batch_size=2, progress=False).fit(rows, steps=2)
    full = jft.train.SFT(tiny, _lora(tiny), max_seq_length=128, batch_size=2, progress=False, remat="full").fit(rows, steps=2)
    assert (auto.remat, full.remat) == ("save_dots", "full")
    np.testing.assert_allclose([h["loss"] for h in auto.history], [h["loss"] for h in full.history], rtol=1e-5)
