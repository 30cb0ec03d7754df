"""The user-facing trainer on the Llama-3-8B-shaped model of bench/train.py: `jft.train.SFT(...).fit`
over pre-tokenised rows of random tokens, for each remat setting (auto picks one). Prints the policy
the step ran with, tokens/s (the median of the trainer's own per-step figures after the first three
steps) and peak device memory. On the GPU:

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/trainer.py --remat auto,full
    python bench/trainer.py --small        # tiny shapes, to check the script on CPU

Each setting runs in its own process, so the peak is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from train import LLAMA3_8B, SMALL, random_params


def run_one(args) -> dict:
    import jax
    import numpy as np

    import jft
    from jft.config import config_from_hf

    config = config_from_hf(SMALL if args.small else LLAMA3_8B)
    model = jft.Model(config, random_params(config, args.quant, jax.random.key(0)))
    lora = jft.lora.init(model, r=16, alpha=16, targets="all-linear", key=jax.random.key(1))
    rng = np.random.default_rng(0)
    rows = [{"input_ids": ids, "labels": ids}
            for ids in rng.integers(0, config.vocab_size, (8 * args.batch, args.seq), dtype=np.int32)]
    trainer = jft.train.SFT(model, lora, max_seq_length=args.seq, batch_size=args.batch, remat=args.remat, progress=False)
    state = trainer.fit(rows, steps=args.steps)
    stats = jax.devices()[0].memory_stats() or {}
    return {"remat": args.remat, "ran_with": state.remat, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "tokens_per_s": statistics.median(h["tokens_per_s"] for h in state.history[3:])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--remat", default="auto,full", help="comma list of auto, none, full, offload, save_dots")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp8", "none"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--small", action="store_true")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.seq = min(args.seq, 64)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    print(f"{'remat':>9} {'ran with':>9} {'batch x seq':>12} {'tok/s':>9} {'peak GiB':>9}")
    for remat in args.remat.split(","):
        cmd = [sys.executable, __file__, "--one", "--remat", remat, "--quant", args.quant, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps)] + (["--small"] if args.small else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{remat:>9} failed: {' | '.join(done.stderr.strip().splitlines()[-3:])[:300]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{remat:>9} {row['ran_with']:>9} {args.batch:>5} x {args.seq:<5} {row['tokens_per_s']:>9.0f} "
              f"{row['peak_gib']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
