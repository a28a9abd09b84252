"""Stable gradients for users' ops, and the float32 stress tier of ``symgrad check`` that notices.

* attention (one head, and the example project's multi-head ``[B, H, T, E]`` op with its causal
  mask): ``dQ``, ``dK``, ``dV`` read the declared ``p`` (and ``O``), never an exp of a score; they
  agree with central finite differences of the declared forward in float64, causal or not;
* the stress tier: the library's ops pass it; a gradient that keeps a raw ``exp(score)`` (the
  derivation as it was before reuse saw ``exp(s)*exp(-lse)`` as ``p``) fails it, naming the input
  that shows it, and the derivation as it is passes it.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad import check, declare, stages
from symgrad.declare import REGISTRY, Dim, Op, Tensor, idx, output
from symgrad.derive import derive
from symgrad.evaluate import evaluate_forward, evaluate_gradient, finite_differences, param_values, sample_inputs
from symgrad.plan import lower
from symgrad.rewrite import Stage

derive_module = importlib.import_module("symgrad.derive")  # the module (symgrad.derive is also the function)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "user_project" / "userops" / "attention.py"


def one_head() -> Op:
    """Attention on [T, E] as a person writes it: scores, the row lse, p = exp(score - lse)."""
    T, E = Dim("T", "t"), Dim("E", "e")
    t, s, e, u = idx("t s e u")
    Q, K, V = (Tensor(n, (T, E)) for n in "QKV")
    score, lse, p = (sp.IndexedBase(n, real=True) for n in ("score", "lse", "p"))
    return Op(
        "attention_one_head", "softmax(Q K^T/sqrt(E)) V", (Q, K, V),
        intermediates=(
            output("score", (t, s), sp.Sum(Q[t, e] * K[s, e], (e, 0, E.size - 1)) / sp.sqrt(E.size), (T, T)),
            output("lse", t, sp.log(sp.Sum(sp.exp(score[t, u]), (u, 0, T.size - 1))), T),
            output("p", (t, s), sp.exp(score[t, s] - lse[t]), (T, T)),
        ),
        outputs=(output("O", (t, e), sp.Sum(p[t, s] * V[s, e], (s, 0, T.size - 1)), (T, E)),),
        test_sizes=({"T": 4, "E": 3},),
        tolerances={"float32": (1e-5, 1e-6)},
    )


@functools.cache
def multi_head() -> Op:
    """The example project's attention op, declared into a registry of its own (so the library's
    registry, which other tests walk, does not grow)."""
    private = declare.Registry()
    saved, declare.REGISTRY = declare.REGISTRY, private
    try:
        spec = importlib.util.spec_from_file_location("_userops_attention", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        declare.REGISTRY = saved
    return private.get("attention")


@functools.cache
def derivation(which: str):
    return derive(one_head() if which == "one_head" else multi_head())


def exps(expr) -> list:
    return [a for a in sp.preorder_traversal(expr) if isinstance(a, sp.exp)]


@pytest.mark.parametrize("which", ["one_head", "multi_head"])
def test_attention_gradients_read_p_and_never_exp_a_score(which):
    d = derivation(which)
    assert set(d.gradients) == {"Q", "K", "V"}
    for name, g in d.gradients.items():
        read = {str(a.base) for a in g.expr.atoms(sp.Indexed)}
        assert "p" in read, (name, g.expr)
        assert not exps(g.expr), f"d{name} keeps {exps(g.expr)[0]}"
        assert "score" not in read and "lse" not in read, (name, g.expr)
    assert d.reads == ("p", "O")
    # dV = p^T dO, and dQ / dK hold the hand form p*(dP - rowsum(dO*O)) once each
    dV = d.gradients["V"].expr
    assert isinstance(dV, sp.Sum) and {str(a.base) for a in dV.atoms(sp.Indexed)} == {"p", "dO"}
    for name in ("Q", "K"):
        g = d.gradients[name].expr
        outer = [s for s in g.atoms(sp.Sum) if any(str(a.base) == "p" for a in s.function.atoms(sp.Indexed))]
        assert len(outer) == 1, (name, g)  # one pass over the keys, not two that cancel


@pytest.mark.parametrize("which, sizes, causal", [
    ("one_head", {"T": 4, "E": 3}, None),
    ("multi_head", {"B": 1, "H": 2, "T": 4, "E": 2}, 0),
    ("multi_head", {"B": 2, "H": 1, "T": 5, "E": 3}, 1),
])
def test_attention_gradients_agree_with_finite_differences(which, sizes, causal):
    d = derivation(which)
    op = d.op
    params = None if causal is None else {"causal": causal}
    rng = np.random.default_rng(7)
    inputs = {n: 2 * v for n, v in sample_inputs(op, sizes, rng, params).items()}  # scores of a few units
    fwd = evaluate_forward(op, inputs, params, sizes)
    cot = {"dO": rng.normal(size=fwd["O"].shape)}
    env = {**inputs, **param_values(op, sizes, params), **fwd, **cot}
    for name in ("Q", "K", "V"):
        got = evaluate_gradient(d, name, env, sizes)
        want = finite_differences(op, inputs, params, sizes, name, cot)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")
    if causal:  # the last key is masked for every query but the last: it gets no gradient through p
        assert np.all(fwd["p"][..., :-1, -1] == 0)


def test_causal_attention_is_stable_with_masked_scores_far_above_the_kept_ones():
    """A causal row's max is over the keys the mask keeps: masked scores far above the kept ones
    (the first query sees only the first key) must not underflow the row to 0/0."""
    op = multi_head()
    d = derivation("multi_head")
    module = check.load_numpy_module(lower(d), op.name)
    T, E = 4, 2
    q = np.zeros((1, 1, T, E), np.float32)
    k = np.zeros((1, 1, T, E), np.float32)
    q[..., 0, 0], k[..., 0, 0], k[..., 1:, 0] = 10.0, -10.0, 10.0  # score[0, 0] = -70.7, masked scores +70.7
    v = np.arange(T * E, dtype=np.float32).reshape(1, 1, T, E)
    out = module.forward(q, k, v, causal=1)
    assert np.all(np.isfinite(out)) and np.allclose(out[0, 0, 0], v[0, 0, 0])  # the first query sees the first key only
    grads = module.vjp(q, k, v, np.ones_like(out), causal=1)
    assert all(np.all(np.isfinite(g)) for g in grads)


# ------------------------------------------------------------------------------------------------
# the float32 stress tier


@pytest.mark.parametrize("name", [op.name for op in REGISTRY.of_kind("op")])
def test_library_op_passes_the_stress_tier(name):
    stress = check.stress_op(REGISTRY.get(name))
    assert stress.magnitude > 50 or stress.scale > 1, stress.where()  # it really did stress something
    assert stress.ok, f"{stress.where()}: " + "; ".join(f"{r.input} {r.what} {r.max_abs:.3g}" for r in stress.results if not r.ok)


def _unstable_derivation(op, monkeypatch):
    """The derivation as it was before gradients reused p: only lse is found again (so dQ, dK keep
    exp(score)*exp(-lse)), and no exp under a sum is shifted."""
    new = {"factor_into_sum", "exp_sum_shift", "merge_exps", "log_of_exp", "sum_nest", "sum_join"}

    def without(stage):
        return Stage(stage.name, tuple(r for r in stage.rules if r.name not in new), stage.max_passes)

    real_patterns = derive_module.forward_patterns
    monkeypatch.setattr(derive_module, "GRADIENT_STAGES", tuple(without(s) for s in stages.GRADIENT_STAGES))
    monkeypatch.setattr(derive_module, "forward_patterns", lambda *a: [p for p in real_patterns(*a) if p.name == "lse"])
    return derive(op, trace=False)


def test_stress_tier_fails_a_gradient_that_keeps_a_raw_exp_and_passes_the_stable_one(monkeypatch):
    op = one_head()
    unstable = _unstable_derivation(op, monkeypatch)
    assert exps(unstable.gradients["K"].expr)  # exp(Sum(Q*K)/sqrt(E)) under the sums, as in issue 7
    bad = check.stress_op(op, seed=0, derivation=unstable)
    assert not bad.ok
    failing = [r for r in bad.results if not r.ok]
    assert any(r.input == "K" and r.what.startswith("backward") for r in failing), failing
    where = bad.where()
    assert where.startswith("op attention_one_head (T=4, E=3), seed 0, scale ") and "forward values reach" in where
    monkeypatch.undo()
    good = check.stress_op(op, seed=0, derivation=derive(op, trace=False))
    assert good.ok, [(r.input, r.what, r.max_abs) for r in good.results if not r.ok]
    assert good.scale == bad.scale  # the same input


def test_stress_tier_of_the_example_attention_causal_or_not():
    op, d = multi_head(), derivation("multi_head")
    for causal in (0, 1):
        stress = check.stress_op(op, seed=0, params={"causal": causal}, derivation=d)
        assert stress.ok and stress.magnitude > 50, stress.where()


def test_symgrad_check_prints_the_stress_tier_and_fails_an_unstable_module(capsys, monkeypatch):
    assert check.run_check(argparse.Namespace(ops=["softmax"], seed=0)) == 0
    out = capsys.readouterr().out
    assert "stress: float32 at scale" in out and "backward: float32 vs float64" in out

    real = check.load_numpy_module

    def naive_softmax(program, name):  # a backward that forms exp(x) unshifted, as a careless kernel does
        mod = real(program, name)
        forward_with_saved = mod.forward_with_saved

        def keep_x(x, **params):
            out, saved = forward_with_saved(x, **params)
            return out, {**saved, "x": np.asarray(x)}

        def backward(saved, dp):
            with np.errstate(all="ignore"):
                e = np.exp(saved["x"])
                p = e / e.sum(axis=1, keepdims=True)
                return (p * (dp - (p * dp).sum(axis=1, keepdims=True)),)

        mod.forward_with_saved, mod.backward = keep_x, backward
        mod.vjp = lambda x, dp, **params: backward(keep_x(x, **params)[1], dp)
        return mod

    monkeypatch.setattr(check, "load_numpy_module", naive_softmax)
    assert check.run_check(argparse.Namespace(ops=["softmax"], seed=0)) == 1
    out = capsys.readouterr().out
    assert "UNSTABLE in float32" in out and "float32 is off under stress at: op softmax (B=3, C=5), seed 0, scale" in out
