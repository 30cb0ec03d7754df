"""bitsandbytes' 4-bit checkpoint layout (as transformers saves it) <-> `jft.quant.NF4`.

For a quantized linear `X`, transformers writes `X.weight` (uint8 [(n+1)//2, 1], packed codes),
`X.weight.absmax` (float32, or uint8 codes when double-quantized), `X.weight.quant_map` (float32[16]),
`X.weight.nested_absmax`, `X.weight.nested_quant_map` (float32[256], double quantization only) and
`X.weight.quant_state.bitsandbytes__nf4` (uint8 bytes of a JSON object). The functions here work on
the tensors of ONE linear, keyed by those suffixes ("weight", "weight.absmax", ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jft.quant.nf4 import DEFAULT_NESTED_BLOCKSIZE, DYNAMIC_MAP, NF4, NF4_CODES

WEIGHT = "weight"
ABSMAX = "weight.absmax"
QUANT_MAP = "weight.quant_map"
NESTED_ABSMAX = "weight.nested_absmax"
NESTED_QUANT_MAP = "weight.nested_quant_map"
QUANT_STATE_PREFIX = "weight.quant_state.bitsandbytes__"
QUANT_STATE = QUANT_STATE_PREFIX + "nf4"
BNB_SUFFIXES = (WEIGHT, ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP)


class BnbFormatError(ValueError):
    """A bitsandbytes checkpoint entry that jft cannot read as NF4."""


def group_bnb_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{"model.layers.0.mlp.up_proj.weight.absmax": a, ...} -> {"model.layers.0.mlp.up_proj":
    {"weight.absmax": a, ...}} for every module that has a bitsandbytes quant_state entry."""
    modules = {name.split("." + QUANT_STATE_PREFIX)[0] for name in tensors if "." + QUANT_STATE_PREFIX in name}
    grouped: dict[str, dict[str, np.ndarray]] = {m: {} for m in modules}
    for name, array in tensors.items():
        module, dot, suffix = name.partition(".weight")
        if module in grouped:
            grouped[module]["weight" + suffix] = array
    return grouped


def read_quant_state(tensors: Mapping[str, np.ndarray]) -> dict:
    """The quant_state JSON of one linear, checked to be NF4."""
    state_keys = [k for k in tensors if k.startswith(QUANT_STATE_PREFIX)]
    if len(state_keys) != 1:
        raise BnbFormatError(
            f"expected exactly one '{QUANT_STATE_PREFIX}<quant_type>' entry, found {state_keys or 'none'}"
        )
    raw = np.asarray(tensors[state_keys[0]])
    try:
        state = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BnbFormatError(f"{state_keys[0]} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(state, dict):
        raise BnbFormatError(f"{state_keys[0]} must hold a JSON object, got {type(state).__name__}")
    quant_type = state.get("quant_type")
    if quant_type != "nf4" or state_keys[0] != QUANT_STATE:
        raise BnbFormatError(
            f"unsupported bitsandbytes quant_type {quant_type!r} (key {state_keys[0]!r}); jft reads only 'nf4'"
        )
    for field in ("blocksize", "shape", "dtype"):
        if field not in state:
            raise BnbFormatError(f"quant_state JSON lacks {field!r}: {state}")
    return state


def _matrix_shape(state: dict) -> tuple[int, int]:
    shape = state["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise BnbFormatError(f"quant_state shape must be [out, in] with positive ints, got {shape!r}")
    return shape[0], shape[1]


def _positive_even(state: dict, field: str) -> int:
    value = state[field]
    if not isinstance(value, int) or value <= 0 or value % 2:
        raise BnbFormatError(f"quant_state {field} must be a positive even int, got {value!r}")
    return value


def _require(tensors: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in tensors:
        raise BnbFormatError(f"missing bitsandbytes tensor {key!r}; have {sorted(tensors)}")
    return np.asarray(tensors[key])


def _check_length(array: np.ndarray, expected: int, what: str) -> np.ndarray:
    flat = array.reshape(-1)
    if flat.size != expected:
        raise BnbFormatError(f"{what} has {flat.size} entries, expected {expected} for this weight's shape and blocksize")
    return flat


def _check_table(array: np.ndarray, expected: np.ndarray, what: str) -> None:
    table = np.asarray(array, dtype=np.float32).reshape(-1)
    if table.shape != expected.shape or not np.array_equal(table, expected):
        raise BnbFormatError(f"{what} is not bitsandbytes' standard table; jft cannot read a custom one")


def nf4_from_bnb(tensors: Mapping[str, np.ndarray], dtype=None) -> NF4:
    """An unstacked NF4 leaf from one bitsandbytes 4-bit linear's tensors (keyed by suffix).

    `dtype` (what the leaf dequantizes to) defaults to the dtype recorded in the quant_state."""
    state = read_quant_state(tensors)
    rows, cols = _matrix_shape(state)
    blocksize = _positive_even(state, "blocksize")
    n = rows * cols
    n_blocks = math.ceil(n / blocksize)

    packed = _require(tensors, WEIGHT)
    if packed.dtype != np.uint8:  # bnb_4bit_quant_storage other than uint8 holds the same bytes
        packed = np.ascontiguousarray(packed).view(np.uint8)
    packed = _check_length(packed, (n + 1) // 2, f"{WEIGHT} (packed bytes of a {rows}x{cols} weight)")
    if QUANT_MAP in tensors:
        _check_table(tensors[QUANT_MAP], NF4_CODES, QUANT_MAP)
    absmax = _check_length(_require(tensors, ABSMAX), n_blocks, ABSMAX)

    nested_absmax = offset = None
    nested_blocksize = DEFAULT_NESTED_BLOCKSIZE
    if "nested_offset" in state or NESTED_ABSMAX in tensors:
        for field in ("nested_blocksize", "nested_offset"):
            if field not in state:
                raise BnbFormatError(f"double-quantized quant_state lacks {field!r}: {state}")
        nested_blocksize = _positive_even(state, "nested_blocksize")
        if absmax.dtype != np.uint8:
            raise BnbFormatError(f"double-quantized {ABSMAX} must be uint8 codes, got {absmax.dtype}")
        _check_table(_require(tensors, NESTED_QUANT_MAP), DYNAMIC_MAP, NESTED_QUANT_MAP)
        nested = _require(tensors, NESTED_ABSMAX).astype(np.float32)
        nested_absmax = jnp.asarray(_check_length(nested, math.ceil(n_blocks / nested_blocksize), NESTED_ABSMAX))
        offset = jnp.asarray(np.float32(state["nested_offset"]))
        absmax = jnp.asarray(absmax)
    else:
        if not np.issubdtype(absmax.dtype, np.floating):
            raise BnbFormatError(f"{ABSMAX} without double quantization must be floating, got {absmax.dtype}")
        absmax = jnp.asarray(absmax.astype(np.float32))

    return NF4(
        packed=jnp.asarray(packed),
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        rows=rows,
        cols=cols,
        blocksize=blocksize,
        nested_blocksize=nested_blocksize,
        dtype_name=jnp.dtype(state["dtype"] if dtype is None else dtype).name,
    )


def quant_state_json(leaf: NF4) -> bytes:
    """The quant_state JSON bytes bitsandbytes writes for `leaf` (same keys, order and formatting)."""
    state = {
        "quant_type": "nf4",
        "blocksize": leaf.blocksize,
        "dtype": leaf.dtype_name,
        "shape": [leaf.rows, leaf.cols],
    }
    if leaf.double_quant:
        state["nested_blocksize"] = leaf.nested_blocksize
        state["nested_dtype"] = "float32"
        state["nested_offset"] = float(np.float32(np.asarray(leaf.offset)))
    return json.dumps(state).encode("utf-8")


def nf4_to_bnb(leaf: NF4) -> dict[str, np.ndarray]:
    """One unstacked NF4 leaf -> its bitsandbytes tensors keyed by suffix (numpy, host memory)."""
    if not isinstance(leaf, NF4):
        raise TypeError(f"nf4_to_bnb takes an NF4 leaf, got {type(leaf).__name__}")
    if leaf.batch_shape:
        raise ValueError(
            f"nf4_to_bnb writes one matrix; this leaf is stacked {leaf.batch_shape}: "
            "slice it first, e.g. jax.tree.map(lambda c: c[i], leaf)"
        )
    tensors = {
        WEIGHT: np.array(leaf.packed).reshape(-1, 1),
        ABSMAX: np.array(leaf.absmax),
        QUANT_MAP: NF4_CODES.copy(),
    }
    if leaf.double_quant:
        tensors[NESTED_ABSMAX] = np.array(leaf.nested_absmax, dtype=np.float32)
        tensors[NESTED_QUANT_MAP] = DYNAMIC_MAP.copy()
    tensors[QUANT_STATE] = np.frombuffer(quant_state_json(leaf), dtype=np.uint8).copy()
    return tensors


def bnb_quantization_config(
    compute_dtype: str = "bfloat16",
    double_quant: bool = True,
    quant_storage: str = "uint8",
    skip_modules: list[str] | None = None,
) -> dict:
    """`quantization_config` for config.json, as transformers' BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", ...).to_dict() writes it."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": jnp.dtype(compute_dtype).name,
        "bnb_4bit_quant_storage": quant_storage,
        "load_in_4bit": True,
        "load_in_8bit": False,
    }
