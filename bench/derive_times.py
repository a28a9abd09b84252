"""Derivation time for the whole op library, and evidence that it does not depend on tensor sizes.

    python bench/derive_times.py [--repeat 3] [--sizes]

Prints markdown tables:

1. every registered op: derivation and lowering time (CPU time of this process, which other
   processes on a shared machine barely disturb; best of ``--repeat`` runs, SymPy's cache cleared
   before each, so every run does the full work), gradients, rules fired, the plan's launches and
   what backward saves; and the totals.
2. with ``--sizes``: ``layer_norm`` derived generically (D a symbol) and with D fixed to
   8, 1024 and 1,000,000 (the same declaration with the number substituted): the derivation works on
   ``Sum``s whose bounds are whatever they are, so the time is flat. Against that, the same LayerNorm
   written out over N scalars (``x0 .. x{N-1}``), differentiated by ``sympy.diff``: its size and
   time grow with N.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import sympy as sp
from sympy.core.cache import clear_cache

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad.declare import REGISTRY, Dim, Op
from symgrad.derive import derive
from symgrad.plan import lower


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        clear_cache()
        start = time.process_time()
        out = fn()
        times.append(time.process_time() - start)
    return min(times), out


def library_table(repeat: int) -> str:
    rows, total, total_lower = [], 0.0, 0.0
    for op in REGISTRY:
        sec, d = timed(lambda op=op: derive(op), repeat)
        lsec, plan = timed(lambda d=d: lower(d), repeat)
        total += sec
        total_lower += lsec
        fired = sum(1 for g in d.gradients.values() for s in g.trace.steps if not s.quiet)
        launches = len(plan.forward.launches) + len(plan.backward.launches)
        rows.append(f"| `{op.name}` | {sec * 1e3:.0f} | {lsec * 1e3:.0f} | {', '.join(d.gradients) or '-'} | {fired} | "
                    f"{launches} | {', '.join(plan.saved) or '-'} |")
    head = ["| op | derive (ms) | lower (ms) | gradients | rules fired | launches | saved for backward |",
            "|---|---:|---:|---|---:|---:|---|"]
    tail = [f"| **total ({len(rows)} ops)** | **{total * 1e3:.0f}** | **{total_lower * 1e3:.0f}** | | | | |"]
    return "\n".join(head + rows + tail)


def with_fixed_dim(op: Op, name: str, n: int) -> Op:
    """The same declaration with dim ``name`` fixed to the number ``n``."""
    old = next(d for d in op.dims if d.name == name)
    new = Dim(old.name, old.index, sp.Integer(n))
    sub = {old.symbol: sp.Integer(n)}

    def dims(ds):
        return tuple(new if d == old else d for d in ds)

    def outs(qs):
        return tuple(dataclasses.replace(q, expr=q.expr.xreplace(sub), dims=dims(q.dims)) for q in qs)

    inputs = tuple(dataclasses.replace(t, dims=dims(t.dims)) for t in op.inputs)
    return dataclasses.replace(op, name=f"{op.name}_{name}{n}", inputs=inputs,
                               intermediates=outs(op.intermediates), outputs=outs(op.outputs))


def expanded_layer_norm(n: int):
    """LayerNorm over one row of n scalars, written out, and d/dx0 of sum(dy*y) by sympy.diff."""
    x = sp.symbols(f"x0:{n}", real=True)
    w = sp.symbols(f"w0:{n}", real=True)
    bias = sp.symbols(f"bias0:{n}", real=True)
    dy = sp.symbols(f"dy0:{n}", real=True)
    eps = sp.Symbol("eps", positive=True)
    mean = sp.Add(*x) / n
    rstd = 1 / sp.sqrt(sp.Add(*[(xi - mean) ** 2 for xi in x]) / n + eps)
    loss = sp.Add(*[dy[j] * ((x[j] - mean) * rstd * w[j] + bias[j]) for j in range(n)])
    return sp.diff(loss, x[0])


def sizes_table(repeat: int) -> str:
    op = REGISTRY.get("layer_norm")
    lines = ["| declaration | derive (ms) | gradient of x (ops) |", "|---|---:|---:|"]
    sec, d = timed(lambda: derive(op), repeat)
    lines.append(f"| `layer_norm`, D symbolic | {sec * 1e3:.0f} | {sp.count_ops(d.gradients['x'].expr)} |")
    for n in (8, 1024, 1_000_000):
        fixed = with_fixed_dim(op, "D", n)
        sec, d = timed(lambda fixed=fixed: derive(fixed), repeat)
        lines.append(f"| `layer_norm`, D = {n:,} | {sec * 1e3:.0f} | {sp.count_ops(d.gradients['x'].expr)} |")
    lines += ["", "| scalar-expanded LayerNorm row, `sympy.diff` only | time (ms) | derivative (ops) |", "|---|---:|---:|"]
    for n in (4, 8, 16, 32, 64):
        sec, g = timed(lambda n=n: expanded_layer_norm(n), 1)
        lines.append(f"| N = {n} | {sec * 1e3:.0f} | {sp.count_ops(g)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per op; the best is reported (default 5)")
    ap.add_argument("--sizes", action="store_true", help="also show that derivation time does not depend on sizes")
    args = ap.parse_args(argv)
    print(f"Python {platform.python_version()}, SymPy {sp.__version__}, {platform.machine()} with {os.cpu_count()} CPUs, "
          f"CPU time, best of {args.repeat} runs, SymPy cache cleared before each\n")
    print(library_table(args.repeat))
    if args.sizes:
        print()
        print(sizes_table(args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
