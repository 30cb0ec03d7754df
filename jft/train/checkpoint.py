"""Training checkpoints: LoRA + optimizer state through orbax, and the metrics history beside them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import warnings

import jax

from jft.config import read_json
from jft.convert.safetensors_io import atomic_write
from jft.sharding import is_main_process

# What fixes a LoRA's weights and their meaning; dropout is left out: a resumed run may change it.
_LORA_SETTINGS = ("r", "alpha", "targets", "use_rslora", "layers", "train_embeddings")


def _lora_settings(lora) -> dict:
    """The LoRA's settings as they read back from JSON (tuples as lists)."""
    return json.loads(json.dumps({name: getattr(lora.config, name) for name in _LORA_SETTINGS}))


def _describe(settings: dict, names: list[str]) -> str:
    def value(v):
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    return ", ".join(f"{name}={value(settings.get(name))}" for name in names)


class Checkpoints:
    """out_dir/checkpoints/: orbax steps (the two newest kept), and for each of them history-<step>.json
    and lora-<step>.json (the LoRA's settings, checked on resume)."""

    def __init__(self, out_dir: str):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(os.path.join(out_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))

    def _history_path(self, step: int) -> str:
        return os.path.join(self.directory, f"history-{step}.json")

    def _lora_path(self, step: int) -> str:
        return os.path.join(self.directory, f"lora-{step}.json")

    def save(self, step: int, lora, opt_state, history: list[dict]) -> None:
        import orbax.checkpoint as ocp

        with _interrupts_deferred():
            self.manager.save(step, args=ocp.args.StandardSave({"lora": lora, "opt_state": opt_state}))
            self.manager.wait_until_finished()
            if not is_main_process():
                return
            atomic_write(self._history_path(step), lambda f: json.dump(history, f), mode="w")
            settings = _lora_settings(lora)
            atomic_write(self._lora_path(step), lambda f: json.dump(settings, f), mode="w")
            self._remove_rotated()

    def _remove_rotated(self) -> None:
        """The history and settings files of steps orbax has rotated away."""
        kept = {path(step) for step in self.manager.all_steps() for path in (self._history_path, self._lora_path)}
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.startswith(("history-", "lora-")) and name.endswith(".json") and path not in kept:
                os.remove(path)

    def restore(self, lora, opt_state):
        """(step, lora, opt_state, history) of the newest checkpoint, shaped and placed like the
        given lora/opt_state; None when there is none."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return None
        self._check_lora(step, lora)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"lora": lora, "opt_state": opt_state})
        try:
            state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError as e:  # a checkpoint without lora-<step>.json, of another shape
            raise ValueError(f"the checkpoint in {self.directory} does not fit this run's LoRA ({e})") from None
        path = self._history_path(step)
        history = read_json(path) if os.path.exists(path) else []
        return step, state["lora"], state["opt_state"], history

    def _check_lora(self, step: int, lora) -> None:
        """A clear error where the checkpoint's LoRA was made with other settings than this run's
        (checkpoints written before these files existed are not checked)."""
        path = self._lora_path(step)
        if not os.path.exists(path):
            return
        saved, current = read_json(path), _lora_settings(lora)
        differ = [name for name in _LORA_SETTINGS if saved.get(name) != current[name]]
        if differ:
            raise ValueError(f"the checkpoint in {self.directory} has LoRA {_describe(saved, differ)}, this run has "
                             f"{_describe(current, differ)}: resume with the checkpoint's LoRA settings, or train "
                             "into another output directory")


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C inside the block raises KeyboardInterrupt when the block ends: a checkpoint being written
    is finished first (orbax's writer threads, cut off by an exiting interpreter, print tracebacks and
    leave a partial step behind)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def start_run(out_dir: str | None, *, checkpoint_every: int, resume: bool, lora, opt_state):
    """Where a training run begins: (checkpoints or None, start step, lora, opt_state, history).

    With `resume`, the newest checkpoint in out_dir (if any) supplies the state. out_dir/metrics.jsonl
    then holds the records up to where the run begins: none from step 0, the checkpoint's history
    on resume (a run stopped after its last checkpoint had logged later steps, done again now).
    """
    checkpoints = Checkpoints(out_dir) if out_dir and (checkpoint_every or resume) else None
    start, history = 0, []
    if resume and checkpoints is not None:
        restored = checkpoints.restore(lora, opt_state)
        if restored is not None:
            start, lora, opt_state, history = restored
        else:
            warnings.warn(f"resume: no checkpoint in {checkpoints.directory}; training from step 0")
    metrics = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if metrics and os.path.exists(metrics) and is_main_process():
        atomic_write(metrics, lambda f: f.writelines(json.dumps(r) + "\n" for r in history), mode="w")
    return checkpoints, start, lora, opt_state, history
