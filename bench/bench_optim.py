"""CPU benchmark: one AdamW step over 1e7 fp32 parameters, in one run, three ways.

- ``generated``: ``generated.numpy.adamw.update`` (what ``symgrad.optim.numpy.AdamW.step`` runs): one
  call over every tensor, chunked in-place ufuncs (symgrad/targets/numpy_multi.py);
- ``handwritten``: the same step as an engineer writes it in NumPy, whole arrays, in place where
  NumPy makes it easy (``m *= beta1; m += (1 - beta1)*g``...), temporaries where it does not;
- ``torch_foreach``: ``torch.optim.AdamW(foreach=True)`` on CPU tensors (torch's default threads,
  and again with one thread, as NumPy's ufuncs run on one).

The parameters are four tensors of odd sizes (6e6, 3e6, 999999 and 1 entries). Each time is the
median of ``--repeats`` steps after a warm-up step; the implementations run round-robin within each
repeat. Also reported: the peak of NumPy allocations during one step (tracemalloc), and the bytes
per parameter the kernel plan moves against the minimum (AdamW fp32: 16 read, 12 written), with the
effective bandwidth that gives.

    python bench/bench_optim.py [--repeats 7] [--n 10000000] [--out bench/results/optim-cpu.json]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's generated/ package
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 1e-2


def sizes_for(n: int) -> list[int]:
    parts = [int(n * 0.6), int(n * 0.3), n // 10 - 1]
    return parts + [n - sum(parts)]


def handwritten(ps, gs, ms, vs, t):
    b1, b2 = BETAS
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    for p, g, m, v in zip(ps, gs, ms, vs):
        p *= 1 - LR * WD
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        denom = np.sqrt(v) / math.sqrt(bc2)
        denom += EPS
        p -= (LR / bc1) * m / denom


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--out", default=str(ROOT / "bench/results/optim-cpu.json"))
    args = ap.parse_args(argv)

    import symgrad.ops  # noqa: F401
    from symgrad.declare import REGISTRY
    from symgrad.derive import derive
    from symgrad.plan import lower
    from symgrad.traffic import multi_bytes
    from symgrad.optim.rules import generated_module

    update = generated_module("adamw", "numpy").update
    sizes = sizes_for(args.n)
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(s, dtype=np.float32) for s in sizes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in sizes]
    state = {
        "generated": ([b.copy() for b in base], [np.zeros_like(b) for b in base], [np.zeros_like(b) for b in base]),
        "handwritten": ([b.copy() for b in base], [np.zeros_like(b) for b in base], [np.zeros_like(b) for b in base]),
    }
    threads = torch.get_num_threads()
    tps = {k: [torch.from_numpy(b.copy()).requires_grad_(True) for b in base] for k in ("torch_foreach", "torch_foreach_1thread")}
    topt = {}
    for k, ps in tps.items():
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g.copy())
        topt[k] = torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True)
    steps = {"generated": 0, "handwritten": 0}

    def run(name):
        if name in state:
            steps[name] += 1
            ps, ms, vs = state[name]
            if name == "generated":
                update(ps, grads, ms, vs, LR, steps[name], beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD)
            else:
                handwritten(ps, grads, ms, vs, steps[name])
        else:
            torch.set_num_threads(1 if name.endswith("1thread") else threads)
            topt[name].step()
            torch.set_num_threads(threads)

    names = ["generated", "handwritten", "torch_foreach", "torch_foreach_1thread"]
    for name in names:  # warm-up
        run(name)
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            t0 = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - t0)
    # the same step, the same values: generated and handwritten against torch after the same steps
    agree = {}
    for name in ("generated", "handwritten"):
        ps = state[name][0]
        ref = [p.detach().numpy() for p in tps["torch_foreach"]]
        agree[name] = float(max(np.max(np.abs(a - b)) / np.max(np.abs(b)) for a, b in zip(ps, ref)))
    peaks = {}
    for name in ("generated", "handwritten"):
        tracemalloc.start()
        run(name)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    plan = lower(derive(REGISTRY.get("adamw"), trace=False))
    traffic = multi_bytes(plan, {n: 4 for n in plan.inputs})
    moved = traffic["read"] + traffic["written"]
    results = {
        "benchmark": "AdamW step, fp32, CPU",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": threads},
        "versions": {m: importlib.metadata.version(m) for m in ("numpy", "torch", "sympy")},
        "parameters": args.n, "tensors": sizes, "repeats": args.repeats,
        "bytes_per_parameter": {"plan_read": traffic["read"], "plan_written": traffic["written"],
                                "minimum_read": traffic["minimum_read"], "minimum_written": traffic["minimum_written"]},
        "results": {},
    }
    for name in names:
        med = statistics.median(times[name])
        entry = {"median_s": med, "p20_s": float(np.percentile(times[name], 20)), "p80_s": float(np.percentile(times[name], 80)),
                 "effective_GBps": moved * args.n / med / 1e9}
        if name in peaks:
            entry["peak_numpy_alloc_bytes"] = peaks[name]
            entry["peak_alloc_per_parameter_bytes"] = peaks[name] / args.n
            entry["max_rel_diff_vs_torch"] = agree[name]
        results["results"][name] = entry
    gen = results["results"]["generated"]["median_s"]
    results["ratios"] = {f"generated/{n}": gen / results["results"][n]["median_s"] for n in names[1:]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
