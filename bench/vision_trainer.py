"""The vision-language training step (`jft.vlm.train.make_step`, what `jft.vlm.train.fit` runs) on a
Qwen2-VL-2B-, Qwen2.5-VL-3B- or Qwen2.5-VL-7B-shaped model with random weights, NF4 language layers
and LoRA r=16 on every projection of both towers, for each attention implementation of the language
layers and each place of the token embedding (device, or host memory as `fit(offload_embedding=True)`
keeps it). Each batch is image+text chat examples (random images, a fixed size) made by the real
collator. Prints tokens/s (tokens the language model reads, padding excluded; median over the timed
steps), step time and peak device memory; each setting runs in its own process. On the GPU:

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/vision_trainer.py --kernels reference,auto --attention xla,cudnn
    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/vision_trainer.py --model qwen2.5-vl-3b --attention cudnn
    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/vision_trainer.py --model qwen2.5-vl-7b --attention cudnn --embedding host,device
    python bench/vision_trainer.py --small        # tiny shapes, to check the script on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# bench/profile.py would shadow the standard library's `profile`, which torch imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

# the shapes of Qwen2-VL-2B-Instruct and Qwen2.5-VL-3B-Instruct (their config.json)
QWEN2_VL_2B = dict(
    kind="qwen2_vl",
    text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
)
QWEN2_5_VL_3B = dict(
    kind="qwen2_5_vl",
    text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, hidden_act="silu",
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31]),
)
QWEN2_5_VL_7B = dict(
    kind="qwen2_5_vl",
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision=dict(QWEN2_5_VL_3B["vision"], out_hidden_size=3584),
)
MODELS = {"qwen2-vl-2b": QWEN2_VL_2B, "qwen2.5-vl-3b": QWEN2_5_VL_3B, "qwen2.5-vl-7b": QWEN2_5_VL_7B}
SMALL = dict(
    kind="qwen2_vl",
    text=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
    vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2),
)


def make_model_dir(shapes: dict, path: str, image_pixels: int) -> None:
    """A random Qwen2-VL or Qwen2.5-VL checkpoint (bf16 safetensors, made by transformers) with a local tokenizer."""
    import torch
    import transformers

    from jft.data.testing import make_tiny_tokenizer
    from jft.vlm.collator import QWEN_VL_CHAT_TEMPLATE

    tok = make_tiny_tokenizer(vocab_size=400, chat_template=None)
    tok.add_tokens(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], special_tokens=True)
    tok.chat_template, tok.eos_token = QWEN_VL_CHAT_TEMPLATE, "<|im_end|>"
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
           ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(shapes["text"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    config_class, model_class = {
        "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
    }[shapes["kind"]]
    config = config_class(text_config=text, vision_config=shapes["vision"], **ids)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = model_class(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    patch = shapes["vision"]["patch_size"]
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"patch_size": patch, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": patch * patch * 4,
                   "max_pixels": image_pixels}, f)


def examples(n: int, side: int, answer_words: int, seed: int = 0) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8))},
                                     {"type": "text", "text": "Describe this picture in detail."}]},
        {"role": "assistant", "content": " ".join(["the picture shows many small coloured dots"] * (answer_words // 7))}]}
        for _ in range(n)]


def run_one(args) -> dict:
    import jax
    import numpy as np
    import optax

    import jft.vlm as vlm
    from jft.nn.layers import embed_tokens_on_host
    from jft.nn.transformer import resolve_attention
    from jft.train.sft import offload_embedding_table, without_embedding
    from jft.vlm import train as vtrain
    from jft.vlm.collator import VisionCollator

    import jft

    jft.kernels.use(args.kernels)
    model = vlm.load(args.model_dir, dtype="bfloat16", quantize=None if args.quant == "none" else args.quant)
    lora = vtrain.init_lora(model, r=16, alpha=16, key=jax.random.key(0))
    collator = VisionCollator(model, max_seq_length=args.max_seq_length)
    attn_impl = resolve_attention(model.config.text, packed=False, attention=args.attention,
                                  dtype=model.params["embed"].dtype)
    optimizer = optax.adamw(2e-4)
    opt_state = optimizer.init(lora)
    step = vtrain.make_step(model.config, optimizer, remat=args.remat, attn_impl=attn_impl)
    batch = collator(examples(args.batch, args.side, args.answer_words))
    tokens = int((batch["segment_ids"] > 0).sum())
    params, with_rows = model.params, lambda batch: batch
    if args.embedding == "host":  # as fit(offload_embedding=True): each step's rows looked up on the host
        table = offload_embedding_table(model, lora)
        params = without_embedding(model.params)
        with_rows = lambda batch: dict(batch, inputs_embeds=embed_tokens_on_host(model.config.text, table, batch["input_ids"]))
    times, pending = [], with_rows(batch)
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        lora, opt_state, metrics = step(params, lora, opt_state, pending)
        pending = with_rows(batch)  # the next step's, while this one runs (as fit does)
        loss = float(metrics["loss"])  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    seconds = statistics.median(times)
    return {"attention": attn_impl, "kernels": args.kernels, "embedding": args.embedding, "batch": list(batch["input_ids"].shape), "tokens": tokens,
            "patches": int(np.sum(batch["frame"] >= 0)), "loss": loss, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="qwen2-vl-2b", help="the model's shapes (random weights)")
    p.add_argument("--attention", default="xla,cudnn", help="comma list of xla, cudnn, flash, auto")
    p.add_argument("--kernels", default="auto", help="comma list of reference, auto (the vision tower's attention: "
                                                    "the masked reference or, on GPU, the flash kernel)")
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    p.add_argument("--embedding", default="device", help="comma list of device, host (host: offload_embedding=True, "
                                                         "for untied models)")
    p.add_argument("--remat", default="full")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--side", type=int, default=896, help="image side in pixels (896: 1,024 image tokens)")
    p.add_argument("--answer-words", type=int, default=200)
    p.add_argument("--max-seq-length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--small", action="store_true")
    p.add_argument("--model-dir", help="where the random checkpoint is kept (made there if missing; default: a temporary dir)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.side, args.answer_words, args.steps, args.warmup = min(args.side, 56), min(args.answer_words, 35), 2, 1
    if args.one:
        print(json.dumps(run_one(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or tmp
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            make_model_dir(SMALL if args.small else MODELS[args.model], model_dir, image_pixels=args.side * args.side)
        print(f"{'kernels':>9} {'attention':>9} {'embed':>6} {'batch':>10} {'tokens':>7} {'patches':>8} {'step s':>7} {'tok/s':>8} "
              f"{'peak GiB':>9} {'loss':>7}")
        for kernels, attention, embedding in [(k, a, e) for k in args.kernels.split(",") for a in args.attention.split(",")
                                              for e in args.embedding.split(",")]:
            cmd = [sys.executable, __file__, "--one", "--model-dir", model_dir, "--attention", attention, "--kernels",
                   kernels, "--embedding", embedding, "--quant", args.quant, "--remat", args.remat, "--batch", str(args.batch), "--side", str(args.side),
                   "--answer-words", str(args.answer_words), "--max-seq-length", str(args.max_seq_length), "--steps",
                   str(args.steps), "--warmup", str(args.warmup)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{kernels:>9} {attention:>9} {embedding:>6} failed: {' | '.join(done.stderr.strip().splitlines()[-3:])[:300]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{kernels:>9} {r['attention']:>9} {embedding:>6} {'x'.join(map(str, r['batch'])):>10} {r['tokens']:>7} {r['patches']:>8} "
                  f"{r['step_s']:>7.3f} {r['tokens_per_s']:>8.0f} {r['peak_gib']:>9.2f} {r['loss']:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
