"""The `jft` command line."""

from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    import jft

    model = jft.load(args.model, dtype=args.dtype, quantize=args.quantize)
    lora = None
    if args.lora:
        from jft.convert import peft

        lora = peft.load_lora(model, args.lora)
    out = jft.generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, seed=args.seed, lora=lora)
    for prompt, text in zip(args.prompt, out.text):
        print(f"### {prompt}\n{text}\n")
    return 0


def _demo(args) -> int:
    from jft.demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jft", description="JAX fine-tuning: LoRA/QLoRA, GRPO, export.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a model (local dir or hub id)")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--lora", help="a PEFT adapter directory")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--quantize", choices=["nf4", "fp8"])
    g.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="build a tiny model locally, fine-tune it on arithmetic, show the result")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"jft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
