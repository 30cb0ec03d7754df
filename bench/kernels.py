"""Time jft's kernels: Pallas vs the XLA-compiled reference, forward and forward+backward.

    python bench/kernels.py            # on the H200: Llama-3-8B and Gemma-2-9B shapes, 4096 tokens
    python bench/kernels.py --small    # tiny shapes; runs anywhere (Pallas in interpret mode on CPU)

"ms" is the median over --samples samples of --calls back-to-back calls of one jitted function
(after warm-up), divided by --calls. The calls cycle through copies of the inputs, so that each
reads them from memory, not from the cache the call before left them in. On a GPU, "kernel ms" is
the time the GPU spent in the call's kernels (the profiler's durations): for ops of tens of
microseconds the wall clock also counts the host's dispatch, which varies between runs. Rates and
ceilings use the kernel time where there is one. Memory-bound ops report GB/s of the minimal HBM
traffic against a copy measured in the same run; matmul-bound ops report TFLOP/s of useful work
against a bf16 matmul measured in the same run. "fwd+bwd" runs jax.vjp and the pullback together.
A row whose implementation fails to compile or run prints the error instead of a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jft.kernels.attention import attention_pallas, attention_reference  # noqa: E402
from jft.kernels.cross_entropy import (  # noqa: E402
    linear_cross_entropy_pallas,
    linear_cross_entropy_reference,
)
from jft.kernels.glu import geglu_pallas, geglu_reference, swiglu_pallas, swiglu_reference  # noqa: E402
from jft.kernels.rmsnorm import (  # noqa: E402
    rmsnorm_pallas,
    rmsnorm_reference,
    rmsnorm_residual_pallas,
    rmsnorm_residual_reference,
)
from jft.kernels.nf4 import dequantize_pallas as nf4_dequantize_pallas  # noqa: E402
from jft.kernels.nf4 import dequantize_reference as nf4_dequantize_reference  # noqa: E402
from jft.kernels.nf4 import nf4_matmul_pallas, nf4_matmul_reference  # noqa: E402
from jft.kernels.rope import rope_pallas, rope_reference  # noqa: E402
from jft.quant import quantize_nf4  # noqa: E402
from profile import kernel_events  # noqa: E402  (bench/profile.py)
from train import packed_layout  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    glu: str  # "swiglu" or "geglu"
    norm_offset: float
    attn_softcap: float | None
    final_softcap: float | None
    window: int | None
    attn_scale: float | None


LLAMA3_8B = Model("llama3-8b", 4096, 14336, 32, 8, 128, 128256, "swiglu", 0.0, None, None, None, None)
GEMMA2_9B = Model("gemma2-9b", 3584, 14336, 16, 8, 256, 256000, "geglu", 1.0, 50.0, 30.0, 4096, 256**-0.5)
SMALL = [
    Model("tiny-llama", 64, 160, 4, 2, 32, 500, "swiglu", 0.0, None, None, None, None),
    Model("tiny-gemma", 48, 96, 2, 1, 64, 700, "geglu", 1.0, 50.0, 30.0, 16, 0.125),
]


# ----------------------------------------------------------------------------- timing


def _median_seconds(fn, arg_sets, calls, samples, warmup):
    for _ in range(warmup):
        jax.block_until_ready(fn(*arg_sets[0]))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for i in range(calls):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _kernel_seconds(fn, arg_sets, calls):
    """GPU time in the kernels of one call, from the profiler over `calls` calls; None off the GPU."""
    if jax.default_backend() != "gpu":
        return None
    jax.block_until_ready(fn(*arg_sets[0]))
    trace_dir = tempfile.mkdtemp(prefix="jft-kernels-")
    try:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for i in range(calls):
                out = fn(*arg_sets[i % len(arg_sets)])
            jax.block_until_ready(out)
        return sum(duration for _, duration, _ in kernel_events(trace_dir)) / 1e6 / calls
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)


def _input_copies(args, at_least=256 * 2**20, most=16):
    """args and copies of them, together at least `at_least` bytes: more than the GPU's L2 cache."""
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(args))
    count = min(most, max(2, -(-at_least // max(size, 1))))
    return [args] + [jax.tree.map(jnp.copy, args) for _ in range(count - 1)]


def _temp_bytes(fn, args):
    try:
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    except Exception:  # memory analysis is not available on every backend
        return None


def _forward_backward(op):
    """A jitted function running op's forward and its pullback for a fixed random cotangent.

    It returns the forward's output too, as a layer's is used downstream: otherwise XLA drops
    whatever of the forward the pullback does not need. A gradient the pullback gives for two
    inputs (rmsnorm+residual's d(x) is d(residual)) is returned once: returning one array twice
    makes XLA copy it, which the op itself never does.
    """

    def run(args, cotangent):
        out, pullback = jax.vjp(op, *args)
        return out, list({id(g): g for g in pullback(cotangent)}.values())

    return jax.jit(run)


def _cotangent(op, args):
    shapes = jax.eval_shape(op, *args)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return tree.unflatten([jax.random.normal(k, s.shape, jnp.float32).astype(s.dtype) for k, s in zip(keys, leaves)])


# ----------------------------------------------------------------------------- ceilings


def _ceiling_seconds(fn, args, opts):
    return _kernel_seconds(fn, [args], opts.calls) or _median_seconds(fn, [args], opts.calls, opts.samples, opts.warmup)


def measure_ceilings(small, opts):
    n = (1 << 16) if small else (1 << 29)  # bf16 elements: 1 GiB on the GPU
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda x: x + 1)
    copy_s = _ceiling_seconds(copy, (x,), opts)
    m = 256 if small else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    mm_s = _ceiling_seconds(matmul, (a, a), opts)
    return {"GB/s": 2 * n * 2 / copy_s / 1e9, "TFLOP/s": 2 * m**3 / mm_s / 1e12}


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    op: str
    impls: dict[str, Callable]  # name -> function of *args
    args: tuple
    unit: str  # "GB/s" or "TFLOP/s"
    work_fwd: float | None  # bytes or flops of the forward
    work_fwd_bwd: float | None  # None: forward only (e.g. dequantizing frozen weights)


def _normal(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def cases(model: Model, tokens: int) -> list[Case]:
    k = jax.random.split(jax.random.key(0), 8)
    n, d, f = tokens, model.hidden, model.ffn
    hq, hkv, hd = model.heads, model.kv_heads, model.head_dim
    el = 2  # bf16 bytes
    x, r, w = _normal(k[0], (n, d)), _normal(k[1], (n, d)), _normal(k[2], (d,))
    eps, off = 1e-6, model.norm_offset
    out = [
        Case("rmsnorm", {
            "xla": lambda x, w: rmsnorm_reference(x, w, eps, off),
            "pallas": lambda x, w: rmsnorm_pallas(x, w, eps, off),
        }, (x, w), "GB/s", 2 * n * d * el, 5 * n * d * el),
        Case("rmsnorm+residual", {
            "xla": lambda x, r, w: rmsnorm_residual_reference(x, r, w, eps, off),
            "pallas": lambda x, r, w: rmsnorm_residual_pallas(x, r, w, eps, off),
        }, (x, r, w), "GB/s", 4 * n * d * el, 8 * n * d * el),
    ]
    q, kk = _normal(k[3], (1, n, hq, hd)), _normal(k[4], (1, n, hkv, hd))
    positions = jnp.arange(n)[None]
    inv_freq = 1.0 / 500000.0 ** (jnp.arange(0, hd, 2) / hd)
    qk_bytes = 2 * n * (hq + hkv) * hd * el
    out.append(Case("rope", {
        "xla": lambda q, kk: rope_reference(q, kk, positions, inv_freq),
        "pallas": lambda q, kk: rope_pallas(q, kk, positions, inv_freq),
    }, (q, kk), "GB/s", qk_bytes, 2 * qk_bytes))
    g, u = _normal(k[5], (n, f)), _normal(k[6], (n, f))
    glu_ref, glu_pal = (swiglu_reference, swiglu_pallas) if model.glu == "swiglu" else (geglu_reference, geglu_pallas)
    out.append(Case(model.glu, {"xla": glu_ref, "pallas": glu_pal}, (g, u), "GB/s", 3 * n * f * el, 8 * n * f * el))

    # NF4 dequantize of one layer's gate weight [ffn, hidden] (frozen: forward only); bytes = packed
    # codes + uint8 absmax read, bf16 written
    gate = quantize_nf4(_normal(k[4], (f, d)))
    nf4_bytes = gate.nbytes + f * d * el
    out.append(Case("nf4 dequantize", {
        "xla": lambda q: nf4_dequantize_reference(q, jnp.bfloat16),
        "pallas": lambda q: nf4_dequantize_pallas(q, jnp.bfloat16),
    }, (gate,), "GB/s", nf4_bytes, None))
    # decoding: a stack of gate weights (more bytes than L2 holds) read one layer after another
    layers = 2 if model.name.startswith("tiny") else 8
    stack = quantize_nf4(_normal(k[5], (layers, f, d)))

    def over_layers(matmul):
        return lambda x, q: sum(matmul(x, q, layer).astype(jnp.float32) for layer in range(layers))

    for decoding in (1, 2):
        out.append(Case(f"nf4 matmul, {decoding} token{'s' * (decoding > 1)}, {layers} layers", {
            "xla": over_layers(nf4_matmul_reference),
            "pallas dequantize + matmul": over_layers(lambda x, q, i: x @ nf4_dequantize_pallas(q, x.dtype, layer=i).T),
            "pallas fused": over_layers(lambda x, q, i: nf4_matmul_pallas(x, q, layer=i)),
        }, (_normal(k[6], (decoding, d)), stack), "GB/s", stack.nbytes, None))

    v = model.vocab
    head = _normal(k[7], (v, d)) * 0.02
    labels = jax.random.randint(k[0], (n,), 0, v)
    ce_kw = dict(softcap=model.final_softcap)
    out.append(Case("linear+CE", {
        "xla-unfused": lambda h, wt: _unfused_cross_entropy(h, wt, labels, **ce_kw),
        "xla-chunked": lambda h, wt: linear_cross_entropy_reference(h, wt, labels, **ce_kw),
        "pallas": lambda h, wt: linear_cross_entropy_pallas(h, wt, labels, **ce_kw),
    }, (x, head), "TFLOP/s", 2 * n * d * v, 8 * n * d * v))
    frozen = jax.lax.stop_gradient  # the QLoRA case: no d(lm_head)
    out.append(Case("linear+CE frozen head", {
        "xla-unfused": lambda h, wt: _unfused_cross_entropy(h, frozen(wt), labels, **ce_kw),
        "xla-chunked": lambda h, wt: linear_cross_entropy_reference(h, frozen(wt), labels, **ce_kw),
        "pallas": lambda h, wt: linear_cross_entropy_pallas(h, frozen(wt), labels, **ce_kw),
    }, (x, head), "TFLOP/s", None, 6 * n * d * v))

    qa, ka, va = _normal(k[1], (1, n, hq, hd)), _normal(k[2], (1, n, hkv, hd)), _normal(k[3], (1, n, hkv, hd))
    causal_flops = 4 * n * n * hq * hd / 2
    attn_kw = dict(scale=model.attn_scale, softcap=model.attn_softcap)
    for window in [None] + ([model.window // 4] if model.window else []):
        impls = {
            "xla": lambda q, k_, v_, w_=window: attention_reference(q, k_, v_, positions, positions, window=w_, **attn_kw),
            "pallas": lambda q, k_, v_, w_=window: attention_pallas(q, k_, v_, positions, positions, window=w_, **attn_kw),
        }
        if model.attn_softcap is None and jax.default_backend() == "gpu":
            impls["cudnn"] = lambda q, k_, v_, w_=window: jax.nn.dot_product_attention(
                q, k_, v_, scale=model.attn_scale, is_causal=True, implementation="cudnn",
                local_window_size=None if w_ is None else (w_ - 1, 0),
            )
        name = "attention" + ("" if window is None else f" window={window}")
        out.append(Case(name, impls, (qa, ka, va), "TFLOP/s", causal_flops, 3.5 * causal_flops))
    # packed rows: documents of random lengths, then padding (the layout bench/train.py --documents makes)
    pos, seg = (jnp.asarray(a)[None] for a in packed_layout(n, max(2, n // 400)))
    lengths = jnp.bincount(seg[0], length=int(seg.max()) + 1)[1:]
    packed_flops = float(jnp.sum(lengths.astype(jnp.float32) ** 2)) * 4 * hq * hd / 2
    out.append(Case("attention packed", {
        "xla": lambda q, k_, v_: attention_reference(q, k_, v_, pos, pos, seg, seg, **attn_kw),
        "pallas": lambda q, k_, v_: attention_pallas(q, k_, v_, pos, pos, seg, seg, **attn_kw),
    }, (qa, ka, va), "TFLOP/s", packed_flops, 3.5 * packed_flops))
    return out


def _unfused_cross_entropy(hidden, weight, labels, softcap=None):
    logits = jnp.dot(hidden, weight.T, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return lse - label_logit, lse


# ----------------------------------------------------------------------------- report


def run_case(case: Case, ceilings, opts):
    rows = []
    for impl, op in case.impls.items():
        for phase, work in (("fwd", case.work_fwd), ("fwd+bwd", case.work_fwd_bwd)):
            if work is None:
                continue
            try:
                if phase == "fwd":
                    fn, args = jax.jit(op), case.args
                else:
                    fn, args = _forward_backward(op), (case.args, _cotangent(op, case.args))
                arg_sets = _input_copies(args)
                seconds = _median_seconds(fn, arg_sets, opts.calls, opts.samples, opts.warmup)
                kernel_seconds = _kernel_seconds(fn, arg_sets, opts.calls * opts.samples)
                temp = _temp_bytes(fn, args)
                rate = work / (kernel_seconds or seconds) / (1e9 if case.unit == "GB/s" else 1e12)
                rows.append((case.op, impl, phase, f"{seconds * 1e3:9.3f}",
                             "-" if kernel_seconds is None else f"{kernel_seconds * 1e3:9.3f}",
                             f"{rate:9.4g} {case.unit}",
                             f"{100 * rate / ceilings[case.unit]:5.1f}%",
                             "-" if temp is None else f"{temp / 2**20:9.1f}"))
            except Exception as e:  # keep the rest of the table when one implementation fails
                message = f"{type(e).__name__}: {e}".splitlines()[0][:90]
                rows.append((case.op, impl, phase, "FAILED", "", message, "", ""))
    return rows


def print_table(title, rows):
    header = ("op", "impl", "pass", "ms", "kernel ms", "achieved", "of ceiling", "temp MiB")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"\n## {title}\n")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per op (default 4096; 64 with --small)")
    parser.add_argument("--ops", default="", help="comma-separated op name prefixes to run (default: all)")
    parser.add_argument("--calls", type=int, default=None, help="back-to-back calls per sample")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    opts = parser.parse_args(argv)
    opts.calls = opts.calls or (2 if opts.small else 20)
    opts.samples = opts.samples or (3 if opts.small else 15)
    tokens = opts.tokens or (64 if opts.small else 4096)
    models = SMALL if opts.small else [LLAMA3_8B, GEMMA2_9B]
    wanted = [s for s in opts.ops.split(",") if s]

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    ceilings = measure_ceilings(opts.small, opts)
    print(f"ceilings: copy {ceilings['GB/s']:.1f} GB/s, bf16 matmul {ceilings['TFLOP/s']:.1f} TFLOP/s")
    for model in models:
        rows = []
        for case in cases(model, tokens):
            if wanted and not any(case.op.startswith(w) for w in wanted):
                continue
            rows.extend(run_case(case, ceilings, opts))
        print_table(f"{model.name}, {tokens} tokens, bf16", rows)


if __name__ == "__main__":
    main()
