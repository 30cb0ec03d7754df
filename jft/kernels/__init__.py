"""jft's kernel layer: each op is a pure-jnp reference plus optional Pallas implementations.

`use("reference" | "pallas" | "auto")` (global, or as a context manager) or the environment variable
JFT_KERNELS picks the implementation; see registry.py. The functions below dispatch through it.
"""

import importlib.util

from jft.kernels import attention as _attention
from jft.kernels import cross_entropy as _cross_entropy
from jft.kernels import glu as _glu
from jft.kernels import rmsnorm as _rmsnorm
from jft.kernels import rope as _rope
from jft.kernels.registry import implementation, mode, ops, register, register_pallas, use
from jft.kernels.rope import cos_sin as rope_cos_sin


def rmsnorm(x, w, eps: float = 1e-6, offset: float = 0.0):
    """x / sqrt(mean(x^2, -1) + eps) * (offset + w); offset=1 for Gemma."""
    return implementation("rmsnorm")(x, w, eps, offset)


def rmsnorm_residual(x, residual, w, eps: float = 1e-6, offset: float = 0.0):
    """(rmsnorm(x + residual), x + residual)."""
    return implementation("rmsnorm_residual")(x, residual, w, eps, offset)


def rope(q, k, positions, inv_freq, attention_scaling: float = 1.0):
    """Rotate q [B,T,Hq,hd] and k [B,T,Hkv,hd] at positions [B,T]; returns (q, k)."""
    return implementation("rope")(q, k, positions, inv_freq, attention_scaling)


def swiglu(g, u):
    """silu(g) * u."""
    return implementation("swiglu")(g, u)


def geglu(g, u):
    """gelu_tanh(g) * u."""
    return implementation("geglu")(g, u)


def linear_cross_entropy(hidden, weight, labels, **kwargs):
    """Per-token (loss, lse) of hidden [N, D] @ weight[V, D].T, never materialising [N, V].

    Keywords: ignore_index=-100, softcap=None, logit_scale=1.0, chunk_size, vocab_chunk_size.
    """
    return implementation("linear_cross_entropy")(hidden, weight, labels, **kwargs)


def attention(q, k, v, q_positions, k_positions, q_segment_ids=None, k_segment_ids=None, **kwargs):
    """Masked (causal by positions, segments, window) softmax attention with GQA and softcap.

    Keywords: scale=None (hd**-0.5), window=None, softcap=None.
    """
    return implementation("attention")(
        q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, **kwargs
    )


# Ops living in other modules register themselves on import (e.g. the NF4 kernels).
if importlib.util.find_spec("jft.kernels.nf4") is not None:
    from jft.kernels import nf4 as _nf4  # noqa: F401
from jft.kernels import layer_matmul as _layer_matmul  # noqa: F401

__all__ = [
    "attention",
    "geglu",
    "implementation",
    "linear_cross_entropy",
    "mode",
    "ops",
    "register",
    "register_pallas",
    "rmsnorm",
    "rmsnorm_residual",
    "rope",
    "rope_cos_sin",
    "swiglu",
    "use",
]
