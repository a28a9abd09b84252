"""``symgrad check [OPS...]``: do three independent gradients of each op agree?

For every op, at its first non-trivial test size, in float64, with random inputs from the op's
domain and random cotangents:

* the *symbolic* gradient (the derived expression, evaluated by :mod:`symgrad.evaluate`);
* *central finite differences* of the generated NumPy forward (of ``sum(dout * out)``);
* the *generated* NumPy ``vjp``.

Then a float32 *stress* tier (:func:`stress_op`): the differentiable inputs scaled until the
forward's values (logits, scores) reach about ``STRESS_MAGNITUDE`` = 100, the generated forward and
vjp run in float32 and in float64 on the same inputs. Small float64 samples cannot see an exp that
overflows or a difference of huge terms; this tier does, and names the input that shows it (op,
sizes, seed, scale, params).

It prints, per input, the largest absolute and relative difference of generated vs symbolic, of
finite differences vs generated and of float32 vs float64 under stress, and exits 1 if any exceeds
the op's tolerance. The NumPy module is rendered from the current declaration (not read from
``generated/``, whose freshness ``symgrad generate --check`` reports), so a check never passes on
stale code.
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


def prepare(op) -> tuple:
    """``(derivation, NumPy module)`` of ``op``, derived and rendered now."""
    from .derive import derive
    from .plan import lower

    derivation = derive(op, trace=False)
    return derivation, load_numpy_module(lower(derivation), op.name)


def check_op(name: str, seed: int = 0, prepared: tuple | None = None) -> tuple[dict, list[Comparison]]:
    """Compare the three gradients of ``name``; returns ``(sizes, comparisons)``."""
    from .declare import REGISTRY, Role
    from .evaluate import evaluate_forward, evaluate_gradient, param_values, sample_inputs

    op = REGISTRY.get(name)
    sizes = first_nontrivial(op)
    rtol, atol = tolerance(op)
    derivation, module = prepared or prepare(op)
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


STRESS_MAGNITUDE = 100.0  # the stress tier scales inputs until forward values (scores, logits) reach this
STRESS_MASK = 1e15  # forward values beyond this are mask constants (a finite -inf), not magnitudes
_STRESS_STEP = 2 ** 0.25  # scales tried: 1, 2**(1/4), 2**(1/2), ... up to _STRESS_MAX_SCALE
_STRESS_MAX_SCALE = 1e4


@dataclass
class Stress:
    """One float32 stress run of an op: where it ran, and how far float32 landed from float64."""

    op: str
    sizes: dict
    seed: int
    scale: float  # the differentiable inputs are their domain sample times this
    magnitude: float  # the largest |forward value| at that scale, in float64
    params: dict
    tolerance: tuple  # (rtol, atol): allowed max |float32 - float64| is atol + rtol*max |float64|
    results: list  # Comparison per output (forward) and per differentiable input (gradient)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def where(self) -> str:
        """The input that shows it: enough to rerun the same point."""
        dims = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        params = "".join(f", {k}={v:g}" for k, v in self.params.items())
        return f"op {self.op} ({dims}), seed {self.seed}, scale {self.scale:.4g} (forward values reach {self.magnitude:.3g}){params}"


def stress_tolerance(op) -> tuple[float, float]:
    """``(rtol, atol)`` for the stress tier: a float32 gradient may land ``atol + rtol*max|float64|``
    from float64. They are the op's float32 tolerances (meant for values of order 1) times the
    stress magnitude: float32 rounding of an argument of size M moves what is computed from it by
    about M*eps, so a stable kernel stays within them while an unstable one (an exp that
    overflows, a difference of huge terms) lands orders of magnitude outside."""
    rtol, atol = dict(op.tolerances).get("float32", DEFAULT_TOL)
    return float(rtol) * STRESS_MAGNITUDE, float(atol) * STRESS_MAGNITUDE


def _magnitude(op, inputs, params, sizes) -> float:
    from .evaluate import evaluate_forward

    values = [*inputs.values(), *evaluate_forward(op, inputs, params, sizes).values()]
    top = 0.0
    for v in values:
        a = np.abs(np.asarray(v, dtype=np.float64))
        a = a[np.isfinite(a) & (a < STRESS_MASK)]
        top = max(top, float(a.max(initial=0.0)))
    return top


def stress_scale(op, inputs, params, sizes) -> tuple[float, float]:
    """The largest scale (of 1, 2**(1/4), ... up to 1e4) of the differentiable inputs at which the
    forward's values (inputs, intermediates, outputs; float64) stay within ``STRESS_MAGNITUDE``:
    softmax logits, attention scores, a log's argument reach about 100, an exp's output 100.
    Inputs keep their sign, so a positive domain (a log's) stays positive; labels and constants
    (targets) keep their declared domain."""
    from .declare import Role

    def scaled(s):
        return {n: v * s if op.tensor(n).role is Role.DIFF else v for n, v in inputs.items()}

    best, mag = 1.0, _magnitude(op, inputs, params, sizes)
    s = _STRESS_STEP
    while s <= _STRESS_MAX_SCALE:
        m = _magnitude(op, scaled(s), params, sizes)
        if not np.isfinite(m) or m > STRESS_MAGNITUDE:
            break
        best, mag, s = s, m, s * _STRESS_STEP
    return best, mag


def stress_op(op, seed: int = 0, sizes=None, params=None, derivation=None, module=None) -> Stress:
    """The float32 stress tier for ``op`` (an ``Op``), at its inputs scaled by ``stress_scale``.

    The generated NumPy module runs in float32 and, on the very same (float32-rounded) inputs and
    cotangents, in float64:

    * forward: each output and each value saved for backward, float32 vs float64;
    * backward: the float32 backward vs the float64 backward *from the same float32 saved values*,
      which is where a gradient formula that keeps a raw ``exp(score)``, or subtracts huge terms,
      shows: float64 computes it right from the values float32 had;
    * gradient: the whole float32 vjp vs the float64 one, which must be finite wherever float64 is.
      Its error is reported, not bounded: it includes the problem's own conditioning (a saturated
      softmax's gradient is a small difference of terms that float32 rounds at the scale of the
      logits), which no float32 kernel can beat.

    Each bounded comparison allows ``atol + rtol*max|float64|`` with ``stress_tolerance(op)``.
    """
    from .declare import Role
    from .evaluate import param_values, sample_inputs

    sizes = dict(sizes) if sizes is not None else first_nontrivial(op)
    if module is None:
        if derivation is None:
            derivation, module = prepare(op)
        else:
            from .plan import lower

            module = load_numpy_module(lower(derivation), op.name)
    pv = param_values(op, sizes, params)
    rng = np.random.default_rng(seed)
    inputs = sample_inputs(op, sizes, rng, params)
    scale, magnitude = stress_scale(op, inputs, params, sizes)
    tol = stress_tolerance(op)
    # Overflow is one-sided (exp(+x)), so inputs whose domain has both signs also run negated.
    signs = (1, -1) if any(t.role is Role.DIFF and t.domain[0] < 0 < t.domain[1] for t in op.inputs) else (1,)
    results = []
    for sign in signs:
        results += _stress_point(op, module, inputs, scale * sign, pv, tol, np.random.default_rng([seed, 1]), "" if sign > 0 else " (inputs negated)")
    shown = {p.name: pv[p.name] for p in op.params}
    return Stress(op.name, sizes, seed, scale, magnitude, shown, tol, results)


def _stress_point(op, module, inputs, scale, pv, tol, rng, note) -> list:
    """The stress comparisons at ``inputs`` with the differentiable ones times ``scale``."""
    from .declare import Role

    x32 = [np.asarray(inputs[t.name] * scale if t.role is Role.DIFF else inputs[t.name]) for t in op.inputs]
    x32 = [a if t.role is Role.LABEL else a.astype(np.float32) for a, t in zip(x32, op.inputs)]
    x64 = [a if t.role is Role.LABEL else a.astype(np.float64) for a, t in zip(x32, op.inputs)]
    many = len(op.outputs) > 1
    out64, saved64 = module.forward_with_saved(*x64, **pv)
    out32, saved32 = module.forward_with_saved(*x32, **pv)
    out64, out32 = (out64, out32) if many else ((out64,), (out32,))
    cot32 = [rng.normal(size=np.shape(o)).astype(np.float32) for o in out64]
    cot64 = [c.astype(np.float64) for c in cot32]
    results = [_compare_stress(a, b, tol, o.name, "forward: float32 vs float64" + note) for o, a, b in zip(op.outputs, out32, out64)]
    outputs = {o.name for o in op.outputs}
    inputs_ = {t.name for t in op.inputs}
    for name in sorted(saved32):
        v = saved32[name]
        if name not in outputs | inputs_ and isinstance(v, np.ndarray) and v.dtype.kind == "f":
            results.append(_compare_stress(v, saved64[name], tol, name, "saved: float32 vs float64" + note))
    up = {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v for k, v in saved32.items()}
    b32, b64 = module.backward(saved32, *cot32), module.backward(up, *cot64)
    g32, g64 = module.vjp(*x32, *cot32, **pv), module.vjp(*x64, *cot64, **pv)
    for pos, t in enumerate(op.inputs):
        if t.role is Role.DIFF:
            results.append(_compare_stress(b32[pos], b64[pos], tol, t.name, "backward: float32 vs float64" + note))
            results.append(_compare_stress(g32[pos], g64[pos], None, t.name, "gradient: float32 vs float64" + note))
    return results


def _compare_stress(got, want, tol, name, what) -> Comparison:
    """max abs difference, and that as a fraction of max |want|; ok where ``got`` is finite wherever
    ``want`` is and (unless ``tol`` is None) within ``atol + rtol*max|want|``."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    diff = np.nan_to_num(np.abs(got - want), nan=np.inf)
    top = float(np.abs(want[np.isfinite(want)]).max(initial=0.0))
    max_abs = float(diff.max(initial=0.0))
    max_rel = max_abs / top if top > 0 else (0.0 if max_abs == 0 else np.inf)
    ok = bool(np.all(np.isfinite(got) | ~np.isfinite(want)))
    if tol is not None:
        rtol, atol = tol
        ok = ok and max_abs <= atol + rtol * top
    return Comparison(name, what, max_abs, max_rel, ok)


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
        op = REGISTRY.get(name)
        try:
            prepared = prepare(op)
            sizes, results = check_op(name, seed=args.seed, prepared=prepared)
            stress = stress_op(op, seed=args.seed, derivation=prepared[0], module=prepared[1])
        except Exception as e:  # one op's failure must not hide the others' results
            print(f"{name}: error: {type(e).__name__}: {e}")
            failed.append(name)
            continue
        rtol, atol = tolerance(op)
        ok = all(r.ok for r in results)
        dims = ", ".join(f"{k}={v}" for k, v in sizes.items())
        verdict = "ok" if ok and stress.ok else "DISAGREE" if not ok else "UNSTABLE in float32"
        print(f"{name} ({dims}; rtol {rtol:g}, atol {atol:g}): {verdict}")
        for r in results:
            print(f"  {r.input:>8}  {r.what:<32} max abs {r.max_abs:9.2e}  max rel {r.max_rel:9.2e}  {'ok' if r.ok else 'FAIL'}")
        srtol, satol = stress.tolerance
        print(f"  stress: float32 at scale {stress.scale:.3g} (forward values reach {stress.magnitude:.3g}; rtol {srtol:g}, atol {satol:g})")
        for r in stress.results:
            print(f"  {r.input:>8}  {r.what:<32} max abs {r.max_abs:9.2e}  max rel {r.max_rel:9.2e}  {'ok' if r.ok else 'FAIL'}")
        if not stress.ok:
            print(f"  float32 is off under stress at: {stress.where()}")
        if not (ok and stress.ok):
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
