"""Where a training step's time and memory go: the same step as bench/train.py, traced.

Runs a few steps under `jax.profiler`, then sums the GPU kernel time of the traced steps by kind
(matmuls, attention, Pallas kernels, XLA fusions, copies), lists the costliest kernels, and sums
them by the jft source line of the HLO op behind each one, next to the step's wall time. Also
prints XLA's memory analysis of the compiled step. On the GPU:

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/profile.py --quant nf4 --remat full

XLA's command buffers launch many ops as one; `XLA_FLAGS=--xla_gpu_enable_command_buffer=` turns
them off so that each kernel keeps its op's source line.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

from train import batch_source, parse, setup

KINDS = [  # (kind, pattern on the kernel name), first match wins
    ("attention (cuDNN)", r"cudnn|fmha|sdpa|flash_fprop|flash_bprop"),
    ("attention (Pallas)", r"flash_attention"),
    ("NF4 dequantize (Pallas)", r"nf4"),
    ("cross-entropy (Pallas)", r"cross_entropy|linear_ce"),
    ("other Pallas", r"rmsnorm|rope|glu"),
    ("matmul (XLA Triton GEMM)", r"triton_gemm|gemm_fusion"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|matmul|dot|sm90_|sm100_|cublas"),
    ("host transfer", r"d2h|h2d|dtoh|htod|devicetohost|hosttodevice"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("XLA fusion", r"fusion|reduce|loop_|input_|convert|broadcast|concatenate|select|scatter|gather|dynamic"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def kernel_events(trace_dir: str):
    """(name, duration us) of every GPU kernel/copy in the perfetto trace written under trace_dir."""
    paths = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not paths:
        raise SystemExit(f"no trace written under {trace_dir}")
    with gzip.open(paths[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    threads = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    if not gpu_pids:
        names = {str(e.get("args", {}).get("name")) for e in events if e.get("ph") == "M"}
        print(f"no GPU process in the trace; processes and threads: {sorted(names)[:40]}")
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            thread = threads.get((e["pid"], e.get("tid")), "")
            if "stream" in thread.lower() or "kernel" in thread.lower():  # not the per-op / per-module summary lines
                yield e["name"], float(e.get("dur", 0.0)), e.get("args", {})


def hlo_sources(hlo_text: str) -> dict:
    """{HLO instruction name: "file:line function < caller < its caller (op)"} from the compiled
    module's stack-frame tables (JAX keeps only user frames)."""
    tables, section = collections.defaultdict(dict), None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif section and (m := re.match(r"^(\d+) (.*)$", line)):
            tables[section][int(m.group(1))] = m.group(2)
        else:
            section = None
    field = lambda text, key: int(re.search(key + r"=(\d+)", text).group(1))

    def where(frame_id: int) -> str:
        location = tables["FileLocations"][field(tables["StackFrames"][frame_id], "file_location_id")]
        path = tables["FileNames"][field(location, "file_name_id")].strip('"')
        function = tables["FunctionNames"][field(location, "function_name_id")].strip('"').split(".")[-1]
        return f"{path.split('/jft/')[-1].split('/bench/')[-1]}:{field(location, 'line')} {function}"

    sources = {}
    for line in hlo_text.splitlines():
        m = re.match(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)".*?stack_frame_id=(\d+)', line)
        if m and tables["StackFrames"]:
            name, op_name, frame = m.group(1), m.group(2), int(m.group(3))
            chain = [frame]
            while len(chain) < 3:  # the frame, its caller and theirs; a parent id is printed one above the frame's
                parent = field(tables["StackFrames"][chain[-1]], "parent_frame_id") - 1
                if parent not in tables["StackFrames"]:
                    break
                chain.append(parent)
            sources[name] = f"{' < '.join(map(where, chain))} ({op_name.split('/')[-1]})"
    return sources


def main(argv=None):
    import jax

    args = parse(argv)
    args.quant = args.quant or ["nf4"]
    on_gpu = jax.default_backend() == "gpu"
    args.attn = args.attn or ("cudnn" if on_gpu else "xla")
    config, step, params, lora, opt_state, batch = setup(args)
    inputs = batch_source(args, config, params, batch)
    upcoming = inputs()
    compiled = step.lower(params, lora, opt_state, upcoming).compile()
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = lambda n: f"{n / 2**30:.2f} GiB"
        print(f"XLA memory analysis: arguments {gib(memory.argument_size_in_bytes)}, outputs "
              f"{gib(memory.output_size_in_bytes)} (aliased {gib(memory.alias_size_in_bytes)}), temporaries "
              f"{gib(memory.temp_size_in_bytes)}, host temporaries {gib(getattr(memory, 'host_temp_size_in_bytes', 0))}")

    def run_steps(count):
        nonlocal lora, opt_state, upcoming
        for _ in range(count):
            lora, opt_state, metrics = compiled(params, lora, opt_state, upcoming)
            upcoming = inputs()
        float(metrics["loss"])

    run_steps(args.warmup + 1)
    trace_dir = tempfile.mkdtemp(prefix="jft-profile-")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run_steps(args.steps)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())

    by_kind, by_name, by_family = collections.Counter(), collections.Counter(), collections.Counter()
    sources, by_source, unplaced = hlo_sources(compiled.as_text()), collections.Counter(), set()
    for name, dur, event_args in kernel_events(trace_dir):
        by_kind[kind_of(name)] += dur / 1e3 / args.steps
        by_name[name] += dur / 1e3 / args.steps
        by_family[re.sub(r"[._]?\d+$", "", name)] += dur / 1e3 / args.steps
        op = str(event_args.get("hlo_op", name))
        source = sources.get(op)
        if source is None:
            unplaced.add(op)
        by_source[(kind_of(name), source or "(no source line)")] += dur / 1e3 / args.steps
    busy = sum(by_kind.values())
    computing = busy - by_kind["host transfer"]  # transfers run on their own streams, beside the kernels
    print(f"{args.quant[0]} remat={args.remat} attn={args.attn} batch {args.batch} x {args.seq}: "
          f"{wall_ms:.1f} ms per step under the profiler; GPU kernels {computing:.1f} ms, host transfers "
          f"{by_kind['host transfer']:.1f} ms; peak {peak / 2**30:.2f} GiB")
    print(f"{'kind':<26} {'ms/step':>8} {'share':>6}")
    for kind, ms in by_kind.most_common():
        print(f"{kind:<26} {ms:>8.1f} {ms / max(busy, 1e-9):>6.1%}")
    print(f"{'kernels idle (wall - kernels)':<26} {max(wall_ms - computing, 0):>8.1f}")
    print("\ncostliest kernels (ms/step):")
    for name, ms in by_name.most_common(25):
        print(f"{ms:>8.2f}  {kind_of(name):<24} {name[:110]}")
    print("\nkernel families (numbered XLA kernels summed, ms/step):")
    for name, ms in by_family.most_common(25):
        print(f"{ms:>8.2f}  {name[:120]}")
    print("\nby the jft source line that made each kernel's HLO op (ms/step):")
    for (kind, source), ms in by_source.most_common(40):
        print(f"{ms:>8.2f}  {kind:<24} {source}")
    if unplaced:
        print(f"({len(unplaced)} ops without a source line, e.g. {sorted(unplaced)[:5]})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
