"""Scale by sharding: a (data, fsdp, tensor) device mesh and where each canonical param lives on it.

Params are placed by name: a linear weight [L, out, in] splits `out` over fsdp and (except the output
projections o/down, which split `in`) over tensor; embeddings split vocab over tensor and hidden
over fsdp, norms are replicated. NF4 leaves, whose bytes are flat per matrix, split along their
quantization blocks over fsdp. LoRA weights and optimizer state are small and stay replicated.
Batches split their rows over data x fsdp. `jit` then partitions the unchanged step (GSPMD); inside
the layer scan, `gather_layer` all-gathers one layer's weights at a time over fsdp (FSDP).

On several hosts, every host runs the same program after `jax.distributed.initialize()`: the mesh
spans all hosts' devices, each host passes the same global batch and keeps its own devices' rows,
and only the main process writes logs and plots.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
# Layer matrices are [L, out, in] and fsdp always splits `out`, so gathering a layer concatenates
# along its major dim (no transpose of the gathered weight).
_OUT_IN = {"q", "k", "v", "gate", "up"}  # out over tensor, then over fsdp within each tensor slice
_IN_OUT = {"o", "down"}  # reduce back to the residual stream: out over fsdp, in over tensor


def mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh over all (or the given) devices; one axis may be -1 (whatever is left)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    # Auto axes (sharding by propagation and constraints), which jft's sharding rules assume; JAX's own
    # default differs between Mesh and AbstractMesh and between versions
    return Mesh(np.asarray(devices).reshape(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _fits(shape, spec, m: Mesh) -> P:
    """`spec`, each dim keeping the longest prefix of its mesh axes whose sizes divide it."""
    out = []
    for dim, axes in zip(shape, spec):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for axis in axes:
            if dim % (int(np.prod([m.shape[a] for a in kept])) * m.shape[axis]):
                break
            kept.append(axis)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def _without_fsdp(spec) -> tuple:
    def drop(axes):
        if axes == "fsdp":
            return None
        if isinstance(axes, tuple):
            rest = tuple(a for a in axes if a != "fsdp")
            return rest[0] if len(rest) == 1 else (rest or None)
        return axes

    return tuple(drop(axes) for axes in spec)


def _dense_spec(path: tuple[str, ...], ndim: int) -> tuple:
    name = path[-1]
    if name in ("embed", "lm_head"):
        return ("tensor", "fsdp")
    if path[0] == "layers" and ndim == 3:
        if name in _OUT_IN:
            return (None, ("tensor", "fsdp"), None)
        if name in _IN_OUT:
            return (None, "fsdp", "tensor")
    if path[0] == "layers" and name.endswith("_bias"):
        return (None, "tensor")
    return (None,) * ndim


def _leaf_sharding(path: tuple[str, ...], leaf, m: Mesh):
    from jft.quant import NF4

    if isinstance(leaf, NF4):
        # every child is [L, ...flat blocks...]: split the last (block) axis over fsdp
        return jax.tree.map(lambda x: NamedSharding(m, _fits(x.shape, (None,) * (x.ndim - 1) + ("fsdp",), m)), leaf)
    if hasattr(leaf, "dequantize"):  # other quantized leaves: replicated
        return jax.tree.map(lambda x: NamedSharding(m, P()), leaf)
    return NamedSharding(m, _fits(leaf.shape, _dense_spec(path, leaf.ndim), m))


def gather_layer(layer: dict) -> dict:
    """One layer's params, inside the layer scan, all-gathered over fsdp and still split over tensor.

    Left to itself the partitioner may gather the whole stack of layers before the loop, and it
    cannot split a Pallas kernel such as the NF4 dequantize; asking for whole matrices here makes
    the gather per layer, of the 4-bit bytes, and recomputed in the backward pass under remat. The
    optimization barrier stops XLA from giving the whole stacked weight the layout the gather wants,
    which costs a copy of every weight outside the loop. NF4 views (`NF4Layer`) are sliced out of
    their stack first. No-op outside a mesh with fsdp > 1.
    """
    from jft.quant import NF4Layer, is_quantized

    m = jax.sharding.get_abstract_mesh()
    if m.empty or m.shape.get("fsdp", 1) == 1:
        return layer

    layer = {name: leaf.sliced() if isinstance(leaf, NF4Layer) else leaf for name, leaf in layer.items()}

    def whole(path, leaf):
        if is_quantized(leaf):
            return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), leaf)
        spec = _without_fsdp(_dense_spec(("layers", path[-1].key), leaf.ndim + 1)[1:])
        return jax.lax.with_sharding_constraint(leaf, _fits(leaf.shape, spec, m))

    return jax.tree_util.tree_map_with_path(whole, jax.lax.optimization_barrier(layer), is_leaf=is_quantized)


def keep_replicated(tree):
    """Inside a step traced under a mesh: `tree` (LoRA weights, optimizer state) replicated, as it was
    placed, so the partitioner does not hand back a sharded copy that the next call would have to be
    compiled again for. No-op outside a mesh."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), tree)


def param_shardings(params: dict, m: Mesh):
    """A pytree of NamedShardings matching `params` (quantized leaves expand to their children)."""
    from jft.quant import is_quantized

    def place(path, leaf):
        return _leaf_sharding(tuple(getattr(p, "key", str(p)) for p in path), leaf, m)

    return jax.tree_util.tree_map_with_path(place, params, is_leaf=is_quantized)


def shard_params(params: dict, m: Mesh) -> dict:
    return jax.device_put(params, param_shardings(params, m))


def replicate(tree, m: Mesh | None):
    """Every leaf whole on every device of the mesh; the tree itself without one."""
    return tree if m is None else jax.device_put(tree, NamedSharding(m, P()))


def shard_model(model, m: Mesh):
    """The same `jft.Model` with its params placed on the mesh."""
    return dataclasses.replace(model, params=shard_params(model.params, m))


def scoped(m: Mesh | None, fn):
    """`fn` called with `m` as the context mesh, which layers read when traced (`gather_layer`,
    attention layouts); `fn` itself when there is no mesh. Keeps the mesh out of global state."""
    if m is None:
        return fn

    def call(*args, **kwargs):
        with jax.set_mesh(m):
            return fn(*args, **kwargs)

    return call


def batch_sharding(m: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(m, P(("data", "fsdp"), *([None] * (ndim - 1))))


def check_rows(rows: int, m: Mesh | None, what: str) -> None:
    """A clear error when `rows` batch rows cannot be split over the mesh's data x fsdp devices."""
    if m is not None and rows % (m.shape["data"] * m.shape["fsdp"]):
        raise ValueError(f"{what} cannot be split over data x fsdp = {m.shape['data'] * m.shape['fsdp']} devices")


def place_batch(batch: dict, m: Mesh | None) -> dict:
    """A host batch on the devices: rows split over the mesh, or whole on the default device."""
    if m is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    return shard_batch(batch, m)


def shard_batch(batch: dict, m: Mesh) -> dict:
    """A global host batch with its rows split over data x fsdp. Every process passes the same batch
    and places only the rows of its own devices."""

    def place(v):
        v = np.asarray(v)
        return jax.make_array_from_callback(v.shape, batch_sharding(m, v.ndim), lambda index: v[index])

    return {k: place(v) for k, v in batch.items()}


def is_main_process() -> bool:
    """True on the one process (of one, or of several hosts') that writes logs, plots and files."""
    return jax.process_index() == 0
