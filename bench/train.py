"""Training-step benchmark: jft's real SFT step on a Llama-3-8B-shaped model with random weights.

Prints one table row per configuration: tokens/s, step time, peak device memory and MFU against the
bf16 matmul rate measured in the same run. Run on the GPU with preallocation off:

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/train.py --quant nf4 --quant none
    python bench/train.py --small            # tiny shapes, to check the script on CPU

Each configuration runs in its own process, so "peak memory" is that configuration's own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
MODELS = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B}
SMALL = dict(LLAMA3_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def random_params(config, quant: str, key, mesh=None, host_embedding: bool = False):
    """bf16 (or quantized) params with random weights. Each top-level entry is made by its own
    program, the layers one at a time, so making them needs less memory than the training step
    (whose peak is what the table reports); with a mesh, each device makes only its own shard.
    host_embedding: the embedding is a numpy array made on the host (never on the device)."""
    import functools

    import jax
    import ml_dtypes
    import numpy as np

    shapes = jax.eval_shape(functools.partial(_random_params, config, quant), key)
    shardings = dict.fromkeys(shapes)
    if mesh is not None:
        from jft.sharding import param_shardings

        shardings = param_shardings(shapes, mesh)
    layer_shardings = shardings["layers"]
    params = {name: jax.jit(functools.partial(_random_entry, config, quant, name, layer_shardings=layer_shardings),
                            out_shardings=shardings[name])(key) for name in shapes if name != "embed" or not host_embedding}
    if host_embedding:
        rows = np.random.default_rng(0).standard_normal(shapes["embed"].shape, np.float32) * np.float32(0.02)
        params["embed"] = rows.astype(ml_dtypes.bfloat16)
    return params


def _random_params(config, quant: str, key):
    from jft.nn.transformer import param_shapes

    return {name: _random_entry(config, quant, name, key) for name in param_shapes(config)}


def _random_entry(config, quant: str, name: str, key, layer_shardings=None):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jft.nn.transformer import init_params, param_shapes
    from jft.quant import quantize

    shape = param_shapes(config)[name]
    if name == "final_norm":
        return jnp.ones(shape, jnp.bfloat16)
    if name != "layers":  # embed, lm_head
        return jax.random.normal(jax.random.fold_in(key, int(name == "lm_head")), shape, jnp.bfloat16) * 0.02
    one_layer = config.__class__(**{**config.__dict__, "num_layers": 1, "sliding_layers": config.sliding_layers[:1]})

    def layer(k):
        p = init_params(one_layer, k, jnp.bfloat16)["layers"]
        p = {n: v[0] for n, v in p.items()}
        if quant != "none":
            p = {n: quantize(v, quant) if v.ndim == 2 else v for n, v in p.items()}
        if layer_shardings is not None:  # one layer's slice of the stacked placement: no whole-stack temporaries
            p = jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))),
                             p, layer_shardings)
        return p

    return jax.lax.map(layer, jax.random.split(key, config.num_layers))


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """Measured dense bf16 matmul rate (the MFU ceiling)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a, a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def model_flops_per_token(config, seq: int, r: int) -> float:
    """Useful FLOPs per trained token: forward 2N, backward to activations 2N (the base is frozen:
    no weight gradients), plus LoRA's own forward/backward (6 per LoRA parameter) and attention."""
    c = config
    per_layer = c.hidden_size * (c.q_dim + 2 * c.kv_dim + c.q_dim) + 3 * c.hidden_size * c.intermediate_size
    dense = c.num_layers * per_layer + c.vocab_size * c.hidden_size
    lora = c.num_layers * r * (c.q_dim + c.hidden_size + 2 * (c.kv_dim + c.hidden_size) + c.q_dim + c.hidden_size
                               + 3 * (c.intermediate_size + c.hidden_size))
    attention = c.num_layers * 2 * 2 * seq * c.q_dim / 2  # QK^T and PV, causal half, per token (fwd)
    return 4 * dense + 6 * lora + 2 * attention


def model_config(args):
    from jft.config import config_from_hf

    return config_from_hf(SMALL if args.small else MODELS[args.model])


def setup(args):
    """The real jft SFT step and its inputs for one configuration: (step, params, lora, opt_state, batch)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jft

    config = model_config(args)
    if args.kernels:
        jft.kernels.use(args.kernels)
    mesh = None
    if args.mesh:
        data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
        mesh = jft.mesh(data=data, fsdp=fsdp, tensor=tensor)
    params = random_params(config, args.quant[0], jax.random.key(0), mesh, host_embedding=args.embedding == "host")
    lora = jft.lora.init(jft.Model(config, params), r=args.r, alpha=args.r, targets="all-linear", key=jax.random.key(1))
    if mesh is not None:
        lora = jft.sharding.replicate(lora, mesh)
    opt = optax.adamw(2e-4)
    opt_state = opt.init(lora)
    step = jft.train.make_sft_step(config, opt, remat=args.remat, attn_impl=args.attn)
    b, t = args.batch, args.seq
    ids = jax.random.randint(jax.random.key(2), (b, t), 0, config.vocab_size, jnp.int32)
    positions, segments = packed_layout(t, args.documents)
    batch = {"input_ids": ids, "labels": ids, "positions": jnp.broadcast_to(positions, (b, t)),
             "segment_ids": jnp.broadcast_to(segments, (b, t))}
    if mesh is not None:
        batch = jft.sharding.shard_batch({k: np.asarray(v) for k, v in batch.items()}, mesh)
        jax.set_mesh(mesh)  # this process runs one configuration
    return config, step, params, lora, opt_state, batch


def batch_source(args, config, params, batch):
    """A function giving each step's batch. With --embedding host it takes the table out of params
    (made on the host, as SFT(offload_embedding=True) keeps it) and, as SFT does, looks each step's
    rows up on the host; call it while the previous step runs."""
    if args.embedding != "host":
        return lambda: batch
    if args.mesh:
        raise SystemExit("--embedding host runs on one device")
    import jax.numpy as jnp
    import numpy as np

    from jft.nn.layers import embed_tokens_on_host

    table = params.pop("embed")
    ids = np.asarray(batch["input_ids"])
    return lambda: dict(batch, inputs_embeds=jnp.asarray(embed_tokens_on_host(config, table, ids)))


def packed_layout(t: int, documents: int):
    """(positions, segment ids) [t] of one row: `documents` documents of random lengths (fixed seed)
    filling 31/32 of it, positions restarting at each, then padding (segment 0), as packing makes rows.
    One document: the whole row, no padding."""
    import numpy as np

    if documents == 1:
        return np.arange(t, dtype=np.int32), np.ones(t, np.int32)
    filled = t - t // 32
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, filled), documents - 1, replace=False))
    starts = np.concatenate([[0], cuts])
    segments = np.zeros(t, np.int32)
    segments[:filled] = np.searchsorted(starts, np.arange(filled), side="right")
    positions = np.zeros(t, np.int32)
    positions[:filled] = np.arange(filled) - starts[segments[:filled] - 1]
    return positions, segments


def one_device_gib(args) -> float:
    """What XLA's compiled step would need on one device with the model unsharded: argument +
    output - donated + temp bytes (compiled only, nothing allocated)."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    import jft

    config = model_config(args)
    params = jax.eval_shape(functools.partial(_random_params, config, args.quant[0]), jax.random.key(0))
    lora = jax.eval_shape(lambda p, k: jft.lora.init(jft.Model(config, p), r=args.r, alpha=args.r, targets="all-linear", key=k),
                          params, jax.random.key(1))
    opt_state = jax.eval_shape(optax.adamw(2e-4).init, lora)
    batch = {k: jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32) for k in ("input_ids", "labels", "positions", "segment_ids")}
    step = jft.train.make_sft_step(config, optax.adamw(2e-4), remat=args.remat, attn_impl=args.attn)
    return device_bytes(step.lower(params, lora, opt_state, batch).compile()) / 2**30


def device_bytes(compiled) -> int:
    """XLA's device memory for a compiled step, per device: arguments + outputs - donated + temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def run_one(args) -> dict:
    import jax
    import numpy as np

    import jft

    one_device = one_device_gib(args) if args.mesh else None
    config, step, params, lora, opt_state, batch = setup(args)
    b, t = args.batch, args.seq
    inputs = batch_source(args, config, params, batch)
    t0 = time.perf_counter()
    step = step.lower(params, lora, opt_state, inputs()).compile()
    compile_s = time.perf_counter() - t0
    step_gib = device_bytes(step) / 2**30
    upcoming = inputs()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        lora, opt_state, metrics = step(params, lora, opt_state, upcoming)
        upcoming = inputs()
        float(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    return {"quant": args.quant[0], "attn": args.attn, "remat": args.remat, "kernels": args.kernels or "auto",
            "embedding": args.embedding,
            "batch": b, "seq": t, "r": args.r, "mesh": args.mesh or "1 device", "tokens_per_s": b * t / step_s, "step_s": step_s,
            "compile_s": compile_s, "peak_gib": peak / 2**30, "params_gib": jft.quant.param_bytes(params) / 2**30,
            "model_tflops_per_s": model_flops_per_token(config, t, args.r) * b * t / step_s / 1e12 / len(jax.devices()),
            "loss": float(metrics["loss"]), "model": "small" if args.small else args.model,
            "compiled_gib": step_gib, "one_device_gib": one_device}


def max_context(args) -> dict:
    """The longest seq (a multiple of 8192) whose step fits one device, by doubling then bisection
    over XLA's buffer assignment of the compiled step (compiling only: steps that would take minutes
    are cheap to check); then --steps real steps at that length, timed."""
    import jax
    import jax.numpy as jnp

    _, step, *state, _ = setup(args)  # state: params, lora, opt_state
    limit = args.memory_limit_gib * 2**30 if args.memory_limit_gib else jax.devices()[0].memory_stats()["bytes_limit"]

    def peak(seq):
        batch = {k: jax.ShapeDtypeStruct((args.batch, seq), jnp.int32) for k in ("input_ids", "labels", "positions", "segment_ids")}
        compiled = step.lower(*state, batch).compile()
        return device_bytes(compiled), getattr(compiled.memory_analysis(), "host_temp_size_in_bytes", 0)

    lo, hi = 0, 8192
    while peak(hi)[0] <= limit:
        lo, hi = hi, hi * 2
    while hi - lo > 8192:
        mid = (lo + hi) // 2 // 8192 * 8192
        lo, hi = (mid, hi) if peak(mid)[0] <= limit else (lo, mid)
    if lo == 0:
        raise SystemExit(f"not even {hi} tokens fit in {limit / 2**30:.1f} GiB")
    device, host = peak(lo)
    row = {"quant": args.quant[0], "remat": args.remat, "batch": args.batch, "max_seq": lo,
           "compiled_device_gib": device / 2**30, "compiled_host_gib": host / 2**30, "limit_gib": limit / 2**30}
    print(json.dumps(row), flush=True)
    state.clear()  # frees the device for the real run
    if args.steps:
        args.seq, args.warmup = lo, 0
        row["run"] = run_one(args)
    return row


def _comma_list(*choices):
    def checked(text):
        unknown = [item for item in text.split(",") if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return text

    return checked


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="llama3-8b", help="the model's shapes (random weights)")
    p.add_argument("--quant", action="append", choices=["none", "nf4", "fp8"], help="repeat for several runs")
    p.add_argument("--attn", default=None, help="comma list of xla, cudnn (default: cudnn on GPU, xla on CPU)")
    p.add_argument("--remat", default="full", help="comma list of none, full, save_dots, offload")
    p.add_argument("--kernels", default=None, help="comma list of reference, pallas, auto")
    p.add_argument("--embedding", default="device", type=_comma_list("device", "host"),
                   help="comma list of device, host (host: SFT's offload_embedding, rows looked up on the host each step)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--documents", type=int, default=1,
                   help="pack each row with this many documents of random lengths, then padding (needs --attn flash or "
                        "xla; MFU still counts whole-row attention)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny shapes (for checking the script on CPU)")
    p.add_argument("--mesh", help="data,fsdp,tensor: shard over that many devices (batch is the global batch)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one config in this process
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--max-context", action="store_true",
                   help="find the longest seq at --batch that fits one device (then run --steps steps at it)")
    p.add_argument("--memory-limit-gib", type=float, help="the memory --max-context fills (default: the device's limit)")
    args = p.parse_args(argv)
    if args.documents < 1 or args.documents > args.seq // 2:
        p.error(f"--documents must be between 1 and --seq / 2, got {args.documents}")
    return args


def main(argv=None):
    args = parse(argv)
    args.quant = args.quant or ["nf4", "none"]
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.max_context:
        import jax

        args.attn = args.attn or ("cudnn" if jax.default_backend() == "gpu" else "xla")
        row = max_context(args)
        print(json.dumps(row))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(row, f, indent=2)
        return
    # each configuration runs in a child with the caller's preallocation setting (default off); this
    # parent only measures the matmul ceiling and must not reserve the device's memory
    child_env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax

    on_gpu = jax.default_backend() == "gpu"
    attns = (args.attn or ("cudnn" if on_gpu else "xla")).split(",")
    rows = []
    ceiling = matmul_tflops(1024 if args.small else 8192)
    print(f"device: {jax.devices()[0].device_kind}; measured bf16 matmul: {ceiling:.0f} TFLOP/s; jax {jax.__version__}")
    if args.mesh:
        print(f"mesh data,fsdp,tensor = {args.mesh} over {len(jax.devices())} devices; peak = the largest per device")
    header = (f"{'quant':>5} {'attn':>6} {'remat':>9} {'kernels':>9} {'embed':>6} {'batch x seq':>12} {'tok/s':>9} "
              f"{'step s':>7} {'peak GiB':>9} {'MFU':>6}")
    print(header)
    runs = [(quant, attn, remat, kernels, embedding) for quant in args.quant for attn in attns
            for remat in args.remat.split(",") for kernels in (args.kernels or "auto").split(",")
            for embedding in args.embedding.split(",")]
    for quant, attn, remat, kernels, embedding in runs:
        cmd = [sys.executable, __file__, "--one", "--quant", quant, "--attn", attn, "--remat", remat,
               "--kernels", kernels, "--r", str(args.r), "--batch", str(args.batch), "--seq", str(args.seq),
               "--documents", str(args.documents), "--steps", str(args.steps), "--warmup", str(args.warmup), "--model", args.model,
               "--embedding", embedding]
        cmd += ["--small"] if args.small else []
        cmd += ["--mesh", args.mesh] if args.mesh else []
        done = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            print(f"{quant:>5} {attn:>6} {remat:>9} {kernels:>9} {embedding:>6} failed: {' | '.join(tail)[:300]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["mfu"] = row["model_tflops_per_s"] / ceiling
        rows.append(row)
        print(f"{quant:>5} {attn:>6} {remat:>9} {kernels:>9} {embedding:>6} {row['batch']:>5} x {row['seq']:<5} "
              f"{row['tokens_per_s']:>9.0f} {row['step_s']:>7.3f} {row['peak_gib']:>9.2f} {row['mfu']:>6.1%}"
              + (f"  (compiled step: {row['compiled_gib']:.1f} GiB per device; one device would need"
                 f" {row['one_device_gib']:.1f})" if args.mesh else "")
              + (f"  ({args.documents} documents a row)" if args.documents > 1 else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_tflops": ceiling, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
