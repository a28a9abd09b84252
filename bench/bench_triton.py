"""GPU benchmark: the generated Triton modules vs PyTorch eager vs torch.compile, side by side.

A benchmark, not a test. For each case it times forward, backward and forward+backward of

- ``symgrad``: ``generated.triton.<op>.apply`` (the autograd Function over the custom ops);
- ``eager``: the PyTorch one-liner of ``tests/torch_reference.py`` with autograd;
- ``compile``: the same one-liner under ``torch.compile``;

with ``triton.testing.do_bench`` (median, p20 and p80 in ms), and reports the achieved bandwidth
(the bytes a minimal kernel must move / median time) as a fraction of the device's peak, TFLOP/s
for the contractions, and the peak memory of one forward+backward (``torch.cuda.max_memory_allocated``
above what was allocated before). Results go to ``bench/results/<device>-<date>.json`` (device
name, library versions, date) with a plot beside it.

    python bench/bench_triton.py                       # all cases (a GPU)
    python bench/bench_triton.py --ops layer_norm,gelu --dtypes bfloat16
    python bench/bench_triton.py --smoke               # tiny sizes on CPU under the interpreter

``--smoke`` runs every case at tiny sizes on CPU with ``TRITON_INTERPRET=1`` and times with
``time.perf_counter`` (interpreter timings mean nothing; the run checks the script end to end).

Minimal bytes: forward reads every input and writes every output; backward reads the inputs and
cotangents and writes the gradients; forward+backward reads the inputs and cotangents once and
writes outputs and gradients once (a fused loss reads the logits once and writes their gradient
once). Peaks: the device table below (HBM bandwidth, dense bf16 TFLOP/s), else a measured copy.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the generated modules) import

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(ROOT))
import symgrad.ops  # noqa: E402,F401
from symgrad.declare import REGISTRY, Role  # noqa: E402

# name, sizes at full scale, sizes for --smoke, dtypes
CASES = [
    ("softmax_cross_entropy", {"B": 8192, "C": 32000}, {"B": 4, "C": 41}, ("bfloat16", "float32")),
    ("softmax_cross_entropy", {"B": 4096, "C": 128256}, {"B": 3, "C": 67}, ("bfloat16", "float32")),
    ("layer_norm", {"B": 4096, "D": 16384}, {"B": 4, "D": 41}, ("bfloat16", "float32")),
    ("rms_norm", {"B": 4096, "D": 16384}, {"B": 4, "D": 41}, ("bfloat16", "float32")),
    ("gelu", {"B": 8192, "C": 8192}, {"B": 8, "C": 33}, ("bfloat16", "float32")),  # 2^26 elements
    ("swiglu", {"B": 8192, "C": 8192}, {"B": 8, "C": 33}, ("bfloat16", "float32")),
    ("linear", {"B": 4096, "K": 4096, "N": 4096}, {"B": 17, "K": 16, "N": 19}, ("bfloat16", "float32")),
    ("conv2d", {"N": 32, "Cin": 64, "Cout": 128, "H": 56, "W": 56, "R": 3, "S": 3, "stride": 1, "pad": 1},
     {"N": 1, "Cin": 2, "Cout": 3, "H": 6, "W": 5, "R": 3, "S": 3, "stride": 1, "pad": 1}, ("bfloat16", "float32")),
]

# Device peaks: HBM bandwidth (bytes/s) and dense bf16 tensor-core FLOP/s.
PEAKS = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100 80GB PCIe": (1.935e12, 312e12),
    "A100": (1.555e12, 312e12),
    "L40S": (0.864e12, 362e12),
    "L4": (0.3e12, 121e12),
    "A10G": (0.6e12, 125e12),
    "RTX 4090": (1.008e12, 165e12),
}


def reference(name):
    return importlib.import_module("tests.torch_reference").REFERENCES[name]


def make_inputs(op, sizes, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for t in op.inputs:
        shape = tuple(int(sizes[d.name]) for d in t.dims)
        if t.role is Role.LABEL:
            n_cls = int(sizes[op.facts[0].dim.name])
            out.append(torch.randint(0, n_cls, shape, generator=g).to(device))
        else:
            lo, hi = t.domain
            x = (lo + (hi - lo) * torch.rand(shape, generator=g)).to(device=device, dtype=dtype)
            out.append(x.requires_grad_(t.role is Role.DIFF))
    return out


def params_for(op, sizes):
    params = {p.name: p.default for p in op.params}
    params.update({k: v for k, v in sizes.items() if k in params})
    return params


def timer_after(setup, fn, smoke: bool, reps: int = 25):
    """(median, p20, p80) in ms of ``fn(setup())``, timing ``fn`` alone (CUDA events on a GPU)."""
    ts = []
    for _ in range(3 if smoke else reps):
        arg = setup()
        if smoke:
            t = time.perf_counter()
            fn(arg)
            ts.append((time.perf_counter() - t) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn(arg)
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end))
    ts.sort()
    q = statistics.quantiles(ts, n=5)
    return (statistics.median(ts), q[0], q[3])


def timer(fn, smoke: bool, reps: int = 3):
    """(median, p20, p80) in ms."""
    if not smoke:
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    q = statistics.quantiles(ts, n=5) if len(ts) > 1 else ts * 4
    return (statistics.median(ts), q[0], q[3])


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def flops(name, sizes) -> dict:
    if name == "linear":
        f = 2 * sizes["B"] * sizes["K"] * sizes["N"]
        return {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}
    if name == "conv2d":
        ho = (sizes["H"] + 2 * sizes["pad"] - sizes["R"]) // sizes["stride"] + 1
        wo = (sizes["W"] + 2 * sizes["pad"] - sizes["S"]) // sizes["stride"] + 1
        f = 2 * sizes["N"] * sizes["Cout"] * ho * wo * sizes["Cin"] * sizes["R"] * sizes["S"]
        return {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}
    return {}


def peaks(device: str, smoke: bool):
    if smoke:
        return None, None, "cpu interpreter: no peak"
    name = torch.cuda.get_device_name()
    for key, (bw, fl) in PEAKS.items():
        if key in name:
            return bw, fl, f"table: {key}"
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3), None, "measured copy bandwidth (device not in the table)"


def peak_memory(fn, smoke: bool):
    if smoke:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def bench_case(name, sizes, dtype_name, device, smoke, impls):
    op = REGISTRY.get(name)
    dtype = getattr(torch, dtype_name)
    mod = importlib.import_module(f"generated.triton.{name}")
    params = params_for(op, sizes)
    inputs = make_inputs(op, sizes, dtype, device)
    diff = [t for t, s in zip(inputs, op.inputs) if s.role is Role.DIFF]
    ref = reference(name)

    def eager(*xs):
        return ref(*xs, **params)

    fns = {"symgrad": lambda *xs: mod.apply(*xs, **params), "eager": eager}
    if "compile" in impls:
        torch._dynamo.reset()
        fns["compile"] = torch.compile(eager)
    out0 = eager(*inputs)
    cot = torch.randn_like(out0) if out0.dim() else torch.ones_like(out0)
    result = {"op": name, "sizes": sizes, "dtype": dtype_name, "impls": {}}
    minimal = {
        "fwd": nbytes(inputs) + nbytes([out0]),
        "bwd": nbytes(inputs) + nbytes([cot]) + nbytes(diff),
        "fwd+bwd": nbytes(inputs) + nbytes([cot]) + nbytes([out0]) + nbytes(diff),
    }
    result["minimal_bytes"] = minimal
    fl = flops(name, sizes)
    for impl, f in fns.items():
        if impl not in impls:
            continue
        try:
            out = f(*inputs)
            res = {}
            res["fwd"] = timer(lambda: f(*inputs), smoke)
            res["fwd+bwd"] = timer(lambda: torch.autograd.grad(f(*inputs), diff, cot), smoke)
            if impl == "compile" or (impl == "symgrad" and getattr(mod, "BACKWARD_ONCE", False)):
                # backward hands out the gradient buffer forward wrote, once per forward (no
                # retain_graph; torch.compile's backward donates its saved buffers the same way):
                # each timed backward follows a fresh, untimed forward
                res["bwd"] = timer_after(lambda: f(*inputs), lambda o: torch.autograd.grad(o, diff, cot), smoke)
            else:
                res["bwd"] = timer(lambda: torch.autograd.grad(out, diff, cot, retain_graph=True), smoke)
            entry = {k: {"median_ms": v[0], "p20_ms": v[1], "p80_ms": v[2]} for k, v in res.items()}
            for k, v in res.items():
                entry[k]["gbps"] = minimal[k] / (v[0] * 1e-3) / 1e9
                if k in fl:
                    entry[k]["tflops"] = fl[k] / (v[0] * 1e-3) / 1e12
            entry["peak_memory_bytes"] = peak_memory(lambda: torch.autograd.grad(f(*inputs), diff, cot), smoke)
            # Agreement with eager (a benchmark of wrong code is worthless).
            g_ref = torch.autograd.grad(eager(*inputs), diff, cot)
            g = torch.autograd.grad(f(*inputs), diff, cot)
            entry["max_abs_grad_diff_vs_eager"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(g, g_ref))
            result["impls"][impl] = entry
        except Exception as e:  # report and go on: one failing implementation must not end the run
            result["impls"][impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return result


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    try:
        import subprocess

        out["symgrad_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return out


def plot(results, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = [r for r in results if r["impls"]]
    impls = ["symgrad", "eager", "compile"]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cases)), 4.5))
    width = 0.27
    for n, impl in enumerate(impls):
        xs, ys = [], []
        for c, r in enumerate(cases):
            e = r["impls"].get(impl, {})
            if "fwd+bwd" in e:
                xs.append(c + (n - 1) * width)
                ys.append(e["fwd+bwd"]["median_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{r['op']}\n{'x'.join(str(v) for v in r['sizes'].values())}\n{r['dtype']}" for r in cases], fontsize=7)
    ax.set_ylabel("fwd+bwd median (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("symgrad Triton vs PyTorch eager vs torch.compile")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1, perf_counter timing")
    ap.add_argument("--ops", default="", help="comma-separated op names (default: every case)")
    ap.add_argument("--dtypes", default="", help="comma-separated dtypes (default: each case's)")
    ap.add_argument("--impls", default="symgrad,eager,compile", help="which implementations to time")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("bench_triton: no CUDA device; use --smoke for a CPU interpreter run", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    ops = set(filter(None, args.ops.split(",")))
    dtypes = set(filter(None, args.dtypes.split(",")))
    impls = set(filter(None, args.impls.split(",")))
    bw, fl, peak_src = peaks(device, smoke)
    results = []
    for name, full, tiny, case_dtypes in CASES:
        if ops and name not in ops:
            continue
        for dt in case_dtypes:
            if dtypes and dt not in dtypes:
                continue
            if smoke and dt != "float32" and not dtypes:
                continue  # one dtype is enough to check the script
            sizes = tiny if smoke else full
            t = time.perf_counter()
            r = bench_case(name, sizes, dt, device, smoke, impls)
            for e in r["impls"].values():
                for k in ("fwd", "bwd", "fwd+bwd"):
                    if k in e and bw:
                        e[k]["bandwidth_fraction_of_peak"] = e[k]["gbps"] * 1e9 / bw
                    if k in e and fl and "tflops" in e[k]:
                        e[k]["tflops_fraction_of_peak"] = e[k]["tflops"] * 1e12 / fl
            results.append(r)
            line = "  ".join(
                f"{impl}: " + (f"{e['fwd+bwd']['median_ms']:.3f} ms" if "fwd+bwd" in e else e.get("error", "?"))
                for impl, e in r["impls"].items()
            )
            print(f"{name} {'x'.join(map(str, sizes.values()))} {dt}: fwd+bwd {line}  ({time.perf_counter() - t:.1f}s)", flush=True)
    device_name = "cpu-interpreter" if smoke else torch.cuda.get_device_name()
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    doc = {
        "device": device_name,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
        "smoke": smoke,
        "timing": "time.perf_counter, median of 3 (interpreter)" if smoke else "triton.testing.do_bench, quantiles 0.5/0.2/0.8",
        "peak_bandwidth_bytes_per_s": bw,
        "peak_flops": fl,
        "peak_source": peak_src,
        "results": results,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{device_name.replace(' ', '_').replace('/', '_')}-{date}"
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    if not args.no_plot:
        p = plot(results, out_dir / f"{stem}.png")
        if p:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
