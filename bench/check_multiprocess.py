"""Training over several processes, one GPU each (as on several hosts), against one process that
drives all of them.

    python bench/check_multiprocess.py      # on nvidia-h200-x2; --cpu to check the script on CPU

Each child joins the others with `jax.distributed.initialize()`, then runs SFT over
`jft.mesh(fsdp=N)` and GRPO over `jft.mesh(data=N)` on a tiny model and prints its numbers; the
parent prints the rows of both runs and their largest difference.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repo, not bench/ (its profile.py shadows the stdlib's)


def child(args):
    import jax

    if args.processes > 1:
        jax.distributed.initialize(args.address, num_processes=args.processes, process_id=args.process_id)
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np

    import jft
    from jft.data.testing import digit_count_reward, sum_prompts, sum_questions
    from jft.rl import GRPO, GRPOConfig

    n = len(jax.devices())
    model = jft.load(args.model, dtype="float32", quantize="nf4", progress=False)
    lora = jft.lora.init(model, r=4, alpha=8, key=jax.random.key(0))
    sft = jft.train.SFT(model, lora, learning_rate=1e-2, max_seq_length=64, batch_size=8, packing=True, progress=False,
                        mesh=jft.mesh(data=1, fsdp=n)).fit(sum_questions(), steps=4)

    cfg = GRPOConfig(prompts_per_step=4, num_generations=4, learning_rate=1e-2, max_completion_length=4,
                     max_prompt_length=16, beta=0.05, progress=False)
    grpo = GRPO(model, lora, [digit_count_reward], config=cfg, mesh=jft.mesh(data=n, fsdp=1)).fit(sum_prompts(), steps=3)
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "devices": n, "local": len(jax.local_devices()),
        "sft_loss": [h["loss"] for h in sft.history], "sft_grad_norm": [h["grad_norm"] for h in sft.history],
        "grpo": [[h["reward"], h["loss"], h["kl"]] for h in grpo.history],
        "lora_sum": float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(sft.lora)))}), flush=True)


def launch(processes: int, devices: int, model: str, cpu: bool) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    procs = []
    for i in range(processes):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if cpu:
            env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices // processes}")
        elif processes > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        cmd = [sys.executable, __file__, "--child", "--model", model, "--processes", str(processes),
               "--process-id", str(i), "--address", address]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        if p.returncode != 0:
            raise SystemExit(f"a child failed:\n{err[-3000:]}")
        results += [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--cpu", action="store_true", help="CPU devices and gloo collectives (to check the script)")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--model")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--address")
    args = p.parse_args()
    if args.child:
        return child(args)
    from jft.data.testing import make_tiny_tokenizer
    from jft.demo import build_tiny_model

    model = build_tiny_model(tempfile.mkdtemp(), make_tiny_tokenizer(vocab_size=400), hidden=128, layers=2, intermediate=256)
    (one,) = launch(1, args.devices, model, args.cpu)
    many = launch(args.devices, args.devices, model, args.cpu)
    for r in [one, *many]:
        print(json.dumps(r))
    flat = lambda r: r["sft_loss"] + r["sft_grad_norm"] + sum(r["grpo"], []) + [r["lora_sum"]]
    diff = max(abs(a - b) / max(abs(b), 1e-6) for r in many for a, b in zip(flat(r), flat(one)))
    print(f"one process over {one['devices']} devices vs {len(many)} processes of {many[0]['local']}: "
          f"largest relative difference {diff:.2e}")


if __name__ == "__main__":
    main()
