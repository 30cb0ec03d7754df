"""`jft demo`: runs on a fresh machine with no hub access."""

from __future__ import annotations

import os

import jax
import numpy as np


def run_demo(out: str, steps: int | None = None, seed: int = 0) -> None:
    import jft
    from jft.config import config_from_hf
    from jft.convert.hf import save_params
    from jft.nn.transformer import init_params

    raw = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": 2}
    config = config_from_hf(raw)
    path = os.path.join(out, "tiny-llama")
    save_params(path, config, init_params(config, jax.random.key(seed)), raw)
    model = jft.load(path, dtype="float32")
    print(model)
    prompts = np.random.default_rng(seed).integers(3, 256, size=(2, 8)).tolist()
    print(jft.generate(model, prompts, max_new_tokens=8, eos_token_ids=()).ids)
