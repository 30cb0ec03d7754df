"""Out-of-memory errors: real RESOURCE_EXHAUSTED errors from XLA become `jft.OutOfMemoryError` naming
the work and what to change.

Each case asks XLA for hundreds of GiB or more: on the CPU backend that allocation is refused at
once (more than the machine's memory and swap), before anything runs, so no test really uses it.
Training runs XLA's masked attention, whose scores are that large on any backend (a flash kernel
would fit a GPU).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.memory import OutOfMemoryError, explain_out_of_memory, memory_in_use, out_of_memory_message
from jft.rl import GRPO, GRPOConfig

HUGE = 2**30  # new tokens: a KV cache of about a TiB for the tiny model


def _device():
    """How the messages name the first device: "cpu:0", or "gpu:0 (NVIDIA H200)" on a GPU."""
    device = jax.devices()[0]
    return f"{device.platform}:{device.id}"


def _starts_like(message, work):
    """XLA:GPU refuses these while compiling (it plans the buffers first), the CPU backend when running."""
    return re.match(f"out of device memory (in|while compiling) {work} on {_device()}", message)


def _is_xla_oom(error):
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def test_sft_step_that_does_not_fit_names_the_step_and_its_options(base):
    model = jft.load(base, dtype="float32", progress=False)
    lora = jft.lora.init(model, r=2, key=jax.random.key(0))
    rows = [{"text": "one two three four " * 8}] * 4
    # one packed row of 2**17 tokens: its attention scores alone are a TiB
    trainer = jft.train.SFT(model, lora, max_seq_length=2**17, batch_size=1, packing=True, attention="xla",
                            remat="full", progress=False)
    with pytest.raises(OutOfMemoryError) as info:
        trainer.fit(rows, steps=1)
    message = str(info.value)
    assert _starts_like(message, "the SFT training step") and re.search(r"XLA could not allocate [\d.]+ [GT]iB", message)
    assert "max_seq_length (now 131072)" in message and "grad_accum" in message
    assert 'remat="offload"' in message and 'quantize="nf4"' in message and "offload_embedding=True" in message
    assert isinstance(info.value, MemoryError) and _is_xla_oom(info.value.__cause__)
    ids = np.arange(2**17, dtype=np.int32) % 500
    with pytest.raises(OutOfMemoryError, match=f"the SFT evaluation on {_device()}.*; .* batch_size"):
        trainer.evaluate(lora, trainer.tokenize([{"input_ids": ids, "labels": ids}]))


def test_generation_that_does_not_fit_names_max_new_tokens(base):
    model = jft.load(base, dtype="float32", progress=False)
    with pytest.raises(jft.OutOfMemoryError) as info:
        jft.generate(model, ["hello", "world"], max_new_tokens=HUGE)
    message = str(info.value)
    assert _starts_like(message, "generation")
    assert "fewer prompts at once (now 2)" in message and f"max_new_tokens (now {HUGE})" in message
    assert _is_xla_oom(info.value.__cause__)


def test_grpo_rollout_that_does_not_fit_names_the_rollout_options(base):
    model = jft.load(base, dtype="float32", progress=False)
    lora = jft.lora.init(model, r=2, key=jax.random.key(0))
    cfg = GRPOConfig(prompts_per_step=1, num_generations=2, max_completion_length=HUGE, progress=False)
    trainer = GRPO(model, lora, lambda prompts, completions, **_: [0.0] * len(completions), config=cfg)
    with pytest.raises(OutOfMemoryError) as info:
        trainer.fit([{"prompt": "hello"}], steps=1)
    message = str(info.value)
    assert _starts_like(message, "the GRPO rollout")
    assert "prompts_per_step or num_generations (now 1 x 2 completions)" in message
    assert f"max_completion_length (now {HUGE})" in message and "fewer slots (now 2)" in message
    assert _is_xla_oom(info.value.__cause__)


def test_only_out_of_memory_errors_are_replaced():
    expected = f"a test step on {_device()}.*; XLA could not allocate 1.0 TiB. Try: less"
    with pytest.raises(OutOfMemoryError, match=expected) as info:
        with explain_out_of_memory("a test step", "less"):
            jax.jit(lambda: jnp.zeros((2**38,), jnp.float32))().block_until_ready()
    assert _is_xla_oom(info.value.__cause__)

    def fail(x):
        raise ValueError("not about memory")

    callback = jax.jit(lambda x: jax.pure_callback(fail, jax.ShapeDtypeStruct((3,), jnp.float32), x))
    with pytest.raises(jax.errors.JaxRuntimeError, match="not about memory") as info:
        with explain_out_of_memory("a test step", "less"):
            callback(jnp.zeros(3)).block_until_ready()
    assert not isinstance(info.value, MemoryError) and info.value.__cause__ is None


def test_messages_from_gpu_and_tpu():
    gpu = ("RESOURCE_EXHAUSTED: Failed to allocate request for 2.99GiB (3206250496B) on device ordinal 0\n"
           "BufferAssignment OOM Debugging.\n  source_file=\"/site-packages/jax/_src/compiler.py\"")
    assert (out_of_memory_message("the SFT training step", "a smaller batch_size (now 8)", gpu, "gpu:0 (NVIDIA H200)")
            == "out of device memory in the SFT training step on gpu:0 (NVIDIA H200); XLA could not allocate 3.0 GiB. "
               "Try: a smaller batch_size (now 8).")
    tpu = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
           "Used 21.95G of 15.48G hbm. Exceeded hbm capacity by 6.47G.")
    assert (out_of_memory_message("generation", "fewer prompts", tpu, "tpu:0 (TPU v5 lite)")
            == "out of device memory while compiling generation on tpu:0 (TPU v5 lite); the program needs 21.95G of "
               "15.48G hbm. Try: fewer prompts.")
    autotuning = ("RESOURCE_EXHAUSTED: Failed to get configs for: 4 out of 87 instructions. See logs for all "
                  "failures. Example failure: \n%gemm_fusion_dot.49 = f32[128,16,64,32] fusion(...). Status: "
                  "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 256.02GiB with allocator GPU_0_bfc")
    assert (out_of_memory_message("generation", "fewer prompts", autotuning, "gpu:0 (NVIDIA H200)")
            == "out of device memory while compiling generation on gpu:0 (NVIDIA H200); XLA could not allocate "
               "256.0 GiB. Try: fewer prompts.")
    running = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00TiB."
    assert (out_of_memory_message("a test step", "less", running, "gpu:0 (NVIDIA H200)")
            == "out of device memory in a test step on gpu:0 (NVIDIA H200); XLA could not allocate 1.0 TiB. Try: less.")
    stats = {"bytes_in_use": 70 * 2**30, "bytes_limit": 79 * 2**30, "peak_bytes_in_use": 78.5 * 2**30}
    assert memory_in_use(stats) == "70.0 GiB of 79.0 GiB in use (peak 78.5 GiB)"
