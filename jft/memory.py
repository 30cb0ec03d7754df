"""Out-of-memory errors that say what ran out and what to change.

XLA reports a step that does not fit in device memory as `jax.errors.JaxRuntimeError` with a
RESOURCE_EXHAUSTED status. `explain_out_of_memory(work, advice)` turns that into `OutOfMemoryError`
(a `MemoryError`) naming the work, the device, its memory and the options the caller suggests;
the XLA error stays attached as `__cause__`. Every other error passes through unchanged.
"""

from __future__ import annotations

import contextlib
import re

import jax
import numpy as np

from jft.quant import has_quantized


class OutOfMemoryError(MemoryError):
    """The work did not fit in device memory; the message says what to change."""


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


@contextlib.contextmanager
def explain_out_of_memory(work: str, advice: str):
    """Re-raises XLA's out-of-memory error inside the block as `OutOfMemoryError` about `work`
    ("the SFT training step", ...) with `advice` ("a smaller batch_size (now 8), ...")."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemoryError(out_of_memory_message(work, advice, str(e), _device_summary())) from e


def out_of_memory_message(work: str, advice: str, xla_message: str, device: str) -> str:
    """One line: where it ran out, on which device, how much XLA asked for, and what to try."""
    status = xla_message.split("\n", 1)[0]  # GPU messages go on with a dump of the largest buffers
    # XLA:TPU's compiler refuses a program that cannot fit before it runs ("compile permanent error");
    # XLA:GPU's autotuner, compiling, may fail to allocate a buffer to time a kernel with ("configs")
    compiling = "compil" in status.lower() or "Failed to get configs" in status
    where = f"while compiling {work}" if compiling else f"in {work}"
    need = _requested(status) or _allocator_request(xla_message)  # the autotuner's failure is further down
    return f"out of device memory {where} on {device}{f'; {need}' if need else ''}. Try: {advice}."


def _requested(status: str) -> str | None:
    """What XLA could not get, from its status line: GPU/CPU give the allocation in bytes, TPU the total."""
    found = re.search(r"\((\d+)B\)", status) or re.search(r"(\d+) bytes", status)
    if found:
        return f"XLA could not allocate {format_bytes(int(found.group(1)))}"
    found = re.search(r"Used (\S+) of (\S+) (\w+)", status)
    if found:
        return f"the program needs {found.group(1)} of {found.group(2)} {found.group(3)}"
    return None


def _allocator_request(text: str) -> str | None:
    """XLA:GPU's allocator names the size in binary units: "trying to allocate 256.02GiB"."""
    found = re.search(r"trying to allocate ([\d.]+) ?([KMGT])i?B", text)
    if found:
        size = float(found.group(1)) * 1024 ** ("KMGT".index(found.group(2)) + 1)
        return f"XLA could not allocate {format_bytes(size)}"
    return None


def quantize_option(params, loader: str = "jft.load") -> list[str]:
    """quantize="nf4" as an option, unless the weights are quantized already."""
    if has_quantized(params):
        return []
    return [f'quantize="nf4" in {loader}']


def remat_option(remat: str) -> list[str]:
    """A remat policy that keeps less on the device than `remat`, if there is one."""
    if remat == "offload":
        return []
    return ['remat="offload"'] if remat == "full" else [f'remat="full" or "offload" (now "{remat}")']


def offload_embedding_option(config, offloaded: bool) -> list[str]:
    """offload_embedding=True as an option, unless the table is offloaded already or is also the output
    projection (tied)."""
    return [] if offloaded or config.tie_embeddings else ["offload_embedding=True"]


def free_device_bytes() -> int | None:
    """The least free memory among the local devices under XLA's allocator; None where a device does
    not report it (CPU)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if any(not s or "bytes_limit" not in s for s in stats):
        return None
    return min(s["bytes_limit"] - s["bytes_in_use"] for s in stats)


_allocations = {}  # (jitted, call signature) -> allocated_bytes of its compiled program


def fits_free_memory(jitted, args, kwargs, share: float) -> bool:
    """Whether `jitted(*args, **kwargs)` allocates at most `share` of the free device memory; False
    where the devices report none (CPU). The first call of a signature compiles it, which also fills
    jit's cache for that call; later ones only compare with the memory free now."""
    free = free_device_bytes()
    if free is None:
        return False
    leaves, tree = jax.tree.flatten((args, kwargs))  # static arguments (config, options) are hashable leaves
    key = (jitted, tree, tuple((x.shape, x.dtype) if isinstance(x, (jax.Array, np.ndarray)) else x for x in leaves))
    if key not in _allocations:
        _allocations[key] = compiled_bytes(lambda: jitted.lower(*args, **kwargs).compile())
    return _allocations[key] is not None and _allocations[key] <= share * free


def allocated_bytes(compiled) -> int:
    """Device memory a compiled call allocates beyond its arguments, per device: the outputs that do
    not reuse a donated argument, and the temporaries."""
    m = compiled.memory_analysis()
    return m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def compiled_bytes(compile) -> int | None:
    """allocated_bytes of the program `compile()` returns; None when XLA runs out of device memory
    compiling it (XLA:GPU's autotuner allocates the operands it times kernels on)."""
    try:
        return allocated_bytes(compile())
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        return None


def _device_summary() -> str:
    devices = jax.local_devices()
    first = devices[0]
    text = f"{first.platform}:{first.id}"
    if first.device_kind.lower() != first.platform:
        text += f" ({first.device_kind})"
    if len(devices) > 1:
        text += f" and {len(devices) - 1} more"
    stats = first.memory_stats()  # None on CPU
    return f"{text}, {memory_in_use(stats)}" if stats else text


def memory_in_use(stats: dict) -> str:
    """`Device.memory_stats()` as "70.1 GiB of 79.2 GiB in use (peak 79.0 GiB)"."""
    text = format_bytes(stats.get("bytes_in_use", 0))
    if "bytes_limit" in stats:
        text += f" of {format_bytes(stats['bytes_limit'])}"
    text += " in use"
    if "peak_bytes_in_use" in stats:
        text += f" (peak {format_bytes(stats['peak_bytes_in_use'])})"
    return text


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
