"""Training over several processes (`jax.distributed.initialize()`), as on several hosts: two CPU
processes of two devices each, one mesh over all four, against one process of four devices."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GSM8K_TRAIN = os.path.join(ROOT, "..", "shared", "data", "gsm8k", "train.jsonl")


def _free_port(ports=(0,)) -> int:
    """The first free local port of `ports` (0: any)."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {ports}")


def _slurm_job_id() -> str:
    """A SLURM job id whose coordinator port, as JAX derives it (61440 + id % 4096), is free here."""
    return str(_free_port(range(61440, 65536)) - 61440)


def _slurm_env(job_id: str, process_id: int, processes: int) -> dict:
    """What SLURM sets for one task of a job step on one node."""
    return {"SLURM_JOB_ID": job_id, "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(processes),
            "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id)}


def _env(devices: int, extra=None) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", **(extra or {})}


def _run_processes(argv_for, processes: int, env_for=lambda process_id: {}):
    """Starts `processes` processes (argv_for(process_id)) sharing four CPU devices; their results."""
    procs = [subprocess.Popen(argv_for(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(4 // processes, env_for(i)), cwd=ROOT) for i in range(processes)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    return [out for out, _ in outs]


def test_cli_train_over_two_processes_matches_one_and_resumes(base, tmp_path):
    """Two processes train 2 steps with a checkpoint, then resume for 2 more: the same 4 steps as
    one process training straight through (a constant learning rate: the step count sets no decay).
    The first run names its coordinator; the resumed one finds it, as under SLURM, with a bare
    --distributed."""
    def train(out, steps, distributed=None, extra=(), env_for=lambda i: {}):
        def argv(i):
            return [sys.executable, "-m", "jft.cli", "train", "--model", base, "--dataset", GSM8K_TRAIN, "--steps", str(steps),
                    "--batch-size", "4", "--packing", "--max-seq-length", "256", "--quantize", "nf4", "--dtype", "float32",
                    "--mesh", "2,2,1", "--schedule", "constant", "--out", str(out), *extra, *(distributed(i) if distributed else [])]

        _run_processes(argv, 2 if distributed else 1, env_for)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    one = train(tmp_path / "one", 4)
    address = f"127.0.0.1:{_free_port()}"
    train(tmp_path / "two", 2, lambda i: ["--distributed", f"{address},2,{i}"], ["--checkpoint-every", "2"])
    job = _slurm_job_id()
    two = train(tmp_path / "two", 4, lambda i: ["--distributed"], ["--checkpoint-every", "2", "--resume"],
                lambda i: _slurm_env(job, i, 2))
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # one writer: each step logged once, the resumed run appends
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert (tmp_path / "two" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "two" / "loss.png").stat().st_size > 1000


_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    processes, process_id, address, path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    if processes > 1:
        jax.distributed.initialize(address, num_processes=processes, process_id=process_id)
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from jax.experimental import multihost_utils
    import jft
    from jft.data.testing import digit_count_reward, sum_prompts
    from jft.rl import GRPO, GRPOConfig

    mesh = jft.mesh(data=2, fsdp=2)
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    placed = jft.sharding.shard_batch({"x": rows}, mesh)["x"]
    local_rows = sum(s.data.shape[0] for s in placed.addressable_shards if s.replica_id == 0)
    whole = multihost_utils.process_allgather(placed, tiled=True)

    model = jft.load(path, dtype="float32", quantize="nf4", progress=False)
    lora = jft.lora.init(model, r=4, alpha=8, key=jax.random.key(0))

    cfg = GRPOConfig(prompts_per_step=4, num_generations=4, learning_rate=1e-2, max_completion_length=4,
                     max_prompt_length=16, beta=0.05, progress=False, out_dir=out)
    state = GRPO(model, lora, [digit_count_reward], config=cfg, mesh=mesh).fit(sum_prompts(), steps=2)
    print("RESULT " + json.dumps({
        "batch_shape": list(placed.shape), "batch_equal": bool((np.asarray(whole) == rows).all()),
        "local_rows": local_rows, "history": [[h["reward"], h["loss"], h["kl"]] for h in state.history],
        "lora_sum": float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(state.lora)))}))
""")


def test_grpo_and_batches_over_two_processes(base, tmp_path):
    script = tmp_path / "grpo.py"
    script.write_text(_SCRIPT)

    def run(processes, out):
        address = f"127.0.0.1:{_free_port()}"
        outs = _run_processes(lambda i: [sys.executable, str(script), str(processes), str(i), address, base, str(out)],
                              processes)
        return [json.loads(line[len("RESULT "):]) for o in outs for line in o.splitlines() if line.startswith("RESULT ")]

    (one,) = run(1, tmp_path / "one")
    two = run(2, tmp_path / "two")
    for r in two:
        # the global batch keeps its shape and rows; each process placed only its own devices' half
        assert r["batch_shape"] == [8, 3] and r["batch_equal"] and r["local_rows"] == 4, r
        assert [h[0] for h in r["history"]] == [h[0] for h in one["history"]]  # the same rollouts and rewards
        assert sum(r["history"], []) == pytest.approx(sum(one["history"], []), abs=1e-5)
        assert r["lora_sum"] == pytest.approx(one["lora_sum"], rel=1e-5)
    assert one["local_rows"] == 8
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
