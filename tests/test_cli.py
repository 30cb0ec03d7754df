"""The `jft` command line, run as a user would."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest


GSM8K_TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "train.jsonl")


def _jft_command(*args, devices=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return [sys.executable, "-m", "jft.cli", *args], env


def _jft(*args, cwd=None, devices=None):
    command, env = _jft_command(*args, devices=devices)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def test_train_then_export_merged_then_generate(base, tmp_path):
    data = tmp_path / "small.jsonl"
    with open(GSM8K_TRAIN) as src, open(data, "w") as dst:
        for _, line in zip(range(16), src):
            dst.write(line)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {base}\nr: 4\nalpha: 8\nmax_seq_length: 512\nbatch_size: 2\n")
    out = tmp_path / "run"
    r = _jft("train", "--config", str(cfg), "--dataset", str(data), "--steps", "3", "--packing", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "loss.png").stat().st_size > 1000

    r = _jft("export", "--base", base, "--lora", str(out / "adapter"), "--format", "merged", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    r = _jft("generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "4")
    assert r.returncode == 0 and "### Hello" in r.stdout, r.stderr


def test_train_sharded_over_eight_devices(base, tmp_path):
    out = tmp_path / "run"
    r = _jft("train", "--model", base, "--dataset", GSM8K_TRAIN, "--steps", "2", "--batch-size", "8", "--packing",
             "--max-seq-length", "256", "--mesh", "2,-1,1", "--out", str(out), devices=8)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 2]
    # the embedding in host memory: its rows go to the devices with each batch, sharded like it
    r = _jft("train", "--model", base, "--dataset", GSM8K_TRAIN, "--steps", "2", "--batch-size", "8", "--packing",
             "--max-seq-length", "256", "--mesh", "2,-1,1", "--offload-embedding", "--out", str(tmp_path / "host"), devices=8)
    assert r.returncode == 0, r.stderr
    host = [json.loads(line) for line in (tmp_path / "host" / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in host] == pytest.approx([rec["loss"] for rec in records], rel=1e-5)
    for mesh, error in (("3,-1,1", "8 devices cannot be split"), ("1,-1,1", "batch_size=2 rows cannot be split")):
        r = _jft("train", "--model", base, "--dataset", GSM8K_TRAIN, "--mesh", mesh, "--out", str(out), devices=8)
        assert r.returncode == 2 and error in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_input_gives_a_clear_error_not_a_traceback(base, tmp_path):
    r = _jft("train", "--model", str(tmp_path / "missing"), "--dataset", GSM8K_TRAIN, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "model directory not found" in r.stderr and "Traceback" not in r.stderr
    r = _jft("train", "--model", base, "--dataset", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "nope.jsonl" in r.stderr
    r = _jft("train", "--model", base, "--dataset", GSM8K_TRAIN)
    assert r.returncode == 2 and "--out is required" in r.stderr
    r = _jft("train", "--model", base, "--dataset", GSM8K_TRAIN, "--out", str(tmp_path / "o"), "--distributed", "2,0")
    assert r.returncode == 2 and "--distributed takes" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "afile").write_text("")
    (tmp_path / "bad.yaml").write_text("model: [base\n")
    (tmp_path / "list.yaml").write_text("- model\n")
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]\n')
    cases = [
        (("train", "--model", base, "--dataset", GSM8K_TRAIN, "--out", str(tmp_path / "afile")), "exists and is not a directory"),
        (("train", "--config", str(tmp_path / "bad.yaml")), "bad.yaml is not valid YAML"),
        (("train", "--config", str(tmp_path / "list.yaml")), "must hold a mapping"),
        (("train", "--model", base, "--dataset", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")),
         "bad.json' is not valid JSON at line 2, column 11"),
        (("train", "--model", base, "--dataset", GSM8K_TRAIN, "--out", str(tmp_path / "o"), "--steps", "0"), "steps must be >= 1"),
        (("train", "--model", base, "--dataset", GSM8K_TRAIN, "--out", str(tmp_path / "o"), "--lr", "-1"), "learning_rate must be positive"),
        (("train", "--model", base, "--dataset", GSM8K_TRAIN, "--out", str(tmp_path / "o"), "--grad-accum", "0"), "grad_accum must be"),
        (("train", "--model", base, "--dataset", GSM8K_TRAIN, "--out", str(tmp_path / "o"), "--dropout", "2"), "dropout must be in [0, 1)"),
        (("train", "--model", str(tmp_path / "afile"), "--dataset", GSM8K_TRAIN, "--out", str(tmp_path / "o")),
         "afile is a file, not a model directory"),
        (("export", "--base", str(tmp_path / "afile"), "--format", "merged", "--out", str(tmp_path / "m")),
         "afile is a file, not a model directory"),
        (("generate", "--model", base, "--lora", str(tmp_path / "afile"), "--prompt", "hi"),
         "afile is a file, not an adapter directory"),
        (("export", "--base", base, "--format", "merged", "--quant", "q8_0", "--out", str(tmp_path / "m")),
         "--quant applies to --format gguf only"),
        (("generate", "--model", base, "--prompt", "hi", "--max-new-tokens", "0"), "max_new_tokens must be a positive"),
        (("generate", "--model", base, "--prompt", "hi", "--top-p", "5"), "top_p must be in (0, 1]"),
        (("grpo", "--model", base, "--dataset", GSM8K_TRAIN, "--reward", "nosuchmodule:fn", "--out", str(tmp_path / "g")),
         "reward 'nosuchmodule:fn' cannot be loaded"),
        (("grpo", "--model", base, "--dataset", GSM8K_TRAIN, "--reward", "gsm8k", "--reward-weights", "a", "--out",
          str(tmp_path / "g")), "--reward-weights takes numbers"),
        (("grpo", "--model", base, "--dataset", GSM8K_TRAIN, "--reward", "gsm8k", "--prompts-per-step", "0", "--out",
          str(tmp_path / "g")), "prompts_per_step must be >= 1"),
    ]
    for args, error in cases:
        r = _jft(*args)
        assert r.returncode == 2 and error in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_out_of_device_memory_is_one_line_with_what_to_change(base, tmp_path):
    """Allocations of a TiB and more, which XLA's CPU backend refuses before running anything."""
    data = tmp_path / "short.jsonl"
    data.write_text('{"text": "one two three four"}\n' * 4)
    runs = {"max_new_tokens (now 1073741824)": ("generate", "--model", base, "--prompt", "hi", "--max-new-tokens",
                                                str(2**30)),
            "max_seq_length (now 131072)": ("train", "--model", base, "--dataset", str(data), "--max-seq-length",
                                            str(2**17), "--packing", "--batch-size", "1", "--steps", "1", "--out",
                                            str(tmp_path / "run"))}
    for option, args in runs.items():
        r = _jft(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        error = r.stderr.splitlines()[-1]
        assert error.startswith("jft: error: out of device memory ") and option in error, r.stderr
        assert "XLA could not allocate" in error and "RESOURCE_EXHAUSTED" not in r.stderr


def test_generate_asks_in_the_chat_template_unless_raw(base):
    import jft
    from jft.data import render

    model = jft.load(base, dtype="bfloat16")
    chat = render([{"role": "user", "content": "Hello"}], model.tokenizer, add_generation_prompt=True)
    ids = model.tokenizer(chat, add_special_tokens=False)["input_ids"]
    expected = {mode: jft.generate(model, [prompt], max_new_tokens=6).text[0]
                for mode, prompt in (("chat", ids), ("raw", "Hello"))}
    assert expected["chat"] != expected["raw"]
    for mode, flags in (("chat", ()), ("raw", ("--raw",))):
        r = _jft("generate", "--model", base, "--prompt", "Hello", "--max-new-tokens", "6", *flags)
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"### Hello\n{expected[mode]}\n\n", mode


def test_export_gguf_writes_a_quant_named_twice_once(base, tmp_path):
    out = tmp_path / "model.gguf"
    r = _jft("export", "--base", base, "--format", "gguf", "--quant", "q8_0,Q8_0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"wrote {out}"]
    assert sorted(os.listdir(tmp_path)) == ["Modelfile", "model.gguf"]


def test_ctrl_c_while_checkpointing_finishes_the_checkpoint_then_stops(base, tmp_path):
    """Ctrl-C (SIGINT) that lands while a checkpoint is being written: the step is finished, the run stops
    with one line and no traceback, and --resume goes on from it."""
    out = tmp_path / "run"
    train = ("train", "--model", base, "--dataset", GSM8K_TRAIN, "--max-seq-length", "128", "--batch-size", "2",
             "--checkpoint-every", "1", "--out", str(out))
    command, env = _jft_command(*train, "--steps", "100000")
    with open(tmp_path / "stderr", "w") as log:  # a file, not a pipe: the progress bar never blocks on it
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
        deadline = time.monotonic() + 300
        while not glob.glob(str(out / "checkpoints" / "*.orbax-checkpoint-tmp*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        run.send_signal(signal.SIGINT)
        run.wait(timeout=120)
    stderr = (tmp_path / "stderr").read_text()
    assert run.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1].startswith("jft: interrupted (with --checkpoint-every, --resume continues")
    names = os.listdir(out / "checkpoints")
    assert not [name for name in names if "tmp" in name], names
    last = max(int(name) for name in names if name.isdigit())
    r = _jft(*train, "--steps", str(last + 1), "--resume")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-2:] == [last, last + 1]
