"""CPU benchmark: generated NumPy forward+backward vs a hand-written NumPy baseline vs PyTorch eager.

A benchmark, not a test. For each op it times, in one run and on the same inputs (float32):

- ``generated``: ``generated.numpy.<op>``: ``forward_with_saved`` then ``backward``;
- ``baseline``: the same op written by hand in vectorized NumPy, the way an engineer writes it
  (cross-entropy via log-sum-exp forward and ``p - onehot`` backward; layer norm saving ``xhat``
  and ``rstd``; linear with ``@``);
- ``torch``: PyTorch CPU eager with autograd (``torch.nn.functional``).

Each number is the median of ``--repeats`` runs after one warm-up round (fwd, bwd and fwd+bwd timed
separately); the implementations run round-robin within each repeat, so background load falls on
all of them alike. The ratio generated/baseline on fwd+bwd is reported (target <= 1.3x). It also
times generating the whole NumPy library, cold and warm, when the generator exists.

    python bench/bench_numpy.py [--repeats 5] [--ops softmax_cross_entropy,layer_norm,linear]
                                [--threads N] [--small] [--out bench/results/numpy-cpu.json]

Sizes: softmax_cross_entropy 4096x32000, layer_norm 4096x4096, linear 4096x1024 @ 1024x1024.
A 4096x32000 float32 array is 0.5 GB; the cross-entropy case peaks around 3 GB.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DTYPE = np.float32
# glibc serves every array over 32 MB with a fresh mmap and returns it with munmap, so each 0.5 GB
# temporary is page-faulted in again; on a VM whose host reclaims freed guest memory that first
# touch costs up to ~1.3 s for 0.5 GB (vs ~50 ms to compute exp over it) and varies run to run.
# A long-running training process reuses its heap; so does this benchmark by default: large blocks
# come from the brk heap and are never trimmed. --system-malloc measures the default behaviour.
WARM_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 46), "MALLOC_TOP_PAD_": str(1 << 20)}

# --------------------------------------------------------------------------- hand-written baselines


def ce_forward(x, y, ignore_index=-100):
    """Mean cross-entropy of softmax(x) against integer labels; saves the row log-sum-exp."""
    m = x.max(axis=1, keepdims=True)
    z = x - m
    np.exp(z, out=z)
    lse = np.log(z.sum(axis=1, keepdims=True)) + m
    valid = y != ignore_index
    n = max(int(valid.sum()), 1)
    rows = np.arange(x.shape[0])
    yc = np.where(valid, y, 0)
    loss = ((lse[:, 0] - x[rows, yc]) * valid).sum() / n
    return loss, (x, yc, valid, n, lse)


def ce_backward(saved, dloss):
    """dL/dx = (softmax(x) - onehot(y)) * dloss / n on counted rows."""
    x, yc, valid, n, lse = saved
    p = x - lse
    np.exp(p, out=p)
    p[np.arange(x.shape[0]), yc] -= 1.0
    p *= (dloss / n) * valid[:, None].astype(x.dtype)
    return p, None


def ln_forward(x, w, b, eps=1e-5):
    mean = x.mean(axis=1, keepdims=True)
    xc = x - mean
    var = np.mean(xc * xc, axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc
    xhat *= rstd
    return xhat * w + b, (xhat, rstd, w)


def ln_backward(saved, dy):
    xhat, rstd, w = saved
    dw = (dy * xhat).sum(axis=0)
    db = dy.sum(axis=0)
    g = dy * w
    c1 = g.mean(axis=1, keepdims=True)
    c2 = (g * xhat).mean(axis=1, keepdims=True)
    dx = g - c1
    dx -= xhat * c2
    dx *= rstd
    return dx, dw, db


def linear_forward(X, W, b):  # W[N, K], as F.linear
    return X @ W.T + b, (X, W)


def linear_backward(saved, dY):
    X, W = saved
    return dY @ W, dY.T @ X, dY.sum(axis=0)


# --------------------------------------------------------------------------- torch (eager autograd)


def torch_fns(op, arrays):
    import torch
    import torch.nn.functional as F

    if op == "softmax_cross_entropy":
        x = torch.from_numpy(arrays["x"]).requires_grad_(True)
        y = torch.from_numpy(arrays["y"])
        leaves, fwd, cot = [x], (lambda: F.cross_entropy(x, y)), None
    elif op == "layer_norm":
        x, w, b = (torch.from_numpy(arrays[k]).requires_grad_(True) for k in ("x", "w", "bias"))
        leaves, fwd = [x, w, b], (lambda: F.layer_norm(x, (x.shape[1],), w, b, 1e-5))
        cot = torch.from_numpy(arrays["dy"])
    elif op == "linear":
        X = torch.from_numpy(arrays["X"]).requires_grad_(True)
        Wt = torch.from_numpy(arrays["W"]).requires_grad_(True)  # nn.Linear layout [N, K], as symgrad's linear
        b = torch.from_numpy(arrays["bias"]).requires_grad_(True)
        leaves, fwd, cot = [X, Wt, b], (lambda: F.linear(X, Wt, b)), torch.from_numpy(arrays["dY"])
    else:
        raise KeyError(op)

    def bwd(out):
        return torch.autograd.grad(out, leaves, grad_outputs=cot, retain_graph=True)

    def both():
        out = fwd()
        return out, torch.autograd.grad(out, leaves, grad_outputs=cot)

    return fwd, bwd, both


# --------------------------------------------------------------------------- cases


def make_case(op, small=False, seed=0):
    rng = np.random.default_rng(seed)

    def randn(*shape):
        return rng.standard_normal(shape, dtype=DTYPE)

    if op == "softmax_cross_entropy":
        B, C = (256, 1000) if small else (4096, 32000)
        a = {"x": randn(B, C) * 2, "y": rng.integers(0, C, B).astype(np.int64)}
        return f"{B}x{C}", a, ("x", "y"), None, (ce_forward, ce_backward)
    if op == "layer_norm":
        B, D = (256, 512) if small else (4096, 4096)
        a = {"x": randn(B, D), "w": 1 + 0.1 * randn(D), "bias": 0.1 * randn(D), "dy": randn(B, D)}
        return f"{B}x{D}", a, ("x", "w", "bias"), "dy", (ln_forward, ln_backward)
    if op == "linear":
        B, K, N = (256, 128, 64) if small else (4096, 1024, 1024)
        a = {"X": randn(B, K), "W": randn(N, K) / float(np.sqrt(K)), "bias": randn(N), "dY": randn(B, N)}
        return f"{B}x{K}x{N}", a, ("X", "W", "bias"), "dY", (linear_forward, linear_backward)
    raise KeyError(op)


def _time_once(fn, setup=None):
    arg = setup() if setup else None
    gc.collect()
    t0 = time.perf_counter()
    r = fn(arg)
    dt = time.perf_counter() - t0
    del r, arg
    return dt


def _stats(times):
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "times_ms": [round(1e3 * t, 3) for t in times]}


def _maxrel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _numpy_case(fwd, bwd, inputs, cot):
    return {
        "fwd": (lambda _: fwd(*inputs), None),
        "bwd": (lambda s: bwd(s[1], cot), lambda: fwd(*inputs)),
        "fwd_bwd": (lambda _: bwd(fwd(*inputs)[1], cot), None),
    }


def bench_op(op, repeats, small):
    """Time every implementation of one op, round-robin: each repeat runs each implementation once
    in turn, so load from other processes on the box lands on all of them alike."""
    shape, arrays, names, cot_name, (bfwd, bbwd) = make_case(op, small)
    inputs = [arrays[n] for n in names]
    cot = arrays[cot_name] if cot_name else DTYPE(1.0)
    res = {"op": op, "shape": shape, "dtype": "float32", "impls": {}}

    cases = {}
    try:
        mod = importlib.import_module(f"generated.numpy.{op}")
        cases["generated"] = _numpy_case(mod.forward_with_saved, mod.backward, inputs, cot)
        res["generated_module_sha256"] = hashlib.sha256(Path(mod.__file__).read_bytes()).hexdigest()[:16]
        # agreement: generated vs baseline (so the timings compare the same computation)
        g_out, g_saved = mod.forward_with_saved(*inputs)
        g_grads = mod.backward(g_saved, cot)
        b_out, b_saved = bfwd(*inputs)
        b_grads = bbwd(b_saved, cot)
        res["max_rel_diff_generated_vs_baseline"] = {
            "out": _maxrel(g_out, b_out),
            **{f"d{n}": _maxrel(g, b) for n, g, b in zip(names, g_grads, b_grads) if g is not None and b is not None},
        }
        del g_out, g_saved, g_grads, b_out, b_saved, b_grads
    except ImportError as e:
        res["generated_error"] = f"{type(e).__name__}: {e}"
        print(f"  [{op}] generated module not importable: {e}", flush=True)
    cases["baseline"] = _numpy_case(bfwd, bbwd, inputs, cot)
    try:
        tfwd, tbwd, tboth = torch_fns(op, arrays)
        cases["torch"] = {"fwd": (lambda _: tfwd(), None), "bwd": (lambda out: tbwd(out), tfwd), "fwd_bwd": (lambda _: tboth(), None)}
    except ImportError:
        pass

    times = {name: {k: [] for k in case} for name, case in cases.items()}
    for rep in range(repeats + 1):  # round 0 is the warm-up
        for name, case in cases.items():
            for k, (fn, setup) in case.items():
                dt = _time_once(fn, setup)
                if rep:
                    times[name][k].append(dt)
    for name, t in times.items():
        r = res["impls"][name] = {k: _stats(v) for k, v in t.items()}
        print(f"  [{op}] {name:9s} fwd {r['fwd']['median_ms']:9.1f} ms  bwd {r['bwd']['median_ms']:9.1f} ms  fwd+bwd {r['fwd_bwd']['median_ms']:9.1f} ms", flush=True)
    base = res["impls"]["baseline"]["fwd_bwd"]["median_ms"]
    for name, r in res["impls"].items():
        r["ratio_vs_baseline"] = r["fwd_bwd"]["median_ms"] / base
    del arrays, inputs, cases
    gc.collect()
    return res


# --------------------------------------------------------------------------- generation time


def _generate_command(out_dir: Path):
    """The command that writes the whole NumPy library into ``out_dir``, or None if no generator."""
    spec = importlib.util.find_spec("symgrad.generate")
    if spec is None:
        return None
    help_text = subprocess.run([sys.executable, "-m", "symgrad.generate", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    cmd = [sys.executable, "-m", "symgrad.generate", "--target", "numpy"]
    for flag in ("--out", "--output", "--out-dir", "--dest"):
        if flag in help_text:
            return cmd + [flag, str(out_dir)]
    return None


def bench_generation(repeat_warm=1):
    with tempfile.TemporaryDirectory(prefix="symgrad-gen-") as tmp:
        out = Path(tmp) / "generated"
        cmd = _generate_command(out)
        if cmd is None:
            return {"skipped": "no generator found (symgrad.generate with an output-directory flag)"}
        env = dict(os.environ)
        # "cold": no caches of any kind the generator might keep next to its output
        for cache in ROOT.glob("**/.symgrad-cache"):
            shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        cold = time.perf_counter() - t0
        if p.returncode != 0:
            return {"error": f"exit {p.returncode}: {p.stderr.strip()[-400:]}", "command": " ".join(cmd[1:])}
        files = sorted(out.rglob("*.py"))
        warm = []
        for _ in range(repeat_warm):
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            warm.append(time.perf_counter() - t0)
        return {
            "command": "python " + " ".join(cmd[1:]).replace(str(out), "<tmp>"),
            "files": len(files),
            "cold_s": round(cold, 3),
            "warm_s": round(min(warm), 3),
            "output_tail": (p.stdout + p.stderr).strip()[-300:],
        }


# --------------------------------------------------------------------------- machine info, report


def set_threads(n: int) -> None:
    """Pin NumPy's BLAS and torch to ``n`` threads (threadpoolctl if present, else the env vars,
    which only work before numpy is imported: re-exec the script with them set)."""
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(n)
    except ImportError:
        if os.environ.get("OPENBLAS_NUM_THREADS") != str(n):
            env = dict(os.environ, OPENBLAS_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def machine_info():
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]  # other work on the box skews timings
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {"numpy": np.__version__}
    for mod in ("torch", "sympy", "symgrad"):
        try:
            m = importlib.import_module(mod)
            versions[mod] = getattr(m, "__version__", None) or importlib.metadata.version(mod)
        except Exception:  # noqa: BLE001
            versions[mod] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import threadpoolctl

        info["blas_threads"] = [p.get("num_threads") for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        info["numpy_blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("name")
    except Exception:  # noqa: BLE001
        pass
    return info, versions


def markdown(results, gen):
    lines = [
        "| op | shape (float32) | impl | fwd ms | bwd ms | fwd+bwd ms | vs baseline |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for name, t in r["impls"].items():
            lines.append(
                f"| {r['op']} | {r['shape']} | {name} | {t['fwd']['median_ms']:.1f} | {t['bwd']['median_ms']:.1f} | "
                f"{t['fwd_bwd']['median_ms']:.1f} | {t['ratio_vs_baseline']:.2f}x |"
            )
    text = "\n".join(lines)
    if gen:
        if "cold_s" in gen:
            text += f"\n\nGenerate the whole NumPy library ({gen['files']} files, `{gen['command']}`): cold {gen['cold_s']:.2f} s, warm {gen['warm_s']:.2f} s"
        else:
            text += f"\n\nGeneration time: {gen.get('skipped') or gen.get('error')}"
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ops", default="softmax_cross_entropy,layer_norm,linear")
    ap.add_argument("--small", action="store_true", help="small shapes (a smoke run; not for reporting)")
    ap.add_argument("--no-generation", action="store_true", help="skip timing the generator")
    ap.add_argument("--threads", type=int, default=None, help="BLAS and torch threads (default: the libraries' own default)")
    ap.add_argument(
        "--system-malloc", action="store_true",
        help="keep glibc's default of mmap/munmap for every large array (see WARM_MALLOC); by default the "
        "script re-runs itself with a warm heap",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "numpy-cpu.json"))
    args = ap.parse_args(argv)
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in WARM_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WARM_MALLOC})
    if args.threads is not None:
        set_threads(args.threads)
    sys.path.insert(0, str(ROOT))

    info, versions = machine_info()
    print(f"{info.get('cpu', info['machine'])}, {info['cpu_count']} cores, numpy {versions['numpy']}, torch {versions.get('torch')}", flush=True)
    results = [bench_op(op, args.repeats, args.small) for op in args.ops.split(",")]
    gen = None if args.no_generation else bench_generation()
    table = markdown(results, gen)
    print()
    print(table)
    doc = {
        "benchmark": "bench/bench_numpy.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "versions": versions,
        "repeats": args.repeats,
        "threads": args.threads,
        "allocator": "system (mmap per large array)" if args.system_malloc else {"glibc env (warm heap)": WARM_MALLOC},
        "statistic": "median of repeats after one warm-up; ratio_vs_baseline = fwd+bwd median / baseline fwd+bwd median",
        "small": args.small,
        "results": results,
        "generation": gen,
        "table_markdown": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
