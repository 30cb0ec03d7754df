"""jft's GGUF writer, read back by gguf-py's GGUFReader (the reference reader)."""

import os

import gguf
import numpy as np
import pytest

from jft.convert import gguf_io, gguf_quants
from jft.convert.gguf_io import GGUFTensor, GGUFValueType as V, GGUFWriteError, write_gguf

RNG = np.random.default_rng(0)

KV = [
    ("general.architecture", V.STRING, "llama"),
    ("general.name", V.STRING, "tiny ünïcode"),
    ("test.u8", V.UINT8, 200),
    ("test.i8", V.INT8, -100),
    ("test.u16", V.UINT16, 60000),
    ("test.i16", V.INT16, -30000),
    ("test.u32", V.UINT32, 4_000_000_000),
    ("test.i32", V.INT32, -2_000_000_000),
    ("test.f32", V.FLOAT32, 1e-5),
    ("test.bool", V.BOOL, True),
    ("test.u64", V.UINT64, 2**63 + 5),
    ("test.i64", V.INT64, -(2**62)),
    ("test.f64", V.FLOAT64, 3.141592653589793),
    ("test.tokens", V.ARRAY, (V.STRING, ["<s>", "hello", "ĠwÃ¶rld", ""])),
    ("test.scores", V.ARRAY, (V.FLOAT32, [0.0, -1.5, 2.25])),
    ("test.types", V.ARRAY, (V.INT32, [1, 3, 6])),
    ("test.flags", V.ARRAY, (V.BOOL, [True, False])),
    ("test.empty", V.ARRAY, (V.UINT32, [])),
]


def _tensors():
    """(name, encoded bytes, ggml type id, logical shape, float values) for several types."""
    out = []
    for name, qtype, shape in [
        ("token_embd.weight", "q8_0", (8, 64)),
        ("blk.0.attn_q.weight", "q4_k", (3, 512)),
        ("blk.0.ffn_down.weight", "q6_k", (2, 256)),
        ("blk.0.attn_norm.weight", "f32", (13,)),
        ("blk.0.attn_k.weight", "f16", (5, 7)),
        ("blk.0.experts.weight", "bf16", (2, 3, 4)),
        ("output.weight", "q5_0", (4, 32)),
    ]:
        x = RNG.standard_normal(shape).astype(np.float32)
        spec = gguf_quants.QUANT_TYPES[qtype]
        out.append((name, spec.quantize(x), spec.type_id, shape))
    return out


def _value_types(field):
    """The field's value type and, for arrays, its element type read from the raw parts
    (gguf-py leaves `types` without the element type when an array is empty)."""
    if field.types[0] == V.ARRAY:
        return [V.ARRAY, V(int(field.parts[3][0]))]
    return list(field.types)


def _read_back(path):
    reader = gguf.GGUFReader(path)
    kv = {name: (_value_types(field), field.contents()) for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return reader, kv, tensors


def _check_file(path, tensors):
    reader, kv, read = _read_back(path)
    for key, vtype, value in KV:
        types, got = kv[key]
        assert types[0] == vtype, key
        if vtype == V.ARRAY:
            assert types[-1] == value[0], key
            expected = list(value[1])
            if value[0] == V.FLOAT32:
                expected = list(np.float32(expected))
            assert list(got) == expected, key
        elif vtype == V.FLOAT32:
            assert got == np.float32(value), key
        else:
            assert got == value, key
    assert kv["general.alignment"] == ([V.UINT32], 32)
    assert reader.alignment == 32
    assert [t.name for t in reader.tensors] == [t[0] for t in tensors]
    for name, data, type_id, shape in tensors:
        t = read[name]
        assert int(t.tensor_type) == type_id, name
        assert tuple(int(d) for d in t.shape) == tuple(reversed(shape)), name
        assert t.data_offset % 32 == 0, name
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), data.reshape(-1).view(np.uint8)), name


def test_every_key_and_tensor_reads_back_exactly(tmp_path):
    tensors = _tensors()
    path = tmp_path / "model.gguf"
    write_gguf(path, KV, tensors)
    _check_file(path, tensors)
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    """Readable by others under a 022 umask, as llama.cpp or Ollama running as another user need."""
    from jft.convert.safetensors_io import save_file

    previous = os.umask(0o022)
    try:
        write_gguf(tmp_path / "model.gguf", KV, _tensors())
        save_file({"w": np.zeros(3, np.float32)}, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    for name in ("model.gguf", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_generator_and_lazy_tensors_give_the_same_file(tmp_path):
    tensors = _tensors()
    write_gguf(tmp_path / "list.gguf", KV, tensors)
    write_gguf(tmp_path / "gen.gguf", KV, (t for t in tensors))
    lazy = [GGUFTensor(n, (lambda d=d: d), ty, s) for n, d, ty, s in tensors]
    write_gguf(tmp_path / "lazy.gguf", KV, lazy)
    reference = (tmp_path / "list.gguf").read_bytes()
    assert (tmp_path / "gen.gguf").read_bytes() == reference
    assert (tmp_path / "lazy.gguf").read_bytes() == reference
    _check_file(tmp_path / "gen.gguf", tensors)


def test_float_data_of_the_right_size_is_written_as_is(tmp_path):
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    write_gguf(tmp_path / "f.gguf", [], [("w", x, 0, x.shape)])
    _, _, read = _read_back(tmp_path / "f.gguf")
    np.testing.assert_array_equal(read["w"].data, x)


def _failing_generator(tensors):
    yield tensors[0]
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("kind", ["generator", "lazy"])
def test_error_mid_write_leaves_nothing_under_the_final_name(tmp_path, kind):
    tensors = _tensors()
    path = tmp_path / "model.gguf"
    if kind == "generator":
        source = _failing_generator(tensors)
    else:

        def boom():
            raise OSError(28, "No space left on device")

        source = [tensors[0], GGUFTensor("bad", boom, 0, (4,))]
    with pytest.raises(OSError, match="No space"):
        write_gguf(path, KV, source)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.gguf"
    good = _tensors()
    write_gguf(path, KV, good)
    before = path.read_bytes()
    with pytest.raises(OSError):
        write_gguf(path, KV, _failing_generator(good))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.gguf"]


@pytest.mark.parametrize(
    "kv, tensors, message",
    [
        ([], [("w", np.zeros(10, np.uint8), 8, (2, 32))], "needs 68"),
        ([], [("w", np.zeros(18, np.uint8), 12, (1, 100))], "not a multiple"),
        ([], [("w", np.zeros(4, np.uint8), 99, (1,))], "unsupported ggml type"),
        ([], [("w", np.zeros(4, np.float32), 0, (4,)), ("w", np.zeros(4, np.float32), 0, (4,))], "duplicate tensor"),
        ([("a", V.UINT8, 300)], [], "does not fit UINT8"),
        ([("a", V.STRING, 3)], [], "expected a string"),
        ([("a", 42, 3)], [], "unknown GGUF value type"),
        ([("a", V.UINT8, 1), ("a", V.UINT8, 2)], [], "duplicate metadata"),
        ([("a", V.ARRAY, [1, 2])], [], "element_type, values"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, kv, tensors, message):
    with pytest.raises(GGUFWriteError, match=message):
        write_gguf(tmp_path / "x.gguf", kv, tensors)
    assert os.listdir(tmp_path) == []


def test_tensor_nbytes_matches_gguf_py():
    for qtype in (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 14, 30):
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        assert gguf_io.GGML_BLOCKS[qtype] == (block, size)
        assert gguf_io.tensor_nbytes(qtype, (3, block * 4)) == 3 * 4 * size
