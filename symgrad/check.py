"""``symgrad check [OPS...]``: do three independent gradients of each op agree?

For every op, at its first non-trivial test size, in float64, with random inputs from the op's
domain and random cotangents:

* the *symbolic* gradient (the derived expression, evaluated by :mod:`symgrad.evaluate`);
* *central finite differences* of the generated NumPy forward (of ``sum(dout * out)``);
* the *generated* NumPy ``vjp``.

It prints, per input, the largest absolute and relative difference of generated vs symbolic and of
finite differences vs generated, and exits 1 if any exceeds the op's tolerance. The NumPy module is
rendered from the current declaration (not read from ``generated/``, whose freshness
``symgrad generate --check`` reports), so a check never passes on stale code.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from dataclasses import dataclass
from typing import Sequence

import numpy as np

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DEFAULT_TOL = (1e-5, 1e-6)  # (rtol, atol) when an op declares none for float32
FD_STEP = 1e-6


@dataclass
class Comparison:
    input: str
    what: str  # "generated vs symbolic" | "finite differences vs generated" | "forward"
    max_abs: float
    max_rel: float
    ok: bool


def first_nontrivial(op) -> dict:
    """The first test size whose dims are all at least 2 (size-1 dims hide indexing mistakes),
    else the largest one."""
    from .evaluate import instantiate

    sizes = list(op.test_sizes) or [{}]
    for s in sizes:
        if all(v >= 2 for v in instantiate(op, s).values()):
            return dict(s)
    return dict(max(sizes, key=lambda s: int(np.prod(list(instantiate(op, s).values()) or [1]))))


def tolerance(op) -> tuple[float, float]:
    tol = dict(op.tolerances)
    return tuple(tol.get("float64", tol.get("float32", DEFAULT_TOL)))


def load_numpy_module(program, name: str) -> types.ModuleType:
    """The NumPy module for ``program``, rendered now and executed in memory."""
    from .generate import command_for
    from .targets.numpy import render

    source = render(program, command_for(name, "numpy"))
    module = types.ModuleType(f"symgrad_check_{name}")
    exec(compile(source, f"<generated numpy module of {name}>", "exec"), module.__dict__)
    return module


def _compare(a, b, rtol, atol, name, what) -> Comparison:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.abs(a - b)
    scale = np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / scale).max(initial=0.0))
    ok = bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(diff <= atol + rtol * np.abs(b)))
    return Comparison(name, what, max_abs, max_rel, ok)


def check_op(name: str, seed: int = 0) -> tuple[dict, list[Comparison]]:
    """Compare the three gradients of ``name``; returns ``(sizes, comparisons)``."""
    from .declare import REGISTRY, Role
    from .derive import derive
    from .evaluate import evaluate_forward, evaluate_gradient, param_values, sample_inputs
    from .ir import lower

    op = REGISTRY.get(name)
    sizes = first_nontrivial(op)
    rtol, atol = tolerance(op)
    derivation = derive(op, trace=False)
    module = load_numpy_module(lower(derivation), name)
    rng = np.random.default_rng(seed)
    inputs = sample_inputs(op, sizes, rng)
    params = param_values(op, sizes)
    args = [inputs[t.name] for t in op.inputs]
    symbolic_fwd = evaluate_forward(op, inputs, None, sizes)
    outs, _ = module.forward_with_saved(*args, **params)
    outs = outs if len(op.outputs) > 1 else (outs,)
    cots = [rng.normal(size=np.shape(o)) for o in outs]
    results = [_compare(v, symbolic_fwd[o.name], rtol, atol, o.name, "forward: generated vs symbolic") for o, v in zip(op.outputs, outs)]

    grads = module.vjp(*args, *cots, **params)
    env = {**inputs, **params, **symbolic_fwd, **{f"d{o.name}": c for o, c in zip(op.outputs, cots)}}

    def objective(values) -> float:
        out = module.forward(*values, **params)
        out = out if len(op.outputs) > 1 else (out,)
        return float(sum(np.sum(c * o) for c, o in zip(cots, out)))

    for pos, t in enumerate(op.inputs):
        if t.role is not Role.DIFF:
            continue
        symbolic = evaluate_gradient(derivation, t.name, env, sizes)
        results.append(_compare(grads[pos], symbolic, rtol, atol, t.name, "generated vs symbolic"))
        fd = np.zeros_like(inputs[t.name], dtype=np.float64)
        base = [np.array(a, dtype=np.float64) if u.role is not Role.LABEL else a for a, u in zip(args, op.inputs)]
        x = base[pos]
        for idx in np.ndindex(x.shape):
            h = FD_STEP * max(1.0, abs(float(x[idx])))
            keep = x[idx]
            x[idx] = keep + h
            up = objective(base)
            x[idx] = keep - h
            down = objective(base)
            x[idx] = keep
            fd[idx] = (up - down) / (2 * h)
        results.append(_compare(fd, grads[pos], rtol, atol, t.name, "finite differences vs generated"))
    return sizes, results


def run_check(args) -> int:
    from . import project
    from .declare import REGISTRY

    current = project.load(getattr(args, "ops_modules", None) or ())  # the library, and the user's ops
    names = list(dict.fromkeys(args.ops)) or current.default_ops()
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        print(f"symgrad: error: unknown op(s) {', '.join(map(repr, unknown))}; `symgrad list` shows the registered ops", file=sys.stderr)
        return EXIT_USAGE
    start = time.perf_counter()
    failed = []
    for name in names:
        try:
            sizes, results = check_op(name, seed=args.seed)
        except Exception as e:  # one op's failure must not hide the others' results
            print(f"{name}: error: {type(e).__name__}: {e}")
            failed.append(name)
            continue
        rtol, atol = tolerance(REGISTRY.get(name))
        ok = all(r.ok for r in results)
        dims = ", ".join(f"{k}={v}" for k, v in sizes.items())
        print(f"{name} ({dims}; rtol {rtol:g}, atol {atol:g}): {'ok' if ok else 'DISAGREE'}")
        for r in results:
            print(f"  {r.input:>8}  {r.what:<32} max abs {r.max_abs:9.2e}  max rel {r.max_rel:9.2e}  {'ok' if r.ok else 'FAIL'}")
        if not ok:
            failed.append(name)
    elapsed = time.perf_counter() - start
    summary = f"symgrad check: {len(names) - len(failed)}/{len(names)} ops agree in {elapsed:.1f}s"
    if failed:
        summary += f"; disagreeing: {', '.join(failed)}"
    print(summary, file=sys.stderr)
    return EXIT_FAIL if failed else EXIT_OK


def add_check_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "check",
        help="check symbolic gradients, finite differences and the generated NumPy vjp agree",
        description=(
            "For each op (default: all), at its first non-trivial test size in float64: the symbolic "
            "gradient, central finite differences of the generated forward and the generated NumPy vjp. "
            "Prints max abs/rel errors per input; exits 1 on any disagreement beyond the op's tolerance."
        ),
    )
    p.add_argument("ops", nargs="*", metavar="OP", help="ops to check (default: the project's ops; without a project, every registered op)")
    p.add_argument("--seed", type=int, default=0, help="random seed for inputs and cotangents (default 0)")
    p.set_defaults(func=run_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m symgrad.check``: the same as ``symgrad check``, errors handled alike."""
    from .cli import main as cli_main

    return cli_main(["check", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
