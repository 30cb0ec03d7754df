"""Rollout throughput of `jft.rl.JaxEngine` (or of `jft.generate`) on a Llama-3-8B-shaped model, against
the HBM roofline.

Each decode step must read every weight once plus the KV cache written so far, so with the copy
bandwidth B measured in the same run the roofline is
    tokens/s <= slots / ((weight_bytes + mean_kv_bytes) / B).

    python bench/rollout.py                       # 64 prompts x 512 new tokens, bf16
    python bench/rollout.py --quant nf4           # NF4 weights, dense once per call where they fit
    python bench/rollout.py --quant nf4 --dequantize false   # NF4, dequantized in every step
    python bench/rollout.py --api generate        # the same prompts through jft.generate (one batch)
    python bench/rollout.py --small               # tiny shapes, to check the script on CPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def copy_gbps(nbytes: int = 2**30, reps: int = 20, trials: int = 10) -> float:
    """The device's copy bandwidth: the best of several timings, since a single one can catch the
    GPU before its clocks have risen (it read 360-900 GB/s instead of about 3,260 that way)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    f(x).block_until_ready()
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            y = f(x)
        y.block_until_ready()
        best = max(best, 2 * nbytes * reps / (time.perf_counter() - t) / 1e9)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--quant", default="none", choices=["none", "nf4"])
    p.add_argument("--dequantize", default="auto", choices=["auto", "true", "false"],
                   help="JaxEngine's dequantize option (quantized weights only); for jft.generate, auto is "
                        "its own choice and true / false force it through generate.DEQUANTIZE_SHARE")
    p.add_argument("--api", default="engine", choices=["engine", "generate"])
    p.add_argument("--small", action="store_true")
    args = p.parse_args(argv)

    import jax

    import jft
    from jft.config import config_from_hf
    from jft.quant import param_bytes
    from jft.nn import generate as generate_module
    from jft.rl import JaxEngine, SamplingParams
    from train import LLAMA3_8B, SMALL, random_params

    config = config_from_hf(SMALL if args.small else LLAMA3_8B)
    bandwidth = copy_gbps(2**24 if args.small else 2**30)
    params = random_params(config, args.quant, jax.random.key(0))
    model = jft.Model(config, params)
    lora = jft.lora.init(model, r=16, alpha=16, key=jax.random.key(1))
    dequantize = {"auto": "auto", "true": True, "false": False}[args.dequantize]
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, size=(args.prompts, args.prompt_len)).tolist()
    if args.api == "engine":
        engine = JaxEngine(model, lora, slots=args.prompts, dequantize=dequantize)
        sampling = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, stop_token_ids=())
        run = lambda: engine.generate(prompts, sampling=sampling)
    else:
        if dequantize != "auto":
            generate_module.DEQUANTIZE_SHARE = float("inf") if dequantize else 0.0
        run = lambda: jft.generate(model, prompts, args.new_tokens, temperature=1.0, lora=lora, eos_token_ids=())

    t = time.perf_counter()
    run()  # compiles for exactly these shapes
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - t
    chose = f" (dequantized: {engine.dequantized})" if args.api == "engine" else ""
    new_tokens = int(sum(len(ids) for ids in out.ids))

    kv_per_token = 2 * config.num_layers * config.kv_dim * 2  # k and v, bf16
    mean_context = args.prompt_len + args.new_tokens / 2
    step_bytes = param_bytes(params) + args.prompts * mean_context * kv_per_token
    roofline = args.prompts / (step_bytes / (bandwidth * 1e9))
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; copy bandwidth {bandwidth:.0f} GB/s")
    print(f"weights {param_bytes(params) / 2**30:.2f} GiB ({args.quant}); {args.prompts} prompts x {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens each; {args.api}, dequantize={args.dequantize}{chose}; "
          f"first call (with compile) {warm_s:.1f} s")
    print(f"generated {new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.0f} tokens/s; "
          f"roofline {roofline:.0f} tokens/s; {new_tokens / elapsed / roofline:.1%} of roofline")


if __name__ == "__main__":
    main()
