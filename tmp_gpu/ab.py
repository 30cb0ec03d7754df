import sys, json
sys.path[0] = "/".join(__file__.split("/")[:-2]) or "."
sys.path.insert(1, sys.path[0] + "/bench")
import jax
import jft, jft.nn.transformer as T
mode = sys.argv[1]
SEEN = set()
if "norm" in mode:
    T.rms_norm = lambda x, w, eps, offset=0.0: jft.kernels.rmsnorm(x, w, eps, offset)
if "saveattn" in mode:
    orig = T._remat
    def patched(fn, policy):
        if policy != "full":
            return orig(fn, policy)
        def pol(prim, *a, **k):
            if "attention" in prim.name:
                SEEN.add(prim.name)
            return prim.name.startswith("dot_product_attention_fwd")
        return jax.checkpoint(fn, policy=pol, prevent_cse=False)
    T._remat = patched
import train as bt
args = bt.parse(["--quant", "nf4", "--remat", "full", "--embedding", sys.argv[2] if len(sys.argv) > 2 else "host", "--steps", "6", "--warmup", "2", "--one", "--attn", "cudnn"])
args.quant = ["nf4"]
r = bt.run_one(args)
print("SEEN", SEEN)
print("ROW", mode, json.dumps({k: r[k] for k in ("tokens_per_s", "peak_gib", "compiled_gib", "loss")}), flush=True)
