"""Sharded GRPO and SFT with the embedding in host memory, on the visible devices, against one device.

    python bench/check_sharded.py      # on nvidia-h200-x2; prints each run's per-step numbers

A functional check on the GPUs of what tests/test_sharding.py checks on 8 CPU devices: a tiny
model, GRPO over meshes (data=2) and (fsdp=2) against no mesh, and SFT(offload_embedding=True),
alone and with fsdp=2, against the table on the device. Then the same GRPO on NF4 weights, with the
rollouts' dense-once dequantize ("auto", which a GPU takes) against dequantizing in every step and
with GRPO(offload_embedding=True), and SFT(remat="auto") over fsdp=2 against remat="full". The rows
should agree.
"""

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")
sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo, not bench/ (its profile.py shadows the stdlib's)

import jft  # noqa: E402
from jft.data.testing import digit_count_reward, make_tiny_tokenizer, sum_prompts, sum_questions  # noqa: E402
from jft.demo import build_tiny_model  # noqa: E402
from jft.rl import GRPO, GRPOConfig, JaxEngine  # noqa: E402

print(jax.devices(), flush=True)
path = build_tiny_model(tempfile.mkdtemp(), make_tiny_tokenizer(vocab_size=400), hidden=128, layers=2, intermediate=256)
model = jft.load(path, dtype="float32", progress=False)
lora = jft.lora.init(model, r=4, alpha=8, key=jax.random.key(0))
rows = sum_questions()
kw = dict(learning_rate=1e-2, max_seq_length=64, batch_size=8, packing=True, progress=False)
dev = jft.train.SFT(model, lora, **kw).fit(rows, steps=4)
host_model = dataclasses.replace(model, params=dict(model.params))
host = jft.train.SFT(host_model, lora, offload_embedding=True, **kw).fit(rows, steps=4)
print("SFT device embed losses", [round(h["loss"], 6) for h in dev.history])
print("SFT host embed losses  ", [round(h["loss"], 6) for h in host.history])
if len(jax.devices()) >= 2:
    fsdp = jft.train.SFT(host_model, lora, offload_embedding=True, mesh=jft.mesh(data=1, fsdp=2), **kw).fit(rows, steps=4)
    print("SFT host embed, fsdp=2 ", [round(h["loss"], 6) for h in fsdp.history])

prompts = sum_prompts()
cfg = GRPOConfig(prompts_per_step=4, num_generations=4, learning_rate=1e-2, max_completion_length=4,
                 max_prompt_length=16, beta=0.05, progress=False)
meshes = [None] + ([jft.mesh(data=2, fsdp=1), jft.mesh(data=1, fsdp=2)] if len(jax.devices()) >= 2 else [])
for m in meshes:
    t = time.perf_counter()
    r = GRPO(model, lora, [digit_count_reward], config=cfg, mesh=m).fit(prompts, steps=3)
    devs = len(jax.tree.leaves(r.lora)[0].sharding.device_set)
    print("GRPO mesh", None if m is None else dict(m.shape), "lora on", devs, "devices;",
          [(h["reward"], round(h["loss"], 6), round(h["kl"], 6)) for h in r.history], f"{time.perf_counter() - t:.1f}s", flush=True)

nf4 = jft.load(path, dtype="float32", quantize="nf4", progress=False)
for m in meshes:
    for dequantize in ("auto", False):
        engine = JaxEngine(nf4, lora, slots=cfg.prompts_per_step * cfg.num_generations, dequantize=dequantize)
        r = GRPO(nf4, lora, [digit_count_reward], engine=engine, config=cfg, mesh=m).fit(prompts, steps=3)
        print("NF4 GRPO mesh", None if m is None else dict(m.shape), f"dequantize={dequantize!r} (made dense: "
              f"{engine.dequantized});", [(h["reward"], round(h["loss"], 6), round(h["kl"], 6)) for h in r.history],
              flush=True)
host_nf4 = dataclasses.replace(nf4, params=dict(nf4.params))
trainer = GRPO(host_nf4, lora, [digit_count_reward], config=cfg, offload_embedding=True)
r = trainer.fit(prompts, steps=3)
print(f"NF4 GRPO, embedding on the host (made dense: {trainer.engine.dequantized});",
      [(h["reward"], round(h["loss"], 6), round(h["kl"], 6)) for h in r.history], flush=True)
if len(jax.devices()) >= 2:
    for remat in ("auto", "full"):
        r = jft.train.SFT(nf4, lora, remat=remat, mesh=jft.mesh(data=1, fsdp=2), **kw).fit(rows, steps=4)
        print(f"NF4 SFT fsdp=2 remat={remat!r} ran {r.remat}:", [round(h["loss"], 6) for h in r.history], flush=True)
