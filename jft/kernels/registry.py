"""Kernel registry: every op has a pure-jnp reference and optional Pallas implementations.

The implementation is chosen when a function is traced, so a `jax.jit`-compiled function keeps the
implementation that was active when it was first traced.

Modes:
  "reference"  always the pure-jnp reference;
  "pallas"     the op's Pallas implementation where one is registered (reference otherwise);
  "auto"       the Pallas implementation on the backends it is registered as the winner for
               (benchmarked in bench/kernels.py), the reference everywhere else.
The initial mode comes from the environment variable JFT_KERNELS (default "auto").
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax

MODES = ("reference", "pallas", "auto")


@dataclasses.dataclass
class Op:
    name: str
    reference: Callable
    pallas: Callable | None = None
    auto_backends: frozenset[str] = frozenset()  # backends where the Pallas version wins


_OPS: dict[str, Op] = {}

# Ops whose Pallas version beat XLA in bench/kernels.py on the H200 (docs/benchmarks.md, fwd+bwd at
# 4096 tokens: rmsnorm 0.062 vs 0.107 ms, rmsnorm+residual 0.112 vs 0.144, rope 0.061 vs 0.069,
# masked attention 3.4 vs 12.6); `auto` uses Pallas for them on these backends.
MEASURED_WINS: dict[str, tuple[str, ...]] = {"rmsnorm": ("gpu",), "rmsnorm_residual": ("gpu",), "rope": ("gpu",),
                                             "attention": ("gpu",)}


def _checked_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; expected one of {MODES}")
    return mode


_mode = _checked_mode(os.environ.get("JFT_KERNELS", "auto").strip().lower() or "auto")


def register(name: str, reference: Callable) -> Op:
    """Register an op by its reference. Registering a name twice replaces the reference."""
    op = _OPS.get(name)
    if op is None:
        op = _OPS[name] = Op(name, reference)
    else:
        op.reference = reference
    return op


def register_pallas(name: str, fn: Callable, auto_backends=None) -> None:
    """Attach a Pallas implementation to a registered op; `auto` uses it on `auto_backends`
    (default: the backends MEASURED_WINS lists for the op)."""
    if name not in _OPS:
        raise KeyError(f"register the reference of {name!r} before its Pallas implementation")
    if auto_backends is None:
        auto_backends = MEASURED_WINS.get(name, ())
    _OPS[name].pallas = fn
    _OPS[name].auto_backends = frozenset(auto_backends)


def ops() -> dict[str, Op]:
    return dict(_OPS)


def mode() -> str:
    return _mode


class use:
    """Set the kernel mode globally (`use("reference")`) or for a block (`with use("pallas"):`)."""

    def __init__(self, new_mode: str):
        global _mode
        self._previous = _mode
        _mode = _checked_mode(new_mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _mode
        _mode = self._previous
        return False


def implementation(name: str) -> Callable:
    """The function the current mode and backend select for op `name`."""
    try:
        op = _OPS[name]
    except KeyError:
        raise KeyError(f"no kernel op named {name!r}; registered: {sorted(_OPS)}") from None
    if op.pallas is None or _mode == "reference":
        return op.reference
    if _mode == "pallas" or jax.default_backend() in op.auto_backends:
        return op.pallas
    return op.reference


def call(name: str, *args, **kwargs):
    return implementation(name)(*args, **kwargs)


def interpret() -> bool:
    """Pallas kernels run compiled (Triton) on GPU and in interpret mode everywhere else."""
    return jax.default_backend() != "gpu"


def next_pow2(n: int) -> int:
    """Triton tiles must have power-of-two sizes; ragged sizes are padded up and masked."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unchecked_start(start: int):
    """A kernel-time slice start that Pallas cannot bound-check at trace time.

    Masked loads/stores of power-of-two tiles may extend past a ragged ref's end (Triton masks
    them); Pallas rejects such slices when their start is a Python constant, so make it traced.
    """
    from jax.experimental import pallas as pl

    return pl.program_id(0) * 0 + start
