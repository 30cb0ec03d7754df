"""The `jft` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _generate(args) -> int:
    import jft

    model = jft.load(args.model, dtype=args.dtype, quantize=args.quantize)
    lora = None
    if args.lora:
        from jft.convert import peft

        lora = peft.load_lora(model, args.lora)
    prompts = args.prompt if args.raw else [_chat_prompt(model.tokenizer, p, args.template) for p in args.prompt]
    out = jft.generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, seed=args.seed, lora=lora)
    for prompt, text in zip(args.prompt, out.text):
        print(f"### {prompt}\n{text}\n")
    return 0


def _chat_prompt(tokenizer, prompt: str, template: str | None):
    """The prompt as a user turn of the chat template (as `jft train` formats examples) in token ids;
    the plain text where there is no template (a base model, and no --template)."""
    from jft.data import render

    has_template = template is not None or getattr(tokenizer, "chat_template", None)
    if tokenizer is None or not has_template:
        return prompt
    text = render([{"role": "user", "content": prompt}], tokenizer, template, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_TRAIN_DEFAULTS = dict(quantize=None, dtype="bfloat16", r=16, alpha=16.0, dropout=0.0, targets="all-linear",
                       use_rslora=False, train_embeddings=False, steps=None, epochs=None, lr=2e-4, embedding_lr=None,
                       batch_size=2, grad_accum=1, max_seq_length=2048, packing=False, template=None,
                       responses_only=True, format=None, warmup_steps=0, schedule="linear", weight_decay=0.0,
                       remat="auto", eval_dataset=None, eval_every=0, checkpoint_every=0, resume=False, seed=0,
                       split="train", mesh=None, offload_embedding=False, distributed=None)


def _mesh(spec):
    """--mesh "data,fsdp,tensor" (one of them may be -1: the devices left) as a jft.mesh, or None."""
    if not spec:
        return None
    import jft

    try:
        data, fsdp, tensor = (int(x) for x in str(spec).split(","))
    except ValueError:
        raise ValueError(f"--mesh takes data,fsdp,tensor such as 1,-1,1 (FSDP over every device), got {spec!r}") from None
    return jft.mesh(data=data, fsdp=fsdp, tensor=tensor)


def _start_distributed(spec) -> None:
    """--distributed: join the other hosts' processes before any device is touched. "auto" lets JAX
    find them (SLURM, Open MPI, TPU pods, ...); otherwise "coordinator host:port,processes,process id"."""
    if not spec:
        return
    import jax

    if spec == "auto":
        jax.distributed.initialize()
        return
    try:
        address, processes, process_id = str(spec).rsplit(",", 2)
        processes, process_id = int(processes), int(process_id)
    except ValueError:
        raise ValueError(f"--distributed takes auto or host:port,processes,process_id such as 10.0.0.1:1234,2,0, "
                         f"got {spec!r}") from None
    jax.distributed.initialize(address, num_processes=processes, process_id=process_id)


def _train_options(args) -> dict:
    """CLI flags over a --config YAML over the defaults."""
    opts = dict(_TRAIN_DEFAULTS)
    if args.config:
        import yaml

        with open(args.config) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{args.config} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config} must hold a mapping of option: value")
        unknown = set(loaded) - set(_TRAIN_DEFAULTS) - {"model", "dataset", "out"}
        if unknown:
            raise ValueError(f"{args.config}: unknown keys {sorted(unknown)}")
        opts.update({k.replace("-", "_"): v for k, v in loaded.items()})
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command", "config")})
    for required in ("model", "dataset", "out"):
        if not opts.get(required):
            raise ValueError(f"--{required} is required (on the command line or in --config)")
    _check_out_dir(opts["out"])
    if opts["steps"] is None and opts["epochs"] is None:
        opts["epochs"] = 1
    return opts


def _check_out_dir(out: str) -> None:
    """Before anything loads: --out must be a directory or creatable as one."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory")


def _train(args) -> int:
    import jax

    import jft

    o = _train_options(args)
    _start_distributed(o["distributed"])
    mesh = _mesh(o["mesh"])
    model = jft.load(o["model"], dtype=o["dtype"], quantize=o["quantize"])
    print(model)
    targets = o["targets"] if o["targets"] == "all-linear" else tuple(t.strip() for t in str(o["targets"]).split(","))
    lora = jft.lora.init(model, r=o["r"], alpha=o["alpha"], targets=targets, dropout=o["dropout"],
                         use_rslora=o["use_rslora"], train_embeddings=o["train_embeddings"], key=jax.random.key(o["seed"]))
    dataset = jft.data.load(o["dataset"], split=o["split"])
    eval_dataset = jft.data.load(o["eval_dataset"]) if o["eval_dataset"] else None
    trainer = jft.train.SFT(
        model, lora, learning_rate=o["lr"], embedding_learning_rate=o["embedding_lr"], weight_decay=o["weight_decay"],
        lr_schedule=o["schedule"], warmup_steps=o["warmup_steps"], max_seq_length=o["max_seq_length"],
        batch_size=o["batch_size"], grad_accum=o["grad_accum"], packing=o["packing"], template=o["template"],
        responses_only=o["responses_only"], format=o["format"], remat=o["remat"], out_dir=o["out"],
        checkpoint_every=o["checkpoint_every"], eval_every=o["eval_every"], seed=o["seed"], mesh=mesh,
        offload_embedding=o["offload_embedding"])
    state = trainer.fit(dataset, steps=o["steps"], epochs=o["epochs"] if o["steps"] is None else None,
                        eval_dataset=eval_dataset, resume=o["resume"])
    _save_adapter(model, state.lora, o["out"], "loss.png")
    return 0


def _save_adapter(model, lora, out: str, plot: str) -> None:
    """The trained LoRA as a PEFT adapter in out/adapter, written by the main process alone."""
    import jft

    if jft.sharding.is_main_process():
        adapter = f"{out}/adapter"
        jft.convert.save_lora(model, lora, adapter)
        print(f"adapter (PEFT format): {adapter}; metrics: {out}/metrics.jsonl; plot: {out}/{plot}")


def _export(args) -> int:
    import jft

    if args.quant is not None and args.format != "gguf":
        raise ValueError(f"--quant applies to --format gguf only (--format {args.format} does not take it)")
    quantize = "nf4" if args.format == "merged-4bit" else None
    model = jft.load(args.base, dtype="float32" if args.format == "gguf" else args.dtype, quantize=quantize)
    lora = jft.convert.load_lora(model, args.lora) if args.lora else None
    if args.format == "lora":
        if lora is None:
            raise ValueError("--format lora needs --lora")
        jft.convert.save_lora(model, lora, args.out)
    elif args.format == "merged":
        jft.convert.save_merged(model, lora, args.out, dtype=args.dtype)
    elif args.format == "merged-4bit":
        jft.convert.save_merged(model, lora, args.out, dtype=args.dtype, quantize="nf4")
    else:
        from jft.convert.gguf import save_gguf

        for path in save_gguf(model, lora, args.out, quant=[q.strip() for q in (args.quant or "q8_0").split(",")]):
            print(f"wrote {path}")
        return 0
    print(f"wrote {args.out}")
    return 0


def _demo(args) -> int:
    from jft.demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed)
    return 0


def _reward_fns(specs):
    """Built-in reward names (gsm8k, gsm8k_format, gsm8k_answer) or 'module:function' references."""
    import importlib

    from jft.rl.rewards import BUILTIN

    fns = []
    for spec in specs:
        if spec in BUILTIN:
            fns.extend(BUILTIN[spec])
        elif ":" in spec:
            module, name = spec.split(":", 1)
            try:
                fns.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError) as e:
                raise ValueError(f"reward {spec!r} cannot be loaded: {e}") from None
        else:
            raise ValueError(f"unknown reward {spec!r}: use one of {sorted(BUILTIN)} or module:function")
    return fns


def _grpo(args) -> int:
    import jax

    import jft
    from jft.rl import GRPO, GRPOConfig, gsm8k_prompts

    rewards = _reward_fns(args.reward)
    try:
        weights = tuple(float(w) for w in args.reward_weights.split(",")) if args.reward_weights else None
    except ValueError:
        raise ValueError(f"--reward-weights takes numbers separated by commas, got {args.reward_weights!r}") from None
    cfg = GRPOConfig(
        prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
        micro_batch_size=args.micro_batch_size, num_iterations=args.num_iterations, learning_rate=args.lr,
        beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level, scale_rewards=args.scale_rewards,
        reward_weights=weights, max_prompt_length=args.max_prompt_length, max_completion_length=args.max_completion_length,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, out_dir=args.out,
        checkpoint_every=args.checkpoint_every, seed=args.seed)
    _check_out_dir(args.out)
    _start_distributed(args.distributed)
    mesh = _mesh(args.mesh)
    model = jft.load(args.model, dtype=args.dtype, quantize=args.quantize)
    print(model)
    targets = args.targets if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    lora = jft.lora.init(model, r=args.r, alpha=args.alpha, targets=targets, key=jax.random.key(args.seed))
    rows = [dict(r) for r in jft.data.load(args.dataset, split=args.split)]
    if rows and "prompt" not in rows[0] and {"question", "answer"} <= set(rows[0]):
        rows = gsm8k_prompts(rows)  # GSM8K layout: system prompt asking for <reasoning>/<answer>
    engine = None
    if args.engine == "vllm":
        from jft.rl.vllm_engine import VllmEngine

        engine = VllmEngine(model, lora, max_model_len=args.max_prompt_length + args.max_completion_length)
    trainer = GRPO(model, lora, rewards, engine=engine, config=cfg, mesh=mesh, offload_embedding=args.offload_embedding)
    state = trainer.fit(rows, steps=args.steps, resume=args.resume)
    _save_adapter(model, state.lora, args.out, "reward.png")
    return 0


_DISTRIBUTED_HELP = ("run one process per host, all with the same command, the mesh over every host's devices: "
                     "alone, the hosts are found by JAX (SLURM, Open MPI, TPU pods); or give the coordinator's "
                     "host:port, the process count and this process's id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jft", description="JAX fine-tuning: LoRA/QLoRA, GRPO, export.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a model (local dir or hub id)")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--lora", help="a PEFT adapter directory")
    g.add_argument("--template", help="chat template (chatml, llama-3, ...) for a model whose tokenizer has none")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--quantize", choices=["nf4", "fp8"])
    g.set_defaults(func=_generate)

    t = sub.add_parser("train", help="supervised LoRA/QLoRA fine-tuning; writes a PEFT adapter, metrics and a loss plot")
    t.add_argument("--config", help="a YAML file with any of the options below (flags override it)")
    t.add_argument("--model", help="local model directory or hub id")
    t.add_argument("--dataset", help="jsonl/json/parquet/csv file or hub dataset id")
    t.add_argument("--out", help="output directory")
    t.add_argument("--eval-dataset")
    t.add_argument("--split")
    t.add_argument("--quantize", choices=["nf4", "fp8"])
    t.add_argument("--dtype")
    t.add_argument("--r", type=int)
    t.add_argument("--alpha", type=float)
    t.add_argument("--dropout", type=float)
    t.add_argument("--targets", help="all-linear or a comma list of q,k,v,o,gate,up,down")
    t.add_argument("--use-rslora", action="store_const", const=True)
    t.add_argument("--train-embeddings", action="store_const", const=True)
    t.add_argument("--steps", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--embedding-lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--max-seq-length", type=int)
    t.add_argument("--packing", action="store_const", const=True)
    t.add_argument("--template", help="chat template name (chatml, llama-3, ...) for base models")
    t.add_argument("--format", help="dataset format (alpaca, sharegpt, messages, prompt_completion, text, ...)")
    t.add_argument("--responses-only", dest="responses_only", action="store_const", const=True)
    t.add_argument("--no-responses-only", dest="responses_only", action="store_const", const=False)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--schedule", choices=["linear", "cosine", "constant"])
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--remat", choices=["auto", "none", "full", "offload", "save_dots"],
                   help="activation memory for speed; auto (the default): the fastest that fits the GPU")
    t.add_argument("--offload-embedding", action="store_const", const=True,
                   help="keep the frozen token embedding in host memory (untied models; 1 GiB less on an 8B)")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--resume", action="store_const", const=True)
    t.add_argument("--seed", type=int)
    t.add_argument("--mesh", help="data,fsdp,tensor: shard over the devices (e.g. 1,-1,1 for FSDP over all)")
    t.add_argument("--distributed", nargs="?", const="auto", metavar="HOST:PORT,PROCESSES,ID", help=_DISTRIBUTED_HELP)
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="write a trained adapter as PEFT, merged safetensors, bnb-4bit or GGUF")
    e.add_argument("--base", required=True, help="the base model (local dir or hub id)")
    e.add_argument("--lora", help="a PEFT adapter directory")
    e.add_argument("--format", required=True, choices=["lora", "merged", "merged-4bit", "gguf"])
    e.add_argument("--quant", help="GGUF quant types, comma separated (q4_k_m, q8_0, f16, ...; default q8_0)")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export)

    d = sub.add_parser("demo", help="build a tiny model locally, fine-tune it on arithmetic, show the result")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    r = sub.add_parser("grpo", help="GRPO reinforcement learning of a LoRA with reward functions")
    r.add_argument("--model", required=True, help="local model directory or hub id")
    r.add_argument("--dataset", required=True, help="rows with a 'prompt' (or GSM8K's question/answer)")
    r.add_argument("--reward", action="append", required=True,
                   help="gsm8k, gsm8k_format, gsm8k_answer or module:function; repeat to combine")
    r.add_argument("--reward-weights", help="comma separated, one per reward function")
    r.add_argument("--out", required=True)
    r.add_argument("--split", default="train")
    r.add_argument("--steps", type=int, default=100)
    r.add_argument("--prompts-per-step", type=int, default=4)
    r.add_argument("--num-generations", type=int, default=8)
    r.add_argument("--micro-batch-size", type=int)
    r.add_argument("--num-iterations", type=int, default=1)
    r.add_argument("--max-prompt-length", type=int, default=512)
    r.add_argument("--max-completion-length", type=int, default=256)
    r.add_argument("--lr", type=float, default=5e-6)
    r.add_argument("--beta", type=float, default=0.0, help="KL coefficient (reference = the model without LoRA)")
    r.add_argument("--epsilon", type=float, default=0.2)
    r.add_argument("--epsilon-high", type=float)
    r.add_argument("--loss-type", default="dapo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    r.add_argument("--importance-sampling-level", default="token", choices=["token", "sequence"])
    r.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"])
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--min-p", type=float, default=0.0)
    r.add_argument("--engine", default="jax", choices=["jax", "vllm"])
    r.add_argument("--mesh", help="data,fsdp,tensor: shard over the devices (e.g. 1,-1,1 for FSDP over all)")
    r.add_argument("--distributed", nargs="?", const="auto", metavar="HOST:PORT,PROCESSES,ID", help=_DISTRIBUTED_HELP)
    r.add_argument("--quantize", choices=["nf4", "fp8"])
    r.add_argument("--offload-embedding", action="store_true",
                   help="keep the frozen token embedding in host memory (untied models; 1 GiB less on an 8B)")
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--r", type=int, default=16)
    r.add_argument("--alpha", type=float, default=16.0)
    r.add_argument("--targets", default="all-linear")
    r.add_argument("--checkpoint-every", type=int, default=0)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_grpo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jft.memory import OutOfMemoryError, explain_out_of_memory

    args = build_parser().parse_args(argv)
    try:
        # training, rollouts and generation name their own options; this covers the rest (loading, export)
        with explain_out_of_memory(f"jft {args.command}", "--quantize nf4 (train, grpo, generate) or a smaller model"):
            return args.func(args)
    except (FileNotFoundError, ValueError, OSError, OutOfMemoryError) as e:
        print(f"jft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (with --checkpoint-every, --resume continues from the last checkpoint)"
        print(f"jft: interrupted{hint if args.command in ('train', 'grpo') else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
