"""Training checkpoints: LoRA + optimizer state through orbax, and the metrics history beside them."""

from __future__ import annotations

import json
import os
import warnings

import jax

from jft.convert.safetensors_io import atomic_write
from jft.sharding import is_main_process


class Checkpoints:
    """out_dir/checkpoints/: orbax steps (the two newest kept) and history-<step>.json files."""

    def __init__(self, out_dir: str):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(os.path.join(out_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))

    def _history_path(self, step: int) -> str:
        return os.path.join(self.directory, f"history-{step}.json")

    def save(self, step: int, lora, opt_state, history: list[dict]) -> None:
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.StandardSave({"lora": lora, "opt_state": opt_state}))
        self.manager.wait_until_finished()
        if not is_main_process():
            return
        path = self._history_path(step)
        with open(path + ".tmp", "w") as f:
            json.dump(history, f)
        os.replace(path + ".tmp", path)

    def restore(self, lora, opt_state):
        """(step, lora, opt_state, history) of the newest checkpoint, shaped and placed like the
        given lora/opt_state; None when there is none."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"lora": lora, "opt_state": opt_state})
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        path = self._history_path(step)
        history = json.load(open(path)) if os.path.exists(path) else []
        return step, state["lora"], state["opt_state"], history


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
