"""`jft demo`: the whole QLoRA workflow on a fresh machine, with no downloads.

It builds a tiny Llama-architecture model and a BPE tokenizer locally, makes a synthetic arithmetic
instruction dataset, pre-trains the tiny base briefly so it speaks the format, then QLoRA-fine-tunes
it (NF4 frozen weights) on held-in problems and shows held-out answers before and after.
"""

from __future__ import annotations

import json
import os
import random

import jax

ADD_TEMPLATE = "What is {a} plus {b}?"


def build_tiny_model(path: str, tokenizer, *, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 256, seed: int = 0, model_type: str = "llama") -> str:
    """Writes a randomly initialised HF-format model (config, safetensors, tokenizer) to `path`."""
    from jft.config import config_from_hf
    from jft.convert.hf import save_params
    from jft.nn.transformer import init_params

    raw = {"model_type": model_type, "architectures": ["LlamaForCausalLM"], "vocab_size": len(tokenizer),
           "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = config_from_hf(raw)
    save_params(path, config, init_params(config, jax.random.key(seed)), raw)
    tokenizer.save_pretrained(path)
    return path


def arithmetic_problems(n: int, seed: int) -> list[dict]:
    """Addition word problems as chat rows: {"messages": [user, assistant]}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"messages": [{"role": "user", "content": ADD_TEMPLATE.format(a=a, b=b)},
                                  {"role": "assistant", "content": f"The answer is {a + b}."}]})
    return rows


def _accuracy(model, lora, rows) -> tuple[float, list[str]]:
    import jft

    prompts = [model.tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
               for r in rows]
    out = jft.generate(model, prompts, max_new_tokens=12, lora=lora)
    correct = [r["messages"][1]["content"].strip() == t.strip() for r, t in zip(rows, out.text)]
    return sum(correct) / len(rows), out.text


def run_demo(out: str, steps: int | None = None, seed: int = 0) -> dict:
    import jft
    from jft.data.testing import make_tiny_tokenizer

    steps = steps or 300
    os.makedirs(out, exist_ok=True)
    train_rows, test_rows = arithmetic_problems(2000, seed), arithmetic_problems(32, seed + 1)
    corpus = [m["content"] for r in train_rows[:400] for m in r["messages"]]
    print("1/4 building a tiny Llama-architecture model and BPE tokenizer locally")
    tokenizer = make_tiny_tokenizer(vocab_size=400, chat_template="chatml", texts=corpus)
    base_dir = build_tiny_model(os.path.join(out, "base"), tokenizer, seed=seed)

    print("2/4 QLoRA: loading the base with NF4 frozen weights, adding LoRA r=16 on all linear layers")
    model = jft.load(base_dir, dtype="float32", quantize="nf4")
    print(f"    {model}")
    lora = jft.lora.init(model, r=16, alpha=32, targets="all-linear", train_embeddings=True, key=jax.random.key(seed))
    before, _ = _accuracy(model, lora, test_rows[:8])

    print(f"3/4 fine-tuning for {steps} steps on {len(train_rows)} arithmetic problems (loss on answers only)")
    trainer = jft.train.SFT(model, lora, learning_rate=3e-3, embedding_learning_rate=3e-3, max_seq_length=64,
                            batch_size=16, packing=True, out_dir=out, warmup_steps=10, eval_every=max(steps // 5, 1))
    state = trainer.fit(train_rows, steps=steps, eval_dataset=test_rows)

    print("4/4 held-out problems after fine-tuning:")
    after, answers = _accuracy(model, state.lora, test_rows)
    for r, a in list(zip(test_rows, answers))[:5]:
        print(f"    {r['messages'][0]['content']!r} -> {a!r}")
    jft.convert.save_lora(model, state.lora, os.path.join(out, "adapter"))
    first = next(h["loss"] for h in state.history if "loss" in h)
    last = [h["loss"] for h in state.history if "loss" in h][-1]
    summary = {"first_loss": first, "last_loss": last, "accuracy_before": before, "accuracy_after": after}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"loss {first:.3f} -> {last:.3f}; held-out accuracy {before:.0%} -> {after:.0%}")
    print(f"outputs in {out}: adapter/ (PEFT), loss.png, metrics.jsonl, summary.json")
    return summary
