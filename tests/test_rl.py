"""GRPO: loss variants against TRL's formulas (written out in torch), the JAX rollout engine against
jft.generate / transformers / teacher forcing / the softmax, rewards on GSM8K, and a learning run."""

import dataclasses
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jft
from jft.rl import GRPO, GRPOConfig, JaxEngine, SamplingParams, group_advantages, make_grpo_step, policy_loss
from jft.rl.grpo import build_batch, completion_logprobs
from jft.rl.rewards import gsm8k_answer_reward, gsm8k_format_reward, gsm8k_prompts
from tests.test_kernels_nf4 import loops_read_packed_bytes
from tests.tiny_models import save_hf_model

GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
ROOT = os.path.join(os.path.dirname(__file__), "..")


# --- TRL's formulas, written out independently in torch ---------------------------------------------------


def _trl_advantages(rewards, g, scale):
    r = torch.tensor(rewards, dtype=torch.float64)
    mean = r.view(-1, g).mean(dim=1).repeat_interleave(g)
    std = r.view(-1, g).std(dim=1).repeat_interleave(g)
    adv = r - mean
    if scale == "group":
        adv = adv / (std + 1e-4)
    elif scale == "batch":
        adv = adv / (r.std() + 1e-4)
    return adv.numpy()


def _trl_loss(logits, old_logits, ref_logits, tokens, adv, mask, *, loss_type, level, beta, eps_low, eps_high, max_len):
    logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    tok = torch.tensor(tokens)[..., None]
    logp = torch.log_softmax(logits, -1).gather(-1, tok)[..., 0]
    old = torch.log_softmax(torch.tensor(old_logits, dtype=torch.float64), -1).gather(-1, tok)[..., 0]
    ref = torch.log_softmax(torch.tensor(ref_logits, dtype=torch.float64), -1).gather(-1, tok)[..., 0]
    m = torch.tensor(mask, dtype=torch.float64)
    a = torch.tensor(adv, dtype=torch.float64)
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * a.unsqueeze(1), coef_2 * a.unsqueeze(1))
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (per_token.size(0) * max_len)
    else:  # dapo, one process, the whole generation batch
        loss = (per_token * m).sum() / m.sum()
    loss.backward()
    return loss.item(), logits.grad.numpy()


def _logps(logits, tokens):
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_value_and_gradient_match_trl_formulas(loss_type, level, beta):
    rng = np.random.default_rng(hash((loss_type, level, beta)) % 2**32)
    b, c, v = 6, 7, 11
    logits = rng.normal(size=(b, c, v))
    old_logits = logits + rng.normal(scale=0.3, size=logits.shape)  # ratios both inside and outside the clip range
    ref_logits = logits + rng.normal(scale=0.5, size=logits.shape)
    tokens = rng.integers(0, v, size=(b, c))
    lengths = np.array([7, 3, 0, 5, 1, 6])
    mask = (np.arange(c)[None] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(size=b)
    kw = dict(loss_type=loss_type, level=level, beta=beta, eps_low=0.2, eps_high=0.28, max_len=c)
    want_loss, want_grad = _trl_loss(logits, old_logits, ref_logits, tokens, adv, mask, **kw)

    def ours(lg):
        loss, _ = policy_loss(_logps(lg, tokens), _logps(jnp.asarray(old_logits), tokens), jnp.asarray(adv),
                              jnp.asarray(mask), ref_logps=_logps(jnp.asarray(ref_logits), tokens), beta=beta,
                              epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level,
                              max_completion_length=c)
        return loss

    with jax.enable_x64():
        loss, grad = jax.value_and_grad(ours)(jnp.asarray(logits))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-7, atol=1e-12)
    assert np.abs(want_grad).max() > 1e-3  # the gradient is not trivially zero


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    rewards = np.random.default_rng(0).normal(size=12)
    rewards[4:8] = 1.5  # a group with zero std
    adv, std = group_advantages(rewards, 4, scale)
    np.testing.assert_allclose(np.asarray(adv), _trl_advantages(rewards, 4, scale), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(std)[4:8] == 0)


def test_clip_fraction_counts_clipped_tokens():
    logps = jnp.log(jnp.array([[1.5, 1.0, 0.5]]))  # ratios 1.5, 1.0, 0.5 against old = 0
    _, m = policy_loss(logps, jnp.zeros((1, 3)), jnp.array([1.0]), jnp.ones((1, 3)), loss_type="bnpo")
    assert float(m["clip_high"]) == pytest.approx(1 / 3) and float(m["clip_low"]) == 0.0
    _, m = policy_loss(logps, jnp.zeros((1, 3)), jnp.array([-1.0]), jnp.ones((1, 3)), loss_type="bnpo")
    assert float(m["clip_low"]) == pytest.approx(1 / 3) and float(m["clip_high"]) == 0.0


# --- models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = save_hf_model("llama", path)
    return hf, jft.load(str(path), dtype="float32")


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma2")
    hf = save_hf_model("gemma2", path)
    return hf, jft.load(str(path), dtype="float32")


def _random_lora(model, seed=0, scale=0.05):
    lora = jft.lora.init(model, r=4, alpha=8, key=jax.random.key(seed))
    layers = {t: {"a": w["a"], "b": jax.random.normal(jax.random.key(seed + i + 1), w["b"].shape) * scale}
              for i, (t, w) in enumerate(lora.weights["layers"].items())}
    return jft.lora.LoRA({"layers": layers}, lora.config)


def _prompts(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_greedy_engine_equals_jft_generate_and_transformers(family, llama, gemma2):
    hf, model = {"llama": llama, "gemma2": gemma2}[family]
    prompts = _prompts(model, (5, 11, 8, 3))
    new = 12
    ours = JaxEngine(model, slots=3).generate(prompts, n=2, sampling=SamplingParams(max_tokens=new, temperature=0.0,
                                                                                      stop_token_ids=()))
    ref = jft.generate(model, prompts, max_new_tokens=new, eos_token_ids=())
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours.ids[2 * i] == ours.ids[2 * i + 1] == ref.ids[i] == hf_out  # the refilled slots too (3 < 8)
        assert ours.finish_reason[2 * i] == "length"


def test_greedy_engine_with_lora_equals_jft_generate(llama):
    _, model = llama
    lora = _random_lora(model)
    prompts = _prompts(model, (4, 9, 6), seed=3)
    engine = JaxEngine(model, slots=2)
    engine.sync(model.params, lora)
    ours = engine.generate(prompts, sampling=SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=()))
    assert ours.ids == jft.generate(model, prompts, max_new_tokens=10, lora=lora, eos_token_ids=()).ids
    assert ours.ids != jft.generate(model, prompts, max_new_tokens=10, eos_token_ids=()).ids


def test_engine_dequantizes_quantized_weights_once_when_they_fit(tmp_path, monkeypatch):
    from jft import memory
    from jft.rl import engine as engine_module

    save_hf_model("llama", tmp_path)
    model = jft.load(str(tmp_path), dtype="float32", quantize="nf4")
    dense = dataclasses.replace(model, params=jft.quant.dequantize_tree(model.params, jnp.float32))
    lora = _random_lora(model, seed=2)
    prompts = _prompts(model, (4, 9, 6), seed=8)
    sampling = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=())
    real_rollout, packed_bytes_in_loop = engine_module.rollout, []

    def traced_rollout(*args, **options):  # notes whether the decoding loop reads NF4's packed bytes
        packed_bytes_in_loop.append(loops_read_packed_bytes(real_rollout.trace(*args, **options).jaxpr))
        return real_rollout(*args, **options)

    monkeypatch.setattr(engine_module, "rollout", traced_rollout)
    runs = {}
    for name, m, dequantize in [("dense", dense, False), ("per step", model, False), ("once", model, True)]:
        engine = JaxEngine(m, lora, slots=2, dequantize=dequantize)
        runs[name] = engine.generate(prompts, sampling=sampling)
        assert engine.dequantized == (name == "once")
    assert packed_bytes_in_loop == [False, True, False]
    monkeypatch.setattr(engine_module, "rollout", real_rollout)
    assert runs["once"].ids == runs["per step"].ids == runs["dense"].ids
    for name in ("once", "per step"):
        for got, want in zip(runs[name].logprobs, runs["dense"].logprobs):
            np.testing.assert_allclose(got, want, atol=1e-5)

    # "auto": dense when the rollout fits half the free memory; never where the backend reports none (CPU)
    for free, fits in [(None, False), (2**40, True), (2**10, False)]:
        monkeypatch.setattr(memory, "free_device_bytes", lambda: free)
        engine = JaxEngine(model, lora, slots=2)
        assert engine.generate(prompts, sampling=sampling).ids == runs["dense"].ids
        assert engine.dequantized == fits
    engine = JaxEngine(dense, slots=2, dequantize=True)  # nothing quantized: nothing to do
    engine.generate(prompts, sampling=sampling)
    assert not engine.dequantized
    with pytest.raises(ValueError, match="dequantize"):
        JaxEngine(model, dequantize="always")


def _nucleus_log_probs(logits, temperature, top_p=1.0, top_k=0):
    """log-softmax of the tempered logits restricted to top-k, then the smallest set reaching top_p (numpy)."""
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros(z.shape, bool)
    p = np.exp(z - z.max())
    p /= p.sum()
    allowed = order[:top_k] if top_k else order
    mass = 0.0
    pk = p[allowed] / p[allowed].sum()
    for idx, prob in zip(allowed, pk):
        keep[idx] = True
        mass += prob
        if mass >= top_p:
            break
    out = np.full(z.shape, -np.inf)
    zk = z[keep]
    out[keep] = zk - (zk.max() + np.log(np.exp(zk - zk.max()).sum()))
    return out


@pytest.mark.parametrize("slots", [4, 2], ids=["prefilled", "refilled"])
def test_longrope_engine_takes_each_sequences_own_factors(tmp_path, slots):
    """Phi-3's longrope: each completion equals jft.generate on its prompt alone (which equals
    transformers), whether it stays within the original context (32), starts past it, or crosses it
    while decoding or, for a slot refilled token by token, while reading its prompt."""
    from tests.tiny_models import LONGROPE

    save_hf_model("phi3", tmp_path, **LONGROPE)
    model = jft.load(str(tmp_path), dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (5, 40, 20, 31)]
    new = 16
    engine = JaxEngine(model, slots=slots)
    got = engine.generate(prompts, sampling=SamplingParams(max_tokens=new, temperature=0.0, stop_token_ids=()))
    for prompt, ids in zip(prompts, got.ids):
        assert ids == jft.generate(model, [prompt], max_new_tokens=new, eos_token_ids=()).ids[0]

    # the training side takes each row's own factors too: a row's log-probs do not depend on the batch,
    # and equal the engine's where a sequence kept one factor set throughout (within, or past from the start)
    batch = build_batch(got, np.zeros(len(prompts)), max_completion_length=new, pad_id=0)
    whole = np.asarray(completion_logprobs(model.config, model.params, None, batch))
    for row in range(len(prompts)):
        alone = completion_logprobs(model.config, model.params, None, {k: v[row : row + 1] for k, v in batch.items()})
        np.testing.assert_allclose(whole[row], np.asarray(alone)[0], atol=1e-5, rtol=0)
    for row in (0, 1):
        np.testing.assert_allclose(whole[row], got.model_logprobs[row], atol=1e-4, rtol=0)


def test_sampled_frequencies_match_tempered_nucleus_softmax(llama):
    _, model = llama
    sharp = dataclasses.replace(model, params={**model.params, "lm_head": model.params["lm_head"] * 3.0})
    prompt = _prompts(model, (6,), seed=5)[0]
    temperature, top_p, n = 0.8, 0.8, 3000
    logits = np.asarray(jft.forward(sharp, [prompt]))[0, -1].astype(np.float64)
    want = np.exp(_nucleus_log_probs(logits, temperature, top_p))
    assert 3 <= (want > 0).sum() <= 60  # a distribution worth testing
    out = JaxEngine(sharp, slots=n).generate([prompt], n=n, sampling=SamplingParams(
        max_tokens=1, temperature=temperature, top_p=top_p, stop_token_ids=(), seed=123))
    counts = np.bincount([ids[0] for ids in out.ids], minlength=len(want))
    assert counts[want == 0].sum() == 0  # nothing outside the nucleus
    freq = counts / n
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-3), np.abs(freq - want).max()
    chi2 = ((counts - n * want)[want > 0] ** 2 / (n * want[want > 0])).sum()
    dof = (want > 0).sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof)


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_p=0.9), dict(temperature=0.0)])
def test_returned_logprobs_equal_teacher_forced_forward(llama, kw):
    _, model = llama
    lora = _random_lora(model, seed=7)
    prompts = _prompts(model, (4, 7), seed=9)
    engine = JaxEngine(model, lora, slots=3)
    out = engine.generate(prompts, n=3, sampling=SamplingParams(max_tokens=9, stop_token_ids=(), seed=1, **kw))
    t = kw["temperature"] or 1.0
    for prompt, ids, lp, mlp in zip(out.prompt_ids, out.ids, out.logprobs, out.model_logprobs):
        logits = np.asarray(jft.forward(model, [prompt + ids], lora=lora))[0].astype(np.float64)
        steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
        want = [_nucleus_log_probs(s, t, kw.get("top_p", 1.0), kw.get("top_k", 0))[tok] for s, tok in zip(steps, ids)]
        raw = [(s / t - np.logaddexp.reduce(s / t))[tok] for s, tok in zip(steps, ids)]
        np.testing.assert_allclose(lp, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(mlp, raw, atol=1e-4, rtol=0)


def test_seeds_stop_tokens_and_stop_strings(tmp_path):
    from jft.data.testing import make_tiny_tokenizer
    from jft.demo import build_tiny_model

    tok = make_tiny_tokenizer(vocab_size=400)
    build_tiny_model(str(tmp_path), tok, hidden=64, layers=2, intermediate=128)
    model = jft.load(str(tmp_path), dtype="float32")
    engine = JaxEngine(model, slots=4)
    sp = SamplingParams(max_tokens=12, temperature=1.0, stop_token_ids=(), seed=3)
    a, b = engine.generate(["hello there"], n=4, sampling=sp), engine.generate(["hello there"], n=4, sampling=sp)
    c = engine.generate(["hello there"], n=4, sampling=dataclasses.replace(sp, seed=4))
    assert a.ids == b.ids and a.ids != c.ids
    first = a.ids[0]
    stop_tok = first[4]
    cut = engine.generate(["hello there"], n=4, sampling=dataclasses.replace(sp, stop_token_ids=(stop_tok,)))
    assert cut.ids[0] == first[: first.index(stop_tok) + 1] and cut.finish_reason[0] == "stop"
    text = tok.decode(first, skip_special_tokens=True)
    stop_str = text[len(text) // 2 : len(text) // 2 + 2]
    cut = engine.generate(["hello there"], n=4, sampling=dataclasses.replace(sp, stop=(stop_str,)))
    assert cut.text[0] == text[: text.find(stop_str)] and cut.finish_reason[0] == "stop"
    assert stop_str in tok.decode(cut.ids[0], skip_special_tokens=True)
    assert stop_str not in tok.decode(cut.ids[0][:-1], skip_special_tokens=True)


# --- the training side ------------------------------------------------------------------------------------------


def test_completion_logprobs_equal_full_logits(gemma2):
    _, model = gemma2  # final-logit softcap: temperature must fold into the kernel's cap
    lora = _random_lora(model, seed=2)
    out = JaxEngine(model, lora).generate(_prompts(model, (5, 9), seed=4), n=2,
                                          sampling=SamplingParams(max_tokens=6, temperature=0.9, stop_token_ids=()))
    batch = build_batch(out, np.zeros(len(out)), max_completion_length=8, pad_id=0)
    got = np.asarray(completion_logprobs(model.config, model.params, lora, {k: jnp.asarray(v) for k, v in batch.items()},
                                         temperature=0.9, remat="none"))
    for row, (ids, mlp) in enumerate(zip(out.ids, out.model_logprobs)):
        np.testing.assert_allclose(got[row, : len(ids)], mlp, atol=1e-4)
        assert np.all(got[row, len(ids):] == 0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batches_give_the_same_update(llama, loss_type):
    _, model = llama
    lora = _random_lora(model, seed=4)
    out = JaxEngine(model, lora).generate(_prompts(model, (5, 9), seed=6), n=4,
                                          sampling=SamplingParams(max_tokens=6, temperature=1.0, stop_token_ids=(5, 9, 17)))
    rewards = np.random.default_rng(0).normal(size=len(out))
    batch = build_batch(out, np.asarray(group_advantages(rewards, 4)[0]), max_completion_length=8, pad_id=0)
    old = completion_logprobs(model.config, model.params, lora, {k: jnp.asarray(v) for k, v in batch.items()}, remat="none")
    batch["old_logprobs"] = np.asarray(old) + np.random.default_rng(1).normal(scale=0.2, size=old.shape)
    results = []
    for micro in (None, 2):
        cfg = GRPOConfig(prompts_per_step=2, num_generations=4, micro_batch_size=micro, loss_type=loss_type, beta=0.05,
                         max_completion_length=8, remat="none")
        import optax

        step = make_grpo_step(model.config, optax.sgd(1.0), cfg, donate=False)
        new, _, metrics = step(model.params, lora, optax.sgd(1.0).init(lora), batch)
        results.append((new, metrics))
    (a, ma), (b, mb) = results
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert float(ma["grad_norm"]) > 0 and float(ma["kl"]) > 0
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), atol=1e-6)


def _gsm8k_rows(n):
    with open(os.path.join(GSM8K, "train.jsonl")) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_gsm8k_rewards_on_real_answers():
    rows = _gsm8k_rows(20)
    good = [f"<reasoning>\n{r['answer'].split('####')[0]}\n</reasoning>\n<answer>\n{r['answer'].split('####')[1].strip()}\n"
            "</answer>" for r in rows]
    wrong = [g.replace("<answer>\n", "<answer>\n1") for g in good]
    answers = [r["answer"] for r in rows]
    assert gsm8k_answer_reward(None, good, answer=answers) == [1.0] * 20
    assert gsm8k_answer_reward(None, wrong, answer=answers) == [0.0] * 20
    assert gsm8k_format_reward(None, good) == [1.0] * 20
    assert gsm8k_format_reward(None, [r["answer"] for r in rows]) == [0.0] * 20
    chat = [[{"role": "assistant", "content": g}] for g in good]
    assert gsm8k_answer_reward(None, chat, answer=answers) == [1.0] * 20
    assert gsm8k_prompts(rows[:1])[0]["prompt"][1]["content"] == rows[0]["question"]


# --- learning and the front ends -----------------------------------------------------------------------------------


def _digit_sum_task(tmp_path):
    from jft.data.testing import make_tiny_tokenizer
    from jft.demo import build_tiny_model

    tok = make_tiny_tokenizer(vocab_size=400)
    build_tiny_model(str(tmp_path), tok, hidden=64, layers=2, intermediate=128)
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        rows.append({"prompt": f"{a}+{b}=", "target": a + b})
    return jft.load(str(tmp_path), dtype="float32"), rows


def answers_with_a_digit(prompts, completions, **kwargs):
    return [1.0 if c.strip()[:1].isdigit() else 0.0 for c in completions]


def answers_the_sum(prompts, completions, target, **kwargs):
    return [1.0 if c.strip()[:1] == str(t) else 0.0 for c, t in zip(completions, target)]


@pytest.mark.slow
def test_mean_reward_rises_on_a_verifiable_toy_task(tmp_path):
    model, rows = _digit_sum_task(tmp_path / "model")
    lora = jft.lora.init(model, r=8, alpha=16, train_embeddings=True, key=jax.random.key(0))
    cfg = GRPOConfig(prompts_per_step=8, num_generations=8, learning_rate=2e-2, max_completion_length=2,
                     max_prompt_length=16, reward_weights=(0.5, 1.0), progress=False, out_dir=str(tmp_path / "out"),
                     checkpoint_every=20)
    state = GRPO(model, lora, [answers_with_a_digit, answers_the_sum], config=cfg).fit(rows, steps=40)
    rewards = [h["reward"] for h in state.history]
    assert np.mean(rewards[:3]) < 0.15
    assert np.mean(rewards[-10:]) > np.mean(rewards[:3]) + 0.3, rewards
    assert np.mean([h["rewards/answers_the_sum/mean"] for h in state.history[-10:]]) > 0.05
    for name in ("metrics.jsonl", "reward.png", "loss.png"):
        assert os.path.exists(tmp_path / "out" / name)
    assert os.path.isdir(tmp_path / "out" / "checkpoints")
    logged = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(logged) == 40 and {"reward", "completion_length", "clip_fraction", "rewards/answers_the_sum/std"} <= set(logged[0])


def test_cli_grpo_on_gsm8k(tmp_path):
    from jft.cli import main
    from jft.data.testing import make_tiny_tokenizer
    from jft.demo import build_tiny_model

    rows = _gsm8k_rows(8)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = make_tiny_tokenizer(vocab_size=400, chat_template="chatml")
    build_tiny_model(str(tmp_path / "model"), tok, hidden=64, layers=2, intermediate=128)
    rc = main(["grpo", "--model", str(tmp_path / "model"), "--dataset", str(data), "--reward", "gsm8k", "--out",
               str(tmp_path / "out"), "--steps", "2", "--prompts-per-step", "2", "--num-generations", "2",
               "--max-completion-length", "8", "--max-prompt-length", "128", "--dtype", "float32", "--beta", "0.04",
               "--offload-embedding"])
    assert rc == 0
    logged = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(logged) == 2 and "rewards/gsm8k_answer_reward/mean" in logged[0] and "kl" in logged[0]
    assert os.path.exists(tmp_path / "out" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(ROOT, "notebooks", "grpo_gsm8k.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "mean reward" in outputs


def test_a_lora_without_targets_is_refused(llama):
    _, model = llama
    with pytest.raises(ValueError, match="the LoRA has no targets"):
        GRPO(model, jft.lora.init(model, r=2, targets=[]), [answers_with_a_digit])


def test_offloaded_embedding_trains_like_the_embedding_on_the_device(tmp_path):
    model, rows = _digit_sum_task(tmp_path / "model")
    lora = jft.lora.init(model, r=4, key=jax.random.key(0))
    cfg = GRPOConfig(prompts_per_step=2, num_generations=4, micro_batch_size=4, num_iterations=2, beta=0.05,
                     learning_rate=1e-2, max_completion_length=3, max_prompt_length=16, progress=False)
    on_device = GRPO(model, lora, [answers_the_sum], config=cfg).fit(rows, steps=3)
    host_model = dataclasses.replace(model, params=dict(model.params))  # offloading moves this model's table
    trainer = GRPO(host_model, lora, [answers_the_sum], config=cfg, offload_embedding=True)
    assert isinstance(host_model.params["embed"], np.ndarray)
    on_host = trainer.fit(rows, steps=3)
    for key in ("reward", "loss", "kl", "grad_norm", "clip_fraction"):
        expected, got = [h[key] for h in on_device.history], [h[key] for h in on_host.history]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9, err_msg=key)
    assert on_device.history[-1]["kl"] > 0  # the LoRA moved the policy: the check compares trained steps
    for a, b in zip(jax.tree.leaves(on_device.lora), jax.tree.leaves(on_host.lora)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_resume_gives_identical_lora(tmp_path):
    model, rows = _digit_sum_task(tmp_path / "model")

    def run(out, lora_seed, callbacks=(), resume=False):
        cfg = GRPOConfig(prompts_per_step=2, num_generations=4, learning_rate=1e-2, max_completion_length=2,
                         max_prompt_length=16, progress=False, out_dir=str(out), checkpoint_every=2, seed=3)
        lora = jft.lora.init(model, r=4, key=jax.random.key(lora_seed))
        return GRPO(model, lora, [answers_the_sum], config=cfg).fit(rows, steps=4, resume=resume, callbacks=callbacks)

    def kill_at_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    full = run(tmp_path / "full", 0)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", 0, callbacks=[kill_at_2])
    resumed = run(tmp_path / "killed", 9, resume=True)  # a different init: everything must come from the checkpoint
    for a, b in zip(jax.tree.leaves(full.lora), jax.tree.leaves(resumed.lora)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
