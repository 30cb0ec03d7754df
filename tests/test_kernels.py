"""jft.kernels: references against transformers/PyTorch and naive formulas, Pallas (interpret mode on
CPU) against the references, forward and backward.

Pallas interpret mode fills every output buffer with NaN before the kernel runs (and pads reads past
an array's end with NaN), so `_assert_finite` on a Pallas result proves every element was written;
`test_interpret_mode_poisons_unwritten_outputs` shows that this check can fail.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.experimental import pallas as pl
from jax.test_util import check_grads
from transformers import LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

import jft.kernels as K
from jft.kernels import registry
from jft.kernels.cross_entropy import linear_cross_entropy_pallas, linear_cross_entropy_reference
from jft.kernels.glu import geglu_pallas, geglu_reference, swiglu_pallas, swiglu_reference
from jft.kernels.rmsnorm import (
    rmsnorm_pallas,
    rmsnorm_reference,
    rmsnorm_residual_pallas,
    rmsnorm_residual_reference,
)
from jft.kernels.rope import rope_pallas, rope_reference

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-5, BF16: 1e-2}


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _normal(key, shape, dtype=F32):
    return jax.random.normal(key, shape, F32).astype(dtype)


def _assert_close(actual, expected, dtype=F32):
    """|a - e| <= tol * |e| + tol * max(1, max|e|) elementwise; tol is 1e-5 for fp32, 1e-2 for bf16."""
    a, e = np.asarray(jnp.asarray(actual, F32)), np.asarray(jnp.asarray(expected, F32))
    assert a.shape == e.shape, (a.shape, e.shape)
    tol = TOL[dtype]
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(1.0, float(np.abs(e).max(initial=0))))


def _assert_finite(*arrays):
    for a in jax.tree.leaves(arrays):
        assert bool(jnp.all(jnp.isfinite(jnp.asarray(a, F32)))), "a Pallas output has unwritten (NaN) elements"


def _outputs_and_grads(fn, args, argnums, seed=7):
    """fn(*args) and the gradients of a random projection of its outputs, in one jit."""

    def scalar(*a):
        outs = fn(*a)
        leaves = jax.tree.leaves(outs)
        keys = _keys(len(leaves), seed)
        return sum(jnp.sum(o.astype(F32) * _normal(kk, o.shape)) for o, kk in zip(leaves, keys)), outs

    grads, outs = jax.jit(jax.grad(scalar, argnums, has_aux=True))(*args)
    return outs, grads


def _compare_pallas(pallas, reference, args, argnums, dtype):
    """Pallas outputs and gradients are fully written and equal the reference's."""
    out, grads = _outputs_and_grads(pallas, args, argnums)
    ref_out, ref_grads = _outputs_and_grads(reference, args, argnums)
    _assert_finite(out, grads)
    for a, e in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref_out, ref_grads))):
        _assert_close(a, e, dtype)


def _torch(a):
    return torch.from_numpy(np.asarray(jnp.asarray(a, F32)).copy())


# ----------------------------------------------------------------------------- poison + registry


def test_interpret_mode_poisons_unwritten_outputs():
    def half_kernel(x_ref, o_ref):
        o_ref[pl.ds(0, 4)] = x_ref[pl.ds(0, 4)]

    x = jnp.arange(8.0)
    out = pl.pallas_call(half_kernel, out_shape=jax.ShapeDtypeStruct((8,), F32), interpret=True)(x)
    assert not bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(AssertionError):
        _assert_finite(out)


def test_registry_modes_and_dispatch():
    assert jax.default_backend() == "cpu"
    assert registry.interpret()
    with K.use("reference"):
        assert K.implementation("rmsnorm") is rmsnorm_reference
    with K.use("pallas"):
        assert K.implementation("rmsnorm") is rmsnorm_pallas
        assert K.implementation("attention").__name__ == "attention_pallas"
        with K.use("reference"):
            assert K.mode() == "reference"
        assert K.mode() == "pallas"
    with K.use("auto"):  # the Pallas versions win only on GPU
        for name, op in K.ops().items():
            assert K.implementation(name) is op.reference, name
    previous = K.mode()
    K.use("pallas")
    try:
        assert K.mode() == "pallas" and K.implementation("swiglu") is swiglu_pallas
    finally:
        K.use(previous)
    with pytest.raises(ValueError, match="unknown kernel mode"):
        K.use("triton")
    with pytest.raises(KeyError, match="no kernel op"):
        K.implementation("no_such_op")


def test_registry_accepts_ops_from_other_modules():
    name = "test_only_double"
    K.register(name, lambda x: 2 * x)
    K.register_pallas(name, lambda x: x + x, auto_backends=(jax.default_backend(),))
    with K.use("auto"):
        assert float(registry.call(name, jnp.float32(3.0))) == 6.0
        assert K.implementation(name) is K.ops()[name].pallas
    with K.use("reference"):
        assert K.implementation(name) is K.ops()[name].reference
    with pytest.raises(KeyError):
        K.register_pallas("never_registered", lambda x: x)


def test_env_var_sets_initial_mode():
    code = "import jft.kernels as K; print(K.mode())"
    env = dict(os.environ, JFT_KERNELS="reference", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["JFT_KERNELS"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown kernel mode" in bad.stderr


def test_public_functions_dispatch_to_the_selected_implementation():
    k = _keys(2)
    x, w = _normal(k[0], (3, 8)), _normal(k[1], (8,))
    with K.use("reference"):
        ref = K.rmsnorm(x, w, 1e-6, 1.0)
    with K.use("pallas"):
        pal = K.rmsnorm(x, w, 1e-6, 1.0)
    _assert_close(ref, rmsnorm_reference(x, w, 1e-6, 1.0))
    _assert_close(pal, ref)


# ----------------------------------------------------------------------------- rmsnorm


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_reference_matches_transformers(offset):
    k = _keys(2)
    x, w = _normal(k[0], (2, 3, 24)), _normal(k[1], (24,))
    hf = (GemmaRMSNorm if offset else LlamaRMSNorm)(24, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(_torch(w))
        expected = hf(_torch(x)).numpy()
    _assert_close(rmsnorm_reference(x, w, 1e-5, offset), expected)
    check_grads(jax.jit(lambda x, w: rmsnorm_reference(x, w, 1e-5, offset)), (x, w), order=1, modes=["rev"], eps=1e-3)


@pytest.mark.parametrize("dtype,shape,offset", [(F32, (2, 3, 13), 0.0), (BF16, (4, 32), 1.0), (BF16, (3, 7), 0.0)])
def test_rmsnorm_pallas_matches_reference(dtype, shape, offset):
    k = _keys(3)
    x, w = _normal(k[0], shape, dtype), _normal(k[1], shape[-1:], dtype)
    fn = lambda impl: (lambda x, w: impl(x, w, 1e-6, offset))
    _compare_pallas(fn(rmsnorm_pallas), fn(rmsnorm_reference), (x, w), (0, 1), dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rmsnorm_residual_pallas_matches_reference(dtype):
    k = _keys(3)
    x, r, w = _normal(k[0], (5, 3, 20), dtype), _normal(k[1], (5, 3, 20), dtype), _normal(k[2], (20,), dtype)
    fn = lambda impl: (lambda x, r, w: impl(x, r, w, 1e-6, 1.0))
    ref_y, ref_s = fn(rmsnorm_residual_reference)(x, r, w)
    _assert_close(ref_s, x + r, dtype)
    _assert_close(ref_y, rmsnorm_reference(x + r, w, 1e-6, 1.0), dtype)
    _compare_pallas(fn(rmsnorm_residual_pallas), fn(rmsnorm_residual_reference), (x, r, w), (0, 1, 2), dtype)


# ----------------------------------------------------------------------------- rope


def _llama3_rotary(head_dim):
    config = LlamaConfig(
        head_dim=head_dim,
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    return LlamaRotaryEmbedding(config)


def test_rope_reference_matches_transformers_llama3():
    b, t, hq, hkv, hd = 2, 5, 4, 2, 16
    k = _keys(3)
    q, kk = _normal(k[0], (b, t, hq, hd)), _normal(k[1], (b, t, hkv, hd))
    positions = jax.random.randint(k[2], (b, t), 0, 60)
    rotary = _llama3_rotary(hd)
    inv_freq = jnp.asarray(rotary.inv_freq.numpy())
    with torch.no_grad():
        cos, sin = rotary(_torch(q), torch.tensor(np.asarray(positions)).long())
        to_bhtd = lambda a: _torch(a).transpose(1, 2)
        q_hf, k_hf = apply_rotary_pos_emb(to_bhtd(q), to_bhtd(kk), cos, sin)
    q_ref, k_ref = rope_reference(q, kk, positions, inv_freq)
    _assert_close(q_ref, q_hf.transpose(1, 2).numpy())
    _assert_close(k_ref, k_hf.transpose(1, 2).numpy())
    check_grads(jax.jit(lambda q, kk: rope_reference(q, kk, positions, inv_freq)), (q, kk), order=1, modes=["rev"], eps=1e-3)


def test_rope_reference_partial_rotary_passes_the_rest_through():
    k = _keys(3)
    q, kk = _normal(k[0], (1, 3, 2, 10)), _normal(k[1], (1, 3, 1, 10))
    positions = jnp.array([[0, 4, 1]])
    inv_freq = 1.0 / 100.0 ** (jnp.arange(0, 4, 2) / 4.0)
    q_out, k_out = rope_reference(q, kk, positions, inv_freq)
    _assert_close(q_out[..., 4:], q[..., 4:])
    full_q, _ = rope_reference(q[..., :4], kk[..., :4], positions, inv_freq)
    _assert_close(q_out[..., :4], full_q)
    _assert_close(q_out[:, 0], q[:, 0])  # position 0 is the identity


@pytest.mark.parametrize("dtype,dims", [(F32, (2, 2, 3, 1, 12, 6)), (BF16, (1, 3, 4, 2, 8, 8))])
def test_rope_pallas_matches_reference(dtype, dims):
    b, t, hq, hkv, hd, rotary_dim = dims
    k = _keys(3, seed=hd)
    q, kk = _normal(k[0], (b, t, hq, hd), dtype), _normal(k[1], (b, t, hkv, hd), dtype)
    positions = jax.random.randint(k[2], (b, t), 0, 50)
    inv_freq = 1.0 / 10000.0 ** (jnp.arange(0, rotary_dim, 2) / rotary_dim)
    fn = lambda impl: (lambda q, kk: impl(q, kk, positions, inv_freq, 0.9))
    _compare_pallas(fn(rope_pallas), fn(rope_reference), (q, kk), (0, 1), dtype)


# ----------------------------------------------------------------------------- glu


def test_glu_references_match_torch():
    k = _keys(2)
    g, u = _normal(k[0], (3, 7)) * 3, _normal(k[1], (3, 7))
    _assert_close(swiglu_reference(g, u), (F.silu(_torch(g)) * _torch(u)).numpy())
    _assert_close(geglu_reference(g, u), (F.gelu(_torch(g), approximate="tanh") * _torch(u)).numpy())
    check_grads(jax.jit(swiglu_reference), (g, u), order=1, modes=["rev"], eps=1e-3)
    check_grads(jax.jit(geglu_reference), (g, u), order=1, modes=["rev"], eps=1e-3)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("which", ["swiglu", "geglu"])
def test_glu_pallas_matches_reference(dtype, which):
    pallas, reference = {"swiglu": (swiglu_pallas, swiglu_reference), "geglu": (geglu_pallas, geglu_reference)}[which]
    k = _keys(2)
    shape = (3, 1100)  # 3300 elements: four 1024-blocks, the last one ragged
    g, u = _normal(k[0], shape, dtype) * 3, _normal(k[1], shape, dtype)
    _compare_pallas(pallas, reference, (g, u), (0, 1), dtype)


# ----------------------------------------------------------------------------- linear cross-entropy

CE_CASES = [
    dict(chunk_size=4, vocab_chunk_size=16),  # ragged in tokens (13 = 4+4+4+1) and vocab (37 = 16+16+5)
    dict(chunk_size=5, vocab_chunk_size=10, softcap=3.0, logit_scale=0.7),
    dict(chunk_size=64, vocab_chunk_size=64, ignore_index=0),  # one chunk each
]


def _ce_inputs(dtype=F32, n=13, d=8, v=37):
    k = _keys(3, seed=n)
    h, w = _normal(k[0], (n, d), dtype), _normal(k[1], (v, d), dtype)
    labels = jax.random.randint(k[2], (n,), 0, v).at[3].set(-100).at[7].set(-100)
    return h, w, labels


def _torch_ce(h, w, labels, *, ignore_index=-100, softcap=None, logit_scale=1.0, **_):
    """Full-logits cross-entropy in PyTorch: values and d(hidden), d(weight) of a weighted sum."""
    th, tw = _torch(h).requires_grad_(), _torch(w).requires_grad_()
    logits = (th @ tw.T) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    target = torch.tensor(np.asarray(labels)).long()
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.arange(1, h.shape[0] + 1, dtype=torch.float32)
    (torch.sum(loss * weights) + 0.1 * torch.sum(lse**2)).backward()
    return loss.detach().numpy(), lse.detach().numpy(), th.grad.numpy(), tw.grad.numpy()


def _jax_ce_grads(fn, h, w, labels, **kw):
    weights = jnp.arange(1, h.shape[0] + 1, dtype=F32)

    def scalar(h, w):
        loss, lse = fn(h, w, labels, **kw)
        return jnp.sum(loss * weights) + 0.1 * jnp.sum(lse**2)

    return jax.jit(jax.grad(scalar, (0, 1)))(h, w)


@pytest.mark.parametrize("kw", CE_CASES)
def test_linear_cross_entropy_reference_matches_torch(kw):
    h, w, labels = _ce_inputs()
    if kw.get("ignore_index") == 0:
        labels = jnp.where(labels == -100, 0, labels)
    loss, lse = linear_cross_entropy_reference(h, w, labels, **kw)
    t_loss, t_lse, t_dh, t_dw = _torch_ce(h, w, labels, **kw)
    _assert_close(loss, t_loss)
    _assert_close(lse, t_lse)
    ignored = np.asarray(labels) == kw.get("ignore_index", -100)
    assert ignored.any() and np.all(np.asarray(loss)[ignored] == 0.0)
    dh, dw = _jax_ce_grads(linear_cross_entropy_reference, h, w, labels, **kw)
    _assert_close(dh, t_dh)
    _assert_close(dw, t_dw)


@pytest.mark.parametrize("impl", [linear_cross_entropy_reference, linear_cross_entropy_pallas])
@pytest.mark.parametrize("kw", CE_CASES)
def test_linear_cross_entropy_frozen_weight_gives_the_same_hidden_gradient(kw, impl):
    """With the weight not differentiated, d(hidden) comes from the forward's expected rows."""
    h, w, labels = _ce_inputs()
    labels = labels.at[5].set(w.shape[0] + 2)  # out of range: its label logit counts as 0
    if kw.get("ignore_index") == 0:
        labels = jnp.where(labels == -100, 0, labels)
    weights = jnp.arange(1, h.shape[0] + 1, dtype=F32)

    def scalar(h):
        loss, lse = impl(h, w, labels, **kw)
        return jnp.sum(loss * weights) + 0.1 * jnp.sum(lse**2)

    dh_with_weight, _ = _jax_ce_grads(impl, h, w, labels, **kw)  # the path checked against torch above
    _assert_close(jax.jit(jax.grad(scalar))(h), dh_with_weight)
    loss = lambda h, w: jnp.sum(impl(h, w, labels, **kw)[0])  # lse's cotangent is a symbolic zero
    _assert_close(jax.jit(jax.grad(loss))(h, w), jax.jit(jax.grad(loss, (0, 1)))(h, w)[0])


def test_linear_cross_entropy_reference_check_grads():
    h, w, labels = _ce_inputs(n=6, d=4, v=11)
    fn = lambda h, w: linear_cross_entropy_reference(h, w, labels, chunk_size=4, vocab_chunk_size=4, softcap=2.0)
    check_grads(jax.jit(fn), (h, w), order=1, modes=["rev"], eps=1e-3)


def test_linear_cross_entropy_never_materialises_full_logits():
    h, w, labels = _ce_inputs(n=64, d=8, v=96)
    kw = dict(chunk_size=16, vocab_chunk_size=32)
    fn = jax.jit(jax.grad(lambda h, w: jnp.sum(linear_cross_entropy_reference(h, w, labels, **kw)[0]), (0, 1)))
    hlo = fn.lower(h, w).as_text()
    for full in ("64x96xf32", "16x96xf32", "64x32xf32"):
        assert full not in hlo
    assert "16x32xf32" in hlo


def test_linear_cross_entropy_frozen_weight_costs_no_weight_matmul_and_no_recomputation():
    h, w, labels = _ce_inputs(n=64, d=8, v=96)
    kw = dict(chunk_size=16, vocab_chunk_size=32)

    def dots(argnums):
        loss = lambda h, w: jnp.sum(linear_cross_entropy_reference(h, w, labels, **kw)[0])
        hlo = jax.jit(jax.grad(loss, argnums)).lower(h, w).compile().as_text()
        return [line.split("=")[1].split()[0] for line in hlo.splitlines() if " dot(" in line]

    assert any(shape.startswith("f32[32,8]") for shape in dots((0, 1)))  # d(weight) per vocab chunk
    assert not any(shape.startswith("f32[32,8]") for shape in dots((0,)))
    logits_tiles = lambda argnums: sum(shape.startswith("f32[16,32]") for shape in dots(argnums))
    assert logits_tiles((0, 1)) == 2  # the forward's, and the backward's recomputation
    assert logits_tiles((0,)) == 1  # d(hidden) is made in the forward, beside the logits


@pytest.mark.parametrize("dtype,kw", [(F32, CE_CASES[0]), (BF16, CE_CASES[1])])
def test_linear_cross_entropy_pallas_matches_reference(dtype, kw):
    h, w, labels = _ce_inputs(dtype)
    fn = lambda impl: (lambda h, w: impl(h, w, labels, **kw))
    _compare_pallas(fn(linear_cross_entropy_pallas), fn(linear_cross_entropy_reference), (h, w), (0, 1), dtype)


def test_linear_cross_entropy_rejects_bad_input():
    h, w, labels = _ce_inputs()
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy_reference(h, w.T, labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy_reference(h, w, labels.astype(F32))


# ----------------------------------------------------------------------------- attention

from jft.kernels.attention import allowed_mask, attention_pallas, attention_reference  # noqa: E402


def _naive_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, scale, window=None, softcap=None):
    """Loop-over-everything float64 attention, straight from the definition in attention.py."""
    q, k, v = (np.asarray(jnp.asarray(a, F32), np.float64) for a in (q, k, v))
    q_pos, k_pos, q_seg, k_seg = (np.asarray(a) for a in (q_pos, k_pos, q_seg, k_seg))
    b, t, hq, hd = q.shape
    group = hq // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for ti in range(t):
                ok = (k_pos[bi] <= q_pos[bi, ti]) & (k_seg[bi] == q_seg[bi, ti])
                if window is not None:
                    ok &= q_pos[bi, ti] - k_pos[bi] < window
                if not ok.any():
                    continue  # a query that sees nothing outputs zeros
                s = k[bi, :, h // group] @ q[bi, ti, h] * scale
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s[ok] - s[ok].max())
                out[bi, ti, h] = (p / p.sum()) @ v[bi, ok, h // group]
    return out


BLOCKS_16 = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)  # several blocks on small test shapes


def _attention_inputs(b, t, s, hq, hkv, hd, dtype=F32, seed=0):
    k = _keys(3, seed)
    q = _normal(k[0], (b, t, hq, hd), dtype)
    kk, v = _normal(k[1], (b, s, hkv, hd), dtype), _normal(k[2], (b, s, hkv, hd), dtype)
    # two packed documents per row; positions restart at each document
    first = s // 2 + 1
    k_pos = jnp.tile(jnp.concatenate([jnp.arange(first), jnp.arange(s - first)]), (b, 1))
    k_seg = jnp.tile(jnp.concatenate([jnp.zeros(first, int), jnp.ones(s - first, int)]), (b, 1))
    # the queries are the last t keys (t == s: self-attention over the packed row)
    return q, kk, v, k_pos[:, s - t :], k_pos, k_seg[:, s - t :], k_seg


@pytest.mark.parametrize("kw", [dict(), dict(window=3, softcap=1.5, scale=0.3)])
def test_attention_reference_matches_naive(kw):
    q, k, v, qp, kp, qs, ks = _attention_inputs(2, 9, 9, 4, 2, 6)
    qp = qp.at[1, 0].set(-1)  # sees no key at all
    expected = _naive_attention(q, k, v, qp, kp, qs, ks, kw.get("scale", 6**-0.5), kw.get("window"), kw.get("softcap"))
    assert np.all(expected[1, 0] == 0.0)
    _assert_close(attention_reference(q, k, v, qp, kp, qs, ks, **kw), expected)
    if not kw:
        return  # gradients are checked once, on the case with every option
    fn = jax.jit(lambda q, k, v: attention_reference(q, k, v, qp, kp, qs, ks, **kw))
    check_grads(fn, (q, k, v), order=1, modes=["rev"], eps=1e-3)


def test_attention_reference_matches_torch_sdpa():
    q, k, v, qp, kp, qs, ks = _attention_inputs(1, 8, 8, 4, 2, 8)
    mask = torch.tensor(np.asarray((kp[:, None, :] <= qp[:, :, None]) & (ks[:, None, :] == qs[:, :, None])))
    to_bhtd = lambda a: _torch(a).transpose(1, 2)
    expected = F.scaled_dot_product_attention(
        to_bhtd(q), to_bhtd(k), to_bhtd(v), attn_mask=mask[:, None], enable_gqa=True
    ).transpose(1, 2)
    _assert_close(attention_reference(q, k, v, qp, kp, qs, ks), expected.numpy())
    # segment ids omitted = one segment
    _assert_close(
        attention_reference(q, k, v, qp, kp),
        attention_reference(q, k, v, qp, kp, jnp.zeros_like(qs), jnp.zeros_like(ks)),
    )


@pytest.mark.parametrize(
    "dtype,dims,kw",
    [
        # ragged T=S=20 over 16-blocks, GQA, hd 12 -> 16, two packed documents
        (F32, (2, 20, 20, 4, 2, 12), dict(window=5, softcap=2.0)),
        (BF16, (1, 5, 19, 3, 1, 16), dict(scale=0.2)),  # queries = the last 5 keys
    ],
)
def test_attention_pallas_matches_reference(dtype, dims, kw):
    q, k, v, qp, kp, qs, ks = _attention_inputs(*dims, dtype=dtype)
    pallas = lambda q, k, v: attention_pallas(q, k, v, qp, kp, qs, ks, **kw, **BLOCKS_16)
    reference = lambda q, k, v: attention_reference(q, k, v, qp, kp, qs, ks, **kw)
    _compare_pallas(pallas, reference, (q, k, v), (0, 1, 2), dtype)


@pytest.mark.parametrize("window", [None, 40])
def test_attention_pallas_unmasked_blocks_match_reference(window):
    """One document of 64 tokens over 16-blocks: most visited blocks need no mask (the kernels'
    unmasked loop); with a window, masked blocks come before and after that run."""
    q, k, v, _, _, _, _ = _attention_inputs(2, 64, 64, 4, 2, 16)
    pos = jnp.tile(jnp.arange(64), (2, 1))
    pallas = lambda q, k, v: attention_pallas(q, k, v, pos, pos, window=window, **BLOCKS_16)
    reference = lambda q, k, v: attention_reference(q, k, v, pos, pos, window=window)
    _compare_pallas(pallas, reference, (q, k, v), (0, 1, 2), F32)


def test_attention_pallas_propagates_nan_as_the_reference_does():
    """A NaN score must reach the output (the trainers stop on a non-finite loss), not read as a query
    that sees no key."""
    q, k, v, qp, kp, qs, ks = _attention_inputs(1, 20, 20, 4, 2, 16)
    q = q.at[0, 3, 1, 0].set(jnp.nan)
    expected = np.isnan(np.asarray(attention_reference(q, k, v, qp, kp, qs, ks)))
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(np.isnan(np.asarray(attention_pallas(q, k, v, qp, kp, qs, ks, **BLOCKS_16))), expected)


@pytest.mark.parametrize("window", [None, 40])
def test_attention_block_ranges_visit_exactly_the_visible_blocks(window):
    from jft.kernels.attention import _block_ranges

    rng = np.random.default_rng(0)
    b, t, bq, bk = 4, 96, 16, 8
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=1)  # packed documents after padding (left-padded rows)
    seg[2] = 0  # one document
    seg[3] = [1] * 70 + [2] * 16 + [0] * 10  # as packing makes them: a long document, a short one, padding
    pos = np.stack([np.concatenate([np.arange((r == d).sum()) for d in dict.fromkeys(r)]) for r in seg])
    qp, kp, qs, ks = (jnp.asarray(a, jnp.int32) for a in (pos, pos, seg, seg))
    visible = np.asarray(allowed_mask(qp, kp, qs, ks, window))
    key_ranges, q_ranges = (np.asarray(r) for r in _block_ranges(qp, kp, qs, ks, bq, bk, window))
    blocks = visible.reshape(b, t // bq, bq, t // bk, bk)
    some, every = blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))
    for ranges, some_, every_ in ((key_ranges, some, every), (q_ranges, some.swapaxes(1, 2), every.swapaxes(1, 2))):
        lo, full_lo, full_hi, hi = np.moveaxis(ranges, -1, 0)
        assert np.all((lo <= full_lo) & (full_lo <= full_hi) & (full_hi <= hi))
        index = np.arange(some_.shape[-1])
        unmasked = (index >= full_lo[..., None]) & (index < full_hi[..., None])
        assert not np.any(unmasked & ~every_), "a block with a hidden key runs without the mask"
        seen = some_.any(axis=-1)
        first, last = np.argmax(some_, axis=-1), some_.shape[-1] - 1 - np.argmax(some_[..., ::-1], axis=-1)
        np.testing.assert_array_equal(np.where(seen, lo, 0), np.where(seen, first, 0))  # from the first visible block
        np.testing.assert_array_equal(np.where(seen, hi, 0), np.where(seen, last + 1, 0))  # to the last
        np.testing.assert_array_equal(np.where(seen, 0, hi - lo), 0)  # and nothing where none is visible
    # the one-document row: q block i sees key blocks [0, 2i + 2), of which 2i need no mask (no
    # window); a window masks the oldest blocks too, so the unmasked run starts later
    lo, full_lo, full_hi, hi = np.moveaxis(key_ranges[2], -1, 0)
    i = np.arange(t // bq)
    np.testing.assert_array_equal(hi, 2 * i + 2)
    if window is None:
        np.testing.assert_array_equal(lo, 0)
        np.testing.assert_array_equal(full_hi - full_lo, 2 * i)
    else:
        assert np.all(full_hi[3:] > full_lo[3:]) and np.all(lo[3:] < full_lo[3:])
    # the packed row: the first document's q blocks stop at the diagonal, as in the one-document row
    np.testing.assert_array_equal(key_ranges[3, :4, 3], 2 * i[:4] + 2)


def test_attention_rejects_bad_shapes():
    q, k, v, qp, kp, qs, ks = _attention_inputs(1, 4, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        attention_reference(q, k, v, qp, kp)
    q, k, v, qp, kp, qs, ks = _attention_inputs(1, 4, 4, 2, 1, 8)
    with pytest.raises(ValueError, match="both"):
        attention_pallas(q, k, v, qp, kp, qs, None)


# ----------------------------------------------------------------------------- Triton lowering


def _triton_cases():
    S, bf = jax.ShapeDtypeStruct, BF16
    pos = jnp.arange(100)[None]
    labels = jnp.zeros((100,), jnp.int32)
    attn = lambda hd: (
        lambda q, k, v: attention_pallas(q, k, v, pos, pos, softcap=50.0, window=30),
        (S((1, 100, 8, hd), bf), S((1, 100, 2, hd), bf), S((1, 100, 2, hd), bf)),
    )
    return {
        "rmsnorm": (lambda x, w: rmsnorm_pallas(x, w, 1e-6, 1.0), (S((10, 3584), bf), S((3584,), bf))),
        "rmsnorm_residual": (rmsnorm_residual_pallas, (S((10, 3584), bf), S((10, 3584), bf), S((3584,), bf))),
        "rope": (lambda q, k: rope_pallas(q, k, pos, jnp.ones(48)), (S((1, 100, 14, 96), bf), S((1, 100, 2, 96), bf))),
        "rope_partial": (lambda q, k: rope_pallas(q, k, pos, jnp.ones(16)), (S((1, 100, 4, 80), bf), S((1, 100, 2, 80), bf))),
        "swiglu": (swiglu_pallas, (S((100, 1000), bf), S((100, 1000), bf))),
        "geglu": (geglu_pallas, (S((100, 1000), bf), S((100, 1000), bf))),
        "linear_cross_entropy": (
            lambda h, w: linear_cross_entropy_pallas(h, w, labels, softcap=30.0, chunk_size=64, vocab_chunk_size=256),
            (S((100, 72), bf), S((1000, 72), bf)),
        ),
        "attention_hd128": attn(128),
        "attention_hd256": attn(256),
        "attention_hd96": attn(96),
    }


@pytest.mark.parametrize("name", list(_triton_cases()))
def test_pallas_kernels_lower_to_triton_for_gpu(name, monkeypatch):
    """Forward and backward lower through Pallas' Triton backend (no GPU needed to lower)."""
    monkeypatch.setattr(registry, "interpret", lambda: False)
    fn, shapes = _triton_cases()[name]

    def forward_backward(*args):
        out, pullback = jax.vjp(fn, *args)
        return pullback(jax.tree.map(jnp.ones_like, out))

    lowered = jax.jit(forward_backward).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()
